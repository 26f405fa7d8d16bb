"""What a client sends and how sparsity is kept: none | topk | sparsyfed | flash.

- none: dense training, dense update (FedAvg).
- scope "layer" (not in the paper) prunes every layer to the same sparsity instead of
  one global threshold, which avoids layer collapse on MLPs whose first layer starts with
  much smaller weights than the others (see docs/results.md).
- topk: dense training (beta = 1), then global magnitude top-k over all Linear/Conv2d
  weights to the target sparsity; pruned weights may regrow in the next round.
- sparsyfed: Powerprop layers (beta > 1) so that weights that arrive at zero get no
  gradient, activation pruning at each layer's current sparsity, then the same global
  top-k.  Round 1 starts dense.
- flash: round 1 dense + global top-k; the server then fixes one mask per layer at the
  clients' mean layer density (per-layer magnitude top-k of the aggregate); later rounds
  train and send under that fixed mask.  Its layers are Powerprop with beta = 1 (the same
  function as nn.Linear/Conv2d), so that under the fixed mask they can compute sparse.

All selections go through sparsefl.ops (top-k kernels); nothing here touches a backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparsefl import ops
from sparsefl.codec import split_flat
from sparsefl.fl.config import SparsitySection
from sparsefl.fl.layout import Layout
from sparsefl.nn import set_activation_density, sparsify


class Sparsifier:
    name = "none"

    def __init__(self, cfg: SparsitySection) -> None:
        self.cfg = cfg

    def setup_model(self, model: nn.Module) -> nn.Module:
        return model

    def begin_client(self, model: nn.Module, rnd: int) -> None:
        """Called after the global model is loaded, before local training."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every local optimizer step."""

    def step_hook(self, model: nn.Module) -> Callable[[], None] | None:
        """What this client's training must run after every optimizer step, asked once
        the client's compute paths are set (None: nothing, so the step loop pays no call
        and an MLP may train fused)."""
        if type(self).after_step is Sparsifier.after_step:
            return None
        return lambda: self.after_step(model)

    def fixed_support(self) -> bool:
        """Whether a mask keeps the support fixed during local training even where
        Powerprop does not (beta = 1): then those layers may compute sparse too."""
        return False

    def select(self, layout: Layout, flat: Tensor, rnd: int) -> dict[str, Tensor] | None:
        """Local indices to send per prunable entry (None: every non-zero, i.e. dense)."""
        return None

    def after_aggregate(self, layout: Layout, flat: Tensor, kept: list[dict[str, int]],
                        rnd: int) -> Tensor:
        """Server side, on the new global model; returns it (possibly masked).

        kept: per usable client, how many entries of each prunable tensor it sent (the
        server streams payloads and does not keep them)."""
        return flat

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


def global_topk(layout: Layout, flat: Tensor, density: float,
                scope: str = "global") -> dict[str, Tensor]:
    """Indices of the largest-magnitude prunable weights: over all layers together
    (scope "global", SparsyFed) or the same fraction of every layer ("layer")."""
    entries = layout.prunable_entries()
    pieces = [flat[e.offset:e.offset + e.numel] for e in entries]
    if scope == "layer":
        return {e.name: ops.topk_compress(p, density)[0] for e, p in zip(entries, pieces)}
    idx, val = ops.topk_compress(pieces, density)
    chunks = split_flat(idx, val, [e.numel for e in entries])
    return {e.name: c.indices for e, c in zip(entries, chunks)}


class TopK(Sparsifier):
    name = "topk"

    def select(self, layout, flat, rnd):
        return global_topk(layout, flat, 1.0 - self.cfg.sparsity, self.cfg.scope)


class SparsyFed(TopK):
    name = "sparsyfed"

    def setup_model(self, model):
        return sparsify(model, self.cfg.beta)

    def begin_client(self, model, rnd):
        set_activation_density(model, enabled=self.cfg.activation_pruning,
                               threshold=self.cfg.act_threshold)


class Flash(TopK):
    name = "flash"

    def setup_model(self, model):
        # Powerprop layers with beta = 1 compute exactly as nn.Linear/Conv2d (theta = omega)
        # and, once the server fixed the masks, can compute on their support.
        return sparsify(model, 1.0)

    def fixed_support(self):
        return bool(self.masks)

    def __init__(self, cfg: SparsitySection) -> None:
        super().__init__(cfg)
        self.masks: dict[str, Tensor] = {}  # flat-layout entry name -> bool mask (1-D)
        self._params: list[tuple[Tensor, Tensor]] = []

    def begin_client(self, model, rnd):
        self._params = []
        if not self.masks:
            return
        named = dict(model.named_parameters())
        mods = dict(model.named_modules())
        self._params = [(named[n], m.view(named[n].shape).to(named[n].device),
                         mods.get(n.rpartition(".")[0]))
                        for n, m in self.masks.items()]
        self.after_step(model)

    @torch.no_grad()
    def after_step(self, model):
        for p, m, _ in self._params:
            p.mul_(m)

    def step_hook(self, model):
        # A layer computing on its support (set_compute "sparse") gets exactly zero
        # gradient off the mask, and SGD's decay and momentum keep a zero weight zero: the
        # mask changes nothing there, so only the layers on the dense path are masked.
        dense = [(p, m) for p, m, mod in self._params
                 if getattr(mod, "compute", "dense") != "sparse"]
        if not dense:
            return None

        @torch.no_grad()
        def mask() -> None:
            for p, m in dense:
                p.mul_(m)

        return mask

    def select(self, layout, flat, rnd):
        if not self.masks:
            return super().select(layout, flat, rnd)
        return {n: m.nonzero().flatten() for n, m in self.masks.items()}

    @torch.no_grad()
    def after_aggregate(self, layout, flat, kept, rnd):
        if self.masks or not kept:
            return flat
        flat = flat.clone()
        for e in layout.prunable_entries():
            density = sum(k[e.name] for k in kept) / (len(kept) * e.numel)
            piece = flat[e.offset:e.offset + e.numel]
            mask = ops.topk_mask(piece, density)
            piece.mul_(mask)
            self.masks[e.name] = mask
        return flat

    def state(self):
        return {f"flash.{n}": m for n, m in self.masks.items()}

    def load_state(self, state):
        self.masks = {k[len("flash."):]: v.bool() for k, v in state.items()
                      if k.startswith("flash.")}


def build(cfg: SparsitySection) -> Sparsifier:
    return {"none": Sparsifier, "topk": TopK, "sparsyfed": SparsyFed, "flash": Flash}[
        cfg.method](cfg)
