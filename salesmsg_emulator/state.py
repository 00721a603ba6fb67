"""The emulator's in-memory store, its clock, and its JSON snapshot.

One ``Store`` holds every record. The ASGI app runs on one event loop, but
tests and the demo may touch the store from other threads, so every access
goes through ``store.read()`` or ``store.write()`` (a re-entrant lock);
``write()`` also bumps ``revision``, which tells the persistence layer that a
snapshot is due.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from typing import Any

from salesmsg_emulator.records import (
    AccessToken,
    AuthCode,
    Client,
    Contact,
    Conversation,
    Grant,
    Message,
    Org,
    PendingAuthorization,
    RefreshToken,
    Tag,
    Team,
    User,
)

SNAPSHOT_VERSION = 1

# collection name -> (record class, key attribute)
_COLLECTIONS: dict[str, tuple[type, str]] = {
    "orgs": (Org, "id"),
    "users": (User, "id"),
    "clients": (Client, "client_id"),
    "teams": (Team, "id"),
    "tags": (Tag, "id"),
    "contacts": (Contact, "id"),
    "conversations": (Conversation, "id"),
    "messages": (Message, "id"),
    "grants": (Grant, "id"),
    "access_tokens": (AccessToken, "jti"),
    "refresh_tokens": (RefreshToken, "token"),
    "codes": (AuthCode, "code"),
    "pending": (PendingAuthorization, "id"),
}

# First id of each numbered kind, so ids of different kinds are easy to tell apart.
_ID_START = {"team": 10, "tag": 50, "contact": 1000, "conversation": 5000, "message": 20000}


class Clock:
    """Wall-clock time plus an offset that tests can advance (never rewind)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds
        return self.now()

    def reset(self) -> None:
        self.offset = 0.0


class Store:
    """All records of one emulator instance."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.lock = threading.RLock()
        self.clock = clock or Clock()
        self.revision = 0
        self.secret = ""
        self.fingerprint = ""
        self.sequences: dict[str, int] = {}
        self.orgs: dict[int, Org] = {}
        self.users: dict[int, User] = {}
        self.clients: dict[str, Client] = {}
        self.teams: dict[int, Team] = {}
        self.tags: dict[int, Tag] = {}
        self.contacts: dict[int, Contact] = {}
        self.conversations: dict[int, Conversation] = {}
        self.messages: dict[int, Message] = {}
        self.grants: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.codes: dict[str, AuthCode] = {}
        self.pending: dict[str, PendingAuthorization] = {}
        self._thread: dict[int, list[int]] = {}

    # --- locking -----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Store]:
        with self.lock:
            yield self

    @contextmanager
    def write(self) -> Iterator[Store]:
        with self.lock:
            try:
                yield self
            finally:
                self.revision += 1

    def now(self) -> float:
        return self.clock.now()

    def next_id(self, kind: str) -> int:
        value = self.sequences.get(kind, _ID_START.get(kind, 1))
        self.sequences[kind] = value + 1
        return value

    def clear(self) -> None:
        """Forget every record (keeps the clock, secret and revision)."""
        with self.write():
            for name in _COLLECTIONS:
                getattr(self, name).clear()
            self._thread.clear()
            self.sequences.clear()

    # --- snapshot ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-ready data."""
        with self.read():
            data: dict[str, Any] = {
                "version": SNAPSHOT_VERSION,
                "secret": self.secret,
                "fingerprint": self.fingerprint,
                "sequences": dict(self.sequences),
            }
            for name in _COLLECTIONS:
                data[name] = [asdict(record) for record in getattr(self, name).values()]
            return data

    def restore(self, data: dict[str, Any]) -> None:
        """Replace every record with those of a snapshot."""
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {data.get('version')!r}")
        with self.write():
            self.secret = data["secret"]
            self.fingerprint = data.get("fingerprint", "")
            self.sequences = {k: int(v) for k, v in data["sequences"].items()}
            for name, (cls, key) in _COLLECTIONS.items():
                known = {f.name for f in fields(cls)}
                target: dict[Any, Any] = getattr(self, name)
                target.clear()
                for row in data.get(name, []):
                    record = cls(**{k: v for k, v in row.items() if k in known})
                    target[getattr(record, key)] = record
            self._reindex()

    def _reindex(self) -> None:
        self._thread.clear()
        for message in sorted(self.messages.values(), key=lambda m: (m.created_at, m.id)):
            self._thread.setdefault(message.conversation_id, []).append(message.id)

    # --- messages ----------------------------------------------------------------

    def add_message(self, message: Message) -> Message:
        self.messages[message.id] = message
        thread = self._thread.setdefault(message.conversation_id, [])
        thread.append(message.id)
        thread.sort(key=lambda mid: (self.messages[mid].created_at, mid))
        return message

    def thread(self, conversation_id: int) -> list[Message]:
        """Messages of a conversation, oldest first."""
        return [self.messages[mid] for mid in self._thread.get(conversation_id, [])]

    def latest_message(self, conversation_id: int) -> Message | None:
        ids = self._thread.get(conversation_id)
        return self.messages[ids[-1]] if ids else None

    # --- org-scoped lookups (None for an unknown id or another org's) -------------

    def org_user(self, org_id: int, user_id: int) -> User | None:
        user = self.users.get(user_id)
        return user if user and user.org_id == org_id else None

    def org_team(self, org_id: int, team_id: int) -> Team | None:
        team = self.teams.get(team_id)
        return team if team and team.org_id == org_id else None

    def org_contact(self, org_id: int, contact_id: int) -> Contact | None:
        contact = self.contacts.get(contact_id)
        return contact if contact and contact.org_id == org_id else None

    def org_conversation(self, org_id: int, conversation_id: int) -> Conversation | None:
        conversation = self.conversations.get(conversation_id)
        return conversation if conversation and conversation.org_id == org_id else None

    def org_users(self, org_id: int) -> list[User]:
        return sorted((u for u in self.users.values() if u.org_id == org_id), key=lambda u: u.id)

    def org_teams(self, org_id: int) -> list[Team]:
        return sorted((t for t in self.teams.values() if t.org_id == org_id), key=lambda t: t.id)

    def org_tags(self, org_id: int) -> list[Tag]:
        return sorted((t for t in self.tags.values() if t.org_id == org_id), key=lambda t: t.id)

    def org_contacts(self, org_id: int) -> list[Contact]:
        return sorted((c for c in self.contacts.values() if c.org_id == org_id), key=lambda c: c.id)

    def org_conversations(self, org_id: int) -> list[Conversation]:
        return [c for c in self.conversations.values() if c.org_id == org_id]

    def contact_by_number(self, org_id: int, number: str) -> Contact | None:
        return next((c for c in self.contacts.values() if c.org_id == org_id and c.number == number), None)

    def conversation_with(self, org_id: int, contact_id: int, team_id: int) -> Conversation | None:
        return next(
            (
                c
                for c in self.conversations.values()
                if c.org_id == org_id and c.contact_id == contact_id and c.team_id == team_id
            ),
            None,
        )

    def delete_contact(self, contact: Contact) -> None:
        """Delete a contact with its conversations and their messages."""
        for conversation in [c for c in self.conversations.values() if c.contact_id == contact.id]:
            for message_id in self._thread.pop(conversation.id, []):
                self.messages.pop(message_id, None)
            del self.conversations[conversation.id]
        del self.contacts[contact.id]
