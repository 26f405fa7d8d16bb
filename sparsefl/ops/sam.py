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


def _impl(name: str) -> types.SimpleNamespace:
    if name == "reference":
        return types.SimpleNamespace(perturb=_reference.perturb, copy_=_reference.copy_)
    if name in ("cpp", "cuda"):
        return types.SimpleNamespace(perturb=torch.ops.sparsefl_C.perturb,
                                     copy_=torch.ops.sparsefl_C.copy_)
    from sparsefl.triton_kernels import sam as _triton  # triton only when asked for

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
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparsefl: {name}[{i}] is {type(t).__name__}, expected a Tensor")
    return ts


def _check_scalars(**values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"sparsefl: {name} must be finite and >= 0, got {v}")


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"sparsefl: eps must be finite and > 0, got {eps}")


def _per_tensor(value, n: int, name: str, kind: type) -> list:
    if isinstance(value, (bool, int, float)) and not isinstance(value, str):
        return [kind(value)] * n
    values = [kind(v) for v in value]
    if len(values) != n:
        raise ValueError(f"sparsefl: {name} has {len(values)} entries, params has {n}")
    return values


def _norm_tensor(params: Sequence[Tensor]) -> Tensor:
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


# ---------------------------------------------------------------- custom ops -------------


@torch.library.custom_op("sparsefl::sam_perturb", mutates_args=("out",))
def _sam_perturb(params: list[Tensor], grads: list[Tensor], out: list[Tensor], rho: list[float],
                 adaptive: list[bool], eta: float, eps: float, backend: str) -> Tensor:
    _check_lists(params, grads=grads, out=out)
    _check_scalars(eta=eta, **{f"rho[{i}]": r for i, r in enumerate(rho)})
    _check_eps(eps)
    impl = _impl(_backend.resolve(backend, params))
    return impl.perturb(params, grads, [], out, [], rho, 0.0, adaptive, eta, eps)[0].clone()


@_sam_perturb.register_fake
def _(params, grads, out, rho, adaptive, eta, eps, backend):
    return _norm_tensor(params)


@torch.library.custom_op("sparsefl::sam_perturb_", mutates_args=("params", "backup"))
def _sam_perturb_inplace(params: list[Tensor], grads: list[Tensor], backup: list[Tensor],
                         rho: list[float], adaptive: list[bool], eta: float, eps: float,
                         backend: str) -> Tensor:
    _check_lists(params, grads=grads, backup=backup)
    _check_scalars(eta=eta, **{f"rho[{i}]": r for i, r in enumerate(rho)})
    _check_eps(eps)
    impl = _impl(_backend.resolve(backend, params))
    return impl.perturb(params, grads, [], params, backup, rho, 0.0, adaptive, eta, eps)[0].clone()


@_sam_perturb_inplace.register_fake
def _(params, grads, backup, rho, adaptive, eta, eps, backend):
    return _norm_tensor(params)


@torch.library.custom_op("sparsefl::sam_restore_", mutates_args=("params",))
def _sam_restore(params: list[Tensor], backup: list[Tensor], backend: str) -> None:
    _check_lists(params, backup=backup)
    _impl(_backend.resolve(backend, params)).copy_(params, backup)


@_sam_restore.register_fake
def _(params, backup, backend):
    return None


@torch.library.custom_op("sparsefl::two_dir_perturb", mutates_args=("out",))
def _two_dir_perturb(params: list[Tensor], g1: list[Tensor], g2: list[Tensor], out: list[Tensor],
                     rho1: float, rho2: float, eps: float, backend: str) -> Tensor:
    _check_lists(params, g1=g1, g2=g2, out=out)
    _check_scalars(rho1=rho1, rho2=rho2)
    _check_eps(eps)
    impl = _impl(_backend.resolve(backend, params))
    n = len(params)
    return impl.perturb(params, g1, g2, out, [], [rho1] * n, rho2, [False] * n, 0.0, eps)


@_two_dir_perturb.register_fake
def _(params, g1, g2, out, rho1, rho2, eps, backend):
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty(2, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- public API -------------


def sam_perturb(params: Sequence[Tensor], grads: Sequence[Tensor], out: Sequence[Tensor],
                rho: float | Sequence[float] = 0.05, *, adaptive: bool | Sequence[bool] = False,
                eta: float = 0.0, eps: float = 1e-12, backend: str | None = None) -> Tensor:
    """Write the SAM/ASAM-perturbed weights into `out`; `params` are not touched.

    Returns the global norm ||T g|| as a 0-dim float32 tensor on the params' device.
    """
    n = len(params)
    return _sam_perturb(_tensors(params, "params"), _tensors(grads, "grads"),
                        _tensors(out, "out"), _per_tensor(rho, n, "rho", float),
                        _per_tensor(adaptive, n, "adaptive", bool), float(eta), float(eps),
                        _backend.requested(backend))


def sam_perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], backup: Sequence[Tensor],
                 rho: float | Sequence[float] = 0.05, *, adaptive: bool | Sequence[bool] = False,
                 eta: float = 0.0, eps: float = 1e-12, backend: str | None = None) -> Tensor:
    """Perturb `params` in place, saving the exact old values into `backup`."""
    n = len(params)
    return _sam_perturb_inplace(_tensors(params, "params"), _tensors(grads, "grads"),
                                _tensors(backup, "backup"),
                                _per_tensor(rho, n, "rho", float),
                                _per_tensor(adaptive, n, "adaptive", bool), float(eta),
                                float(eps), _backend.requested(backend))


def sam_restore_(params: Sequence[Tensor], backup: Sequence[Tensor], *,
                 backend: str | None = None) -> None:
    """params[i] <- backup[i] for every i, bit-exact, in one multi-tensor call."""
    _sam_restore(_tensors(params, "params"), _tensors(backup, "backup"),
                 _backend.requested(backend))


def two_dir_perturb(params: Sequence[Tensor], g1: Sequence[Tensor], g2: Sequence[Tensor],
                    out: Sequence[Tensor], rho1: float, rho2: float, *, eps: float = 1e-12,
                    backend: str | None = None) -> Tensor:
    """out = params + rho1 * g1/(||g1||+eps) - rho2 * g2/(||g2||+eps) (Agnostic-SAM's step).

    Returns [||g1||, ||g2||] as a float32 tensor of shape (2,).
    """
    return _two_dir_perturb(_tensors(params, "params"), _tensors(g1, "g1"), _tensors(g2, "g2"),
                            _tensors(out, "out"), float(rho1),
                            float(rho2), float(eps), _backend.requested(backend))
