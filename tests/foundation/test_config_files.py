"""The shipped configuration files name only real settings, and every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REAL = {f"SMC_{name.upper()}" for name in Settings.model_fields}


def test_every_smc_variable_in_docker_compose_is_a_real_setting():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    used: set[str] = set()
    for service in compose["services"].values():
        env = service.get("environment", {})
        names = env.keys() if isinstance(env, dict) else (item.split("=", 1)[0] for item in env)
        used.update(n for n in names if n.startswith("SMC_"))
    assert used, "compose sets no SMC_ variable"
    assert used <= REAL, f"not settings: {sorted(used - REAL)}"
    assert compose["services"]["app"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["postgres"]
    assert "demo" in compose["services"]["emulator"]["profiles"]


def test_env_example_documents_every_setting_and_nothing_else():
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s?(SMC_[A-Z0-9_]+)=", text, flags=re.M))
    assert documented - REAL == set(), f"not settings: {sorted(documented - REAL)}"
    assert REAL - documented == set(), f"undocumented: {sorted(REAL - documented)}"


def test_env_example_values_are_valid_settings(monkeypatch):
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("SMC_"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value.strip('"'))
    settings = Settings(_env_file=None)
    assert not settings.is_production
    assert settings.insecure_settings()  # the examples are exactly what production refuses


def test_dockerfile_runs_as_non_root_and_migrates_before_serving():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") >= 2
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.M)
    start = (ROOT / "scripts" / "docker-start.sh").read_text()
    assert start.index("connect db upgrade") < start.index("connect serve")
