"""Reference (plain torch) for the fused SAM family: the oracle every backend is tested against.

Definition, over all tensors together (T_i = |w_i| + eta where tensor i is adaptive, else 1):

    n1    = || T * g1 ||_2            accumulated in float64
    n2    = || g2 ||_2                (only for the two-direction variant)
    out   = w + (rho_i / (n1 + eps)) * T^2 * g1 - (rho2 / (n2 + eps)) * g2
    backup = w                        (when a backup list is given)

Arithmetic per element is float32 ("opmath"), rounded once to the tensor's dtype, in the
same order as davda54/sam writes it: e = (T*T) * g * s, then w + e.
A non-finite norm leaves the weights untouched (out = w) and is returned as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _sumsq(ts: Sequence[Tensor], ws: Sequence[Tensor] | None, adaptive: Sequence[bool],
           eta: float) -> float:
    total = 0.0
    for i, g in enumerate(ts):
        v = g.double()
        if ws is not None and adaptive[i]:
            v = (ws[i].float().abs() + eta).double() * v
        total += float((v * v).sum())
    return total


@torch.no_grad()
def perturb(w: Sequence[Tensor], g1: Sequence[Tensor], g2: Sequence[Tensor],
            out: Sequence[Tensor], backup: Sequence[Tensor], rho: Sequence[float], rho2: float,
            adaptive: Sequence[bool], eta: float, eps: float) -> Tensor:
    n1 = _sumsq(g1, w, adaptive, eta) ** 0.5
    n2 = _sumsq(g2, None, [False] * len(g2), 0.0) ** 0.5
    finite = torch.isfinite(torch.tensor([n1, n2])).all().item()
    s2 = torch.tensor(rho2 / (n2 + eps), dtype=torch.float32) if g2 else None
    for i, wi in enumerate(w):
        w32 = wi.float()
        if finite:
            s1 = torch.tensor(rho[i] / (n1 + eps), dtype=torch.float32)
            t2 = (w32.abs() + eta) ** 2 if adaptive[i] else None
            e = (t2 * g1[i].float() if t2 is not None else g1[i].float()) * s1
            new = w32 + e
            if g2:
                new = new - g2[i].float() * s2
        else:
            new = w32
        if backup:
            backup[i].copy_(wi)
        out[i].copy_(new.to(wi.dtype))
    device = w[0].device if len(w) else torch.device("cpu")
    return torch.tensor([n1, n2], dtype=torch.float32, device=device)


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
