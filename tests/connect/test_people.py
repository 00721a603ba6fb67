"""The people page and the account page over HTTP: invitations, disabling (sessions end at once),
password reset links (single use, revoked by a newer one, expiring), password change, MFA reset."""

from __future__ import annotations

import asyncio
import html
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app.audit.audit_log import Actor
from app.core.errors import Conflict
from app.core.models import AuditEntry, Invitation, LoginAttempt, PasswordReset, User
from app.identity import password_resets, people
from tests.connect.test_mfa import enrol, next_code, submit_code
from tests.support.journeys import PASSWORD, Browser, csrf_of, make_tenant, make_user

NEW_PASSWORD = "a much longer new passphrase"
LINK = re.compile(r'id="secret-value" type="text" readonly value="([^"]+)"')


async def user_named(runtime, email: str) -> User:
    async with runtime.db.session() as session:
        return await session.scalar(select(User).where(User.email == email))


async def actions(runtime) -> list[str]:
    async with runtime.db.session() as session:
        return list((await session.scalars(select(AuditEntry.action).order_by(AuditEntry.id))).all())


@pytest.fixture
async def second_browser(live_app, upstream):
    b = Browser(live_app, upstream.url)
    yield b
    await b.close()


async def test_operators_see_everyone_filtered_by_role_and_org_admins_cannot(runtime, browser, second_browser):
    tenant = await make_tenant(runtime, "acme")
    await make_user(runtime, "op@example.com")
    await make_user(runtime, "admin@acme.example", role="org_admin", tenant=tenant)
    await browser.login("op@example.com")
    page = await browser.get("/people")
    assert page.status_code == 200
    assert "op@example.com" in page.text and "admin@acme.example" in page.text and "Acme" in page.text
    admins = await browser.get("/people?role=org_admin")
    assert "admin@acme.example" in admins.text and "op@example.com</td>" not in admins.text.replace(" <span", "</td>")
    operators = await browser.get("/people?role=operator")
    assert "admin@acme.example" not in operators.text

    await second_browser.login("admin@acme.example")
    refused = await second_browser.get("/people")
    assert refused.status_code == 403 and "operator_only" in refused.text


async def test_inviting_an_operator_shows_the_link_once_and_lists_it_with_revoke_and_reissue(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    shown = await browser.post_form("/people/invite", {"role": "operator", "email": "new-op@example.com", "tenant": ""},
                                    csrf_from="/people")
    assert shown.status_code == 200, shown.text
    link = LINK.search(shown.text).group(1)
    assert link.startswith("http://127.0.0.1:8000/invite/smc_inv_")
    listed = await browser.get("/people")
    assert "new-op@example.com" in listed.text
    assert link.rsplit("/", 1)[1] not in listed.text  # shown once
    async with runtime.db.session() as session:
        invitation = await session.scalar(select(Invitation).where(Invitation.email == "new-op@example.com"))
    assert invitation.role == "operator" and invitation.tenant_id is None
    for action in ("revoke", "reissue"):
        assert f'action="/invitations/{invitation.id}/{action}"' in listed.text
    assert listed.text.count('name="back" value="/people"') == 2


async def test_inviting_an_org_admin_names_the_tenant_and_bad_input_changes_nothing(runtime, browser):
    await make_tenant(runtime, "acme")
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    made = await browser.post_form("/people/invite", {"role": "org_admin", "email": "boss@acme.example", "tenant": "acme"},
                                   csrf_from="/people")
    assert made.status_code == 200 and "the admin of Acme" in made.text
    no_tenant = await browser.post_form("/people/invite", {"role": "org_admin", "email": "x@acme.example", "tenant": ""},
                                        csrf_from="/people")
    assert no_tenant.status_code == 422 and "An org admin belongs to a tenant" in no_tenant.text
    bad_email = await browser.post_form("/people/invite", {"role": "operator", "email": "not an email", "tenant": ""},
                                        csrf_from="/people")
    assert bad_email.status_code == 422 and "valid email" in bad_email.text
    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Invitation)) == 1


async def test_disabling_ends_the_persons_open_session_at_once_and_enabling_lets_them_back(runtime, browser, second_browser):
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    await second_browser.login("other@example.com")
    assert (await second_browser.get("/tenants")).status_code == 200

    done = await browser.post_form(f"/people/{other.id}/disable", {}, csrf_from="/people")
    assert done.status_code == 303 and done.headers["location"] == "/people?notice=disabled"
    next_click = await second_browser.get("/tenants")
    assert next_click.status_code == 303 and next_click.headers["location"].startswith("/login")
    refused = await second_browser.login("other@example.com")
    assert refused.status_code == 401
    page = await browser.get("/people")
    assert "disabled" in page.text
    assert (await user_named(runtime, "other@example.com")).disabled_by == "op@example.com"

    assert (await browser.post_form(f"/people/{other.id}/enable", {}, csrf_from="/people")).status_code == 303
    assert (await second_browser.login("other@example.com")).status_code == 303
    assert [a for a in await actions(runtime) if a.startswith("user.")][-2:] == ["user.disable", "user.enable"]


async def test_nobody_disables_themselves_nor_the_last_operator(runtime, browser):
    me = await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    refused = await browser.post_form(f"/people/{me.id}/disable", {}, csrf_from="/people")
    assert refused.status_code == 403 and "cannot disable yourself" in refused.text
    # from outside the page (the CLI, a service), the last enabled operator is kept
    async with runtime.db.session() as session:
        user = await session.get(User, me.id)
        with pytest.raises(Conflict) as caught:
            await people.disable_user(session, user=user, actor=Actor.system(), acting_user_id=None)
    assert caught.value.code == "last_operator"
    assert (await user_named(runtime, "op@example.com")).disabled_at is None
    assert (await browser.get("/tenants")).status_code == 200


async def test_a_form_without_csrf_is_refused_with_a_message_and_changes_nothing(runtime, browser):
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    answer = await browser.app_client.post(f"/people/{other.id}/disable", data={})
    assert answer.status_code == 403 and "The form expired or did not come from this site" in answer.text
    assert (await user_named(runtime, "other@example.com")).disabled_at is None
    changed = await browser.app_client.post("/account/password", data={"current": PASSWORD, "new": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert changed.status_code == 403
    assert (await browser.post_form("/logout", {}, csrf_from="/account")).status_code == 303
    assert (await browser.login("op@example.com")).status_code == 303  # the old password still works


async def issue_reset_link(browser: Browser, user_id) -> str:
    shown = await browser.post_form(f"/people/{user_id}/reset-link", {}, csrf_from="/people")
    assert shown.status_code == 200, shown.text
    return LINK.search(shown.text).group(1).removeprefix("http://127.0.0.1:8000")


async def test_a_reset_link_works_once_ends_every_session_and_keeps_mfa(runtime, live_app, upstream, browser, second_browser):
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    await second_browser.login("other@example.com")
    totp, _ = await enrol(second_browser)
    path = await issue_reset_link(browser, other.id)

    reader = Browser(live_app, upstream.url)  # the person, in a browser of their own
    try:
        opened = await reader.get(path)
        assert opened.status_code == 200 and "other@example.com" in opened.text
        assert (await reader.get(path)).status_code == 200  # opening spends nothing
        differ = await reader.post_form(path, {"password": NEW_PASSWORD, "again": NEW_PASSWORD + "x"})
        assert differ.status_code == 422 and "differ" in differ.text
        weak = await reader.post_form(path, {"password": "short", "again": "short"})
        assert weak.status_code == 422
        done = await reader.post_form(path, {"password": NEW_PASSWORD, "again": NEW_PASSWORD})
        assert done.status_code == 303 and done.headers["location"] == "/login?notice=password_reset"
        notice = await reader.get(done.headers["location"])
        assert "Your password is set" in notice.text
        used = await reader.get(path)
        assert used.status_code == 410 and "password_reset_used" in used.text
    finally:
        await reader.close()

    # the open session of that person ended; the new password is the one; MFA stayed on
    assert (await second_browser.get("/account")).status_code == 303
    assert (await second_browser.login("other@example.com")).status_code == 401
    answer = await second_browser.login("other@example.com", NEW_PASSWORD)
    assert answer.headers["location"] == "/login/mfa"
    assert (await submit_code(second_browser, next_code(totp))).status_code == 303
    assert {"password.reset_issued", "password.reset_used"} <= set(await actions(runtime))


async def test_a_newer_link_revokes_the_older_and_an_old_link_expires(runtime, browser):
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    first = await issue_reset_link(browser, other.id)
    second = await issue_reset_link(browser, other.id)
    revoked = await browser.get(first)
    assert revoked.status_code == 410 and "password_reset_invalid" in revoked.text
    assert (await browser.get(second)).status_code == 200
    async with runtime.db.session() as session:
        await session.execute(update(PasswordReset).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    expired = await browser.get(second)
    assert expired.status_code == 410 and "password_reset_expired" in expired.text
    unknown = await browser.get("/reset/smc_pwr_nope")
    assert unknown.status_code == 410 and "password_reset_invalid" in unknown.text
    async with runtime.db.session() as session:
        stored = (await session.scalars(select(PasswordReset.token_hash))).all()
    assert all(second.rsplit("/", 1)[1] != h for h in stored)  # only hashes are kept


async def test_changing_the_password_needs_the_current_one_and_ends_the_other_sessions(
    runtime, live_app, upstream, browser, second_browser
):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    before = browser.app_client.cookies.get("smc_session")
    await second_browser.login("op@example.com")
    wrong = await browser.post_form("/account/password", {"current": "not it at all", "new": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert wrong.status_code == 422 and 'id="password-error"' in wrong.text
    assert "current password is not right" in html.unescape(wrong.text)
    differ = await browser.post_form("/account/password", {"current": PASSWORD, "new": NEW_PASSWORD, "again": "other"},
                                     csrf_from="/account")
    assert differ.status_code == 422
    done = await browser.post_form("/account/password", {"current": PASSWORD, "new": NEW_PASSWORD, "again": NEW_PASSWORD},
                                   csrf_from="/account")
    assert done.status_code == 303 and done.headers["location"] == "/account?notice=password"
    renewed = browser.app_client.cookies.get("smc_session")
    assert renewed not in (None, before)  # this browser goes on with a new session id
    assert (await browser.get("/tenants")).status_code == 200  # this session goes on
    stale = Browser(live_app, upstream.url)
    try:
        stale.app_client.cookies.set("smc_session", before)
        assert (await stale.get("/tenants")).status_code == 303  # the old id no longer works
    finally:
        await stale.close()
    assert (await second_browser.get("/tenants")).status_code == 303  # the other one ended
    assert (await second_browser.login("op@example.com")).status_code == 401
    assert (await second_browser.login("op@example.com", NEW_PASSWORD)).status_code == 303
    assert (await user_named(runtime, "op@example.com")).password_changed_at is not None
    assert "password.change" in await actions(runtime)


async def test_an_operator_resets_a_persons_mfa_when_they_lost_their_device(runtime, browser, second_browser):
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    await second_browser.login("other@example.com")
    await enrol(second_browser)
    page = await browser.get("/people")
    assert f'action="/people/{other.id}/reset-mfa"' in page.text
    done = await browser.post_form(f"/people/{other.id}/reset-mfa", {}, csrf_from="/people")
    assert done.status_code == 303
    assert (await second_browser.get("/tenants")).status_code == 303  # their sessions ended
    assert (await second_browser.login("other@example.com")).headers["location"] == "/"  # password alone now
    user = await user_named(runtime, "other@example.com")
    assert user.mfa_enabled_at is None and user.mfa_secret_ct is None
    assert "mfa.reset" in await actions(runtime)


async def test_a_link_revoked_while_it_is_being_used_sets_no_password(runtime, live_app, upstream, browser, monkeypatch):
    """Issuing link B revokes link A; when that happens between A's check and its spending, A still sets nothing."""
    await make_user(runtime, "op@example.com")
    other = await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    first = await issue_reset_link(browser, other.id)
    real = password_resets.open_reset
    opened = 0

    async def then_revoked(session, token):
        nonlocal opened
        found = await real(session, token)
        opened += 1
        if opened == 2:  # the check inside use(): the operator issues a newer link right now
            async with runtime.db.session() as elsewhere:
                user = await elsewhere.get(User, other.id)
                await password_resets.issue(elsewhere, user=user, minutes=30, actor=Actor.system())
        return found

    monkeypatch.setattr(password_resets, "open_reset", then_revoked)
    reader = Browser(live_app, upstream.url)
    try:
        answer = await reader.post_form(first, {"password": NEW_PASSWORD, "again": NEW_PASSWORD})
        assert answer.status_code == 410 and "password_reset_invalid" in answer.text, answer.text
        assert (await reader.login("other@example.com", NEW_PASSWORD)).status_code == 401
        assert (await reader.login("other@example.com")).status_code == 303  # the old password still works
    finally:
        await reader.close()
    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(PasswordReset).where(
            PasswordReset.used_at.is_not(None))) == 0


async def test_an_operator_cannot_reset_their_own_password_or_mfa_from_the_people_page(runtime, browser):
    me = await make_user(runtime, "op@example.com")
    await make_user(runtime, "other@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    link = await browser.post_form(f"/people/{me.id}/reset-link", {}, csrf_from="/people")
    assert link.status_code == 409 and "use_account_page" in link.text and "your account page (/account)" in link.text
    assert "/reset/smc_pwr_" not in link.text
    reset = await browser.post_form(f"/people/{me.id}/reset-mfa", {}, csrf_from="/people")
    assert reset.status_code == 409 and "use_account_page" in reset.text
    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(PasswordReset)) == 0
    user = await user_named(runtime, "op@example.com")
    assert user.mfa_enabled_at is not None and user.mfa_secret_ct is not None
    assert (await browser.get("/tenants")).status_code == 200  # still signed in
    assert not {"password.reset_issued", "mfa.reset"} & set(await actions(runtime))


async def test_parallel_wrong_passwords_get_no_more_checks_than_the_limit(runtime, browser, monkeypatch):
    """Every attempt is recorded before the password is checked, so guesses sent all at once
    cannot all be checked against a count that none of them has reached yet."""
    await make_user(runtime, "op@example.com")
    checked = 0
    real = people._verify

    async def counting(password_hash: str, password: str) -> bool:
        nonlocal checked
        checked += 1
        return await real(password_hash, password)

    monkeypatch.setattr(people, "_verify", counting)
    limit = runtime.settings.login_attempts_per_15_minutes
    token = csrf_of((await browser.get("/login")).text)
    answers = await asyncio.gather(*(
        browser.app_client.post("/login", data={"csrf_token": token, "email": "op@example.com", "password": f"guess number {i}"})
        for i in range(limit + 3)
    ))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {401, 429}, statuses
    assert checked <= limit and statuses.count(401) == checked, (checked, statuses)
    async with runtime.db.session() as session:
        failures = await session.scalar(select(func.count()).select_from(LoginAttempt).where(
            LoginAttempt.kind == "password", LoginAttempt.succeeded.is_(False)))
    assert failures == checked


async def test_parallel_wrong_current_passwords_get_no_more_checks_than_the_limit(runtime, browser, monkeypatch):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    checked = 0
    real = people._verify

    async def counting(password_hash: str, password: str) -> bool:
        nonlocal checked
        checked += 1
        return await real(password_hash, password)

    monkeypatch.setattr(people, "_verify", counting)
    limit = runtime.settings.login_attempts_per_15_minutes
    token = csrf_of((await browser.get("/account")).text)
    answers = await asyncio.gather(*(
        browser.app_client.post("/account/password", data={
            "csrf_token": token, "current": f"guess number {i}", "new": NEW_PASSWORD, "again": NEW_PASSWORD})
        for i in range(limit + 3)
    ))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {422, 429}, statuses
    assert checked <= limit and statuses.count(422) == checked, (checked, statuses)
    assert (await user_named(runtime, "op@example.com")).password_changed_at is None


async def test_a_csrf_token_that_is_not_ascii_is_refused_not_a_crash(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.get("/login")  # the pre-sign-in CSRF cookie
    anonymous = await browser.app_client.post("/login", data={
        "csrf_token": "\u00e9t\u00e9" * 10, "email": "op@example.com", "password": PASSWORD})
    assert anonymous.status_code == 403 and "The form expired" in anonymous.text
    odd_cookie = await browser.app_client.get("/login", headers={"cookie": "smc_csrf=\u00e9t\u00e9".encode()})
    assert odd_cookie.status_code == 200
    await browser.login("op@example.com")
    changed = await browser.app_client.post("/account/password", data={
        "csrf_token": "\u0661" * 43, "current": PASSWORD, "new": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert changed.status_code == 403 and "The form expired" in changed.text
    assert (await user_named(runtime, "op@example.com")).password_changed_at is None
