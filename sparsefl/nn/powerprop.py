"""Powerpropagation layers (Schwarz et al. 2021) with SparsyFed's activation pruning.

A layer stores omega and computes with theta = sign(omega) * |omega|^beta.  The chain rule
gives dL/domega = dL/dtheta * beta * |omega|^(beta-1), which is exactly 0 at omega = 0 when
beta > 1: a pruned weight receives no gradient and cannot regrow during local training,
and large weights grow faster than small ones ("rich get richer").

Activation pruning (SparsyFed): in training, the input saved for the weight gradient keeps
only its top-`act_density` fraction by magnitude over the whole batch tensor, and is
stored compressed (indices + values from `sparsefl.ops.topk_compress`), so the memory
saving is real.  dL/dx is computed from theta and stays dense; evaluation never prunes.
`act_density` is a plain float set once per round (`set_activation_density`), so the
forward pass never synchronises with the device.

`act_threshold = "first_batch"` is the SparsyFed authors' form for conv layers: the
round's first training batch fixes the threshold tau (its k-th largest magnitude) and
every batch of the round keeps the entries with |x| >= tau, however many they are
(`act_cut`).  A known threshold needs no selection: the kept input is one masking pass
(dense path) or one packing pass (sparse path).  Linear layers stay per batch, as theirs.
The dense path keeps the pruned input as a dense masked tensor when at least a third of it
survives (then no smaller than indices + values) and compressed otherwise; its backward is
one `convolution_backward` call for dx, dw and the bias.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsefl.ops import _backend
from sparsefl.ops.reference.topk import keep_count

ACT_THRESHOLDS = ("per_batch", "first_batch")


def _abs_pow(mag: Tensor, e: float) -> Tensor:
    """mag ** e, with the common exponents done by square roots (pow is exp(e*log x),
    several times slower on CPU)."""
    if e == 0.25:
        return mag.sqrt().sqrt_()
    if e == 0.5:
        return mag.sqrt()
    if e == 1.0:
        return mag
    if e == 2.0:
        return mag * mag
    return mag.pow(e)


class _Powerprop(torch.autograd.Function):
    # theta = omega * |omega|^(beta-1) and dtheta/domega = beta * |omega|^(beta-1): one
    # power serves both passes, and both are exactly 0 at omega = 0 for beta > 1.
    @staticmethod
    def forward(ctx, omega: Tensor, beta: float) -> Tensor:
        t = _abs_pow(omega.abs(), beta - 1.0)
        ctx.save_for_backward(t)
        ctx.beta = beta
        return omega * t

    @staticmethod
    def backward(ctx, grad: Tensor):
        (t,) = ctx.saved_tensors
        return grad * t * ctx.beta, None


def powerprop(omega: Tensor, beta: float) -> Tensor:
    """theta = sign(omega)|omega|^beta (identity for beta == 1)."""
    return omega if beta == 1.0 else _Powerprop.apply(omega, beta)


def to_omega(theta: Tensor, beta: float) -> Tensor:
    """Inverse map, used at init so that theta keeps the initialiser's scale."""
    return theta.sign() * theta.abs().pow(1.0 / beta)


# Seconds spent compressing and expanding pruned activations, summed over the process:
# the engine reads it around local training to report activation pruning as its own phase.
ACT_PRUNE_SECONDS = [0.0]


def act_prune_seconds() -> float:
    """Activation-pruning seconds so far: the Python paths plus the C++ sparse layers."""
    from sparsefl import _native

    native = (torch.ops.sparsefl_C.act_prune_ns() * 1e-9
              if _native.has_kernel("sparse_conv_forward", "cpu") else 0.0)
    return ACT_PRUNE_SECONDS[0] + native


def act_cut(m: nn.Module, x: Tensor, fused: bool = False) -> tuple[int, float | None]:
    """How this batch's activation pruning cuts the layer input x: (k, None), keep the k
    largest |x| (per batch, ties to the lower flat index), or (-1, tau), keep every |x| >=
    tau, or (-1, None), keep every nonzero.  fused=True (the C++ sparse layer): a conv
    layer's per-batch cut stays (k, None) unselected, since the layer selects it itself on
    its input tiles while they are in cache (csrc/cpu/sparse_conv/layer.cpp select_cut).

    "first_batch" (conv layers): tau is the k-th largest magnitude of the round's first
    batch, kept for the round.  "per_batch" conv layers select on every batch, and the
    selection says which form the cut takes: when the k largest are exactly {|x| >= tau}
    (no tie at the k-th magnitude left out: continuous values) it is the threshold form,
    whose pack and kept-tiles paths need no selection of their own; when k reaches every
    nonzero (a post-ReLU input at a high keep fraction) it is x itself, whichever zeros
    the top k would keep; only a tie split at the k-th magnitude stays a top-k.  Linear
    layers stay (k, None): a chain of them runs as one C++ op (the fused MLP step) that
    takes k as it is, and the layer-by-layer path must match it bit for bit."""
    k = keep_count(x.numel(), m.act_density)
    if m.act_threshold == "per_batch" or not isinstance(m, nn.Conv2d):
        if isinstance(m, nn.Conv2d) and 0 < k < x.numel() and not fused:
            t0 = time.perf_counter()
            hint = getattr(m, "_act_hint", None)
            tau, above, at = kth_magnitude_count(x.detach(), k, hint)
            m._act_hint = next_hint(hint, tau)
            ACT_PRUNE_SECONDS[0] += time.perf_counter() - t0
            if tau == 0:  # fewer nonzeros than k: all of them are kept
                return -1, None
            if above + at == k:
                return -1, tau
        return k, None
    if m.act_tau is None:
        t0 = time.perf_counter()
        m.act_tau = kth_magnitude(x.detach(), k) if k > 0 else math.inf
        ACT_PRUNE_SECONDS[0] += time.perf_counter() - t0
    return -1, m.act_tau


def _native_cpu(x: Tensor) -> bool:
    """The C++ activation kernels take x (a CPU float tensor, the extension built)."""
    from sparsefl import _native

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16,
                                                   torch.bfloat16)
            and _native.has_kernel("sparse_conv_forward", "cpu"))


def _native_kth(x: Tensor, k: int) -> bool:
    return 1 <= k < x.numel() and _native_cpu(x)


def kth_magnitude(x: Tensor, k: int) -> float:
    """The k-th largest |x| (1 <= k <= numel): a sampled bracket and one vector pass in C++
    for CPU float tensors (csrc/cpu/kth_magnitude.cpp; torch.kthvalue took 2-7 ms on a
    stage-1 layer input), else kthvalue; the same value either way
    (tests/test_sparse_compute.py)."""
    if _native_kth(x, k):
        return torch.ops.sparsefl_C.kth_magnitude(x, k)
    return float(x.abs().reshape(-1).kthvalue(x.numel() - k + 1).values)


def threshold_prune(x: Tensor, tau: float) -> tuple[Tensor, int]:
    """(x with every |x| < tau zeroed, how many kept): one pass in C++ for CPU float
    tensors (csrc/cpu/threshold_prune.cpp; torch's abs, compare, count_nonzero and
    masked_fill took ~0.6 ms on a stage-1 input), else those torch ops."""
    if _native_cpu(x):
        out, kept = torch.ops.sparsefl_C.threshold_prune(x, tau)
        return out, int(kept)
    drop = x.abs() < tau
    return x.masked_fill(drop, 0), x.numel() - int(torch.count_nonzero(drop))


def kth_magnitude_count(x: Tensor, k: int,
                        hint: tuple[float, float] | None = None) -> tuple[float, int, int]:
    """(tau, above, at): the k-th largest |x| (1 <= k <= numel), how many |x| exceed it and
    how many equal it; above + at == k when the k largest are exactly {|x| >= tau}.
    hint (tau, r): where tau is expected, within a factor 1 + r (next_hint); it changes
    how fast the C++ selection finds tau, never the answer."""
    if _native_kth(x, k):
        if hint is None:
            return tuple(torch.ops.sparsefl_C.kth_magnitude_count(x, k))
        tau, r = hint
        return tuple(torch.ops.sparsefl_C.kth_magnitude_count(x, k, tau / (1 + r),
                                                              tau * (1 + r)))
    a = x.abs().reshape(-1)
    tau = a.kthvalue(a.numel() - k + 1).values
    return float(tau), int((a > tau).sum()), int((a == tau).sum())


# The per-batch selection's bracket around the previous batch's cut: consecutive batches'
# cuts moved by 3-8% (stages 2-3 of a width-16 ResNet-18) up to 30% (stage 1: the images
# differ), so the margin follows the last move with room to spare, within these bounds.
HINT_MARGIN = (0.02, 1.0)


def next_hint(hint: tuple[float, float] | None, tau: float) -> tuple[float, float]:
    """The bracket for the next batch after a cut at tau: (tau, r), r twice the relative
    move just seen, or 0.9x the last r when the cut held still (the fused C++ layer keeps
    the same rule in its plan: csrc/cpu/sparse_conv/layer.cpp select_cut)."""
    lo, hi = HINT_MARGIN
    if hint is None or not math.isfinite(tau):
        return (tau, 4 * lo)
    prev, r = hint
    move = abs(tau - prev) / prev if prev > 0 else (0.0 if tau == 0 else hi)
    return (tau, min(hi, max(lo, 0.9 * r, 2 * move)))


def act_keep(m: nn.Module, x: Tensor) -> int:
    """How many entries of x this batch's activation pruning keeps (act_cut as a count; the
    layers never need it, the tests state the pruning rule with it)."""
    k, tau = act_cut(m, x)
    if tau is None:
        return k if k >= 0 else int(torch.count_nonzero(x.detach()))
    return int(torch.count_nonzero(x.detach().abs() >= tau))


def _save_pruned(ctx, x: Tensor, k: int, tau: float | None = None) -> None:
    """Save x pruned for the weight gradient.  Under a threshold tau: dense and masked when
    a third or more of it survives (then no larger than indices + values), else as indices
    + values; per batch (top k): indices + values from topk_compress; k = -1 (every
    nonzero kept): x itself."""
    t0 = time.perf_counter()
    xd = x.detach()
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    if tau is None and k == -1:
        ctx.save_for_backward(xd)
    elif tau is not None:
        pruned, kept = threshold_prune(xd, tau)
        if 3 * kept >= xd.numel():
            ctx.save_for_backward(pruned)
        else:  # kept entries are nonzero (|x| >= tau > 0), so nonzero() finds them
            idx = pruned.reshape(-1).nonzero().flatten()
            ctx.save_for_backward(idx, xd.reshape(-1)[idx])
    else:
        idx, val = torch.ops.sparsefl.topk_compress([xd], [], k, _backend.requested(None))
        ctx.save_for_backward(idx, val)
    ACT_PRUNE_SECONDS[0] += time.perf_counter() - t0


def _pruned_input(ctx) -> Tensor:
    saved = ctx.saved_tensors
    if len(saved) == 1:  # kept dense
        return saved[0]
    idx, val = saved
    t0 = time.perf_counter()
    flat = torch.zeros(ctx.x_shape.numel(), dtype=ctx.x_dtype, device=val.device)
    out = flat.index_copy_(0, idx, val).view(ctx.x_shape)
    ACT_PRUNE_SECONDS[0] += time.perf_counter() - t0
    return out


class _PrunedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, k: int) -> Tensor:
        _save_pruned(ctx, x, k)
        ctx.w, ctx.has_bias = w.detach(), b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy: Tensor):
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(ctx.w)
        if ctx.needs_input_grad[1]:
            xp = _pruned_input(ctx)
            gw = gy.reshape(-1, gy.shape[-1]).t().matmul(xp.reshape(-1, xp.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, gb, None


class _PrunedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, k: int, tau: float | None,
                stride, padding, dilation, groups) -> Tensor:
        _save_pruned(ctx, x, k, tau)
        ctx.w, ctx.has_bias = w.detach(), b is not None
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy: Tensor):
        stride, padding, dilation, groups = ctx.conf
        need = ctx.needs_input_grad
        mask = [need[0], need[1], ctx.has_bias and need[2]]
        if not any(mask):
            return None, None, None, None, None, None, None, None, None
        # one call for all three: dx reads only w and dy, so the pruned input serves it too
        xp = _pruned_input(ctx) if need[1] else gy.new_empty(1).expand(ctx.x_shape)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, xp, ctx.w, [ctx.w.shape[0]] if mask[2] else None, _pair(stride),
            _pair(padding), _pair(dilation), False, [0, 0], groups, mask)
        return gx, gw, gb, None, None, None, None, None, None


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class _PowerpropMixin:
    """What both layers share: beta, the activation density, init in omega, repr."""

    # The sparse path, registered by sparsefl.nn.sparse_compute, which builds on these
    # layers (they never import it): only its set_compute sets compute != "dense".
    _sparse_path: Callable[[nn.Module, Tensor], Tensor] | None = None

    def _set_beta(self, beta: float) -> None:
        if not beta >= 1.0:
            raise ValueError(f"powerprop beta must be >= 1, got {beta}")
        self.beta = float(beta)
        self.act_density = 1.0
        self.act_threshold = "per_batch"  # or "first_batch" (ACT_THRESHOLDS)
        self.act_tau: float | None = None  # first_batch: this round's threshold
        # Compute path (sparsefl.nn.set_compute): "dense", "sparse" or "auto", with the
        # support packed when it was set.
        self.compute = "dense"
        self._spec = None  # sparse_compute._Spec: the packed support and geometry
        self._checked = None  # (weight version, pointer) at the last support check
        self._recompute = False  # sparse path: normalization recomputes our output

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        with torch.no_grad():
            self.weight.copy_(to_omega(self.weight, self.beta))

    def _pruning(self) -> bool:
        return self.training and self.act_density < 1.0 and torch.is_grad_enabled()

    def _pruning_configured(self) -> bool:
        return self.act_density < 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.compute != "dense":
            return _PowerpropMixin._sparse_path(self, x)  # type: ignore[misc]
        return self._dense_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"  # type: ignore[misc]


class PowerpropLinear(_PowerpropMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 beta: float = 1.25, **kw) -> None:
        self._set_beta(beta)
        super().__init__(in_features, out_features, bias, **kw)

    def _dense_forward(self, x: Tensor) -> Tensor:
        w = powerprop(self.weight, self.beta)
        if self._pruning():
            return _PrunedLinear.apply(x, w, self.bias, act_cut(self, x)[0])
        return F.linear(x, w, self.bias)


class PowerpropConv2d(_PowerpropMixin, nn.Conv2d):
    def __init__(self, *args, beta: float = 1.25, **kw) -> None:
        self._set_beta(beta)
        super().__init__(*args, **kw)
        if self.padding_mode != "zeros":
            raise ValueError("PowerpropConv2d supports padding_mode='zeros' only")

    def _dense_forward(self, x: Tensor) -> Tensor:
        w = powerprop(self.weight, self.beta)
        if self._pruning():
            if isinstance(self.padding, str):
                raise ValueError("activation pruning needs numeric padding")
            return _PrunedConv2d.apply(x, w, self.bias, *act_cut(self, x), self.stride,
                                       self.padding, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


POWERPROP = (PowerpropLinear, PowerpropConv2d)
