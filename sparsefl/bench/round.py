"""Per-round benchmark: one SparsyFed + FedSAM round, engine kernels vs eager references.

The same round (same state, seed, clients and batches) runs twice: with `backend=auto`
(the fused C++/CUDA/Triton kernels) and with `backend=reference` everywhere (the plain
torch definitions: per-tensor SAM, sort-based top-k, index_add_ aggregation), switched
through SPARSEFL_BACKEND.  Warm-up rounds run first (round 1 is SparsyFed's dense round)
and are not timed; the state after them is copied into both simulations.  Times are per
phase (sparsefl.fl.timers): compute (forward/backward incl. Powerprop and activation
pruning), sam (perturb + restore + base step), prune (top-k), encode, decode, aggregate,
eval.  Everything but compute is "FL machinery".
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import torch

from sparsefl import data as fldata
from sparsefl import fl
from sparsefl.bench.report import write_outputs
from sparsefl.fl.engine import Simulation
from sparsefl.fl.timers import PHASES

SHAPES = {"mlp": (1, 28, 28), "lenet5": (3, 32, 32), "resnet18": (3, 32, 32)}


def synthetic(model: str, n_train: int, n_test: int = 256, seed: int = 0) -> fldata.Dataset:
    """Random images with a learnable label (a fixed random linear map), no files needed."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[model]
    proj = torch.randn(int(torch.tensor(shape).prod()), 10, generator=gen)
    x = torch.randn(n_train + n_test, *shape, generator=gen)
    y = (x.flatten(1) @ proj).argmax(1)
    return fldata.Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def round_config(model: str, clients: int, rounds: int, device: str = "cpu") -> fl.Config:
    # client.compute = dense: both paths do the same forward/backward (the reference has no
    # sparse-compute kernel of its own), so the rounds end in the same bits and the table
    # compares the FL machinery; `sparsefl bench sparse-train` measures sparse compute.
    return fl.load(None, [
        "client.compute=dense",
        f"model.name={model}", "model.hidden=[200, 200]", f"data.clients={clients}",
        f"server.clients_per_round={clients}", "data.partition=iid", "data.test_fraction=0.0",
        "client.optimizer=sam", "client.rho=0.05", "client.lr=0.05", "client.epochs=1",
        "client.batch_size=16", "sparsity.method=sparsyfed", "sparsity.sparsity=0.95",
        "sparsity.scope=global" if model == "resnet18" else "sparsity.scope=layer",
        f"run.rounds={rounds}", f"run.device={device}"])


def run(model: str = "mlp", clients: int = 10, per_client: int = 64, rounds: int = 2,
        warmup: int = 1, threads: int = 2, device: str = "cpu") -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    ds = synthetic(model, clients * per_client)
    cfg = round_config(model, clients, warmup + rounds, device)
    old = os.environ.get("SPARSEFL_BACKEND")
    try:
        os.environ["SPARSEFL_BACKEND"] = "auto"
        base = Simulation(cfg, ds)
        for _ in range(warmup):
            base.step()
        state = {k: v.clone() for k, v in base.state().items()}
        out: dict[str, Any] = {"model": model, "device": str(base.device),
                               "device_name": (torch.cuda.get_device_name(base.device)
                                               if base.device.type == "cuda" else "cpu"),
                               "clients": clients, "per_client": per_client,
                               "rounds": rounds, "threads": torch.get_num_threads(),
                               "params": base.layout.numel}
        finals = {}
        for name, backend in (("engine", "auto"), ("eager", "reference")):
            os.environ["SPARSEFL_BACKEND"] = backend
            sim = Simulation(cfg, ds)
            sim.load_state(base.round, {k: v.clone() for k, v in state.items()})
            recs = [sim.step() for _ in range(rounds)]
            out[name] = {p: statistics.median(r["time"][p] for r in recs) for p in PHASES}
            out[name]["round"] = statistics.median(r["wall"] for r in recs)
            finals[name] = sim.global_flat
    finally:
        if old is None:
            os.environ.pop("SPARSEFL_BACKEND", None)
        else:
            os.environ["SPARSEFL_BACKEND"] = old
    diff = (finals["engine"] - finals["eager"]).abs()
    out["max_abs_diff"] = float(diff.max()) if diff.numel() else 0.0
    out["max_rel_diff"] = float((diff / finals["eager"].abs().clamp_min(1e-6)).max()) \
        if diff.numel() else 0.0
    for name in ("engine", "eager"):  # machinery: everything but forward/backward
        out[name]["machinery"] = sum(out[name][p] for p in PHASES if p != "compute")
        out[name]["machinery w/o eval"] = out[name]["machinery"] - out[name]["eval"]
    return out


def table(res: dict[str, Any]) -> str:
    rows = [f"SparsyFed 95% + FedSAM round on {res.get('device_name', 'cpu')}: "
            f"{res['model']} ({res['params']:,} params), "
            f"{res['clients']} clients x {res['per_client']} examples, {res['threads']} "
            f"threads, median of {res['rounds']} rounds",
            "", "| phase | engine s | eager s | eager / engine |", "|---|---:|---:|---:|"]
    for p in [*[q for q in PHASES if q != "personalize"], "machinery", "machinery w/o eval",
              "round"]:
        e, g = res["engine"][p], res["eager"][p]
        ratio = f"{g / e:.2f}x" if e > 0 else ""
        rows.append(f"| {p} | {e:.4f} | {g:.4f} | {ratio} |")
    rows.append(f"\nsame model after the round: max |diff| {res['max_abs_diff']:.3g}, "
                f"max relative diff {res['max_rel_diff']:.3g}")
    return "\n".join(rows)


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0, 0.0]
    for p in [q for q in PHASES if q != "personalize"]:
        vals = [res["engine"][p], res["eager"][p]]
        ax.bar(["engine (fused)", "eager (reference)"], vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="seconds per round", title=f"one round, {res['model']}, "
           f"{res['clients']} clients")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(model: str, clients: int, per_client: int, rounds: int, threads: int,
         out_dir: str | None, device: str = "cpu") -> str:
    res = run(model, clients, per_client, rounds, threads=threads, device=device)
    return write_outputs(out_dir, "round", res, table(res), plot)
