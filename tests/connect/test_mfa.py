"""Two-step sign-in over HTTP, as a browser submits the forms: enrolment, codes accepted once,
recovery codes, the attempt limit, MFA required for operators, the CLI recovery of a locked-out operator."""

from __future__ import annotations

import asyncio
import html
import re
import time

import pyotp
import pytest
from sqlalchemy import func, select

from app.core.models import AuditEntry, LoginAttempt, RecoveryCode, User, WebSession
from app.identity import mfa
from app.main import create_app
from tests.support.journeys import Browser, csrf_of, make_user

SECRET = re.compile(r'id="mfa-secret">([A-Z2-7 ]+)</code>')
CODE = re.compile(r"<li>([a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{4})</li>")


async def enrol(browser: Browser) -> tuple[pyotp.TOTP, list[str]]:
    """Set up TOTP from the account page as a person does: the secret read from the page, the first code confirmed."""
    started = await browser.post_form("/account/mfa/setup", {}, csrf_from="/account")
    assert started.status_code == 303, started.text
    page = await browser.get("/account")
    assert '<svg' in page.text and 'aria-label="QR code' in page.text
    secret = SECRET.search(page.text)
    assert secret, page.text
    totp = pyotp.TOTP(secret.group(1).replace(" ", ""))
    confirmed = await browser.post_form("/account/mfa/confirm", {"code": totp.now()}, csrf_from="/account")
    assert confirmed.status_code == 200, confirmed.text
    codes = CODE.findall(confirmed.text)
    assert len(codes) == 10 and len(set(codes)) == 10
    return totp, codes


def next_code(totp: pyotp.TOTP) -> str:
    """The code of the next time step: accepted (window 1) and later than any step already used."""
    return totp.at(time.time() + 30)


async def sign_out(browser: Browser) -> None:
    answer = await browser.post_form("/logout", {}, csrf_from="/account")
    assert answer.status_code == 303


async def password_step(browser: Browser, email: str) -> None:
    answer = await browser.login(email)
    assert answer.status_code == 303 and answer.headers["location"] == "/login/mfa", answer.text


async def submit_code(browser: Browser, code: str):
    return await browser.post_form("/login/mfa", {"code": code})


async def test_enrol_then_sign_in_needs_the_code_and_gets_a_new_session(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "op@example.com"))
        assert user.mfa_enabled_at is not None and user.mfa_secret_ct is not None
        assert totp.secret.encode() not in user.mfa_secret_ct  # sealed, not stored in clear
        assert mfa.open_secret(runtime.keyring, user.id, user.mfa_secret_ct) == totp.secret
    await sign_out(browser)

    await password_step(browser, "op@example.com")
    pending_cookie = browser.app_client.cookies.get("smc_session")
    # the password alone signs nobody in
    for path in ("/tenants", "/account", "/people"):
        refused = await browser.get(path)
        assert refused.status_code == 303 and refused.headers["location"].startswith("/login"), path
    answer = await submit_code(browser, next_code(totp))
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    assert browser.app_client.cookies.get("smc_session") != pending_cookie  # a new session id
    assert (await browser.get("/tenants")).status_code == 200


async def test_a_wrong_code_is_refused_with_a_message_counted_and_audited(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    wrong = f"{(int(totp.now()) + 1) % 1_000_000:06d}"
    answer = await submit_code(browser, wrong)
    assert answer.status_code == 422
    assert "The code is not right" in html.unescape(answer.text)
    assert (await browser.get("/tenants")).status_code == 303  # still not signed in
    async with runtime.db.session() as session:
        attempts = await session.scalar(select(func.count()).select_from(LoginAttempt).where(
            LoginAttempt.kind == "totp", LoginAttempt.succeeded.is_(False)))
        denied = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "mfa.verify"))).all()
    assert attempts == 1
    assert [(d.outcome, d.target) for d in denied] == [("denied", "op@example.com")]


async def test_a_code_is_accepted_once_replayed_in_its_step_it_is_refused(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    await sign_out(browser)
    code = next_code(totp)
    await password_step(browser, "op@example.com")
    assert (await submit_code(browser, code)).status_code == 303
    await sign_out(browser)

    await password_step(browser, "op@example.com")
    replayed = await submit_code(browser, code)
    assert replayed.status_code == 422
    assert "used already" in html.unescape(replayed.text)
    # and the code of an earlier step, still inside the window, is refused too
    earlier = await submit_code(browser, totp.at(time.time() - 30))
    assert earlier.status_code == 422
    assert (await browser.get("/tenants")).status_code == 303
    async with runtime.db.session() as session:
        reasons = [e.details.get("reason") for e in (await session.scalars(
            select(AuditEntry).where(AuditEntry.action == "mfa.verify").order_by(AuditEntry.id))).all()]
    assert reasons == ["mfa_code_reused", "mfa_code_reused"]


async def test_a_recovery_code_works_once(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    _, codes = await enrol(browser)
    await sign_out(browser)

    await password_step(browser, "op@example.com")
    used = await submit_code(browser, codes[3].upper().replace("-", " "))  # typed loosely
    assert used.status_code == 303 and used.headers["location"].startswith("/account?notice=recovery_code_used")
    account = await browser.get(used.headers["location"])
    assert "9 left" in account.text
    await sign_out(browser)

    await password_step(browser, "op@example.com")
    again = await submit_code(browser, codes[3])
    assert again.status_code == 422
    assert "not right or was used already" in html.unescape(again.text)
    async with runtime.db.session() as session:
        spent = await session.scalar(select(func.count()).select_from(RecoveryCode).where(RecoveryCode.used_at.is_not(None)))
        audited = await session.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "mfa.recovery_code_used"))
    assert spent == 1 and audited == 1


async def test_too_many_wrong_codes_refuse_even_the_right_one(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    for _ in range(runtime.settings.mfa_attempts_per_15_minutes):
        assert (await submit_code(browser, "000000" if totp.now() != "000000" else "111111")).status_code == 422
    limited = await submit_code(browser, next_code(totp))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "900"
    assert "Too many attempts" in limited.text and "too_many_attempts" in limited.text
    assert (await browser.get("/tenants")).status_code == 303


def wrong_code(totp: pyotp.TOTP) -> str:
    """A 6-digit code of none of the three steps that are accepted now."""
    accepted = {totp.at(time.time() + offset) for offset in (-30, 0, 30)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in accepted)


async def test_parallel_wrong_codes_get_no_more_checks_than_the_limit(runtime, browser, monkeypatch):
    """Every attempt is recorded before its code is checked, so codes sent all at once cannot all
    be checked against a count that none of them has reached yet."""
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    checked = 0
    real = mfa._matching_step

    def counting(secret: str, code: str, now: float | None = None) -> int | None:
        nonlocal checked
        checked += 1
        return real(secret, code, now)

    monkeypatch.setattr(mfa, "_matching_step", counting)
    limit = runtime.settings.mfa_attempts_per_15_minutes
    token = csrf_of((await browser.get("/login/mfa")).text)
    answers = await asyncio.gather(*(
        browser.app_client.post("/login/mfa", data={"csrf_token": token, "code": wrong_code(totp)})
        for _ in range(limit + 3)
    ))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {422, 429}, statuses
    assert checked <= limit and statuses.count(422) == checked, (checked, statuses)
    assert statuses.count(429) >= 3
    async with runtime.db.session() as session:
        failures = await session.scalar(select(func.count()).select_from(LoginAttempt).where(
            LoginAttempt.kind == "totp", LoginAttempt.succeeded.is_(False)))
    assert failures == checked  # a refused attempt is not left behind to extend the lock-out
    limited = await submit_code(browser, next_code(totp))  # and the right code is refused as well now
    assert limited.status_code == 429 or checked < limit


@pytest.mark.parametrize("typed", ["\u0661\u0662\u0663\u0664\u0665\u0666", "\u00b2" * 6, "\uff11" * 6])
async def test_digits_that_are_not_ascii_are_a_wrong_code_not_a_crash(runtime, browser, typed):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    await enrol(browser)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    answer = await submit_code(browser, typed)
    assert answer.status_code == 422 and "mfa_code_invalid" in answer.text, answer.text
    async with runtime.db.session() as session:
        attempts = await session.scalar(select(func.count()).select_from(LoginAttempt).where(
            LoginAttempt.kind == "totp", LoginAttempt.succeeded.is_(False)))
    assert attempts == 1
    assert (await browser.get("/tenants")).status_code == 303


async def test_mfa_changes_end_the_other_sessions_and_give_this_browser_a_new_one(runtime, live_app, upstream, browser):
    """A session opened with a stolen password does not survive its owner turning MFA on, making
    new recovery codes or turning MFA off; the browser that made the change goes on with a new id."""
    await make_user(runtime, "op@example.com")
    other = Browser(live_app, upstream.url)
    try:
        await browser.login("op@example.com")
        await other.login("op@example.com")
        assert (await other.get("/tenants")).status_code == 200
        before = browser.app_client.cookies.get("smc_session")
        totp, codes = await enrol(browser)
        assert browser.app_client.cookies.get("smc_session") not in (None, before)
        assert (await browser.get("/tenants")).status_code == 200
        assert (await other.get("/tenants")).status_code == 303  # ended

        await password_step(other, "op@example.com")
        assert (await submit_code(other, codes[0])).status_code == 303
        before = browser.app_client.cookies.get("smc_session")
        made = await browser.post_form("/account/mfa/recovery-codes", {"code": next_code(totp)}, csrf_from="/account")
        assert made.status_code == 200
        assert browser.app_client.cookies.get("smc_session") not in (None, before)
        assert (await other.get("/tenants")).status_code == 303
        new = CODE.findall(made.text)
        # the page's own forms carry the new session's CSRF token
        assert (await browser.app_client.post("/logout", data={"csrf_token": csrf_of(made.text)})).status_code == 303
        await browser.login("op@example.com")
        assert (await submit_code(browser, new[0])).status_code == 303

        await password_step(other, "op@example.com")
        assert (await submit_code(other, new[1])).status_code == 303
        before = browser.app_client.cookies.get("smc_session")
        off = await browser.post_form("/account/mfa/disable", {"code": new[2]}, csrf_from="/account")
        assert off.status_code == 303
        assert browser.app_client.cookies.get("smc_session") not in (None, before)
        assert (await browser.get("/tenants")).status_code == 200
        assert (await other.get("/tenants")).status_code == 303
    finally:
        await other.close()


async def test_regenerating_recovery_codes_needs_a_code_and_retires_the_old_ones(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, old = await enrol(browser)
    refused = await browser.post_form("/account/mfa/recovery-codes", {"code": "12345"}, csrf_from="/account")
    assert refused.status_code == 422 and 'id="regenerate-error"' in refused.text
    made = await browser.post_form("/account/mfa/recovery-codes", {"code": next_code(totp)}, csrf_from="/account")
    assert made.status_code == 200
    new = CODE.findall(made.text)
    assert len(new) == 10 and not set(new) & set(old)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    assert (await submit_code(browser, old[0])).status_code == 422
    assert (await submit_code(browser, new[0])).status_code == 303


async def test_turning_mfa_off_needs_a_code(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    refused = await browser.post_form("/account/mfa/disable", {"code": "not-a-code"}, csrf_from="/account")
    assert refused.status_code == 422
    off = await browser.post_form("/account/mfa/disable", {"code": next_code(totp)}, csrf_from="/account")
    assert off.status_code == 303
    await sign_out(browser)
    signed_in = await browser.login("op@example.com")
    assert signed_in.headers["location"] == "/"  # the password alone again


async def test_the_enrolment_form_without_csrf_changes_nothing(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    await browser.post_form("/account/mfa/setup", {}, csrf_from="/account")
    page = await browser.get("/account")
    totp = pyotp.TOTP(SECRET.search(page.text).group(1).replace(" ", ""))
    answer = await browser.app_client.post("/account/mfa/confirm", data={"code": totp.now()})
    assert answer.status_code == 403 and "The form expired" in answer.text
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "op@example.com"))
    assert user.mfa_enabled_at is None


@pytest.fixture
async def mfa_required_browser(connected_settings, upstream):
    app = create_app(connected_settings.model_copy(update={"require_mfa": True}), configure_logs=False)
    async with app.router.lifespan_context(app):
        b = Browser(app, upstream.url)
        yield app.state.runtime, b
        await b.close()


async def test_where_mfa_is_required_an_operator_is_sent_to_enrol_and_cannot_turn_it_off(mfa_required_browser):
    runtime, browser = mfa_required_browser
    await make_user(runtime, "op@example.com")
    answer = await browser.login("op@example.com")
    assert answer.status_code == 303
    for path in ("/tenants", "/people", "/api-keys", "/"):
        sent = await browser.get(path)
        assert sent.status_code == 303 and sent.headers["location"] == "/account#mfa", path
    account = await browser.get("/account")
    assert account.status_code == 200 and "Operators must set up two-step sign-in" in account.text
    totp, _ = await enrol(browser)
    assert (await browser.get("/tenants")).status_code == 200
    kept = await browser.post_form("/account/mfa/disable", {"code": next_code(totp)}, csrf_from="/account")
    assert kept.status_code == 403 and "required for operators" in html.unescape(kept.text)
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "op@example.com"))
    assert user.mfa_enabled_at is not None


async def test_the_code_page_expires_and_asks_for_the_password_again(runtime, browser):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    totp, _ = await enrol(browser)
    await sign_out(browser)
    await password_step(browser, "op@example.com")
    async with runtime.db.session() as session:
        await session.execute(update(WebSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert (await browser.get("/login/mfa")).headers["location"] == "/login"
    late = await browser.post_form("/login/mfa", {"code": next_code(totp)}, csrf_from="/login")
    assert late.status_code == 401 and "took too long" in late.text
    assert (await browser.get("/tenants")).status_code == 303


def test_the_cli_resets_mfa_and_prints_a_reset_link_once(tmp_path):
    """A locked-out operator is recovered from the shell: MFA removed, a single-use reset link printed."""
    import asyncio

    from app.core.settings import Settings
    from app.runtime import Runtime
    from tests.support.processes import clean_env, run_cli

    url = f"sqlite:///{tmp_path}/cli.db"
    env = clean_env(SMC_DATABASE_URL=url, SMC_PUBLIC_URL="http://127.0.0.1:8000")
    assert run_cli("db", "upgrade", env=env).returncode == 0

    async def enrolled() -> None:
        runtime = await Runtime.start(Settings(_env_file=None, database_url=url, public_url="http://127.0.0.1:8000"))
        try:
            user = await make_user(runtime, "op@example.com")
            async with runtime.db.session() as session:
                user = await session.get(User, user.id)
                mfa.begin_enrolment(user=user, keyring=runtime.keyring)
                from datetime import UTC, datetime

                user.mfa_enabled_at = datetime.now(UTC)
        finally:
            await runtime.stop()

    asyncio.run(enrolled())
    missing = run_cli("user", "reset-mfa", "nobody@example.com", env=env)
    assert missing.returncode == 1 and "user_not_found" in missing.stderr
    reset = run_cli("user", "reset-mfa", "op@example.com", env=env)
    assert reset.returncode == 0, reset.stderr
    link = run_cli("user", "reset-password-link", "op@example.com", env=env)
    assert link.returncode == 0, link.stderr
    assert re.search(r"http://127\.0\.0\.1:8000/reset/smc_pwr_[A-Za-z0-9_-]{43}", link.stdout)

    async def state() -> tuple[User, list[str]]:
        runtime = await Runtime.start(Settings(_env_file=None, database_url=url, public_url="http://127.0.0.1:8000"))
        try:
            async with runtime.db.session() as session:
                user = await session.scalar(select(User).where(User.email == "op@example.com"))
                actions = (await session.scalars(select(AuditEntry.action).order_by(AuditEntry.id))).all()
                return user, list(actions)
        finally:
            await runtime.stop()

    user, actions = asyncio.run(state())
    assert user.mfa_enabled_at is None and user.mfa_secret_ct is None
    assert "mfa.reset" in actions and "password.reset_issued" in actions



def test_keys_rotate_reseals_totp_secrets_so_the_old_master_key_can_go(tmp_path):
    import asyncio
    import base64
    import os

    from app.core.settings import Settings
    from app.runtime import Runtime
    from tests.support.processes import clean_env, run_cli

    old = "old:" + base64.b64encode(os.urandom(32)).decode()
    new = "new:" + base64.b64encode(os.urandom(32)).decode()
    url = f"sqlite:///{tmp_path}/rotate.db"
    env = clean_env(SMC_DATABASE_URL=url, SMC_MASTER_KEYS=old)
    assert run_cli("db", "upgrade", env=env).returncode == 0

    async def enrolled() -> str:
        runtime = await Runtime.start(Settings(_env_file=None, database_url=url, master_keys=old))
        try:
            user = await make_user(runtime, "op@example.com")
            async with runtime.db.session() as session:
                user = await session.get(User, user.id)
                return mfa.begin_enrolment(user=user, keyring=runtime.keyring)
        finally:
            await runtime.stop()

    secret = asyncio.run(enrolled())
    env["SMC_MASTER_KEYS"] = f"{new},{old}"
    rotated = run_cli("keys", "rotate", "--json", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert '"mfa_secrets_rewrapped": 1' in rotated.stdout
    env["SMC_MASTER_KEYS"] = new
    verified = run_cli("keys", "verify", "--json", env=env)
    assert verified.returncode == 0 and '"mfa_secrets": 1' in verified.stdout, verified.stdout + verified.stderr
    env["SMC_MASTER_KEYS"] = old
    refused = run_cli("keys", "verify", env=env)
    assert refused.returncode == 1 and "mfa secret of op@example.com" in refused.stdout

    async def opened() -> str:
        runtime = await Runtime.start(Settings(_env_file=None, database_url=url, master_keys=new))
        try:
            async with runtime.db.session() as session:
                user = await session.scalar(select(User).where(User.email == "op@example.com"))
                return mfa.open_secret(runtime.keyring, user.id, user.mfa_secret_ct)
        finally:
            await runtime.stop()

    assert asyncio.run(opened()) == secret
