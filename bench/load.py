"""wrk as the one load generator: closed-loop max throughput, paced (fixed rate) runs, random tenants.

Every script ends with the same ``done`` hook, which prints one JSON line (``BENCH_RESULT {...}``)
with exact percentiles in microseconds, so nothing depends on wrk's human-readable output.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,' ..
    '"status":%.0f,"timeout":%.0f,"p50":%.0f,"p90":%.0f,"p99":%.0f,"mean":%.1f,"max":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

# The same request over and over (wrk builds it once); the Authorization header comes from -H.
FIXED = DONE

# Fixed arrival rate per thread (args[1] requests per second): each request gets the next slot of
# a schedule and waits for it (LuaJIT's FFI gives a monotonic clock in milliseconds). A backlog
# older than 50 ms is dropped rather than sent as a burst. wrk times a request from its send.
PACED = r"""
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
           int clock_gettime(int clk_id, bench_timespec *tp); ]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval, slot_at
init = function(args)
  interval = 1000 / tonumber(args[1])
end
delay = function()
  local now = now_ms()
  if slot_at == nil or slot_at < now - 50 then slot_at = now end
  local slot = slot_at
  slot_at = slot_at + interval
  local wait = slot - now
  if wait < 0 then return 0 end
  return wait
end
""" + DONE

# A random line of a file "tenant-slug api-key" per request (args[1] the file, args[2] a seed).
RANDOM_TENANT = r"""
local slugs, keys = {}, {}
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("thread_no", counter)
end
init = function(args)
  for line in io.lines(args[1]) do
    local slug, key = line:match("^(%S+) (%S+)$")
    if slug then slugs[#slugs + 1] = slug; keys[#keys + 1] = key end
  end
  math.randomseed(tonumber(args[2]) + 7919 * (thread_no or 0))
end
request = function()
  local i = math.random(#slugs)
  return wrk.format("GET", "/api/v1/tenants/" .. slugs[i] .. "/proxy/conversations?filter=open&limit=20",
                    {["Authorization"] = "Bearer " .. keys[i]})
end
""" + DONE


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    requests: int
    seconds: float
    socket_errors: int
    non_2xx: int
    wrk_cpu_s: float = 0.0
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items() if k != "wrk_cpu_s"}


class Wrk:
    def __init__(self, *, scripts_dir: Path, threads: int, connections: int, seconds: float) -> None:
        self.dir = scripts_dir
        self.threads = threads
        self.connections = connections
        self.seconds = seconds
        self.scripts = {}
        for name, text in (("fixed", FIXED), ("paced", PACED), ("random", RANDOM_TENANT)):
            path = scripts_dir / f"{name}.lua"
            path.write_text(text)
            self.scripts[name] = path

    def run(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        script: str = "fixed",
        args: list[str] | None = None,
        seconds: float | None = None,
        connections: int | None = None,
        threads: int | None = None,
    ) -> LoadResult:
        seconds = seconds or self.seconds
        argv = [
            "wrk", f"-t{threads or self.threads}", f"-c{connections or self.connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "10s", "-s", str(self.scripts[script]),
        ]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        argv.append(url)
        if args:
            argv += ["--", *args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {' '.join(argv)}\n{done.stdout}\n{done.stderr}")
        data = json.loads(line.split(" ", 1)[1])
        duration = data["duration_us"] / 1e6
        return LoadResult(
            rps=data["requests"] / duration if duration else 0.0,
            p50_ms=data["p50"] / 1000, p90_ms=data["p90"] / 1000, p99_ms=data["p99"] / 1000,
            mean_ms=data["mean"] / 1000, max_ms=data["max"] / 1000,
            requests=int(data["requests"]), seconds=duration,
            socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
            non_2xx=int(data["status"]),
            wrk_cpu_s=wrk_cpu,
        )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a list of samples."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
