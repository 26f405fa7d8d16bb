"""Server-side SWA for FedSAM/FedASAM (Caldarola et al. 2022) and the client LR schedule.

From round `start` on, the client LR runs in cycles of `cycle` rounds from the scheduled
LR down to `swa.lr`: at position k = (t - start) mod cycle the LR is
(1 - f) * lr_t + f * swa_lr with f = (k + 1) / cycle, so the cycle's last round uses
exactly swa_lr.  The SWA model is the mean of the global models taken at the end of
each cycle, i.e. after that lowest-LR round.  (The authors' code collects one round
early; this is the form the paper describes.)  Clients keep training from the FedAvg
model; the SWA model is evaluated and checkpointed beside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsefl.fl.config import Config


def scheduled_lr(cfg: Config, rnd: int) -> float:
    """The client LR of round `rnd` (1-based) before SWA."""
    c, last = cfg.client, max(cfg.run.rounds - 1, 1)
    if c.lr_schedule == "exponential":
        return c.lr * (c.lr_end / c.lr) ** ((rnd - 1) / last) if c.lr_end > 0 else c.lr
    if c.lr_schedule == "step":  # x0.1 at 1/2 and 3/4 of the rounds (FedBABU)
        return c.lr * (0.1 if rnd > cfg.run.rounds // 2 else 1.0) * (
            0.1 if rnd > (3 * cfg.run.rounds) // 4 else 1.0)
    return c.lr


def client_lr(cfg: Config, rnd: int) -> float:
    lr = scheduled_lr(cfg, rnd)
    if not cfg.swa.enabled or rnd < cfg.swa_start:
        return lr
    f = ((rnd - cfg.swa_start) % cfg.swa.cycle + 1) / cfg.swa.cycle
    return (1 - f) * lr + f * cfg.swa.lr


def cycle_end(cfg: Config, rnd: int) -> bool:
    return (cfg.swa.enabled and rnd >= cfg.swa_start
            and (rnd - cfg.swa_start) % cfg.swa.cycle == cfg.swa.cycle - 1)


class SWA:
    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.total = torch.zeros(numel, dtype=torch.float64, device=self.device)
        self.count = 0

    def collect(self, flat: Tensor) -> None:
        self.total += flat.double()
        self.count += 1

    def average(self) -> Tensor | None:
        return (self.total / self.count).float() if self.count else None

    def state(self) -> dict[str, Tensor]:
        return {"swa.total": self.total, "swa.count": torch.tensor(self.count)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.total = state["swa.total"].to(self.device, copy=True)
        self.count = int(state["swa.count"])
