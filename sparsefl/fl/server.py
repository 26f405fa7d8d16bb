"""Server optimizers over the flat model: fedavg | fedavgm | fedadam (Reddi et al. 2021).

The clients' weighted mean m (from sparse_aggregate) defines the pseudo-gradient
d = m - w.  FedAvg: w + lr*d (exactly m when lr = 1); FedAvgM: v = mu*v + d, w + lr*v;
FedAdam: first/second moments of d, w + lr*m1/(sqrt(m2) + tau).  Buffers (BatchNorm
running statistics) are not optimised: they take the mean's values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsefl.fl.config import ServerSection


class ServerOptimizer:
    def __init__(self, cfg: ServerSection, numel: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.buffers: dict[str, Tensor] = {}
        if cfg.optimizer == "fedavgm":
            self.buffers["v"] = torch.zeros(numel, device=self.device)
        elif cfg.optimizer == "fedadam":
            self.buffers["m1"] = torch.zeros(numel, device=self.device)
            self.buffers["m2"] = torch.zeros(numel, device=self.device)

    @torch.no_grad()
    def step(self, w: Tensor, mean: Tensor, buffer_mask: Tensor) -> Tensor:
        c = self.cfg
        if c.optimizer == "fedavg" and c.lr == 1.0:
            return mean.clone()
        d = mean - w
        if c.optimizer == "fedavg":
            new = w + c.lr * d
        elif c.optimizer == "fedavgm":
            v = self.buffers["v"].mul_(c.momentum).add_(d)
            new = w + c.lr * v
        else:
            m1 = self.buffers["m1"].mul_(c.beta1).add_(d, alpha=1 - c.beta1)
            m2 = self.buffers["m2"].mul_(c.beta2).addcmul_(d, d, value=1 - c.beta2)
            new = w + c.lr * m1 / (m2.sqrt() + c.tau)
        new[buffer_mask] = mean[buffer_mask]
        return new

    def state(self) -> dict[str, Tensor]:
        return {f"server.{k}": v for k, v in self.buffers.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        for k in self.buffers:
            self.buffers[k] = state[f"server.{k}"].to(self.device, copy=True)
