"""Run our own CLI as a real process, as a deployment would, and wait for it to answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "app"]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMC_")}
    env.update(overrides)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Served:
    """A `salesmsg-connect ...` process in the background, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, *args: str, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*CLI, *args], env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_for(self, url: str, *, status: int = 200, timeout: float = 60) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()}")
            try:
                response = httpx.get(url, timeout=2)
                if response.status_code == status:
                    return response
                last = response.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not answer {status} (last: {last}):\n{self.log()}")

    def wait_until(self, condition, *, what: str, timeout: float = 60) -> None:
        """Until ``condition()`` is true while the process runs (checked every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode} before {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
