"""The server as ``salesmsg-connect serve`` runs it: bounded request heads, keep-alive, and a
database whose errors never carry query parameters into the logs."""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
from sqlalchemy import text

from app.core.db import Database, create_engine
from app.core.http_server import uvicorn_options
from app.core.logs import configure_logging, get_logger
from tests.support.served import ServedApp


def _request(port: int, head: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` on a new connection; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
        except OSError:
            pass  # the server answered and stopped reading before we finished: read its answer
        return _read_answer(sock.makefile("rb"))


def _read_answer(answers: io.BufferedReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer from the connection's reader (the next one stays buffered)."""
    status_line = answers.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without an answer")
    length = 0
    while (line := answers.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(status_line.split(b" ", 2)[1]), answers.read(length)


def _get(extra: bytes = b"") -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"


@pytest.fixture
def served(settings):
    with ServedApp(settings) as app:
        yield app


def test_heads_within_the_bounds_are_served(served):
    assert _request(served.port, _get(b"".join(b"X-H%d: v\r\n" % i for i in range(90))))[0] == 200
    assert _request(served.port, _get(b"Cookie: " + b"c" * 60_000 + b"\r\n"))[0] == 200


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Big: " + b"a" * (1024 * 1024) + b"\r\n",  # one 1 MiB header
        b"Cookie: " + b"c" * (1024 * 1024) + b"\r\n",  # a 1 MiB cookie
        b"".join(b"X-H%d: v\r\n" % i for i in range(101)),  # 101 headers
        b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)),  # 100,000 headers
    ],
    ids=["1MiB-header", "1MiB-cookie", "101-headers", "100000-headers"],
)
def test_heads_past_the_bounds_are_431(served, extra):
    status, body = _request(served.port, _get(extra))
    assert status == 431
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert _request(served.port, _get())[0] == 200  # and the server serves on


def test_a_head_that_keeps_growing_is_refused_before_it_ends(served):
    """The first 256 KiB of a header that never ends get the 431: nothing waits for (or buffers) the rest."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: " + b"a" * (256 * 1024))
        status, _ = _read_answer(sock.makefile("rb"))
    assert status == 431


def test_a_pipelined_request_past_the_bounds_is_answered_after_the_one_before_it(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(_get() + _get(b"X-Big: " + b"a" * (100 * 1024) + b"\r\n"))
        answers = sock.makefile("rb")
        first, _ = _read_answer(answers)
        second, body = _read_answer(answers)
    assert (first, second) == (200, 431)
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"


def test_the_bounds_are_settings(settings):
    with ServedApp(settings.model_copy(update={"max_headers": 20})) as app:
        assert _request(app.port, _get(b"".join(b"X-H%d: v\r\n" % i for i in range(25))))[0] == 431


def test_keep_alive_outlasts_load_balancers_and_is_a_setting(settings):
    assert settings.keepalive_seconds == 75  # above the 60 s idle timeout of common load balancers
    assert uvicorn_options(settings)["timeout_keep_alive"] == 75
    with ServedApp(settings.model_copy(update={"keepalive_seconds": 1})) as app:
        with socket.create_connection(("127.0.0.1", app.port), timeout=15) as sock:
            sock.sendall(_get())
            assert _read_answer(sock.makefile("rb"))[0] == 200
            started = time.monotonic()
            assert sock.recv(1) == b""  # the server closes the idle connection itself
            assert time.monotonic() - started < 14


async def test_database_errors_carry_no_query_parameters(settings):
    """A failing query with personal data in its parameters: neither the error nor the log holds them."""
    stream = io.StringIO()
    configure_logging(level="DEBUG", json_output=True, stream=stream)
    db = Database(create_engine(settings))
    secret = "Jane Patient +12025550100"
    try:
        async with db.engine.connect() as conn:
            with pytest.raises(Exception) as failed:
                await conn.execute(text("SELECT no_such_column FROM tenants WHERE name = :name"), {"name": secret})
        get_logger("test").exception("query failed", error=str(failed.value))
    finally:
        await db.dispose()
        configure_logging(level="INFO")
    assert secret not in str(failed.value)
    assert "hidden due to hide_parameters" in str(failed.value)
    assert secret not in stream.getvalue()
