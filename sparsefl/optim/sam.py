"""Drop-in SAM optimizer (the davda54/sam API), fused underneath.

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=False, lr=0.1)
    loss_fn(model(x), y).backward();  opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward();  opt.second_step(zero_grad=True)

Same constructor, `first_step`, `second_step`, `step(closure)`, `base_optimizer` and
per-group `rho`/`adaptive` as davda54/sam; the norm is one global norm over every group,
as there.  Underneath, one fused kernel call replaces ~4 launches per tensor, and the
restore is an exact pointer swap (see sparsefl.optim._perturbation).

Differences, all deliberate:
- `state_dict()` carries the base optimizer's state (momentum, ...), so a round trip
  through it resumes training exactly (davda54's state_dict leaves it out).
- Non-finite gradients (NaN/Inf) raise FloatingPointError in `first_step` with the weights
  untouched, unless `check_finite=False`; then the step is a no-op perturbation and
  `last_grad_norm` holds the non-finite norm (what torch.amp.GradScaler flows want).

Mixed precision with torch.amp.GradScaler (scaling does not change SAM's direction,
because ε = ρ·g/‖g‖ is invariant to the gradient's scale):

    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, check_finite=False)
    scaler = torch.amp.GradScaler()
    with torch.autocast("cuda"): loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)            # scaled grads are fine here
    with torch.autocast("cuda"): loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    opt.restore()                             # exact weights back
    scaler.step(opt.base_optimizer)           # unscales, skips on Inf/NaN
    scaler.update();  opt.zero_grad()

Extra keyword-only options (named so they cannot collide with a base optimizer's):
`eta` (ASAM's η; 0 in davda54), `norm_eps` (1e-12), `restore` ("swap" | "copy"),
`check_finite`, `backend` (see sparsefl.ops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from sparsefl.optim._perturbation import Perturbation


class SAM(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], base_optimizer: type[torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, *, eta: float = 0.0,
                 norm_eps: float = 1e-12, restore: str = "swap", check_finite: bool = True,
                 backend: str | None = None, **kwargs: Any) -> None:
        if not rho >= 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        if not eta >= 0.0:
            raise ValueError(f"Invalid eta, should be non-negative: {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state  # one state, so state_dict carries momentum
        self.eta = eta
        self.norm_eps = norm_eps
        self.check_finite = check_finite
        self.last_grad_norm: Tensor | None = None
        self._perturbation = Perturbation(restore=restore, backend=backend)

    def _with_grads(self) -> tuple[list[Tensor], list[Tensor], list[float], list[bool]]:
        params, grads, rho, adaptive = [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                rho.append(float(group["rho"]))
                adaptive.append(bool(group["adaptive"]))
        return params, grads, rho, adaptive

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + ε(w); the gradients must hold ∇L(w)."""
        params, grads, rho, adaptive = self._with_grads()
        norm = self._perturbation.apply(params, grads, rho, adaptive, self.eta, self.norm_eps)
        self.last_grad_norm = norm
        if self.check_finite and not bool(torch.isfinite(norm)):
            self._perturbation.restore()
            raise FloatingPointError(
                f"SAM.first_step: gradient norm is {float(norm)}; the weights were left "
                "unchanged. Pass check_finite=False to skip such steps instead (AMP).")
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the exact weights back without stepping (for GradScaler flows)."""
        self._perturbation.restore()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly and take the base optimizer's step with ∇L(w + ε)."""
        self._perturbation.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM requires a closure that recomputes the loss and calls "
                             "backward(), e.g. opt.step(lambda: loss_fn(model(x), y).backward())")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state
