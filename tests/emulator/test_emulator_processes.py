"""Running the emulator: as a subprocess, through the CLI, in a thread; config files; persistence."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from salesmsg_emulator.config import ConfigError, default_config, load_config
from tests.support.emulator_controls import ControlledEmulator

from .support import AVERY, PAT_ACME, bearer, config_data, make_config

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Run:
    process: subprocess.Popen[str]
    output: str = ""


@contextmanager
def running(command: list[str], port: int) -> Iterator[Run]:
    """Start ``command``, wait until /_emulator/health answers; terminate it afterwards and keep its output."""
    run = Run(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_emulator/health", timeout=1, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                pass
            if run.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the emulator did not start (exit code {run.process.poll()})")
            time.sleep(0.05)
        yield run
    finally:
        run.process.terminate()
        try:
            run.output = run.process.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.output = run.process.communicate()[0]


def test_python_m_app_emulator_with_a_yaml_config(tmp_path: Path) -> None:
    config_file = tmp_path / "emulator.yaml"
    config_file.write_text(yaml.safe_dump(config_data()))
    port = free_port()
    command = [sys.executable, "-m", "salesmsg_emulator", "--port", str(port), "--config", str(config_file)]
    with running(command, port) as run:
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(base + "/_emulator/health", trust_env=False).json()
        assert health["client_ids"] == ["test-client", "baa-client", "narrow-client"]
        me = httpx.get(base + "/pub/v2.2/users/me", headers=bearer(PAT_ACME), trust_env=False)
        assert me.json()["id"] == AVERY
    assert run.process.returncode in (0, -signal.SIGTERM) and "Finished server process" in run.output  # graceful
    assert "test-client" in run.output and "test-secret" not in run.output


def test_cli_emulator_command_with_the_builtin_config() -> None:
    executable = Path(sys.executable).parent / "salesmsg-connect"
    command = [str(executable)] if executable.exists() else [sys.executable, "-c", "from app.cli import main; main()"]
    port = free_port()
    with running([*command, "emulator", "--host", "127.0.0.1", "--port", str(port)], port) as run:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/_emulator/health", trust_env=False).json()["client_ids"][0] == "demo-client"
        page = httpx.get(base + "/auth/oauth", trust_env=False, params={
            "response_type": "code", "client_id": "demo-client", "scope": "teams:read",
            "redirect_uri": "http://127.0.0.1:8000/oauth/callback",
        })  # fmt: skip
        assert page.status_code == 200 and 'name="user_id"' in page.text  # the real approve page
    assert run.process.returncode in (0, -signal.SIGTERM) and "Finished server process" in run.output  # graceful
    assert f"http://127.0.0.1:{port}" in run.output and "demo-client" in run.output
    assert "demo-secret" not in run.output


def test_cli_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: []\n")
    result = subprocess.run([sys.executable, "-m", "salesmsg_emulator", "--config", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2 and "invalid emulator config" in result.stderr


def test_example_config_is_valid_and_matches_the_default() -> None:
    example = load_config(REPO / "emulator.example.yaml")
    default = default_config()
    assert example.clients[0] == default.clients[0]
    assert example.orgs == default.orgs and example.users == default.users
    assert [p.token for p in example.personal_access_tokens] == [p.token for p in default.personal_access_tokens]
    assert example.controls_enabled and not example.auto_approve
    assert default.clients[0].redirect_uris == ["http://127.0.0.1:8000/oauth/callback",
                                                "http://localhost:8000/oauth/callback"]  # fmt: skip
    assert {o.name: o.hipaa for o in default.orgs} == {"Acme Clinic": True, "Bright Dental": True,
                                                       "Corner Bakery": False}  # fmt: skip


def test_json_config_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "emulator.json"
    path.write_text(json.dumps(config_data(persist_path="state.sqlite3", rate_limit_per_minute=10)))
    config = load_config(path)
    assert config.rate_limit_per_minute == 10 and config.persist_path == tmp_path / "state.sqlite3"
    for text in ("{", json.dumps(config_data(bogus=1)), json.dumps(config_data(users=[
            {"id": 1, "name": "A B", "email": "a@example.com", "org": 99}]))):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_config(path)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")


def test_persistence_survives_a_restart(tmp_path: Path, http: httpx.Client) -> None:
    config = make_config(persist_path=str(tmp_path / "state.sqlite3"))
    with ControlledEmulator(config) as first:
        created = http.post(first.api_base + "/contacts", headers=bearer(PAT_ACME),
                            json={"number": "+12025550196", "first_name": "Persisted"}).json()  # fmt: skip
        token = first.controls.issue_pat(AVERY, ["contacts:read"])
    with ControlledEmulator(config) as second:
        again = http.get(second.api_base + f"/contacts/{created['id']}", headers=bearer(token))
        assert again.status_code == 200 and again.json()["first_name"] == "Persisted"
    with ControlledEmulator(make_config(persist_path=str(tmp_path / "state.sqlite3"), seed=8)) as reseeded:
        assert http.get(reseeded.api_base + f"/contacts/{created['id']}", headers=bearer(PAT_ACME)).status_code == 404


def test_same_seed_same_data_across_instances(http: httpx.Client) -> None:
    def snapshot(seed: int) -> list[tuple[int, str, str]]:
        with ControlledEmulator(make_config(seed=seed)) as server:
            rows = http.get(server.api_base + "/conversations", headers=bearer(PAT_ACME), params={"limit": 100}).json()
            return sorted((c["id"], c["contact"]["full_name"], c["latest_message"]["body"]) for c in rows)

    assert snapshot(3) == snapshot(3)
    assert snapshot(3) != snapshot(4)


def test_emulator_server_stops_cleanly() -> None:
    before = set(threading.enumerate())
    server = ControlledEmulator(make_config()).start()
    url = server.url
    assert httpx.get(url + "/_emulator/health", trust_env=False).status_code == 200
    assert server.api_base == url + "/pub/v2.2" and server.authorize_url == url + "/auth/oauth"
    server.stop()
    assert set(threading.enumerate()) <= before
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/_emulator/health", trust_env=False)
    with pytest.raises(RuntimeError):
        _ = server.controls
