"""The train phase of one round, a config against its plain-torch twin, interleaved per
client (issue #25 item 1, on a noisy VM).

    python scripts/bench_train_pairs.py configs/fmnist-resnet/sparsyfed-95.toml \
        --set model.width=16 [--round 3] [--passes 2]

`sparsefl bench round-cost` alternates whole rounds (~20-40 s each here), and on a
shared VM the host's load moves by more than that within a round: its train ratio
moved 0.54-0.65x between runs of one build.  Here both simulations are advanced to the
same round (the same global model history is not needed: each trains its own), then
each sampled client's update (Simulation.client_update: set_compute, local training,
selection, encoding) runs for the config and the plain twin back to back, alternating
which goes first; the ratio is of the summed train seconds (compute + act_prune + sam,
as round-cost's "train").  The first pass also pays `auto`'s calibrations (each pass's
line counts them); the last pass is the steady state.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sparsefl import fl, machine
from sparsefl.bench.round_cost import TRAIN
from sparsefl.fl import wire
from sparsefl.fl.engine import Simulation, client_lr
from sparsefl.nn import sparse_compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--round", type=int, default=3, help="the round whose clients are timed")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.round < 1 or a.passes < 1:
        raise SystemExit("--round and --passes must be >= 1")
    torch.set_num_threads(a.threads)
    sets = [*a.sets, f"run.rounds={a.round}", "run.eval_every=100000"]
    sims = {"config": Simulation(fl.load(a.config, sets)),
            "plain": Simulation(fl.load(a.config, [*sets, "sparsity.method=none"]))}
    if sims["config"].cfg.sparsity.method == "none":
        raise SystemExit("the config already has sparsity.method = none")
    for sim in sims.values():
        for _ in range(a.round - 1):
            sim.step()
    cids = sims["config"].sample(a.round)
    if cids != sims["plain"].sample(a.round):
        raise SystemExit("the two simulations sampled different clients")
    print(machine.line(machine.describe()), f"{a.threads} threads;", a.config,
          " ".join(a.sets), f"round {a.round}, {len(cids)} clients", flush=True)
    ratios = []
    for p in range(a.passes):
        tot = {"config": 0.0, "plain": 0.0}
        act = 0.0
        calibrated = len(sparse_compute.AUTO_TIMINGS)
        for i, cid in enumerate(cids):
            pair = {}
            for name in ("config", "plain") if (i + p) % 2 == 0 else ("plain", "config"):
                sim = sims[name]
                timers = sim.timers()
                sim.client_update(cid, a.round, sim.global_flat,
                                  wire.supports(sim.layout, sim.global_flat),
                                  client_lr(sim.cfg, a.round), timers)
                pair[name] = sum(timers.totals[t] for t in TRAIN)
                act += timers.totals["act_prune"] if name == "config" else 0.0
                tot[name] += pair[name]
            ratios.append(pair["config"] / pair["plain"])
        print(f"pass {p + 1}: config {tot['config']:.2f} s, plain {tot['plain']:.2f} s, "
              f"train ratio {tot['config'] / tot['plain']:.3f}, act_prune "
              f"{act / tot['config']:.1%} of the config's train, `auto` calibrated "
              f"{len(sparse_compute.AUTO_TIMINGS) - calibrated} layer shape(s)", flush=True)
    print(f"per-client ratios: median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
