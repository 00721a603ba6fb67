"""What the browser tests do and check on a page: a Watch per person, the steps of the journey,
layout, keyboard and accessible-name checks, and screenshots."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import (
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    expect,
)

from tests.support.journeys import PASSWORD

OPERATOR_EMAIL = "operator@example.com"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "var" / "screenshots"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
WIDE, NARROW = 1440, 375

# Installed in every page before its own scripts run (through the DevTools protocol, so our CSP
# does not apply to it): report each CSP violation to the test.
_CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.__smcCsp({directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample || "",
                   source: e.sourceFile || "", line: e.lineNumber || 0});
});
"""


@dataclass
class Watch:
    """One person's browser context and page, and everything the browser complained about."""

    context: BrowserContext
    page: Page = None  # type: ignore[assignment]
    console: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    expected_errors: set[str] = field(default_factory=set)  # paths a test opens knowing they answer 4xx

    @classmethod
    async def attach(cls, context: BrowserContext) -> "Watch":
        watch = cls(context)
        await context.expose_binding(
            "__smcCsp", lambda source, v: watch.csp.append(f"{source['page'].url}: {v['directive']} blocked {v['blocked']!r} {v['sample']!r}")
        )
        await context.add_init_script(_CSP_LISTENER)
        context.on("console", watch._on_console)
        context.on("weberror", lambda e: watch.errors.append(f"{e.page.url if e.page else '?'}: {e.error}"))
        context.on("dialog", watch._on_dialog)
        watch.page = await context.new_page()
        return watch

    def _on_console(self, message: ConsoleMessage) -> None:
        where = message.location.get("url", "") if message.location else ""
        if urlsplit(where).path == "/favicon.ico":
            return  # Chromium asks every origin for one; the app has none (a 404, not a page defect)
        if message.text.startswith("Failed to load resource") and urlsplit(where).path in self.expected_errors:
            return
        if message.type in ("error", "warning") or "Content Security Policy" in message.text:
            self.console.append(f"{message.type}: {message.text} ({where})")

    async def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.accept()  # confirm() says yes; a stray alert() is recorded, then closed

    def assert_clean(self) -> None:
        assert self.csp == [], f"CSP violations: {self.csp}"
        assert [c for c in self.console if "Content Security Policy" in c] == [], self.console
        assert self.console == [], f"console errors or warnings: {self.console}"
        assert self.errors == [], f"uncaught page errors: {self.errors}"
        assert self.dialogs == [], f"a page opened a dialog (confirmations are in the page): {self.dialogs}"


# ---- the steps ----------------------------------------------------------------------------


async def login(page: Page, email: str = OPERATOR_EMAIL, password: str = PASSWORD, *, totp: str | None = None) -> None:
    """Sign in; with ``totp`` (a code or a recovery code), also the second step that MFA asks for."""
    await page.goto("/login")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    if totp is not None:
        await expect(page).to_have_url(re.compile(r"/login/mfa$"))
        await page.get_by_label("Code").fill(totp)
        await page.get_by_role("button", name="Verify").click()
    await expect(page).to_have_url(re.compile(r"/tenants$"))


async def create_tenant(page: Page, name: str, slug: str, *, hipaa: bool = True) -> None:
    await page.goto("/tenants")
    form = page.locator("#new-tenant")
    await form.get_by_label("Organization name").fill(name)
    await form.get_by_label("Slug").fill(slug)
    if not hipaa:
        await form.get_by_label("HIPAA").select_option("off")
    await form.get_by_role("button", name="Create tenant").click()
    await expect(page).to_have_url(re.compile(rf"/t/{slug}\?notice=created$"))
    await expect(page.get_by_role("status")).to_have_text("Tenant created.")


class ScopeBox(Locator):
    """A scope's checkbox on the consent form; ticking it (``check``, ``uncheck``, ``set_checked``,
    ``click``) first opens the folded group holding it, as a person would. Everything else is the
    plain Locator, so ``expect(...)`` reads its state even while its group is closed."""

    async def open_group(self) -> None:
        group = self.locator("xpath=ancestor::details[1]")
        if await group.count() and not await group.evaluate("(details) => details.open"):
            await group.locator("summary").click()
            await expect(group).to_have_attribute("open", "")

    async def check(self, **kwargs) -> None:  # type: ignore[override]
        await self.open_group()
        await super().check(**kwargs)

    async def uncheck(self, **kwargs) -> None:  # type: ignore[override]
        await self.open_group()
        await super().uncheck(**kwargs)

    async def set_checked(self, checked: bool, **kwargs) -> None:  # type: ignore[override]
        await self.open_group()
        await super().set_checked(checked, **kwargs)

    async def click(self, **kwargs) -> None:  # type: ignore[override]
        await self.open_group()
        await super().click(**kwargs)


def scope_box(page: Page, scope: str) -> ScopeBox:
    """The checkbox of one scope on the consent form (the PAT form below has its own), found by its
    value: its accessible name is the plain words, then the scope code. The minimum's boxes are in
    view; the others sit in a folded group per resource, which ``ScopeBox.check`` opens."""
    box = page.locator("#consent-form").locator(f'input[type=checkbox][name=scope][value="{scope}"]')
    return ScopeBox(box._impl_obj)


async def approve_at_salesmsg(page: Page, user_id: int) -> None:
    """The emulator's sign-in and approve page: choose the user, press Approve."""
    await expect(page).to_have_url(re.compile(r"/auth/oauth\?"))
    await page.get_by_label("Sign in as").select_option(str(user_id))
    await page.get_by_role("button", name="Approve").click()


async def connect(page: Page, slug: str, user_id: int, scopes: list[str] = ()) -> None:
    """From the consent page (with the defaults, plus ``scopes``) to our "connected" page."""
    await page.goto(f"/t/{slug}/connect")
    for scope in scopes:
        await scope_box(page, scope).check()  # opens the scope's folded group first
    await page.get_by_role("button", name="Continue to Salesmsg").click()
    await approve_at_salesmsg(page, user_id)
    await expect(page).to_have_url(re.compile(rf"/t/{slug}/connected$"))
    await expect(page.get_by_role("heading", level=1)).to_contain_text("is connected")


async def first_conversation(page: Page, slug: str) -> int:
    """Open the tenant's conversations, then the first one; returns its id."""
    await page.goto(f"/t/{slug}/conversations")
    await page.locator("#conversation-list a").first.click()
    await expect(page).to_have_url(re.compile(rf"/t/{slug}/conversations/\d+$"))
    return int(urlsplit(page.url).path.rsplit("/", 1)[1])


# ---- checks -------------------------------------------------------------------------------


_OVERFLOW = """() => {
  const width = window.innerWidth, scrolling = document.scrollingElement;
  if (scrolling.scrollWidth <= width) return [];
  const culprits = [];
  for (const el of document.body.querySelectorAll("*")) {
    const box = el.getBoundingClientRect();
    if (box.width > 0 && box.right > width + 0.5) {
      culprits.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
        (el.className && typeof el.className === "string" ? "." + el.className.trim().replace(/\\s+/g, ".") : "") +
        " right=" + Math.round(box.right));
    }
  }
  return ["scrollWidth " + scrolling.scrollWidth + " > " + width, ...culprits.slice(0, 8)];
}"""


async def horizontal_overflow(page: Page) -> list[str]:
    """Empty when the page fits its viewport's width; otherwise what sticks out."""
    return await page.evaluate(_OVERFLOW)


# Controls whose role needs a name; a line of the ARIA snapshot without a quoted name has none.
_NAMED_ROLES = ("textbox", "searchbox", "checkbox", "radio", "combobox", "listbox", "spinbutton", "button", "link", "slider", "switch")
_UNNAMED = re.compile(rf"^\s*- ({'|'.join(_NAMED_ROLES)})(\s*\[[^\]]*\])*\s*:?\s*$")


async def unnamed_controls(page: Page) -> list[str]:
    """Controls the accessibility tree shows without an accessible name (Playwright's accname)."""
    snapshot = await page.locator("body").aria_snapshot()
    return [line.strip() for line in snapshot.splitlines() if _UNNAMED.match(line)]


_FORM_CONTROLS_WITHOUT_LABEL = """() => [...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
  .map((el) => el.outerHTML.slice(0, 120))"""


async def form_controls_without_label(page: Page) -> list[str]:
    """Every input, select and textarea (shown or not, e.g. in a closed <details>) has a label."""
    return await page.evaluate(_FORM_CONTROLS_WITHOUT_LABEL)


async def is_focused(locator: Locator) -> bool:
    return await locator.evaluate("(el) => el === document.activeElement")


async def tab_to(page: Page, locator: Locator, *, limit: int = 80) -> int:
    """Press Tab until ``locator`` has the focus; returns how many presses that took."""
    for presses in range(1, limit + 1):
        await page.keyboard.press("Tab")
        if await is_focused(locator):
            return presses
    raise AssertionError(f"{locator} was not reached with {limit} presses of Tab")


async def focus_ring(locator: Locator) -> str:
    """The focused element's visible focus indicator (box-shadow or outline), or '' when there is none."""
    return await locator.evaluate("""(el) => {
      const s = getComputedStyle(el);
      if (s.boxShadow && s.boxShadow !== "none") return "box-shadow " + s.boxShadow;
      if (s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0) return "outline " + s.outlineStyle;
      return "";
    }""")


AXE_SOURCE = ROOT / "tests" / "browser" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
_AXE_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.filter((v) => v.impact === "serious" || v.impact === "critical").map((v) =>
    v.id + " (" + v.impact + "): " + v.help + " -> " + v.nodes.slice(0, 4).map((n) => n.target.join(" ")).join(" | "));
}"""


async def accessibility_violations(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now (WCAG 2.x A and AA rules
    and axe's best practices). The script goes in through the DevTools protocol, so the page's CSP
    does not apply to it and no page needs to allow it."""
    if not AXE_SOURCE.exists():
        raise AssertionError(f"{AXE_SOURCE} is missing: run ./scripts/ensure-chromium.sh (make test does)")
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE_SOURCE.read_text())
    return await page.evaluate(_AXE_RUN)


async def assert_accessible(page: Page) -> None:
    violations = await accessibility_violations(page)
    assert violations == [], f"axe-core on {page.url}: {violations}"


# ---- screenshots --------------------------------------------------------------------------


async def screenshot(page: Page, name: str, *, docs: str | None = None, docs_height: int = 1600) -> Path:
    """The whole page into var/screenshots/<name>.png (every run). With UPDATE_SCREENSHOTS=1 and
    ``docs``, also the top of the page (at most ``docs_height`` px) into docs/screenshots/<docs>.png,
    which is committed and shown by the README; otherwise docs/ is left alone."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=path, full_page=True, animations="disabled", caret="hide")
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        size = await page.evaluate("() => [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], docs_height)}
        await page.screenshot(path=DOCS_SCREENSHOTS / f"{docs}.png", full_page=True, clip=clip, animations="disabled", caret="hide")
    return path
