"""Local training on one client: E epochs with sgd | sam | asam | agnostic_sam.

The optimizer is built fresh each round (no state crosses rounds, as in FedAvg).  The
minibatch order comes from `gen`, seeded per (run seed, round, client), so a resumed
run draws exactly the same batches.  Phase times: "sam" is the time inside the SAM
family's ascent and descent calls (perturb, exact restore and the base step);
"act_prune" is SparsyFed's activation pruning inside forward/backward (top-k compress of
each layer input, expansion for the weight gradient); the rest of the loop is "compute".
A sparse Powerprop MLP under plain SGD (`client.fused`, sparsefl.nn.fused_sgd) trains
every step in one kernel call instead of this loop, with the same batches and updates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsefl.fl.config import ClientSection
from sparsefl.fl.timers import Timers
from sparsefl.nn.fused_sgd import fused_sgd
from sparsefl.nn.powerprop import ACT_PRUNE_SECONDS, act_prune_seconds
from sparsefl.optim import ASAM, SAM, AgnosticSAM


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i:i + batch]


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _optimizer(model: nn.Module, kind: str, lr: float, cfg: ClientSection):
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = dict(lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if kind == "sgd":
        # Without momentum, torch's fused kernel: one call for every parameter where the
        # default loops over them in Python (~0.2 ms of a 62-parameter width-16 ResNet
        # step), the same update bit for bit (tests/test_fused_sgd.py).  With momentum it
        # rounds the buffer update differently (an ulp), so the loop stays.
        fused = cfg.momentum == 0 and bool(params) and all(
            p.device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in params)
        return torch.optim.SGD(params, fused=fused or None, **sgd)
    if kind == "sam":
        return SAM(params, torch.optim.SGD, rho=cfg.rho, **sgd)
    if kind == "asam":
        return ASAM(torch.optim.SGD(params, **sgd), model, rho=cfg.rho, eta=cfg.eta)
    return AgnosticSAM(params, torch.optim.SGD, rho=cfg.rho, rho2=cfg.rho2, **sgd)


def local_train(model: nn.Module, x: Tensor, y: Tensor, cfg: ClientSection, lr: float,
                gen: torch.Generator, timers: Timers | None = None,
                after_step: Callable[[], None] | None = None) -> float:
    """Train `model` in place on (x, y); returns the mean training loss."""
    timers = timers or Timers()
    kind = cfg.optimizer
    if kind not in ("sgd", "sam", "asam", "agnostic_sam"):
        raise ValueError(f"client.optimizer: unknown {kind!r}")
    model.train()
    run = fused_sgd(model) if kind == "sgd" and cfg.fused and after_step is None else None
    # the fused path needs no torch optimizer: building one imports torch._dynamo (~1 s,
    # Optimizer.add_param_group is wrapped by torch._compile), a third of the default run
    opt = _optimizer(model, kind, lr, cfg) if run is None else None
    n = len(y)
    if kind == "agnostic_sam":  # a seeded train/validation split of the local data
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, int(round(cfg.val_fraction * n))) if n > 1 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        if len(tr_idx) == 0 or len(val_idx) == 0:
            tr_idx = val_idx = perm
        xv, yv, x, y, n = x[val_idx], y[val_idx], x[tr_idx], y[tr_idx], len(tr_idx)
        val_order = iter(())

    total, steps = 0.0, 0
    t_start, sam_time, act_start = timers.now(), 0.0, act_prune_seconds()
    if run is not None:  # every step in one kernel call: the same batches, the same updates
        orders = torch.stack([torch.randperm(n, generator=gen) for _ in range(cfg.epochs)]) \
            if cfg.epochs else torch.empty(0, n, dtype=torch.int64)
        losses, act = run(x, y, orders, cfg.batch_size, lr, cfg.momentum, cfg.weight_decay)
        ACT_PRUNE_SECONDS[0] += act  # the loop's layers count theirs as they go
        for v in losses.tolist():  # summed as the loop below sums them
            total += v
        steps = len(losses)
    for _ in range(cfg.epochs if run is None else 0):
        for b in _batches(n, cfg.batch_size, gen):
            xb, yb = x[b], y[b]
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if kind == "sgd":
                opt.step()
                opt.zero_grad()
            elif kind == "agnostic_sam":
                opt.save_train_grad()
                vb = next(val_order, None)
                if vb is None:
                    val_order = iter(list(_batches(len(yv), cfg.batch_size, gen)))
                    vb = next(val_order)
                F.cross_entropy(model(xv[vb]), yv[vb]).backward()
                t0 = timers.now()
                opt.first_step(zero_grad=True)
                sam_time += timers.now() - t0
                (F.cross_entropy(model(xb), yb) + F.cross_entropy(model(xv[vb]), yv[vb])
                 ).backward()
                t0 = timers.now()
                opt.second_step(zero_grad=True)
                sam_time += timers.now() - t0
            else:
                t0 = timers.now()
                if kind == "sam":
                    opt.first_step(zero_grad=True)
                else:
                    opt.ascent_step()
                sam_time += timers.now() - t0
                F.cross_entropy(model(xb), yb).backward()
                t0 = timers.now()
                if kind == "sam":
                    opt.second_step(zero_grad=True)
                else:
                    opt.descent_step()
                sam_time += timers.now() - t0
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            steps += 1
    act = act_prune_seconds() - act_start
    timers.add("sam", sam_time)
    timers.add("act_prune", act)
    timers.add("compute", timers.now() - t_start - sam_time - act)
    return total / max(steps, 1)
