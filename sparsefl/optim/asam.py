"""ASAM with the official SamsungLabs API: `ascent_step()` / `descent_step()`.

    minimizer = ASAM(optimizer, model, rho=0.5, eta=0.01)
    loss_fn(model(x), y).backward();  minimizer.ascent_step()
    loss_fn(model(x), y).backward();  minimizer.descent_step()

Official convention: T_w = |w| + η on parameters whose name contains "weight", T = 1 on
the others (biases, ...); ε = ρ·T²g / (‖T g‖ + 1e-16).  The official code restores with
`p -= ε`, which is not bit-exact; here the restore is exact, so results agree with it to
rounding (tested).  `adaptive=False` gives the official `SAM` class of the same repo.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsefl.optim._perturbation import Perturbation


class ASAM:
    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 rho: float = 0.5, eta: float = 0.01, *, adaptive: bool = True,
                 norm_eps: float = 1e-16, restore: str = "swap", check_finite: bool = True,
                 backend: str | None = None) -> None:
        if not rho >= 0.0 or not eta >= 0.0:
            raise ValueError(f"rho and eta must be non-negative, got rho={rho}, eta={eta}")
        self.optimizer = optimizer
        self.model = model
        self.rho = rho
        self.eta = eta
        self.adaptive = adaptive
        self.norm_eps = norm_eps
        self.check_finite = check_finite
        self.last_grad_norm: Tensor | None = None
        self._perturbation = Perturbation(restore=restore, backend=backend)

    @torch.no_grad()
    def ascent_step(self) -> None:
        params, grads, flags = [], [], []
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            flags.append(self.adaptive and "weight" in name)
        norm = self._perturbation.apply(params, grads, [self.rho] * len(params), flags,
                                        self.eta, self.norm_eps)
        self.last_grad_norm = norm
        if self.check_finite and not bool(torch.isfinite(norm)):
            self._perturbation.restore()
            raise FloatingPointError(f"ASAM.ascent_step: gradient norm is {float(norm)}; "
                                     "the weights were left unchanged")
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self) -> None:
        self._perturbation.restore()
        self.optimizer.step()
        self.optimizer.zero_grad()
