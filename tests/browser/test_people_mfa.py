"""People and two-step sign-in in a real browser: an operator enrols TOTP from the QR page (the key
read from the page), is then asked for a code at every sign-in, a recovery code works once; an
operator disables a colleague whose open session is refused on its next click. Every page passes
axe-core and the CSP."""

from __future__ import annotations

import re
import time

import pyotp
import pytest
from playwright.async_api import Page, expect

from app.runtime import Runtime
from tests.browser.pages import OPERATOR_EMAIL, assert_accessible, login, screenshot
from tests.support.journeys import PASSWORD, make_user

pytestmark = pytest.mark.browser


async def sign_out(page: Page) -> None:
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(re.compile(r"/login$"))


async def password_step(page: Page) -> None:
    await page.goto("/login")
    await page.get_by_label("Email").fill(OPERATOR_EMAIL)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/login/mfa$"))


async def test_an_operator_enrols_totp_then_needs_a_code_and_a_recovery_code_works_once(open_context):
    watch = await open_context()
    watch.expected_errors.add("/login/mfa")  # the refused codes below answer 422
    page = watch.page
    await login(page)

    await page.get_by_role("link", name=OPERATOR_EMAIL).click()
    await expect(page).to_have_url(re.compile(r"/account$"))
    await assert_accessible(page)
    await page.get_by_role("button", name="Set up two-step sign-in").click()
    await expect(page.get_by_role("img", name=re.compile("QR code"))).to_be_visible()
    await assert_accessible(page)
    await screenshot(page, "mfa-setup-1440", docs="mfa-setup", docs_height=900)
    totp = pyotp.TOTP((await page.locator("#mfa-secret").inner_text()).replace(" ", ""))
    await page.get_by_label("6-digit code from the app").fill(totp.now())
    await page.get_by_role("button", name="Turn on two-step sign-in").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Two-step sign-in is on")
    codes = [c.strip() for c in await page.locator("#recovery-codes li").all_inner_texts()]
    assert len(codes) == 10
    await assert_accessible(page)
    await page.get_by_role("link", name=re.compile("back to my account")).click()
    await expect(page.locator("#codes-left")).to_have_text("10 recovery codes left.")
    await sign_out(page)

    # the password alone is not enough: a wrong code is refused and nothing opens
    await password_step(page)
    await assert_accessible(page)
    await page.get_by_label("Code").fill("000000" if totp.now() != "000000" else "111111")
    await page.get_by_role("button", name="Verify").click()
    await expect(page.get_by_role("alert")).to_contain_text("The code is not right")
    await page.goto("/tenants")
    await expect(page).to_have_url(re.compile(r"/login\?next=%2Ftenants$"))

    # a code of the next step (the enrolment used this one) signs in
    await login(page, totp=totp.at(time.time() + 30))
    await sign_out(page)

    # a recovery code, once
    await password_step(page)
    await page.get_by_label("Code").fill(codes[0])
    await page.get_by_role("button", name="Verify").click()
    await expect(page).to_have_url(re.compile(r"/account\?notice=recovery_code_used"))
    await expect(page.get_by_role("status")).to_contain_text("9 left")
    await sign_out(page)
    await password_step(page)
    await page.get_by_label("Code").fill(codes[0])
    await page.get_by_role("button", name="Verify").click()
    await expect(page.get_by_role("alert")).to_contain_text("used already")
    await expect(page).to_have_url(re.compile(r"/login/mfa$"))
    watch.assert_clean()


async def test_a_disabled_operators_open_session_is_refused_on_its_next_click(open_context, stack):
    runtime = await Runtime.start(stack.settings)
    try:
        await make_user(runtime, "colleague@example.com")
    finally:
        await runtime.stop()
    colleague = await open_context()
    await login(colleague.page, "colleague@example.com")
    operator = await open_context()
    page = operator.page
    await login(page)

    await page.get_by_role("navigation", name="Main").get_by_role("link", name="People").click()
    await expect(page).to_have_url(re.compile(r"/people$"))
    await assert_accessible(page)
    await screenshot(page, "people-1440", docs="people", docs_height=900)
    row = page.get_by_role("row").filter(has_text="colleague@example.com")
    await expect(row.get_by_role("button", name="Disable colleague@example.com")).to_be_hidden()
    await row.get_by_text("Disable…").click()  # the first step only reveals the explanation and the button
    await expect(row).to_contain_text("every open session of theirs ends now")
    await assert_accessible(page)
    await row.get_by_role("button", name="Disable colleague@example.com").click()
    await expect(page.get_by_role("status")).to_have_text("The person is disabled; their sessions have ended.")
    await expect(page.get_by_role("row").filter(has_text="colleague@example.com")).to_contain_text("disabled")
    # the own row offers no way to disable oneself
    await expect(page.get_by_role("row").filter(has_text=OPERATOR_EMAIL).get_by_text("Disable…")).to_have_count(0)

    await page.get_by_role("link", name="Operators").click()
    await expect(page).to_have_url(re.compile(r"/people\?role=operator$"))
    await assert_accessible(page)

    await colleague.page.get_by_role("link", name="API keys").click()
    await expect(colleague.page).to_have_url(re.compile(r"/login\?next="))
    operator.assert_clean()
    colleague.assert_clean()
