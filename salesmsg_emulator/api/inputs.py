"""Reading request input as liberally as Salesmsg accepts it.

Writes may arrive as query parameters, a form (urlencoded or multipart) or a
JSON object; all are merged (body over query). ``media_url[][url]``,
``media_url[0][url]``, ``media_url[]`` and ``media_url`` are all media URLs,
as is a JSON ``media_url`` list of strings or ``{"url": ...}`` objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from starlette.requests import Request

from salesmsg_emulator.api.guard import ApiError, invalid
from salesmsg_emulator.request_body import parse_json

_MEDIA_KEY = re.compile(r"^media_urls?(\[\d*\])?(\[url\])?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass
class Inputs:
    fields: dict[str, Any] = field(default_factory=dict)
    media_urls: list[Any] = field(default_factory=list)

    def get(self, name: str) -> Any:
        return self.fields.get(name)

    def has(self, name: str) -> bool:
        return name in self.fields


def _json_media(value: Any) -> list[Any]:
    if isinstance(value, dict):
        value = list(value.values()) if "url" not in value else [value]
    if not isinstance(value, list):
        value = [value]
    return [item.get("url") if isinstance(item, dict) else item for item in value]


async def read_input(request: Request) -> Inputs:
    items: list[tuple[str, Any]] = list(request.query_params.multi_items())
    body: dict[str, Any] = {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        items += [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    elif request.method != "GET":
        raw = await request.body()
        if raw.strip() and (content_type.endswith("json") or raw.lstrip()[:1] == b"{"):
            try:
                parsed = parse_json(raw)
            except ValueError:
                raise ApiError(400, {"message": "The request body is not valid JSON."}) from None
            if not isinstance(parsed, dict):
                raise ApiError(400, {"message": "The request body must be a JSON object."})
            body = parsed
    inputs = Inputs()
    for key, value in items:
        if _MEDIA_KEY.match(key):
            inputs.media_urls.append(value)
        else:
            inputs.fields[key] = value
    for key, value in body.items():
        if key in ("media_url", "media_urls"):
            inputs.media_urls.extend(_json_media(value))
        else:
            inputs.fields[key] = value
    return inputs


def int_param(value: Any, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer parameter: ``default`` when absent, 422 when not an integer or below ``minimum``,
    clamped to ``maximum``."""
    if value is None or value == "":
        return default
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (isinstance(value, float) and not value.is_integer()):
        raise invalid({name: [f"The {name.replace('_', ' ')} must be an integer."]})
    if number < minimum:
        raise invalid({name: [f"The {name.replace('_', ' ')} must be at least {minimum}."]})
    return min(number, maximum) if maximum is not None else number


def page_param(value: Any) -> int:
    """A page number: 1 when absent; 0 is accepted as the first page (Salesmsg's own example sends
    ``page=0``); 422 when not an integer or negative."""
    return max(1, int_param(value, "page", 1, minimum=0))


def time_param(value: Any, name: str) -> float | None:
    """A date or time: ISO 8601 (date only = midnight UTC; no zone = UTC) or POSIX seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise invalid({name: [f"The {name.replace('_', ' ')} is not a valid date."]}) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def bool_param(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise invalid({name: [f"The {name.replace('_', ' ')} field must be true or false."]})


def text_errors(value: Any, name: str, *, required: bool, max_length: int) -> list[str]:
    """The validation errors of a string field (empty list when fine)."""
    label = name.replace("_", " ")
    if value is None or (isinstance(value, str) and not value.strip()):
        return [f"The {label} field is required."] if required else []
    if not isinstance(value, str):
        return [f"The {label} must be a string."]
    if len(value) > max_length:
        return [f"The {label} may not be greater than {max_length} characters."]
    return []


def email_errors(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if not isinstance(value, str) or len(value) > 255 or not _EMAIL.match(value):
        return ["The email must be a valid email address."]
    return []


def media_url_errors(urls: list[Any]) -> list[str]:
    if len(urls) > 10:
        return ["No more than 10 media URLs may be sent."]
    for url in urls:
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
            return ["Each media url must be a valid http or https URL."]
    return []
