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

`--pairs` interleaves per client instead of per round, for a shared or noisy machine
(here the host's load moved a whole-round ratio by 0.54-0.65x between runs of one
build): after the warm-up rounds, each client sampled for the next round trains for the
config and for the plain twin back to back (Simulation.client_update: set_compute, local
training, selection, encoding), alternating which goes first; that is one pass, and
`rounds` passes are timed over the same clients.  Only client-side phases exist there
(no aggregation, no evaluation); "clients" is the wall time of the client updates.
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
from sparsefl.fl import wire
from sparsefl.fl.engine import Simulation, client_lr
from sparsefl.fl.timers import PHASES

TRAIN = ("compute", "act_prune", "sam")
ROWS = (*[p for p in PHASES if p != "personalize"], "train", "round")
CLIENT_ROWS = ("compute", "act_prune", "sam", "prune", "encode", "train", "round")


def _summary(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per round of each phase.  A mean, not a median: rounds sample
    different clients (different data sizes), and both configs ran the same rounds, so
    the means are over the same work and their ratio is the ratio of totals."""
    out = {p: statistics.fmean(r["time"][p] for r in recs) for p in PHASES}
    out["train"] = statistics.fmean(sum(r["time"][p] for p in TRAIN) for r in recs)
    out["round"] = statistics.fmean(r["wall"] for r in recs)
    return out


def run(config: str | None, overrides: list[str] | None = None, rounds: int = 3,
        warmup: int = 1, threads: int = 2, progress: bool = True,
        pairs: bool = False) -> dict[str, Any]:
    """Time `rounds` rounds (pairs: passes over one round's clients) of the config and of
    its plain-torch twin (see the module docstring); returns per-phase means, the
    per-round (per-pass) records and the machine."""
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
    extra: dict[str, Any] = {}
    if pairs:
        calibrations, extra = _pairs(sims, recs, rounds, warmup, progress, t_start)
    for r in range(0 if pairs else warmup + rounds):
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
        "pairs": pairs, **extra,
        "phases": {name: _summary(r) for name, r in recs.items()},
        "per_round": {name: [{"round": r["round"], "wall": r["wall"], **r["time"]}
                             for r in rs] for name, rs in recs.items()},
        "acc": {name: [r.get("acc") for r in rs] for name, rs in recs.items()},
    }
    return out


def _pairs(sims: dict[str, Simulation], recs: dict[str, list[dict[str, Any]]], passes: int,
           warmup: int, progress: bool, t_start: float) -> tuple[int, dict[str, Any]]:
    """The per-client interleaving (`pairs`): fills recs with one record per pass (client
    phases summed over the round's clients; "wall": their client updates' wall time);
    returns the calibrations timed and the per-client train ratios."""
    from sparsefl.nn import sparse_compute

    for r in range(warmup):  # whole rounds, untimed: both models reach round `warmup`
        for sim in sims.values():
            sim.step()
        if progress:
            print(f"  round {r + 1}/{warmup} (warm-up) [{time.perf_counter() - t_start:.0f} s]",
                  flush=True)
    rnd = warmup + 1
    cids = sims["config"].sample(rnd)
    if cids != sims["plain"].sample(rnd):
        raise RuntimeError("round-cost --pairs: the two simulations sampled different clients")
    calibrations, per_client = 0, []
    for p in range(passes):
        totals = {name: {"wall": 0.0, "time": dict.fromkeys(PHASES, 0.0)} for name in sims}
        before = len(sparse_compute.AUTO_TIMINGS)
        for i, cid in enumerate(cids):
            train = {}
            for name in ("config", "plain") if (i + p) % 2 == 0 else ("plain", "config"):
                sim = sims[name]
                timers = sim.timers()
                t0 = time.perf_counter()
                sim.client_update(cid, rnd, sim.global_flat,
                                  wire.supports(sim.layout, sim.global_flat),
                                  client_lr(sim.cfg, rnd), timers)
                totals[name]["wall"] += time.perf_counter() - t0
                phases = timers.as_dict()
                for k, v in phases.items():
                    totals[name]["time"][k] += v
                train[name] = sum(phases[t] for t in TRAIN)
            if train["plain"] > 0:
                per_client.append(train["config"] / train["plain"])
        calibrations += len(sparse_compute.AUTO_TIMINGS) - before
        for name in sims:
            recs[name].append({"round": rnd, "pass": p + 1, **totals[name]})
        if progress:
            a, b = (sum(totals[n]["time"][t] for t in TRAIN) for n in ("config", "plain"))
            print(f"  pass {p + 1}/{passes} over round {rnd}'s {len(cids)} clients: train "
                  f"{a:.2f} s vs {b:.2f} s ({a / b:.3f}x) [{time.perf_counter() - t_start:.0f} s]",
                  flush=True)
    return calibrations, {"pair_round": rnd, "per_client_ratio": per_client}


def table(res: dict[str, Any]) -> str:
    m = res["method"]
    what = res["model"] + (f" width {res['width']}" if res.get("width") else "")
    head = (f"Round cost: {res['config']} {' '.join('--set ' + s for s in res['overrides'])}"
            .rstrip() + "\n\n"
            f"{m} {res['sparsity']:.0%} vs sparsity.method = none (plain torch layers), "
            f"{what}, batch {res['batch']}, {res['clients']} clients per round; "
            f"{machine.line(res['machine'])}, {res['threads']} threads; ")
    pairs = res.get("pairs", False)
    if pairs:
        head += (f"mean of {res['rounds']} passes over round {res['pair_round']}'s clients "
                 f"after {res['warmup']} warm-up rounds, interleaved per client")
    else:
        head += (f"mean of {res['rounds']} timed rounds after {res['warmup']} warm-up, "
                 "interleaved")
    rows = [head, "", f"| phase | {m} s | none s | {m} / none |", "|---|---:|---:|---:|"]
    a, b = res["phases"]["config"], res["phases"]["plain"]
    for p in ROWS:
        if pairs and p not in CLIENT_ROWS:
            continue
        ratio = f"{a[p] / b[p]:.2f}x" if b[p] > 0 else ""
        name = {"train": "**train** (compute + act_prune + sam)",
                "round": "**clients** (wall)" if pairs else "**round** (wall)"}.get(p, p)
        rows.append(f"| {name} | {a[p]:.3f} | {b[p]:.3f} | {ratio} |")
    share = a["act_prune"] / a["round"] if a["round"] > 0 else 0.0
    rows.append(f"\nactivation pruning: {share:.1%} of the {m} "
                f"{'client updates' if pairs else 'round'}")
    if pairs:
        per_pass = [sum(r[t] for t in TRAIN) for r in res["per_round"]["config"]]
        plain = [sum(r[t] for t in TRAIN) for r in res["per_round"]["plain"]]
        ratios = ", ".join(f"{x / y:.3f}x" for x, y in zip(per_pass, plain) if y > 0)
        rows.append(f"train ratio per pass: {ratios} (the first pays `auto`'s calibrations)")
        pc = res["per_client_ratio"]
        if pc:
            rows.append(f"per-client train ratios: median {statistics.median(pc):.3f}, "
                        f"min {min(pc):.3f}, max {max(pc):.3f}")
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
         out_dir: str | None, pairs: bool = False) -> str:
    res = run(config, overrides, rounds, warmup, threads, pairs=pairs)
    return write_outputs(out_dir, "round_cost", res, table(res), plot)
