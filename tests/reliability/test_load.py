"""A bounded load test (about 60 s on loopback) with Salesmsg misbehaving part of the time.

A real `serve --workers 2` on PostgreSQL (one worker on SQLite) behind an async load generator:
proxied GETs and message sends, each send with its own Idempotency-Key and some keys sent
again (later, or twice at once), while a toggler injects faults at the emulator every few
seconds: 500s and 503s, latency over our timeout, dropped connections, expired tokens.

Asserted: no 5xx but the documented ones of ours (502/503/504 with their codes) and Salesmsg's
own answers relayed as they were; no send lost or doubled (every acknowledged send is in its
thread exactly once, a repeated key never made a second message); memory stable (worker RSS at
the end of the steady phase within +50% of its start). The figures are printed (run with -s)
and written to var/reliability/load.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest

from app.main import create_app
from tests.reliability.support import OUR_5XX, auth, proxy_url, serve_env, serving
from tests.support.emulator_controls import EmulatorControls
from tests.support.journeys import (
    CLIENT_ID,
    CLIENT_SECRET,
    PLAIN_ORG,
    Browser,
    connected_tenant,
    emulator_config,
    make_api_key,
)
from tests.support.processes import ROOT, Served, clean_env
from tests.support.tcp_proxy import free_port

pytestmark = pytest.mark.load

WARM_UP_SECONDS = 6
STEADY_SECONDS = 50
CONCURRENCY = 24
TENANTS = ("load-a", "load-b")
FAULT_PREFIXES = ("/pub/v2.2/conversations", "/pub/v2.2/teams")
REPORT = ROOT / "var" / "reliability" / "load.json"


# -- the world: an emulator process, a served app, tenants connected the real way --------------


@pytest.fixture
def emulator_process(tmp_path):
    """The emulator in its own process, so the load generator does not share its interpreter."""
    config = tmp_path / "emulator.json"
    config.write_text(json.dumps(emulator_config().model_dump(mode="json")))
    port = free_port()
    served = Served("emulator", "--port", str(port), "--config", str(config), env=clean_env(),
                    log_path=tmp_path / "emulator.log")
    try:
        served.wait_for(f"http://127.0.0.1:{port}/_emulator/health", timeout=60)
        with EmulatorControls(f"http://127.0.0.1:{port}") as controls:
            yield f"http://127.0.0.1:{port}", controls
    finally:
        served.stop()


@pytest.fixture
async def load_world(settings, emulator_process):
    """Two tenants connected through the OAuth flow (in this process), keys, the settings."""
    url, controls = emulator_process
    wired = settings.model_copy(update={
        "salesmsg_api_base": url + "/pub/v2.2", "salesmsg_authorize_url": url + "/auth/oauth",
        "salesmsg_client_id": CLIENT_ID, "salesmsg_client_secret": CLIENT_SECRET,
    })
    app = create_app(wired, configure_logs=False)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        browser = Browser(app, url)
        try:
            for slug in TENANTS:
                await connected_tenant(runtime, browser, slug)
        finally:
            await browser.close()
        key = await make_api_key(runtime, tenants=list(TENANTS))
        yield wired, controls, key


# -- measuring --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def server_pids(pid: int) -> list[int]:
    """The processes that serve requests: uvicorn's workers, or the process itself with one."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        if parent == pid and b"resource_tracker" not in cmdline:
            children.append(int(entry.name))
    return sorted(children) or [pid]


@dataclass
class Send:
    key: str
    text: str
    tenant: str
    conversation: int
    answers: list[tuple[int, int | None]] = field(default_factory=list)  # (status, message id)

    @property
    def acknowledged_ids(self) -> set[int]:
        return {mid for status, mid in self.answers if status == 201 and mid is not None}


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)  # "200", "503 ours:refresh_unavailable", "500 salesmsg", ...
    problems: list[str] = field(default_factory=list)
    sends: dict[str, Send] = field(default_factory=dict)
    requests: int = 0
    repeats: int = 0
    doubles: int = 0


def classify(status: int, body: bytes, content_type: str) -> tuple[str, str | None]:
    """("ours", code) for our JSON errors, ("salesmsg", None) for a relayed answer, ("ok", None)."""
    if status < 400:
        return "ok", None
    try:
        parsed = json.loads(body)
    except ValueError:
        return "salesmsg", None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) and "code" in parsed["error"]:
        return "ours", parsed["error"]["code"]
    return "salesmsg", None


class Load:
    def __init__(self, base: str, key: str, conversations: dict[str, list[int]], seed: int) -> None:
        self.base = base
        self.headers = auth(key)
        self.conversations = conversations
        self.random = random.Random(seed)
        self.tally = Tally()
        self.stop = asyncio.Event()

    def record(self, status: int, body: bytes, content_type: str) -> tuple[str, str | None]:
        source, code = classify(status, body, content_type)
        self.tally.requests += 1
        label = str(status) if source == "ok" else f"{status} {source}" + (f":{code}" if code else "")
        self.tally.statuses[label] += 1
        if source == "ours":
            if status >= 500 and code not in OUR_5XX.get(status, set()):
                self.tally.problems.append(f"undocumented {status} {code}: {body[:200]!r}")
            elif 400 <= status < 500 and code != "idempotency_request_in_progress":
                self.tally.problems.append(f"unexpected {status} {code}: {body[:200]!r}")
        elif source == "salesmsg" and status not in (500, 503):  # only these are injected upstream
            self.tally.problems.append(f"unexpected answer from Salesmsg {status}: {body[:200]!r}")
        return source, code

    async def get(self, http: aiohttp.ClientSession) -> None:
        tenant = self.random.choice(TENANTS)
        path = self.random.choice([
            "conversations?limit=10",
            f"conversations/{self.random.choice(self.conversations[tenant])}/messages?limit=10",
            "teams",
        ])
        async with http.get(self.base + proxy_url(tenant, path), headers=self.headers) as resp:
            self.record(resp.status, await resp.read(), resp.headers.get("content-type", ""))

    async def send(self, http: aiohttp.ClientSession, send: Send) -> None:
        url = self.base + proxy_url(send.tenant, f"conversations/{send.conversation}/send")
        async with http.post(url, headers={**self.headers, "Idempotency-Key": send.key}, json={"message": send.text}) as resp:
            body = await resp.read()
            self.record(resp.status, body, resp.headers.get("content-type", ""))
            message_id = json.loads(body).get("id") if resp.status == 201 else None
            send.answers.append((resp.status, message_id))

    def new_send(self) -> Send:
        tenant = self.random.choice(TENANTS)
        key = f"load-{uuid.uuid4().hex}"
        send = Send(key, f"load {key}", tenant, self.random.choice(self.conversations[tenant]))
        self.tally.sends[key] = send
        return send

    async def worker(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            roll = self.random.random()
            try:
                if roll < 0.55:
                    await self.get(http)
                elif roll < 0.85 or not self.tally.sends:
                    await self.send(http, self.new_send())
                elif roll < 0.95:  # the same key again, later: an earlier send picked at random
                    self.tally.repeats += 1
                    await self.send(http, self.tally.sends[self.random.choice(list(self.tally.sends))])
                else:  # the same key twice at once
                    self.tally.doubles += 1
                    send = self.new_send()
                    await asyncio.gather(self.send(http, send), self.send(http, send))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.tally.requests += 1
                self.tally.statuses["no answer"] += 1
                self.tally.problems.append(f"no answer: {exc!r}")


async def toggle_faults(controls: EmulatorControls, stop: asyncio.Event, rng: random.Random, injected: Counter) -> None:
    """Every 2-4 s: one fault for a while, then quiet."""

    async def call(fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    while not stop.is_set():
        kind = rng.choice(["fail500", "fail503", "latency", "drop", "expire", "quiet"])
        prefix = rng.choice(FAULT_PREFIXES)
        if kind == "fail500":
            await call(controls.fail_next, rng.randint(5, 20), status=500, path_prefix=prefix)
        elif kind == "fail503":
            await call(controls.fail_next, rng.randint(5, 20), status=503, path_prefix=prefix,
                       retry_after=rng.choice([None, "0", "1"]))
        elif kind == "latency":
            await call(controls.set_latency, 2500)  # over the 2 s timeout of the served app
        elif kind == "drop":
            await call(controls.drop_next, rng.randint(3, 10), path_prefix=prefix)
        elif kind == "expire":
            await call(controls.expire_tokens, org_id=PLAIN_ORG)  # every token: 401, forced refreshes
        injected[kind] += 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(2, 4))
        except asyncio.TimeoutError:
            pass
        if kind == "latency":
            await call(controls.set_latency, 0)


async def thread_counts(http: httpx.AsyncClient, base: str, key: str, tenant: str, conversations: list[int]) -> Counter:
    """Every message body in the threads, counted (read through the proxy, all pages)."""
    counts: Counter = Counter()
    for conversation in conversations:
        page, last = 1, 1
        while page <= last:
            response = await http.get(base + proxy_url(tenant, f"messages/{conversation}/paginated?page={page}&per_page=100"),
                                      headers=auth(key))
            assert response.status_code == 200, response.text
            data = response.json()
            counts.update(m["body"] for m in data["data"])
            last = data["meta"]["last_page"]
            page += 1
    return counts


async def test_sixty_seconds_of_traffic_with_faults(load_world, on_postgres, tmp_path):
    settings, controls, key = load_world
    workers = 2 if on_postgres else 1
    env = serve_env(settings, SMC_SALESMSG_TIMEOUT_SECONDS="2")
    started = time.monotonic()
    with serving(env, tmp_path, workers=workers, name="load", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            conversations = {}
            for tenant in TENANTS:
                listed = await http.get(app.url(proxy_url(tenant, "conversations?limit=100")), headers=auth(key))
                assert listed.status_code == 200, listed.text
                conversations[tenant] = [c["id"] for c in listed.json()]
        seed = int(os.environ.get("SMC_LOAD_SEED", "20261126"))
        load = Load(app.base, key, conversations, seed)
        injected: Counter = Counter()
        fault_stop = asyncio.Event()
        # idle connections close on our side (3 s) before uvicorn's keep-alive (5 s) closes them
        connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2, keepalive_timeout=3)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            runners = [asyncio.ensure_future(load.worker(session)) for _ in range(CONCURRENCY)]
            try:
                await asyncio.sleep(WARM_UP_SECONDS)  # the load runs meanwhile: warm-up without faults
                pids = server_pids(app.pid)
                rss_start = {pid: rss_kib(pid) for pid in pids}
                requests_at_start = load.tally.requests
                toggler = asyncio.ensure_future(toggle_faults(controls, fault_stop, random.Random(seed), injected))
                await asyncio.sleep(STEADY_SECONDS)  # the steady phase: load with faults
                fault_stop.set()
                await toggler
                rss_end = {pid: rss_kib(pid) for pid in pids}
                steady_requests = load.tally.requests - requests_at_start
            finally:
                load.stop.set()
                fault_stop.set()
                done = await asyncio.gather(*runners, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        emulator_counters = controls.counters()
        controls.reset_faults()
        async with httpx.AsyncClient(timeout=60) as http:
            bodies = await thread_counts(http, app.base, key, TENANTS[0], sorted(set(sum(conversations.values(), []))))
        unhandled = app.log().count('"unhandled error"')
    elapsed = time.monotonic() - started

    tally = load.tally
    acknowledged = {k: s for k, s in tally.sends.items() if s.acknowledged_ids}
    lost = [k for k, s in acknowledged.items() if bodies[s.text] != 1]
    doubled = [k for k, s in tally.sends.items() if bodies[s.text] > 1]
    two_ids = [k for k, s in acknowledged.items() if len(s.acknowledged_ids) > 1]
    sent_unacknowledged = [k for k, s in tally.sends.items() if not s.acknowledged_ids and bodies[s.text] == 1]
    repeated_keys = sum(1 for s in tally.sends.values() if len(s.answers) > 1)
    growth = {pid: rss_end[pid] / rss_start[pid] for pid in rss_start}
    figures = {
        "database": "postgresql" if on_postgres else "sqlite",
        "server_workers": workers,
        "concurrency": CONCURRENCY,
        "seconds": {"warm_up": WARM_UP_SECONDS, "steady": STEADY_SECONDS, "test_total": round(elapsed, 1)},
        "requests": tally.requests,
        "requests_in_steady_phase": steady_requests,
        "requests_per_second_steady": round(steady_requests / STEADY_SECONDS, 1),
        "faults_toggled": dict(injected),
        "faults_at_salesmsg": {k: v for k, v in emulator_counters.items() if k.startswith("fault.")},
        "token_refreshes_at_salesmsg": emulator_counters.get("token.refresh.200", 0),
        "statuses": dict(sorted(tally.statuses.items())),
        "sends": {
            "keys": len(tally.sends), "keys_sent_more_than_once": repeated_keys, "later_repeats": tally.repeats,
            "concurrent_doubles": tally.doubles, "acknowledged": len(acknowledged), "lost": len(lost),
            "duplicated": len(doubled), "acknowledged_with_two_ids": len(two_ids),
            "in_thread_though_unacknowledged": len(sent_unacknowledged),
        },
        "rss_kib": {str(pid): {"start": rss_start[pid], "end": rss_end[pid], "growth": round(growth[pid], 3)} for pid in rss_start},
        "unhandled_errors_logged": unhandled,
        "problems": tally.problems[:20],
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    print("\nload figures:\n" + json.dumps(figures, indent=2))

    assert not tally.problems, tally.problems[:20]
    assert unhandled == 0, "the server logged unhandled errors"
    assert steady_requests > 0 and len(acknowledged) > 0
    assert sum(injected.values()) - injected["quiet"] > 0, "no fault was injected"
    assert not lost, f"acknowledged sends not in their thread exactly once: {lost[:5]}"
    assert not doubled, f"sends in a thread more than once: {doubled[:5]}"
    assert not two_ids, f"one key acknowledged with two message ids: {two_ids[:5]}"
    for pid, ratio in growth.items():
        assert ratio <= 1.5, f"worker {pid} RSS grew {ratio:.2f}x: {rss_start[pid]} -> {rss_end[pid]} KiB"
