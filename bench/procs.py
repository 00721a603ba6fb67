"""Processes of the bench: free ports, start in their own process group, wait, stop every one.

Every process is started with ``start_new_session=True`` so that it and its children (uvicorn
workers, nginx workers) form one process group the bench created, and stopping it means
signalling that group by its id. ``Registry.stop_all`` runs from ``finally`` and ``atexit``.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def log(message: str) -> None:
    """Progress goes to stderr; only the final table goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """One background process with its log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, *, status: int = 200, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                answer = httpx.get(url, timeout=2, trust_env=False)
                if answer.status_code == status:
                    return
                last = answer.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {url} did not answer {status} (last: {last!r}):\n{self.tail()}")

    def children(self) -> list[int]:
        """Direct children (uvicorn's worker processes), from /proc."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.pid:
                found.append(int(entry.name))
        return sorted(found)

    def workers(self) -> list[int]:
        """uvicorn's worker processes (multiprocessing spawn children, not the resource tracker)."""
        pids = []
        for pid in self.children():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return pids

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Children that outlived their parent (they share our process group id).
        self._signal_group(signal.SIGKILL)
        if not self._log.closed:
            self._log.close()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Registry:
    """Every process the bench started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.cleanups: list[tuple[str, object]] = []
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_dir: Path) -> Proc:
        proc = Proc(name, argv, env=env, cwd=cwd, log_path=log_dir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def on_exit(self, label: str, fn) -> None:
        """A clean-up (drop the database, remove a folder) run after the processes stop."""
        self.cleanups.append((label, fn))

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log(f"could not stop {proc.name} ({proc.pid}): {exc}")
        while self.cleanups:
            label, fn = self.cleanups.pop()
            try:
                fn()  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001
                log(f"clean-up {label} failed: {exc}")


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C, so ``finally`` blocks and atexit clean up."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    return [head.split("(", 1)[1], *rest.split()]  # [comm, state, ppid, pgrp, ...]


def cpu_seconds_of_group(pgid: int) -> float:
    """CPU (user + system) of every live process in a process group the bench started."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if fields and int(fields[3]) == pgid:
            total += int(fields[12]) + int(fields[13])
    return total / _TICK


def cpu_seconds_of_pids(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        fields = _stat(pid)
        if fields:
            found[pid] = (int(fields[12]) + int(fields[13])) / _TICK
    return found


def connections_per_process(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections on local ``port`` held by each process (from /proc/net/tcp*)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    found = {}
    for pid in pids:
        count = 0
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    count += 1
        except OSError:
            pass
        found[pid] = count
    return found
