"""Recompute instead of keep: what makes a sparse client step need less memory.

Backward needs some forward tensors.  In a ResNet the big ones are kept by BatchNorm (its
input: the conv's output) and by ReLU (its output), each full size in fp32, and activation
pruning cannot shrink them.  But on the support a conv's forward is cheap (at 95% sparsity
~1/20 of the dense conv's multiply-adds), so the sparse path keeps recipes instead:

    conv -> BatchNorm        BatchNorm keeps "conv(x)" (x: a tensor kept anyway, or a
                             recipe itself), recomputed when its backward asks;
    conv -> BN -> nn.ReLU    the ReLU keeps "relu(bn(conv(x)))": with BN's batch
                             statistics recomputed from the same input (so the same
                             numbers), the chain runs again from x.

In a ResNet block, relu(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x)), this keeps only
the block input x (kept by the previous block's ReLU anyway) for the whole branch.  The
kernels are deterministic, so recomputed tensors are bit for bit the forward's (tested),
and a chain refuses to recompute if its input or a weight changed in place since.

Mechanics: sparse layers in training note their outputs (`note_output`); BatchNorm and
nn.ReLU modules run their forward under `torch.autograd.graph.saved_tensors_hooks` whose
pack hook swaps a noted tensor for its recipe and whose unpack hook evaluates it.  Recipes
hold their source weakly until saved, so a noted tensor that nobody saves costs nothing.
Only modules (not functional calls) take part: the model decides where chains stop.
The fused BatchNorm + ReLU op (batch_norm_act.py) takes part the same way: its saved
input becomes the input's recipe, and it saves its ReLU's mask as bits, not its output;
without a residual the output is noted as "bn_act(recipe)" (the same kernel again) for
the conv after it.  What is cached: a recipe read again later (a conv's output, which
the BatchNorm after it and the next recipe both read) keeps its value and lets go of its
source once made; one read once (that bn_act output) or made from an input much smaller
than itself (the stem conv's image) is made again per read.  Peak of a ResNet-18
width-64 batch-64 step at 95% above the weights (docs/benchmarks.md): 189.7 MiB with the
output saved and every recipe cached, 134.0 with these rules; uncaching every conv
output instead reached 134.5 MiB for a step 10% slower.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from sparsefl.nn import batch_norm_act as bna

_REFUSED = ("sparsefl: a tensor that a sparse layer's recompute reads (its input or "
            "weight, or a BatchNorm's weight) was modified in place between forward and "
            "backward; set_compute(..., recompute=False) keeps the outputs instead")


class _Recipe:
    """A forward tensor made again on demand.  `src` is a Tensor (weak until pinned) or
    another recipe."""

    cache_value = True

    def __init__(self, src: Tensor | _Recipe, params: tuple[Tensor, ...]) -> None:
        self._src: object = src if isinstance(src, _Recipe) else weakref.ref(src)
        self._params = params
        self._versions = tuple(p._version for p in params)
        self._value: Tensor | None = None

    def pin(self) -> bool:
        """Hold the source strongly (the recipe was saved); False if it is gone."""
        if isinstance(self._src, weakref.ref):
            src = self._src()
            if src is None:
                return False
            self._src = src
            self._src_version = src._version
            return True
        if isinstance(self._src, _Recipe):
            return self._src.pin()
        return True  # already pinned

    def _input(self) -> Tensor:
        src = self._src
        if isinstance(src, _Recipe):
            return src.value()
        if not isinstance(src, Tensor) or src._version != self._src_version:
            raise RuntimeError(_REFUSED)
        return src

    def value(self) -> Tensor:
        if self._value is not None:
            return self._value
        if any(p._version != v for p, v in zip(self._params, self._versions)):
            raise RuntimeError(_REFUSED)
        with torch.no_grad():
            out = self._compute(self._input())
        if self.cache_value:  # read again by the next node back (freed with this recipe)
            self._value = out
            # made once and kept: the source is not needed again, and holding it would keep
            # a whole activation (a block's input) alive through the backward of the block
            self._src = None
        return out

    def _compute(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class _LayerOut(_Recipe):
    def __init__(self, layer: nn.Module, src: Tensor | _Recipe,
                 remake: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__(src, (layer.weight,))
        self.layer, self.remake = layer, remake

    def _compute(self, x: Tensor) -> Tensor:
        return self.remake(self.layer, x)


class _BatchNormOut(_Recipe):
    cache_value = False  # read once, by the ReLU recipe after it

    def __init__(self, bn: _BatchNorm, src: _Recipe) -> None:
        super().__init__(src, tuple(p for p in (bn.weight, bn.bias) if p is not None))
        self.bn = bn

    def _compute(self, x: Tensor) -> Tensor:
        # batch statistics of the same input: the forward's numbers, running stats untouched
        return F.batch_norm(x, None, None, self.bn.weight, self.bn.bias, True, 0.0,
                            self.bn.eps)


class _ReluOut(_Recipe):
    def _compute(self, x: Tensor) -> Tensor:
        # in place when the input is a temporary (an uncached BatchNorm output)
        temporary = isinstance(self._src, _Recipe) and not self._src.cache_value
        return torch.relu_(x) if temporary else torch.relu(x)


# id(tensor) -> (weak tensor, its recipe): what this forward made that can be made again.
# An entry goes when its tensor dies; a saved recipe lives on in autograd's saved tensors.
_NOTED: dict[int, tuple[weakref.ref, _Recipe]] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    entry = _NOTED.get(key)
    if entry is not None and entry[0] is ref:
        del _NOTED[key]


def _note(t: Tensor, recipe: _Recipe) -> None:
    key = id(t)
    _NOTED[key] = (weakref.ref(t, lambda ref: _forget(ref, key)), recipe)


def _recipe_of(t: Tensor) -> _Recipe | None:
    entry = _NOTED.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


def note_output(m: nn.Module, x: Tensor, y: Tensor,
                remake: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """Record that sparse layer `m` made `y` from `x` (called in its training forward);
    remake(m, x) computes y again, bit for bit, without autograd."""
    src = _recipe_of(x)
    recipe = _LayerOut(m, src or x, remake)
    if src is None and 4 * x.numel() <= y.numel():
        # a small kept input (a stem conv's image): made again each time it is read rather
        # than held, as big as the output, until the end of backward
        recipe.cache_value = False
    _note(y, recipe)


def _pack(t: Tensor) -> object:
    recipe = _recipe_of(t)
    return recipe if recipe is not None and recipe.pin() else t


def _unpack(packed: object) -> Tensor:
    return packed.value() if isinstance(packed, _Recipe) else packed  # type: ignore[return-value]


# -- BatchNorm: keeps a recipe for its input; notes its output for a ReLU after it ----------

def _bn_enter(module: _BatchNorm, args: tuple) -> None:
    module._sparsefl_in = _recipe_of(args[0]) if args and isinstance(args[0], Tensor) else None
    ctx = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    ctx.__enter__()
    module._sparsefl_ctx = ctx


def _bn_exit(module: _BatchNorm, args: tuple, output: object) -> None:
    ctx = module.__dict__.pop("_sparsefl_ctx", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    src = module.__dict__.pop("_sparsefl_in", None)
    batch_stats = module.training or not module.track_running_stats
    if src is not None and batch_stats and isinstance(output, Tensor) and \
            output.requires_grad:
        _note(output, _BatchNormOut(module, src))


# -- nn.ReLU: keeps "relu(recipe)" for its output when its input has a recipe --------------

def _relu_enter(module: nn.ReLU, args: tuple) -> None:
    src = _recipe_of(args[0]) if args and isinstance(args[0], Tensor) else None
    if src is None:
        return
    recipe = _ReluOut(src, ())

    def pack(t: Tensor) -> object:  # ReLU saves one tensor: its output
        return recipe if recipe.pin() else t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
    ctx.__enter__()
    module._sparsefl_ctx, module._sparsefl_out = ctx, recipe


def _relu_exit(module: nn.ReLU, args: tuple, output: object) -> None:
    ctx = module.__dict__.pop("_sparsefl_ctx", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    recipe = module.__dict__.pop("_sparsefl_out", None)
    if recipe is not None and isinstance(output, Tensor):
        _note(output, recipe)


# -- the fused BatchNorm (+ ReLU) op: both saved tensors as recipes --------------------------

class _BatchNormActOut(_Recipe):
    # read once, by the recipe of the conv after it: the op keeps its ReLU mask as bits, so
    # the output is not saved, and a cached copy would only add a full activation to the
    # backward's peak
    cache_value = False

    def __init__(self, bn: _BatchNorm, src: _Recipe, relu: bool) -> None:
        super().__init__(src, tuple(p for p in (bn.weight, bn.bias) if p is not None))
        self.bn, self.relu = bn, relu

    def _compute(self, x: Tensor) -> Tensor:
        return bna.forward_only(self.bn, x, self.relu)


def _fused_saving(bn: _BatchNorm, x: Tensor, residual: Tensor | None, relu: bool,
                  run: Callable[[], Tensor]) -> Tensor:
    """bn_act's op with a recipe for x when x has one; without a residual its output is
    noted as "bn_act(recipe)" for the layer after it.  The op saves x, the ReLU mask's
    bits and 1-D tensors (weight, statistics): only x is swapped."""
    src = _recipe_of(x)
    if src is None:
        return run()
    out = _BatchNormActOut(bn, src, relu) if residual is None else None
    x_id = id(x)  # not x: autograd keeps this hook, and would keep x

    def pack(t: Tensor) -> object:
        if id(t) == x_id:
            return src if src.pin() else t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        y = run()
    if out is not None and y.requires_grad:
        _note(y, out)
    return y


_HOOKS = {_BatchNorm: (_bn_enter, _bn_exit), nn.ReLU: (_relu_enter, _relu_exit)}


def _hooked(mod: nn.Module) -> bool:
    return any(h in (_bn_enter, _relu_enter) for h in mod._forward_pre_hooks.values())


def install(model: nn.Module) -> int:
    """Hooks on every BatchNorm and (not in-place) nn.ReLU of `model`, once; returns how
    many modules.  Found again by identity, not by handle, so a deep copy of the model
    works with uninstall()."""
    n = 0
    model.__dict__["_sparsefl_recompute"] = True  # uninstall() has work to do
    for mod in model.modules():
        for kind, (enter, leave) in _HOOKS.items():
            if isinstance(mod, kind) and not getattr(mod, "inplace", False) \
                    and not _hooked(mod):
                mod.register_forward_pre_hook(enter)
                mod.register_forward_hook(leave, always_call=True)
                if kind is _BatchNorm:
                    mod.__dict__[bna.SAVING] = _fused_saving
                n += 1
    return n


def uninstall(model: nn.Module) -> None:
    if not model.__dict__.pop("_sparsefl_recompute", False):
        return
    enters = {e for e, _ in _HOOKS.values()}
    leaves = {x for _, x in _HOOKS.values()}
    for mod in model.modules():
        for k in [k for k, h in mod._forward_pre_hooks.items() if h in enters]:
            del mod._forward_pre_hooks[k]
        for k in [k for k, h in mod._forward_hooks.items() if h in leaves]:
            del mod._forward_hooks[k]
            mod._forward_hooks_always_called.pop(k, None)
        mod.__dict__.pop(bna.SAVING, None)
    _NOTED.clear()


def installed(model: nn.Module) -> bool:
    return any(_hooked(mod) for mod in model.modules())


__all__ = ["install", "installed", "note_output", "uninstall"]
