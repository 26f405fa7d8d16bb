"""Accuracy and loss of a model, BatchNorm statistics recomputation, regrowth counts."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy); (nan, nan) on an empty set."""
    if len(y) == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / len(y), loss / len(y)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, x: Tensor, batch: int = 256) -> None:
    """Reset BatchNorm running statistics and re-estimate them (cumulative average)
    from `x`, as torch.optim.swa_utils.update_bn does."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was)


def regrowth(old: Tensor, sent_idx: Tensor) -> tuple[int, int]:
    """SparsyFed's per-client regrowth over one prunable slice: (activated, deactivated),
    activated = zero in the received model but sent, deactivated = non-zero but not sent."""
    sent = torch.zeros_like(old, dtype=torch.bool)
    sent[sent_idx.to(old.device)] = True
    was = old != 0
    return int((sent & ~was).sum()), int((was & ~sent).sum())
