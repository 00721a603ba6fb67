"""Sending and receiving messages, and the phone-number rules they need.

Callers hold ``store.write()``. An outbound message is created ``queued`` with
planned ``sent_at``/``delivered_at`` (or ``failed_at`` when the contact opted
out or is blocked), so its status moves on by itself as the clock runs.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass

from salesmsg_emulator.records import Contact, Conversation, Message
from salesmsg_emulator.state import Store

MAX_MESSAGE_LENGTH = 1600
# ``source`` of a message (Salesmsg's values are not published; these are the emulator's):
SOURCE_API = "api"  # sent through the Public API
SOURCE_APP = "app"  # sent by a member in Salesmsg's own app (seed data)
SOURCE_AUTOMATION = "automation"  # sent by an automation (seed data; ``automated`` true)
_E164 = re.compile(r"^\+[1-9]\d{7,14}$")


@dataclass(frozen=True)
class Delays:
    sent: float
    delivered: float


def normalize_number(value: str) -> str | None:
    """E.164 for a phone number: ``+12025550100``, ``(202) 555-0100`` and ``2025550100`` all work."""
    raw = value.strip()
    digits = re.sub(r"[\s().\-]", "", raw)
    if digits.startswith("+"):
        return digits if _E164.match(digits) else None
    if not digits.isdigit():
        return None
    if len(digits) == 10:
        return "+1" + digits
    if len(digits) == 11 and digits.startswith("1"):
        return "+" + digits
    return None


def media_items(urls: list[str], first_id: int) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    for offset, url in enumerate(urls):
        content_type = mimetypes.guess_type(url.split("?", 1)[0])[0] or "application/octet-stream"
        items.append({"id": first_id * 100 + offset, "content_type": content_type, "source": url})
    return items


def send_outbound(store: Store, conversation: Conversation, *, user_id: int | None, body: str,
                  send_at: float | None, media_urls: list[str], delays: Delays) -> Message:  # fmt: skip
    """Queue an outbound message in ``conversation``."""
    now = store.now()
    contact = store.contacts[conversation.contact_id]
    start = max(now, send_at) if send_at is not None else now
    message = Message(
        id=store.next_id("message"), org_id=conversation.org_id, conversation_id=conversation.id,
        direction="outbound", type="sms", body=body, user_id=user_id, automated=False, created_at=now,
        send_at=send_at, queued_at=now, source=SOURCE_API,
    )  # fmt: skip
    message.media = media_items(media_urls, message.id)
    if contact.opt_out or contact.is_blocked:
        message.failed_at = start + delays.sent
        message.failed_reason = "Contact has opted out" if contact.opt_out else "Contact is blocked"
    else:
        message.sent_at = start + delays.sent
        message.delivered_at = message.sent_at + delays.delivered
    store.add_message(message)
    conversation.updated_at = now
    return message


def receive_inbound(store: Store, conversation: Conversation, *, body: str, media_urls: list[str]) -> Message:
    """An inbound message from the contact: the conversation reopens and counts it unread."""
    now = store.now()
    message = Message(
        id=store.next_id("message"), org_id=conversation.org_id, conversation_id=conversation.id,
        direction="inbound", type="sms", body=body, user_id=None, automated=False, created_at=now, received_at=now,
    )  # fmt: skip
    message.media = media_items(media_urls, message.id)
    store.add_message(message)
    conversation.updated_at = now
    conversation.closed_at = None
    conversation.unread_count += 1
    return message


def find_or_create_contact(store: Store, org_id: int, number: str) -> Contact:
    contact = store.contact_by_number(org_id, number)
    if contact is None:
        now = store.now()
        contact = Contact(
            id=store.next_id("contact"), org_id=org_id, first_name=None, last_name=None, email=None, number=number,
            country="US" if number.startswith("+1") else "", opt_out=False, opt_out_at=None, is_blocked=False,
            created_at=now, updated_at=now,
        )  # fmt: skip
        store.contacts[contact.id] = contact
    return contact


def find_or_create_conversation(store: Store, org_id: int, contact: Contact, team_id: int) -> Conversation:
    return find_or_start_conversation(store, org_id, contact, team_id)[0]


def find_or_start_conversation(store: Store, org_id: int, contact: Contact, team_id: int
                               ) -> tuple[Conversation, bool]:  # fmt: skip
    """The conversation of ``contact`` in team ``team_id``, and whether it was just created."""
    conversation = store.conversation_with(org_id, contact.id, team_id)
    created = conversation is None
    if conversation is None:
        now = store.now()
        conversation = Conversation(
            id=store.next_id("conversation"), org_id=org_id, contact_id=contact.id, team_id=team_id, owner_id=None,
            closed_at=None, unread_count=0, created_at=now, updated_at=now,
        )  # fmt: skip
        store.conversations[conversation.id] = conversation
    return conversation, created
