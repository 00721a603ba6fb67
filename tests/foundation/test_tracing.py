"""OpenTelemetry traces (``app.core.tracing``): a proxied call, a refresh and a connect show up in
the SDK's in-memory exporter with the tenant, the route template, the upstream status and the
refresh or connect outcome, and no span holds a token, an API key, a message body or a phone
number. With tracing off, nothing is installed and the proxy runs bare."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import update

from app.connections import store
from app.core import tracing
from app.core.logs import configure_logging
from app.core.middleware import RequestContextMiddleware
from app.core.models import Connection
from app.core.settings import Settings
from app.main import create_app
from app.proxy import handler
from app.tenants.registry import get_tenant
from app.vault import tenant_keys
from tests.support.journeys import (
    DEFAULT_SCOPES,
    PLAIN_ORG,
    PLAIN_USER,
    Browser,
    auth,
    connected_tenant,
    make_api_key,
    make_tenant,
    make_user,
)

SLUG = "corner-bakery"
PROXY = f"/api/v1/tenants/{SLUG}/proxy/"
PROXY_ROUTE = "/api/v1/tenants/{tenant}/proxy/{path}"
PHONE_IN_QUERY = "+12025550187"
MESSAGE_BODY = "Your sourdough is ready, pick it up at the side door"
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                  "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")
# E.164, a run of ten or more digits, or a North American number written out; a run inside a word
# (a UUID's last group, say) is no phone number (the literal one the test sends is checked apart)
PHONE = re.compile(r"(?<![0-9A-Za-z])(?:\+\d{8,15}|\d{10,}|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?![0-9A-Za-z])")


@dataclass
class Exported:
    memory: InMemorySpanExporter
    scrubber: tracing.Scrubber

    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())

    def clear(self) -> None:
        self.memory.clear()


@pytest.fixture
def exported(monkeypatch) -> Iterator[Exported]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    memory = InMemorySpanExporter()
    scrubber = tracing.use_exporter(memory)
    yield Exported(memory, scrubber)
    tracing.stop()


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator:
    application = create_app(settings, configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def live_app(connected_settings, exported):
    """The app wired to the emulator, built once the in-memory exporter is in place."""
    async with serving(connected_settings) as application:
        yield application


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def attrs(span: ReadableSpan) -> dict:
    return dict(span.attributes or {})


def scope_of(span: ReadableSpan) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def in_trace(spans: list[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == root.context.trace_id]


async def tenant_id_of(runtime, slug: str) -> uuid.UUID:
    async with runtime.db.session() as session:
        return (await get_tenant(session, slug)).id


async def connection_of(runtime, tenant_id: uuid.UUID) -> Connection:
    async with runtime.db.session() as session:
        return await store.get_connection(session, tenant_id)


async def tokens_of(runtime, conn: Connection) -> list[str]:
    async with runtime.db.session() as session:
        key = await tenant_keys.load_data_key(session, runtime.data_keys, conn.tenant_id)
    return [t for t in (store.open_access_token(conn, key), store.open_refresh_token(conn, key)) if t]


# -- what each flow records -----------------------------------------------------------------------


async def test_a_proxied_call_is_a_server_span_with_its_upstream_and_database_spans(runtime, browser, client_for, upstream,
                                                                                    exported):
    await connected_tenant(runtime, browser, SLUG)
    tenant_id = await tenant_id_of(runtime, SLUG)
    key = await make_api_key(runtime, tenants=[SLUG])
    exported.clear()
    response = await client_for.get(PROXY + "conversations?limit=2", headers=auth(key))
    assert response.status_code == 200, response.text
    spans = exported.spans()
    server = one(spans, f"GET {PROXY_ROUTE}")
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert attrs(server)["http.route"] == PROXY_ROUTE == tracing.PROXY_ROUTE == handler.ROUTE
    assert attrs(server)["smc.tenant_id"] == str(tenant_id)
    assert attrs(server)["smc.endpoint"] == "/conversations"
    assert attrs(server)["smc.upstream.status"] == 200
    assert attrs(server)["http.response.status_code"] == 200
    assert "url.path" not in attrs(server) and "url.query" not in attrs(server)  # no raw path, no query
    trace_spans = in_trace(spans, server)
    (client,) = [s for s in trace_spans if s.kind is SpanKind.CLIENT and "aiohttp" in scope_of(s)]
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert attrs(client)["url.full"] == upstream.api_base + "/conversations"  # the query is gone
    assert attrs(client)["http.response.status_code"] == 200
    # the hot path's statements go on asyncpg itself (the grant lookup, Salesmsg's budget), each a client span of ours
    database = [s for s in trace_spans if attrs(s).get("db.system") == "postgresql"]
    assert all(s.kind is SpanKind.CLIENT and s.parent is not None for s in database)
    statements = [attrs(s).get("db.statement", "") for s in database]
    assert statements and all(statements) and any(s.lstrip().upper().startswith("SELECT") for s in statements)
    assert any("upstream_budgets" in s for s in statements)
    assert exported.scrubber.scrubbed == 0  # the backstop had nothing to do


async def test_a_forced_refresh_is_a_salesmsg_refresh_span_with_its_outcome(runtime, browser, upstream, exported):
    await connected_tenant(runtime, browser, SLUG)
    tenant_id = await tenant_id_of(runtime, SLUG)
    conn = await connection_of(runtime, tenant_id)
    exported.clear()
    token = await runtime.refresher.force_refresh(conn.id, seen_version=conn.version)
    assert token.version == conn.version + 1
    spans = exported.spans()
    refresh = one(spans, "salesmsg.refresh")
    assert attrs(refresh)["smc.refresh.outcome"] == "success"
    assert attrs(refresh)["smc.tenant_id"] == str(tenant_id)
    assert attrs(refresh)["smc.connection_id"] == str(conn.id)
    children = [s for s in in_trace(spans, refresh) if s.parent is not None and s.parent.span_id == refresh.context.span_id]
    (call,) = [s for s in children if "aiohttp" in scope_of(s)]
    assert attrs(call)["url.full"] == upstream.api_base + "/oauth/token/refresh"
    assert attrs(call)["http.response.status_code"] == 200
    assert any("sqlalchemy" in scope_of(s) for s in children)  # the lease and the write

    exported.clear()  # the token just stored is fresh: a second look refreshes nothing
    await runtime.refresher.force_refresh(conn.id, seen_version=conn.version)
    assert attrs(one(exported.spans(), "salesmsg.refresh"))["smc.refresh.outcome"] == "not_needed"


async def test_a_connect_is_a_salesmsg_connect_span_under_the_callback(runtime, browser, exported):
    await connected_tenant(runtime, browser, SLUG)
    spans = exported.spans()
    connect = one(spans, "salesmsg.connect")
    assert attrs(connect)["smc.connect.outcome"] == "connected"
    assert attrs(connect)["smc.tenant_id"] == str(await tenant_id_of(runtime, SLUG))
    callback = one(spans, "GET /oauth/callback")
    assert callback.kind is SpanKind.SERVER and attrs(callback)["http.route"] == "/oauth/callback"
    assert connect.parent is not None and connect.parent.span_id == callback.context.span_id
    assert "url.query" not in attrs(callback)  # the code and the state stay out
    # the pages before it are named by their templates too
    assert attrs(one(spans, "POST /t/{slug}/connect"))["http.route"] == "/t/{slug}/connect"


# -- what no span holds ---------------------------------------------------------------------------


def texts_of(span: ReadableSpan) -> list[str]:
    """Every string a span carries out of the process: its name, attributes, events and status."""
    found = [span.name, span.status.description or ""]
    items = list((span.attributes or {}).items())
    for event in span.events:
        found.append(event.name)
        items += list((event.attributes or {}).items())
    for link in span.links:
        items += list((link.attributes or {}).items())
    for key, value in items:
        found.append(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [str(v) for v in values]
    return found


async def test_no_span_holds_a_secret_a_body_or_a_phone_number(runtime, browser, client_for, upstream, exported):
    # a connect, step by step to keep the code and the state Salesmsg sent back
    await make_tenant(runtime, SLUG, hipaa=False)
    await make_user(runtime, "connector@example.com")
    assert (await browser.login("connector@example.com")).status_code == 303
    started = await browser.start_connect(SLUG, DEFAULT_SCOPES)
    callback_url = await browser.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
    returned = {k: v[0] for k, v in parse_qs(urlsplit(callback_url).query).items()}
    assert (await browser.follow_callback(callback_url)).status_code == 303
    tenant_id = await tenant_id_of(runtime, SLUG)
    conn = await connection_of(runtime, tenant_id)
    secrets = [returned["code"], returned["state"], browser.app_client.cookies["smc_session"], *await tokens_of(runtime, conn)]

    key = await make_api_key(runtime, tenants=[SLUG])
    secrets.append(key)
    # a read with a phone number in its query, and a send with a body
    searched = await client_for.get(PROXY + f"contacts?search={PHONE_IN_QUERY.replace('+', '%2B')}&limit=2", headers=auth(key))
    assert searched.status_code == 200, searched.text
    conversation = (await client_for.get(PROXY + "conversations?limit=1", headers=auth(key))).json()[0]["id"]
    sent = await client_for.post(PROXY + f"conversations/{conversation}/send", headers=auth(key), json={"message": MESSAGE_BODY})
    assert sent.status_code == 201, sent.text
    # a refresh (the tokens before and after it are secrets), and a call Salesmsg refuses once for its token
    await runtime.refresher.force_refresh(conn.id, seen_version=conn.version)
    upstream.controls.expire_tokens(org_id=PLAIN_ORG)
    assert (await client_for.get(PROXY + "teams", headers=auth(key))).status_code == 200
    secrets += await tokens_of(runtime, await connection_of(runtime, tenant_id))
    # a refused key and a key in the query string
    wrong = key[:-4] + ("abcd" if not key.endswith("abcd") else "efgh")
    secrets.append(wrong)
    assert (await client_for.get(PROXY + "teams", headers=auth(wrong))).status_code == 401
    assert (await client_for.get(PROXY + f"teams?api_key={key}")).status_code == 400

    spans = exported.spans()
    assert len(secrets) >= 8 and all(len(s) >= 8 for s in secrets)
    names = {s.name for s in spans}
    assert {"salesmsg.connect", "salesmsg.refresh", f"GET {PROXY_ROUTE}", f"POST {PROXY_ROUTE}"} <= names
    for span in spans:
        for text in texts_of(span):
            for secret in secrets:
                assert secret not in text, (span.name, text)
            assert MESSAGE_BODY not in text and "sourdough" not in text, (span.name, text)
            assert "bearer" not in text.lower(), (span.name, text)
            assert not PHONE.search(text), (span.name, text)
            assert "2025550187" not in text, (span.name, text)
            assert not re.search(r"\?[^ ]*=", text), (span.name, text)  # no query string with values
    assert exported.scrubber.scrubbed == 0  # clean at the source: the instrumentations were given nothing to hide


def test_the_backstop_scrubs_what_an_instrumentation_might_let_through():
    memory = InMemorySpanExporter()
    scrubber = tracing.Scrubber(memory)
    provider = SdkTracerProvider()
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider.add_span_processor(SimpleSpanProcessor(scrubber))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("GET", attributes={
        "url.full": "https://user:pw@api.example/v2/contacts?phone=%2B12025550187",
        "url.query": "phone=%2B12025550187",
        "http.request.header.authorization": ("Bearer abcdefgh12345678",),
        "smc.tenant_id": "123e4567-e89b-12d3-a456-426614174000",
    }) as span:
        span.record_exception(ValueError("token rt_Zk3Jd9QmX2vB7nL4pT8sW1yC6hF0gA5e for +1 (202) 555-0187"))
        span.set_status(Status(StatusCode.ERROR, "Authorization: Bearer rt_Zk3Jd9QmX2vB7nL4pT8sW1yC6hF0gA5e"))
    (out,) = memory.get_finished_spans()
    assert attrs(out) == {"url.full": "https://api.example/v2/contacts", "smc.tenant_id": "123e4567-e89b-12d3-a456-426614174000"}
    message = str(dict(out.events[0].attributes or {})["exception.message"])
    assert "rt_Zk3" not in message and "555" not in message and "[redacted]" in message
    assert "rt_Zk3" not in (out.status.description or "")
    assert scrubber.scrubbed == 1
    # a database error as SQLAlchemy's instrumentation records it: the statement's values are in DETAIL
    with tracer.start_as_current_span("INSERT") as span:
        span.set_status(Status(StatusCode.ERROR, 'duplicate key value violates unique constraint "uq_users_email"\n'
                                                 "DETAIL:  Key (email)=(dana@corner-bakery.example) already exists."))
    described = memory.get_finished_spans()[-1].status.description or ""
    assert "uq_users_email" in described and "dana" not in described and "corner-bakery" not in described
    with tracer.start_as_current_span("GET") as span:
        span.record_exception(ValueError("no user dana@corner-bakery.example"))
    assert "dana@" not in str(dict(memory.get_finished_spans()[-1].events[0].attributes or {})["exception.message"])
    provider.shutdown()


# -- the trace id in log lines --------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(level="INFO", json_output=True, stream=stream, trace_ids=True)
    yield stream
    configure_logging(level="INFO", json_output=False)


async def test_log_lines_inside_a_request_carry_its_trace_id(runtime, browser, client_for, upstream, exported, json_log):
    await connected_tenant(runtime, browser, SLUG)
    tenant_id = await tenant_id_of(runtime, SLUG)
    key = await make_api_key(runtime, tenants=[SLUG])
    async with runtime.db.session() as session:  # the token is due: the call refreshes it first, and logs that
        await session.execute(update(Connection).where(Connection.tenant_id == tenant_id)
                              .values(access_expires_at=datetime.now(UTC) - timedelta(seconds=60)))
    exported.clear()
    json_log.truncate(0)
    json_log.seek(0)
    assert (await client_for.get(PROXY + "teams", headers=auth(key))).status_code == 200
    spans = exported.spans()
    server = one(spans, f"GET {PROXY_ROUTE}")
    refresh = one(spans, "salesmsg.refresh")
    trace_id = format(server.context.trace_id, "032x")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    refreshed = [line for line in lines if line["event"] == "token refreshed"]
    assert len(refreshed) == 1
    assert refreshed[0]["trace_id"] == trace_id and re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert refreshed[0]["span_id"] == format(refresh.context.span_id, "016x")  # logged while the refresh span ran
    access = [line for line in lines if line["event"] == "request" and "/proxy/teams" in line["path"]]
    assert len(access) == 1 and access[0]["trace_id"] == trace_id
    assert access[0]["span_id"] == format(server.context.span_id, "016x")
    # outside any span, no ids
    logging.getLogger("app.test").warning("outside")
    assert "trace_id" not in json.loads(json_log.getvalue().splitlines()[-1])


# -- tracing off ----------------------------------------------------------------------------------


def stack_of(app) -> list[object]:
    found, layer, seen = [], app.middleware_stack, set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        found.append(layer)
        layer = getattr(layer, "app", None)
    return found


async def test_with_tracing_off_nothing_is_installed_and_the_proxy_runs_bare(connected_settings, upstream, monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert connected_settings.otel_exporter_otlp_endpoint is None
    assert not tracing.wanted(connected_settings) and not tracing.active()
    async with serving(connected_settings) as app:
        assert not tracing.active() and tracing.provider() is None
        assert not isinstance(trace.get_tracer_provider(), SdkTracerProvider)  # no provider of ours, nor anyone's
        assert [m.cls for m in app.user_middleware] == [RequestContextMiddleware]
        runtime = app.state.runtime
        assert runtime.proxy.traced is False
        assert not runtime.http.trace_configs
        browser = Browser(app, upstream.url)
        try:
            await connected_tenant(runtime, browser, SLUG)
        finally:
            await browser.close()
        key = await make_api_key(runtime, tenants=[SLUG])
        seen = []
        handle = runtime.proxy.handle

        async def watched(scope, receive, send):
            seen.append(trace.get_current_span().get_span_context().is_valid)
            await handle(scope, receive, send)

        runtime.proxy.handle = watched
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            assert (await client.get(PROXY + "conversations?limit=1", headers=auth(key))).status_code == 200
        assert seen == [False]  # no span around the proxy
        layers = stack_of(app)
        assert any(isinstance(layer, RequestContextMiddleware) for layer in layers)
        assert not any("opentelemetry" in type(layer).__module__ or isinstance(layer, tracing.ServerSpans) for layer in layers)


# -- turning it on --------------------------------------------------------------------------------


def test_an_otlp_endpoint_turns_tracing_on_once_per_process(settings, monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tracing.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    with pytest.raises(ValueError):
        Settings(_env_file=None, otel_exporter_otlp_endpoint="collector:4318")
    on = settings.model_copy(update={"otel_exporter_otlp_endpoint": "http://127.0.0.1:9/"})
    assert tracing.wanted(on) and not tracing.wanted(settings)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    assert tracing.wanted(settings)  # the standard variables count too
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted(on)  # ... and so does the standard switch
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    try:
        assert tracing.start(on) and tracing.active()
        provider = tracing.provider()
        assert provider is not None and provider.resource.attributes["service.name"] == "salesmsg-connect"
        assert tracing.start(on) and tracing.provider() is provider  # once per process
        assert trace.get_tracer_provider() is not provider  # held here, handed to the instrumentations
    finally:
        tracing.stop()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "connect-eu")
    try:
        assert tracing.start(on)
        provider = tracing.provider()
        assert provider is not None and provider.resource.attributes["service.name"] == "connect-eu"
    finally:
        tracing.stop()
    assert not tracing.active()
