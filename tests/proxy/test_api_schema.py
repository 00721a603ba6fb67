"""schemathesis over /api/v1's OpenAPI (bounded for CI): no 5xx, no answer that breaks the schema."""

from __future__ import annotations

import asyncio

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.audit.audit_log import Actor
from app.runtime import Runtime
from tests.support.databases import run_in_thread
from tests.support.served import ServedApp


async def _seed(settings) -> str:
    from app.connections import pat
    from app.identity import api_keys
    from app.tenants import registry
    from tests.support.journeys import PAT

    runtime = await Runtime.start(settings)
    try:
        async with runtime.db.session() as session:
            for slug, hipaa in (("fuzz-one", True), ("fuzz-two", False)):
                await registry.create_tenant(session, keyring=runtime.keyring, slug=slug, name=slug, hipaa=hipaa, actor=Actor.system())
            _, key = await api_keys.create_api_key(session, name="fuzz", tenant_refs=None, operator=True, actor=Actor.system())
        async with runtime.db.session() as session:
            tenant = await registry.get_tenant(session, "fuzz-two")
            await pat.connect_with_pat(session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys,
                                       tenant=tenant, token=PAT, granted=["conversations:read", "teams:read"],
                                       actor=Actor.system())
        return key
    finally:
        await runtime.stop()


@pytest.fixture
def api_schema(connected_settings):
    key = run_in_thread(asyncio.run, _seed(connected_settings))
    with ServedApp(connected_settings) as served:
        schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
        schema.config.headers = {"Authorization": f"Bearer {key}"}
        yield schema


SEEN: list = []


def with_nul(case) -> None:
    """A NUL in every string the case sends: path and query parameters and top-level body fields."""
    for params in (case.path_parameters, case.query):
        for name, value in list((params or {}).items()):
            if isinstance(value, str):
                params[name] = value + "\x00"
    if isinstance(case.body, dict):
        case.body = {k: v + "\x00" if isinstance(v, str) else v for k, v in case.body.items()}


def _code(response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
TENANTS = st.sampled_from(["fuzz-one", "fuzz-two", "FUZZ-TWO", "no-such-tenant"])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_management_api_conforms_to_its_schema(api_schema):
    """Every operation, 25 generated cases each (valid and invalid inputs), against a live server."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy(), tenant=TENANTS, nul=st.booleans())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case, tenant: str, nul: bool) -> None:
            if case.path_parameters and "tenant" in case.path_parameters:
                case.path_parameters["tenant"] = tenant  # real tenants too, not only random strings
            if nul:
                with_nul(case)
            response = case.call_and_validate(checks=CHECKS)
            SEEN.append((operation.label, response.status_code, nul and _code(response)))

        check()
    statuses = {status for _, status, _ in SEEN}
    assert 200 in statuses and 201 in statuses and 404 in statuses and 422 in statuses
    assert {code for _, _, code in SEEN if code} & {"invalid_character"}  # NULs were sent, and refused as such
