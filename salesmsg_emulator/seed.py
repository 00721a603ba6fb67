"""Deterministic synthetic data: the same ``seed`` gives the same orgs, teams,
contacts, conversations and messages (ids, names, bodies, order).

Everything is obviously fake: names like "Testy McTestface", addresses at
example.com, phone numbers in the fictional 555-01xx range (each org has its
own area code: +1 202 555 01xx, +1 312 555 01xx, ...). Teams use 0100-0109,
contacts 0110-0199. Times are placed in the recent past of the clock at
seeding, so only the absolute times vary between runs.
"""

from __future__ import annotations

import hashlib
import json
import random

from salesmsg_emulator.config import EmulatorConfig
from salesmsg_emulator.messaging import SOURCE_APP, SOURCE_AUTOMATION
from salesmsg_emulator.records import (
    AccessToken,
    Client,
    Contact,
    Conversation,
    Message,
    Org,
    Tag,
    Team,
    User,
)
from salesmsg_emulator.state import Store
from salesmsg_emulator.tokens import new_secret

AREA_CODES = ("202", "312", "415", "617", "718", "305", "503", "720", "404", "206")
FIRST_NAMES = ("Testy", "Fakey", "Sample", "Demo", "Placeholder", "Mocky", "Dummy", "Example", "Stubby", "Fixture")
LAST_NAMES = (
    "McTestface", "Fakerson", "Samplesworth", "Demoson", "Holderman",
    "Mockingbird", "Dummington", "Examplar", "Stubbs", "Fixturello",
)  # fmt: skip
TEAM_NAMES = ("Main Line", "Front Desk", "After Hours")
TAG_LABELS = {"vip": "VIP", "new-customer": "New customer", "follow-up": "Follow-up", "billing": "Billing"}
TAG_NAMES = tuple(TAG_LABELS)
INBOUND_BODIES = (
    "Hi, is my appointment still on for Tuesday?",
    "Can I move my booking to Friday afternoon?",
    "Thanks! See you then.",
    "What are your opening hours this weekend?",
    "Do you have anything available next week?",
    "Got it, thank you.",
    "Is there parking near you?",
    "Please call me back when you can.",
    "Yes, that works for me.",
    "Could you send me the invoice again?",
)
OUTBOUND_BODIES = (
    "Thanks for reaching out! We'll get back to you shortly.",
    "Your appointment is confirmed. Reply C to cancel.",
    "We have an opening on Friday at 2pm. Does that work?",
    "We're open 9-5 on Saturday and closed on Sunday.",
    "Sure, I've just re-sent it to your email.",
    "Reminder: your visit is tomorrow at 10am.",
    "Happy to help. Anything else?",
    "There is free parking behind the building.",
)
NOTES = ("Prefers texts after 5pm.", "Referred by a friend.", "Ask about the loyalty card.")
DAY = 86400.0
# bumped when the seeded data changes shape, so a snapshot of older seed data is reseeded
SEED_VERSION = 2


def fictional_number(area_code: str, line: int) -> str:
    """+1 AAA 555 01LL, in the range reserved for fiction (line 0-99)."""
    if not 0 <= line <= 99:
        raise ValueError("line must be 0-99")
    return f"+1{area_code}55501{line:02d}"


def config_fingerprint(config: EmulatorConfig) -> str:
    """A hash of the parts of the config the seed data depends on."""
    material = {
        "seed_version": SEED_VERSION,
        "seed": config.seed,
        "orgs": [o.model_dump() for o in config.orgs],
        "users": [u.model_dump() for u in config.users],
        "contacts": config.contacts_per_org,
        "conversations": config.conversations_per_org,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def load_clients(store: Store, config: EmulatorConfig) -> None:
    """(Re)load the OAuth clients from the config (they are never persisted)."""
    with store.write():
        store.clients.clear()
        for c in config.clients:
            store.clients[c.client_id] = Client(
                client_id=c.client_id,
                client_secret=c.client_secret,
                name=c.display_name,
                redirect_uris=list(c.redirect_uris),
                baa_signed=c.baa_signed,
                scopes=list(c.scopes) if c.scopes is not None else None,
            )


def seed_store(store: Store, config: EmulatorConfig, anchor: float | None = None) -> float:
    """Replace the store's content with the seed data of ``config``; times end just before ``anchor``
    (default: now). Returns the anchor, so a later reset can reproduce identical data."""
    store.clear()
    with store.write():
        store.secret = config.token_secret or new_secret()
        store.fingerprint = config_fingerprint(config)
        anchor = store.now() if anchor is None else anchor
        load_clients(store, config)
        owners: set[int] = set()
        for o in config.orgs:
            store.orgs[o.id] = Org(id=o.id, name=o.name, hipaa=o.hipaa, created_at=anchor - 400 * DAY)
        for u in config.users:
            first, _, last = u.name.partition(" ")
            role = "member" if u.org in owners else "owner"
            owners.add(u.org)
            store.users[u.id] = User(
                id=u.id, org_id=u.org, first_name=first, last_name=last, email=u.email, role=role,
                created_at=anchor - 300 * DAY,
            )  # fmt: skip
        for p in config.personal_access_tokens:
            user = store.users[p.user]
            store.access_tokens[p.token] = AccessToken(
                jti=p.token, kind="pat", org_id=user.org_id, user_id=user.id, scopes=list(p.scopes),
                issued_at=anchor, expires_at=anchor + p.ttl if p.ttl else None,
            )  # fmt: skip
        for index, org in enumerate(config.orgs):
            rng = random.Random(f"{config.seed}:{org.id}")
            _seed_org(store, config, org.id, AREA_CODES[index % len(AREA_CODES)], rng, anchor)
    return anchor


def _seed_org(store: Store, config: EmulatorConfig, org_id: int, area: str, rng: random.Random, anchor: float) -> None:
    teams: list[Team] = []
    for line, name in enumerate(TEAM_NAMES):
        team = Team(id=store.next_id("team"), org_id=org_id, name=name, number=fictional_number(area, line),
                    created_at=anchor - 200 * DAY)  # fmt: skip
        store.teams[team.id] = team
        teams.append(team)
    tags: list[Tag] = []
    for name in TAG_NAMES:
        tag = Tag(id=store.next_id("tag"), org_id=org_id, name=name, label=TAG_LABELS[name],
                  created_at=anchor - 200 * DAY)  # fmt: skip
        store.tags[tag.id] = tag
        tags.append(tag)
    names = [(f, last) for last in LAST_NAMES for f in FIRST_NAMES if (f, last) != ("Testy", "McTestface")]
    rng.shuffle(names)
    names.insert(0, ("Testy", "McTestface"))
    contacts: list[Contact] = []
    for j in range(config.contacts_per_org):
        first, last = names[j]
        created = anchor - rng.uniform(30, 120) * DAY
        opt_out = rng.random() < 0.06
        contact = Contact(
            id=store.next_id("contact"),
            org_id=org_id,
            first_name=first,
            last_name=last,
            email=None if rng.random() < 0.2 else f"{first}.{last}{j}@example.com".lower(),
            number=fictional_number(area, 10 + j),
            country="US",
            opt_out=opt_out,
            opt_out_at=created + DAY if opt_out else None,
            is_blocked=rng.random() < 0.03,
            created_at=created,
            updated_at=created,
            tag_ids=[t.id for t in rng.sample(tags, rng.randint(0, 2))],
            notes=[{"id": j + 1, "text": rng.choice(NOTES)}] if rng.random() < 0.2 else [],
            custom_fields=[{"id": 1, "name": "Customer ID", "value": f"C-{org_id}{j:03d}"}]
            if rng.random() < 0.3
            else [],
        )
        store.contacts[contact.id] = contact
        contacts.append(contact)
    users = store.org_users(org_id)
    for k, contact in enumerate(rng.sample(contacts, config.conversations_per_org)):
        _seed_conversation(store, org_id, contact, teams[k % len(teams)], users, rng, anchor)


def _seed_conversation(
    store: Store, org_id: int, contact: Contact, team: Team, users: list[User], rng: random.Random, anchor: float
) -> None:
    conversation = Conversation(
        id=store.next_id("conversation"), org_id=org_id, contact_id=contact.id, team_id=team.id,
        owner_id=rng.choice(users).id if users and rng.random() < 0.6 else None,
        closed_at=None, unread_count=0, created_at=anchor, updated_at=anchor,
    )  # fmt: skip
    store.conversations[conversation.id] = conversation
    count = rng.randint(3, 8)
    t = anchor - rng.uniform(0.05, 14) * DAY
    times = []
    for _ in range(count):
        times.append(t)
        t -= rng.uniform(60, 6 * 3600)
    times.reverse()
    inbound = rng.random() < 0.6
    call_at = rng.randrange(count) if rng.random() < 0.15 else -1
    for i, at in enumerate(times):
        if i and rng.random() < 0.6:
            inbound = not inbound
        message = Message(
            id=store.next_id("message"), org_id=org_id, conversation_id=conversation.id,
            direction="inbound" if inbound else "outbound", type="sms", body="", user_id=None,
            automated=False, created_at=at,
        )  # fmt: skip
        if i == call_at:
            message.type = "call"
            if inbound:
                message.body = "Missed call"
            else:
                minutes, seconds = rng.randint(1, 9), rng.randint(0, 59)
                message.body = f"Outgoing call ({minutes}m {seconds}s)"
                message.record = {"id": message.id, "duration": minutes * 60 + seconds,
                                  "url": f"https://example.com/recordings/{message.id}.mp3"}  # fmt: skip
        if inbound:
            message.body = message.body or rng.choice(INBOUND_BODIES)
            message.received_at = at
            if rng.random() < 0.08:
                message.media = [{"id": message.id, "content_type": "image/jpeg",
                                  "source": f"https://example.com/media/{message.id}.jpg"}]  # fmt: skip
        else:
            message.body = message.body or rng.choice(OUTBOUND_BODIES)
            # any member of the org may answer, not only the owner; an automation has a member
            # behind it (shown only with ``automated_messages_user``)
            owner_sends = conversation.owner_id is not None and rng.random() < 0.5
            message.user_id = conversation.owner_id if owner_sends else (rng.choice(users).id if users else None)
            message.automated = message.type == "sms" and rng.random() < 0.12
            message.source = SOURCE_AUTOMATION if message.automated else SOURCE_APP
            message.queued_at = at
            if rng.random() < 0.07:
                message.failed_at = at + 2
                message.failed_reason = "Carrier rejected the message"
            else:
                message.sent_at = at + 1
                message.delivered_at = at + 3
        store.add_message(message)
    thread = store.thread(conversation.id)
    conversation.created_at = thread[0].created_at
    conversation.updated_at = thread[-1].created_at
    if thread[-1].direction == "inbound" and rng.random() < 0.5:
        trailing = 0
        for message in reversed(thread):
            if message.direction != "inbound":
                break
            trailing += 1
        conversation.unread_count = trailing
    elif rng.random() < 0.25:
        conversation.closed_at = min(anchor - 1, conversation.updated_at + 3600)
