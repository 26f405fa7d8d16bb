"""pytest-benchmark suite: `pytest bench/ --benchmark-json=bench/results/sam.json`.

Runs on 2 threads by default (the CI machine's size); SPARSEFL_BENCH_THREADS overrides.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("SPARSEFL_BENCH_THREADS", "2")))
