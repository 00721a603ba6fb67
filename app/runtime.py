"""What the lifespan holds: settings, the database, the pooled HTTP client to Salesmsg."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import aiohttp

from app.audit.writer import AuditWriter
from app.connections.refresh import Refresher
from app.connections.webhooks import WebhookSender
from app.core import tracing
from app.core.db import Database, create_engine
from app.core.migrate import head_revision
from app.core.settings import Settings
from app.identity.key_usage import UsageRecorder
from app.proxy.budget import UpstreamBudget
from app.proxy.budget_stores import budget_store
from app.proxy.grant_cache import GrantCache, GrantChannel
from app.proxy.grants import GrantLookup
from app.proxy.handler import Proxy
from app.proxy.idempotency import Idempotency
from app.proxy.rate_limits import RateLimits
from app.proxy.upstream import Upstream
from app.vault.envelope import DataKeyCache, Keyring
from app.worker import Worker


def create_http_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled session per process for every call to Salesmsg (aiohttp: httpx's pool collapses
    under the proxy's concurrency, docs/architecture.md)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(
        total=settings.salesmsg_timeout_seconds, sock_connect=settings.salesmsg_connect_timeout_seconds
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        raise_for_status=False,
        # Cookies from Salesmsg must not leak from one tenant's call into another's.
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "salesmsg-connect"},
        trace_configs=tracing.client_trace_configs() or None,  # a client span per attempt when tracing is on
    )


@dataclass
class Runtime:
    settings: Settings
    db: Database
    http: aiohttp.ClientSession
    migration_head: str
    keyring: Keyring
    data_keys: DataKeyCache
    refresher: Refresher
    audit_writer: AuditWriter
    usage: UsageRecorder
    rate_limits: RateLimits
    proxy: Proxy
    upstream: Upstream
    idempotency: Idempotency
    grant_channel: GrantChannel | None = None
    worker: Worker | None = field(default=None)

    @classmethod
    async def start(cls, settings: Settings, *, serving: bool = False) -> "Runtime":
        """``serving``: this process answers requests (``serve``), so its proxy keeps a grant cache
        and listens for grant changes; the worker and the command line do neither."""
        db = Database(create_engine(settings))
        tracing.trace_engine(db.engine)  # nothing when tracing is off
        http = create_http_session(settings)
        keyring = Keyring(settings.keyring_entries)
        data_keys = DataKeyCache(keyring)
        refresher = Refresher(db=db, http=http, settings=settings, data_keys=data_keys)
        audit_writer = AuditWriter(db)
        usage = UsageRecorder(db)
        rate_limits = RateLimits(settings)
        budget = UpstreamBudget(settings=settings, store=budget_store(settings, db))
        upstream = Upstream(settings=settings, http=http, refresher=refresher, budget=budget)
        idempotency = Idempotency(db, ttl=timedelta(hours=settings.idempotency_ttl_hours),
                                  wait_seconds=settings.salesmsg_timeout_seconds + 5)
        grant_cache = grant_channel = None
        if serving and db.is_postgres and settings.grant_cache:
            grant_cache = GrantCache()
            grant_cache.watch_engine(db.engine)
            grant_channel = GrantChannel.for_engine(grant_cache, db.engine)
        proxy = Proxy(
            settings=settings, grants=GrantLookup(db, cache=grant_cache), upstream=upstream, idempotency=idempotency, data_keys=data_keys,
            audit_writer=audit_writer, usage=usage, rate_limits=rate_limits, traced=tracing.active(),
        )
        runtime = cls(
            settings=settings,
            db=db,
            http=http,
            migration_head=head_revision(),
            keyring=keyring,
            data_keys=data_keys,
            refresher=refresher,
            audit_writer=audit_writer,
            usage=usage,
            rate_limits=rate_limits,
            proxy=proxy,
            upstream=upstream,
            idempotency=idempotency,
            grant_channel=grant_channel,
        )
        if grant_channel is not None:
            grant_channel.start()
        audit_writer.start()
        usage.start()
        return runtime

    def new_worker(self) -> Worker:
        sender = WebhookSender(db=self.db, http=self.http, settings=self.settings, data_keys=self.data_keys)
        return Worker(refresher=self.refresher, webhooks=sender)

    def start_worker(self) -> None:
        self.worker = self.new_worker()
        self.worker.start()

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        if self.grant_channel is not None:
            await self.grant_channel.stop()
        await self.usage.stop()
        await self.idempotency.close()
        await self.audit_writer.stop()
        await self.rate_limits.close()
        await self.upstream.budget.close()
        await self.http.close()
        await self.db.dispose()
