"""The operator's tenants list: the filter form as a browser submits it, and paging through it."""

from __future__ import annotations

import re

from tests.support.journeys import make_tenant, make_user


def slugs_on(html: str) -> list[str]:
    return re.findall(r'href="/t/([a-z0-9-]+)"', html)


def next_link(html: str) -> str | None:
    found = re.search(r'<a href="(/tenants\?[^"]+)" rel="next">', html)
    return found.group(1).replace("&amp;", "&") if found else None


async def test_operator_pages_through_every_tenant_with_the_form_as_submitted(runtime, browser):
    await make_user(runtime, "op@example.com")
    created = {f"shop-{n:02d}" for n in range(30)}
    for slug in sorted(created):
        await make_tenant(runtime, slug, hipaa=False)
    await browser.login("op@example.com")

    # "Any" connection status submits status= (empty), as the browser sends the form
    page = await browser.get("/tenants?q=&status=")
    assert page.status_code == 200, page.text[:300]
    seen = slugs_on(page.text)
    link = next_link(page.text)
    assert link is not None and len(seen) < len(created)
    pages = 1
    while link is not None:
        page = await browser.get(link)
        assert page.status_code == 200, (link, page.text[:300])
        seen += slugs_on(page.text)
        link = next_link(page.text)
        pages += 1
    assert pages >= 2
    assert sorted(seen) == sorted(created)  # every tenant once, none twice


async def test_search_and_status_filters_narrow_the_list(runtime, browser):
    await make_user(runtime, "op@example.com")
    await make_tenant(runtime, "alpha-dental", hipaa=True)
    await make_tenant(runtime, "beta-bakery", hipaa=False)
    await browser.login("op@example.com")

    found = await browser.get("/tenants?q=dental&status=")
    assert found.status_code == 200 and slugs_on(found.text) == ["alpha-dental"]
    none_active = await browser.get("/tenants?q=&status=active")
    assert none_active.status_code == 200 and slugs_on(none_active.text) == []
    not_connected = await browser.get("/tenants?status=not_connected")
    assert sorted(slugs_on(not_connected.text)) == ["alpha-dental", "beta-bakery"]
    refused = await browser.get("/tenants?status=deleted")
    assert refused.status_code == 422 and "Traceback" not in refused.text
