"""What the v2.3 document and its public clients show: message shapes without direction or team_id,
the members who sent them, page=0, and the endpoints added with v2.3 (contacts list and search,
opt-out/in, tagging a contact, /user, organization members, starting a conversation, paged tags)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from salesmsg_emulator.scopes import SCOPES
from tests.support.emulator_controls import ControlledEmulator

from .support import ACME, ALEX, AVERY, MESSAGE_FIELDS, Api, bearer

USER_FIELDS = {"id", "first_name", "last_name", "full_name", "email"}


def _all_messages(api: Api) -> list[dict[str, Any]]:
    return [m for c in api.get("/conversations", limit=100) for m in api.get(f"/messages/{c['id']}", limit=100)]


# --- message shapes --------------------------------------------------------------


def test_messages_carry_no_direction_or_team_id_and_name_their_sender(acme: Api) -> None:
    conversations = acme.get("/conversations", limit=100)
    messages = _all_messages(acme)
    for message in messages + [c["latest_message"] for c in conversations]:
        assert set(message) == MESSAGE_FIELDS
        assert "direction" not in message and "team_id" not in message
        assert message["type"] in ("sms", "call") and message["mms_status"] is None
        if message["user"] is not None:
            assert set(message["user"]) == USER_FIELDS and message["user"]["id"] == message["user_id"]
        else:
            assert message["user_id"] is None
    inbound = [m for m in messages if m["status"] == "received"]
    outbound = [m for m in messages if m["status"] != "received"]
    assert inbound and all(m["user"] is None and m["source"] is None and not m["automated"] for m in inbound)
    manual = [m for m in outbound if not m["automated"]]
    assert manual and all(m["user"] is not None and m["source"] == "app" for m in manual)
    # more than one member sends, so some outbound messages are not by the user who connects
    assert {m["user_id"] for m in manual} == {AVERY, ALEX}
    assert next(m for m in manual if m["user_id"] == ALEX)["user"]["full_name"] == "Alex Sampleton"


def test_automated_messages_and_their_user_setting(acme: Api, emulator: ControlledEmulator) -> None:
    automated = [m for m in _all_messages(acme) if m["automated"]]
    assert automated and all(m["source"] == "automation" and m["user"] is None for m in automated)
    assert all(m["status"] != "received" for m in automated)  # outbound, though nobody is named
    emulator.controls.update_settings(automated_messages_user=True)
    shown = [m for m in _all_messages(acme) if m["automated"]]
    assert all(m["user_id"] in (AVERY, ALEX) and m["user"]["id"] == m["user_id"] for m in shown)


def test_calls_carry_a_record_and_texts_none(emulator: ControlledEmulator, http: httpx.Client) -> None:
    messages = []
    for org_pat in ("pat-acme-avery-test-000000001", "pat-corner-casey-test-00000001"):
        messages += _all_messages(Api(emulator, http, org_pat))
    calls = [m for m in messages if m["type"] == "call"]
    outgoing = [m for m in calls if m["status"] != "received"]
    assert outgoing and all(set(m["record"]) == {"id", "duration", "url"} for m in outgoing)
    assert all(m["record"] is None for m in messages if m["type"] == "sms")
    assert all(m["record"] is None for m in calls if m["status"] == "received")  # missed calls


def test_inbound_from_the_control_has_no_user(acme: Api, emulator: ControlledEmulator) -> None:
    cid = acme.get("/conversations", limit=1)[0]["id"]
    injected = emulator.controls.inject_inbound(cid, "Hello?")
    assert injected["user"] is None and injected["user_id"] is None and "direction" not in injected
    assert set(injected) == MESSAGE_FIELDS


# --- paging ------------------------------------------------------------------------


def test_page_zero_is_the_first_page_everywhere(acme: Api) -> None:
    cid = acme.get("/conversations", limit=1)[0]["id"]
    for path, params in (("/contacts", {"length": 5}), ("/tags", {"length": 2}),
                         (f"/messages/{cid}/paginated", {"per_page": 2})):  # fmt: skip
        zero, one = acme.get(path, page=0, **params), acme.get(path, page=1, **params)
        assert zero == one and zero["meta"]["current_page"] == 1, path
    listed = acme.request("POST", "/contacts/list", json={"page": 0, "length": 5})
    assert listed.status_code == 200 and listed.json()["data"] == acme.get("/contacts", length=5)["data"]
    assert acme.request("GET", "/contacts", params={"page": -1}).status_code == 422


# --- contacts --------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["json", "query", "form"])
def test_contacts_list_pages_like_get_contacts(acme: Api, style: str) -> None:
    fields = {"page": 2, "length": 20, "search": ""}
    kwargs = {"json": {"json": fields}, "query": {"params": fields}, "form": {"data": fields}}[style]
    answer = acme.request("POST", "/contacts/list", **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.json() == acme.get("/contacts", page=2, length=20)
    assert answer.json()["meta"] == {"current_page": 2, "last_page": 3, "per_page": 20, "total": 50}
    testy = acme.request("POST", "/contacts/list", json={"search": "testy mctestface"}).json()["data"]
    assert [c["full_name"] for c in testy] == ["Testy McTestface"]


def test_contacts_list_sorting(acme: Api) -> None:
    rows = acme.request("POST", "/contacts/list", json={"length": 100, "sortBy": "last_name",
                                                        "sortOrder": "desc"}).json()["data"]  # fmt: skip
    names = [c["last_name"].lower() for c in rows]
    assert names == sorted(names, reverse=True)
    bad = acme.request("POST", "/contacts/list", json={"sortBy": "password", "sortOrder": "sideways"})
    assert bad.status_code == 422 and set(bad.json()["errors"]) == {"sortBy", "sortOrder"}


def test_contacts_list_scope_follows_the_document_by_default(emulator: ControlledEmulator, http: httpx.Client) -> None:
    reader = Api(emulator, http, emulator.controls.issue_pat(AVERY, "contacts:read"))
    denied = reader.request("POST", "/contacts/list", json={})
    assert denied.status_code == 403 and denied.json()["required_scope"] == "contacts:write"
    emulator.controls.update_settings(contacts_list_scope="contacts:read")
    assert reader.request("POST", "/contacts/list", json={}).status_code == 200
    writer = Api(emulator, http, emulator.controls.issue_pat(AVERY, "contacts:write"))
    assert writer.request("POST", "/contacts/list", json={}).json()["required_scope"] == "contacts:read"


def test_contact_search(acme: Api, corner: Api) -> None:
    answer = acme.get("/contacts/search", term="McTestface")
    assert set(answer) == {"results"} and len(answer["results"]) > 1
    assert answer["results"][0]["full_name"] == "Testy McTestface"
    assert len(acme.get("/contacts/search", term="McTestface", limit=2)["results"]) == 2
    number = answer["results"][0]["number"]
    assert [c["number"] for c in acme.get("/contacts/search", term=number[-4:])["results"]] == [number]
    assert all(c["id"] != answer["results"][0]["id"] for c in corner.get("/contacts/search", term="Testy")["results"])
    missing = acme.request("GET", "/contacts/search")
    assert missing.status_code == 422 and missing.json()["errors"] == {"term": ["The term field is required."]}


def test_opt_out_and_opt_in(acme: Api, corner: Api, emulator: ControlledEmulator) -> None:
    conversation = next(c for c in acme.get("/conversations", limit=100)
                        if not c["contact"]["opt_out"] and not c["contact"]["is_blocked"])  # fmt: skip
    contact_id = conversation["contact"]["id"]
    out = acme.request("PUT", f"/contacts/opt-out/{contact_id}")
    assert out.status_code == 200 and out.json()["id"] == contact_id
    assert out.json()["opt_out"] is True and out.json()["opt_out_at"]
    sent = acme.request("POST", f"/conversations/{conversation['id']}/send", json={"message": "hi"}).json()
    emulator.controls.advance_clock(5)
    assert next(m for m in acme.get(f"/messages/{conversation['id']}") if m["id"] == sent["id"])["status"] == "failed"
    back = acme.request("PUT", f"/contacts/opt-in/{contact_id}").json()
    assert back["opt_out"] is False and back["opt_out_at"] is None
    assert acme.get(f"/contacts/{contact_id}")["opt_out"] is False
    foreign = corner.get("/contacts")["data"][0]["id"]
    assert acme.request("PUT", f"/contacts/opt-out/{foreign}").status_code == 404


def test_tag_a_contact(acme: Api, corner: Api) -> None:
    contact = acme.get("/contacts", length=1)["data"][0]
    tag = next(t for t in acme.get("/tags")["data"] if t["id"] not in [x["id"] for x in contact["tags"]])
    for _ in range(2):  # idempotent
        answer = acme.request("PUT", f"/tags/contact/{contact['id']}/{tag['id']}")
        assert answer.status_code == 200 and answer.json()["type"] == "success" and answer.json()["message"]
    tags = acme.get(f"/contacts/{contact['id']}")["tags"]
    assert [t["id"] for t in tags].count(tag["id"]) == 1
    assert acme.request("DELETE", f"/tags/contact/{contact['id']}/{tag['id']}").status_code == 200
    assert tag["id"] not in [t["id"] for t in acme.get(f"/contacts/{contact['id']}")["tags"]]
    foreign_tag = corner.get("/tags")["data"][0]["id"]
    assert acme.request("PUT", f"/tags/contact/{contact['id']}/{foreign_tag}").status_code == 404
    assert acme.request("PUT", f"/tags/contact/999999/{tag['id']}").status_code == 404


# --- people ----------------------------------------------------------------------------


def test_user_and_organization_members(acme: Api) -> None:
    assert acme.get("/user") == acme.get("/users/me")
    assert acme.get("/user")["id"] == AVERY
    members = acme.get("/organization/members")
    assert isinstance(members, list) and [m["id"] for m in members] == [AVERY, ALEX]
    assert members == acme.get("/users")


# --- conversations -----------------------------------------------------------------------


def test_start_a_conversation(acme: Api, corner: Api) -> None:
    existing = acme.get("/conversations", limit=1)[0]
    found = acme.request("POST", "/conversations", params={"contact_id": existing["contact"]["id"],
                                                           "team_id": existing["team_id"]})  # fmt: skip
    assert found.status_code == 200 and found.json()["id"] == existing["id"]
    teams = acme.get("/teams")
    started = acme.request("POST", "/conversations", json={"number": "(202) 555-0196", "team_id": teams[1]["id"]})
    assert started.status_code == 201, started.text
    body = started.json()
    assert body["contact"]["number"] == "+12025550196" and body["team_id"] == teams[1]["id"]
    assert body["latest_message"] is None and acme.get(f"/conversations/{body['id']}")["id"] == body["id"]
    again = acme.request("POST", "/conversations", data={"contact_id": str(body["contact"]["id"]),
                                                         "number_id": str(teams[1]["id"])})  # fmt: skip
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    default_team = acme.request("POST", "/conversations", json={"contact_id": body["contact"]["id"]})
    assert default_team.status_code == 201 and default_team.json()["team_id"] == teams[0]["id"]
    foreign = corner.get("/contacts")["data"][0]["id"]
    bad = acme.request("POST", "/conversations", json={"contact_id": foreign, "team_id": 999999})
    assert bad.status_code == 422 and set(bad.json()["errors"]) == {"contact_id", "team_id"}
    assert set(acme.request("POST", "/conversations", json={}).json()["errors"]) == {"contact_id"}


# --- tags ---------------------------------------------------------------------------------


def test_tags_are_paged_searched_and_sorted(acme: Api) -> None:
    page = acme.get("/tags")
    assert set(page) == {"data", "meta"}
    assert page["meta"] == {"current_page": 1, "last_page": 1, "per_page": 20, "total": 4}
    assert [t["label"] for t in acme.get("/tags", search="bill")["data"]] == ["Billing"]
    assert acme.get("/tags", length=3, page=2)["data"] == page["data"][3:]
    labels = [t["label"] for t in acme.get("/tags", sortBy="label", sortOrder="desc")["data"]]
    assert labels == sorted(labels, key=str.lower, reverse=True)
    assert acme.request("GET", "/tags", params={"sortBy": "colour"}).status_code == 422


def test_create_a_tag_by_label(acme: Api) -> None:
    created = acme.request("POST", "/tags", params={"label": "Allergy"})
    assert created.status_code == 201 and created.json()["label"] == "Allergy"
    assert created.json() in acme.get("/tags", search="allergy")["data"]
    assert acme.request("POST", "/tags", json={"label": "Needs Callback"}).status_code == 201
    duplicate = acme.request("POST", "/tags", json={"label": "allergy"})
    assert duplicate.status_code == 422 and duplicate.json()["errors"] == {"label": ["The label has already been taken."]}
    assert acme.request("POST", "/tags", json={"name": "No label"}).json()["errors"]["label"]
    assert acme.request("POST", "/tags", json={"label": "x" * 51}).status_code == 422


# --- scopes of the new endpoints ----------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("GET", "/contacts/search?term=a", "contacts:read"),
    ("PUT", "/contacts/opt-out/1", "contacts:write"),
    ("PUT", "/contacts/opt-in/1", "contacts:write"),
    ("PUT", "/tags/contact/1/1", "tags:write"),
    ("DELETE", "/tags/contact/1/1", "tags:write"),
    ("GET", "/user", "users:read"),
    ("GET", "/organization/members", "organizations:read"),
    ("POST", "/conversations", "conversations:write"),
])  # fmt: skip
def test_new_endpoints_require_their_scope(emulator: ControlledEmulator, http: httpx.Client, method: str, path: str,
                                           scope: str) -> None:  # fmt: skip
    token = emulator.controls.issue_pat(AVERY, [s for s in SCOPES if s != scope])
    answer = http.request(method, emulator.api_base + path, headers=bearer(token))
    assert answer.status_code == 403 and answer.json()["required_scope"] == scope
    assert emulator.controls.org_usage(ACME)["served"] == 1  # a scope refusal still uses the budget
