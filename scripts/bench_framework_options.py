"""Issue #25 item 3: one client epoch of configs/fmnist-resnet at width W (round 3's model,
batch 16) three ways, interleaved in one process: plain torch eager, plain torch under
torch.compile, and sparsefl's sparse layers (SparsyFed-95, `auto`).  Learning rate 0, so
every repetition does the same work.

    python scripts/bench_framework_options.py [WIDTH [REPS]]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

from sparsefl import fl
from sparsefl.fl.client import local_train
from sparsefl.fl.engine import Simulation
from sparsefl.fl.timers import Timers
from sparsefl.nn import set_compute


def main(width: int, reps: int) -> None:
    torch.set_num_threads(2)
    over = [f"model.width={width}", "run.rounds=3", "run.eval_every=1000", "client.lr=0.5"]
    sims = {m: Simulation(fl.load(f"configs/fmnist-resnet/{m}.toml", over))
            for m in ("sparsyfed-95", "fedavg")}
    for s in sims.values():  # two rounds: the sparse model has its round-3 support
        s.step()
        s.step()
    sp, pl = sims["sparsyfed-95"], sims["fedavg"]
    cid = sp.sample(3)[0]
    x, y = sp._client_xy(cid)
    steps = (len(y) + 15) // 16
    sp.layout.load(sp.model, sp.global_flat)
    sp.sparsifier.begin_client(sp.model, 3)
    set_compute(sp.model, "auto", sample=x[:16], strict=False, fused=True)
    pl.layout.load(pl.model, pl.global_flat)
    states = {id(pl.model): copy.deepcopy(pl.model.state_dict()),
              id(sp.model): copy.deepcopy(sp.model.state_dict())}

    def epoch(model: nn.Module, base: nn.Module, sim: Simulation) -> float:
        base.load_state_dict(states[id(base)])
        t = time.perf_counter()
        local_train(model, x, y, sim.cfg.client, 0.0, torch.Generator().manual_seed(0),
                    Timers(), None)
        return (time.perf_counter() - t) / steps * 1e3

    t0 = time.perf_counter()
    compiled = torch.compile(pl.model)
    epoch(compiled, pl.model, pl)  # compiles
    print(f"compile: {time.perf_counter() - t0:.0f} s (the first epoch included)")
    runs = {"plain eager": (pl.model, pl.model, pl), "plain compiled": (compiled, pl.model, pl),
            "sparsefl": (sp.model, sp.model, sp)}
    res: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(reps):
        for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            res[k].append(epoch(*runs[k]))
    for k, v in res.items():
        print(f"width {width} {k:15s} median {statistics.median(v):.2f} ms/step, "
              f"min {min(v):.2f} ({steps} steps, client {cid})")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [8, 5][len(args):]))
