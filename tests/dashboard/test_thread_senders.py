"""Who sent a message, from the fields Salesmsg's messages carry (no ``direction``, no ``team_id``)."""

from __future__ import annotations

import pytest

from app.proxy.inbox import thread_message

MEMBER = {"id": 302, "first_name": "Drew", "last_name": "Sample", "full_name": "Drew Sample", "email": "drew@example.com"}
CONTACT = {"id": 1001, "first_name": "Robin", "last_name": "Example", "full_name": "Robin Example"}
INBOUND = {"user_id": None, "user": None, "automated": False, "received_at": "2026-01-30T16:08:24.739058Z",
           "queued_at": None, "sent_at": None, "delivered_at": None, "failed_at": None, "status": "received"}


@pytest.mark.parametrize(
    ("message", "contact", "outbound", "sender"),
    [
        ({"user_id": 302, "user": MEMBER, "automated": False, "queued_at": "t"}, CONTACT, True, "Drew Sample"),
        ({"user_id": 302, "user": {**MEMBER, "full_name": None}}, CONTACT, True, "Drew Sample"),  # first and last name
        ({"user_id": 302, "user": {**MEMBER, "full_name": "", "last_name": None}}, CONTACT, True, "Drew"),
        ({"user_id": 302, "user": None}, CONTACT, True, "Team member"),  # only the id is known
        ({"user_id": None, "user": None, "automated": True, "queued_at": "t"}, CONTACT, True, "Automated"),
        ({"user_id": 302, "user": MEMBER, "automated": True}, CONTACT, True, "Drew Sample"),
        ({"user_id": None, "user": None, "sent_at": "t"}, CONTACT, True, "Team member"),
        ({"failed_at": "t"}, CONTACT, True, "Team member"),
        (INBOUND, CONTACT, False, "Robin Example"),
        ({**INBOUND, "contact": {"first_name": "Sam", "last_name": None}}, None, False, "Sam"),
        (INBOUND, {"full_name": None, "first_name": None}, False, "Contact"),
        ({"body": "hi"}, None, False, "Contact"),
        # a "direction" field (as older answers had) decides nothing
        ({**INBOUND, "direction": "outbound"}, CONTACT, False, "Robin Example"),
    ],
)
def test_side_and_sender(message, contact, outbound, sender):
    entry = thread_message({"body": "text", "created_at": "2026-01-30T16:08:24Z", **message}, contact)
    assert (entry.outbound, entry.sender) == (outbound, sender)


def test_odd_values_are_shown_as_text_or_not_at_all():
    entry = thread_message({"body": None, "created_at": 5, "status": ["x"], "user": "Drew", "user_id": None})
    assert (entry.body, entry.created_at, entry.status, entry.outbound, entry.sender) == ("", "", None, False, "Contact")
