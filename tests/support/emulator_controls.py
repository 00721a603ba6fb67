"""A small synchronous client for the ``/_emulator`` controls, and the emulator the suites run.

    controls = EmulatorControls("http://127.0.0.1:8100")
    controls.fail_next(2, status=503, path_prefix="/pub/v2.2/oauth/token", retry_after=1)
    assert controls.counter("token.refresh") == 0

Every method raises ``httpx.HTTPStatusError`` when the control refuses (for
example 404 when the emulator runs with ``controls_enabled: false``).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import httpx

from salesmsg_emulator.server import EmulatorServer


class EmulatorControls:
    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url + "/_emulator", timeout=timeout, trust_env=False)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None) -> Any:  # fmt: skip
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        response = self._http.request(method, path, json=body, params=clean or None)
        response.raise_for_status()
        return response.json()

    # --- reading -------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def counters(self) -> dict[str, int]:
        """Every counter: ``{"token.refresh": 3, "api.GET /conversations": 10, ...}``."""
        return self._call("GET", "/counters")

    def counter(self, name: str) -> int:
        """One counter (0 when it never counted)."""
        return self.counters().get(name, 0)

    def faults(self) -> dict[str, Any]:
        return self._call("GET", "/faults")

    def orgs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/orgs")

    def grants(self, *, org_id: int | None = None, user_id: int | None = None,
               client_id: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        return self._call("GET", "/grants", params={"org_id": org_id, "user_id": user_id, "client_id": client_id})

    def org_usage(self, org_id: int) -> dict[str, int]:
        """Public API requests of ``org_id`` since the last counter reset: ``served`` (every request with
        a valid token that was not refused for the rate limit) and ``rate_limited`` (answered 429)."""
        counts = self.counters()
        return {"served": counts.get(f"org.{org_id}.served", 0),
                "rate_limited": counts.get(f"org.{org_id}.rate_limited", 0)}  # fmt: skip

    def rate_limits(self) -> dict[str, Any]:
        """``{"scope", "per_minute", "budgets": {key: {"in_window", "blocked_until"}}, "orgs": {id: usage}}``."""
        return self._call("GET", "/rate-limits")

    def clock(self) -> dict[str, Any]:
        return self._call("GET", "/clock")

    def settings(self) -> dict[str, Any]:
        return self._call("GET", "/settings")

    # --- resets ---------------------------------------------------------------------

    def reset(self) -> None:
        """Faults, counters, rate-limit windows and settings back to the config's."""
        self._call("POST", "/reset")

    def reset_counters(self) -> None:
        self._call("POST", "/counters/reset")

    def reset_faults(self) -> None:
        self._call("POST", "/faults/reset")

    def reset_state(self) -> None:
        """Everything back to the seed: data, tokens, grants, clock, and what ``reset`` resets."""
        self._call("POST", "/state/reset")

    # --- faults ---------------------------------------------------------------------

    def set_latency(self, ms: int) -> None:
        """Delay every Public API call (not the token endpoints) by ``ms``."""
        self._call("POST", "/faults/latency", {"ms": ms})

    def slow_token(self, ms: int) -> None:
        """Delay the three token endpoints by ``ms``."""
        self._call("POST", "/faults/token-delay", {"ms": ms})

    def fail_next(self, count: int = 1, status: int = 503, *, path_prefix: str | None = None,
                  method: str | None = None, retry_after: str | int | None = None,
                  body: str | dict[str, Any] | list[Any] | None = None,
                  content_type: str | None = None) -> None:  # fmt: skip
        """Answer the next ``count`` matching requests with ``status`` (and ``Retry-After``, ``body``)."""
        self._call("POST", "/faults/fail", {
            "count": count, "status": status, "path_prefix": path_prefix, "method": method,
            "retry_after": retry_after, "body": body, "content_type": content_type,
        })  # fmt: skip

    def drop_next(self, count: int = 1, *, path_prefix: str | None = None, method: str | None = None) -> None:
        """Close the next ``count`` matching connections without any HTTP answer."""
        self._call("POST", "/faults/drop", {"count": count, "path_prefix": path_prefix, "method": method})

    def omit_refresh_token(self, enabled: bool = True) -> None:
        """Refresh answers without ``refresh_token`` (the presented one then stays valid)."""
        self._call("POST", "/faults/omit-refresh-token", {"enabled": enabled})

    # --- settings and clock --------------------------------------------------------

    def update_settings(self, **changes: Any) -> dict[str, Any]:
        """Change run-time settings, e.g. ``rate_limit_per_minute=5, html_errors=True``,
        ``rate_limit_scope="app"`` (org, app, token), ``invalid_token_answer="401"`` (observed, 401, 403,
        500), ``dead_token_answer="as_invalid"`` (as_invalid, 401, 403, 500),
        ``rate_limit_lockout_extends=True``, ``contacts_list_scope="contacts:read"``,
        ``automated_messages_user=True``."""
        return self._call("PATCH", "/settings", changes)

    def advance_clock(self, seconds: float) -> dict[str, Any]:
        """Move the emulator's clock forward (codes and tokens expire, statuses progress)."""
        return self._call("POST", "/clock/advance", {"seconds": seconds})

    # --- grants and tokens ---------------------------------------------------------

    def revoke(self, *, org_id: int | None = None, user_id: int | None = None, client_id: str | None = None,
               access_token: str | None = None) -> dict[str, int]:  # fmt: skip
        """Revoke matching grants (every access and refresh token of them), or the PAT given."""
        return self._call("POST", "/grants/revoke", _selector(org_id, user_id, client_id, access_token))

    def expire_tokens(self, *, org_id: int | None = None, user_id: int | None = None, client_id: str | None = None,
                      access_token: str | None = None) -> int:  # fmt: skip
        """Make matching access tokens expired now; returns how many."""
        return self._call("POST", "/tokens/expire", _selector(org_id, user_id, client_id, access_token))["expired"]

    def issue_pat(self, user_id: int, scopes: str | Iterable[str], ttl_seconds: int | None = None) -> str:
        """A new personal access token for ``user_id``; no expiry unless ``ttl_seconds``."""
        scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
        body = {"user_id": user_id, "scopes": scope_list, "ttl_seconds": ttl_seconds}
        return self._call("POST", "/pats", body)["token"]

    def inject_inbound(self, conversation_id: int, body: str, media_urls: Iterable[str] = ()) -> dict[str, Any]:
        """A message from the contact into ``conversation_id``; returns the message object."""
        return self._call("POST", "/messages/inbound", {
            "conversation_id": conversation_id, "body": body, "media_urls": list(media_urls),
        })  # fmt: skip

    def set_client_baa(self, client_id: str, baa_signed: bool) -> dict[str, Any]:
        return self._call("PATCH", f"/clients/{client_id}", {"baa_signed": baa_signed})

    def set_org_hipaa(self, org_id: int, hipaa: bool) -> dict[str, Any]:
        return self._call("PATCH", f"/orgs/{org_id}", {"hipaa": hipaa})

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EmulatorControls:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


def _selector(org_id: int | None, user_id: int | None, client_id: str | None,
              access_token: str | None) -> dict[str, Any]:  # fmt: skip
    selector = {"org_id": org_id, "user_id": user_id, "client_id": client_id, "access_token": access_token}
    return {k: v for k, v in selector.items() if v is not None}


class ControlledEmulator(EmulatorServer):
    """The emulator on a loopback port (in a thread), with a control client once it is up."""

    _controls: EmulatorControls | None = None

    @property
    def controls(self) -> EmulatorControls:
        if self._controls is None:
            raise RuntimeError("the emulator is not running")
        return self._controls

    def start(self, timeout: float = 10.0) -> ControlledEmulator:
        super().start(timeout)
        self._controls = EmulatorControls(self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._controls is not None:
            self._controls.close()
            self._controls = None
        super().stop(timeout)

    def __enter__(self) -> ControlledEmulator:
        return self.start()
