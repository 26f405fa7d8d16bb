"""Personalised evaluation (FedBABU's protocol).

Each client takes the global model, measures accuracy on its own test split, fine-tunes
the whole network on its own training split (SGD, lr 1e-3, momentum 0.9, tau epochs,
batch 50 by default) and measures again.  Reported: mean and std over clients that have
test data.  The head stays frozen only during federated training (FedBABU); fine-tuning
unfreezes everything.
"""

from __future__ import annotations

import copy
import statistics

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparsefl.data import ClientData
from sparsefl.fl.config import PersonalizationSection
from sparsefl.fl.evaluate import evaluate
from sparsefl.nn import set_activation_density


def personalized(model: nn.Module, x: Tensor, y: Tensor, clients: list[ClientData],
                 cfg: PersonalizationSection, seed: int) -> dict[str, float]:
    before, after = [], []
    for cid, c in enumerate(clients):
        if len(c.test) == 0:
            continue
        xt, yt = x[torch.from_numpy(c.test)], y[torch.from_numpy(c.test)]
        before.append(evaluate(model, xt, yt)[0])
        local = copy.deepcopy(model)
        for p in local.parameters():
            p.requires_grad_(True)
        set_activation_density(local, enabled=False)
        opt = torch.optim.SGD(local.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7, cid])
                                                .generate_state(1)[0]))
        xs, ys = x[torch.from_numpy(c.train)], y[torch.from_numpy(c.train)]
        local.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(ys), generator=gen)
            for i in range(0, len(ys), cfg.batch_size):
                b = perm[i:i + cfg.batch_size]
                F.cross_entropy(local(xs[b]), ys[b]).backward()
                opt.step()
                opt.zero_grad()
        after.append(evaluate(local, xt, yt)[0])

    def stats(v: list[float]) -> tuple[float, float]:
        return (statistics.fmean(v), statistics.pstdev(v)) if v else (float("nan"),) * 2

    (bm, bs), (am, as_) = stats(before), stats(after)
    return {"before_mean": bm, "before_std": bs, "after_mean": am, "after_std": as_,
            "clients": len(before)}
