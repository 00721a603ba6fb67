"""Jittered exponential backoff: retry ``n`` waits a random time in the upper half of its ceiling.

The ceiling doubles from ``base`` with every attempt up to ``cap``; drawing from its upper half
("equal jitter") keeps callers that failed together from coming back together.
"""

from __future__ import annotations

import random


def jittered(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
    ceiling = min(cap, base * 2 ** (max(attempt, 1) - 1))
    return random.uniform(ceiling / 2, ceiling)
