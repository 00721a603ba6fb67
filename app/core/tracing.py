"""OpenTelemetry traces, exported over OTLP (HTTP/protobuf) when an endpoint is configured.

Tracing is on when ``SMC_OTEL_EXPORTER_OTLP_ENDPOINT`` (a collector's base URL, like the standard
variable) or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set, and neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none`` says otherwise.
``start`` then builds one TracerProvider per process (service ``salesmsg-connect`` unless
``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names another; a BatchSpanProcessor; the
sampler from ``OTEL_TRACES_SAMPLER``). ``use_exporter`` installs one that exports synchronously to
an exporter of the caller's (the tests' in-memory one).

The provider is held here and handed to each instrumentation, never made the global one: only
what this module wires up emits spans (FastAPI's own telemetry is switched off in ``app.main``),
and tracing off leaves every hot path as it was: no ASGI wrapper, no trace config on the HTTP
session, no listeners on the engine, no log processor (the proxy tests one flag). Turning it on
also opts into the stable HTTP semantic conventions (``OTEL_SEMCONV_STABILITY_OPT_IN=http``:
``http.request.method``, ``http.response.status_code``, ``url.full``) unless that variable is set.

What a span may carry: the tenant id, the route template (``http.route``; the server span's name
is the method and that template, never the raw path), the upstream template (``smc.endpoint``),
statuses, the refresh and connect outcomes, SQL statement text. What it may never carry: headers
(none are captured), tokens, API keys, cookies, bodies, phone numbers, query strings. Hence:

- the ASGI instrumentation sees a view of the request with no path, no query string and only the
  Host, User-Agent and trace context headers; the span is named after the route template;
- outgoing aiohttp calls are recorded with the URL's query and credentials removed;
- SQLAlchemy spans hold the statement, never its parameters;
- before any span leaves the process, ``Scrubber`` drops header attributes, strips queries from
  URL attributes and masks anything shaped like a credential or a phone number in every string
  (names, attributes, event attributes such as an exception's message): a backstop that the
  tests expect never to have anything to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import yarl
from opentelemetry import metrics, trace
from opentelemetry.instrumentation._semconv import (
    _OpenTelemetrySemanticConventionStability,
    _OpenTelemetryStabilitySignalType,
)
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logs import get_logger, redact_text
from app.core.middleware import _is_proxy
from app.core.settings import Settings

log = get_logger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

SERVICE = "salesmsg-connect"
PROXY_ROUTE = "/api/v1/tenants/{tenant}/proxy/{path}"  # app.proxy.handler.ROUTE
# attributes of our own
TENANT_ID = "smc.tenant_id"
ENDPOINT = "smc.endpoint"
UPSTREAM_STATUS = "smc.upstream.status"
REFRESH_OUTCOME = "smc.refresh.outcome"
CONNECT_OUTCOME = "smc.connect.outcome"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# the request headers the ASGI instrumentation may see: none that carries a credential
_VISIBLE_HEADERS = frozenset({b"host", b"user-agent", b"traceparent", b"tracestate"})
_REQUEST = "smc.request"  # the real scope, under the view the instrumentation sees
_ROUTE = "smc.route"  # in the view: the route template when known before routing (the proxy's)


class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None


_state = _State()


# -- turning it on ------------------------------------------------------------------------------


def wanted(settings: Settings) -> bool:
    """Whether the settings and the environment ask for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        settings.otel_exporter_otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def traces_url(base: str) -> str:
    """``SMC_OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL, like ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


def start(settings: Settings) -> bool:
    """Once per process: the OTLP pipeline when ``wanted``. Returns whether tracing is on."""
    if _state.provider is not None:
        return True
    if not wanted(settings):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = settings.otel_exporter_otlp_endpoint
    # a short export timeout: a collector that is away must not hold up a shutdown (see ``flush``)
    exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=3) if endpoint else OTLPSpanExporter(timeout=3)
    _install(BatchSpanProcessor(Scrubber(exporter)))
    return True


def use_exporter(exporter: SpanExporter) -> Scrubber:
    """Trace into ``exporter``, span by span as each ends (tests: an in-memory exporter), through
    the ``Scrubber`` returned. Apps and runtimes built after this call are instrumented; ``stop``
    undoes it."""
    stop()
    scrubber = Scrubber(exporter)
    _install(SimpleSpanProcessor(scrubber))
    return scrubber


def stop() -> None:
    """Flush and shut down the provider; tracing is off for what is built next."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        provider.shutdown()


def flush() -> None:
    if _state.provider is not None:
        _state.provider.force_flush(timeout_millis=5000)


async def flush_soon(seconds: float = 5.0) -> None:
    """``flush`` off the event loop, given up after ``seconds``: the SDK's flush does not keep to its
    own timeout while a collector is unreachable, and a stop must not wait past the orchestrator's grace."""
    if _state.provider is None:
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(flush), seconds)
    except TimeoutError:
        log.warning("traces not all exported at shutdown: the collector did not answer in time")


def active() -> bool:
    return _state.provider is not None


def provider() -> TracerProvider | None:
    return _state.provider


def _install(processor: Any) -> TracerProvider:
    # The stable HTTP conventions (http.request.method, http.response.status_code, url.full), unless
    # the operator chose others; read once per process, when the first instrumentation is built.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    detected = Resource.create()
    named = not str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service")
    resource = detected if named else Resource.create({SERVICE_NAME: SERVICE})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(processor)
    _state.provider = tracer_provider
    _state.tracer = tracer_provider.get_tracer("app")
    return tracer_provider


# -- our own spans ------------------------------------------------------------------------------


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A span of ours around a block, current inside it; a no-op span when tracing is off."""
    tracer = _state.tracer
    if tracer is None:
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


_NO_SPAN = contextlib.nullcontext()


def db_span(name: str, statement: str) -> AbstractContextManager[Any]:
    """A client span for a statement sent on asyncpg itself (the proxy's hot path skips SQLAlchemy,
    whose statements its instrumentation traces): the statement's text, never its parameters. A
    shared no-op when tracing is off."""
    tracer = _state.tracer
    if tracer is None:
        return _NO_SPAN
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT,
                                        attributes={"db.system": "postgresql", "db.statement": statement})


def traced(name: str, outcome: str, outcome_of: Callable[[_R], str]) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """Run a coroutine function as the span ``name``, its ``outcome`` attribute what
    ``outcome_of(result)`` says, or a refusal's ``code`` (else the exception's type)."""

    def wrap(function: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(function)
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with span(name):
                try:
                    result = await function(*args, **kwargs)
                except Exception as exc:
                    annotate({outcome: getattr(exc, "code", None) or type(exc).__name__})
                    raise
                annotate({outcome: outcome_of(result)})
                return result

        return run

    return wrap


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (None values are skipped); nothing when tracing is off."""
    if _state.tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


# -- instrumentations ---------------------------------------------------------------------------


def _http_mode() -> Any:
    _OpenTelemetrySemanticConventionStability._initialize()
    return _OpenTelemetrySemanticConventionStability._get_opentelemetry_stability_opt_in_mode(
        _OpenTelemetryStabilitySignalType.HTTP
    )


def _client_url(url: yarl.URL) -> str:
    """An outgoing call's URL as recorded: no credentials, no query (it may hold a phone number), no fragment."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def client_trace_configs() -> list[aiohttp.TraceConfig]:
    """For the process's aiohttp session: one client span per attempt, with its status; [] when off."""
    if _state.provider is None:
        return []
    return [create_trace_config(url_filter=_client_url, tracer_provider=_state.provider, sem_conv_opt_in_mode=_http_mode())]


def trace_engine(engine: AsyncEngine) -> None:
    """Spans for the engine's statements (their text, never their parameters); nothing when off."""
    if _state.provider is None:
        return
    tracer = _state.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    usage = metrics.get_meter("opentelemetry.instrumentation.sqlalchemy").create_up_down_counter(
        "db.client.connections.usage", unit="connections"
    )
    EngineTracer(tracer, engine.sync_engine, usage, enable_commenter=False)


def _method(scope: Scope) -> str:
    return scope["method"] if scope["method"] in _METHODS else "HTTP"


def _span_details(view: Scope) -> tuple[str, dict[str, Any]]:
    """The server span's name: the method and, for the proxy, its template (the others are named
    once routed, ``ServerSpans._inner``)."""
    route = view[_ROUTE]
    return (f"{_method(view)} {route}", {"http.route": route}) if route else (_method(view), {})


class ServerSpans:
    """ASGI middleware, outermost: the official ASGI instrumentation's server span for every HTTP
    request, the proxy's included (our middleware dispatches it inside this one).

    The instrumentation reads the request's URL and headers from the scope; it is given a view of
    the scope with no path, no query string and only ``_VISIBLE_HEADERS``, while the app below
    gets the real scope. The span is named by the route template: the proxy's at once, any other
    when FastAPI's router has matched it (at the answer's start; an unmatched path leaves the
    method alone). It captures no headers, and opens no span per ASGI message."""

    def __init__(self, app: ASGIApp, *, tracer_provider: TracerProvider) -> None:
        self.app = app
        self.otel = OpenTelemetryMiddleware(
            self._inner, default_span_details=_span_details, tracer_provider=tracer_provider,
            exclude_spans=["receive", "send"],
        )
        # the constructor falls back to OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*: no headers, whatever they say
        self.otel.http_capture_headers_server_request = None
        self.otel.http_capture_headers_server_response = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        view = {
            "type": "http",
            "asgi": scope.get("asgi", {}),
            "http_version": scope.get("http_version", "1.1"),
            "method": scope["method"],
            "scheme": scope.get("scheme", "http"),
            "server": scope.get("server"),
            "client": scope.get("client"),
            "root_path": "",
            "path": "",
            "query_string": b"",
            "headers": [(k, v) for k, v in scope.get("headers", ()) if k in _VISIBLE_HEADERS],
            _ROUTE: PROXY_ROUTE if _is_proxy(scope["path"]) else None,
            _REQUEST: scope,
        }
        await self.otel(view, receive, send)

    async def _inner(self, view: Scope, receive: Receive, send: Send) -> None:
        scope = view[_REQUEST]
        if view[_ROUTE] is not None:
            await self.app(scope, receive, send)
            return
        server = trace.get_current_span()

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start" and server.is_recording():
                route = getattr(scope.get("route"), "path", None)  # FastAPI's matched route: its template
                if isinstance(route, str):
                    server.update_name(f"{_method(scope)} {route}")
                    server.set_attribute("http.route", route)
            await send(message)

        await self.app(scope, receive, named)


# -- the last gate --------------------------------------------------------------------------------

_URL_KEYS = frozenset({"url.full", "http.url", "http.target", "url.path"})
_DROPPED_KEYS = frozenset({"url.query"})
_HEADER_PREFIXES = ("http.request.header.", "http.response.header.")
# E.164 (+ and 8-15 digits), a run of 10-15 digits, or a North American number written out
PHONE = re.compile(
    r"(?<![\w.-])(?:\+\d{8,15}|\d{10,15}|\+?1?[ .-]?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?![\w-])"
)
MASKED = "[redacted]"


# a database error's DETAIL (asyncpg: "Key (email)=(...)", "Failing row contains (...)") and what follows
_DETAIL = re.compile(r"\s*DETAIL:.*", re.DOTALL)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def _scrub_text(value: str) -> str:
    return EMAIL.sub(MASKED, PHONE.sub(MASKED, redact_text(_DETAIL.sub(" DETAIL: [redacted]", value))))


def _strip_query(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        return MASKED
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _scrub_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(_strip_query(value) if key in _URL_KEYS else value)
    if isinstance(value, (list, tuple)):
        return tuple(_scrub_text(v) if isinstance(v, str) else v for v in value)
    return value


def _scrub_attributes(attributes: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    cleaned: dict[str, Any] = {}
    changed = False
    for key, value in (attributes or {}).items():
        if key in _DROPPED_KEYS or key.startswith(_HEADER_PREFIXES):
            changed = True
            continue
        clean = _scrub_value(key, value)
        changed = changed or clean != value
        cleaned[key] = clean
    return cleaned, changed


class Scrubber(SpanExporter):
    """Wraps the exporter: every span passes ``_scrub`` on its way out (off the request path: the
    batch processor exports from its own thread). ``scrubbed`` counts the spans it had to change."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.scrubbed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([self._scrub(s) for s in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)

    def _scrub(self, span: ReadableSpan) -> ReadableSpan:
        attributes, changed = _scrub_attributes(span.attributes)
        events = []
        for event in span.events:
            event_attributes, event_changed = _scrub_attributes(event.attributes)
            changed = changed or event_changed
            events.append(Event(_scrub_text(event.name), event_attributes, event.timestamp) if event_changed else event)
        name = _scrub_text(span.name)
        status = span.status
        if status.description:
            status = Status(status.status_code, _scrub_text(status.description))
        changed = changed or name != span.name or status.description != span.status.description
        if not changed:
            return span
        self.scrubbed += 1
        return ReadableSpan(
            name=name, context=span.context, parent=span.parent, resource=span.resource, attributes=attributes,
            events=events, links=span.links, kind=span.kind, status=status, start_time=span.start_time,
            end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
        )
