"""One running emulator: config, store, run-time settings, faults, counters.

``create_emulator_app`` puts an ``Emulator`` on ``app.state.emulator``; every
route reaches it from there, so two emulators in one process never share
anything.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_args

import jinja2
from starlette.templating import Jinja2Templates

from salesmsg_emulator.config import (
    ContactsListScope,
    DeadTokenAnswer,
    EmulatorConfig,
    RateLimitScope,
    TokenAnswer,
)
from salesmsg_emulator.counters import Counters
from salesmsg_emulator.faults import Faults
from salesmsg_emulator.persistence import SnapshotFile
from salesmsg_emulator.ratelimit import RateLimiter
from salesmsg_emulator.seed import config_fingerprint, load_clients, seed_store
from salesmsg_emulator.state import Store

logger = logging.getLogger("salesmsg_emulator")

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass
class Settings:
    """Options that ``PATCH /_emulator/settings`` may change while running (reset restores the config's)."""

    auto_approve: bool
    rate_limit_per_minute: int
    html_errors: bool
    access_token_ttl: int
    pat_ttl: int
    code_ttl: int
    sent_delay: float
    delivered_delay: float
    rate_limit_scope: RateLimitScope
    rate_limit_lockout_extends: bool
    invalid_token_answer: TokenAnswer
    dead_token_answer: DeadTokenAnswer
    contacts_list_scope: ContactsListScope
    automated_messages_user: bool

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> Settings:
        """Each setting from the config's option of the same name; the message delays from their group."""
        values: dict[str, Any] = {"sent_delay": config.message_status_delays.sent,
                                  "delivered_delay": config.message_status_delays.delivered}
        for f in fields(cls):
            if f.name not in values:
                values[f.name] = getattr(config, f.name)
        return cls(**values)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` after checking names and types; raises ValueError."""
        known = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown setting {name!r}")
            kind = known[name]
            choices = _CHOICES.get(name)
            if choices is not None:
                if value not in choices:
                    raise ValueError(f"{name} must be one of {', '.join(choices)}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a boolean")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number")
            elif kind == "int":
                value = int(value)
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# settings whose value is one of a few strings
_CHOICES: dict[str, tuple[str, ...]] = {
    "rate_limit_scope": get_args(RateLimitScope),
    "invalid_token_answer": get_args(TokenAnswer),
    "dead_token_answer": get_args(DeadTokenAnswer),
    "contacts_list_scope": get_args(ContactsListScope),
}


class Emulator:
    """The state and knobs of one emulator instance."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.store = Store()
        self.settings = Settings.from_config(config)
        self.faults = Faults()
        self.counters = Counters()
        self.rate_limiter = RateLimiter()
        self.snapshots = SnapshotFile(config.persist_path) if config.persist_path else None
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
        self.templates = Jinja2Templates(env=env)
        self._saved_revision = -1
        self._seed_anchor: float | None = None
        self._load()

    def _load(self) -> None:
        data = self.snapshots.load() if self.snapshots else None
        if data is not None and data.get("fingerprint") == config_fingerprint(self.config):
            self.store.restore(data)
            load_clients(self.store, self.config)
            if self.config.token_secret:
                self.store.secret = self.config.token_secret
            logger.info("emulator state restored from %s", self.config.persist_path)
        else:
            if data is not None:
                logger.warning("emulator snapshot %s is for another config; reseeding", self.config.persist_path)
            self._seed_anchor = seed_store(self.store, self.config)
        self.save_if_changed()

    def reset_controls(self) -> None:
        """Clear faults, counters and rate-limit windows; restore the config's settings."""
        self.faults.reset()
        self.counters.reset()
        self.rate_limiter.reset()
        self.settings = Settings.from_config(self.config)

    def reset_state(self) -> None:
        """Everything back to the seed (the same data as at start): data, tokens, clock, and the controls."""
        self.store.clock.reset()
        self._seed_anchor = seed_store(self.store, self.config, self._seed_anchor)
        self.reset_controls()
        self.save_if_changed()

    def save_if_changed(self) -> None:
        if self.snapshots is None:
            return
        with self.store.read():
            if self.store.revision == self._saved_revision:
                return
            data = self.store.snapshot()
            revision = self.store.revision
        self.snapshots.save(data, self.store.now())
        self._saved_revision = revision
