"""What the edge refuses before any route or query runs.

- Text PostgreSQL or our formats cannot hold: NUL (U+0000), and half of a UTF-16 surrogate pair
  (U+D800 to U+DFFF, which a JSON ``\\u`` escape can spell but UTF-8 cannot carry). In the path or
  the query string: 400 ``invalid_character``; in a form field, or a JSON string or key: 422
  ``invalid_character``.
- Ambiguous JSON: an object with the same key twice is 422 ``duplicate_key`` (a parser keeps the
  last one, so ``{"hipaa": true, "hipaa": false}`` would quietly create a tenant without HIPAA);
  nesting deeper than ``MAX_JSON_DEPTH`` is 400 ``json_too_deep``. JSON that does not parse at all
  is left to the route, which answers it as before.
- The Host header: an HTTP/1.1 request carries exactly one (RFC 9112, section 3.2), an HTTP/1.0
  request at most one; otherwise 400 ``invalid_host``.
- A multipart body is refused (415 ``unsupported_media_type``): no form of ours sends one.

Pure: the middleware applies these to every request but the proxy's, which applies them itself
(after it knows the endpoint, so a refused PHI call is audited like every other refusal).
"""

from __future__ import annotations

import json
import re
from collections.abc import MutableMapping
from typing import Any

from app.core.errors import Refusal

MAX_JSON_DEPTH = 32
_UNHOLDABLE = re.compile("[\x00\ud800-\udfff]")
_CHARACTER = "A value holds a character we cannot store (a NUL, or half of a UTF-16 surrogate pair)."


class _DuplicateKey(Exception):
    """Not a ValueError: json.loads must not mistake it for malformed input."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _DuplicateKey()
    return found


def check_host(scope: MutableMapping[str, Any]) -> Refusal | None:
    hosts = sum(1 for name, _ in scope["headers"] if name == b"host")
    if hosts > 1 or (hosts == 0 and scope.get("http_version") != "1.0"):
        return Refusal(400, "invalid_host", "A request carries exactly one Host header.")
    return None


def check_url(scope: MutableMapping[str, Any]) -> Refusal | None:
    """The path and the query string."""
    query: bytes = scope.get("query_string", b"")
    if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
        return Refusal(400, "invalid_character", _CHARACTER)
    return None


_FORM = "application/x-www-form-urlencoded"


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    media = _media(content_type)
    return media == "application/json" or media.endswith("+json")


def check_media(content_type: str | None) -> Refusal | None:
    """Multipart is refused before its body is read: no form of ours sends it, and its ``charset``
    parameter could spell a NUL that no byte scan sees."""
    if _media(content_type).startswith("multipart/"):
        return Refusal(415, "unsupported_media_type", "Send forms as application/x-www-form-urlencoded, data as JSON.")
    return None


def checks_body(content_type: str | None) -> bool:
    """Whether ``check_body`` judges this media type (a form or JSON); others are the route's."""
    return _media(content_type) == _FORM or is_json(content_type)


def check_body(content_type: str | None, body: bytes) -> Refusal | None:
    """A form's fields or a JSON body."""
    if _media(content_type) == _FORM:
        return Refusal(422, "invalid_character", _CHARACTER) if b"%00" in body or b"\x00" in body else None
    if is_json(content_type):
        return check_json(body)
    return None


def check_json(body: bytes) -> Refusal | None:
    try:
        parsed = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        return Refusal(422, "duplicate_key", "A JSON object names the same key twice.")
    except RecursionError:
        return _too_deep()
    except ValueError:
        return None  # not JSON at all: the route answers that
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _UNHOLDABLE.search(value):
                return Refusal(422, "invalid_character", _CHARACTER)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                return _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _UNHOLDABLE.search(key):
                    return Refusal(422, "invalid_character", _CHARACTER)
                stack.append((item, depth + 1))
    return None


def _too_deep() -> Refusal:
    return Refusal(400, "json_too_deep", f"The JSON is nested more than {MAX_JSON_DEPTH} levels deep.")
