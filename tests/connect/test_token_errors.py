"""How a failed token request is classified (pure): dead grants, BAA refusals, transient trouble."""

from __future__ import annotations

import json

import pytest

from app.connections.token_client import TokenEndpointError, TokenResponse, classify
from app.core.errors import BAA_REQUIRED_MESSAGE


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("status", "raw", "kind", "error"),
    [
        (400, body(error="invalid_grant", error_description="revoked"), "dead", "invalid_grant"),
        (401, body(error="invalid_client"), "dead", "invalid_client"),
        (401, b"", "dead", "unauthorized"),
        (400, body(error="unauthorized_client"), "dead", "unauthorized_client"),
        (400, body(error="access_denied"), "dead", "access_denied"),
        (500, body(message="Server Error"), "transient", None),
        (502, b"<html>bad gateway</html>", "transient", None),
        (503, b"", "transient", None),
        (429, body(message="Too Many Attempts."), "transient", None),
        (408, b"", "transient", None),
        (400, body(error="invalid_request"), "invalid", "invalid_request"),
        (422, b"not json", "invalid", None),
    ],
)
def test_answers_are_classified(status, raw, kind, error):
    found = classify(status, raw)
    assert (found.kind, found.error) == (kind, error)
    assert found.transient is (kind == "transient")


BAA_SENTENCE = "Access denied. You must have a signed Business Associate Agreement (BAA) to continue."
BAA_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Forbidden</title></head>
<body><div class="error"><h1>403</h1>
<p>Access denied. You must have a signed Business
   Associate&nbsp;Agreement (BAA) to continue.</p></div></body></html>""".encode()


@pytest.mark.parametrize(
    "raw",
    [
        body(message=BAA_SENTENCE),
        body(error_description=BAA_SENTENCE, error="access_denied"),
        body(error=BAA_SENTENCE),
        BAA_PAGE,
        BAA_SENTENCE.encode(),  # plain text
    ],
    ids=["json-message", "json-error_description", "json-error", "html-page", "plain-text"],
)
def test_a_baa_refusal_is_its_own_kind_with_salesmsgs_message(raw):
    found = classify(403, raw)
    assert (found.kind, found.error) == ("baa_required", "baa_required")
    assert found.description == BAA_REQUIRED_MESSAGE
    assert not found.transient


@pytest.mark.parametrize(
    ("status", "raw", "kind"),
    [
        (403, body(message="This action is unauthorized."), "invalid"),
        (403, b"<html><body><h1>403 Forbidden</h1></body></html>", "invalid"),
        (403, body(message=["Business Associate Agreement"]), "invalid"),  # not a string: not the sentence
        (500, BAA_PAGE, "transient"),  # a server error page is trouble on their side, whatever it says
    ],
)
def test_other_refusals_are_not_taken_for_a_baa_refusal(status, raw, kind):
    assert classify(status, raw).kind == kind


def test_an_error_that_is_not_a_string_does_not_break_classification():
    assert classify(400, body(error={"code": "x"})).kind == "invalid"


def test_retry_after_is_kept_for_transient_answers():
    assert classify(429, b"", "30").retry_after == 30.0
    assert classify(503, b"", "Wed, 21 Oct 2015 07:28:00 GMT").retry_after == 0.0  # a date in the past: now
    assert classify(429, b"").retry_after is None


def test_the_reason_recorded_is_the_error_else_the_status():
    assert classify(400, body(error="invalid_grant")).reason == "invalid_grant"
    assert classify(503, b"").reason == "503"


def test_descriptions_are_bounded():
    assert len(classify(400, body(error="x", error_description="y" * 5000)).description) == 200


def test_token_answers_are_parsed_defensively():
    parsed = TokenResponse.parse({"access_token": "a", "refresh_token": "", "expires_in": "3600", "scope": ["a", "b"]})
    assert (parsed.access_token, parsed.refresh_token, parsed.expires_in, parsed.scope) == ("a", None, 3600, "a b")
    assert TokenResponse.parse({"access_token": "a", "expires_in": -5}).expires_in is None
    with pytest.raises(TokenEndpointError) as info:
        TokenResponse.parse({"token": "a"})
    assert info.value.kind == "transient"
