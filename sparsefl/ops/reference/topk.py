"""Reference (plain torch) for exact magnitude top-k: the oracle of every top-k backend.

Rule: keep the k elements of largest |x| over the concatenation of the flattened tensors;
among equal |x| the lower flat index wins (a stable descending sort gives exactly that).
NaN is refused with ValueError.  k = n - round(sparsity * n), the count
torch.nn.utils.prune removes, with sparsity = 1 - density (see keep_count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def keep_count(n: int, density: float) -> int:
    """How many of n elements a top-k at this density keeps (prune's rounding)."""
    return n - round((1.0 - density) * n)


def _check_nan(xs: Sequence[Tensor]) -> None:
    for i, x in enumerate(xs):
        if torch.isnan(x).any():
            raise ValueError(f"sparsefl.topk: tensors[{i}] contains NaN; the magnitude order "
                             "of NaN is undefined (clean or mask the tensor first)")


def _selected(flat_abs: Tensor, k: int) -> Tensor:
    """Flat indices of the kept elements, ascending."""
    order = torch.sort(flat_abs, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _flat_abs(xs: Sequence[Tensor]) -> Tensor:
    if not xs:
        return torch.empty(0)
    return torch.cat([x.detach().reshape(-1).float().abs() for x in xs])


@torch.no_grad()
def topk_mask(xs: Sequence[Tensor], k: int) -> list[Tensor]:
    _check_nan(xs)
    flat = _flat_abs(xs)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[_selected(flat, k)] = True
    # separate tensors (not views of one buffer), as the kernels return
    return [m.view(x.shape).clone() for m, x in zip(mask.split([x.numel() for x in xs]), xs)]


def fold_residual(xs: Sequence[Tensor], residual: Sequence[Tensor]) -> list[Tensor]:
    """Error feedback, first half: residual <- residual + x; the selection runs on it."""
    if not residual:
        return list(xs)
    for r, x in zip(residual, xs):
        r.add_(x)
    return list(residual)


def zero_sent(residual: Sequence[Tensor], idx: Tensor) -> None:
    """Error feedback, second half: what was sent (flat indices, ascending) is no longer owed."""
    offset = 0
    for r in residual:
        local = idx[(idx >= offset) & (idx < offset + r.numel())] - offset
        r.view(-1)[local] = 0
        offset += r.numel()


@torch.no_grad()
def topk_compress(xs: Sequence[Tensor], residual: Sequence[Tensor], k: int
                  ) -> tuple[Tensor, Tensor]:
    _check_nan(xs)
    src = fold_residual(xs, residual)
    idx = _selected(_flat_abs(src), k)
    values = torch.cat([s.reshape(-1) for s in src])[idx].clone()
    zero_sent(residual, idx)
    return idx, values
