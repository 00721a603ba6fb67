"""JSON shapes of the Public API, with Salesmsg's field names.

Times render as ISO 8601 UTC with microseconds (``2024-05-01T12:00:00.000000Z``,
Laravel's format). An outbound message's status is derived from its planned
times and the clock: ``queued`` -> ``sent`` -> ``delivered`` (or ``failed``);
an inbound message is ``received``. Times still in the future render as null.
Message objects carry no ``direction`` and no ``team_id`` (Salesmsg's carry neither).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from salesmsg_emulator.records import (
    Contact,
    Conversation,
    Message,
    Org,
    Tag,
    Team,
    User,
)
from salesmsg_emulator.state import Store

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(ts: float) -> int:
    """A time as whole microseconds: what ``iso`` shows, so comparisons agree with the rendered value."""
    return round(ts * 1_000_000)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (EPOCH + timedelta(microseconds=micros(ts))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _past(ts: float | None, now: float) -> str | None:
    return iso(ts) if ts is not None and ts <= now else None


def formatted_number(number: str) -> str:
    """(202) 555-0100 for a North American number, the number itself otherwise."""
    if number.startswith("+1") and len(number) == 12 and number[2:].isdigit():
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def message_status(message: Message, now: float) -> str:
    if message.direction == "inbound":
        return "received"
    if message.failed_at is not None and message.failed_at <= now:
        return "failed"
    if message.delivered_at is not None and message.delivered_at <= now:
        return "delivered"
    if message.sent_at is not None and message.sent_at <= now:
        return "sent"
    return "queued"


def user_payload(user: User) -> dict[str, Any]:
    return {
        **sender_payload(user),
        "role": user.role,
        "organization_id": user.org_id,
        "created_at": iso(user.created_at),
    }


def org_payload(org: Org, store: Store) -> dict[str, Any]:
    return {
        "id": org.id,
        "name": org.name,
        "hipaa": org.hipaa,
        "users_count": len(store.org_users(org.id)),
        "created_at": iso(org.created_at),
    }


def team_payload(team: Team) -> dict[str, Any]:
    return {
        "id": team.id,
        "name": team.name,
        "number": team.number,
        "formatted_number": formatted_number(team.number),
        "organization_id": team.org_id,
        "created_at": iso(team.created_at),
    }


def tag_payload(tag: Tag) -> dict[str, Any]:
    return {"id": tag.id, "name": tag.name, "label": tag.label}


def contact_payload(contact: Contact, store: Store) -> dict[str, Any]:
    full = " ".join(p for p in (contact.first_name, contact.last_name) if p)
    return {
        "id": contact.id,
        "first_name": contact.first_name,
        "last_name": contact.last_name,
        "full_name": full or None,
        "email": contact.email,
        "number": contact.number,
        "formatted_number": formatted_number(contact.number),
        "country": contact.country,
        "opt_out": contact.opt_out,
        "opt_out_at": iso(contact.opt_out_at),
        "is_blocked": contact.is_blocked,
        "tags": [tag_payload(store.tags[t]) for t in contact.tag_ids if t in store.tags],
        "notes": [dict(n) for n in contact.notes],
        "custom_fields": [dict(f) for f in contact.custom_fields],
        "created_at": iso(contact.created_at),
        "updated_at": iso(contact.updated_at),
    }


def sender_payload(user: User) -> dict[str, Any]:
    """The team member a message names as its sender (``user`` of a message)."""
    return {
        "id": user.id,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "full_name": f"{user.first_name} {user.last_name}".strip(),
        "email": user.email,
    }


def message_payload(message: Message, store: Store, now: float, *, automated_user: bool = False) -> dict[str, Any]:
    """A message as Salesmsg shows it: no ``direction`` and no ``team_id``; ``user_id``/``user`` name the
    member who sent it (null on the contact's inbound messages, and on automated ones unless
    ``automated_user``)."""
    conversation = store.conversations.get(message.conversation_id)
    contact = store.contacts.get(conversation.contact_id) if conversation else None
    status = message_status(message, now)
    sender_id = message.user_id if automated_user or not message.automated else None
    sender = store.users.get(sender_id) if sender_id is not None else None
    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "status": status,
        "type": message.type,
        "body": message.body,
        "body_raw": message.body,
        "automated": message.automated,
        "user_id": sender.id if sender else None,
        "user": sender_payload(sender) if sender else None,
        "source": message.source,
        "mms_status": None,
        "record": dict(message.record) if message.record is not None else None,
        "contact": contact_payload(contact, store) if contact else None,
        "media": [dict(m) for m in message.media],
        "received_at": iso(message.received_at),
        "send_at": iso(message.send_at),
        "queued_at": iso(message.queued_at),
        "sent_at": _past(message.sent_at, now),
        "delivered_at": _past(message.delivered_at, now),
        "failed_at": _past(message.failed_at, now),
        "failed_reason": message.failed_reason if status == "failed" else None,
        "created_at": iso(message.created_at),
    }


def conversation_payload(conversation: Conversation, store: Store, now: float, *,
                         automated_user: bool = False) -> dict[str, Any]:  # fmt: skip
    contact = store.contacts.get(conversation.contact_id)
    team = store.teams.get(conversation.team_id)
    owner = store.users.get(conversation.owner_id) if conversation.owner_id else None
    latest = store.latest_message(conversation.id)
    return {
        "id": conversation.id,
        "contact": contact_payload(contact, store) if contact else None,
        "owner": user_payload(owner) if owner else None,
        "user_id": conversation.owner_id,
        "team_id": conversation.team_id,
        "team": {"id": team.id, "name": team.name} if team else None,
        "number": (
            {"id": team.id, "number": team.number, "formatted_number": formatted_number(team.number)} if team else None
        ),
        "latest_message": message_payload(latest, store, now, automated_user=automated_user) if latest else None,
        "unread": conversation.unread_count > 0,
        "unread_count": conversation.unread_count,
        "is_closed": conversation.closed_at is not None,
        "closed_at": iso(conversation.closed_at),
        "created_at": iso(conversation.created_at),
        "updated_at": iso(conversation.updated_at),
    }
