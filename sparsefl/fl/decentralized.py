"""Decentralized learning: diffusion vs consensus vs centralized (Cao et al. 2024).

K agents (the data's clients) on a graph with Metropolis weights A (topology.py).  One
"round" of a run is one iteration; mu = client.lr, B = client.batch_size:

    diffusion (adapt-then-combine):  psi_k = w_k - mu * g_k(w_k);  w_k <- sum_l a_lk psi_l
    consensus:                       w_k <- sum_l a_lk w_l - mu * g_k(w_k)
    centralized (reference):         w <- w - mu * (1/K) sum_k g_k(w)    (batch K * B)

g_k is the minibatch gradient on agent k's data (+ weight decay), batches seeded by
(seed, iteration, agent).  What neighbours exchange (psi or w) goes through
sparsefl.codec: each agent encodes once, every neighbour receives those bytes (counted),
and the combination is `ops.sparse_aggregate` over the decoded payloads with weights
a_lk.  With decentralized.density < 1 an agent sends only the top-k of the difference
between its vector and the copy its neighbours hold, with error feedback (CHOCO-style
public copies), and neighbours add it to that copy.  On a complete graph with a_lk = 1/K, diffusion
from a common point is the centralized iterate (tested).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from sparsefl import codec, ops
from sparsefl import data as fldata
from sparsefl.fl import config as flconfig
from sparsefl.fl import topology, wire
from sparsefl.fl.engine import Simulation, derive_seed
from sparsefl.fl.evaluate import evaluate
from sparsefl.fl.timers import Timers


def diffusion_step(w: Tensor, grads: Tensor, a: Tensor, mu: float) -> Tensor:
    """Plain-tensor reference of one ATC diffusion step; w, grads: (K, n); a: (K, K)."""
    return a.t().to(w.dtype) @ (w - mu * grads)


def consensus_step(w: Tensor, grads: Tensor, a: Tensor, mu: float) -> Tensor:
    return a.t().to(w.dtype) @ w - mu * grads


class DecentralizedSimulation:
    def __init__(self, cfg: flconfig.Config, dataset: fldata.Dataset | None = None) -> None:
        if cfg.sparsity.method != "none" or cfg.swa.enabled or \
                cfg.personalization.method != "none":
            raise flconfig.ConfigError(
                "decentralized.strategy: decentralized runs take sparsity.method = \"none\", "
                "no SWA and no personalization")
        self.cfg = cfg
        self.base = Simulation(cfg, dataset)  # data, partition, model, layout, init
        self.layout, self.model, self.data = self.base.layout, self.base.model, self.base.data
        self.agents = cfg.data.clients
        self.strategy = cfg.decentralized.strategy
        self.adj = topology.graph(cfg.decentralized.topology, self.agents,
                                  p=cfg.decentralized.edge_prob,
                                  seed=derive_seed(cfg.run.seed, 8))
        self.a = topology.metropolis(self.adj)
        rows = 1 if self.strategy == "centralized" else self.agents
        self.w = self.base.global_flat.unsqueeze(0).repeat(rows, 1)
        self.param_mask = ~self.layout.mask(buffer=True)
        self.density = cfg.decentralized.density
        if self.density < 1.0:  # public copies and error-feedback residuals
            self.public = self.w.clone()
            self.residual = torch.zeros_like(self.w)
        self.round = 0

    @property
    def global_flat(self) -> Tensor:
        return self.w.mean(0)

    def state(self) -> dict[str, Tensor]:
        if self.density < 1.0:
            return {"agents": self.w, "public": self.public, "residual": self.residual}
        return {"agents": self.w}

    def load_state(self, rnd: int, tensors: dict[str, Tensor]) -> None:
        if tensors["agents"].shape != self.w.shape:
            raise ValueError("checkpoint does not match this config's agents and model")
        dev = self.base.device
        self.w = tensors["agents"].to(dev, copy=True)
        if self.density < 1.0:
            self.public = tensors["public"].to(dev, copy=True)
            self.residual = tensors["residual"].to(dev, copy=True)
        self.round = rnd

    def _grad(self, w: Tensor, agent: int, rnd: int) -> tuple[Tensor, Tensor, float]:
        """(flat after the forward pass (new BN statistics), gradient, loss)."""
        idx = torch.from_numpy(self.base.clients[agent].train)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, 6, rnd, agent))
        pick = idx[torch.randperm(len(idx), generator=gen)[:self.cfg.client.batch_size]]
        self.layout.load(self.model, w)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.data.train_x[pick]), self.data.train_y[pick])
        loss.backward()
        g = self.layout.grad_flat(self.model)
        if self.cfg.client.weight_decay:
            g += self.cfg.client.weight_decay * w * self.param_mask
        return self.layout.flatten(self.model), g, float(loss.detach())

    def _exchange(self, values: Tensor, timers: Timers) -> tuple[list, int]:
        """Encode every agent's vector once; decode what its neighbours receive."""
        if self.density < 1.0:
            return self._exchange_compressed(values, timers)
        pairs, sent = [], 0
        for k in range(self.agents):
            with timers("encode"):
                payload = wire.encode(wire.chunks_from_flat(self.layout, values[k]))
            sent += len(payload) * int(self.adj[k].sum())
            with timers("decode"):  # decoded on the host, combined on the run's device
                i, v = wire.to_flat_pair(self.layout, wire.decode(self.layout, payload))
                pairs.append((i.to(self.base.device), v.to(self.base.device)))
        return pairs, sent

    def _exchange_compressed(self, values: Tensor, timers: Timers) -> tuple[list, int]:
        """Top-k of (value - public copy) with error feedback, CHOCO-style: each agent's
        neighbours keep a public copy x^_k of its vector and add the sparse corrections
        they receive; the combination uses the neighbours' copies and the agent's own
        exact vector."""
        numels = [e.numel for e in self.layout.entries]
        pairs, sent = [], 0
        for k in range(self.agents):
            with timers("prune"):
                idx, val = ops.topk_compress(values[k] - self.public[k], self.density,
                                             residual=self.residual[k])
            with timers("encode"):
                payload = wire.encode(codec.split_flat(idx, val, numels))
            sent += len(payload) * int(self.adj[k].sum())
            with timers("decode"):
                i, v = wire.to_flat_pair(self.layout, wire.decode(self.layout, payload))
                self.public[k].index_add_(0, i.to(self.base.device), v.to(self.base.device))
            pairs.append((torch.empty(0, dtype=torch.int64, device=self.base.device),
                          self.public[k]))
        return pairs, sent

    def _own(self, pairs: list, k: int, share: Tensor) -> list:
        """With compression an agent combines its own exact vector, not its public copy."""
        if self.density >= 1.0:
            return pairs
        return [(torch.empty(0, dtype=torch.int64, device=share.device), share[k])
                if j == k else p
                for j, p in enumerate(pairs)]

    def _combine(self, pairs: list, k: int, base: Tensor | None) -> Tensor:
        nbrs = [j for j in range(self.agents) if j == k or self.adj[j, k]]
        return ops.sparse_aggregate([pairs[j] for j in nbrs],
                                    [float(self.a[j, k]) for j in nbrs],
                                    base=base, numel=self.layout.numel)

    def step(self) -> dict[str, Any]:
        rnd, timers, mu = self.round + 1, self.base.timers(), self.cfg.client.lr
        t0 = time.perf_counter()
        losses, sent = [], 0
        if self.strategy == "centralized":
            with timers("compute"):
                outs = [self._grad(self.w[0], k, rnd) for k in range(self.agents)]
                g = torch.stack([o[1] for o in outs]).mean(0)
                after = torch.stack([o[0] for o in outs]).mean(0)  # BN statistics
                new = torch.where(self.param_mask, self.w[0] - mu * g, after)
                self.w = new.unsqueeze(0)
                losses = [o[2] for o in outs]
        else:
            with timers("compute"):
                outs = [self._grad(self.w[k], k, rnd) for k in range(self.agents)]
                losses = [o[2] for o in outs]
                g = torch.stack([o[1] for o in outs])
                after = torch.stack([o[0] for o in outs])
            if self.strategy == "diffusion":
                share = after - mu * g
                pairs, sent = self._exchange(share, timers)
                with timers("aggregate"):
                    self.w = torch.stack([self._combine(self._own(pairs, k, share), k, None)
                                          for k in range(self.agents)])
            else:
                pairs, sent = self._exchange(after, timers)
                with timers("aggregate"):
                    self.w = torch.stack([self._combine(self._own(pairs, k, after), k,
                                                        -mu * g[k])
                                          for k in range(self.agents)])
        self.round = rnd
        rec: dict[str, Any] = {
            "round": rnd, "lr": mu, "train_loss": float(np.mean(losses)),
            "bytes_up": sent, "bytes_down": sent,
            "dense_bytes": 4 * self.layout.numel * int(self.adj.sum()),
        }
        if rnd % self.cfg.run.eval_every == 0 or rnd == self.cfg.run.rounds:
            with timers("eval"):
                rec.update(self.evaluate())
        rec["time"] = timers.as_dict()
        rec["wall"] = time.perf_counter() - t0
        if self.base.dense_layers:  # client.compute = "sparse" on a dense model: said
            rec["dense_layers"] = dict(self.base.dense_layers)
        return rec

    def evaluate(self) -> dict[str, Any]:
        mean = self.global_flat
        self.layout.load(self.model, mean)
        acc, loss = evaluate(self.model, self.data.test_x, self.data.test_y)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, 9))
        pick = torch.randperm(len(self.data.train_y), generator=gen)[:5000]
        _, train_loss = evaluate(self.model, self.data.train_x[pick], self.data.train_y[pick])
        agent_acc = []
        for k in range(self.w.shape[0]):
            self.layout.load(self.model, self.w[k])
            agent_acc.append(evaluate(self.model, self.data.test_x, self.data.test_y)[0])
        spread = float(((self.w - mean) ** 2).sum(1).mean() / (mean ** 2).sum().clamp_min(1e-30))
        return {"acc": acc, "loss": loss, "full_train_loss": train_loss,
                "agent_acc_mean": float(np.mean(agent_acc)), "disagreement": spread,
                "sparsity": 0.0}
