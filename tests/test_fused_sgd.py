"""sparse_mlp_sgd (a client's local SGD of a sparse Powerprop MLP in one call) against its
reference and against what it replaces: autograd through the layers' sparse path plus
torch.optim.SGD, step by step.

Over hidden sizes (1-3 layers), batches that leave a partial tile (1, 16, 35), activation
pruning on/off with ties, empty rows, 0% and 100% weight density, momentum and weight
decay; bad input raises ValueError (a dtype other than float32: TypeError; fp16/bf16 models
train through the layers' own path, tests/test_sparse_compute.py); opcheck; the engine
path (client.fused) ends where the step loop ends.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import pruned_mlp, run_with_isa_off
from torch import nn

from sparsefl import _native, ops
from sparsefl.fl import config as flconfig
from sparsefl.fl import engine
from sparsefl.fl.client import local_train
from sparsefl.models.mlp import MLP
from sparsefl.nn import set_compute, sparsify
from sparsefl.nn.fused_sgd import fused_sgd
from sparsefl.nn.powerprop import POWERPROP

BACKENDS = ["reference"] + (["cpp"] if _native.has_cpu_kernels() else [])
native = pytest.mark.skipif(not _native.has_cpu_kernels(),
                            reason=f"native extension not loaded: {_native.LOAD_ERROR}")


def _layers(m):
    return [mod for mod in m.modules() if isinstance(mod, POWERPROP)]


def _op_args(m, x, y, order, batch):
    ls = _layers(m)
    return (x.reshape(len(x), -1), y, order, batch, [mod.weight for mod in ls],
            [mod.bias for mod in ls], [mod.beta for mod in ls],
            [ops.pack_support(mod.weight) for mod in ls], [mod.act_density for mod in ls])


def _data(n=37, seed=1, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    if ties:  # many equal magnitudes at every threshold
        x = (x * 2).round() / 2
    return x, torch.randint(0, 5, (n,), generator=g)


def _cfg(**kw):
    cfg = flconfig.load(None, []).client
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [(16, 12), (20,), (9, 8, 7)])
@pytest.mark.parametrize("batch", [1, 16, 35])
@pytest.mark.parametrize("act", [1.0, 0.4])
def test_op_equals_reference(backend, hidden, batch, act):
    m = pruned_mlp(hidden, act=act)
    ref = copy.deepcopy(m)
    x, y = _data(ties=True)
    order = torch.stack([torch.randperm(len(y)), torch.randperm(len(y))])
    with torch.no_grad():
        la, _ = ops.sparse_mlp_sgd(*_op_args(m, x, y, order, batch), 0.05, 0.5, 1e-3,
                                   backend=backend)
        lb, _ = ops.sparse_mlp_sgd(*_op_args(ref, x, y, order, batch), 0.05, 0.5, 1e-3,
                                   backend="reference")
    assert la.shape == (2 * -(-len(y) // batch),)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(a == 0, b == 0) or a.dim() == 1  # no weight left or joined S


@native
@pytest.mark.parametrize("hidden", [(16, 12), (9, 8, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("batch", [1, 16, 35])
def test_fused_equals_step_loop(hidden, bias, density, momentum, batch):
    """local_train with and without the fused call: the same losses and weights (fp32
    rounding apart: the kernels sum in another order than autograd)."""
    m = pruned_mlp(hidden, bias, density)
    with torch.no_grad():
        m[1].weight[:3] = 0  # empty rows
    loop = copy.deepcopy(m)
    x, y = _data(ties=True)
    for model in (m, loop):
        set_compute(model, "sparse")
    assert fused_sgd(m) is not None
    a = local_train(m, x, y, _cfg(epochs=2, batch_size=batch, momentum=momentum, lr=0.1),
                    0.1, torch.Generator().manual_seed(3))
    b = local_train(loop, x, y, _cfg(epochs=2, batch_size=batch, momentum=momentum, lr=0.1,
                                     fused=False), 0.1, torch.Generator().manual_seed(3))
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    # up to 74 steps: fp32 rounding differences grow along the trajectory (1e-7 after one
    # step, ~3e-5 after 37 at batch 1 and momentum 0.9); a wrong gradient is off by >1e-2
    for p, q in zip(m.parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=5e-4)
        assert torch.equal(p == 0, q == 0) or p.dim() == 1
        assert p.grad is None


@native
@pytest.mark.parametrize("act", [1.0, 0.4])
def test_one_step_equals_autograd(act):
    """One step, tight: the fused update is autograd's gradient + SGD's rule."""
    m = pruned_mlp(act=act)
    loop = copy.deepcopy(m)
    x, y = _data(n=20, ties=True)
    for model in (m, loop):
        set_compute(model, "sparse")
    cfg = dict(epochs=1, batch_size=20, momentum=0.9, weight_decay=1e-2)
    a = local_train(m, x, y, _cfg(**cfg), 0.3, torch.Generator().manual_seed(0))
    b = local_train(loop, x, y, _cfg(**cfg, fused=False), 0.3,
                    torch.Generator().manual_seed(0))
    assert a == pytest.approx(b, rel=1e-6)
    for p, q in zip(m.parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@native
def test_who_qualifies():
    m = pruned_mlp()
    assert fused_sgd(m) is None                  # dense compute
    set_compute(m, "sparse")
    assert fused_sgd(m) is not None
    m.eval()
    assert fused_sgd(m) is None                  # evaluation
    m.train()
    h = m[3].register_forward_hook(lambda *a: None)
    assert fused_sgd(m) is None                  # a hook would miss the steps
    h.remove()
    m[5].bias.requires_grad_(False)
    assert fused_sgd(m) is None                  # a frozen parameter (FedBABU's head)
    m[5].bias.requires_grad_(True)
    w = m[3].weight
    m[3].weight = nn.Parameter(w.detach().clone())  # not the weight the chain was built on
    assert fused_sgd(m) is None
    m[3].weight = w
    assert fused_sgd(m) is not None
    f = pruned_mlp(beta=1.0)
    assert set(set_compute(f, "sparse", fixed_support=True).values()) == {"sparse"}
    assert fused_sgd(f) is not None
    # the engine passes a per-step hook (FLASH's mask) -> the loop runs
    x, y = _data()
    calls = []
    local_train(f, x, y, _cfg(epochs=1), 0.1, torch.Generator().manual_seed(0),
                after_step=lambda: calls.append(1))
    assert len(calls) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    m = pruned_mlp()
    x, y = _data()
    order = torch.randperm(len(y))[None]

    def call(**kw):
        args = dict(zip(["x", "y", "order", "batch_size", "omegas", "biases", "betas",
                         "supports", "act_densities"], _op_args(m, x, y, order, 8)))
        args.update(kw)
        with torch.no_grad():
            return ops.sparse_mlp_sgd(**args, lr=0.1, backend=backend)

    with pytest.raises(ValueError, match="label"):
        call(y=y.clone().fill_(5))
    with pytest.raises(ValueError, match="order"):
        call(order=order + 1)
    with pytest.raises(ValueError, match="one entry per layer"):
        call(betas=[1.25, 1.25])
    with pytest.raises(ValueError, match="features"):
        call(x=torch.randn(len(y), 35))
    with pytest.raises(ValueError, match="batch"):
        call(batch_size=0)
    bad = x.reshape(len(y), -1).clone()
    bad[order[0, 9], 4] = float("nan")  # in the second batch
    with pytest.raises(ValueError, match="NaN"):
        call(x=bad)
    stale = [mod.weight.detach().clone() for mod in _layers(m)]
    stale[1].fill_(1.0)  # nonzeros outside the packed support
    with pytest.raises(ValueError, match="outside the support"):
        call(omegas=stale)
    with pytest.raises(ValueError, match="beta"):
        call(betas=[1.25, 0.5, 1.25])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # fp32 only: a clear error
        with pytest.raises(TypeError, match="float32"):
            call(x=x.reshape(len(y), -1).to(dtype))
        with pytest.raises(TypeError, match="float32"):
            call(omegas=[mod.weight.detach().to(dtype) for mod in _layers(m)])
    with pytest.raises(ValueError, match="matrix"):
        call(omegas=[torch.tensor(1.0)] + [mod.weight.detach() for mod in _layers(m)][1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_epochs(backend):
    m = pruned_mlp()
    x, y = _data()
    with torch.no_grad():
        losses, _ = ops.sparse_mlp_sgd(*_op_args(m, x, y, torch.empty(0, len(y),
                                                                        dtype=torch.int64), 4),
                                       0.1, backend=backend)
    assert losses.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    m = pruned_mlp()
    x, y = _data(n=9)
    ls = _layers(m)
    sup = [ops.pack_support(mod.weight) for mod in ls]
    args = (x.reshape(9, -1), y, torch.randperm(9)[None], 4,
            [mod.weight.detach().clone() for mod in ls], [mod.bias.detach().clone() for mod in ls],
            [1.25] * 3, [s.rowptr for s in sup], [s.cols for s in sup], [0.4, 0.4, 1.0], 0.1,
            0.0, 1e-3, backend)
    torch.library.opcheck(torch.ops.sparsefl.sparse_mlp_sgd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@native
def test_sparsyfed_run_fused_equals_loop(tmp_path):
    """The default job's method on digits: the fused run and the step loop end together."""
    common = ["run.rounds=4", "data.clients=6", "server.clients_per_round=3",
              "client.epochs=2", "client.compute=sparse"]
    a = engine.run(flconfig.load(None, common), tmp_path / "f", progress=False)
    b = engine.run(flconfig.load(None, common + ["client.fused=false"]), tmp_path / "l",
                   progress=False)
    for ra, rb in zip(a.rounds, b.rounds):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)
        assert ra["acc"] == pytest.approx(rb["acc"], abs=0.02)
    torch.testing.assert_close(a.global_flat, b.global_flat, rtol=1e-3, atol=1e-4)


@native
@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_other_isa_paths(env):
    """AVX2 and portable builds of the steps (a subprocess: the ISA is chosen once per
    process) against the reference."""
    code = ("from tests.test_fused_sgd import *\n"
            "for hidden in [(16, 12), (9, 8, 7)]:\n"
            "    for batch in [1, 35]:\n"
            "        test_op_equals_reference('cpp', hidden, batch, 0.4)\n"
            "print('ok')")
    run_with_isa_off(env, code)


@native
@pytest.mark.parametrize("hidden", [(16, 12), (9, 8, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_three_momentum_steps_equal_the_loop_tightly(hidden, bias, momentum):
    """Three steps with momentum and weight decay, fused vs step loop: what fp32 rounding
    in another summation order really leaves (<= 1e-6), not the 74-step tolerance."""
    m = pruned_mlp(hidden, bias, 0.3)
    loop = copy.deepcopy(m)
    x, y = _data(n=60, ties=True)
    for model in (m, loop):
        set_compute(model, "sparse")
    cfg = dict(epochs=1, batch_size=20, momentum=momentum, weight_decay=1e-2)
    a = local_train(m, x, y, _cfg(**cfg), 0.2, torch.Generator().manual_seed(5))
    b = local_train(loop, x, y, _cfg(**cfg, fused=False), 0.2,
                    torch.Generator().manual_seed(5))
    assert a == pytest.approx(b, rel=1e-6)
    for p, q in zip(m.parameters(), loop.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@native
def test_auto_decides_for_the_chain(tmp_path, monkeypatch):
    """With fused=True, "auto" times a fused step against a dense step for the MLP as a
    whole (recorded per machine like the layer decisions): the choice is the faster of
    the two as timed (no assertion on which is faster: that is the machine's), and the
    record is what a later call reads."""
    import json

    from sparsefl.nn import sparse_compute as spc

    cache = tmp_path / "auto.json"
    monkeypatch.setenv("SPARSEFL_AUTO_CACHE", str(cache))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    monkeypatch.setattr(spc, "AUTO_TIMINGS", {})

    def model():
        torch.manual_seed(0)
        m = sparsify(MLP((1, 8, 8), 10, (128, 128)), 1.25)
        with torch.no_grad():
            for mod in _layers(m):
                mod.weight.mul_(ops.topk_mask(mod.weight, 0.1))
                mod.act_density = 0.1
        return m.train()

    sample = torch.randn(16, 1, 8, 8)
    set_compute(model(), "auto", sample=sample, fused=True)
    recorded = json.loads(cache.read_text())
    fused_keys = [k for k in recorded if k.startswith("('fused'")]
    assert len(fused_keys) == 1
    (key, (td, tf)), = [(k, v) for k, v in spc.AUTO_TIMINGS.items() if k[0] == "fused"]
    assert recorded[fused_keys[0]] == ("sparse" if tf < td else "dense")
    # a later process reads the record (flipped here to see it is used): the layers decide
    cache.write_text(json.dumps({fused_keys[0]: "dense"}))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    monkeypatch.setattr(spc, "_time_fused", lambda *a, **k: pytest.fail("timed again"))
    m = model()
    set_compute(m, "auto", sample=sample, fused=True)
    assert all(mod.compute in ("sparse", "dense") for mod in _layers(m))
    assert [v for k, v in spc._AUTO_CACHE.items() if k[0] == "fused"] == ["dense"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_is_fused_and_equals_the_python_loop(momentum, monkeypatch):
    """Without momentum the step loop builds torch's fused SGD (one kernel for every
    parameter): bit for bit the update of the per-parameter Python loop (foreach=False)
    it replaced.  With momentum (where the fused kernel's buffer update differs by an
    ulp) the loop itself."""
    built = []
    real = torch.optim.SGD

    def spy(params, **kw):
        built.append(kw.get("fused"))
        return real(params, **kw)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(64, 5))
    ref = copy.deepcopy(m)
    x, y = _data()
    cfg = _cfg(epochs=2, batch_size=8, momentum=momentum, weight_decay=1e-3, fused=False)
    monkeypatch.setattr(torch.optim, "SGD", spy)
    local_train(m, x, y, cfg, 0.1, torch.Generator().manual_seed(3))
    assert built == [True if momentum == 0 else None]
    # the same batches (local_train's order), the loop optimizer
    from sparsefl.fl.client import _batches

    opt = real(list(ref.parameters()), lr=0.1, momentum=momentum, weight_decay=1e-3,
               foreach=False)
    gen = torch.Generator().manual_seed(3)
    ref.train()
    for _ in range(2):
        for b in _batches(len(y), 8, gen):
            nn.functional.cross_entropy(ref(x[b]), y[b]).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)
