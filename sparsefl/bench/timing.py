"""A small, honest timer: warm-up excluded, median and spread reported, devices synced."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    iqr_s: float
    rounds: int


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], rounds: int = 30, warmup: int = 3) -> Timing:
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)
    return _summary(samples)


def measure_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 30,
                        warmup: int = 3) -> dict[str, Timing]:
    """Time several functions round-robin, so that a noisy neighbour (shared memory
    bandwidth on a VM) slows all of them alike and their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: _summary(s) for name, s in samples.items()}


def _summary(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), min(samples), q[2] - q[0], len(samples))
