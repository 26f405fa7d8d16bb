"""Wall time per phase of a round (seconds, accumulated)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("compute", "act_prune", "sam", "prune", "encode", "decode", "aggregate", "eval",
          "personalize")


class Timers:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - t0

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def as_dict(self) -> dict[str, float]:
        return {p: round(self.totals.get(p, 0.0), 6) for p in PHASES}
