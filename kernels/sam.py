"""Triton backend of the fused SAM family (definition: sparsefl/ops/reference/sam.py).

Pass 1, `_sumsq_kernel`: every program reduces BLOCK elements of one tensor to a float64
partial (squares in float64, as the reference), stored at its own slot of one partials
buffer shared by all tensors (no atomics).  The partials are then summed in a fixed
order, so the norm is deterministic.  The scales float32(rho_i / (n + eps)) are formed in
float64 on the device (no host sync; a Python float would reach the kernel as fp32).
Pass 2, `_apply_kernel`: writes out = w + s1 * T^2 * g1 - s2 * g2 in the reference's
order, plus the backup copy when asked for; on a GPU it is launched without FMA
contraction, so the perturbed weights are the reference's bits.

Launches are per tensor (2 per tensor + 1 reduction); a grouped launch over a pointer
table would cut them to 3 and is the next step for models with many small tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _sumsq_kernel(g_ptr, w_ptr, partial_ptr, n, eta, ADAPTIVE: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors above 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    if ADAPTIVE:  # T = |w| + eta in float32, as the reference, then squares in float64
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = (tl.abs(w) + eta).to(tl.float64) * g
    tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))


@triton.jit
def _apply_kernel(w_ptr, g1_ptr, g2_ptr, out_ptr, backup_ptr, norms_ptr, scale_ptr, n, eta,
                  ADAPTIVE: tl.constexpr, HAS_G2: tl.constexpr, HAS_BACKUP: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors above 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    n1 = tl.load(norms_ptr)
    n2 = tl.load(norms_ptr + 1)
    finite = (n1 == n1) & (n2 == n2) & (n1 < float("inf")) & (n2 < float("inf"))
    s1 = tl.load(scale_ptr)  # float32(rho_i / (n1 + eps)), formed in float64 on the device
    w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
    w = w_raw.to(tl.float32)
    g1 = tl.load(g1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        new = w + (t * t) * g1 * s1
    else:
        new = w + g1 * s1
    if HAS_G2:
        s2 = tl.load(scale_ptr + 1)
        g2 = tl.load(g2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        new = new - g2 * s2
    new = tl.where(finite, new, w)
    if HAS_BACKUP:
        tl.store(backup_ptr + offs, w_raw, mask=mask)
    tl.store(out_ptr + offs, new.to(w_raw.dtype), mask=mask)


def _contig(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _sumsq(gs: Sequence[Tensor], ws: Sequence[Tensor], adaptive: Sequence[bool],
           eta: float, device) -> Tensor:
    counts = [triton.cdiv(g.numel(), BLOCK) for g in gs]
    partials = torch.zeros(max(sum(counts), 1), dtype=torch.float64, device=device)
    start = 0
    for g, w, ad, c in zip(gs, ws, adaptive, counts):
        if c:
            _sumsq_kernel[(c,)](_contig(g), _contig(w), partials[start:], g.numel(), eta,
                                ADAPTIVE=bool(ad), BLOCK=BLOCK)
        start += c
    return partials.double().sum()  # fixed-shape reduction: deterministic


@torch.no_grad()
def perturb(w: Sequence[Tensor], g1: Sequence[Tensor], g2: Sequence[Tensor],
            out: Sequence[Tensor], backup: Sequence[Tensor], rho: Sequence[float], rho2: float,
            adaptive: Sequence[bool], eta: float, eps: float) -> Tensor:
    device = w[0].device if len(w) else torch.device("cpu")
    ss1 = _sumsq(g1, w, adaptive, eta, device)
    ss2 = _sumsq(g2, g2, [False] * len(g2), 0.0, device) if g2 else ss1.new_zeros(())
    norms = torch.stack([ss1, ss2]).sqrt()  # float64, stays on the device
    # per tensor (s1_i, s2): rho in float64 (a Python float reaches a kernel as fp32), one
    # rounding to float32 -- the reference's scales, bit for bit
    rhos = torch.tensor([[float(r), float(rho2)] for r in rho], dtype=torch.float64,
                        device=device).reshape(-1, 2)
    scales = (rhos / (norms + eps)).float()
    fusion = {} if device.type == "cpu" else {"enable_fp_fusion": False}  # no FMA: exact
    for i, wi in enumerate(w):
        if wi.numel() == 0:
            continue
        wc = _contig(wi)
        dst = out[i] if out[i].is_contiguous() else torch.empty_like(wc)
        bk = None
        if backup:
            bk = backup[i] if backup[i].is_contiguous() else torch.empty_like(wc)
        _apply_kernel[(triton.cdiv(wi.numel(), BLOCK),)](
            wc, _contig(g1[i]), _contig(g2[i]) if g2 else wc, dst,
            bk if bk is not None else wc, norms, scales[i], wi.numel(), float(eta),
            ADAPTIVE=bool(adaptive[i]), HAS_G2=bool(g2), HAS_BACKUP=bk is not None,
            BLOCK=BLOCK, **fusion)
        if dst is not out[i]:
            out[i].copy_(dst)
        if bk is not None and bk is not backup[i]:
            backup[i].copy_(bk)
    return norms.float()


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    # A restore is a plain copy; torch's copy kernel is already at memory speed on GPU.
    torch._foreach_copy_(list(dst), list(src))
