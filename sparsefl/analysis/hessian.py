"""Flatness of a model's loss: top Hessian eigenvalue and Hessian trace.

Both use Hessian-vector products H v = d/dw (g . v), g = dL/dw, from double backward on a
fixed batch set (loss averaged over it, model in eval mode: BatchNorm uses its running
statistics and no dropout/activation pruning), so the numbers are reproducible.

- top eigenvalue: power iteration v <- Hv/||Hv|| from a seeded random start, stopped when
  the Rayleigh quotient changes by less than `tol` (relative); it converges to the
  eigenvalue of largest magnitude.
- trace: Hutchinson's estimator E[z^T H z] with Rademacher z, averaged over `samples`.

Powerprop models are analysed in their effective weights theta (`plain_copy`): the
flatness of the function the model computes, and the custom backward of the Powerprop
layer has no double backward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsefl.nn.powerprop import POWERPROP, powerprop


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy with every Powerprop layer replaced by its plain layer holding theta."""
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, POWERPROP):
                if isinstance(child, nn.Linear):
                    new = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                else:
                    new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                    child.stride, child.padding, child.dilation, child.groups,
                                    child.bias is not None)
                new = new.to(device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(powerprop(child.weight.detach(), child.beta))
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, name, new)
            else:
                swap(child)

    swap(model)
    return model


class HessianProbe:
    def __init__(self, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.model = plain_copy(model).eval()
        self.params = [p for p in self.model.parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.batches = list(batches)
        self.total = sum(len(y) for _, y in self.batches)

    def loss(self) -> Tensor:
        return sum(F.cross_entropy(self.model(x), y, reduction="sum")
                   for x, y in self.batches) / self.total

    def hvp(self, v: list[Tensor]) -> list[Tensor]:
        grads = torch.autograd.grad(self.loss(), self.params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v))
        return list(torch.autograd.grad(dot, self.params))

    def top_eigenvalue(self, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> float:
        gen = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in self.params]
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        eig = None
        for _ in range(iters):
            hv = self.hvp(v)
            new = float(sum((a * b).sum() for a, b in zip(hv, v)))
            norm = torch.sqrt(sum((u * u).sum() for u in hv))
            if float(norm) == 0.0:
                return 0.0
            v = [u / norm for u in hv]
            if eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-12):
                return new
            eig = new
        return float(eig)

    def trace(self, samples: int = 100, seed: int = 0) -> float:
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(samples):
            z = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
                 for p in self.params]
            total += float(sum((a * b).sum() for a, b in zip(self.hvp(z), z)))
        return total / samples


def flatness(model: nn.Module, x: Tensor, y: Tensor, *, batch: int = 500, iters: int = 100,
             samples: int = 50, seed: int = 0) -> dict[str, float]:
    """{"top_eigenvalue", "trace", "loss"} of `model` on (x, y)."""
    probe = HessianProbe(model, [(x[i:i + batch], y[i:i + batch])
                                 for i in range(0, len(y), batch)])
    with torch.no_grad():
        loss = float(probe.loss())
    return {"top_eigenvalue": probe.top_eigenvalue(iters=iters, seed=seed),
            "trace": probe.trace(samples=samples, seed=seed) if samples else None,
            "loss": loss}
