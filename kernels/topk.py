"""Triton backend of exact magnitude top-k (definition: sparsefl/ops/reference/topk.py).

Radix select on key = bits(|float(x)|) (31 bits, ordered like |x|), 8-bit digits from the
top, four passes (8 + 8 + 8 + 7 bits).  Each pass, `_hist_kernel` builds per-program
histograms of the current digit over the keys that match the prefix chosen so far and adds
them into one global histogram with integer atomics (exact, order-free).  The bucket that
holds the k-th largest key is picked with torch ops on the device (no host round trip);
after the last pass the k-th key K is known, and how many keys equal to K are kept.
`_eq_count_kernel` counts ties per program, an exclusive scan gives each program its rank
offset, and `_mask_kernel` keeps key > K and the first ties in index order.

The inputs are concatenated into one flat buffer (one extra copy); compression compacts
the mask with torch.nonzero.  Both are simple rather than minimal: the GPU path to tune.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsefl.ops.reference.topk import _check_nan, fold_residual, zero_sent

BLOCK = 1024
PASSES = ((23, 8), (15, 8), (7, 8), (0, 7))  # (shift, width) of each digit


@triton.jit
def _key(x_ptr, offs, mask):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def _hist_kernel(x_ptr, n, prefix_ptr, hist_ptr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors above 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _key(x_ptr, offs, inside)
    prefix = tl.load(prefix_ptr)
    match = inside & ((key >> (SHIFT + WIDTH)) == prefix)
    digit = (key >> SHIFT) & ((1 << WIDTH) - 1)
    h = tl.histogram(digit, 1 << WIDTH, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, 1 << WIDTH), h)


@triton.jit
def _eq_count_kernel(x_ptr, n, key_ptr, counts_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors above 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _key(x_ptr, offs, inside)
    kth = tl.load(key_ptr)
    tl.store(counts_ptr + pid, tl.sum((inside & (key == kth)).to(tl.int32), axis=0))


@triton.jit
def _mask_kernel(x_ptr, n, key_ptr, need_ptr, eq_before_ptr, out_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors above 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _key(x_ptr, offs, inside)
    kth = tl.load(key_ptr)
    need = tl.load(need_ptr)
    eq = inside & (key == kth)
    rank = tl.load(eq_before_ptr + pid) + tl.cumsum(eq.to(tl.int64), axis=0) - 1
    keep = (inside & (key > kth)) | (eq & (rank < need))
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=inside)


def _flat_mask(flat: Tensor, k: int) -> Tensor:
    n = flat.numel()
    if k == 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    grid = (triton.cdiv(n, BLOCK),)
    dev = flat.device
    prefix = torch.zeros(1, dtype=torch.int32, device=dev)
    remaining = torch.full((1,), k, dtype=torch.int64, device=dev)
    for shift, width in PASSES:
        hist = torch.zeros(1 << width, dtype=torch.int32, device=dev)
        _hist_kernel[grid](flat, n, prefix, hist, SHIFT=shift, WIDTH=width, BLOCK=BLOCK)
        from_top = hist.flip(0).to(torch.int64).cumsum(0)  # keys in this bin or above
        pos = torch.searchsorted(from_top, remaining)  # first bin reaching the k-th key
        above = torch.where(pos > 0, from_top[(pos - 1).clamp(min=0)], 0)
        remaining = remaining - above
        prefix = (prefix << width) | ((1 << width) - 1 - pos).to(torch.int32)
    counts = torch.empty(grid[0], dtype=torch.int64, device=dev)
    _eq_count_kernel[grid](flat, n, prefix, counts, BLOCK=BLOCK)
    eq_before = torch.cumsum(counts, 0) - counts
    out = torch.empty(n, dtype=torch.int8, device=dev)
    _mask_kernel[grid](flat, n, prefix, remaining, eq_before, out, BLOCK=BLOCK)
    return out.bool()


def _flat(xs: Sequence[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in xs]) if xs else torch.empty(0)


@torch.no_grad()
def topk_mask(xs: Sequence[Tensor], k: int) -> list[Tensor]:
    _check_nan(xs)
    if not xs:
        return []
    mask = _flat_mask(_flat([x.float() for x in xs]), k)
    return [m.view(x.shape).clone() for m, x in zip(mask.split([x.numel() for x in xs]), xs)]


@torch.no_grad()
def topk_compress(xs: Sequence[Tensor], residual: Sequence[Tensor], k: int
                  ) -> tuple[Tensor, Tensor]:
    _check_nan(xs)
    flat = _flat(fold_residual(xs, residual))
    idx = _flat_mask(flat.float(), k).nonzero().flatten()
    values = flat[idx].clone()
    zero_sent(residual, idx)
    return idx, values
