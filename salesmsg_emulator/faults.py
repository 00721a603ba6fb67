"""Fault injection state, set through ``/_emulator/faults/*`` and applied by the middleware."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

_Rule = TypeVar("_Rule", "FailRule", "DropRule")


@dataclass
class FailRule:
    """Answer the next ``remaining`` matching requests with ``status`` instead of handling them."""

    remaining: int
    status: int
    path_prefix: str | None = None
    method: str | None = None
    retry_after: str | None = None
    body: str | None = None
    content_type: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.path_prefix is None or path.startswith(self.path_prefix)) and (
            self.method is None or self.method.upper() == method
        )


@dataclass
class DropRule:
    """Close the next ``remaining`` matching connections without any HTTP answer."""

    remaining: int
    path_prefix: str | None = None
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.path_prefix is None or path.startswith(self.path_prefix)) and (
            self.method is None or self.method.upper() == method
        )


@dataclass
class Faults:
    """Everything that makes the emulator misbehave on purpose. Thread-safe."""

    latency_ms: int = 0
    token_delay_ms: int = 0
    omit_refresh_token: bool = False
    fail_rules: list[FailRule] = field(default_factory=list)
    drop_rules: list[DropRule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_fail(self, rule: FailRule) -> None:
        with self._lock:
            self.fail_rules.append(rule)

    def add_drop(self, rule: DropRule) -> None:
        with self._lock:
            self.drop_rules.append(rule)

    def take_fail(self, method: str, path: str) -> FailRule | None:
        """The first fail rule matching the request, consuming one of its uses."""
        with self._lock:
            return _take(self.fail_rules, method, path)

    def take_drop(self, method: str, path: str) -> bool:
        with self._lock:
            return _take(self.drop_rules, method, path) is not None

    def reset(self) -> None:
        with self._lock:
            self.latency_ms = 0
            self.token_delay_ms = 0
            self.omit_refresh_token = False
            self.fail_rules.clear()
            self.drop_rules.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency_ms": self.latency_ms,
                "token_delay_ms": self.token_delay_ms,
                "omit_refresh_token": self.omit_refresh_token,
                "fail": [asdict(r) for r in self.fail_rules],
                "drop": [asdict(r) for r in self.drop_rules],
            }


def _take(rules: list[_Rule], method: str, path: str) -> _Rule | None:
    for rule in rules:
        if rule.matches(method, path):
            rule.remaining -= 1
            if rule.remaining <= 0:
                rules.remove(rule)
            return rule
    return None
