"""Recomputed normalization inputs (sparsefl/nn/recompute.py): the sparse path drops the
outputs of its layers that a BatchNorm would keep, recomputes them in backward, and gets
bit for bit the gradients it gets when it keeps them -- through the eager BatchNorm and
ReLU modules and through the fused op (set_compute switches the ResNet to it)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import pruned_resnet
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F

from sparsefl import _native
from sparsefl.nn import PowerpropConv2d, set_activation_density, set_compute, sparsify
from sparsefl.nn import batch_norm_act as bna
from sparsefl.nn import recompute as rc
from sparsefl.nn.batch_norm_act import bn_act
from sparsefl.nn.powerprop import POWERPROP

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(),
                                reason=f"native extension not loaded: {_native.LOAD_ERROR}")




def _step(m, x, y):
    m.zero_grad(set_to_none=True)
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters()], \
        [b.clone() for b in m.buffers()]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("pruning", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_same_gradients_bit_for_bit(backend, pruning, fused):
    m = pruned_resnet()
    set_activation_density(m, enabled=pruning)
    m2 = copy.deepcopy(m)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    set_compute(m, "sparse", backend=backend)
    set_compute(m2, "sparse", backend=backend, recompute=False)
    assert rc.installed(m) and not rc.installed(m2)
    for mod in (m, m2):  # the fused BatchNorm + ReLU op (set_compute's choice) or the modules
        assert bna.enable(mod, fused) == 20
    for _ in range(2):  # two steps: running statistics updated once per forward
        a, b = _step(m, x, y), _step(m2, x, y)
        assert torch.equal(a[0], b[0])
        assert all(torch.equal(g, h) for g, h in zip(a[1], b[1]))
        assert all(torch.equal(g, h) for g, h in zip(a[2], b[2]))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PowerpropConv2d(4, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ConvBNAct(ConvBN):  # the fused BatchNorm + ReLU op (sparsefl/nn/batch_norm_act.py)
    def forward(self, x):
        return bn_act(self.bn, self.conv(x))


def _conv_output_kept(recompute: bool, model=ConvBN) -> bool:
    torch.manual_seed(0)
    m = model()
    set_compute(m, "sparse", recompute=recompute)
    refs = []
    m.conv.register_forward_hook(lambda mod, a, out: refs.append(weakref.ref(out)))
    out = m(torch.randn(2, 4, 6, 6))
    gc.collect()
    kept = refs[0]() is not None
    out.sum().backward()  # and backward still works
    assert m.conv.weight.grad is not None
    return kept


@pytest.mark.parametrize("model", [ConvBN, ConvBNAct])
def test_conv_output_is_dropped(model):
    assert _conv_output_kept(recompute=False, model=model)
    assert not _conv_output_kept(recompute=True, model=model)


class TwoBlocks(nn.Module):  # conv -> bn_act -> conv -> bn_act, activation pruning on
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBNAct(), ConvBNAct()
        self.b.conv = PowerpropConv2d(8, 8, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _fused_output_kept(recompute: bool) -> bool:
    """Whether the first fused op's output (BatchNorm + ReLU of a sparse conv) stays in
    memory after forward: the op keeps its ReLU mask as bits and the sparse conv after
    it its pruned input, so with or without recompute nothing holds it."""
    torch.manual_seed(0)
    m = sparsify(TwoBlocks(), 1.25)
    set_activation_density(m)
    set_compute(m, "sparse", recompute=recompute)
    refs = []  # of the storage: autograd keeps a saved output as another tensor object
    m.b.conv.register_forward_pre_hook(
        lambda mod, a: refs.append(StorageWeakRef(a[0].untyped_storage())))
    x = torch.randn(2, 4, 6, 6)
    out = m(x)
    gc.collect()
    kept = not refs[0].expired()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    return kept


def test_fused_output_is_dropped_and_gradients_unchanged():
    assert not _fused_output_kept(recompute=False)
    assert not _fused_output_kept(recompute=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = sparsify(TwoBlocks(), 1.25)
        set_activation_density(m)
        set_compute(m, "sparse", recompute=recompute)
        torch.manual_seed(1)
        m(torch.randn(4, 4, 6, 6)).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_input_modified_in_place_is_refused():
    torch.manual_seed(0)
    m = ConvBN()
    set_compute(m, "sparse")
    x = torch.randn(2, 4, 6, 6)
    out = m(x)
    x.mul_(2)  # nothing else keeps x: only the recompute would notice
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_dense_mode_removes_the_hooks_and_copies_keep_working():
    m = pruned_resnet()
    set_compute(m, "sparse")
    assert rc.installed(m)
    c = copy.deepcopy(m)
    assert rc.installed(c)
    set_compute(c, "dense")
    assert not rc.installed(c) and rc.installed(m)
    set_compute(m, "sparse")  # again: hooks not stacked
    bn = m.bn1
    assert sum(h is rc._bn_enter for h in bn._forward_pre_hooks.values()) == 1
    set_compute(m, "dense")
    assert not rc.installed(m)


def test_eval_and_no_grad_note_nothing():
    m = pruned_resnet()
    set_compute(m, "sparse")
    rc._NOTED.clear()
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 16, 16))
    assert not rc._NOTED
    set_compute(m, "dense")


def test_which_layers_recompute():
    """With a sample batch: the layers whose output is at least half the largest (the
    stem and the first two stages of a ResNet); none in a model without BatchNorm."""
    m = pruned_resnet()
    set_compute(m, "sparse", sample=torch.randn(2, 3, 16, 16), recompute=True)
    chosen = {n for n, mod in m.named_modules() if getattr(mod, "_recompute", False)}
    stage = {n: (int(n.split(".")[1]) // 2 if n.startswith("layers.") else -1)
             for n, mod in m.named_modules() if isinstance(mod, POWERPROP)}
    assert chosen == {n for n, s in stage.items() if s <= 1 and n != "linear"}
    from sparsefl.models.mlp import MLP

    mlp = sparsify(MLP((20,), 4, [16, 16]), 1.25)
    set_compute(mlp, "sparse", sample=torch.randn(3, 20))
    assert not rc.installed(mlp)
    assert not any(getattr(mod, "_recompute", False) for mod in mlp.modules())


def test_auto_recomputes_only_large_outputs(monkeypatch):
    """recompute="auto" (the default): with a sample whose largest recomputable output is
    under RECOMPUTE_MIN_BYTES nothing recomputes (the extra forward would be pure cost);
    at or above it, the same layers as recompute=True; without a sample, as True."""
    from sparsefl.nn import sparse_compute

    m = pruned_resnet()
    x = torch.randn(2, 3, 16, 16)
    set_compute(m, "sparse", sample=x)
    assert not rc.installed(m)
    assert not any(getattr(mod, "_recompute", False) for mod in m.modules())
    set_compute(m, "sparse", sample=x, recompute=True)
    always = {n for n, mod in m.named_modules() if getattr(mod, "_recompute", False)}
    assert always
    sizes = []
    hooks = [mod.register_forward_hook(lambda mod, a, out: sizes.append(out.numel() * 4))
             for mod in m.modules() if isinstance(mod, PowerpropConv2d)]
    with torch.no_grad():
        m.eval()(x)
    m.train()
    for h in hooks:
        h.remove()
    largest = max(sizes)  # bytes of the batch's largest conv output
    for limit, expect in ((largest, always), (largest + 1, set())):
        monkeypatch.setattr(sparse_compute, "RECOMPUTE_MIN_BYTES", limit)
        set_compute(m, "sparse", sample=x)
        assert {n for n, mod in m.named_modules() if getattr(mod, "_recompute", False)} == expect
    set_compute(m, "sparse")  # no sample: the sizes are unknown, recompute as True
    assert rc.installed(m)
    set_compute(m, "sparse", sample=x, recompute="".join(["au", "to"]))  # equal, not identical
    assert not rc.installed(m)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="recompute must be"):
            set_compute(m, "sparse", recompute=bad)


@pytest.mark.parametrize("value, ok", [("auto", True), ("true", True), ("false", True),
                                       ("1", False), ("sometimes", False)])
def test_recompute_option_values(value, ok):
    from sparsefl.fl import config as flconfig
    from sparsefl.fl.config import ConfigError

    if ok:
        cfg = flconfig.load(None, [f"client.recompute={value}"])
        assert cfg.client.recompute == {"auto": "auto", "true": True, "false": False}[value]
    else:
        with pytest.raises(ConfigError, match="client.recompute"):
            flconfig.load(None, [f"client.recompute={value}"])


def test_run_option_changes_memory_not_results(tmp_path, monkeypatch):
    """client.recompute reaches set_compute, and a run ends bit for bit where it ends
    without it (a ResNet on digits, sparse compute, two rounds)."""
    from sparsefl.fl import config as flconfig
    from sparsefl.fl import engine

    calls, orig = [], engine.set_compute

    def spy(model, mode, **kw):
        calls.append((mode, kw.get("recompute")))
        return orig(model, mode, **kw)

    monkeypatch.setattr(engine, "set_compute", spy)
    finals = {}
    for flag in ("true", "false"):
        cfg = flconfig.load(None, ["run.rounds=2", "data.clients=4", "server.clients_per_round=2",
                                   "client.epochs=1", "model.name=resnet18", "model.width=4",
                                   "client.compute=sparse", f"client.recompute={flag}"])
        h = engine.run(cfg, tmp_path / flag)
        assert ("sparse", flag == "true") in calls
        finals[flag] = [(r["train_loss"], r["acc"]) for r in h.rounds]
    assert finals["true"] == finals["false"]


def test_cached_recipe_lets_go_of_its_source():
    """A layer output made again once and cached no longer needs its input: the recipe
    drops it (a block's input would otherwise live through the block's whole backward).
    An output of a much smaller input (a stem conv's image) is not cached: made again at
    each read, from the input it keeps."""
    torch.manual_seed(0)
    conv = PowerpropConv2d(4, 4, 3, 1, 1, bias=False)
    stem = PowerpropConv2d(1, 8, 3, 1, 1, bias=False)
    remake = lambda m, t: F.conv2d(t, m.weight, None, 1, 1)  # noqa: E731
    x, img = torch.randn(2, 4, 6, 6), torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        y, s = remake(conv, x), remake(stem, img)
    rc.note_output(conv, x, y, remake)
    rc.note_output(stem, img, s, remake)
    big, small = rc._recipe_of(y), rc._recipe_of(s)
    assert big.cache_value and not small.cache_value
    assert big.pin() and small.pin()
    x_ref = weakref.ref(x)
    del x
    gc.collect()
    assert x_ref() is not None  # pinned: the recipe holds its input until it is made
    assert torch.equal(big.value(), y)
    gc.collect()
    assert x_ref() is None and big.value() is big.value()  # made once, input released
    first = small.value()
    assert torch.equal(first, s) and small.value() is not first  # made again per read
