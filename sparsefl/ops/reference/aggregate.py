"""Reference (plain torch, float64) for sparse aggregation: the oracle of every backend.

    out = base + lr * sum_c w_c * v_c      (v_c scattered at indices_c; base omitted: 0)
    out = out + sum_c w_c * v_c            (out float64: accumulate mode, base None, lr 1)

Accumulated in float64, client by client in the given order, rounded once to float32.
A payload with an empty index tensor and numel values is dense.  Indices must be strictly
ascending in [0, numel) and values finite, else ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def validate(indices: Sequence[Tensor], values: Sequence[Tensor], weights: Sequence[float],
             numel: int) -> None:
    if not len(indices) == len(values) == len(weights):
        raise ValueError(f"sparsefl.aggregate: {len(indices)} index tensors, {len(values)} "
                         f"value tensors and {len(weights)} weights")
    for c, (idx, val, w) in enumerate(zip(indices, values, weights)):
        if not math.isfinite(w):
            raise ValueError(f"sparsefl.aggregate: weight {c} is not finite")
        if val.dim() != 1:
            raise ValueError(f"sparsefl.aggregate: values[{c}] must be 1-D")
        if not bool(torch.isfinite(val).all()):
            raise ValueError(f"sparsefl.aggregate: payload {c} has a value that is not finite")
        if idx.numel() == 0 and val.numel() == numel and numel > 0:
            continue  # dense
        if idx.dim() != 1 or idx.numel() != val.numel():
            raise ValueError(f"sparsefl.aggregate: payload {c} has {idx.numel()} indices and "
                             f"{val.numel()} values")
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel
                            or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError(f"sparsefl.aggregate: payload {c} indices are not strictly "
                             f"ascending in [0, {numel})")


def check_call(indices: Sequence[Tensor], values: Sequence[Tensor], weights: Sequence[float],
               out: Tensor, base: Tensor | None, lr: float) -> bool:
    """Everything a backend checks before it writes; returns whether out accumulates."""
    accumulate = out.dtype == torch.float64
    if accumulate and (base is not None or lr != 1.0):
        raise ValueError("sparsefl.aggregate: a float64 out accumulates; base and lr do not "
                         "apply")
    validate(indices, values, weights, out.numel())
    return accumulate


@torch.no_grad()
def sparse_aggregate(indices: Sequence[Tensor], values: Sequence[Tensor],
                     weights: Sequence[float], out: Tensor, base: Tensor | None,
                     lr: float) -> None:
    numel = out.numel()
    accumulate = check_call(indices, values, weights, out, base, lr)
    acc = out.clone() if accumulate else torch.zeros(numel, dtype=torch.float64,
                                                     device=out.device)
    for idx, val, w in zip(indices, values, weights):
        contrib = w * val.double()
        if idx.numel() == 0 and val.numel() == numel:
            acc += contrib
        else:
            acc.index_add_(0, idx.long(), contrib)
    if accumulate:
        out.copy_(acc)
        return
    start = base.double() if base is not None else torch.zeros_like(acc)
    out.copy_((start + lr * acc).float())
