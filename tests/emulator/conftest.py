"""Fixtures for the emulator suite: one running emulator per session, reset before each test.

The tests talk to it only over loopback HTTP, with httpx and with authlib's
OAuth2 client as an independent client.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.emulator_controls import ControlledEmulator

from .support import ALL_SCOPES, PAT_ACME, PAT_CORNER, REDIRECT_URI, Api, Flow, OAuth2Client, make_config


@pytest.fixture(scope="session")
def emulator() -> Iterator[ControlledEmulator]:
    with ControlledEmulator(make_config()) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> None:
    """Every test that uses the shared emulator starts from the seed, without faults."""
    if "emulator" in request.fixturenames:
        request.getfixturevalue("emulator").controls.reset_state()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, trust_env=False) as client:
        yield client


@pytest.fixture
def flow(emulator: ControlledEmulator, http: httpx.Client) -> Flow:
    return Flow(emulator, http)


@pytest.fixture
def oauth_client() -> Iterator[OAuth2Client]:
    """authlib's OAuth2 client registered as test-client (HTTP Basic at the token endpoint)."""
    client = OAuth2Client("test-client", "test-secret", scope=ALL_SCOPES, redirect_uri=REDIRECT_URI,
                          code_challenge_method="S256", trust_env=False, timeout=10)  # fmt: skip
    with client:
        yield client


@pytest.fixture
def acme(emulator: ControlledEmulator, http: httpx.Client) -> Api:
    """The API as Avery of Acme Clinic (org 1), through a PAT with every test scope."""
    return Api(emulator, http, PAT_ACME)


@pytest.fixture
def corner(emulator: ControlledEmulator, http: httpx.Client) -> Api:
    """The API as Casey of Corner Bakery (org 3)."""
    return Api(emulator, http, PAT_CORNER)
