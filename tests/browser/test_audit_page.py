"""The audit page in a real browser: filters, paging links, the export download, one line a row
at 1440 px, and axe-core."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import Page, expect

from tests.browser.pages import OPERATOR_EMAIL, WIDE, assert_accessible, create_tenant, login, screenshot

pytestmark = pytest.mark.browser

# Each row's height against one line of its tallest cell (line height plus the cell's padding and border).
_ROW_LINES = """() => [...document.querySelectorAll("#audit-table tbody tr")].map((tr) => {
  const cells = [...tr.children];
  const one = Math.max(...cells.map((td) => {
    const s = getComputedStyle(td);
    return parseFloat(s.lineHeight) + parseFloat(s.paddingTop) + parseFloat(s.paddingBottom) + parseFloat(s.borderBottomWidth);
  }));
  return {id: tr.id, height: tr.getBoundingClientRect().height, one: one};
})"""


async def rows_of(page: Page) -> list[str]:
    return await page.locator("#audit-table tbody tr[id^=entry-]").evaluate_all("(rows) => rows.map((r) => r.id)")


async def test_the_audit_page_filters_exports_and_keeps_each_row_on_one_line(open_context, stack, tmp_path):
    operator = await open_context(WIDE)
    page = operator.page
    await login(page)
    await create_tenant(page, "Corner Bakery", "corner-bakery", hipaa=False)
    await create_tenant(page, "Acme Clinic", "acme-clinic")
    await page.goto("/api-keys")
    await page.get_by_label("Name").fill("billing-service")
    await page.get_by_role("button", name="Create key").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("API key “billing-service”")

    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit log").click()
    await expect(page).to_have_url(re.compile(r"/audit$"))
    table = page.locator("#audit-table")
    await expect(table).to_contain_text("Tenant created")
    await expect(table).to_contain_text("API key created")
    await expect(table).to_contain_text(OPERATOR_EMAIL)
    await expect(table.locator("tbody")).not_to_contain_text("['")
    await assert_accessible(page)

    # one line a row at 1440 px, long details and all
    lines = await page.evaluate(_ROW_LINES)
    assert lines and all(abs(r["height"] - r["one"]) <= 1.5 for r in lines), lines
    await screenshot(page, "audit-1440", docs="audit", docs_height=900)

    # filter by action and actor and today's period: the tenants this operator created
    today = datetime.now(UTC).date()
    search = page.get_by_role("search", name="Filter the audit log")
    await search.get_by_label("Action starts with").fill("tenant.")
    await search.get_by_label("Actor").fill("operator@")
    await search.get_by_label("From").fill(today.isoformat())
    await search.get_by_label("To (inclusive)").fill(today.isoformat())
    await search.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(r"/audit\?.*action=tenant\.&"))
    await expect(table.locator("tbody tr")).to_have_count(2)
    await expect(table.locator("tbody tr").first).to_contain_text("acme-clinic")
    await expect(search.get_by_label("Actor")).to_have_value("operator@")
    shown = [int(i.removeprefix("entry-")) for i in await rows_of(page)]
    await assert_accessible(page)

    # the export downloads exactly those rows, oldest first, as JSON lines
    async with page.expect_download() as pending:
        await search.get_by_role("button", name="Export").click()
    download = await pending.value
    assert re.fullmatch(r"audit-\d{8}T\d{6}Z\.jsonl", download.suggested_filename)
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    lines_out = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [line["id"] for line in lines_out] == sorted(shown)
    assert {line["action"] for line in lines_out} == {"tenant.create"} and {line["actor_id"] for line in lines_out} == {OPERATOR_EMAIL}

    # the export is in the log itself, once
    await page.goto("/audit?action=audit.")
    await expect(table.locator("tbody tr")).to_have_count(1)
    await expect(table).to_contain_text("Audit log exported")

    # a period with nothing in it
    await page.goto(f"/audit?to={(today - timedelta(days=400)).isoformat()}")
    await expect(table).to_contain_text("No entries match.")
    await assert_accessible(page)
    assert operator.dialogs == []
    operator.assert_clean()
