"""`make demo`: the app, the Salesmsg emulator and the worker, seeded and ready to click through.

A fresh SQLite database under ./var each run; an operator, an org admin, three tenants (HIPAA
with a BAA, HIPAA without, not HIPAA), a demo API key, and one tenant connected through the
real OAuth flow against the emulator (a scripted browser: sign in, consent, approve, callback;
no token is written directly). Prints the URLs, logins and a curl through the proxy, and writes
the same to var/demo.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import typer
import uvicorn

from app.audit.audit_log import Actor
from app.core.http_server import uvicorn_options
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.identity import api_keys, people
from app.runtime import Runtime
from app.tenants import baa, registry
from salesmsg_emulator.config import default_config
from salesmsg_emulator.server import EmulatorServer

VAR = Path("var")
DATABASE = VAR / "demo.db"
OPERATOR = ("operator@demo.example", "connect-demo-2026")
ORG_ADMIN = ("admin@corner-bakery.example", "bakery-demo-2026")
# (slug, name, hipaa, baa signed, emulator user who approves when connected)
TENANTS = [
    ("acme-clinic", "Acme Clinic", True, True, 101),
    ("bright-dental", "Bright Dental", True, False, 201),
    ("corner-bakery", "Corner Bakery", False, False, 301),
]
CONNECTED = "acme-clinic"
SCOPES = [
    "conversations:read", "conversations:write", "messages:read", "messages:write", "contacts:read",
    "teams:read", "users:read", "organizations:read",
]
ACTOR = Actor("cli", "demo")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def demo_settings(port: int, emulator: EmulatorServer) -> Settings:
    return Settings(
        _env_file=None,
        env="development",
        database_url=f"sqlite+aiosqlite:///{DATABASE}",
        public_url=f"http://127.0.0.1:{port}",
        salesmsg_api_base=emulator.api_base,
        salesmsg_authorize_url=emulator.authorize_url,
        # The emulator's "baa-client" has a BAA on file at Salesmsg, so PHI scopes can be granted
        # once an operator records the tenant's BAA here too.
        salesmsg_client_id="baa-client",
        salesmsg_client_secret="baa-secret",
        run_worker=True,
        worker_interval_seconds=15,
        log_level=os.environ.get("SMC_LOG_LEVEL", "INFO"),
    )


async def seed(settings: Settings) -> str:
    """People, tenants, BAA state and the demo API key; returns the key (shown once)."""
    runtime = await Runtime.start(settings)
    try:
        async with runtime.db.session() as session:
            await people.create_user(session, email=OPERATOR[0], password=OPERATOR[1], role="operator", name="Demo Operator", actor=ACTOR)
            made = {}
            for slug, name, hipaa, signed, _ in TENANTS:
                made[slug] = await registry.create_tenant(session, keyring=runtime.keyring, slug=slug, name=name, hipaa=hipaa, actor=ACTOR)
                if signed:
                    await baa.sign(session, made[slug], reference="BAA-DEMO-0001", note="demo", signed_by=OPERATOR[0], actor=ACTOR)
            await people.create_user(session, email=ORG_ADMIN[0], password=ORG_ADMIN[1], role="org_admin",
                                     tenant=made["corner-bakery"], name="Bakery Admin", actor=ACTOR)
            _, key = await api_keys.create_api_key(session, name="demo", tenant_refs=None, actor=ACTOR)
        return key
    finally:
        await runtime.stop()


def _form_field(name: str, html: str, page: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    if found is None:
        raise RuntimeError(f"the {page} page carries no {name}")
    return found.group(1)


def connect_through_oauth(app_url: str, slug: str, user_id: int) -> None:
    """What a person does in the browser: sign in, tick scopes, approve at Salesmsg, come back."""
    with httpx.Client(base_url=app_url, timeout=20) as app, httpx.Client(timeout=20) as salesmsg:
        page = app.get("/login")
        app.post("/login", data={"csrf_token": _form_field("csrf_token", page.text, "sign-in"), "email": OPERATOR[0], "password": OPERATOR[1]})
        consent = app.get(f"/t/{slug}/connect")
        started = app.post(f"/t/{slug}/connect", data={"csrf_token": _form_field("csrf_token", consent.text, "consent"), "scope": SCOPES})
        if started.status_code != 303:
            raise RuntimeError(f"consent refused: {started.status_code}")
        approve_page = salesmsg.get(started.headers["location"])
        request_id = _form_field("request_id", approve_page.text, "Salesmsg approve")
        decision_url = started.headers["location"].split("/auth/oauth")[0] + "/auth/oauth/decision"
        decided = salesmsg.post(decision_url, data={"request_id": request_id, "user_id": str(user_id), "decision": "approve"})
        callback = httpx.URL(decided.headers["location"])
        done = app.get(callback.raw_path.decode())
        if done.status_code != 303 or "/connected" not in done.headers.get("location", ""):
            raise RuntimeError(f"the callback did not connect: {done.status_code}")


def _serve_in_thread(settings: Settings, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    from app.main import create_app

    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, loop="uvloop", **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="app")
    thread.start()
    return server, thread


def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def summary(app_url: str, emulator: EmulatorServer, key: str) -> dict[str, Any]:
    return {
        "app": app_url,
        "emulator": emulator.url,
        "logins": {
            "operator": {"email": OPERATOR[0], "password": OPERATOR[1]},
            "org_admin": {"email": ORG_ADMIN[0], "password": ORG_ADMIN[1], "tenant": "corner-bakery"},
        },
        "tenants": [
            {"slug": slug, "name": name, "hipaa": hipaa, "baa_signed": signed, "connected": slug == CONNECTED}
            for slug, name, hipaa, signed, _ in TENANTS
        ],
        "api_key": key,
        "curl": f"curl -s -H 'Authorization: Bearer {key}' '{app_url}/api/v1/tenants/{CONNECTED}/proxy/conversations?filter=open&limit=5'",
        "emulator_approve_users": {slug: user for slug, _, _, _, user in TENANTS},
    }


class DemoFailed(Exception):
    """The demo cannot start; the message says why in one line."""


def run_demo(*, port: int = 8000, emulator_port: int = 8100) -> None:
    """Start everything and serve until Ctrl-C; a failure to start is one line on stderr, exit 1."""
    try:
        _run_demo(port=port, emulator_port=emulator_port)
    except DemoFailed as exc:
        typer.echo(f"demo: {exc}", err=True)
        raise typer.Exit(1) from None


def _run_demo(*, port: int, emulator_port: int) -> None:
    if port == emulator_port:
        raise DemoFailed(f"--port and --emulator-port are both {port}; give them different ports")
    for needed, option in ((port, "--port"), (emulator_port, "--emulator-port")):
        if not _port_free(needed):
            raise DemoFailed(f"port {needed} is in use; stop what uses it or pass another {option}")
    VAR.mkdir(exist_ok=True)
    for leftover in VAR.glob("demo.db*"):
        leftover.unlink()
    from app.core.logs import configure_logging

    configure_logging(level=os.environ.get("SMC_LOG_LEVEL", "INFO"))
    # Salesmsg's budget as it counts it (60 a minute per org; ours keeps under it), and this demo's
    # own callback registered with the emulator's OAuth clients.
    config = default_config(app_port=port)
    try:
        emulator = EmulatorServer(config, port=emulator_port).start()
    except (OSError, RuntimeError) as exc:
        raise DemoFailed(f"the Salesmsg emulator could not start on port {emulator_port}: {exc}") from exc
    settings = demo_settings(port, emulator)
    upgrade(settings.database_url)
    key = asyncio.run(seed(settings))
    server, thread = _serve_in_thread(settings, port)
    app_url = settings.public_url
    try:
        try:
            _wait(app_url + "/healthz")
            connect_through_oauth(app_url, CONNECTED, user_id=101)
        except (RuntimeError, httpx.HTTPError) as exc:
            raise DemoFailed(f"the demo could not connect {CONNECTED} through the emulator: {exc}") from exc
        info = summary(app_url, emulator, key)
        (VAR / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
        typer.echo(_banner(info))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set() and thread.is_alive():
            stop.wait(0.5)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        emulator.stop()


def _banner(info: dict[str, Any]) -> str:
    ops, admin = info["logins"]["operator"], info["logins"]["org_admin"]
    lines = [
        "",
        "Salesmsg Connect demo is running.",
        f"  Dashboard        {info['app']}/",
        f"  Operator         {ops['email']} / {ops['password']}",
        f"  Org admin        {admin['email']} / {admin['password']}  (Corner Bakery)",
        f"  Salesmsg (emu)   {info['emulator']}  (approve as any user of the org; Acme Clinic is connected)",
        f"  API docs         {info['app']}/docs",
        f"  Demo API key     {info['api_key']}",
        "  Try the proxy:",
        f"    {info['curl']}",
        "  The same as JSON: var/demo.json.  Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)
