"""Proxy throughput of several variants of the app, side by side in one run.

    python -m bench.compare base=. pool32=.:SMC_DATABASE_POOL_SIZE=32 autocommit=/tmp/scratch/autocommit

Each variant is ``label=TREE[:ENV=VALUE,ENV=VALUE]``: TREE is ``.`` for this checkout or a folder
holding a modified copy of ``app/`` (``TREE/app``), which is put first on ``PYTHONPATH`` (templates,
static files and migrations still come from this checkout). Every variant runs as
``python -m app serve --workers N`` on its own port against the same emulator, database, tenant
and API key; wrk runs against each in turn, the order rotated every round. The bare passthrough
runs beside them as the floor. Settings: the BENCH_* variables of ``bench.run``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.load import LoadResult, Wrk
from bench.procs import Proc, Registry, free_port, install_signal_handlers, log
from bench.run import PATH, Config, CpuMeter, _summary, ensure_tools
from bench.world import HOT_SLUG, ROOT, World


def parse(spec: str) -> tuple[str, Path | None, dict[str, str]]:
    label, _, rest = spec.partition("=")
    tree, _, env_text = rest.partition(":")
    env = dict(item.split("=", 1) for item in env_text.split(",") if item)
    path = None if tree in ("", ".") else Path(tree).resolve()
    if path is not None and not (path / "app" / "__init__.py").exists():
        raise SystemExit(f"{path} holds no app/ package")
    return label, path, env


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    variants = [parse(a) for a in argv]
    cfg = Config.from_env()
    install_signal_handlers()
    ensure_tools()
    registry = Registry()
    tmp = Path(tempfile.mkdtemp(prefix="smc-compare-"))
    wrk = Wrk(scripts_dir=tmp, threads=cfg.threads, connections=cfg.connections, seconds=cfg.seconds)
    results: dict = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "variants": {}}
    try:
        world = World(tmp=tmp, registry=registry, server_url=cfg.server_url, tenants=1, workers=cfg.workers)
        world.create_database()
        world.start_emulator()
        world.start_app(cfg.workers)
        world.connect_hot_tenant()
        world.create_api_key()
        world.stop_app()
        bare_port = free_port()
        bare = registry.start(
            "bare", [sys.executable, "-m", "uvicorn", "bench.passthrough:app", "--host", "127.0.0.1", "--port",
                     str(bare_port), "--workers", str(cfg.workers), "--loop", "uvloop", "--http", "httptools",
                     "--no-access-log", "--log-level", "warning"],
            env={**world.app_env(), "BENCH_UPSTREAM": world.api_base, "BENCH_TOKEN": world.hot_token,
                 "PYTHONPATH": str(ROOT)}, cwd=ROOT, log_dir=tmp)
        bare.wait_http(f"http://127.0.0.1:{bare_port}/proxy/{PATH}", timeout=60)
        assert world.emulator is not None
        specs = {label: (tree, extra) for label, tree, extra in variants}
        names = [*specs, "bare"]

        def start(label: str) -> tuple[Proc, int]:
            """A variant runs only for its own measurement: PostgreSQL's connections are limited."""
            tree, extra = specs[label]
            port = free_port()
            env = world.app_env(**extra)
            if tree is not None:
                env["PYTHONPATH"], env["SMC_HOME"] = str(tree), str(ROOT)
            proc = registry.start(f"app-{label}", [sys.executable, "-m", "app", "serve", "--port", str(port), "--workers",
                                                   str(cfg.workers)], env=env, cwd=tmp, log_dir=tmp)
            proc.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90)
            return proc, port

        runs: dict[str, list[LoadResult]] = {label: [] for label in names}
        for round_no in range(cfg.rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for label in order:
                proc = None
                if label == "bare":
                    url, headers, pgid = f"http://127.0.0.1:{bare_port}/proxy/{PATH}", {}, bare.pid
                else:
                    proc, port = start(label)
                    url, headers, pgid = (f"http://127.0.0.1:{port}/api/v1/tenants/{HOT_SLUG}/proxy/{PATH}",
                                          {"Authorization": f"Bearer {world.api_key}"}, proc.pid)
                try:
                    wrk.run(url, headers=headers, seconds=3)  # warm-up
                    meter = CpuMeter(world, {"emulator": world.emulator.pid, "target": pgid})
                    result = meter.run(lambda: wrk.run(url, headers=headers))
                finally:
                    if proc is not None:
                        registry.stop(proc)
                runs[label].append(result)
                log(f"round {round_no + 1}/{cfg.rounds} {label:12}: {result.rps:7.0f} req/s p50 {result.p50_ms:6.2f} ms "
                    f"p99 {result.p99_ms:7.2f} ms  CPU us/req {result.cpu_us_per_request}  non-2xx {result.non_2xx}")
        base = names[0]
        summary = {label: _summary(rs) for label, rs in runs.items()}
        for label, entry in summary.items():
            entry["vs_first"] = round(entry["rps"] / summary[base]["rps"], 3)
            entry["vs_first_per_round"] = [round(r.rps / b.rps, 3) for r, b in zip(runs[label], runs[base], strict=False)]
        results["variants"] = {label: {"spec": spec, **summary[label]} for label, spec in zip(names, argv + ["bench.passthrough"], strict=False)}
        print(f"{'variant':14} {'req/s':>7} {'vs ' + base:>9} {'per round':>20} {'p50 ms':>7} {'p99 ms':>7}  CPU us/request: "
              f"{'target':>6} {'postgres':>8} {'emulator':>8}")
        for label, entry in summary.items():
            c = entry["cpu_us_per_request"]
            print(f"{label:14} {entry['rps']:7.0f} {entry['vs_first']:9.2f} {str(entry['vs_first_per_round']):>20} "
                  f"{entry['p50_ms']:7.2f} {entry['p99_ms']:7.2f}                  {c.get('target', 0):6.0f} "
                  f"{c.get('postgres', 0):8.0f} {c.get('emulator', 0):8.0f}")
        out = cfg.out / f"compare-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        cfg.out.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"(JSON: {out})")
        return 0
    finally:
        registry.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
