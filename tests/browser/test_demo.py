"""`salesmsg-connect demo` on ports of the user's choosing, as a person would run and click it.

The demo runs as its own process in a scratch directory (its fresh SQLite database and
``var/demo.json`` go there, never into the checkout's ``var``).
"""

from __future__ import annotations

import json
import re
import socket

import pytest
from playwright.async_api import Browser, expect

from app.cli.demo import OPERATOR
from tests.browser.pages import Watch, assert_accessible
from tests.support.processes import Served, clean_env, run_cli
from tests.support.tcp_proxy import free_port

pytestmark = pytest.mark.browser


def _two_free_ports() -> tuple[int, int]:
    while True:
        first, second = free_port(), free_port()
        if first != second and 8000 not in (first, second):
            return first, second


async def test_the_demo_runs_on_two_free_ports_and_connects_through_its_own_callback(chromium: Browser, tmp_path):
    port, emulator_port = _two_free_ports()
    with Served("demo", "--port", str(port), "--emulator-port", str(emulator_port), env=clean_env(),
                log_path=tmp_path / "demo.log", cwd=tmp_path) as demo:
        # The demo connects Acme Clinic through the OAuth flow before it writes demo.json: the
        # emulator must have accepted this port's callback for that to happen.
        demo.wait_for(f"http://127.0.0.1:{port}/healthz", timeout=90)
        info_path = tmp_path / "var" / "demo.json"
        demo.wait_until(info_path.exists, what="var/demo.json", timeout=90)
        info = json.loads(info_path.read_text())
        assert info["app"] == f"http://127.0.0.1:{port}"
        assert info["emulator"].endswith(f":{emulator_port}")

        context = await chromium.new_context(base_url=info["app"], viewport={"width": 1440, "height": 900})
        try:
            watch = await Watch.attach(context)
            page = watch.page
            await page.goto("/login")
            await page.get_by_label("Email").fill(OPERATOR[0])
            await page.get_by_label("Password").fill(OPERATOR[1])
            await page.get_by_role("button", name="Sign in").click()
            await expect(page).to_have_url(re.compile(r"/tenants$"))
            acme = page.get_by_role("row").filter(has_text="Acme Clinic")
            await expect(acme).to_contain_text("active")
            await page.goto("/t/acme-clinic/conversations")
            await expect(page.locator("#conversation-list a").first).to_be_visible()
            await assert_accessible(page)
            watch.assert_clean()
        finally:
            await context.close()
        assert "Traceback" not in demo.log()


def test_a_port_in_use_is_one_line_that_names_the_option(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run_cli("demo", "--port", str(free_port()), "--emulator-port", str(busy), env=clean_env(),
                         cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"demo: port {busy} is in use; stop what uses it or pass another --emulator-port"]
    assert not (tmp_path / "var").exists()
