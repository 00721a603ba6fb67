"""Structured logs: JSON in production, readable in development, secrets redacted.

Every record, ours or a library's (uvicorn, SQLAlchemy, aiohttp), passes the redaction
processor: values under secret-looking keys are replaced, and anything shaped like a token
(JWT, bearer credential, our API keys, long random strings) is masked wherever it appears.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry import trace

REDACTED = "[redacted]"

_SECRET_KEY = re.compile(
    r"(pass(word)?|secret|token|authorization|cookie|api[_-]?key|credential|verifier|"
    r"private|signature|session|csrf|code$|^body$|^message$)",
    re.IGNORECASE,
)
# Keys whose values are safe even though the name matches above.
_SAFE_KEYS = frozenset(
    {"event", "message_id", "session_id_hash", "token_type", "status_code", "code_error", "error_code"}
)
_TOKEN_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # JWT: three base64url segments, the first two starting with "eyJ"
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # an Authorization header value
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # our own API keys, connect links, invitations and password reset links
    (re.compile(r"\bsmc_(?:live|key|link|inv|pwr)_[A-Za-z0-9_-]{8,}"), REDACTED),
    # key=value pairs in query strings or form bodies
    (
        re.compile(
            r"(?i)\b(access_token|refresh_token|client_secret|code_verifier|password|api_key|token|code)"
            r"=[^&\s\"']+"
        ),
        rf"\1={REDACTED}",
    ),
    # any long random-looking run (opaque tokens, hex secrets); UUIDs are kept, see _keep_uuid
    (re.compile(r"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{32,}"), REDACTED),
]


def redact_text(value: str) -> str:
    """Mask anything in free text that is shaped like a credential."""
    for pattern, replacement in _TOKEN_PATTERNS:
        if replacement is REDACTED:
            value = pattern.sub(_keep_uuid, value)
        else:
            value = pattern.sub(replacement, value)
    return value


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _keep_uuid(match: re.Match[str]) -> str:
    return match.group(0) if _UUID.fullmatch(match.group(0)) else REDACTED


def _redact_value(key: str | None, value: Any, depth: int = 0) -> Any:
    if key is not None and key not in _SAFE_KEYS and _SECRET_KEY.search(key):
        return REDACTED if value not in (None, "", [], {}) else value
    if depth > 6:
        return "[truncated]"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(None, v, depth + 1) for v in value]
    return value


def redact_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask secrets in every field, including the message itself."""
    for key, value in list(event_dict.items()):
        if key == "event":
            event_dict[key] = redact_text(value) if isinstance(value, str) else value
        elif key == "exc_info":
            continue
        else:
            event_dict[key] = _redact_value(key, value)
    event_dict.pop("color_message", None)
    return event_dict


def _escape_control_chars(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Keep one record on one line: a CR or LF in a value cannot forge a second log line."""
    for key, value in event_dict.items():
        if isinstance(value, str) and any(c in value for c in "\r\n\x1b"):
            event_dict[key] = value.replace("\r", "\\r").replace("\n", "\\n").replace("\x1b", "\\x1b")
    return event_dict


def add_trace_ids(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the current span's ``trace_id`` (32 hex) and ``span_id`` (16 hex), when
    there is one (``app.core.tracing``): the request's span while it runs, still its ids in the
    access line written after the answer. After the redaction, which would mask 32 hex digits."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


def configure_logging(
    *, level: str = "INFO", json_output: bool = False, stream: Any = None, trace_ids: bool = False
) -> None:
    """Route structlog and the standard library through one redacting pipeline; with ``trace_ids``
    (tracing is on) every record made inside a span carries its ids."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    if trace_ids:
        shared.append(add_trace_ids)
    final: list[Any] = [structlog.processors.format_exc_info, _redact_exception]
    if json_output:
        final.append(structlog.processors.JSONRenderer())
    else:
        final += [_escape_control_chars, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        # filter_by_level first: a call below the level costs one comparison, not the whole chain
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Database drivers log SQL parameters at DEBUG; parameters can hold personal data.
    for name in ("aiosqlite", "sqlalchemy.engine", "sqlalchemy.pool", "asyncpg"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # We write our own access line (path without query string, request id); uvicorn's would
    # print query strings verbatim.
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.getLogger("uvicorn.access").propagate = False
    logging.getLogger("uvicorn.access").disabled = True


def _redact_exception(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if isinstance(event_dict.get("exception"), str):
        event_dict["exception"] = redact_text(event_dict["exception"])
    return event_dict


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
