"""The compose file's fleet profile runs what the fleet test runs (no Docker engine runs here, so
the file is compared with tests/support/fleet.py instead of started)."""

from __future__ import annotations

import re
import shlex

import yaml

from app.core.settings import Settings
from tests.support.fleet import NGINX_PROXY, NGINX_SERVER_OPTIONS, REPLICA_COMMAND, SHARED_ENV, WORKER_COMMAND
from tests.support.processes import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
FLEET = {name: s for name, s in COMPOSE["services"].items() if "fleet" in s.get("profiles", [])}
REPLICAS = sorted(name for name in FLEET if name.startswith("replica-"))


def _start_command() -> list[str]:
    """What the image runs by default: scripts/docker-start.sh's final exec, with WORKERS filled in."""
    line = next(x for x in (ROOT / "scripts" / "docker-start.sh").read_text().splitlines() if x.startswith("exec "))
    return shlex.split(line.removeprefix("exec "))


def test_the_fleet_profile_has_replicas_a_worker_redis_and_a_balancer():
    assert len(REPLICAS) >= 2
    assert {"worker", "redis", "balancer"} <= set(FLEET)
    assert "fleet" not in COMPOSE["services"]["postgres"].get("profiles", [])  # shared with the default profile


def test_replicas_run_serve_with_two_workers_as_the_fleet_test_does():
    command = _start_command()
    assert command[:2] == ["salesmsg-connect", REPLICA_COMMAND[0]]
    workers = command[command.index("--workers") + 1]
    assert workers == '${WORKERS:-2}'
    for name in REPLICAS:
        assert "command" not in FLEET[name]  # the image's start script: wait for the database, migrate, serve
        assert FLEET[name]["environment"]["WORKERS"] == REPLICA_COMMAND[REPLICA_COMMAND.index("--workers") + 1]
    assert FLEET["worker"]["command"] == ["salesmsg-connect", *WORKER_COMMAND]


def test_replicas_and_the_worker_share_the_database_redis_and_secrets():
    members = [*REPLICAS, "worker"]
    environments = [FLEET[name]["environment"] for name in members]
    for variable in SHARED_ENV:
        values = {env.get(variable) for env in environments}
        assert len(values) == 1 and None not in values, (variable, values)
    env = environments[0]
    assert env["SMC_REDIS_URL"].startswith("redis://redis:")
    assert "@postgres:" in env["SMC_DATABASE_URL"]
    known = set(Settings.model_fields)
    assert all(v.removeprefix("SMC_").lower() in known for v in env if v.startswith("SMC_"))


def test_the_balancer_proxies_to_every_replica_with_the_fleet_tests_rules():
    balancer = FLEET["balancer"]
    mount = next(v for v in balancer["volumes"] if "nginx" in v)
    conf = (ROOT / mount.split(":")[0]).read_text()
    for line in NGINX_PROXY:
        assert line in conf, line
    servers = re.findall(r"server\s+([\w.-]+):(\d+)\s+([^;]*);", conf)
    assert sorted(host for host, _, _ in servers) == REPLICAS
    assert all(options == NGINX_SERVER_OPTIONS for _, _, options in servers)
    assert balancer["ports"] == ["127.0.0.1:8080:80"]
    assert set(balancer["depends_on"]) == set(REPLICAS)
