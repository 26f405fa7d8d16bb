"""Exact magnitude top-k: masks, and compression with error feedback.

    topk_mask(tensors, density, scope="global")      -> bool masks (same shapes)
    topk_compress(tensors, density, residual=None)   -> (flat indices int64 ascending, values)
    keep_count(n, density)                           -> k = n - round((1 - density) * n)
    TopKCompressor(density, mode="exact"|"reuse"|"sample", refresh_every=T)

"global" ranks all tensors together as one vector (SparsyFed's global pruning);
"per_tensor" keeps k_i of each tensor.  Ties in |x| go to the lower flat index.  NaN raises
ValueError.  With a residual (error feedback, one tensor per input, same shape and dtype):
e = x + residual is compressed and residual becomes e - sent, in the same kernel.

Backends: reference (plain torch, sort-based), cpp (radix select, multi-threaded,
csrc/cpu/topk.cpp), triton (radix select, kernels/topk.py) and cuda (radix select on the
device, csrc/cuda/topk.cu: compile-checked, not yet run on a GPU).
Registered as torch.ops.sparsefl.topk_mask / topk_compress.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import topk as _reference
from sparsefl.ops.reference.topk import keep_count

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS: dict[str, types.SimpleNamespace] = {}


def _impl(name: str) -> types.SimpleNamespace:
    if name not in _IMPLS:
        if name == "reference":
            _IMPLS[name] = types.SimpleNamespace(mask=_reference.topk_mask,
                                                 compress=_reference.topk_compress)
        elif name == "triton":
            _triton = _backend.triton_module("topk")

            _IMPLS[name] = types.SimpleNamespace(mask=_triton.topk_mask,
                                                 compress=_triton.topk_compress)
        else:
            _IMPLS[name] = types.SimpleNamespace(mask=torch.ops.sparsefl_C.topk_mask,
                                                 compress=torch.ops.sparsefl_C.topk_compress)
    return _IMPLS[name]


def _check(xs: Sequence[Tensor], residual: Sequence[Tensor] = ()) -> None:
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"sparsefl.topk: tensors[{i}] is {type(x).__name__}, not a Tensor")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"sparsefl.topk: tensors[{i}] has dtype {x.dtype}; supported: "
                            "float32, float16, bfloat16")
        if x.device != xs[0].device:
            raise ValueError(f"sparsefl.topk: tensors[{i}] is on {x.device}, "
                             f"tensors[0] on {xs[0].device}")
    if residual:
        if len(residual) != len(xs):
            raise ValueError(f"sparsefl.topk: residual has {len(residual)} tensors, "
                             f"expected {len(xs)}")
        for i, (r, x) in enumerate(zip(residual, xs)):
            if not isinstance(r, Tensor) or r.shape != x.shape or r.dtype != x.dtype \
                    or r.device != x.device:
                raise ValueError(f"sparsefl.topk: residual[{i}] must match tensors[{i}] in "
                                 f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}")
            if not r.is_contiguous():
                raise ValueError(f"sparsefl.topk: residual[{i}] must be contiguous (it is "
                                 "updated in place)")


def _check_k(k: int, xs: Sequence[Tensor]) -> None:
    n = sum(x.numel() for x in xs)
    if not 0 <= k <= n:
        raise ValueError(f"sparsefl.topk: k = {k} is outside [0, {n}]")


def _run(backend: str, xs: list[Tensor], residual: list[Tensor], op: str, call):
    name = _backend.resolve(backend, xs, native_op=op, triton=True)
    _check(xs, residual)  # cheap: per-tensor metadata only
    return call(_impl(name))


_lib = torch.library.Library("sparsefl", "FRAGMENT")
_lib.define("topk_mask(Tensor[] xs, int k, str backend) -> Tensor[]")
_lib.define("topk_compress(Tensor[] xs, Tensor(a!)[] residual, int k, str backend) "
            "-> (Tensor, Tensor)")


def _topk_mask_impl(xs, k, backend):
    xs = [x.contiguous() for x in xs]
    _check_k(k, xs)
    return _run(backend, xs, [], "topk_mask", lambda impl: list(impl.mask(xs, k)))


def _topk_compress_impl(xs, residual, k, backend):
    xs = [x.contiguous() for x in xs]
    _check_k(k, xs)
    if not xs:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    out = _run(backend, xs, residual, "topk_compress",
               lambda impl: impl.compress(xs, residual, k))
    if residual:
        torch.autograd.graph.increment_version(residual)
    return out


_lib.impl("topk_mask", _topk_mask_impl, "CompositeExplicitAutograd")
_lib.impl("topk_compress", _topk_compress_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsefl::topk_mask", lib=_lib)
def _(xs, k, backend):
    return [torch.empty_like(x, dtype=torch.bool) for x in xs]


@torch.library.register_fake("sparsefl::topk_compress", lib=_lib)
def _(xs, residual, k, backend):
    device = xs[0].device if xs else torch.device("cpu")
    dtype = xs[0].dtype if xs else torch.float32
    return (torch.empty(k, dtype=torch.long, device=device),
            torch.empty(k, dtype=dtype, device=device))


def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 <= density <= 1):
        raise ValueError(f"sparsefl.topk: density must be in [0, 1], got {density!r}")


def _as_list(tensors) -> tuple[list[Tensor], bool]:
    if isinstance(tensors, Tensor):
        return [tensors], True
    return list(tensors), False


def topk_mask(tensors: Tensor | Sequence[Tensor], density: float, *, scope: str = "global",
              backend: str | None = None) -> Tensor | list[Tensor]:
    """Boolean masks keeping the largest-|x| fraction `density` (exact, ties to lower index)."""
    _check_density(density)
    xs, single = _as_list(tensors)
    be = _backend.requested(backend)
    if scope == "global":
        masks = torch.ops.sparsefl.topk_mask(xs, keep_count(sum(x.numel() for x in xs),
                                                            density), be)
    elif scope == "per_tensor":
        masks = [torch.ops.sparsefl.topk_mask([x], keep_count(x.numel(), density), be)[0]
                 for x in xs]
    else:
        raise ValueError(f"sparsefl.topk: scope must be 'global' or 'per_tensor', got {scope!r}")
    return masks[0] if single else masks


def topk_compress(tensors: Tensor | Sequence[Tensor], density: float, *,
                  residual: Tensor | Sequence[Tensor] | None = None,
                  backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(indices, values) of the global top-k of x (+ residual), indices ascending (int64)."""
    _check_density(density)
    xs, _ = _as_list(tensors)
    res = [] if residual is None else _as_list(residual)[0]
    k = keep_count(sum(x.numel() for x in xs), density)
    return torch.ops.sparsefl.topk_compress(xs, res, k, _backend.requested(backend))


class TopKCompressor:
    """Top-k compression with optional approximate thresholds and error feedback.

    mode="exact": every call runs the exact kernel.
    mode="reuse": the exact kernel runs every `refresh_every` calls; in between, the last
        exact threshold is reused (one read pass; the kept count drifts with the data).
    mode="sample": the threshold is the matching quantile of a random sample of
        `sample_size` magnitudes (DGC-style), exact every `refresh_every` calls.
    `last_density` is the density actually achieved by the last call.
    """

    MODES = ("exact", "reuse", "sample")

    def __init__(self, density: float, *, mode: str = "exact", refresh_every: int = 10,
                 sample_size: int = 4096, error_feedback: bool = True, seed: int = 0,
                 backend: str | None = None) -> None:
        _check_density(density)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if refresh_every < 1 or sample_size < 1:
            raise ValueError("refresh_every and sample_size must be >= 1")
        self.density, self.mode, self.refresh_every = density, mode, refresh_every
        self.sample_size, self.error_feedback, self.backend = sample_size, error_feedback, backend
        self.residual: list[Tensor] | None = None
        self.threshold: float | None = None
        self.last_density: float | None = None
        self.calls = 0
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        xs = list(tensors)
        if self.error_feedback and self.residual is None:
            self.residual = [torch.zeros_like(x, memory_format=torch.contiguous_format)
                             for x in xs]
        n = sum(x.numel() for x in xs)
        exact_now = self.mode == "exact" or self.calls % self.refresh_every == 0
        self.calls += 1
        if exact_now:
            idx, val = topk_compress(xs, self.density, residual=self.residual,
                                     backend=self.backend)
            if len(val):
                self.threshold = float(val.float().abs().min())
        else:
            idx, val = self._threshold_select(xs, n)
        self.last_density = len(idx) / n if n else 0.0
        return idx, val

    @torch.no_grad()
    def _threshold_select(self, xs: list[Tensor], n: int) -> tuple[Tensor, Tensor]:
        _reference._check_nan(xs)
        flat = torch.cat([s.reshape(-1) for s in _reference.fold_residual(xs, self.residual
                                                                          or [])])
        if self.mode == "sample" or self.threshold is None:
            pick = torch.randint(0, n, (min(self.sample_size, n),), generator=self._gen)
            sample = flat[pick.to(flat.device)].float().abs()
            q = 1.0 - self.density
            self.threshold = float(torch.quantile(sample, q)) if q > 0 else 0.0
        keep = flat.float().abs() >= self.threshold if self.density > 0 else torch.zeros_like(
            flat, dtype=torch.bool)
        idx = keep.nonzero().flatten()
        val = flat[idx].clone()
        _reference.zero_sent(self.residual or [], idx)
        return idx, val
