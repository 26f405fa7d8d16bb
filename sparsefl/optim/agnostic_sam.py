"""Agnostic-SAM (Nguyen et al. 2024), the reconstructed form of specs/algorithms.md §4.

The authors published no code; this is the stated form, kept configurable:

    g_t = grad L_train(w),  g_v = grad L_val(w)
    w~  = w + rho * g_t/||g_t|| - rho2 * g_v/||g_v||      (one fused two-direction kernel)
    w  <- BaseOptimizer(w, grad (L_train + L_val)(w~))    (after an exact restore)

    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho=0.05, rho2=0.05, lr=0.01)
    loss_fn(model(xt), yt).backward();  opt.save_train_grad()
    loss_fn(model(xv), yv).backward();  opt.first_step(zero_grad=True)
    (loss_fn(model(xt), yt) + loss_fn(model(xv), yv)).backward();  opt.second_step(True)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sparsefl.optim.sam import SAM


class AgnosticSAM(SAM):
    def __init__(self, params: Iterable[Any], base_optimizer: type[torch.optim.Optimizer],
                 rho: float = 0.05, rho2: float = 0.05, **kwargs: Any) -> None:
        if not rho2 >= 0.0:
            raise ValueError(f"Invalid rho2, should be non-negative: {rho2}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, **kwargs)
        self.rho2 = float(rho2)
        self._train_grads: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def save_train_grad(self) -> None:
        """Keep the current gradients as g_t (moved, not copied) and clear them."""
        self._train_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._train_grads[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w~; the gradients must hold g_v, and save_train_grad() must have run."""
        if not self._train_grads:
            raise RuntimeError("AgnosticSAM.first_step: call save_train_grad() after the "
                               "training-batch backward first")
        params, gv, rho, _ = self._with_grads()
        gt = [self._train_grads.get(p) for p in params]
        if any(g is None for g in gt):
            raise RuntimeError("AgnosticSAM.first_step: a parameter has a validation "
                               "gradient but no training gradient")
        rho1 = rho[0] if rho else 0.0
        if any(r != rho1 for r in rho):
            raise ValueError("AgnosticSAM: one rho for all parameter groups")
        norms = self._perturbation.apply(params, gt, [rho1] * len(params), [False] * len(params),
                                         0.0, self.norm_eps, grads2=gv, rho2=self.rho2)
        self._train_grads = {}
        self.last_grad_norm = norms
        if self.check_finite and not bool(torch.isfinite(norms).all()):
            self._perturbation.restore()
            raise FloatingPointError(f"AgnosticSAM.first_step: gradient norms are "
                                     f"{norms.tolist()}; the weights were left unchanged")
        if zero_grad:
            self.zero_grad()
