"""The wall-clock budget the phases share, and the progress log."""

from __future__ import annotations

import math
import time


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def deadline(self, fraction_end: float) -> float:
        """Absolute monotonic time at which a phase ending at this fraction stops."""
        return math.inf if self.budget_s <= 0 else self.start + fraction_end * self.budget_s


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
