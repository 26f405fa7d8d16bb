"""Wall time per phase of a round (seconds, accumulated).

On a GPU, kernels run asynchronously: `sync` (torch.cuda.synchronize for a CUDA run) is
called at every phase boundary so that each phase is charged the device time it caused."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

PHASES = ("compute", "act_prune", "sam", "prune", "encode", "decode", "aggregate", "eval",
          "personalize")


class Timers:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._sync = sync

    def sync(self) -> None:
        """Wait for queued device work (no-op on CPU runs)."""
        if self._sync is not None:
            self._sync()

    def now(self) -> float:
        """The clock after queued device work has finished."""
        self.sync()
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        t0 = self.now()
        try:
            yield
        finally:
            self.totals[phase] += self.now() - t0

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def as_dict(self) -> dict[str, float]:
        return {p: round(self.totals.get(p, 0.0), 6) for p in PHASES}
