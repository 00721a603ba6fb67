"""Thread-safe call counters that tests read through ``GET /_emulator/counters``."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named integer counters; names are documented in ``salesmsg_emulator/README.md``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, *names: str, amount: int = 1) -> None:
        with self._lock:
            for name in names:
                self._counts[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
