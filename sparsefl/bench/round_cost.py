"""What a round costs where the user runs it: a config against the same config with plain
torch layers (`sparsity.method = "none"`), per phase.

    sparsefl bench round-cost configs/fmnist-resnet/sparsyfed-95.toml --set model.width=16

Both simulations are built from the same config and seed, so they sample the same
clients and draw the same batches; they differ only in the sparsity method (and so in
the layers: Powerprop + activation pruning + the sparse path, or plain nn.Conv2d /
nn.Linear).  Warm-up rounds run first and are not timed (SparsyFed's round 1 trains
the dense initial model; `auto` calibrates its layer choices the first time it meets a
shape).  The timed rounds are interleaved, alternating which config goes first, so
machine drift hits both alike; each phase is the mean over the timed rounds (the same
clients for both) and the ratio is config / plain.  "train" is what local training
costs (compute + act_prune + sam); "round" is the wall time of the whole round.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sparsefl import data as fldata
from sparsefl import fl, machine
from sparsefl.bench.report import write_outputs
from sparsefl.fl.engine import Simulation
from sparsefl.fl.timers import PHASES

TRAIN = ("compute", "act_prune", "sam")
ROWS = (*[p for p in PHASES if p != "personalize"], "train", "round")


def _summary(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per round of each phase.  A mean, not a median: rounds sample
    different clients (different data sizes), and both configs ran the same rounds, so
    the means are over the same work and their ratio is the ratio of totals."""
    out = {p: statistics.fmean(r["time"][p] for r in recs) for p in PHASES}
    out["train"] = statistics.fmean(sum(r["time"][p] for p in TRAIN) for r in recs)
    out["round"] = statistics.fmean(r["wall"] for r in recs)
    return out


def run(config: str | None, overrides: list[str] | None = None, rounds: int = 3,
        warmup: int = 1, threads: int = 2, progress: bool = True) -> dict[str, Any]:
    """Time `rounds` rounds of the config and of its plain-torch twin (see the module
    docstring); returns per-phase means, the per-round records and the machine."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"round-cost: need rounds >= 1 and warmup >= 0 (got {rounds}, "
                         f"{warmup})")
    if threads:
        torch.set_num_threads(threads)
    sets = [*(overrides or []), f"run.rounds={warmup + rounds}"]
    cfg = fl.load(config, sets)
    if cfg.sparsity.method == "none":
        raise ValueError("round-cost: the config already has sparsity.method = none; "
                         "there is nothing to compare it with")
    if cfg.decentralized.strategy != "none":
        raise ValueError("round-cost: federated configs only (decentralized.strategy = "
                         f"{cfg.decentralized.strategy!r})")
    plain = fl.load(config, [*sets, "sparsity.method=none"])
    from sparsefl.nn import sparse_compute

    data = fldata.load(cfg.data.name, cfg.data.dir or None)
    sims = {"config": Simulation(cfg, data), "plain": Simulation(plain, data)}
    recs: dict[str, list[dict[str, Any]]] = {"config": [], "plain": []}
    calibrations = 0
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        order = ("config", "plain") if r % 2 == 0 else ("plain", "config")
        for name in order:
            before = len(sparse_compute.AUTO_TIMINGS)
            rec = sims[name].step()
            if r >= warmup:
                recs[name].append(rec)
                calibrations += len(sparse_compute.AUTO_TIMINGS) - before
        if progress:
            walls = "" if r < warmup else (f": {cfg.sparsity.method} "
                                           f"{recs['config'][-1]['wall']:.1f} s, none "
                                           f"{recs['plain'][-1]['wall']:.1f} s")
            print(f"  round {r + 1}/{warmup + rounds} ({'warm-up' if r < warmup else 'timed'})"
                  f"{walls} [{time.perf_counter() - t_start:.0f} s]", flush=True)
    out: dict[str, Any] = {
        "config": str(config) if config else "(default)", "overrides": list(overrides or []),
        "method": cfg.sparsity.method, "sparsity": cfg.sparsity.sparsity,
        "model": cfg.model.name, "width": cfg.model.width if cfg.model.name == "resnet18"
        else None, "batch": cfg.client.batch_size, "clients": cfg.server.clients_per_round,
        "rounds": rounds, "warmup": warmup, "threads": torch.get_num_threads(),
        "machine": machine.describe(), "calibrations_timed": calibrations,
        "phases": {name: _summary(r) for name, r in recs.items()},
        "per_round": {name: [{"round": r["round"], "wall": r["wall"], **r["time"]}
                             for r in rs] for name, rs in recs.items()},
        "acc": {name: [r.get("acc") for r in rs] for name, rs in recs.items()},
    }
    return out


def table(res: dict[str, Any]) -> str:
    m = res["method"]
    what = res["model"] + (f" width {res['width']}" if res.get("width") else "")
    head = (f"Round cost: {res['config']} {' '.join('--set ' + s for s in res['overrides'])}"
            .rstrip() + "\n\n"
            f"{m} {res['sparsity']:.0%} vs sparsity.method = none (plain torch layers), "
            f"{what}, batch {res['batch']}, {res['clients']} clients per round; "
            f"{machine.line(res['machine'])}, {res['threads']} threads; mean of "
            f"{res['rounds']} timed rounds after {res['warmup']} warm-up, interleaved")
    rows = [head, "", f"| phase | {m} s | none s | {m} / none |", "|---|---:|---:|---:|"]
    a, b = res["phases"]["config"], res["phases"]["plain"]
    for p in ROWS:
        ratio = f"{a[p] / b[p]:.2f}x" if b[p] > 0 else ""
        name = {"train": "**train** (compute + act_prune + sam)",
                "round": "**round** (wall)"}.get(p, p)
        rows.append(f"| {name} | {a[p]:.3f} | {b[p]:.3f} | {ratio} |")
    share = a["act_prune"] / a["round"] if a["round"] > 0 else 0.0
    rows.append(f"\nactivation pruning: {share:.1%} of the {m} round")
    if res["calibrations_timed"]:
        rows.append(f"`auto` calibrated {res['calibrations_timed']} new layer shape(s) inside "
                    "the timed rounds (recorded per machine: a second run does not pay it)")
    return "\n".join(rows)


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [res["method"], "none (plain torch)"]
    bottom = [0.0, 0.0]
    for p in [q for q in PHASES if q != "personalize"]:
        vals = [res["phases"]["config"][p], res["phases"]["plain"][p]]
        if max(vals) <= 0:
            continue
        ax.bar(names, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    what = res["model"] + (f" w{res['width']}" if res.get("width") else "")
    ax.set(ylabel="seconds per round (mean)",
           title=f"round cost, {what}, {res['machine']['isa']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(config: str | None, overrides: list[str], rounds: int, warmup: int, threads: int,
         out_dir: str | None) -> str:
    res = run(config, overrides, rounds, warmup, threads)
    return write_outputs(out_dir, "round_cost", res, table(res), plot)
