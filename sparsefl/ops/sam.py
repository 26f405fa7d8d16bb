"""Fused SAM / ASAM / two-direction perturbation and restore, over all tensors in one call.

Public functions (all take lists of tensors; every list entry pairs with params[i]):

    sam_perturb(params, grads, out, rho)     out = params + eps(params, grads)   -> ||T g||
    sam_perturb_(params, grads, backup, rho) backup = params; params += eps       -> ||T g||
    sam_restore_(params, backup)             params = backup (bit-exact)
    two_dir_perturb(params, g1, g2, out, rho1, rho2)
                                             out = params + rho1 g1/||g1|| - rho2 g2/||g2||
                                                                        -> [||g1||, ||g2||]

`adaptive` selects ASAM's T = |w| + eta per tensor (True for all, or one flag per tensor):
davda54/sam's adaptive mode is adaptive=True, eta=0, eps=1e-12; the official SamsungLabs
ASAM is adaptive on weight tensors only, eta=0.01, eps=1e-16.  The definition and the
rounding rules live in sparsefl/ops/reference/sam.py.

Each function is also a torch.library custom op, torch.ops.sparsefl.<name>, with a fake
implementation, so it composes with torch.compile and can be called by other stacks.
Gradients that are zero give a zero perturbation (no NaN); a non-finite norm (NaN/Inf in
the gradients) leaves the weights untouched and is returned, so callers can react.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
from torch import Tensor

from sparsefl.ops import _backend
from sparsefl.ops.reference import sam as _reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_IMPLS: dict[str, types.SimpleNamespace] = {}


def _impl(name: str) -> types.SimpleNamespace:
    if name not in _IMPLS:
        _IMPLS[name] = _load_impl(name)
    return _IMPLS[name]


def _load_impl(name: str) -> types.SimpleNamespace:
    if name == "reference":
        return types.SimpleNamespace(perturb=_reference.perturb, copy_=_reference.copy_)
    if name in ("cpp", "cuda"):
        return types.SimpleNamespace(perturb=torch.ops.sparsefl_C.perturb,
                                     copy_=torch.ops.sparsefl_C.copy_)
    _triton = _backend.triton_module("sam")  # triton only when asked for

    return types.SimpleNamespace(perturb=_triton.perturb, copy_=_triton.copy_)


def _check_lists(params: Sequence[Tensor], **others: Sequence[Tensor]) -> None:
    n = len(params)
    device = params[0].device if n else None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"sparsefl: params[{i}] is {type(p).__name__}, expected a Tensor")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"sparsefl: params[{i}] has dtype {p.dtype}; supported: "
                            "float32, float16, bfloat16")
        if p.device != device:
            raise ValueError(f"sparsefl: params[{i}] is on {p.device}, params[0] on {device}")
    for name, ts in others.items():
        if len(ts) != n:
            raise ValueError(f"sparsefl: {name} has {len(ts)} tensors, params has {n}")
        for i, (p, t) in enumerate(zip(params, ts)):
            if not isinstance(t, Tensor):
                raise TypeError(f"sparsefl: {name}[{i}] is {type(t).__name__}, expected a Tensor")
            if t.shape != p.shape:
                raise ValueError(f"sparsefl: {name}[{i}] has shape {tuple(t.shape)}, "
                                 f"params[{i}] has {tuple(p.shape)}")
            if t.dtype != p.dtype:
                raise TypeError(f"sparsefl: {name}[{i}] has dtype {t.dtype}, "
                                f"params[{i}] has {p.dtype}")
            if t.device != p.device:
                raise ValueError(f"sparsefl: {name}[{i}] is on {t.device}, "
                                 f"params[{i}] on {p.device}")


def _tensors(ts: Sequence[Tensor], name: str) -> list[Tensor]:
    """A list of tensors, or a TypeError naming the first entry that is not one."""
    if isinstance(ts, Tensor):
        raise TypeError(f"sparsefl: {name} must be a list of tensors, got a single Tensor")
    ts = list(ts)
    if not all(isinstance(t, Tensor) for t in ts):
        i, t = next((i, t) for i, t in enumerate(ts) if not isinstance(t, Tensor))
        raise TypeError(f"sparsefl: {name}[{i}] is {type(t).__name__}, expected a Tensor")
    return ts


def _check_nonneg(name: str, values: Sequence[float]) -> None:
    if all(math.isfinite(v) and v >= 0 for v in values):
        return
    i, v = next((i, v) for i, v in enumerate(values) if not (math.isfinite(v) and v >= 0))
    where = f"{name}[{i}]" if len(values) > 1 else name
    raise ValueError(f"sparsefl: {where} must be finite and >= 0, got {v}")


def _run(backend: str, params: list[Tensor], lists: dict[str, list[Tensor]], call):
    """Validate, pick the backend, run `call(impl)`.

    The native kernels check every shape, dtype and device themselves (a fast loop in
    C++); when they refuse, the Python check runs to raise the precise ValueError or
    TypeError that the other backends raise up front.
    """
    name = _backend.resolve(backend, params)
    if name in ("cpp", "cuda"):
        try:
            return call(_impl(name))
        except RuntimeError:
            _check_lists(params, **lists)
            raise
    _check_lists(params, **lists)
    return call(_impl(name))


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"sparsefl: eps must be finite and > 0, got {eps}")


def _per_tensor(value, n: int, name: str, kind: type) -> list:
    if isinstance(value, (bool, int, float)):
        return [kind(value)] * n
    values = [kind(v) for v in value]
    if len(values) != n:
        raise ValueError(f"sparsefl: {name} has {len(values)} entries, params has {n}")
    return values


def _norm_tensor(params: Sequence[Tensor]) -> Tensor:
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


# ---------------------------------------------------------------- torch.ops.sparsefl.* ------
# Registered with torch.library.Library rather than @custom_op: the same schema, fake
# (meta) kernels and opcheck coverage, at a third of the per-call overhead, which matters
# for a call that covers 62 tensors in a few milliseconds.  Mutated lists get their
# version counters bumped, as autograd expects of an in-place op.

_lib = torch.library.Library("sparsefl", "DEF")
_lib.define("sam_perturb(Tensor[] params, Tensor[] grads, Tensor(a!)[] out, float[] rho, "
            "bool[] adaptive, float eta, float eps, str backend) -> Tensor")
_lib.define("sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backup, "
            "float[] rho, bool[] adaptive, float eta, float eps, str backend) -> Tensor")
_lib.define("sam_restore_(Tensor(a!)[] params, Tensor[] backup, str backend) -> ()")
_lib.define("two_dir_perturb(Tensor[] params, Tensor[] g1, Tensor[] g2, Tensor(a!)[] out, "
            "float rho1, float rho2, float eps, str backend) -> Tensor")


def _bump(ts: list[Tensor]) -> None:
    if ts:
        torch.autograd.graph.increment_version(ts)


def _sam_perturb_impl(params, grads, out, rho, adaptive, eta, eps, backend):
    _check_nonneg("rho", rho)
    _check_nonneg("eta", [eta])
    _check_eps(eps)
    norms = _run(backend, params, {"grads": grads, "out": out}, lambda impl: impl.perturb(
        params, grads, [], out, [], rho, 0.0, adaptive, eta, eps))
    _bump(out)
    return norms[0].clone()


def _sam_perturb_inplace_impl(params, grads, backup, rho, adaptive, eta, eps, backend):
    _check_nonneg("rho", rho)
    _check_nonneg("eta", [eta])
    _check_eps(eps)
    norms = _run(backend, params, {"grads": grads, "backup": backup}, lambda impl: impl.perturb(
        params, grads, [], params, backup, rho, 0.0, adaptive, eta, eps))
    _bump(params)
    _bump(backup)
    return norms[0].clone()


def _sam_restore_impl(params, backup, backend):
    _run(backend, params, {"backup": backup}, lambda impl: impl.copy_(params, backup))
    _bump(params)


def _two_dir_perturb_impl(params, g1, g2, out, rho1, rho2, eps, backend):
    _check_nonneg("rho1", [rho1])
    _check_nonneg("rho2", [rho2])
    _check_eps(eps)
    n = len(params)
    norms = _run(backend, params, {"g1": g1, "g2": g2, "out": out}, lambda impl: impl.perturb(
        params, g1, g2, out, [], [rho1] * n, rho2, [False] * n, 0.0, eps))
    _bump(out)
    return norms


def _scalar_like(params, shape=()):
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty(shape, dtype=torch.float32, device=device)


for _name, _fn in (("sam_perturb", _sam_perturb_impl), ("sam_perturb_", _sam_perturb_inplace_impl),
                   ("sam_restore_", _sam_restore_impl), ("two_dir_perturb", _two_dir_perturb_impl)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")

torch.library.register_fake("sparsefl::sam_perturb", lib=_lib)(
    lambda params, *rest: _scalar_like(params))
torch.library.register_fake("sparsefl::sam_perturb_", lib=_lib)(
    lambda params, *rest: _scalar_like(params))
torch.library.register_fake("sparsefl::sam_restore_", lib=_lib)(lambda *args: None)
torch.library.register_fake("sparsefl::two_dir_perturb", lib=_lib)(
    lambda params, *rest: _scalar_like(params, (2,)))


def _lists(**named: Sequence[Tensor]) -> list[list[Tensor]]:
    for name, ts in named.items():
        if isinstance(ts, Tensor):
            raise TypeError(f"sparsefl: {name} must be a list of tensors, got a single Tensor")
    return [list(ts) for ts in named.values()]


def _call(op, lists: dict[str, Sequence[Tensor]], *args):
    """Call a registered op; if the dispatcher refuses the arguments, say which one is wrong."""
    try:
        return op(*args)
    except RuntimeError:
        for name, ts in lists.items():
            _tensors(ts, name)
        raise


# ---------------------------------------------------------------- public API -------------


def sam_perturb(params: Sequence[Tensor], grads: Sequence[Tensor], out: Sequence[Tensor],
                rho: float | Sequence[float] = 0.05, *, adaptive: bool | Sequence[bool] = False,
                eta: float = 0.0, eps: float = 1e-12, backend: str | None = None) -> Tensor:
    """Write the SAM/ASAM-perturbed weights into `out`; `params` are not touched.

    Returns the global norm ||T g|| as a 0-dim float32 tensor on the params' device.
    """
    params, grads, out = _lists(params=params, grads=grads, out=out)
    n = len(params)
    return _call(torch.ops.sparsefl.sam_perturb, {"params": params, "grads": grads, "out": out},
                 params, grads, out, _per_tensor(rho, n, "rho", float),
                 _per_tensor(adaptive, n, "adaptive", bool), float(eta), float(eps),
                 _backend.requested(backend))


def sam_perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backup: Sequence[Tensor],
                 rho: float | Sequence[float] = 0.05, *, adaptive: bool | Sequence[bool] = False,
                 eta: float = 0.0, eps: float = 1e-12, backend: str | None = None) -> Tensor:
    """Perturb `params` in place, saving the exact old values into `backup`."""
    params, grads, backup = _lists(params=params, grads=grads, backup=backup)
    n = len(params)
    return _call(torch.ops.sparsefl.sam_perturb_,
                 {"params": params, "grads": grads, "backup": backup},
                 params, grads, backup, _per_tensor(rho, n, "rho", float),
                 _per_tensor(adaptive, n, "adaptive", bool), float(eta), float(eps),
                 _backend.requested(backend))


def sam_restore_(params: Sequence[Tensor], backup: Sequence[Tensor], *,
                 backend: str | None = None) -> None:
    """params[i] <- backup[i] for every i, bit-exact, in one multi-tensor call."""
    params, backup = _lists(params=params, backup=backup)
    _call(torch.ops.sparsefl.sam_restore_, {"params": params, "backup": backup},
          params, backup, _backend.requested(backend))


def two_dir_perturb(params: Sequence[Tensor], g1: Sequence[Tensor], g2: Sequence[Tensor],
                    out: Sequence[Tensor], rho1: float, rho2: float, *, eps: float = 1e-12,
                    backend: str | None = None) -> Tensor:
    """out = params + rho1 * g1/(||g1||+eps) - rho2 * g2/(||g2||+eps) (Agnostic-SAM's step).

    Returns [||g1||, ||g2||] as a float32 tensor of shape (2,).
    """
    params, g1, g2, out = _lists(params=params, g1=g1, g2=g2, out=out)
    return _call(torch.ops.sparsefl.two_dir_perturb,
                 {"params": params, "g1": g1, "g2": g2, "out": out},
                 params, g1, g2, out, float(rho1), float(rho2), float(eps),
                 _backend.requested(backend))
