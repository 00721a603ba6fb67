"""py-spy on one uvicorn worker under load, and a summary of where its CPU time goes.

py-spy (``record --format raw``) writes collapsed stacks: ``frame;frame;...;leaf count``, each
frame ``function (path:line)``. Idle samples are left out (py-spy's default), so the samples are
the worker's busy time. Each sample is charged to the innermost frame that belongs to a known
package or to our code (standard-library frames such as ``re`` or ``json`` are charged to
whoever called them); ``inclusive`` counts the samples in which a function appears anywhere.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY_VERSION = "0.4.3"

# (category, substrings of a frame's file path), first match wins. The event loop is the fallback:
# a sample is charged to it only when no other known frame is on its stack.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog, logging, app/core/logs.py)", ("/structlog/", "/logging/", "/app/core/logs.py")),
    ("rate limits (app/proxy/rate_limits.py; limits only with Redis)", ("/limits/", "/app/proxy/rate_limits.py")),
    ("SQLAlchemy", ("/sqlalchemy/",)),
    ("asyncpg (incl. its Cython protocol)", ("/asyncpg/",)),
    ("aiohttp (with yarl, multidict)", ("/aiohttp/", "/yarl/", "/multidict/")),
    ("uvicorn + httptools", ("/uvicorn/", "/httptools/")),
    ("metrics (prometheus_client)", ("/prometheus_client/",)),
    ("Starlette/FastAPI routing and middleware", ("/starlette/", "/fastapi/")),
    ("vault (cryptography)", ("/cryptography/",)),
    ("thread pool (asyncio.to_thread)", ("/concurrent/futures/",)),
    ("our code (app/)", ("/app/",)),
]
LOOP = "event loop (uvloop's C loop, asyncio)"
LOOP_PATHS = ("/asyncio/", "/uvloop/")

# Cost centres reported inclusively: label -> (function name or None, path fragment); a sample
# counts when any frame matches.
WATCH: dict[str, list[tuple[str | None, str]]] = {
    "the proxy handler (Proxy.handle)": [("Proxy.handle", "/app/proxy/handler.py")],
    "grant lookup (GrantLookup.find: the grant cache, or pool checkout and one SELECT)": [("GrantLookup.find", "/app/proxy/grants.py")],
    "BEGIN sent by SQLAlchemy's autobegin (audit writer, usage)": [(None, "_start_transaction")],
    "ROLLBACK when the connection returns to the pool": [("Transaction.rollback", "/asyncpg/transaction.py")],
    "new PostgreSQL connections (pool overflow churn)": [(None, "/asyncpg/connect_utils.py")],
    "rate limits (RateLimits.check)": [(None, "/limits/"), (None, "/app/proxy/rate_limits.py")],
    "thread pool work (asyncio.to_thread)": [(None, "/concurrent/futures/")],
    "the upstream call (aiohttp)": [(None, "/aiohttp/")],
    "uvicorn's send (response to the socket)": [("RequestResponseCycle.send", "/uvicorn/")],
    "logging (structlog, logging), anywhere": [(None, "/structlog/"), (None, "/logging/__init__.py")],
    "metrics (prometheus_client), anywhere": [(None, "/prometheus_client/")],
    "PHI audit writer (app/audit/writer.py: lock, last hash, hashes, COPY)": [(None, "/app/audit/writer.py")],
    "Salesmsg budget (UpstreamBudget.acquire: the ledger row FOR UPDATE, JSON)": [
        ("UpstreamBudget.acquire", "/app/proxy/budget.py"), (None, "/app/proxy/budget_stores.py")],
    "dropped access-log line (structlog chain at WARNING)": [("RequestContextMiddleware._log", "/app/core/middleware.py"),
                                                             ("BoundLogger.info", "/structlog/")],
}


def py_spy() -> str | None:
    """The py-spy binary of this virtualenv; installed (pinned) with pip when missing."""
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found:
        return found
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"py-spy=={PY_SPY_VERSION}"],
                          capture_output=True, text=True)
    if done.returncode == 0 and candidate.exists():
        return str(candidate)
    return None


def record(pid: int, *, seconds: int, out: Path, rate: int = 250) -> tuple[bool, str]:
    binary = py_spy()
    if binary is None:
        return False, f"py-spy is not installed and `pip install py-spy=={PY_SPY_VERSION}` failed"
    argv = [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate), "--nonblocking",
            "--full-filenames", "--format", "raw", "--output", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        return False, f"py-spy failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    return True, ""


def _frames(stack: str) -> list[str]:
    """The frames below the event loop's ``run`` (process start-up and uvicorn's ``Server.run`` above it
    are the same in every sample); a sample whose leaf is ``run`` itself is time in uvloop's C loop."""
    frames = [f for f in stack.split(";") if f.endswith(")") and ":" in f]
    for i in range(len(frames) - 1, -1, -1):
        if "/asyncio/runners.py" in frames[i]:
            return frames[i:]
    return frames


def _category(frame: str) -> str | None:
    path = frame[frame.rfind("(") + 1:]
    for name, needles in CATEGORIES:
        if any(n in path for n in needles):
            return name
    return None


def _matches(frame: str, func: str | None, fragment: str) -> bool:
    return fragment in frame and (func is None or frame.startswith(func + " ("))


def _short(frame: str) -> str:
    name, _, rest = frame.partition(" (")
    path = rest.rstrip(")")
    path, _, line = path.rpartition(":")
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif "/app/" in path:
        path = path[path.rfind("/app/") + 1:]
    elif "/lib/python3." in path:
        path = "stdlib/" + path.split("/lib/python3.", 1)[1].split("/", 1)[1]
    return f"{name} ({path}:{line})"


def summarise(path: Path, *, rate: int, seconds: int) -> dict:
    by_category: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        leaf[_short(frames[-1])] += count
        charged = None
        for frame in reversed(frames):
            charged = _category(frame)
            if charged is not None:
                break
        if charged is None:
            charged = LOOP if any(any(p in f for p in LOOP_PATHS) for f in frames) else "other (stdlib, interpreter)"
        by_category[charged] += count
        for label, needles in WATCH.items():
            if any(_matches(f, func, fragment) for f in frames for func, fragment in needles):
                inclusive[label] += count
    pct = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "busy_share_of_one_core": round(total / (rate * seconds), 2) if seconds else None,
        "by_category_pct": {k: pct(v) for k, v in by_category.most_common()},
        "top_leaf_frames_pct": {k: pct(v) for k, v in leaf.most_common(15)},
        "inclusive_pct": {k: pct(inclusive[k]) for k in WATCH},
    }
