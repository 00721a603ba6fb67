"""How ``salesmsg-connect serve`` runs uvicorn: uvloop, httptools, and the bounds httptools lacks.

httptools enforces no limit on a request's head, so on its own a client could send a 64 MiB
header, or 100,000 of them, and the worker would buffer it all. ``BoundedHttpToolsProtocol``
answers 431 when the request line and headers pass ``SMC_MAX_HEADER_BYTES`` (64 KiB) or the
header fields pass ``SMC_MAX_HEADERS`` (100). The bytes are counted as they arrive, so a head that
keeps growing is refused once that many bytes came without it ending, never buffered whole. The
431 is sent, the connection half-closed, and what the client still sends is read and dropped for
a moment (so the answer is not lost to a reset) before the connection closes.

Idle keep-alive connections stay open ``SMC_KEEPALIVE_SECONDS`` (75 s): longer than the idle
timeout of common load balancers (60 s), which then close first, so none of them reuses a
connection we are closing at the same moment (the race behind a spurious 502).

The limits reach the protocol through the lifespan state (``create_app`` puts them there), so
every worker process serves with its own settings and nothing is read at import time.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.core.settings import Settings

LIMITS_STATE_KEY = "smc.head_limits"
_LINGER_SECONDS = 2.0
_431 = json.dumps({"error": {"code": "request_header_fields_too_large",
                             "message": "The request's headers are too large or too many."}}).encode()


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_bytes: int = 64 * 1024
    max_fields: int = 100

    @classmethod
    def of(cls, settings: Settings) -> HeadLimits:
        return cls(max_bytes=settings.max_header_bytes, max_fields=settings.max_headers)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head past the limits."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = self.app_state.get(LIMITS_STATE_KEY) if isinstance(self.app_state, dict) else None
        self.limits = found if isinstance(found, HeadLimits) else HeadLimits()
        self._head_open = True  # between the end of one message and the end of the next head
        self._head_received = 0  # bytes received while the head was open (an upper bound of its size)
        self._head_size = 0  # the request target and header bytes the parser has handed us
        self._too_large = False
        self._refused = False
        self._owed_431 = False  # refused while an earlier (pipelined) request is still being answered

    # -- counting ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_received = 0
        if self._head_size > self.limits.max_bytes or len(self.headers) > self.limits.max_fields:
            self._too_large = True
            raise _HeadTooLarge()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open = True

    # -- feeding ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a 431: read and drop
        self._unset_keepalive_if_required()
        if self._head_open:
            self._head_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._head_open and self._head_received > self.limits.max_bytes + 4096:
            self._refuse()  # the head is still growing past the limit: do not wait for its end

    def _refuse(self) -> None:
        self._refused = True
        self.logger.warning("request head refused: over %d bytes or %d fields", self.limits.max_bytes,
                            self.limits.max_fields)
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self._owed_431 = True  # answer in order: after the requests before it
            return
        self._send_431()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._owed_431 and not self.pipeline and not self.transport.is_closing():
            self._owed_431 = False
            self._send_431()

    def _send_431(self) -> None:
        self._unset_keepalive_if_required()
        lines = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        lines += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        lines += [b"content-type: application/json\r\n", b"content-length: " + str(len(_431)).encode() + b"\r\n",
                  b"connection: close\r\n", b"\r\n", _431]
        self.transport.write(b"".join(lines))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete; what still arrives is dropped
            asyncio.get_running_loop().call_later(_LINGER_SECONDS, self.transport.close)
        else:  # pragma: no cover - TLS transports cannot half-close
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The server settings ``serve`` runs with (and the tests serve with, to test the same)."""
    return {
        "http": f"{BoundedHttpToolsProtocol.__module__}:{BoundedHttpToolsProtocol.__qualname__}",
        "timeout_keep_alive": settings.keepalive_seconds,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        # behind a load balancer, the client's address (per-IP sign-in limits, logs) comes from
        # X-Forwarded-For, trusted only from the balancer's addresses
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        "timeout_graceful_shutdown": 10,
    }
