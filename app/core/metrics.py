"""Prometheus metrics. Per process; with several workers set PROMETHEUS_MULTIPROC_DIR to aggregate."""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REFRESHES = Counter("smc_refresh_total", "Token refreshes by outcome", ["outcome"])
REFRESH_SECONDS = Histogram("smc_refresh_seconds", "Time of a refresh call to Salesmsg", buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("smc_http_requests_total", "Requests by route template, method and status", ["route", "method", "status"])
REQUEST_SECONDS = Histogram("smc_http_request_seconds", "Request latency by route template", ["route"], buckets=_LATENCY_BUCKETS)
UPSTREAM_SECONDS = Histogram(
    "smc_upstream_seconds", "Latency of proxied calls to Salesmsg", ["method"], buckets=_LATENCY_BUCKETS
)
UPSTREAM_STATUS = Counter("smc_upstream_responses_total", "Salesmsg answers by status", ["status"])
PROXY_DENIALS = Counter("smc_proxy_denials_total", "Proxy requests refused before Salesmsg, by reason", ["reason"])
BUDGET_CALLS = Counter(
    "smc_upstream_budget_total", "Calls through Salesmsg's request budget by outcome (immediate, queued, refused_*)", ["outcome"]
)
BUDGET_WAIT_SECONDS = Histogram(
    "smc_upstream_budget_wait_seconds", "Time a queued call waited for its slot in Salesmsg's budget",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30),
)
BUDGET_QUEUED = Gauge("smc_upstream_budget_queued", "Calls waiting for a slot in Salesmsg's budget now",
                      multiprocess_mode="livesum")
REDIS_FALLBACK = Gauge(
    "smc_redis_fallback", "1 while Redis is unreachable and a use of it falls back (rate_limits: per process; budgets: the database)",
    ["use"], multiprocess_mode="max",
)
BUDGET_LOCKOUTS = Counter("smc_upstream_budget_lockouts_total", "Salesmsg 429s that locked a budget for its lockout")
GRANT_CACHE = Counter(
    "smc_grant_cache_total", "Proxy grant lookups: hit, miss (read from the database), bypass (the cache cannot prove it is fresh)",
    ["outcome"],
)
GRANT_CHANNEL_DOWN = Gauge(
    "smc_grant_channel_down", "1 while a serving process cannot listen for grant changes (its grant cache is bypassed)",
    multiprocess_mode="livemax",
)
WEBHOOKS = Counter("smc_webhook_deliveries_total", "Webhook delivery attempts by outcome", ["outcome"])


@functools.cache
def child(metric, *labels: str):
    """``metric.labels(*labels)``, looked up once per label set (the hot path pays a dict hit)."""
    return metric.labels(*labels)


def render() -> tuple[bytes, str]:
    """The exposition text; aggregated across processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
