"""``make bench`` / ``python -m bench``: every benchmark in one go on loopback, one table, one JSON.

Settings (environment):
  BENCH_SECONDS=10        duration of each load run
  BENCH_ROUNDS=2          rounds of the side-by-side runs (order rotated each round; medians reported)
  BENCH_CONNECTIONS=32    wrk connections (BENCH_THREADS=2 threads)
  BENCH_WORKERS=2         worker processes of the app, the bare passthrough and nginx
  BENCH_TENANTS=10000     tenants of the scale test
  BENCH_STAMPEDE=200      concurrent calls of the refresh stampede (on BENCH_STAMPEDE_WORKERS=4 workers)
  BENCH_ONLY=...          comma-separated subset of: overhead,fast,profile,vault,stampede,scale
  BENCH_DATABASE_URL      PostgreSQL server (default $SMC_TEST_DATABASE_URL or postgresql://root@127.0.0.1:5432/test);
                          the bench creates its own database there and drops it at the end
  BENCH_OUT=var/bench     where the JSON goes (latest.json and a timestamped copy)
  BENCH_BUDGET=1000000000 the app's SMC_UPSTREAM_BUDGET_PER_MINUTE (0: the budget off)
  BENCH_APP_TREE=DIR      serve a modified copy of app/ (DIR/app) instead of this checkout's
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import traceback
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import httpx

from bench import nginx, profile
from bench.load import LoadResult, Wrk, median, percentile
from bench.procs import (
    Proc,
    Registry,
    connections_per_process,
    cpu_seconds_of_group,
    cpu_seconds_of_pids,
    free_port,
    install_signal_handlers,
    log,
)
from bench.world import HOT_SLUG, ROOT, World

PATH = "conversations?filter=open&limit=20"
GOALS = {
    "proxy_vs_direct": 0.7,
    "proxy_vs_nginx": 0.7,
    "proxy_vs_bare": 0.8,
    "added_p50_ms_at_half_load": 1.0,
    "stampede_refreshes": 1,
    "random_vs_hot": 0.9,
    "tenants_page_p99_ms": 100.0,
    "tenants_api_p99_ms": 100.0,
    "fast_proxy_cpu_vs_bare": 2.0,
    "fast_added_p50_ms_unloaded": 1.0,
}


@dataclass
class Config:
    seconds: float
    rounds: int
    connections: int
    threads: int
    workers: int
    tenants: int
    stampede: int
    stampede_workers: int
    only: set[str]
    server_url: str
    out: Path
    app_tree: Path | None

    @classmethod
    def from_env(cls) -> "Config":
        env = os.environ.get
        only = {s.strip() for s in env("BENCH_ONLY", "").split(",") if s.strip()}
        known = {"overhead", "fast", "profile", "vault", "stampede", "scale"}
        if only - known:
            raise SystemExit(f"bench: BENCH_ONLY takes {','.join(sorted(known))}, not {','.join(sorted(only - known))}")
        server = env("BENCH_DATABASE_URL") or env("SMC_TEST_DATABASE_URL") or "postgresql://root@127.0.0.1:5432/test"
        return cls(
            seconds=float(env("BENCH_SECONDS", "10")),
            rounds=max(1, int(env("BENCH_ROUNDS", "2"))),
            connections=int(env("BENCH_CONNECTIONS", "32")),
            threads=int(env("BENCH_THREADS", "2")),
            workers=int(env("BENCH_WORKERS", "2")),
            tenants=int(env("BENCH_TENANTS", "10000")),
            stampede=int(env("BENCH_STAMPEDE", "200")),
            stampede_workers=int(env("BENCH_STAMPEDE_WORKERS", "4")),
            only=only or known,
            server_url=server,
            out=Path(env("BENCH_OUT", str(ROOT / "var" / "bench"))),
            app_tree=Path(env("BENCH_APP_TREE")).resolve() if env("BENCH_APP_TREE") else None,
        )


# -- tools and machine ----------------------------------------------------------------------------


def ensure_tools() -> dict[str, str]:
    """wrk and nginx from Debian's packages when missing (root and apt-get), never starting a service."""
    binaries = {"wrk": shutil.which("wrk"), "nginx": shutil.which("nginx") or _exists("/usr/sbin/nginx")}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit(f"bench: {' and '.join(missing)} missing; install them (Debian: apt-get install -y {' '.join(missing)})")
        log(f"installing {' '.join(missing)} with apt-get")
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = not policy.exists()
        if made_policy:  # do not let the package start a system nginx on port 80
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            argv = ["apt-get", "install", "-y", "-q", *missing]
            if subprocess.run(argv, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
                done = subprocess.run(argv, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"bench: apt-get install {' '.join(missing)} failed:\n{done.stderr[-2000:]}")
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)
        binaries = {"wrk": shutil.which("wrk"), "nginx": shutil.which("nginx") or _exists("/usr/sbin/nginx")}
    if not all(binaries.values()):
        raise SystemExit(f"bench: still missing after install: {binaries}")
    return binaries  # type: ignore[return-value]


def _exists(path: str) -> str | None:
    return path if Path(path).exists() else None


def machine_info(binaries: dict[str, str]) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        memory = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for package in ("uvicorn", "uvloop", "httptools", "aiohttp", "SQLAlchemy", "asyncpg", "fastapi", "starlette", "limits",
                    "structlog", "prometheus_client", "cryptography", "py-spy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    wrk_version = subprocess.run([binaries["wrk"], "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    nginx_version = subprocess.run([binaries["nginx"], "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "wrk": wrk_version[0].split(" Copyright")[0] if wrk_version else None,
        "nginx": nginx_version,
        "packages": versions,
    }


# -- 1. proxy overhead ----------------------------------------------------------------------------

Targets = dict[str, tuple[str, dict[str, str]]]  # name -> (url, headers)


def _start_nginx_proxy(world: World, cfg: Config, binaries: dict[str, str], *, name: str, upstream_port: int) -> tuple[Proc, int]:
    """The reverse-proxy nginx of bench/nginx.py in front of ``upstream_port``; its own folder ``tmp/name``."""
    root = world.tmp / name
    port = free_port()
    conf = nginx.write_config(root, port=port, upstream_port=upstream_port, token=world.hot_token, workers=cfg.workers)
    argv = nginx.argv(conf, root)
    argv[0] = binaries["nginx"]
    return world.registry.start(name, argv, env=dict(os.environ), cwd=world.tmp, log_dir=world.tmp), port


def _start_bare(world: World, cfg: Config, *, name: str, upstream: str) -> tuple[Proc, int]:
    """bench/passthrough.py (uvicorn, uvloop, httptools) in front of ``upstream`` (an API base URL)."""
    port = free_port()
    env = {**world.app_env(), "BENCH_UPSTREAM": upstream, "BENCH_TOKEN": world.hot_token, "PYTHONPATH": str(ROOT)}
    proc = world.registry.start(
        name, [sys.executable, "-m", "uvicorn", "bench.passthrough:app", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(cfg.workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
               "--log-level", "warning", "--lifespan", "on"],
        env=env, cwd=ROOT, log_dir=world.tmp,
    )
    return proc, port


def _answers(targets: Targets) -> dict[str, dict]:
    """One GET per target: each must answer 200 with a JSON list. Sizes (bytes, items) per target."""
    sizes = {}
    for name, (url, headers) in targets.items():
        answer = httpx.get(url, headers=headers, timeout=10, trust_env=False)
        if answer.status_code != 200 or not isinstance(answer.json(), list):
            raise RuntimeError(f"{name}: {answer.status_code} {answer.text[:300]}")
        sizes[name] = {"bytes": len(answer.content), "items": len(answer.json()),
                       "content_type": answer.headers.get("content-type")}
    return sizes


def _warm_up(wrk: Wrk, targets: Targets) -> None:
    for name, (url, headers) in targets.items():
        log(f"warm-up {name}")
        wrk.run(url, headers=headers, seconds=2)


def _rounds(cfg: Config, names: list[str], measure: Callable[[str], LoadResult],
            describe: Callable[[int, str, LoadResult], str]) -> dict[str, list[LoadResult]]:
    """Every target once per round, side by side, the order rotated by one each round (medians over
    rounds later). ``measure(name)`` runs one load run; ``describe(round_no, name, result)`` is logged."""
    runs: dict[str, list[LoadResult]] = {name: [] for name in names}
    for round_no in range(cfg.rounds):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            result = measure(name)
            runs[name].append(result)
            log(describe(round_no, name, result))
    return runs


def _max_rounds(wrk: Wrk, cfg: Config, targets: Targets, meter: Callable[[str], "CpuMeter"]) -> dict[str, list[LoadResult]]:
    """Closed-loop maximum throughput (wrk -tT -cC), every target per round, rotated."""
    def measure(name: str) -> LoadResult:
        url, headers = targets[name]
        return meter(name).run(lambda: wrk.run(url, headers=headers))

    return _rounds(cfg, list(targets), measure, lambda round_no, name, result: (
        f"round {round_no + 1}/{cfg.rounds} {name:8}: {result.rps:8.0f} req/s  p50 {result.p50_ms:.2f} ms  "
        f"p99 {result.p99_ms:.2f} ms  non-2xx {result.non_2xx} errors {result.socket_errors}"))


def _unloaded(wrk: Wrk, cfg: Config, targets: Targets, meter: Callable[[str], "CpuMeter"]) -> dict[str, LoadResult]:
    """One connection, one request at a time: the latency of each hop without queueing."""
    found: dict[str, LoadResult] = {}
    for name, (url, headers) in targets.items():
        found[name] = meter(name).run(lambda: wrk.run(url, headers=headers, connections=1, threads=1,
                                                      seconds=max(3, cfg.seconds / 2)))
        log(f"unloaded {name:8}: {found[name].rps:.0f} req/s  p50 {found[name].p50_ms:.3f} ms")
    return found


def _unloaded_method(cfg: Config) -> str:
    return f"wrk -t1 -c1 -d{max(3, cfg.seconds / 2):g}s: one request at a time, no queueing"


def overhead(world: World, wrk: Wrk, cfg: Config, binaries: dict[str, str], results: dict) -> None:
    registry = world.registry
    nginx_root = world.tmp / "nginx"
    nginx_proc, nginx_port = _start_nginx_proxy(world, cfg, binaries, name="nginx", upstream_port=world.emulator_port)
    bare, bare_port = _start_bare(world, cfg, name="bare", upstream=world.api_base)
    log(f"started nginx on :{nginx_port} and the bare passthrough on :{bare_port} ({cfg.workers} workers each)")
    targets: Targets = {
        "direct": (f"{world.api_base}/{PATH}", {"Authorization": f"Bearer {world.hot_token}"}),
        "proxy": (f"{world.app_url}/api/v1/tenants/{HOT_SLUG}/proxy/{PATH}", {"Authorization": f"Bearer {world.api_key}"}),
        "nginx": (f"http://127.0.0.1:{nginx_port}/proxy/{PATH}", {}),
        "bare": (f"http://127.0.0.1:{bare_port}/proxy/{PATH}", {}),
    }
    try:
        nginx_proc.wait_http(targets["nginx"][0], timeout=30)
        bare.wait_http(targets["bare"][0], timeout=60)
        sizes = _answers(targets)
        log(f"all four answer 200 with {sizes['direct']['items']} items ({sizes['direct']['bytes']} bytes)")
        _warm_up(wrk, targets)
        assert world.emulator is not None and world.app is not None
        groups = {"direct": None, "proxy": world.app.pid, "nginx": nginx_proc.pid, "bare": bare.pid}

        def meter(name: str) -> CpuMeter:
            chosen = {"emulator": world.emulator.pid}
            if groups[name] is not None:
                chosen["target"] = groups[name]
            return CpuMeter(world, chosen)

        names = list(targets)
        runs = _max_rounds(wrk, cfg, targets, meter)
        summary = {name: _summary(rs) for name, rs in runs.items()}
        proxy_rps = summary["proxy"]["rps"]
        ratios = {f"proxy_vs_{n}": round(proxy_rps / summary[n]["rps"], 3) for n in ("direct", "nginx", "bare")}
        paired = {f"proxy_vs_{n}": [round(p.rps / o.rps, 3) for p, o in zip(runs["proxy"], runs[n], strict=False)]
                  for n in ("direct", "nginx", "bare")}
        unloaded = _unloaded(wrk, cfg, targets, meter)
        # Added latency at half of the proxy's maximum: the same fixed arrival rate against the
        # emulator and through the proxy.
        rate = max(10, round(proxy_rps / 2))
        per_thread = rate / cfg.threads

        def paced_run(name: str) -> LoadResult:
            url, headers = targets[name]
            return meter(name).run(lambda: wrk.run(url, headers=headers, script="paced", args=[f"{per_thread:.3f}"]))

        paced = _rounds(cfg, names, paced_run, lambda _round, name, result: (
            f"paced {rate} req/s {name:6}: got {result.rps:.0f} req/s  p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.2f} ms"))
        paced_summary = {name: _summary(rs) for name, rs in paced.items()}
        added = round(paced_summary["proxy"]["p50_ms"] - paced_summary["direct"]["p50_ms"], 3)
        added_by = {name: round(paced_summary[name]["p50_ms"] - paced_summary["direct"]["p50_ms"], 3)
                    for name in ("proxy", "nginx", "bare")}
        results["overhead"] = {
            "request": f"GET /{PATH}",
            "response": {k: sizes["direct"][k] for k in ("bytes", "items")},
            "load": f"wrk -t{cfg.threads} -c{cfg.connections} -d{cfg.seconds:g}s, {cfg.rounds} round(s), order rotated; medians",
            "targets": summary,
            "ratios": ratios,
            "ratios_per_round": paired,
            "half_load": {
                "method": (f"wrk with a Lua pacing script: a fixed arrival rate of {rate} req/s (half the proxy's median max), "
                           f"{cfg.connections} connections, the same rate against each target; added p50 = p50(target) - "
                           "p50(direct), medians over rounds"),
                "rate": rate,
                "targets": paced_summary,
                "added_p50_ms": added,
                "added_p50_ms_by_target": added_by,
            },
            "unloaded": {
                "method": _unloaded_method(cfg),
                "targets": {name: _summary([r]) for name, r in unloaded.items()},
                "added_p50_ms_by_target": {name: round(unloaded[name].p50_ms - unloaded["direct"].p50_ms, 3)
                                           for name in ("proxy", "nginx", "bare")},
            },
        }
    finally:
        registry.stop(nginx_proc)
        registry.stop(bare)
        if Path(nginx_root / "nginx.pid").exists():
            log("warning: nginx left its pid file behind")


# -- 1b. the proxy hop against a fast upstream ----------------------------------------------------

FAST_PATH = "/pub/v2.2/conversations"


def fast(world: World, wrk: Wrk, cfg: Config, binaries: dict[str, str], results: dict, *, restore: bool) -> None:
    """The hop alone: the emulator's answer recorded once and served by a static nginx (a few us of
    CPU per request), with the upstream alone, nginx, the bare passthrough and our proxy in front of
    it. The app is restarted pointed at that upstream, and back at the emulator after (``restore``)."""
    registry = world.registry
    root = world.tmp / "fast"
    root.mkdir(parents=True, exist_ok=True)
    # 1. The emulator's answer, once, with the hot tenant's token.
    recorded = httpx.get(f"{world.api_base}/{PATH}", headers={"Authorization": f"Bearer {world.hot_token}"}, timeout=10,
                         trust_env=False)
    if recorded.status_code != 200:
        raise RuntimeError(f"recording the emulator's answer: {recorded.status_code} {recorded.text[:300]}")
    content_type = recorded.headers.get("content-type", "application/json")
    body = root / "conversations.body"
    body.write_bytes(recorded.content)
    log(f"recorded the emulator's answer: {len(recorded.content)} bytes, {content_type}")
    emulator_before = world.counters()  # nothing may reach the emulator from here on (no refresh, no API call)
    # 2. The fast upstream, then nginx and the bare passthrough in front of it.
    upstream_root = root / "upstream"
    upstream_port = free_port()
    conf = nginx.write_static_config(upstream_root, port=upstream_port, path=FAST_PATH, body=body, content_type=content_type,
                                     workers=cfg.workers)
    argv = nginx.argv(conf, upstream_root)
    argv[0] = binaries["nginx"]
    upstream = registry.start("fast-upstream", argv, env=dict(os.environ), cwd=world.tmp, log_dir=world.tmp)
    fast_base = f"http://127.0.0.1:{upstream_port}/pub/v2.2"
    procs: list[Proc] = [upstream]
    try:
        upstream.wait_http(f"{fast_base}/{PATH}", timeout=30)
        nginx_proc, nginx_port = _start_nginx_proxy(world, cfg, binaries, name="fast-nginx", upstream_port=upstream_port)
        procs.append(nginx_proc)
        bare, bare_port = _start_bare(world, cfg, name="fast-bare", upstream=fast_base)
        procs.append(bare)
        log(f"fast upstream on :{upstream_port}, nginx on :{nginx_port}, bare passthrough on :{bare_port}; "
            "restarting the app against the fast upstream")
        # 3. Our app against the fast upstream: same port, database, tenant (its token stays valid) and API key.
        world.stop_app()
        app = world.start_app(cfg.workers, name="app-fast", app_tree=cfg.app_tree, extra_env={"SMC_SALESMSG_API_BASE": fast_base})
        targets: Targets = {
            "upstream": (f"{fast_base}/{PATH}", {"Authorization": f"Bearer {world.hot_token}"}),
            "nginx": (f"http://127.0.0.1:{nginx_port}/proxy/{PATH}", {}),
            "bare": (f"http://127.0.0.1:{bare_port}/proxy/{PATH}", {}),
            "proxy": (f"{world.app_url}/api/v1/tenants/{HOT_SLUG}/proxy/{PATH}", {"Authorization": f"Bearer {world.api_key}"}),
        }
        nginx_proc.wait_http(targets["nginx"][0], timeout=30)
        bare.wait_http(targets["bare"][0], timeout=60)
        sizes = _answers(targets)
        for name, size in sizes.items():
            if size["bytes"] != len(recorded.content):
                log(f"warning: {name} answers {size['bytes']} bytes, the recorded answer has {len(recorded.content)}")
        log(f"all four answer 200 with {sizes['upstream']['items']} items ({sizes['upstream']['bytes']} bytes)")
        _warm_up(wrk, targets)
        # 4. Side by side, rotated; CPU of the target, of the fast upstream and of PostgreSQL's backends.
        groups = {"upstream": None, "nginx": nginx_proc.pid, "bare": bare.pid, "proxy": app.pid}

        def meter(name: str) -> CpuMeter:
            chosen = {"upstream": upstream.pid}
            if groups[name] is not None:
                chosen["target"] = groups[name]
            return CpuMeter(world, chosen)

        runs = _max_rounds(wrk, cfg, targets, meter)
        summary = {name: _summary(rs) for name, rs in runs.items()}
        unloaded = _unloaded(wrk, cfg, targets, meter)
        for name, result in unloaded.items():
            summary[name]["unloaded_p50_ms"] = round(result.p50_ms, 3)
            summary[name]["added_p50_ms_unloaded"] = round(result.p50_ms - unloaded["upstream"].p50_ms, 3)

        def hop_cpu(result: LoadResult | dict, name: str) -> float:
            cpu = result.cpu_us_per_request if isinstance(result, LoadResult) else result["cpu_us_per_request"]
            # the proxy's hop includes its PostgreSQL work; nginx and the bare passthrough have none
            return cpu.get("target", 0.0) + (cpu.get("postgres", 0.0) if name == "proxy" else 0.0)

        proxy_cpu, bare_cpu = hop_cpu(summary["proxy"], "proxy"), hop_cpu(summary["bare"], "bare")
        cpu_ratio = round(proxy_cpu / bare_cpu, 3) if bare_cpu else None
        cpu_ratio_per_round = [round(hop_cpu(p, "proxy") / hop_cpu(b, "bare"), 3) if hop_cpu(b, "bare") else None
                               for p, b in zip(runs["proxy"], runs["bare"], strict=False)]
        proxy_rps = summary["proxy"]["rps"]
        results["fast"] = {
            "request": f"GET /{PATH}",
            "upstream": {
                "what": (f"nginx ({cfg.workers} workers, static) answering GET {FAST_PATH} (any query) with the emulator's "
                         "recorded answer: 200, its body and Content-Type"),
                "api_base": fast_base,
                "content_type": content_type,
                "bytes": len(recorded.content),
                "items": sizes["upstream"]["items"],
            },
            "load": f"wrk -t{cfg.threads} -c{cfg.connections} -d{cfg.seconds:g}s, {cfg.rounds} round(s), order rotated; medians",
            "targets": summary,
            "ratios": {f"proxy_vs_{n}": round(proxy_rps / summary[n]["rps"], 3) for n in ("upstream", "nginx", "bare")},
            "cpu_us_per_request": {"proxy_incl_postgres": round(proxy_cpu, 1), "bare": round(bare_cpu, 1),
                                   "nginx": summary["nginx"]["cpu_us_per_request"].get("target", 0.0)},
            "proxy_cpu_vs_bare": cpu_ratio,
            "proxy_cpu_vs_bare_per_round": cpu_ratio_per_round,
            "unloaded": {
                "method": _unloaded_method(cfg),
                "targets": {name: _summary([r]) for name, r in unloaded.items()},
                "added_p50_ms_by_target": {name: summary[name]["added_p50_ms_unloaded"] for name in ("nginx", "bare", "proxy")},
            },
            "added_p50_ms_unloaded": summary["proxy"]["added_p50_ms_unloaded"],
        }
        emulator_after = world.counters()
        reached = {k: v - emulator_before.get(k, 0) for k, v in emulator_after.items() if v != emulator_before.get(k, 0)}
        results["fast"]["emulator_counters_delta"] = reached
        log(f"fast: proxy CPU/request incl. PostgreSQL {proxy_cpu:.0f} us vs bare {bare_cpu:.0f} us (x{cpu_ratio}); "
            f"added p50 unloaded {summary['proxy']['added_p50_ms_unloaded']:.3f} ms")
        failing = {name: (t["non_2xx"] + t["socket_errors"], unloaded[name].non_2xx + unloaded[name].socket_errors)
                   for name, t in summary.items()
                   if t["non_2xx"] + t["socket_errors"] + unloaded[name].non_2xx + unloaded[name].socket_errors}
        if failing:  # the figures are kept in the JSON; the run counts as failed
            raise RuntimeError(f"fast: errors (loaded, unloaded) per target: {failing}")
        if reached:
            raise RuntimeError(f"fast: calls reached the emulator during the section: {reached}")
    finally:
        world.stop_app()
        for proc in reversed(procs):
            registry.stop(proc)
    if restore:  # later sections run against the emulator
        world.start_app(cfg.workers, app_tree=cfg.app_tree)


class CpuMeter:
    """CPU seconds spent during one load run by each process group the bench started (the emulator,
    the target) and by the PostgreSQL backends of the bench's database, per request."""

    def __init__(self, world: World, groups: dict[str, int]) -> None:
        self.world, self.groups = world, groups

    def _backends(self) -> dict[int, float]:
        rows = self.world.fetch("select pid from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()",
                                self.world.db_name)
        return cpu_seconds_of_pids([r["pid"] for r in rows])

    def run(self, fn) -> LoadResult:
        groups0 = {name: cpu_seconds_of_group(pgid) for name, pgid in self.groups.items()}
        pg0 = self._backends()
        result: LoadResult = fn()
        groups1 = {name: cpu_seconds_of_group(pgid) for name, pgid in self.groups.items()}
        pg1 = self._backends()
        n = max(1, result.requests)
        per = {name: (groups1[name] - groups0[name]) / n * 1e6 for name in self.groups}
        per["postgres"] = sum(cpu - pg0.get(pid, 0.0) for pid, cpu in pg1.items()) / n * 1e6
        per["wrk"] = result.wrk_cpu_s / n * 1e6
        result.cpu_us_per_request = {k: round(v, 1) for k, v in per.items()}
        return result


def _summary(runs: list[LoadResult]) -> dict:
    return {
        "rps": round(median([r.rps for r in runs]), 1),
        "p50_ms": round(median([r.p50_ms for r in runs]), 3),
        "p99_ms": round(median([r.p99_ms for r in runs]), 3),
        "non_2xx": sum(r.non_2xx for r in runs),
        "socket_errors": sum(r.socket_errors for r in runs),
        "cpu_us_per_request": {k: round(median([r.cpu_us_per_request.get(k, 0.0) for r in runs]), 1)
                               for k in (runs[0].cpu_us_per_request if runs else {})},
        "rounds": [r.as_dict() for r in runs],
    }


# -- 5. profile -----------------------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def profile_proxy(world: World, wrk: Wrk, cfg: Config, results: dict, out_dir: Path, stamp: str) -> None:
    assert world.app is not None
    seconds = max(3, int(cfg.seconds))
    url = f"{world.app_url}/api/v1/tenants/{HOT_SLUG}/proxy/{PATH}"
    holder: dict[str, LoadResult] = {}
    load = threading.Thread(
        target=lambda: holder.setdefault("r", wrk.run(url, headers={"Authorization": f"Bearer {world.api_key}"},
                                                        seconds=seconds + 4)))
    load.start()
    time.sleep(1.0)
    workers = world.app.workers()
    before = {pid: _cpu_ticks(pid) for pid in workers}
    time.sleep(1.0)
    busiest = max(workers, key=lambda pid: _cpu_ticks(pid) - before[pid])
    raw = out_dir / f"profile-{stamp}.txt"
    log(f"py-spy on worker {busiest} (of {workers}) for {seconds} s under load")
    ok, problem = profile.record(busiest, seconds=seconds, out=raw)
    load.join()
    entry: dict = {"worker_pid": busiest, "seconds": seconds, "rate_hz": 250,
                   "load_during_profile_rps": round(holder["r"].rps, 1) if "r" in holder else None}
    if ok:
        shutil.copyfile(raw, out_dir / "profile-latest.txt")
        entry["collapsed_stacks"] = str(raw)
        entry.update(profile.summarise(raw, rate=250, seconds=seconds))
    else:
        entry["error"] = problem
        log(f"profile skipped: {problem}")
    results["profile"] = entry


# -- 4. vault -------------------------------------------------------------------------------------


def vault(results: dict) -> None:
    from app.vault.envelope import DataKeyCache, Keyring, new_data_key_material

    keyring = Keyring([("bench", os.urandom(32))])
    tenant_id, key_id, owner = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    master_id, wrapped = keyring.wrap(new_data_key_material(), tenant_id=tenant_id)
    key = DataKeyCache(keyring).get(key_id=key_id, tenant_id=tenant_id, master_key_id=master_id, wrapped=wrapped)
    token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + "x" * 220 + ".sig0123456789abcdef0123456789abcdef0123456"
    sealed = key.seal(token, owner=owner, field="access_token")

    def both() -> None:
        key.open_text(key.seal(token, owner=owner, field="access_token"), owner=owner, field="access_token")

    def best(fn, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    n = 20000
    results["vault"] = {
        "token_chars": len(token),
        "seal_plus_open_us": round(best(both, n), 2),
        "seal_us": round(best(lambda: key.seal(token, owner=owner, field="access_token"), n), 2),
        "open_us": round(best(lambda: key.open_text(sealed, owner=owner, field="access_token"), n), 2),
        "unwrap_data_key_us": round(best(lambda: DataKeyCache(keyring).get(key_id=key_id, tenant_id=tenant_id,
                                                                          master_key_id=master_id, wrapped=wrapped), 5000), 2),
        "method": "timeit, best of 5 repeats of 20,000 (unwrap: 5,000; a cache miss builds AESGCM too)",
    }
    log(f"vault: seal+open {results['vault']['seal_plus_open_us']} us")


# -- 2. refresh stampede --------------------------------------------------------------------------


async def _stampede(world: World, n: int) -> dict:
    import aiohttp

    url = f"{world.app_url}/api/v1/tenants/{HOT_SLUG}/proxy/{PATH}"
    headers = {"Authorization": f"Bearer {world.api_key}"}
    assert world.app is not None
    workers = world.app.workers()
    # Open n keep-alive connections and warm every worker's pools. The kernel hands each new
    # connection to whichever worker accepts first; until every worker holds a fair share
    # (a quarter of an even split), close them all and connect again.
    for attempt in range(1, 9):
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n), timeout=aiohttp.ClientTimeout(total=60))

        async def call() -> tuple[int, float]:
            started = time.perf_counter()
            async with http.get(url, headers=headers) as resp:
                await resp.read()
                return resp.status, (time.perf_counter() - started) * 1000

        for _ in range(2):
            warm = await asyncio.gather(*(call() for _ in range(n)))
            if any(status != 200 for status, _ in warm):
                await http.close()
                raise RuntimeError(f"warm-up answers: {sorted({s for s, _ in warm})}")
        spread = connections_per_process(workers, world.app_port)
        if min(spread.values()) >= n // (len(workers) * 4) or attempt == 8:
            break
        await http.close()
        await asyncio.sleep(0.5)
    async with http:
        version_before = (await world.sql(
            "select c.version from connections c join tenants t on t.id = c.tenant_id where t.slug = $1", HOT_SLUG))[0][0]
        await world.sql("update connections set access_expires_at = now() - interval '1 minute' "
                        "where tenant_id = (select id from tenants where slug = $1)", HOT_SLUG)
        async with httpx.AsyncClient(timeout=10, trust_env=False) as emulator:
            expired = (await emulator.post(world.emulator_url + "/_emulator/tokens/expire",
                                           json={"access_token": world.hot_token})).json()
            before = (await emulator.get(world.emulator_url + "/_emulator/counters")).json()
            ticks = {pid: _cpu_ticks(pid) for pid in workers}
            started = time.perf_counter()
            answers = await asyncio.gather(*(call() for _ in range(n)))
            wall = (time.perf_counter() - started) * 1000
            busy = sum(1 for pid in workers if _cpu_ticks(pid) > ticks[pid])
            after = (await emulator.get(world.emulator_url + "/_emulator/counters")).json()
    version_after = (await world.sql(
        "select c.version from connections c join tenants t on t.id = c.tenant_id where t.slug = $1", HOT_SLUG))[0][0]
    latencies = [ms for _, ms in answers]
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "calls": n,
        "workers": len(workers),
        "workers_busy_during_stampede": busy,
        "client_connections_per_worker": sorted(spread.values(), reverse=True),
        "connection_attempts": attempt,
        "tokens_expired_at_emulator": expired.get("expired"),
        "refreshes_at_emulator": after.get("token.refresh", 0) - before.get("token.refresh", 0),
        "refresh_200": after.get("token.refresh.200", 0) - before.get("token.refresh.200", 0),
        "connection_version": [version_before, version_after],
        "statuses": statuses,
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1),
        "wall_ms": round(wall, 1),
    }


def stampede(world: World, cfg: Config, results: dict) -> None:
    world.stop_app()
    world.start_app(cfg.stampede_workers, name="app-stampede", app_tree=cfg.app_tree)
    try:
        found = asyncio.run(_stampede(world, cfg.stampede))
    finally:
        world.stop_app()
    found["method"] = (f"{cfg.stampede} concurrent proxied GETs (aiohttp, one keep-alive connection each, warmed) on "
                       f"`serve --workers {cfg.stampede_workers}` after setting access_expires_at in the past in the "
                       "database and expiring the token at the emulator; refreshes = delta of the emulator's "
                       "token.refresh counter")
    results["stampede"] = found
    log(f"stampede: {found['refreshes_at_emulator']} refresh(es), statuses {found['statuses']}, "
        f"p50 {found['p50_ms']} ms p99 {found['p99_ms']} ms")


# -- 3. scale ---------------------------------------------------------------------------------------


def _page_latencies(client: httpx.Client, requests: list[str]) -> list[float]:
    found = []
    for path in requests:
        started = time.perf_counter()
        answer = client.get(path)
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status_code != 200:
            raise RuntimeError(f"GET {path}: {answer.status_code} {answer.text[:300]}")
        found.append(elapsed)
    return found


def scale(world: World, wrk: Wrk, cfg: Config, results: dict) -> None:
    from app.tenants.registry import encode_cursor

    entry: dict = {"tenants": cfg.tenants}
    results["scale"] = entry
    world.stop_app()
    log(f"inserting {cfg.tenants} tenants with PAT connections and one API key each")
    started = time.perf_counter()
    pairs = asyncio.run(world.insert_scale_tenants())
    entry["insert_seconds"] = round(time.perf_counter() - started, 1)
    log(f"inserted in {entry['insert_seconds']} s")
    world.start_app(cfg.workers, app_tree=cfg.app_tree)
    random_file, hot_file = world.tmp / "tenants-random.txt", world.tmp / "tenants-hot.txt"
    random_file.write_text("".join(f"{slug} {key}\n" for slug, key in pairs))
    hot_file.write_text(f"{pairs[0][0]} {pairs[0][1]}\n")
    url = world.app_url + "/"
    runs: dict[str, list[LoadResult]] = {"hot": [], "random": []}
    files = {"hot": hot_file, "random": random_file}
    seed = str(int(time.time()))
    for name in ("hot", "random"):
        log(f"warm-up {name}")
        wrk.run(url, script="random", args=[str(files[name]), seed], seconds=3)
    for round_no in range(cfg.rounds):
        for name in (("hot", "random") if round_no % 2 == 0 else ("random", "hot")):
            # Last use of every key spread over the past minute, as in steady traffic: the proxy then
            # records about as many key uses per second as it would in production (one per key a minute).
            _spread_last_use(world)
            result = wrk.run(url, script="random", args=[str(files[name]), seed])
            runs[name].append(result)
            log(f"round {round_no + 1}/{cfg.rounds} {name:6}: {result.rps:8.0f} req/s  p50 {result.p50_ms:.2f} ms  "
                f"p99 {result.p99_ms:.2f} ms  non-2xx {result.non_2xx} errors {result.socket_errors}")
    summary = {name: _summary(rs) for name, rs in runs.items()}
    entry["throughput"] = summary
    entry["random_vs_hot"] = round(summary["random"]["rps"] / summary["hot"]["rps"], 3)
    entry["random_vs_hot_per_round"] = [round(r.rps / h.rps, 3) for r, h in zip(runs["random"], runs["hot"], strict=False)]
    entry["throughput_method"] = (f"wrk Lua script choosing a random (tenant, its own API key) of the {cfg.tenants} per request, "
                                  "against the same script with one tenant; api_keys.last_used_at spread over the past "
                                  "minute before each run")

    # The operator's tenants page and the tenants API, one request at a time.
    slugs = sorted(slug for slug, _ in pairs)
    page_paths = ["/tenants"]
    page_paths += [f"/tenants?cursor={encode_cursor(slugs[25 * i - 1])}" for i in range(1, min(60, len(slugs) // 25))]
    page_paths += [f"/tenants?q={i:03d}" for i in range(0, 1000, 25)]  # 40 searches, ~10 matches each
    page_paths += [f"/tenants?q=t-0{i}" for i in range(10)]  # 10 broad searches, ~1,000 matches each
    page_paths += ["/tenants?status=active", "/tenants?status=not_connected"] * 10
    with closing(world.browser()) as browser:
        _page_latencies(browser, page_paths[:10])  # warm-up
        page_ms = _page_latencies(browser, page_paths)
        # The "Next page" link as the page renders it, followed once (it carries an empty status=).
        first = browser.get("/tenants")
        next_link = _next_link(first.text)
        next_status = browser.get(next_link).status_code if next_link else None
    api_paths = []
    with httpx.Client(base_url=world.app_url, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {world.api_key}"}) as api:
        cursor = None
        api_ms: list[float] = []
        pages = 0
        for _ in range(5):  # warm-up
            api.get("/api/v1/tenants?limit=50")
        while pages < 200:
            path = "/api/v1/tenants?limit=50" + (f"&cursor={cursor}" if cursor else "")
            api_paths.append(path)
            started = time.perf_counter()
            answer = api.get(path)
            api_ms.append((time.perf_counter() - started) * 1000)
            if answer.status_code != 200:
                raise RuntimeError(f"GET {path}: {answer.status_code} {answer.text[:300]}")
            pages += 1
            cursor = answer.json()["next_cursor"]
            if not cursor:
                break
        search_ms = _page_latencies(api, [f"/api/v1/tenants?limit=50&search={i:03d}" for i in range(0, 1000, 20)])
    entry["tenants_page"] = {
        "requests": len(page_ms), "p50_ms": round(percentile(page_ms, 50), 1), "p99_ms": round(percentile(page_ms, 99), 1),
        "max_ms": round(max(page_ms), 1),
        "method": ("signed-in operator, one request at a time: first page, 59 pages by cursor, 50 searches, 20 status "
                   "filters (each renders 25 rows and counts the matches)"),
        "rendered_next_link_status": next_status,
    }
    all_api = api_ms + search_ms
    entry["tenants_api"] = {
        "requests": len(all_api), "p50_ms": round(percentile(all_api, 50), 1), "p99_ms": round(percentile(all_api, 99), 1),
        "max_ms": round(max(all_api), 1), "pages_walked": pages,
        "method": "all-tenant API key, one request at a time: every page of limit=50 by next_cursor, then 50 searches",
    }
    log(f"tenants page p99 {entry['tenants_page']['p99_ms']} ms, API p99 {entry['tenants_api']['p99_ms']} ms")
    world.stop_app()
    entry["worker"] = worker_refresh(world, cfg)


def _spread_last_use(world: World) -> None:
    """Every key's last use somewhere in the past minute. The app's own usage flush may update the
    same rows in another order meanwhile; PostgreSQL then aborts one of the two: retry ours."""
    import asyncpg

    for attempt in range(10):
        try:
            world.fetch("update api_keys set last_used_at = now() - random() * interval '60 seconds'")
            return
        except asyncpg.DeadlockDetectedError:
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError("could not update api_keys.last_used_at (deadlocks)")


def _next_link(html: str) -> str | None:
    import html as html_lib
    import re

    found = re.search(r'<a href="([^"]+)" rel="next"', html)
    return html_lib.unescape(found.group(1)) if found else None


def worker_refresh(world: World, cfg: Config) -> dict:
    batch, concurrency, pool = 500, 32, 20
    world.fetch("update connections set access_expires_at = now() + interval '60 seconds' where kind = 'pat'")
    due = world.fetch("select count(*) from connections where kind = 'pat'")[0][0]
    before = world.counters()
    env = world.app_env(SMC_WORKER_INTERVAL_SECONDS="1", SMC_WORKER_BATCH_SIZE=str(batch),
                        SMC_WORKER_CONCURRENCY=str(concurrency), SMC_DATABASE_POOL_SIZE=str(pool))
    log(f"worker: refreshing {due} PAT connections due within 60 s (batch {batch}, concurrency {concurrency})")
    started = time.perf_counter()
    proc = world.registry.start("worker", [str(Path(sys.executable).parent / "salesmsg-connect"), "worker"],
                                env=env, cwd=world.tmp, log_dir=world.tmp)
    done, finished_at, timeout = 0, None, max(120.0, due / 20)
    assert world.emulator is not None
    base: tuple[int, float, float] | None = None  # refreshed so far, worker CPU, emulator CPU at the first refresh seen
    cpu_end = (0.0, 0.0)
    try:
        while time.perf_counter() - started < timeout:
            if not proc.alive():
                raise RuntimeError(f"the worker exited:\n{proc.tail()}")
            done = world.fetch("select count(*) from connections where kind = 'pat' and version > 1")[0][0]
            cpu_now = (cpu_seconds_of_group(proc.pid), cpu_seconds_of_group(world.emulator.pid))
            if base is None and done > 0:
                base = (done, *cpu_now)
            if done >= due:
                finished_at = time.perf_counter()
                cpu_end = cpu_now
                break
            time.sleep(0.5)
    finally:
        world.registry.stop(proc)
    after = world.counters()
    span = world.fetch("select count(*) as n, extract(epoch from max(last_refresh_at) - min(last_refresh_at)) as s, "
                       "count(*) filter (where status <> 'active') as not_active, "
                       "count(*) filter (where refresh_failures > 0) as failing "
                       "from connections where kind = 'pat' and version > 1")[0]
    seconds = float(span["s"] or 0)
    entry = {
        "connections": due,
        "refreshed": done,
        "settings": {"SMC_WORKER_INTERVAL_SECONDS": 1, "SMC_WORKER_BATCH_SIZE": batch, "SMC_WORKER_CONCURRENCY": concurrency,
                     "SMC_DATABASE_POOL_SIZE": pool, "processes": 1},
        "seconds_from_start": round(finished_at - started, 1) if finished_at else None,
        "seconds_first_to_last_refresh": round(seconds, 1),
        "refreshes_per_second": round(span["n"] / seconds, 1) if seconds else None,
        "emulator_pat_refreshes": after.get("token.pat_refresh", 0) - before.get("token.pat_refresh", 0),
        "not_active_after": span["not_active"],
        "with_failures": span["failing"],
    }
    if base is not None and finished_at is not None and due > base[0]:
        n = due - base[0]
        entry["cpu_us_per_refresh"] = {"worker": round((cpu_end[0] - base[1]) / n * 1e6),
                                       "emulator": round((cpu_end[1] - base[2]) / n * 1e6)}
    log(f"worker: {done}/{due} refreshed, {entry['refreshes_per_second']} refreshes/s")
    return entry


# -- the table ----------------------------------------------------------------------------------------


def verdict(value: float | None, goal: float, *, at_least: bool) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value >= goal if at_least else value <= goal) else "FAIL"


def goals_of(results: dict) -> list[dict]:
    rows = []
    o, f, s, sc = results.get("overhead"), results.get("fast"), results.get("stampede"), results.get("scale")
    if o:
        for name in ("direct", "nginx", "bare"):
            key = f"proxy_vs_{name}"
            rows.append({"goal": f"proxy throughput / {name} >= {GOALS[key]}", "value": o["ratios"][key],
                         "verdict": verdict(o["ratios"][key], GOALS[key], at_least=True)})
        added = o["half_load"]["added_p50_ms"]
        rows.append({"goal": f"added p50 at half load <= {GOALS['added_p50_ms_at_half_load']} ms", "value": added,
                     "verdict": verdict(added, GOALS["added_p50_ms_at_half_load"], at_least=False)})
    if f:
        goal = GOALS["fast_proxy_cpu_vs_bare"]
        rows.append({"goal": f"fast upstream: proxy CPU/request incl. PostgreSQL / bare CPU/request <= {goal}",
                     "value": f["proxy_cpu_vs_bare"], "verdict": verdict(f["proxy_cpu_vs_bare"], goal, at_least=False)})
        goal = GOALS["fast_added_p50_ms_unloaded"]
        rows.append({"goal": f"fast upstream: proxy's added p50 unloaded <= {goal} ms", "value": f["added_p50_ms_unloaded"],
                     "verdict": verdict(f["added_p50_ms_unloaded"], goal, at_least=False)})
    if s:
        ok = s["refreshes_at_emulator"] == 1 and s["statuses"] == {"200": s["calls"]}
        rows.append({"goal": "exactly one refresh in the stampede (and every call 200)", "value": s["refreshes_at_emulator"],
                     "verdict": "PASS" if ok else "FAIL"})
    if sc and "random_vs_hot" in sc:
        rows.append({"goal": "random-tenant throughput >= 0.9 of one hot tenant", "value": sc["random_vs_hot"],
                     "verdict": verdict(sc["random_vs_hot"], GOALS["random_vs_hot"], at_least=True)})
    if sc and "tenants_page" in sc:
        for key, label in (("tenants_page", "tenants page"), ("tenants_api", "tenants API")):
            value = sc[key]["p99_ms"]
            rows.append({"goal": f"{label} p99 < 100 ms at {sc['tenants']} tenants", "value": value,
                         "verdict": verdict(value, GOALS[f"{key}_p99_ms"] - 1e-9, at_least=False)})
    return rows


def _fast_table(f: dict) -> list[str]:
    u = f["upstream"]
    labels = {"upstream": "fast upstream alone (static nginx)", "nginx": "nginx reverse proxy",
              "bare": "bare passthrough (ASGI + aiohttp)", "proxy": "our proxy (serve, PostgreSQL)"}
    lines = [f"1b. Proxy hop against a fast upstream: {f['request']} answered by nginx from the emulator's recorded answer "
             f"({u['items']} items, {u['bytes']} bytes, {u['content_type']}); {f['load']}; unloaded: wrk -t1 -c1",
             "",
             "| target | req/s | p50 ms | p99 ms | errors | CPU us/req target | upstream | postgres | unloaded p50 ms "
             "| added p50 unloaded ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in labels.items():
        t = f["targets"][name]
        c = t["cpu_us_per_request"]
        target = f"{c['target']:.0f}" if "target" in c else "-"
        added = f"{t['added_p50_ms_unloaded']:.3f}" if name != "upstream" else "-"
        lines.append(f"| {label} | {t['rps']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['non_2xx'] + t['socket_errors']} "
                     f"| {target} | {c.get('upstream', 0):.0f} | {c.get('postgres', 0):.0f} | {t['unloaded_p50_ms']:.3f} | {added} |")
    cpu, r = f["cpu_us_per_request"], f["ratios"]
    lines += ["",
              f"   proxy CPU/request incl. PostgreSQL {cpu['proxy_incl_postgres']:.0f} us vs bare {cpu['bare']:.0f} us: "
              f"x{f['proxy_cpu_vs_bare']} (per round {f['proxy_cpu_vs_bare_per_round']}); nginx {cpu['nginx']:.0f} us",
              f"   throughput proxy/upstream {r['proxy_vs_upstream']:.2f}   proxy/nginx {r['proxy_vs_nginx']:.2f}   "
              f"proxy/bare {r['proxy_vs_bare']:.2f}; added p50 unloaded: proxy {f['added_p50_ms_unloaded']:.3f} ms", ""]
    return lines


def table(results: dict) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        f"Salesmsg Connect benchmarks, {results['started_at']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average at start {m['load_average_at_start']}",
        "everything on loopback, sharing the cores: wrk, the emulator (1 process), PostgreSQL and what is measured; "
        f"runs of {c['seconds']:g} s, {c['rounds']} round(s), wrk -t{c['threads']} -c{c['connections']}, "
        f"{c['workers']} workers per server; app: {c['app_tree']}",
        "",
    ]
    o = results.get("overhead")
    if o:
        lines += [f"1. Proxy overhead: {o['request']} ({o['response']['items']} items, {o['response']['bytes']} bytes); {o['load']}",
                  f"   {'target':38} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   CPU us/request: "
                  f"{'emulator':>8} {'target':>7} {'postgres':>8} {'wrk':>5}"]
        labels = {"direct": "direct to the emulator", "proxy": "our proxy (serve, PostgreSQL)",
                  "nginx": "nginx reverse proxy", "bare": "bare passthrough (ASGI + aiohttp)"}
        for name, label in labels.items():
            t = o["targets"][name]
            c = t["cpu_us_per_request"]
            lines.append(f"   {label:38} {t['rps']:7.0f} {t['p50_ms']:7.2f} {t['p99_ms']:7.2f} {t['non_2xx'] + t['socket_errors']:6d}"
                         f"                   {c.get('emulator', 0):8.0f} {c.get('target', 0):7.0f} {c.get('postgres', 0):8.0f} "
                         f"{c.get('wrk', 0):5.0f}")
        r = o["ratios"]
        lines.append(f"   proxy/direct {r['proxy_vs_direct']:.2f}   proxy/nginx {r['proxy_vs_nginx']:.2f}   "
                     f"proxy/bare {r['proxy_vs_bare']:.2f}   (per round: {o['ratios_per_round']})")
        h = o["half_load"]
        t = h["targets"]
        lines.append(f"   at {h['rate']} req/s (half the proxy's max, fixed rate) p50: direct {t['direct']['p50_ms']:.2f} ms, "
                     f"proxy {t['proxy']['p50_ms']:.2f}, nginx {t['nginx']['p50_ms']:.2f}, bare {t['bare']['p50_ms']:.2f} ms -> "
                     f"added p50: proxy {h['added_p50_ms']:.2f} ms (nginx {h['added_p50_ms_by_target']['nginx']:.2f}, "
                     f"bare {h['added_p50_ms_by_target']['bare']:.2f})")
        per_round = [round(p["p50_ms"] - d["p50_ms"], 2) for p, d in zip(t["proxy"]["rounds"], t["direct"]["rounds"], strict=False)]
        lines.append(f"   added p50 of the proxy per round: {per_round} ms")
        u = o["unloaded"]
        lines.append(f"   unloaded (wrk -c1) p50: direct {u['targets']['direct']['p50_ms']:.2f} ms -> added p50: proxy "
                     f"{u['added_p50_ms_by_target']['proxy']:.2f} ms, nginx {u['added_p50_ms_by_target']['nginx']:.2f}, "
                     f"bare {u['added_p50_ms_by_target']['bare']:.2f}")
        lines.append(f"   CPU us/request at half load: proxy {t['proxy']['cpu_us_per_request'].get('target', 0):.0f}, "
                     f"nginx {t['nginx']['cpu_us_per_request'].get('target', 0):.0f}, "
                     f"bare {t['bare']['cpu_us_per_request'].get('target', 0):.0f}")
        lines.append("")
    f = results.get("fast")
    if f:
        lines += _fast_table(f)
    s = results.get("stampede")
    if s:
        lines += [f"2. Refresh stampede: {s['calls']} concurrent calls on an expired token, {s['workers']} workers "
                  f"(client connections per worker {s['client_connections_per_worker']}, "
                  f"{s['workers_busy_during_stampede']} used CPU during it)",
                  f"   refreshes at the emulator {s['refreshes_at_emulator']}, statuses {s['statuses']}, "
                  f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms", ""]
    sc = results.get("scale")
    if sc and "throughput" in sc:
        t = sc["throughput"]
        lines += [f"3. Scale: {sc['tenants']} tenants with PAT connections and one API key each (inserted in {sc['insert_seconds']} s)",
                  f"   one hot tenant      {t['hot']['rps']:8.0f} req/s  p50 {t['hot']['p50_ms']:.2f} ms  p99 {t['hot']['p99_ms']:.2f} ms",
                  f"   random tenant+key   {t['random']['rps']:8.0f} req/s  p50 {t['random']['p50_ms']:.2f} ms  p99 {t['random']['p99_ms']:.2f} ms",
                  f"   random/hot {sc['random_vs_hot']:.2f} (per round {sc['random_vs_hot_per_round']})"]
        if "tenants_page" in sc:
            p, a = sc["tenants_page"], sc["tenants_api"]
            lines.append(f"   tenants page ({p['requests']} requests): p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms; "
                         f"tenants API ({a['requests']} requests): p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms")
            if p.get("rendered_next_link_status") not in (None, 200):
                lines.append(f"   note: the tenants page's own 'Next page' link (it carries an empty status=) answers "
                             f"{p['rendered_next_link_status']}")
        w = sc.get("worker")
        if w:
            lines.append(f"   worker: {w['refreshed']}/{w['connections']} due tokens refreshed, {w['refreshes_per_second']} refreshes/s "
                         f"({w['seconds_first_to_last_refresh']} s first to last, {w['seconds_from_start']} s from process start; "
                         f"emulator counted {w['emulator_pat_refreshes']}; CPU us/refresh {w.get('cpu_us_per_refresh')})")
        lines.append("")
    v = results.get("vault")
    if v:
        lines += [f"4. Vault: seal + open of one {v['token_chars']}-character token {v['seal_plus_open_us']} us "
                  f"(seal {v['seal_us']} us, open {v['open_us']} us; data key unwrap {v['unwrap_data_key_us']} us)", ""]
    p = results.get("profile")
    if p:
        if "error" in p:
            lines += [f"5. Profile: not taken ({p['error']})", ""]
        else:
            lines.append(f"5. Profile of one proxy worker under load (py-spy, {p['samples']} busy samples, "
                         f"{p['busy_share_of_one_core']} of a core): self time by part")
            for name, share in p["by_category_pct"].items():
                lines.append(f"   {share:5.1f} %  {name}")
            lines.append("   inclusive: " + ", ".join(f"{k} {v} %" for k, v in p["inclusive_pct"].items()))
            lines.append("")
    goals = results.get("goals", [])
    if goals:
        lines.append("Goals")
        for g in goals:
            lines.append(f"   {g['verdict']:5} {g['goal']}: {g['value']}")
    if results.get("error"):
        lines += ["", f"ERROR: {results['error']}"]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------


def main() -> int:
    cfg = Config.from_env()
    install_signal_handlers()
    binaries = ensure_tools()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(binaries),
        "config": {"seconds": cfg.seconds, "rounds": cfg.rounds, "connections": cfg.connections, "threads": cfg.threads,
                   "workers": cfg.workers, "tenants": cfg.tenants, "stampede": cfg.stampede,
                   "stampede_workers": cfg.stampede_workers, "sections": sorted(cfg.only),
                   "app_tree": str(cfg.app_tree) if cfg.app_tree else "this checkout"},
        "app_run_as": ("salesmsg-connect serve --workers N (uvicorn, uvloop, httptools) on PostgreSQL, SMC_ENV=development, "
                       "SMC_LOG_LEVEL=WARNING, SMC_RATE_LIMIT_PER_KEY/_PER_TENANT=1000000/minute, in-memory rate limits, "
                       f"SMC_UPSTREAM_BUDGET_PER_MINUTE={os.environ.get('BENCH_BUDGET', '1000000000')} (above 0: the budget's ledger in PostgreSQL on every call); "
                       "emulator: python -m salesmsg_emulator --config (rate_limit_per_minute 0, controls on)"),
    }
    registry = Registry()
    tmp = Path(tempfile.mkdtemp(prefix="smc-bench-"))
    wrk = Wrk(scripts_dir=tmp, threads=cfg.threads, connections=cfg.connections, seconds=cfg.seconds)
    ok = False
    t0 = time.perf_counter()
    try:
        if "vault" in cfg.only:
            vault(results)
        needs_world = cfg.only & {"overhead", "fast", "profile", "stampede", "scale"}
        if needs_world:
            world = World(tmp=tmp, registry=registry, server_url=cfg.server_url, tenants=cfg.tenants, workers=cfg.workers)
            world.create_database()
            world.start_emulator()
            world.start_app(cfg.workers, app_tree=cfg.app_tree)
            world.connect_hot_tenant()
            world.create_api_key()
            if "overhead" in cfg.only:
                overhead(world, wrk, cfg, binaries, results)
            if "fast" in cfg.only:
                fast(world, wrk, cfg, binaries, results, restore=bool(cfg.only & {"profile", "stampede", "scale"}))
            if "profile" in cfg.only:
                profile_proxy(world, wrk, cfg, results, cfg.out, stamp)
            if "stampede" in cfg.only:
                stampede(world, cfg, results)
            if "scale" in cfg.only:
                scale(world, wrk, cfg, results)
        ok = True
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - reported in the JSON and the table
        results["error"] = f"{type(exc).__name__}: {exc}"
        log(f"failed: {results['error']}\n{traceback.format_exc()}")
    finally:
        registry.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
    results["goals"] = goals_of(results)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for name in (f"bench-{stamp}.json", "latest.json"):
        (cfg.out / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"\n(JSON: {cfg.out / 'latest.json'} and {cfg.out / f'bench-{stamp}.json'}; {results['seconds']} s)")
    return 0 if ok else 1
