"""One SparsyFed 95% + FedSAM round, engine (fused kernels) vs eager (reference ops),
same seed and data, warm-up round excluded.  Small by default (MLP, 10 clients);
SPARSEFL_BENCH_MODEL=resnet18 for the paper-size round (minutes per path).

    pytest bench/bench_round.py --benchmark-json=round.json

Per-phase seconds of each path go into extra_info; `sparsefl bench round` prints the
same comparison as a table and draws it.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparsefl.bench import round as round_bench
from sparsefl.fl.engine import Simulation

MODEL = os.environ.get("SPARSEFL_BENCH_MODEL", "mlp")
CLIENTS, PER_CLIENT = 10, 64


@pytest.fixture(scope="module")
def warm_state():
    ds = round_bench.synthetic(MODEL, CLIENTS * PER_CLIENT)
    cfg = round_bench.round_config(MODEL, CLIENTS, rounds=50)
    os.environ["SPARSEFL_BACKEND"] = "auto"
    sim = Simulation(cfg, ds)
    sim.step()  # SparsyFed's dense first round, not timed
    return cfg, ds, sim.round, {k: v.clone() for k, v in sim.state().items()}


@pytest.mark.parametrize("path,backend", [("engine", "auto"), ("eager", "reference")])
def test_round(benchmark, warm_state, path, backend):
    cfg, ds, rnd, state = warm_state
    old = os.environ.get("SPARSEFL_BACKEND")
    os.environ["SPARSEFL_BACKEND"] = backend
    try:
        sims = []

        def setup():  # every timed round starts from the same warm state
            sim = Simulation(cfg, ds)
            sim.load_state(rnd, {k: v.clone() for k, v in state.items()})
            sims.append(sim)
            return (sim,), {}

        benchmark.group = f"round-{MODEL}"
        recs = []
        benchmark.pedantic(lambda sim: recs.append(sim.step()), setup=setup, rounds=3)
        benchmark.extra_info.update(
            model=MODEL, clients=CLIENTS, threads=torch.get_num_threads(), path=path,
            phases={p: sum(r["time"][p] for r in recs) / len(recs) for p in recs[0]["time"]})
    finally:
        if old is None:
            os.environ.pop("SPARSEFL_BACKEND", None)
        else:
            os.environ["SPARSEFL_BACKEND"] = old
