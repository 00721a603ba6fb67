"""Delivering connection events to a tenant's webhook URL.

Each delivery is a JSON POST signed with HMAC-SHA256 over ``"{timestamp}.{body}"`` under the
tenant's webhook secret (sealed in the vault), sent as::

    X-SMC-Timestamp: 1764170000
    X-SMC-Signature: v1=<hex digest>
    X-SMC-Event: refreshed
    X-SMC-Delivery: <delivery id>

A receiver recomputes the digest and rejects timestamps older than a few minutes. Failed
deliveries are retried with jittered exponential backoff up to ``SMC_WEBHOOK_MAX_ATTEMPTS``;
``webhook_deliveries`` is the delivery log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.db import Database
from app.core.errors import ValidationFailed
from app.core.logs import get_logger
from app.core.metrics import WEBHOOKS
from app.core.models import ConnectionEvent, Tenant, WebhookDelivery
from app.core.settings import Settings
from app.kit.backoff import jittered
from app.vault.envelope import DataKeyCache
from app.vault.tenant_keys import data_key_for, load_data_key

log = get_logger(__name__)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: int = 300) -> bool:
    """What a receiver does (our tests use it too)."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def validate_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password or len(url) > 2000:
        raise ValidationFailed("A webhook URL is an absolute http(s) URL without credentials.", code="invalid_webhook_url")
    return url.strip()


async def set_webhook(
    session: AsyncSession, cache: DataKeyCache, tenant: Tenant, *, url: str | None, actor: Actor, request_id: str | None = None
) -> str | None:
    """Set or clear the tenant's webhook URL; a new secret is made and returned once."""
    if not url:
        tenant.webhook_url = None
        tenant.webhook_secret_ct = None
        await audit_log.record(session, "webhook.clear", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id)
        return None
    tenant.webhook_url = validate_url(url)
    secret = "whsec_" + secrets.token_urlsafe(32)
    key = await data_key_for(session, cache, tenant.id)
    tenant.webhook_secret_ct = key.seal(secret, owner=tenant.id, field="webhook_secret")
    await audit_log.record(session, "webhook.set", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
                       details={"url_host": urlsplit(url).hostname})
    return secret


class WebhookSender:
    def __init__(self, *, db: Database, http: aiohttp.ClientSession, settings: Settings, data_keys: DataKeyCache) -> None:
        self.db = db
        self.http = http
        self.settings = settings
        self.data_keys = data_keys

    async def deliver_due(self, *, limit: int = 50) -> int:
        """Send the deliveries that are due; returns how many were attempted."""
        now = datetime.now(UTC)
        async with self.db.session() as session:
            query = (
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            )
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            ids = list((await session.scalars(query)).all())
            # Claim them for a while so another worker skips them; a crash makes them due again.
            for delivery in (await session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))).all():
                delivery.next_attempt_at = now + timedelta(seconds=self.settings.webhook_timeout_seconds * 3)
        await asyncio.gather(*(self._deliver(i) for i in ids))
        return len(ids)

    async def _deliver(self, delivery_id: int) -> None:
        async with self.db.session() as session:
            delivery = await session.get(WebhookDelivery, delivery_id)
            if delivery is None or delivery.status != "pending":
                return
            event = await session.get(ConnectionEvent, delivery.event_id)
            tenant = await session.get(Tenant, delivery.tenant_id)
            if event is None or tenant is None or tenant.webhook_secret_ct is None:
                delivery.status, delivery.last_error = "failed", "webhook removed"
                return
            key = await load_data_key(session, self.data_keys, tenant.id)
            secret = key.open_text(tenant.webhook_secret_ct, owner=tenant.id, field="webhook_secret")
            body = json.dumps(event.payload, separators=(",", ":"), sort_keys=True).encode()
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "salesmsg-connect-webhooks",
                "X-SMC-Timestamp": str(timestamp),
                "X-SMC-Signature": sign(secret, timestamp, body),
                "X-SMC-Event": event.type,
                "X-SMC-Delivery": str(delivery.id),
            }
            delivery.attempts += 1
            status, error = await self._post(delivery.url, body, headers)
            delivery.last_status_code = status
            if status is not None and 200 <= status < 300:
                delivery.status, delivery.delivered_at, delivery.last_error = "delivered", datetime.now(UTC), None
                WEBHOOKS.labels("delivered").inc()
                return
            delivery.last_error = error or f"HTTP {status}"
            if delivery.attempts >= self.settings.webhook_max_attempts:
                delivery.status = "failed"
                WEBHOOKS.labels("failed").inc()
            else:
                delivery.next_attempt_at = datetime.now(UTC) + timedelta(seconds=jittered(delivery.attempts, base=2.0, cap=3600.0))
                WEBHOOKS.labels("retry").inc()

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
        try:
            async with self.http.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds),
            ) as resp:
                await resp.read()
                return resp.status, None
        except asyncio.TimeoutError:
            return None, "timeout"
        except aiohttp.ClientError as exc:
            return None, type(exc).__name__
