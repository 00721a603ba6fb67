"""Logs are structured, carry the request id, and never a secret."""

from __future__ import annotations

import io
import json
import logging

import pytest

from app.core.logs import configure_logging, get_logger, redact_text

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLWJ5dGVz"
OPAQUE = "rt_Zk3Jd9QmX2vB7nL4pT8sW1yC6hF0gA5e"


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {OPAQUE}",
        f"got {JWT} back",
        f"POST body refresh_token={OPAQUE}&grant_type=refresh_token",
        "key smc_live_abcdefgh12345678ABCDEFGH",
        f"opaque {OPAQUE} token",
        "client_secret=hunter2",
    ],
)
def test_token_shapes_are_masked_in_free_text(text):
    masked = redact_text(text)
    assert "[redacted]" in masked
    for secret in (JWT, OPAQUE, "hunter2", "smc_live_abcdefgh12345678ABCDEFGH"):
        assert secret not in masked


def test_ids_stay_readable():
    text = "tenant 123e4567-e89b-12d3-a456-426614174000 path /api/v1/tenants/acme/proxy/conversations"
    assert redact_text(text) == text


@pytest.fixture
def json_log():
    stream = io.StringIO()
    configure_logging(level="DEBUG", json_output=True, stream=stream)
    yield stream
    configure_logging(level="INFO", json_output=False)


def test_json_records_redact_secret_fields_and_library_messages(json_log):
    log = get_logger("test")
    log.info("exchanged", access_token=OPAQUE, client_secret="hunter2", nested={"refresh_token": OPAQUE}, tenant="acme")
    logging.getLogger("aiohttp.client").warning("sent Authorization: Bearer %s", OPAQUE)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert lines[0]["event"] == "exchanged"
    assert lines[0]["tenant"] == "acme"
    assert lines[0]["access_token"] == "[redacted]"
    assert lines[0]["client_secret"] == "[redacted]"
    assert lines[0]["nested"]["refresh_token"] == "[redacted]"
    assert OPAQUE not in json_log.getvalue() and "hunter2" not in json_log.getvalue()
    assert lines[1]["level"] == "warning" and "[redacted]" in lines[1]["event"]


def test_exceptions_in_logs_are_redacted(json_log):
    log = get_logger("test")
    try:
        raise ValueError(f"upstream said refresh_token={OPAQUE}")
    except ValueError:
        log.exception("failed")
    assert OPAQUE not in json_log.getvalue()
    assert "ValueError" in json_log.getvalue()


async def test_access_log_carries_request_id_without_query_string(client, json_log):
    response = await client.get("/healthz?api_key=smc_live_abcdefgh12345678ABCDEFGH")
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    access = [r for r in records if r["event"] == "request"]
    assert access and access[-1]["request_id"] == response.headers["x-request-id"]
    assert access[-1]["path"] == "/healthz"
    assert "abcdefgh12345678" not in json_log.getvalue()


def test_console_output_keeps_one_record_on_one_line():
    stream = io.StringIO()
    configure_logging(level="INFO", json_output=False, stream=stream)
    try:
        get_logger("test").info("login failed", email="x@example.com\nFAKE RECORD level=info")
    finally:
        configure_logging(level="INFO", json_output=False)
    assert len(stream.getvalue().strip().splitlines()) == 1
