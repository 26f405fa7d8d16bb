"""Weighted sum of many clients' sparse updates, fused with the server update.

    sparse_aggregate(payloads, weights, out=None, base=None, lr=1.0) -> out
        out = base + lr * sum_c weights[c] * payload_c     (dense float32, 1-D)

payloads: SparseChunk objects or (indices, values) pairs over one flat index space of
`numel` elements (taken from out, base or the chunks); indices int64/int32 strictly
ascending, values float32/float16/bfloat16.  A pair with an empty index tensor and numel
values is a dense update.  Bitwise reproducible (fixed client order, float64 per element),
and the kernel's working memory does not grow with the number of clients.

Backends: reference (float64 index_add_), cpp (tiled merge, csrc/cpu/aggregate.cpp),
cuda (one block per tile, csrc/cuda/aggregate.cu: compile-checked, not yet run on a GPU).
Registered as torch.ops.sparsefl.sparse_aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import aggregate as _reference

_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("sparse_aggregate(Tensor[] indices, Tensor[] values, float[] weights, "
            "Tensor(a!) out, Tensor? base, float lr, str backend) -> ()")


def _impl(indices, values, weights, out, base, lr, backend):
    name = _backend.resolve(backend, [out], native_op="sparse_aggregate", triton=False)
    if name == "reference":
        _reference.sparse_aggregate(indices, values, weights, out, base, lr)
    else:
        torch.ops.sparsefl_C.sparse_aggregate(indices, values, weights, out, base, lr)
    torch.autograd.graph.increment_version(out)


_lib.impl("sparse_aggregate", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::sparse_aggregate", lib=_lib)
def _(indices, values, weights, out, base, lr, backend):
    return None


def _pairs(payloads) -> tuple[list[Tensor], list[Tensor], int | None]:
    indices, values, numel = [], [], None
    for i, p in enumerate(payloads):
        if hasattr(p, "indices") and hasattr(p, "values"):
            idx, val = p.indices, p.values
            if numel is None:
                numel = p.numel
            elif p.numel != numel:
                raise ValueError(f"sparsefl.aggregate: payload {i} has numel {p.numel}, "
                                 f"payload 0 has {numel}")
        else:
            try:
                idx, val = p
            except (TypeError, ValueError):
                raise TypeError(f"sparsefl.aggregate: payload {i} must be a SparseChunk or an "
                                f"(indices, values) pair, got {type(p).__name__}") from None
        if not isinstance(idx, Tensor) or not isinstance(val, Tensor):
            raise TypeError(f"sparsefl.aggregate: payload {i} indices/values must be tensors")
        indices.append(idx.contiguous())
        values.append(val.contiguous())
    return indices, values, numel


def sparse_aggregate(payloads: Sequence, weights: Sequence[float], out: Tensor | None = None,
                     base: Tensor | None = None, lr: float = 1.0, *, numel: int | None = None,
                     backend: str | None = None) -> Tensor:
    indices, values, chunk_numel = _pairs(payloads)
    weights = [float(w) for w in weights]
    if len(weights) != len(values):
        raise ValueError(f"sparsefl.aggregate: {len(values)} payloads but {len(weights)} "
                         "weights")
    if not math.isfinite(lr):
        raise ValueError(f"sparsefl.aggregate: lr must be finite, got {lr}")
    sizes = {n for n in (numel, chunk_numel, out.numel() if out is not None else None,
                         base.numel() if base is not None else None) if n is not None}
    if len(sizes) != 1:
        raise ValueError("sparsefl.aggregate: give the size through numel=, out, base or "
                         f"SparseChunk payloads, consistently (got {sorted(sizes)})")
    n = sizes.pop()
    if out is None:
        out = torch.empty(n, dtype=torch.float32,
                          device=base.device if base is not None else "cpu")
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError("sparsefl.aggregate: out must be a contiguous 1-D float32 tensor")
    if base is not None and (base.dtype != torch.float32 or base.dim() != 1):
        raise ValueError("sparsefl.aggregate: base must be a 1-D float32 tensor")
    torch.ops.sparsefl.sparse_aggregate(indices, values, weights, out,
                                        None if base is None else base.contiguous(), float(lr),
                                        _backend.requested(backend))
    return out
