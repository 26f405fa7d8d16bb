"""`sparsefl analyze RUN_DIR`: flatness of a finished (or checkpointed) run's models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsefl.analysis.hessian import flatness


def analyze_run(run_dir: str | Path, *, examples: int = 1000, iters: int = 100,
                samples: int = 20, seed: int = 0) -> dict[str, Any]:
    """Top eigenvalue, trace and loss of the global model (and the SWA model) on a fixed,
    seeded subset of `examples` training examples; written to RUN_DIR/analysis.json."""
    from sparsefl import fl
    from sparsefl.fl import checkpoint, engine

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.toml: not a sparsefl run directory")
    cfg = fl.load(run_dir / "config.toml")
    found = checkpoint.latest(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to analyse")
    rnd, tensors, _ = found
    if cfg.decentralized.strategy != "none":
        from sparsefl.fl.decentralized import DecentralizedSimulation

        sim: Any = DecentralizedSimulation(cfg)
    else:
        sim = engine.Simulation(cfg)
    sim.load_state(rnd, tensors)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(sim.data.train_y), generator=gen)[:examples]
    x, y = sim.data.train_x[pick], sim.data.train_y[pick]
    out: dict[str, Any] = {"round": rnd, "examples": len(pick), "seed": seed}
    sim.layout.load(sim.model, sim.global_flat)
    out["global"] = flatness(sim.model, x, y, iters=iters, samples=samples, seed=seed)
    agents = getattr(sim, "w", None)
    if agents is not None and agents.shape[0] > 1:  # decentralized: each agent's model too
        out["agents_top_eigenvalue"] = []
        for k in range(agents.shape[0]):
            sim.layout.load(sim.model, agents[k])
            out["agents_top_eigenvalue"].append(
                flatness(sim.model, x, y, iters=iters, samples=0, seed=seed)["top_eigenvalue"])
    avg = sim.swa.average() if getattr(sim, "swa", None) is not None else None
    if avg is not None:
        from sparsefl.fl.evaluate import has_batchnorm, recompute_bn

        sim.layout.load(sim.model, avg)
        if has_batchnorm(sim.model):
            recompute_bn(sim.model, sim.data.train_x[:4096])
        out["swa"] = flatness(sim.model, x, y, iters=iters, samples=samples, seed=seed)
    (run_dir / "analysis.json").write_text(json.dumps(out, indent=1))
    return out
