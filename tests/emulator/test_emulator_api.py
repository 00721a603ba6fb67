"""The Public API: conversations, messages, sending, contacts, tags, teams, users, org."""

from __future__ import annotations

import httpx
import pytest

from tests.support.emulator_controls import ControlledEmulator

from .support import ALEX, AVERY, CASEY, MESSAGE_FIELDS, Api

CONTACT_FIELDS = {
    "id", "first_name", "last_name", "full_name", "email", "number", "formatted_number", "country", "opt_out",
    "opt_out_at", "is_blocked", "tags", "notes", "custom_fields", "created_at", "updated_at",
}  # fmt: skip
CONVERSATION_FIELDS = {"id", "contact", "owner", "number", "latest_message", "unread", "closed_at", "team_id",
                       "created_at", "updated_at"}  # fmt: skip


def test_conversation_shape_and_defaults(acme: Api) -> None:
    page = acme.get("/conversations")
    assert isinstance(page, list) and len(page) == 20
    first = page[0]
    assert CONVERSATION_FIELDS <= set(first)
    assert CONTACT_FIELDS <= set(first["contact"]) and set(first["latest_message"]) == MESSAGE_FIELDS
    assert first["contact"]["number"].startswith("+1202555") and first["contact"]["formatted_number"].startswith(
        "(202) 555-")  # fmt: skip
    updated = [c["updated_at"] for c in page]
    assert updated == sorted(updated, reverse=True)
    assert acme.get("/conversations/" + str(first["id"]))["id"] == first["id"]


def test_conversations_limit_offset_paging_covers_everything_once(acme: Api) -> None:
    seen: list[int] = []
    offset = 0
    while True:
        chunk = acme.get("/conversations", limit=7, offset=offset)
        if not chunk:
            break
        assert len(chunk) <= 7
        seen += [c["id"] for c in chunk]
        offset += 7
    assert len(seen) == len(set(seen)) == 30
    assert len(acme.get("/conversations", limit=1000)) == 30  # clamped to 100
    assert acme.request("GET", "/conversations", params={"limit": "x"}).status_code == 422


@pytest.mark.parametrize("name", ["open", "closed", "unread", "assigned", "unassigned", "outbound", "optout",
                                  "nocalls"])  # fmt: skip
def test_conversation_filters(acme: Api, name: str) -> None:
    rows = acme.get("/conversations", filter=name, limit=100)
    checks = {
        "open": lambda c: c["closed_at"] is None,
        "closed": lambda c: c["closed_at"] is not None,
        "unread": lambda c: c["unread"],
        "assigned": lambda c: c["owner"] is not None,
        "unassigned": lambda c: c["owner"] is None,
        "outbound": lambda c: c["latest_message"]["status"] != "received",
        "optout": lambda c: c["contact"]["opt_out"],
        "nocalls": lambda c: True,
    }
    assert all(checks[name](c) for c in rows)
    if name in ("open", "closed", "unread", "assigned", "unassigned", "outbound", "nocalls"):
        assert rows, f"the seed should have {name} conversations"


def test_filters_partition_and_unknown_filter(acme: Api) -> None:
    both = len(acme.get("/conversations", filter="open", limit=100)) + len(
        acme.get("/conversations", filter="closed", limit=100))  # fmt: skip
    assert both == 30
    assert acme.request("GET", "/conversations", params={"filter": "nope"}).status_code == 422


def test_conversation_query_and_dates(acme: Api) -> None:
    every = acme.get("/conversations", limit=100)
    target = every[5]["contact"]
    by_name = acme.get("/conversations", query=target["last_name"].lower(), limit=100)
    assert target["id"] in [c["contact"]["id"] for c in by_name]
    by_number = acme.get("/conversations", query=target["number"][-4:])
    assert [c["contact"]["id"] for c in by_number] == [target["id"]]
    pivot = every[10]["updated_at"]
    newer = acme.get("/conversations", after=pivot, limit=100)
    older = acme.get("/conversations", before=pivot, limit=100)
    assert len(newer) == 10 and len(older) == 19
    assert acme.request("GET", "/conversations", params={"before": "yesterday"}).status_code == 422


def test_close_open_reassign(acme: Api) -> None:
    cid = acme.get("/conversations", filter="open", limit=1)[0]["id"]
    closed = acme.request("PUT", f"/conversations/{cid}/close").json()
    assert closed["closed_at"] is not None
    assert cid in [c["id"] for c in acme.get("/conversations", filter="closed", limit=100)]
    assert acme.request("PUT", f"/conversations/{cid}/open").json()["closed_at"] is None
    reassigned = acme.request("POST", f"/conversations/{cid}/reassign", params={"user_id": ALEX}).json()
    assert reassigned["owner"]["id"] == ALEX
    assert acme.request("POST", f"/conversations/{cid}/reassign", params={"user_id": CASEY}).status_code == 422
    assert acme.request("POST", f"/conversations/{cid}/reassign").status_code == 422


def test_other_orgs_ids_are_404(acme: Api, corner: Api) -> None:
    foreign_conversation = corner.get("/conversations", limit=1)[0]["id"]
    foreign_contact = corner.get("/contacts")["data"][0]["id"]
    for method, path in [
        ("GET", f"/conversations/{foreign_conversation}"),
        ("GET", f"/conversations/{foreign_conversation}/messages"),
        ("GET", f"/messages/{foreign_conversation}"),
        ("GET", f"/messages/{foreign_conversation}/paginated"),
        ("PUT", f"/conversations/{foreign_conversation}/close"),
        ("POST", f"/conversations/{foreign_conversation}/send?message=hi"),
        ("POST", f"/messages/{foreign_conversation}?message=hi"),
        ("GET", f"/contacts/{foreign_contact}"),
        ("PUT", f"/contacts/{foreign_contact}?first_name=X"),
        ("DELETE", f"/contacts/{foreign_contact}"),
        ("GET", "/conversations/999999"),
    ]:
        answer = acme.request(method, path)
        assert answer.status_code == 404, (method, path)
        assert answer.json()["message"].endswith("not found.")
    assert all(c["contact"]["id"] != foreign_contact for c in acme.get("/conversations", limit=100))


def test_message_threads_cursor_and_paginated(acme: Api) -> None:
    cid = acme.get("/conversations", limit=1)[0]["id"]
    thread = acme.get(f"/messages/{cid}", limit=100)
    assert len(thread) >= 3 and all(set(m) == MESSAGE_FIELDS for m in thread)
    assert [m["id"] for m in thread] == sorted((m["id"] for m in thread), reverse=True)  # newest first
    assert acme.get(f"/conversations/{cid}/messages", limit=100) == thread
    walked: list[int] = []
    before_id = None
    while True:
        chunk = acme.get(f"/messages/{cid}", limit=2, **({"before_id": before_id} if before_id else {}))
        if not chunk:
            break
        walked += [m["id"] for m in chunk]
        before_id = chunk[-1]["id"]
    assert walked == [m["id"] for m in thread]
    page = acme.get(f"/messages/{cid}/paginated", page=1, per_page=2)
    assert page["meta"] == {"current_page": 1, "last_page": -(-len(thread) // 2), "per_page": 2, "total": len(thread)}
    pages = [acme.get(f"/messages/{cid}/paginated", page=p, per_page=2)["data"]
             for p in range(1, page["meta"]["last_page"] + 1)]  # fmt: skip
    assert [m["id"] for chunk in pages for m in chunk] == [m["id"] for m in thread]
    assert acme.get(f"/messages/{cid}/paginated", page=99)["data"] == []


def _statuses(acme: Api, cid: int, mid: int) -> str:
    return next(m["status"] for m in acme.get(f"/messages/{cid}", limit=5) if m["id"] == mid)


@pytest.mark.parametrize("style", ["query", "form", "json"])
def test_send_appears_in_thread_and_progresses(acme: Api, emulator: ControlledEmulator, style: str) -> None:
    cid = next(c["id"] for c in acme.get("/conversations", limit=100) if not c["contact"]["opt_out"]
               and not c["contact"]["is_blocked"])  # fmt: skip
    fields = {"message": f"Hello via {style} <b>bold</b>"}
    kwargs = {"query": {"params": fields}, "form": {"data": fields}, "json": {"json": fields}}[style]
    path = f"/conversations/{cid}/send" if style != "form" else f"/messages/{cid}"
    answer = acme.request("POST", path, **kwargs)
    assert answer.status_code == 201, answer.text
    message = answer.json()
    assert set(message) == MESSAGE_FIELDS and message["source"] == "api"
    assert message["user"] == {"id": AVERY, "first_name": "Avery", "last_name": "Testwell",
                               "full_name": "Avery Testwell", "email": "avery@acme.example"}  # fmt: skip
    assert message["status"] == "queued" and message["body"] == fields["message"] and message["user_id"] == AVERY
    assert message["queued_at"] and message["sent_at"] is None and message["conversation_id"] == cid
    assert acme.get(f"/messages/{cid}", limit=1)[0]["id"] == message["id"]
    assert acme.get(f"/conversations/{cid}")["latest_message"]["id"] == message["id"]
    emulator.controls.advance_clock(1.5)
    assert _statuses(acme, cid, message["id"]) == "sent"
    emulator.controls.advance_clock(2)
    delivered = acme.get(f"/messages/{cid}", limit=1)[0]
    assert delivered["status"] == "delivered" and delivered["delivered_at"] and delivered["sent_at"]


def test_send_with_media_and_send_at(acme: Api, emulator: ControlledEmulator) -> None:
    cid = acme.get("/conversations", limit=1)[0]["id"]
    params = [("message", "pic"), ("media_url[][url]", "https://example.com/a.png"),
              ("media_url[][url]", "https://example.com/b.jpg")]  # fmt: skip
    message = acme.request("POST", f"/messages/{cid}", params=params).json()
    assert [m["content_type"] for m in message["media"]] == ["image/png", "image/jpeg"]
    assert message["media"][0]["source"] == "https://example.com/a.png"
    as_json = acme.request("POST", f"/messages/{cid}", json={"message": "x", "media_url": [
        {"url": "https://example.com/c.gif"}]}).json()  # fmt: skip
    assert as_json["media"][0]["content_type"] == "image/gif"
    later = emulator.controls.clock()["now"] + 600
    scheduled = acme.request("POST", f"/messages/{cid}", json={"message": "later", "send_at": later}).json()
    assert scheduled["send_at"] is not None
    emulator.controls.advance_clock(100)
    assert _statuses(acme, cid, scheduled["id"]) == "queued"
    emulator.controls.advance_clock(600)
    assert _statuses(acme, cid, scheduled["id"]) == "delivered"
    bad = acme.request("POST", f"/messages/{cid}", json={"message": "x", "media_url": ["ftp://nope"]})
    assert bad.status_code == 422 and "media_url" in bad.json()["errors"]


def test_message_validation(acme: Api) -> None:
    cid = acme.get("/conversations", limit=1)[0]["id"]
    too_long = acme.request("POST", f"/conversations/{cid}/send", json={"message": "x" * 1601})
    assert too_long.status_code == 422
    assert too_long.json()["errors"]["message"] == ["The message may not be greater than 1600 characters."]
    assert acme.request("POST", f"/conversations/{cid}/send", json={"message": "x" * 1600}).status_code == 201
    missing = acme.request("POST", f"/conversations/{cid}/send", json={})
    assert missing.status_code == 422 and missing.json()["message"] == "The message field is required."
    assert acme.request("POST", f"/conversations/{cid}/send", content=b"{nope",
                        headers={"content-type": "application/json"}).status_code == 400  # fmt: skip


def test_send_to_opted_out_contact_fails(acme: Api, emulator: ControlledEmulator) -> None:
    contact = acme.request("POST", "/contacts", json={"number": "+12025550198", "first_name": "Opty"}).json()
    acme.request("PUT", f"/contacts/{contact['id']}", json={"opt_out": True})
    team_id = acme.get("/teams")[0]["id"]
    message = acme.request("POST", "/messages", json={"number": "+12025550198", "team_id": team_id,
                                                      "message": "hi"}).json()  # fmt: skip
    emulator.controls.advance_clock(5)
    failed = acme.get(f"/messages/{message['conversation_id']}")[0]
    assert failed["status"] == "failed" and failed["failed_reason"] == "Contact has opted out"


def test_send_by_number_creates_contact_and_conversation(acme: Api) -> None:
    team_id = acme.get("/teams")[1]["id"]
    answer = acme.request("POST", "/messages", params={"number": "(202) 555-0199", "team_id": team_id,
                                                       "message": "Welcome!"})  # fmt: skip
    assert answer.status_code == 201, answer.text
    message = answer.json()
    assert message["contact"]["number"] == "+12025550199"
    conversation = acme.get(f"/conversations/{message['conversation_id']}")
    assert conversation["team_id"] == team_id and conversation["latest_message"]["body"] == "Welcome!"
    again = acme.request("POST", "/messages", data={"number": "+12025550199", "team_id": str(team_id),
                                                    "message": "Again"}).json()  # fmt: skip
    assert again["conversation_id"] == message["conversation_id"]
    errors = acme.request("POST", "/messages", json={"number": "12", "team_id": 999999}).json()["errors"]
    assert set(errors) == {"number", "team_id", "message"}


def test_contacts_crud(acme: Api) -> None:
    created = acme.request("POST", "/contacts", json={"number": "2025550197", "first_name": "Newt",
                                                      "last_name": "Fixture", "email": "newt@example.com"})  # fmt: skip
    assert created.status_code == 201
    contact = created.json()
    assert CONTACT_FIELDS <= set(contact)
    assert contact["number"] == "+12025550197" and contact["full_name"] == "Newt Fixture"
    assert contact["formatted_number"] == "(202) 555-0197"
    cid = contact["id"]
    assert acme.get(f"/contacts/{cid}") == contact
    updated = acme.request("PUT", f"/contacts/{cid}", data={"first_name": "Newton", "opt_out": "true"}).json()
    assert updated["first_name"] == "Newton" and updated["opt_out"] is True and updated["opt_out_at"]
    assert updated["email"] == "newt@example.com"
    assert acme.request("DELETE", f"/contacts/{cid}").status_code == 200
    assert acme.request("GET", f"/contacts/{cid}").status_code == 404


def test_contact_validation(acme: Api) -> None:
    missing = acme.request("POST", "/contacts", json={"first_name": "No number"})
    assert missing.status_code == 422 and missing.json()["errors"] == {"number": ["The number field is required."]}
    bad = acme.request("POST", "/contacts", json={"number": "abc", "email": "not-mail", "first_name": "x" * 300})
    assert set(bad.json()["errors"]) == {"number", "email", "first_name"}
    taken = acme.get("/contacts")["data"][0]["number"]
    dup = acme.request("POST", "/contacts", params={"number": taken})
    assert dup.json()["errors"]["number"] == ["The number has already been taken."]


def test_contacts_paging_and_search(acme: Api) -> None:
    first = acme.get("/contacts", length=20)
    assert first["meta"] == {"current_page": 1, "last_page": 3, "per_page": 20, "total": 50}
    ids = [c["id"] for p in range(1, 4) for c in acme.get("/contacts", page=p, length=20)["data"]]
    assert len(ids) == len(set(ids)) == 50
    testy = acme.get("/contacts", search="testy mctestface")["data"]
    assert [c["full_name"] for c in testy] == ["Testy McTestface"]
    assert len(acme.get("/contacts", search="MCTESTFACE")["data"]) > 1
    assert acme.get("/contacts", search=testy[0]["number"][-4:])["data"][0]["id"] == testy[0]["id"]


def test_tags_teams_users_org(acme: Api) -> None:
    tags = acme.get("/tags")["data"]
    assert {"vip", "billing"} <= {t["name"] for t in tags} and set(tags[0]) == {"id", "name", "label"}
    teams = acme.get("/teams")
    assert len(teams) == 3 and all(t["number"].startswith("+1202555010") for t in teams)
    assert acme.get("/teams", limit=1, offset=2) == teams[2:]
    me = acme.get("/users/me")
    assert me["id"] == AVERY and me["organization"]["name"] == "Acme Clinic"
    assert [u["id"] for u in acme.get("/users")] == [AVERY, ALEX]
    assert [u["id"] for u in acme.get("/users", limit=1, offset=1)] == [ALEX]
    org = acme.get("/organization/current")
    assert org["name"] == "Acme Clinic" and org["hipaa"] is True


def test_seed_is_fake_and_deterministic(acme: Api, emulator: ControlledEmulator) -> None:
    before = acme.get("/contacts", length=100)["data"]
    assert before[0]["full_name"] == "Testy McTestface"
    assert all(c["number"][5:10] == "55501" for c in before)
    assert all(c["email"] is None or c["email"].endswith("@example.com") for c in before)
    threads = [(c["id"], c["latest_message"]["body"]) for c in acme.get("/conversations", limit=100)]
    emulator.controls.reset_state()
    assert [c["id"] for c in acme.get("/contacts", length=100)["data"]] == [c["id"] for c in before]
    assert sorted(threads) == sorted((c["id"], c["latest_message"]["body"])
                                     for c in acme.get("/conversations", limit=100))  # fmt: skip


def test_over_deep_json_is_a_400_not_a_500(emulator: ControlledEmulator, http: httpx.Client, acme: Api) -> None:
    deep = b'{"first_name": ' + b"[" * 100_000 + b"]" * 100_000 + b', "number": "+12025550100"}'
    answer = acme.request("POST", "/contacts", content=deep, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    token = http.post(emulator.refresh_url, content=b'{"refresh_token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      headers={"Content-Type": "application/json"})
    assert token.status_code == 400, token.text
    control = http.patch(emulator.url + "/_emulator/settings", content=b"[" * 100_000 + b"]" * 100_000)
    assert control.status_code == 422, control.text
