"""Jinja2 for the browser pages. Autoescaping is on for every template."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.templating import Jinja2Templates

from app import __version__
from app.core.paths import TEMPLATES_DIR
from app.core.settings import Settings


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    delta = datetime.now(UTC) - value
    seconds = int(delta.total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if future else f"{text} ago"


def _utc(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def create_templates(settings: Settings) -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.autoescape = True
    env.filters["ago"] = _ago
    env.filters["utc"] = _utc
    env.globals["app_version"] = __version__
    env.globals["environment"] = settings.env.value
    return templates
