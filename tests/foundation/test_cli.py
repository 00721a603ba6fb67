"""The command line as an operator runs it: real processes, real database."""

from __future__ import annotations

import pytest

from app import __version__
from tests.support.processes import Served, clean_env, run_cli
from tests.support.tcp_proxy import TcpFaultProxy, free_port


def test_version():
    result = run_cli("version", env=clean_env())
    assert result.returncode == 0
    assert result.stdout.strip() == __version__


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({}, "SMC_SESSION_SECRET"),
        ({"SMC_SESSION_SECRET": "x" * 48}, "SMC_MASTER_KEYS"),
        (
            {
                "SMC_SESSION_SECRET": "x" * 48,
                "SMC_MASTER_KEYS": "k1:" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=",
            },
            "SMC_SALESMSG_CLIENT_SECRET",
        ),
    ],
)
def test_production_refuses_example_secrets_and_names_them(overrides, named, tmp_path):
    env = clean_env(SMC_ENV="production", SMC_DATABASE_URL=f"sqlite:///{tmp_path}/x.db", **overrides)
    result = run_cli("serve", "--port", str(free_port()), env=env, timeout=60)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_setting_is_a_clear_message(tmp_path):
    env = clean_env(SMC_DATABASE_URL="mysql://nope", SMC_PUBLIC_URL="not a url")
    result = run_cli("db", "upgrade", env=env)
    assert result.returncode == 2
    assert "SMC_DATABASE_URL" in result.stderr and "SMC_PUBLIC_URL" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("requires_postgres")
def test_upgrade_then_serve_on_postgres_and_readyz_follows_the_database(database_url, tmp_path):
    """`db upgrade` then `serve` answers /readyz 200; with the database gone, 503 and still up."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    with TcpFaultProxy(url.host or "127.0.0.1", url.port or 5432) as pg:
        via_proxy = url.set(host="127.0.0.1", port=pg.port).render_as_string(hide_password=False)
        env = clean_env(SMC_DATABASE_URL=via_proxy)
        assert run_cli("db", "upgrade", env=env).returncode == 0
        port = free_port()
        with Served("serve", "--port", str(port), env=env, log_path=tmp_path / "serve.log") as server:
            base = f"http://127.0.0.1:{port}"
            server.wait_for(base + "/readyz", status=200)
            pg.down()
            server.wait_for(base + "/readyz", status=503, timeout=20)
            server.wait_for(base + "/healthz", status=200)
            pg.up()
            server.wait_for(base + "/readyz", status=200, timeout=20)
            assert server.proc.poll() is None
