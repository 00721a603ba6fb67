"""What the bench runs against: the emulator, a fresh PostgreSQL database, the app as production
runs it, a tenant connected through the real OAuth flow, an API key from the CLI, and the
10,000-tenant population of the scale test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from bench.procs import Proc, Registry, free_port, log

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple 42"
OPERATOR = "operator@bench.example"
CLIENT_ID = "bench-client"
ORG, USER = 3, 301
HOT_SLUG = "bench-hot"
SCOPES = ["conversations:read", "messages:read", "contacts:read", "teams:read", "users:read", "organizations:read"]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
REQUEST_ID = re.compile(r'name="request_id" value="([^"]+)"')


def scale_slug(i: int) -> str:
    return f"t-{i:05d}"


def scale_pat(i: int) -> str:
    return f"bench-pat-{i:05d}-{secrets.token_hex(12)}"


@dataclass
class World:
    tmp: Path
    registry: Registry
    server_url: str  # the PostgreSQL server (its maintenance database)
    tenants: int
    workers: int
    db_name: str = field(default_factory=lambda: f"smc_bench_{secrets.token_hex(4)}")
    emulator_port: int = field(default_factory=free_port)
    app_port: int = field(default_factory=free_port)
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    session_secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    master_key: bytes = field(default_factory=lambda: os.urandom(32))
    pats: list[str] = field(default_factory=list)
    emulator: Proc | None = None
    app: Proc | None = None
    api_key: str = ""
    hot_token: str = ""

    # -- addresses ------------------------------------------------------------------------

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    @property
    def api_base(self) -> str:
        return self.emulator_url + "/pub/v2.2"

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def database_url(self) -> str:
        return make_url(self.server_url).set(drivername="postgresql+asyncpg", database=self.db_name).render_as_string(
            hide_password=False
        )

    def _dsn(self, database: str | None = None) -> str:
        url = make_url(self.server_url).set(drivername="postgresql")
        if database:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    @property
    def master_keys(self) -> str:
        return "bench1:" + base64.b64encode(self.master_key).decode()

    def app_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMC_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            SMC_ENV="development",
            SMC_LOG_LEVEL="WARNING",
            SMC_DATABASE_URL=self.database_url,
            SMC_PUBLIC_URL=self.app_url,
            SMC_SESSION_SECRET=self.session_secret,
            SMC_MASTER_KEYS=self.master_keys,
            SMC_SALESMSG_API_BASE=self.api_base,
            SMC_SALESMSG_AUTHORIZE_URL=self.emulator_url + "/auth/oauth",
            SMC_SALESMSG_CLIENT_ID=CLIENT_ID,
            SMC_SALESMSG_CLIENT_SECRET=self.client_secret,
            SMC_RATE_LIMIT_PER_KEY="1000000/minute",
            SMC_RATE_LIMIT_PER_TENANT="1000000/minute",
            # the budget's ledger is on the measured path, its limit never binds (a bench is no Salesmsg)
            SMC_UPSTREAM_BUDGET_PER_MINUTE=os.environ.get("BENCH_BUDGET", "1000000000"),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    # -- the emulator -----------------------------------------------------------------------

    def start_emulator(self) -> None:
        self.pats = [scale_pat(i) for i in range(self.tenants)]
        config = {
            "clients": [{"client_id": CLIENT_ID, "client_secret": self.client_secret, "name": "Salesmsg Connect (bench)",
                         "redirect_uris": [self.app_url + "/oauth/callback"], "baa_signed": False}],
            "orgs": [{"id": ORG, "name": "Corner Bakery", "hipaa": False}],
            "users": [{"id": USER, "name": "Casey Placeholder", "email": "casey@corner-bakery.example", "org": ORG}],
            # The scale test's tenants connect with these PATs (used verbatim, never expiring), one each:
            # a PAT refresh revokes the old token, so they cannot be shared.
            "personal_access_tokens": [{"token": t, "user": USER, "scopes": SCOPES} for t in self.pats],
            "rate_limit_per_minute": 0,
            "controls_enabled": True,
            "contacts_per_org": 60,
            "conversations_per_org": 60,
        }
        path = self.tmp / "emulator.json"
        path.write_text(json.dumps(config))
        log(f"starting the emulator on :{self.emulator_port} ({len(self.pats)} PATs in its config)")
        self.emulator = self.registry.start(
            "emulator", [sys.executable, "-m", "salesmsg_emulator", "--port", str(self.emulator_port), "--config", str(path)],
            env=self.app_env(), cwd=self.tmp, log_dir=self.tmp,
        )
        self.emulator.wait_http(self.emulator_url + "/_emulator/health", timeout=90)

    def counters(self) -> dict[str, int]:
        return httpx.get(self.emulator_url + "/_emulator/counters", timeout=10, trust_env=False).json()

    def control(self, path: str, body: dict) -> dict:
        answer = httpx.post(self.emulator_url + "/_emulator" + path, json=body, timeout=30, trust_env=False)
        answer.raise_for_status()
        return answer.json()

    # -- the database ---------------------------------------------------------------------------

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self._dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def create_database(self) -> None:
        from app.core.migrate import upgrade

        try:
            asyncio.run(self._admin(f'CREATE DATABASE "{self.db_name}"'))
        except (OSError, asyncpg.PostgresError) as exc:
            raise SystemExit(
                f"bench: cannot create a database on {make_url(self.server_url).render_as_string()} ({exc}). "
                "Start PostgreSQL or set BENCH_DATABASE_URL=postgresql://user@host:port/db"
            ) from None
        self.registry.on_exit(f"drop database {self.db_name}", self.drop_database)
        log(f"database {self.db_name} created; migrating")
        upgrade(self.database_url)

    def drop_database(self) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        log(f"database {self.db_name} dropped")

    async def sql(self, query: str, *args) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self._dsn(self.db_name))
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    def fetch(self, query: str, *args) -> list[asyncpg.Record]:
        return asyncio.run(self.sql(query, *args))

    # -- the app ----------------------------------------------------------------------------------

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([str(BIN / "salesmsg-connect"), *args], env=self.app_env(), cwd=self.tmp, input=stdin,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"salesmsg-connect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start_app(self, workers: int, *, name: str = "app", app_tree: Path | None = None,
                  extra_env: dict[str, str] | None = None) -> Proc:
        """``salesmsg-connect serve --workers N``, as production runs it (uvicorn, uvloop, httptools);
        ``extra_env`` overrides settings (the ``fast`` section points SMC_SALESMSG_API_BASE elsewhere)."""
        log(f"starting the app: serve --workers {workers} on :{self.app_port}"
            + (f" ({', '.join(f'{k}={v}' for k, v in extra_env.items())})" if extra_env else ""))
        env = self.app_env(**(extra_env or {}))
        if app_tree is None:
            argv = [str(BIN / "salesmsg-connect"), "serve", "--port", str(self.app_port), "--workers", str(workers)]
        else:  # a scratch copy of app/ (bench.compare): same command, another package on the path
            env["PYTHONPATH"] = str(app_tree)
            env["SMC_HOME"] = str(ROOT)
            argv = [sys.executable, "-m", "app", "serve", "--port", str(self.app_port), "--workers", str(workers)]
        self.app = self.registry.start(name, argv, env=env, cwd=self.tmp, log_dir=self.tmp)
        self.app.wait_http(self.app_url + "/readyz", timeout=90)
        return self.app

    def stop_app(self) -> None:
        if self.app is not None:
            self.registry.stop(self.app)
            self.app = None

    # -- the hot tenant, connected through the real OAuth flow --------------------------------------

    async def _operator_and_tenant(self) -> None:
        from app.audit.audit_log import Actor
        from app.core.db import Database, create_engine
        from app.core.settings import Settings
        from app.identity import people
        from app.tenants import registry
        from app.vault.envelope import Keyring

        settings = Settings(database_url=self.database_url, master_keys=self.master_keys, session_secret=self.session_secret)
        db = Database(create_engine(settings))
        try:
            async with db.session() as session:
                await people.create_user(session, email=OPERATOR, password=PASSWORD, role="operator", actor=Actor.system())
            async with db.session() as session:
                await registry.create_tenant(session, keyring=Keyring(settings.keyring_entries), slug=HOT_SLUG,
                                            name="Bench Hot", hipaa=False, actor=Actor.system())
        finally:
            await db.dispose()

    def browser(self) -> httpx.Client:
        """A signed-in operator's browser (cookies kept); close it with ``contextlib.closing``."""
        client = httpx.Client(base_url=self.app_url, timeout=30, trust_env=False)
        page = client.get("/login")
        answer = client.post("/login", data={"email": OPERATOR, "password": PASSWORD, "csrf_token": _csrf(page.text)})
        if answer.status_code != 303:
            raise RuntimeError(f"sign-in failed: {answer.status_code} {answer.text[:300]}")
        return client

    def connect_hot_tenant(self) -> None:
        """Sign in as an operator, consent, approve at the emulator, follow the callback."""
        asyncio.run(self._operator_and_tenant())
        with closing(self.browser()) as app, httpx.Client(timeout=30, trust_env=False) as emulator:
            page = app.get(f"/t/{HOT_SLUG}/connect")
            form = {"csrf_token": _csrf(page.text), "scope": SCOPES}
            started = app.post(f"/t/{HOT_SLUG}/connect", data=form)
            if started.status_code != 303:
                raise RuntimeError(f"consent failed: {started.status_code} {started.text[:300]}")
            authorize = emulator.get(started.headers["location"])
            found = REQUEST_ID.search(authorize.text)
            if authorize.status_code != 200 or not found:
                raise RuntimeError(f"the emulator's approve page: {authorize.status_code} {authorize.text[:300]}")
            decided = emulator.post(self.emulator_url + "/auth/oauth/decision",
                                    data={"request_id": found.group(1), "user_id": str(USER), "decision": "approve"})
            callback = urlsplit(decided.headers["location"])
            done = app.get(f"{callback.path}?{callback.query}")
            if done.status_code != 303:
                raise RuntimeError(f"callback failed: {done.status_code} {done.text[:300]}")
        rows = self.fetch("select c.status, c.kind from connections c join tenants t on t.id = c.tenant_id where t.slug = $1",
                          HOT_SLUG)
        if not rows or rows[0]["status"] != "active":
            raise RuntimeError(f"the hot tenant is not connected: {rows}")
        log(f"tenant {HOT_SLUG} connected through the OAuth flow ({rows[0]['kind']})")
        self.hot_token = asyncio.run(self._access_token(HOT_SLUG))

    async def _access_token(self, slug: str) -> str:
        """The tenant's access token, opened with the vault (for the direct, nginx and bare targets)."""
        from app.vault.envelope import DataKeyCache, Keyring

        rows = await self.sql(
            "select c.id, c.access_token_ct, t.id as tenant_id, k.id as key_id, k.master_key_id, k.wrapped_key "
            "from connections c join tenants t on t.id = c.tenant_id join tenant_keys k on k.tenant_id = t.id where t.slug = $1",
            slug,
        )
        row = rows[0]
        cache = DataKeyCache(Keyring([("bench1", self.master_key)]))
        key = cache.get(key_id=row["key_id"], tenant_id=row["tenant_id"], master_key_id=row["master_key_id"],
                        wrapped=row["wrapped_key"])
        return key.open_text(row["access_token_ct"], owner=row["id"], field="access_token")

    def create_api_key(self) -> None:
        created = json.loads(self.cli("api-key", "create", "--name", "bench", "--json"))
        self.api_key = created["key"]
        log(f"API key {created['prefix']} created with the CLI (all tenants)")

    # -- 10,000 tenants -----------------------------------------------------------------------------

    async def insert_scale_tenants(self) -> list[tuple[str, str]]:
        """Tenants, data keys, PAT connections (tokens sealed by the vault) and one API key per tenant,
        inserted in batches in one transaction. Returns (slug, api key) pairs."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from sqlalchemy.ext.asyncio import create_async_engine

        from app.core.models import ApiKey, ApiKeyTenant, Connection, Tenant, TenantKey
        from app.identity import api_keys
        from app.kit.tokens import token_hash
        from app.vault.envelope import DataKey, Keyring, new_data_key_material

        keyring = Keyring([("bench1", self.master_key)])
        now = datetime.now(UTC)
        scopes = " ".join(sorted(SCOPES))
        rows: dict[str, list[dict]] = {"tenants": [], "keys": [], "conns": [], "api": [], "links": []}
        pairs: list[tuple[str, str]] = []
        for i, pat in enumerate(self.pats):
            tenant_id, key_id, conn_id, api_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            material = new_data_key_material()
            master_id, wrapped = keyring.wrap(material, tenant_id=tenant_id)
            data_key = DataKey(key_id, tenant_id, AESGCM(material))
            slug = scale_slug(i)
            prefix, key = api_keys.new_key()
            pairs.append((slug, key))
            rows["tenants"].append({"id": tenant_id, "slug": slug, "name": f"Tenant {i:05d}", "hipaa": False,
                                    "created_at": now, "updated_at": now})
            rows["keys"].append({"id": key_id, "tenant_id": tenant_id, "master_key_id": master_id, "wrapped_key": wrapped,
                                 "created_at": now})
            rows["conns"].append({
                "id": conn_id, "tenant_id": tenant_id, "kind": "pat", "status": "active", "scopes": scopes,
                "access_token_ct": data_key.seal(pat, owner=conn_id, field="access_token"), "refresh_token_ct": None,
                "access_expires_at": None, "version": 1, "refresh_failures": 0, "connected_at": now,
                "connected_by": "bench", "updated_at": now,
            })
            rows["api"].append({"id": api_id, "prefix": prefix, "key_hash": token_hash(key), "name": f"svc {slug}",
                                "all_tenants": False, "read_only": False, "operator": False, "created_by": "bench",
                                "created_at": now})
            rows["links"].append({"api_key_id": api_id, "tenant_id": tenant_id})
        engine = create_async_engine(self.database_url)
        try:
            async with engine.begin() as conn:
                for table, name in ((Tenant, "tenants"), (TenantKey, "keys"), (Connection, "conns"), (ApiKey, "api"),
                                    (ApiKeyTenant, "links")):
                    batch = rows[name]
                    for start in range(0, len(batch), 2000):
                        await conn.execute(insert(table), batch[start:start + 2000])
        finally:
            await engine.dispose()
        await self.sql("analyze")
        return pairs


def _csrf(html: str) -> str:
    found = CSRF.search(html)
    if not found:
        raise RuntimeError("no CSRF token on the page")
    return found.group(1)
