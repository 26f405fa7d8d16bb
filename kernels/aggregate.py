"""Triton backend of sparse aggregation and of the tiled layout's index pass.

Definitions: sparsefl/ops/reference/aggregate.py (sparse_aggregate) and
sparsefl/ops/tiled.py (`_reference_tile_indices`).

Aggregation.  acc (float64, one element per model entry) receives the clients one after
the other: `_scatter_kernel` adds w_c * v_c at client c's indices.  A client's indices
are unique (strictly ascending, checked first), so the programs of one launch never touch
the same element and need no atomics; launches run in stream order, so every element sums
its contributions in client order -- the reference's order.  Weights and lr travel as
float64 tensors (a Python float argument would reach the kernel as fp32).  Accumulate
mode (float64 out) adds into out itself; otherwise `_finish_kernel` writes
float32(base + lr * acc), rounded once.  Under TRITON_INTERPRET=1 (numpy, no fused
multiply-add) the result is bitwise the reference's; a GPU compiler may contract
`acc + w * v` into one FMA (a difference in the last float64 bit, ~1e-16 relative).

Tiling.  `_tile_kernel` writes each entry's offset inside its 4096-element tile (int16)
and counts the entries per tile with integer atomics (exact, order-free); offsets are the
prefix sums of the counts.  The tiled form of a payload is aggregated by untiling it on
the device (sparsefl/ops/tiled.py: untile) and scattering the flat pair.

Program offsets are int64: a flat index space may exceed 2^31 elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsefl.ops.reference.aggregate import check_call

BLOCK = 1024
TILE_BITS = 12  # TILE = 4096 (sparsefl/ops/tiled.py)


@triton.jit
def _scatter_kernel(acc_ptr, idx_ptr, val_ptr, w_ptr, n, DENSE: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    if DENSE:  # noqa: SIM108  (a constexpr branch: one of the two is compiled)
        where = offs
    else:
        where = tl.load(idx_ptr + offs, mask=inside, other=0).to(tl.int64)
    v = tl.load(val_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    w = tl.load(w_ptr)
    a = tl.load(acc_ptr + where, mask=inside, other=0.0)
    tl.store(acc_ptr + where, a + w * v, mask=inside)


@triton.jit
def _finish_kernel(acc_ptr, base_ptr, lr_ptr, out_ptr, n, HAS_BASE: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(acc_ptr + offs, mask=inside, other=0.0)
    lr = tl.load(lr_ptr)
    if HAS_BASE:
        start = tl.load(base_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    else:
        start = tl.zeros([BLOCK], dtype=tl.float64)
    tl.store(out_ptr + offs, (start + lr * a).to(tl.float32), mask=inside)


@triton.jit
def _tile_kernel(idx_ptr, start, n, local_ptr, counts_ptr, TILE_BITS: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    j = tl.load(idx_ptr + offs, mask=inside, other=0).to(tl.int64) + start
    tl.store(local_ptr + offs, (j & ((1 << TILE_BITS) - 1)).to(tl.int16), mask=inside)
    tl.atomic_add(counts_ptr + (j >> TILE_BITS), tl.full([BLOCK], 1, tl.int32), mask=inside)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


@torch.no_grad()
def sparse_aggregate(indices: Sequence[Tensor], values: Sequence[Tensor],
                     weights: Sequence[float], out: Tensor, base: Tensor | None,
                     lr: float) -> None:
    numel = out.numel()
    accumulate = check_call(indices, values, weights, out, base, lr)
    dev = out.device
    acc = out if accumulate else torch.zeros(numel, dtype=torch.float64, device=dev)
    w64 = torch.tensor([float(w) for w in weights], dtype=torch.float64, device=dev)
    for c, (idx, val) in enumerate(zip(indices, values)):
        n = val.numel()
        if n == 0:
            continue
        dense = idx.numel() == 0 and n == numel
        _scatter_kernel[_grid(n)](acc, val if dense else idx.contiguous(), val.contiguous(),
                                  w64[c:], n, DENSE=dense, BLOCK=BLOCK)
    if accumulate or numel == 0:
        return
    lr64 = torch.tensor([float(lr)], dtype=torch.float64, device=dev)
    b = base.contiguous() if base is not None else acc
    _finish_kernel[_grid(numel)](acc, b, lr64, out, numel, HAS_BASE=base is not None,
                                 BLOCK=BLOCK)


def tile_indices(pieces: Sequence[Tensor], starts: Sequence[int], numel: int
                 ) -> tuple[Tensor, Tensor]:
    """(offsets int32 [tiles + 1], local int16 [nnz]) of the flat sequence pieces[i] +
    starts[i]; the caller (sparsefl/ops/tiled.py) has checked order and range."""
    tiles = -(-numel // (1 << TILE_BITS))
    device = pieces[0].device if pieces else torch.device("cpu")
    total = sum(p.numel() for p in pieces)
    local = torch.empty(total, dtype=torch.int16, device=device)
    counts = torch.zeros(tiles + 1, dtype=torch.int32, device=device)
    k = 0
    for p, s in zip(pieces, starts):
        n = p.numel()
        if n:
            _tile_kernel[_grid(n)](p.contiguous(), int(s), n, local[k:], counts,
                                   TILE_BITS=TILE_BITS, BLOCK=BLOCK)
        k += n
    offsets = torch.zeros(tiles + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts[:tiles], 0, dtype=torch.int32)
    return offsets, local
