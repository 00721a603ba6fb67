"""A fleet on one machine: app replicas (`serve --workers 2`, each its own process group), one
`worker`, and nginx (Debian's package) balancing them, on one PostgreSQL and one Redis.

What the fleet runs is written down once here (``REPLICA_COMMAND``, ``WORKER_COMMAND``,
``SHARED_ENV``, ``NGINX_PROXY``) and the compose profile is checked against it
(tests/foundation/test_compose_fleet.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.processes import CLI, ROOT
from tests.support.tcp_proxy import free_port

REPLICA_COMMAND = ("serve", "--workers", "2")
WORKER_COMMAND = ("worker",)
# what every replica and the worker must share, so that state and limits are one
SHARED_ENV = ("SMC_DATABASE_URL", "SMC_REDIS_URL", "SMC_MASTER_KEYS", "SMC_SESSION_SECRET", "SMC_SALESMSG_CLIENT_ID",
              "SMC_SALESMSG_CLIENT_SECRET", "SMC_SALESMSG_API_BASE", "SMC_PUBLIC_URL")
# the balancer's proxy rules (deploy/nginx/salesmsg-connect.conf holds the same): HTTP/1.1 keep-alive
# to the replicas, a replica that refuses or resets a connection is skipped for a few seconds, a
# request that failed on its way to a replica is tried on the next one (never a POST: nginx does not
# resend one), and a slow answer is never resent (it could spend Salesmsg's budget twice)
NGINX_PROXY = (
    "proxy_http_version 1.1;",
    'proxy_set_header Connection "";',
    "proxy_set_header Host $http_host;",
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Forwarded-Proto $scheme;",
    "proxy_next_upstream error;",
    "proxy_connect_timeout 2s;",
    "proxy_read_timeout 60s;",
    "client_max_body_size 11m;",
)
NGINX_SERVER_OPTIONS = "max_fails=1 fail_timeout=2s"

_CONFIG = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user_line}
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    upstream salesmsg_connect {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://salesmsg_connect;
{proxy}
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@dataclass
class Member:
    """One process group of the fleet (a replica with its workers, the worker, nginx)."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _signal_group(self, sig: signal.Signals) -> None:
        """The whole group, even when its leader is gone (its worker processes may not be)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group: the replica and its worker processes die at once, mid-request."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # whatever of the group is left

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    env: dict[str, str]
    root: Path
    replicas: int = 3
    ports: list[int] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    worker: Member | None = None
    nginx: Member | None = None
    port: int = 0

    def __enter__(self) -> Fleet:
        try:
            self.ports = [free_port() for _ in range(self.replicas)]
            for i, port in enumerate(self.ports):
                member = Member([*CLI, *REPLICA_COMMAND, "--port", str(port)], self.env, self.root / f"replica-{i}.log")
                member.start()
                self.members.append(member)
            self.worker = Member([*CLI, *WORKER_COMMAND], self.env, self.root / "worker.log")
            self.worker.start()
            for i in range(self.replicas):
                self.wait_healthy(i)
            self.port = free_port()
            self.nginx = Member(self._nginx_argv(), dict(os.environ), self.root / "nginx.out")
            self.nginx.start()
            _wait(f"http://127.0.0.1:{self.port}/healthz", self.nginx)
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        for member in [self.nginx, self.worker, *self.members]:
            if member is not None:
                member.stop()

    def _nginx_argv(self) -> list[str]:
        binary = nginx_binary()
        assert binary is not None, "nginx is missing: apt-get install -y nginx (.ci/run installs it)"
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{p} {NGINX_SERVER_OPTIONS};" for p in self.ports)
        proxy = "\n".join(f"            {line}" for line in NGINX_PROXY)
        config = self.root / "nginx.conf"
        config.write_text(_CONFIG.format(root=self.root, port=self.port, servers=servers, proxy=proxy,
                                         user_line="user root;" if os.geteuid() == 0 else ""))
        return [binary, "-e", str(self.root / "error.log"), "-p", str(self.root), "-c", str(config)]

    def url(self, path: str) -> str:
        """Through the balancer."""
        return f"http://127.0.0.1:{self.port}{path}"

    def replica_url(self, i: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[i]}{path}"

    def wait_healthy(self, i: int) -> None:
        _wait(self.replica_url(i, "/healthz"), self.members[i])

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def restart(self, i: int) -> None:
        self.members[i].start()
        self.wait_healthy(i)


def _wait(url: str, member: Member, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if member.proc is not None and member.proc.poll() is not None:
            raise RuntimeError(f"{member.argv[:3]} exited with {member.proc.returncode}:\n{member.log()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer:\n{member.log()[-4000:]}")
