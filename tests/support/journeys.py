"""Driving the product the way a browser does: sign in, consent, approve at the emulator, callback.

Our app is reached over ASGI (httpx.ASGITransport); the emulator over real loopback HTTP. A
``Browser`` keeps cookies like a browser and follows the redirect chain between the two by hand,
so every hop (consent POST, authorize page, decision POST, callback) is visible to tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx

from app.audit.audit_log import Actor
from app.core.models import Tenant, User
from app.identity import people
from app.runtime import Runtime
from app.tenants import registry
from salesmsg_emulator.config import (
    EmulatorConfig,
    MessageStatusDelays,
    OAuthClientConfig,
    OrgConfig,
    PatConfig,
    UserConfig,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD = "correct horse battery staple"
CLIENT_ID, CLIENT_SECRET = "connect-client", "connect-secret"
PUBLIC_URL = "http://127.0.0.1:8000"

# Emulator orgs and users (ids are Salesmsg's).
HIPAA_ORG, HIPAA_USER = 1, 101
PLAIN_ORG, PLAIN_USER = 3, 301
PLAIN_OTHER_USER = 302  # a second member of the plain org: seeded messages come from either
OTHER_HIPAA_ORG, OTHER_HIPAA_USER = 2, 201
PAT = "pat-test-plain-user-000000000000"


def emulator_config(*, baa_signed: bool = False) -> EmulatorConfig:
    """The upstream our tests connect to: our client, HIPAA and plain orgs, fast message states."""
    return EmulatorConfig(
        clients=[
            OAuthClientConfig(
                client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uris=[f"{PUBLIC_URL}/oauth/callback"],
                baa_signed=baa_signed,
            )
        ],
        orgs=[
            OrgConfig(id=HIPAA_ORG, name="Acme Clinic", hipaa=True),
            OrgConfig(id=OTHER_HIPAA_ORG, name="Bright Dental", hipaa=True),
            OrgConfig(id=PLAIN_ORG, name="Corner Bakery", hipaa=False),
        ],
        users=[
            UserConfig(id=HIPAA_USER, name="Avery Testwell", email="avery@acme-clinic.example", org=HIPAA_ORG),
            UserConfig(id=OTHER_HIPAA_USER, name="Blair Fakeley", email="blair@bright-dental.example", org=OTHER_HIPAA_ORG),
            UserConfig(id=PLAIN_USER, name="Casey Placeholder", email="casey@corner-bakery.example", org=PLAIN_ORG),
            UserConfig(id=PLAIN_OTHER_USER, name="Drew Sample", email="drew@corner-bakery.example", org=PLAIN_ORG),
        ],
        personal_access_tokens=[PatConfig(token=PAT, user=PLAIN_USER, scopes=["conversations:read", "teams:read", "users:read"])],
        controls_enabled=True,
        rate_limit_per_minute=0,
        contacts_per_org=12,
        conversations_per_org=8,
        message_status_delays=MessageStatusDelays(sent=0.2, delivered=0.4),
    )


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


@dataclass
class Step:
    response: httpx.Response

    @property
    def location(self) -> str:
        return self.response.headers.get("location", "")


class Browser:
    """A browser: cookies for our app, and a separate client for the emulator's pages."""

    def __init__(self, app, emulator_url: str) -> None:
        self.app_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=PUBLIC_URL
        )
        self.emulator_client = httpx.AsyncClient(timeout=10, trust_env=False)
        self.emulator_url = emulator_url

    async def close(self) -> None:
        await self.app_client.aclose()
        await self.emulator_client.aclose()

    async def get(self, path: str, **kwargs) -> httpx.Response:
        return await self.app_client.get(path, **kwargs)

    async def post_form(self, path: str, data: dict | list, *, csrf_from: str | None = None) -> httpx.Response:
        """POST a form carrying the CSRF token of the page at ``csrf_from`` (default: the same path)."""
        page = await self.app_client.get(csrf_from or path)
        token = csrf_of(page.text)
        items = list(data.items()) if isinstance(data, dict) else list(data)
        form: dict[str, list[str]] = {"csrf_token": [token]}
        for name, value in items:
            form.setdefault(name, []).append(value)
        return await self.app_client.post(path, data=form)

    async def login(self, email: str, password: str = PASSWORD) -> httpx.Response:
        return await self.post_form("/login", {"email": email, "password": password})

    async def start_connect(self, slug: str, scopes: list[str]) -> httpx.Response:
        return await self.post_form(f"/t/{slug}/connect", [("scope", s) for s in scopes])

    async def approve_at_emulator(self, authorize_url: str, *, user_id: int, decision: str = "approve") -> str:
        """Open Salesmsg's authorize page, choose the user, press the button; returns our callback URL."""
        assert authorize_url.startswith(self.emulator_url), authorize_url
        page = await self.emulator_client.get(authorize_url)
        assert page.status_code == 200, page.text
        request_id = re.search(r'name="request_id" value="([^"]+)"', page.text)
        assert request_id, page.text
        answer = await self.emulator_client.post(
            self.emulator_url + "/auth/oauth/decision",
            data={"request_id": request_id.group(1), "user_id": str(user_id), "decision": decision},
        )
        assert answer.status_code in (302, 303), answer.text
        return answer.headers["location"]

    async def follow_callback(self, callback_url: str) -> httpx.Response:
        parts = urlsplit(callback_url)
        assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL, callback_url
        return await self.app_client.get(parts.path + "?" + parts.query)

    async def connect(self, slug: str, scopes: list[str], *, user_id: int, decision: str = "approve") -> httpx.Response:
        """The whole journey; returns our answer to the callback."""
        started = await self.start_connect(slug, scopes)
        assert started.status_code == 303, started.text
        callback = await self.approve_at_emulator(started.headers["location"], user_id=user_id, decision=decision)
        return await self.follow_callback(callback)


def auth(key: str) -> dict[str, str]:
    """The headers that present an API key."""
    return {"Authorization": f"Bearer {key}"}


async def connect_pat(runtime: Runtime, tenant: Tenant, token: str, scopes: list[str]) -> None:
    """Connect a tenant with a personal access token, as the consent screen's PAT form does."""
    from app.connections import pat

    async with runtime.db.session() as session:
        await pat.connect_with_pat(session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys,
                                   tenant=tenant, token=token, granted=scopes, actor=Actor.system())


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def make_tenant(runtime: Runtime, slug: str, *, hipaa: bool = True, name: str | None = None) -> Tenant:
    async with runtime.db.session() as session:
        return await registry.create_tenant(
            session, keyring=runtime.keyring, slug=slug, name=name or slug.title(), hipaa=hipaa, actor=Actor.system()
        )


async def make_user(runtime: Runtime, email: str, *, role: str = "operator", tenant: Tenant | None = None) -> User:
    async with runtime.db.session() as session:
        return await people.create_user(
            session, email=email, password=PASSWORD, role=role, tenant=tenant, actor=Actor.system()
        )


async def make_api_key(
    runtime: Runtime, *, tenants: list[str] | None = None, read_only: bool = False, operator: bool = False, name: str = "svc"
) -> str:
    from app.identity import api_keys

    async with runtime.db.session() as session:
        _, key = await api_keys.create_api_key(
            session, name=name, tenant_refs=tenants, read_only=read_only, operator=operator, actor=Actor.system()
        )
    return key


async def sign_baa(runtime: Runtime, slug: str) -> None:
    from app.tenants import baa

    async with runtime.db.session() as session:
        tenant = await registry.get_tenant(session, slug)
        await baa.sign(session, tenant, reference="BAA-TEST", signed_by="op", actor=Actor.system())


async def connected_tenant(
    runtime: Runtime,
    browser: Browser,
    slug: str,
    *,
    hipaa: bool = False,
    scopes: list[str] | None = None,
    user_id: int = PLAIN_USER,
    baa: bool = False,
) -> Tenant:
    """A tenant connected through the real OAuth flow (an operator signs in to do it)."""
    tenant = await make_tenant(runtime, slug, hipaa=hipaa)
    if baa:
        await sign_baa(runtime, slug)
    if not browser.app_client.cookies.get("smc_session"):
        try:
            await make_user(runtime, "connector@example.com")
        except Exception:  # noqa: BLE001 - already made by an earlier call in this test
            pass
        await browser.login("connector@example.com")
    answer = await browser.connect(slug, scopes or DEFAULT_SCOPES, user_id=user_id)
    assert answer.status_code == 303, answer.text
    return tenant


DEFAULT_SCOPES = [
    "conversations:read", "conversations:write", "messages:read", "messages:write", "contacts:read",
    "contacts:write", "teams:read", "users:read", "organizations:read", "tags:read",
]
