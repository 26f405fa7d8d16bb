"""set_compute: Powerprop layers computing on their support agree with the dense path.

Layer level: the same input through the dense and the sparse path gives the same output,
input gradient and weight gradient (fp32 tolerance), over the layer shapes of the three
models, batch 1, 0% and 100% density and non-contiguous inputs, with activation pruning
on.  Model level: a ResNet gives the same loss and gradients; a SparsyFed run on digits
ends where the dense path ends.  Plus the refusals and the support guard.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import pruned_mlp, pruned_resnet, run_with_isa_off
from torch import nn
from torch.nn import functional as F

from sparsefl import _native, ops
from sparsefl.fl import config as flconfig
from sparsefl.fl import engine
from sparsefl.models.mlp import MLP
from sparsefl.nn import (
    PowerpropConv2d,
    PowerpropLinear,
    set_activation_density,
    set_compute,
    sparsify,
)
from sparsefl.nn.powerprop import POWERPROP, act_cut

pytestmark = pytest.mark.skipif(not _native.has_cpu_kernels(),
                                reason=f"native extension not loaded: {_native.LOAD_ERROR}")

# (layer factory, input shape): the models' layer kinds, small
LAYERS = [
    (lambda: PowerpropConv2d(8, 8, 3, 1, 1, bias=False), (16, 8, 8, 8)),
    (lambda: PowerpropConv2d(8, 16, 3, 2, 1, bias=False), (9, 8, 8, 8)),
    (lambda: PowerpropConv2d(8, 16, 1, 2, 0, bias=False), (9, 8, 8, 8)),
    (lambda: PowerpropConv2d(3, 8, 3, 1, 1, bias=False), (1, 3, 6, 6)),
    (lambda: PowerpropConv2d(1, 6, 5, 1, 0), (4, 1, 12, 12)),          # LeNet conv, bias
    (lambda: PowerpropLinear(40, 20), (7, 40)),
    (lambda: PowerpropLinear(40, 20), (1, 40)),
    (lambda: PowerpropLinear(12, 10), (3, 5, 12)),                     # extra leading dim
    (lambda: PowerpropConv2d(8, 8, 3, 1, 1, bias=False), (5, 8, 1, 1)),  # 1x1 spatial 3x3
]


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) if b.numel() else 0.0


def grads(layer, x, gy):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    wrt = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return [y, *torch.autograd.grad(y, wrt, gy)]


@pytest.mark.parametrize("case", range(len(LAYERS)))
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("act", [1.0, 0.3])
def test_layer_sparse_equals_dense(case, density, act):
    torch.manual_seed(case)
    make, shape = LAYERS[case]
    dense = make()
    with torch.no_grad():
        dense.weight.mul_(ops.topk_mask(dense.weight, density))
    dense.act_density = act
    sparse = copy.deepcopy(dense)
    assert set(set_compute(sparse, "sparse").values()) == {"sparse"}
    dense.train()
    sparse.train()
    x = torch.randn(shape).relu()
    gy = torch.randn(dense(x).shape)
    for a, b in zip(grads(sparse, x, gy), grads(dense, x, gy)):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-5
    # the weight gradient is zero off the support
    w_grad = grads(sparse, x, gy)[2]
    assert bool((w_grad[sparse.weight == 0] == 0).all())


def test_non_contiguous_input():
    torch.manual_seed(0)
    layer = PowerpropConv2d(8, 8, 3, 1, 1, bias=False)
    with torch.no_grad():
        layer.weight.mul_(ops.topk_mask(layer.weight, 0.2))
    layer.act_density = 0.3
    x = torch.randn(6, 8, 8, 8).relu().transpose(2, 3)
    assert not x.is_contiguous()
    gy = torch.randn(6, 8, 8, 8)
    want = grads(layer, x, gy)
    set_compute(layer, "sparse")
    for a, b in zip(grads(layer, x, gy), want):
        assert rel(a, b) < 1e-5




@pytest.mark.parametrize("case", [0, 1, 2, 4])  # 3x3 s1, 3x3 s2, 1x1 s2, 5x5 + bias
@pytest.mark.parametrize("keep", [0.6, 0.1])  # the input kept as tiles / as a pack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_batch_layer_both_forms_of_the_kept_input(case, keep, dtype):
    """Under the first-batch threshold the fused layer keeps the pruned input as its
    forward's pixel tiles (a quarter or more survives: the weight gradient without
    gathers) or as a pack; either way dx, domega and the bias equal the dense path's."""
    torch.manual_seed(case)
    make, shape = LAYERS[case]
    dense = make().to(dtype)
    with torch.no_grad():
        dense.weight.mul_(ops.topk_mask(dense.weight.float(), 0.3).to(dtype))
    set_activation_density(nn.Sequential(dense), threshold="first_batch")
    dense.act_density = keep
    sparse = copy.deepcopy(dense)
    set_compute(sparse, "sparse")
    dense.train()
    sparse.train()
    first = torch.randn(shape).to(dtype)
    dense(first)
    sparse(first)
    assert sparse.act_tau == dense.act_tau is not None
    x = (1.5 * torch.randn(shape)).to(dtype)
    gy = torch.randn(dense(x).shape).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grads(sparse, x, gy), grads(dense, x, gy)):
        assert a.dtype == b.dtype and rel(a, b) < tol
    bad = x.clone()
    bad.view(-1)[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparse(bad).sum().backward()


def _per_batch_pair(case, keep):
    torch.manual_seed(case)
    make, shape = LAYERS[case]
    dense = make()
    with torch.no_grad():
        dense.weight.mul_(ops.topk_mask(dense.weight, 0.3))
    dense.act_density = keep
    sparse = copy.deepcopy(dense)
    set_compute(sparse, "sparse")
    dense.train()
    sparse.train()
    return dense, sparse, shape


@pytest.mark.parametrize("case", [0, 1, 4])  # 3x3 s1, 3x3 s2, 5x5 + bias
@pytest.mark.parametrize("keep", [0.6, 0.1])  # the input kept as tiles / as a pack
def test_per_batch_cut_selected_in_the_layer(case, keep):
    """A conv layer's per-batch cut is left to the fused layer (act_cut(fused=True) gives
    (k, None)), which selects it on its input tiles with a bracket from the last batch.
    Over batches where that bracket holds, misses above and below, a tie splits at the
    cut (an image's flat background), and k exceeds the nonzeros, dx, domega and the bias
    equal the dense path's, which selects the top k itself."""
    dense, sparse, shape = _per_batch_pair(case, keep)
    g = torch.Generator().manual_seed(case)
    base = torch.randn(shape, generator=g).relu()
    sparse_zeros = base * (torch.rand(shape, generator=g) < 0.2)
    batches = [base, base * 1.01, base * 3, base * 0.2, (base * 2).round(), sparse_zeros,
               torch.randn(shape, generator=g).relu()]
    for i, x in enumerate(batches):
        k = act_cut(sparse, x, fused=True)[0]
        assert act_cut(sparse, x, fused=True) == (k, None) and 0 < k < x.numel()
        gy = torch.randn(dense(x).shape, generator=g)
        for a, b in zip(grads(sparse, x, gy), grads(dense, x, gy)):
            assert rel(a, b) < 1e-5, i


@pytest.mark.parametrize("case", [0, 1, 4])  # 3x3 s1, 3x3 s2, 5x5 + bias
@pytest.mark.parametrize("keep", [0.6, 0.1])  # the input kept as tiles / as a pack
def test_per_batch_cut_on_a_tie(case, keep):
    """The fused op also takes a cut selected by its caller as (k, tau), tau the k-th
    largest magnitude, tied: on the tiles path it keeps |x| > tau and the first ties in
    flat order (the packs' rule) without selecting; dx, domega and the bias equal the dense
    path's.  There a tau that is not the k-th magnitude is refused (the pack path selects
    its own top k and does not use it)."""
    dense, sparse, shape = _per_batch_pair(case, keep)
    x = (torch.randn(shape) * 2).round().abs()  # few distinct magnitudes: ties at any cut
    k = act_cut(dense, x)[0]
    a = x.reshape(-1)
    tau = float(a.kthvalue(a.numel() - k + 1).values)
    assert int((a > tau).sum()) < k < int((a >= tau).sum())  # a split tie, as the test needs
    sp = sparse._spec

    def op(x, t):
        return torch.ops.sparsefl_C.sparse_layer(x, sparse.weight, sparse.bias, sparse.beta,
                                                 sp.plan_id, k, True, t)

    gy = torch.randn(dense(x).shape)
    xs = x.clone().requires_grad_(True)
    wrt = [xs, sparse.weight] + ([sparse.bias] if sparse.bias is not None else [])
    got = [op(xs, tau), *torch.autograd.grad(op(xs, tau), wrt, gy)]
    for a, b in zip(got, grads(dense, x, gy)):
        assert rel(a, b) < 1e-5
    for wrong in (tau * 2, tau / 2):
        if keep < 0.25:
            continue
        with pytest.raises(ValueError, match="largest"):
            op(x, wrong)
    with pytest.raises(ValueError, match="k >= 1"):
        torch.ops.sparsefl_C.sparse_layer(x, sparse.weight, sparse.bias, sparse.beta,
                                          sp.plan_id, 0, True, tau)


@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_layer_on_other_isa_paths(env):
    """The fused layer (both forms of the kept input) on the AVX2 and portable loops, in a
    subprocess: the ISA is chosen once per process."""
    code = ("import torch\n"
            "from tests.test_sparse_compute import *\n"
            "for case in (0, 1, 2, 4):\n"
            "    for keep in (0.6, 0.1):\n"
            "        test_first_batch_layer_both_forms_of_the_kept_input(case, keep, "
            "torch.float32)\n"
            "    for act in (1.0, 0.3):\n"
            "        test_layer_sparse_equals_dense(case, 0.2, act)\n"
            "print('ok')")
    run_with_isa_off(env, code)


@pytest.mark.parametrize("pruning", [False, True])
def test_model_loss_and_gradients(pruning):
    """A whole ResNet step.  With activation pruning the top-k of each layer input is a
    discontinuous function of it, so a last-bit difference upstream may swap an entry at
    the threshold: gradients are then compared in norm, not entry by entry (the layer
    test above is the entrywise check on identical inputs)."""
    m = pruned_resnet()
    set_activation_density(m, enabled=pruning)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = {}
    for mode in ("dense", "sparse"):
        set_compute(m, mode)
        m.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        out[mode] = (loss.detach(), [p.grad.clone() for p in m.parameters()])
    assert rel(out["sparse"][0], out["dense"][0]) < 1e-5
    for a, b in zip(out["sparse"][1], out["dense"][1]):
        if pruning:
            assert float((a - b).norm() / (b.norm() + 1e-12)) < 5e-2
        else:
            assert rel(a, b) < 1e-4


def test_modes_and_refusals():
    m = pruned_resnet()
    with pytest.raises(ValueError, match="mode"):
        set_compute(m, "fast")
    lin = sparsify(nn.Sequential(nn.Linear(4, 4)), 1.0)
    with pytest.raises(ValueError, match="beta = 1"):
        set_compute(lin, "sparse")
    assert set_compute(lin, "auto") == {"0": "dense"}  # auto keeps it dense
    assert set_compute(lin, "sparse", fixed_support=True) == {"0": "sparse"}
    grouped = nn.Sequential(PowerpropConv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups"):
        set_compute(grouped, "sparse")
    dilated = nn.Sequential(PowerpropConv2d(4, 4, 3, dilation=2))
    with pytest.raises(ValueError, match="dilation"):
        set_compute(dilated, "sparse")
    same = nn.Sequential(PowerpropConv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="padding"):
        set_compute(same, "sparse")
    assert set(set_compute(m, "dense").values()) == {"dense"}


def test_support_guard():
    """Weights changed outside the packed support (a new model loaded) are refused
    until set_compute runs again."""
    m = pruned_resnet()
    set_compute(m, "sparse")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    with torch.no_grad():
        m.conv1.weight.fill_(0.5)  # the support grows
    with pytest.raises(RuntimeError, match="set_compute"):
        m(x)
    set_compute(m, "sparse")
    F.cross_entropy(m(x), y).backward()


def test_plans_follow_their_layers():
    """The C++ plan a layer computes with: per input size, shared by a deep copy, refused
    once freed or for a weight of another shape."""
    m = pruned_resnet()
    set_compute(m, "sparse")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(m(x), y).backward()
    F.cross_entropy(m(torch.randn(3, 3, 8, 8)), y[:3]).backward()  # a second input size
    twin = copy.deepcopy(m)
    assert twin.conv1._spec is m.conv1._spec
    F.cross_entropy(twin(x), y).backward()
    spec = m.conv1._spec
    op = torch.ops.sparsefl_C.sparse_layer
    with pytest.raises(ValueError, match="packed for"):
        op(x[:, :2], m.conv1.weight[:, :2], None, 1.25, spec.plan_id, -1, False)
    handle = spec.plan_id
    set_compute(m, "dense")
    set_compute(twin, "dense")
    del spec, twin
    with pytest.raises(ValueError, match="plan"):
        op(x, m.conv1.weight, None, 1.25, handle, -1, False)


def test_auto_decisions_are_kept_for_the_machine(tmp_path, monkeypatch):
    """"auto" times a (shape, density) once and records the choice: a process that meets
    it later (a resumed run, a Flower node) reads the record instead of timing again, so
    it cannot take the other path near a tie."""
    from sparsefl.nn import sparse_compute as spc

    cache = tmp_path / "auto.json"
    monkeypatch.setenv("SPARSEFL_AUTO_CACHE", str(cache))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    sample = torch.randn(8, 3, 16, 16)

    def model():
        m = pruned_resnet(0.05)
        set_activation_density(m)
        return m

    first = set_compute(model(), "auto", sample=sample)
    table = json.loads(cache.read_text())
    assert table and set(table.values()) <= {"sparse", "dense"}
    # another process: nothing in memory; the record (flipped here, to see it is used)
    cache.write_text(json.dumps({k: {"sparse": "dense", "dense": "sparse"}[v]
                                 for k, v in table.items()}))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    timed = []
    monkeypatch.setattr(spc, "_calibrate", lambda *a: timed.append(a) or (1.0, 1.0))
    again = set_compute(model(), "auto", sample=sample)
    assert not timed
    assert again == {n: {"sparse": "dense", "dense": "sparse"}[c] for n, c in first.items()}
    # records hold for one CPU, ISA and thread count: at another thread count, timed anew
    old = torch.get_num_threads()
    torch.set_num_threads(1 if old != 1 else 2)
    try:
        timed.clear()
        set_compute(model(), "auto", sample=sample)
        assert timed
        entries = json.loads(cache.read_text())
        assert {k.rsplit(" @ ", 1)[1] for k in entries} == {
            spc.machine_id(), spc.machine_id().rsplit("|", 1)[0] + f"| {old} threads"}
    finally:
        torch.set_num_threads(old)
    # forget_decisions (sparsefl bench calibrate) drops this machine's records only
    before = json.loads(cache.read_text())
    assert spc.forget_decisions() > 0
    after = json.loads(cache.read_text())
    assert after and set(after) < set(before)
    assert all(not k.endswith(" @ " + spc.machine_id()) for k in after)
    for broken in ("not json", "[]"):  # a broken record is timed afresh, never fails
        cache.write_text(broken)
        monkeypatch.setattr(spc, "_AUTO_CACHE", {})
        timed.clear()
        set_compute(model(), "auto", sample=sample)
        assert timed and isinstance(json.loads(cache.read_text()), dict)


def test_auto_records_of_another_kernel_build_are_not_used(tmp_path, monkeypatch):
    """One $SPARSEFL_AUTO_CACHE file serves every build: a record taken with other
    kernels (rebuilt since) is timed afresh, not trusted."""
    from sparsefl.nn import sparse_compute as spc

    cache = tmp_path / "auto.json"
    monkeypatch.setenv("SPARSEFL_AUTO_CACHE", str(cache))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    sample = torch.randn(8, 3, 16, 16)
    m = pruned_resnet(0.05)
    set_activation_density(m)
    set_compute(m, "auto", sample=sample)
    mine = f"| build {spc._build_id()} |"
    table = json.loads(cache.read_text())
    assert table and all(mine in k for k in table)
    cache.write_text(json.dumps({k.replace(mine, "| build 0123456789ab |"): v
                                 for k, v in table.items()}))
    monkeypatch.setattr(spc, "_AUTO_CACHE", {})
    timed = []
    monkeypatch.setattr(spc, "_calibrate", lambda *a: timed.append(a) or (1.0, 1.0))
    set_compute(m, "auto", sample=sample)
    assert len(timed) == len(table)


def test_the_suite_never_writes_the_users_auto_cache():
    """conftest points "auto" at a temporary file for the whole session (subprocesses
    inherit it): no test run records timings in ~/.cache/sparsefl."""
    from sparsefl.nn import sparse_compute as spc

    path = spc.auto_cache_path()
    assert path is not None and Path.home() / ".cache" not in path.parents
    assert os.environ["SPARSEFL_AUTO_CACHE"] == str(path)


def test_auto_calibrates_per_layer():
    m = pruned_resnet(0.05)
    set_activation_density(m)
    choice = set_compute(m, "auto", sample=torch.randn(8, 3, 16, 16))
    assert set(choice.values()) <= {"sparse", "dense"} and len(choice) == 21
    lazy = pruned_resnet(0.05)
    pending = set_compute(lazy, "auto")  # no sample: decided at the first training forward
    assert set(pending.values()) == {"auto"}
    lazy.train()
    F.cross_entropy(lazy(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,))).backward()
    assert {mod.compute for mod in lazy.modules() if isinstance(mod, POWERPROP)} <= {
        "sparse", "dense"}


def test_config_key():
    cfg = flconfig.load(None, ["client.compute=sparse"])
    assert cfg.client.compute == "sparse"
    with pytest.raises(flconfig.ConfigError, match="client.compute"):
        flconfig.load(None, ["client.compute=fast"])


def _run(tmp_path, name, overrides):
    cfg = flconfig.load(None, ["run.rounds=3", "data.clients=6", "server.clients_per_round=3",
                               "client.epochs=1", *overrides])
    return engine.run(cfg, tmp_path / name)


def test_sparsyfed_run_sparse_equals_dense(tmp_path):
    dense = _run(tmp_path, "d", ["client.compute=dense"])
    sparse = _run(tmp_path, "s", ["client.compute=sparse"])
    for a, b in zip(dense.rounds, sparse.rounds):
        assert abs(a["acc"] - b["acc"]) <= 0.02
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * max(1.0, abs(a["train_loss"]))
    assert sparse.rounds[-1]["compute"]["sparse"] == 3


def test_flash_run_uses_the_fixed_mask(tmp_path):
    h = _run(tmp_path, "f", ["sparsity.method=flash", "sparsity.sparsity=0.8",
                             "client.compute=sparse"])
    assert h.rounds[0]["compute"]["dense"] == 3      # round 1: no mask yet
    assert h.rounds[-1]["compute"]["sparse"] == 3    # then the server's fixed mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_first_batch_threshold_equals_kthvalue(dtype):
    """The first-batch threshold by radix selection is torch.kthvalue's value, ties (a
    post-ReLU input's zeros, rounded low-precision values) and every k included."""
    from sparsefl.nn.powerprop import kth_magnitude

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 9, 9, generator=g) * 3).round().relu().to(dtype)  # many ties
    x.view(-1)[::7] *= -1
    n = x.numel()
    for k in (1, 2, n // 10, n // 2, n - 1, n):
        want = float(x.abs().reshape(-1).kthvalue(n - k + 1).values)
        assert kth_magnitude(x, k) == want, k
    if _native.has_cpu_kernels():
        bad = x.clone()
        bad.view(-1)[5] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            torch.ops.sparsefl_C.kth_magnitude(bad, 3)
        for k in (0, n):
            with pytest.raises(ValueError, match="outside"):
                torch.ops.sparsefl_C.kth_magnitude(x, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["post_relu", "signed", "ties", "clustered", "all_zero"])
@pytest.mark.parametrize("shape", [(16, 16, 14, 14), (2, 8, 20, 20)])
def test_kth_magnitude_count_equals_kthvalue_and_counts(dtype, kind, shape):
    """The per-batch cut (tau, above, at) on inputs large enough for the sampled bracket
    (n >= 4,096; 512 and 100 runs here): torch's k-th largest |x| and its counts, for keep
    fractions across (0, 1], at the nonzero count and around it, and where the sample
    cannot bracket (clustered: a run of large values the sample may miss entirely)."""
    from sparsefl.nn.powerprop import kth_magnitude_count

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    if kind == "post_relu":
        x = x.relu()
    elif kind == "ties":
        x = (x * 2).round()
    elif kind == "clustered":
        x = x.abs() * 1e-3
        x.view(-1)[1000:1064] = torch.arange(64.0) + 5  # 64 large values in one place
    elif kind == "all_zero":
        x = torch.zeros(shape)
    x = x.to(dtype)
    a = x.float().abs().reshape(-1)
    n = a.numel()
    nnz = int(torch.count_nonzero(a))
    ks = {1, 2, 7, 64, 65, n // 20, n // 3, n // 2, n - 1, n, max(nnz, 1), min(nnz + 1, n),
          max(nnz - 1, 1)}
    for k in sorted(ks):
        tau = a.kthvalue(n - k + 1).values
        want = (float(tau), int((a > tau).sum()), int((a == tau).sum()))
        assert kth_magnitude_count(x, k) == want, (kind, k)
        # a caller's bracket (act_cut's previous cut): holding tau, above it, below it,
        # empty, at zero; it changes the time, never the answer
        t = float(tau)
        for hint in ((t, 0.02), (t * 3 + 1, 0.1), (t / 3, 0.1), (t, 0.0), (0.0, 0.5)):
            assert kth_magnitude_count(x, k, hint) == want, (kind, k, hint)


@pytest.mark.parametrize("env", ["SPARSEFL_DISABLE_AVX512", "SPARSEFL_DISABLE_AVX2"])
def test_kth_magnitude_count_on_the_narrower_isas(env):
    """The AVX2 passes (no compress: lanes extracted) and the portable ones give the same."""
    run_with_isa_off(env, "import torch, test_sparse_compute as t\n"
                     "for kind in ('post_relu', 'signed', 'ties', 'clustered', 'all_zero'):\n"
                     "    t.test_kth_magnitude_count_equals_kthvalue_and_counts(torch.float32,"
                     " kind, (16, 16, 14, 14))\n"
                     "t.test_threshold_prune_equals_masked_fill(torch.float32)\nprint('ok')")


def test_kth_magnitude_count_when_the_sample_misleads():
    """White box: zero exactly the entries csrc/cpu/kth_magnitude.cpp samples (its LCG,
    512 runs of 8), so the bracket says "all zero" while most of x is not; the answer must
    still be exact (the fallback selects among every key)."""
    if not _native.has_cpu_kernels():
        pytest.skip("the C++ kernels are not built")
    n = 60000
    x = torch.rand(n) + 0.5
    gap, rng, m64 = n // 512, 0x9e3779b97f4a7c15, (1 << 64) - 1
    for r in range(512):
        rng = (rng * 6364136223846793005 + 1442695040888963407) & m64
        at = r * gap + (rng >> 33) % (gap - 8 + 1)
        x[at:at + 8] = 0
    a = x.abs()
    for k in (10, n // 3, n - 4096, n - 4096 + 1, n - 1):
        tau = a.kthvalue(n - k + 1).values
        want = (float(tau), int((a > tau).sum()), int((a == tau).sum()))
        assert torch.ops.sparsefl_C.kth_magnitude_count(x, k) == want, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_prune_equals_masked_fill(dtype):
    """One pass in C++ = masked_fill(|x| < tau) and its kept count: tau at an
    entry's exact magnitude (kept), between floats, <= 0 (keep all), inf (keep only inf),
    subnormal; NaN entries kept as torch keeps them; a non-contiguous and an empty input."""
    from sparsefl.nn.powerprop import threshold_prune

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 70001, generator=g).relu().to(dtype)  # several parallel parts
    x.view(-1)[::11] *= -1
    x.view(-1)[5] = float("inf")
    x.view(-1)[7] = float("nan")
    x.view(-1)[9] = 1e-40 if dtype != torch.float16 else 1e-7
    exact = float(x.view(-1)[123].abs())
    for tau in (exact, exact + 1e-3, 0.0, -1.0, float("inf"), 1e-41, 0.5):
        out, kept = threshold_prune(x, tau)
        # compared exactly (in float64): torch would round tau to fp16/bf16 first; the
        # packs and this op compare against the real tau (in use tau is a value of x)
        drop = x.double().abs() < tau
        want = x.masked_fill(drop, 0)
        assert kept == x.numel() - int(drop.sum()), tau
        assert torch.equal(out.isnan(), want.isnan()), tau
        assert torch.equal(out.nan_to_num(), want.nan_to_num()), tau
        assert out.dtype == dtype
    xt = x[:, :1000].t()
    out, kept = threshold_prune(xt, 0.5)
    assert torch.equal(out.nan_to_num(), xt.masked_fill(xt.abs() < 0.5, 0).nan_to_num())
    out, kept = threshold_prune(torch.empty(0, 4, dtype=dtype), 0.5)
    assert out.shape == (0, 4) and kept == 0
    if _native.has_cpu_kernels():
        with pytest.raises(ValueError, match="NaN"):
            torch.ops.sparsefl_C.threshold_prune(x, float("nan"))
        with pytest.raises(TypeError, match="not supported"):
            torch.ops.sparsefl_C.threshold_prune(x.double(), 0.5)


def test_kth_magnitude_count_refuses_bad_input():
    if not _native.has_cpu_kernels():
        pytest.skip("the C++ kernels are not built")
    x = torch.randn(40000).relu()
    for k in (0, x.numel() + 1):
        with pytest.raises(ValueError, match="outside"):
            torch.ops.sparsefl_C.kth_magnitude_count(x, k)
    for at in (3, 39999):  # in the sample's reach or not
        bad = x.clone()
        bad[at] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            torch.ops.sparsefl_C.kth_magnitude_count(bad, 100)
    with pytest.raises(TypeError, match="not supported"):
        torch.ops.sparsefl_C.kth_magnitude_count(x.double(), 3)
    for lo, hi in ((0.5, 0.25), (-1.0, 1.0), (math.nan, 1.0), (0.5, math.nan)):
        with pytest.raises(ValueError, match="bracket"):
            torch.ops.sparsefl_C.kth_magnitude_count(x, 100, lo, hi)
    with pytest.raises(ValueError, match="both"):
        torch.ops.sparsefl_C.kth_magnitude_count(x, 100, 0.5)
    # the schemas tell the truth (no hidden mutation or aliasing of x)
    torch.library.opcheck(torch.ops.sparsefl_C.kth_magnitude_count.default, (x, 100),
                          test_utils=("test_schema",))
    torch.library.opcheck(torch.ops.sparsefl_C.threshold_prune.default, (x, 0.5),
                          test_utils=("test_schema",))
    # non-contiguous input: the same answer as its contiguous copy
    y = torch.randn(300, 200).t()
    assert torch.ops.sparsefl_C.kth_magnitude_count(y, 999) == \
        torch.ops.sparsefl_C.kth_magnitude_count(y.contiguous(), 999)


def test_flash_sparse_layers_need_no_mask_hook(tmp_path, monkeypatch):
    """A FLASH layer computing on the fixed mask gets exactly zero gradient off it, so the
    per-step mask changes nothing: step_hook drops it (layers on the dense path keep it),
    and the run ends bit for bit where it ends with the mask applied after every step."""
    from sparsefl.fl import sparsifiers

    hooks = []
    orig = sparsifiers.Flash.step_hook

    def spy(self, model):
        hooks.append(orig(self, model))
        return hooks[-1]

    monkeypatch.setattr(sparsifiers.Flash, "step_hook", spy)
    flash = ["sparsity.method=flash", "sparsity.sparsity=0.8", "client.fused=false"]
    skipped = _run(tmp_path, "skip", [*flash, "client.compute=sparse"])
    assert len(hooks) == 9 and all(h is None for h in hooks)
    hooks.clear()
    _run(tmp_path, "dense", [*flash, "client.compute=dense"])
    assert all(h is None for h in hooks[:3]) and all(h is not None for h in hooks[3:])

    def always(self, model):
        return lambda: self.after_step(model)

    monkeypatch.setattr(sparsifiers.Flash, "step_hook", always)
    masked = _run(tmp_path, "mask", [*flash, "client.compute=sparse"])
    assert [(r["train_loss"], r["acc"]) for r in skipped.rounds] == \
        [(r["train_loss"], r["acc"]) for r in masked.rounds]


def test_flash_mlp_trains_fused(tmp_path, monkeypatch):
    """With no per-step hook left, a FLASH MLP on its fixed mask trains fused
    (sparse_mlp_sgd) like SparsyFed's; the same run as the step loop to tolerance."""
    from sparsefl.fl import client

    runs = []
    orig = client.fused_sgd
    monkeypatch.setattr(client, "fused_sgd", lambda m: runs.append(orig(m)) or runs[-1])
    flash = ["sparsity.method=flash", "sparsity.sparsity=0.8", "client.compute=sparse"]
    loop = _run(tmp_path, "loop", [*flash, "client.fused=false"])
    assert not runs
    fused = _run(tmp_path, "fused", flash)
    assert [r is not None for r in runs] == [False] * 3 + [True] * 6  # from the mask on
    for a, b in zip(loop.rounds, fused.rounds):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * max(1.0, abs(a["train_loss"]))
        assert abs(a["acc"] - b["acc"]) <= 0.02


def test_mlp_default_model_sparse():
    torch.manual_seed(0)
    m = sparsify(MLP((1, 8, 8), 10, (16, 16)), 1.25)
    assert set(set_compute(m, "sparse").values()) == {"sparse"}


# -- an MLP's forward as one op (torch.ops.sparsefl_C.sparse_chain) -----------------------

def _step_grads(m, x, y):
    m.zero_grad(set_to_none=True)
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    return loss.detach(), [p.grad for p in m.parameters()]


@pytest.mark.parametrize("hidden", [(16, 12), (20,), (9, 8, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", [1.0, 0.4])
@pytest.mark.parametrize("batch", [1, 16, 35])
def test_chain_equals_layer_by_layer(hidden, bias, act, batch):
    """The chain op is the layers' own ops in one call: bit for bit the same loss and
    gradients as the layer-by-layer sparse path."""
    m = pruned_mlp(hidden, bias, act=act)
    set_compute(m, "sparse")
    assert "_sparse_chain" in m.__dict__
    ref = copy.deepcopy(m)
    ref.__dict__.pop("_sparse_chain")
    x, y = torch.randn(batch, 1, 6, 6), torch.randint(0, 5, (batch,))
    la, ga = _step_grads(m, x, y)
    lb, gb = _step_grads(ref, x, y)
    assert torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


def test_chain_steps_aside_for_hooks_and_replaced_weights():
    m = pruned_mlp()
    set_compute(m, "sparse")
    x = torch.randn(4, 1, 6, 6)
    from sparsefl.nn.sparse_compute import chain_forward

    assert chain_forward(m, x) is not None
    seen = []
    h = m[1].register_forward_hook(lambda mod, a, out: seen.append(out.shape))
    assert chain_forward(m, x) is None
    m(x)
    assert seen == [torch.Size([4, 16])]  # the hook saw its layer run
    h.remove()
    m[3].weight = nn.Parameter(m[3].weight.detach().clone())  # same support, new tensor
    assert chain_forward(m, x) is None  # not the weight the chain was built on
    m(x).sum().backward()
    assert m[3].weight.grad is not None
    set_compute(m, "sparse")
    assert chain_forward(m, x) is not None
    m[1].bias = nn.Parameter(m[1].bias.detach() + 1.0)  # a replaced bias, like a weight
    assert chain_forward(m, x) is None
    with torch.no_grad():
        ref = copy.deepcopy(m)
        set_compute(ref, "dense")
        torch.testing.assert_close(m(x), ref(x))  # the new bias is used
    set_compute(m, "dense")
    assert "_sparse_chain" not in m.__dict__


def test_chain_refuses_bad_arguments():
    m = pruned_mlp()
    set_compute(m, "sparse")
    ls = [m[1], m[3], m[5]]
    w, b = [mod.weight for mod in ls], [mod.bias for mod in ls]
    betas, plans = [1.25] * 3, [mod._spec.plan_id for mod in ls]
    op = torch.ops.sparsefl_C.sparse_chain
    x = torch.randn(4, 36)
    with pytest.raises(ValueError, match="one entry per layer"):
        op(x, w, b[:2], betas, plans, [-1] * 3, True)
    with pytest.raises(ValueError, match="takes 36 features but gets 35"):
        op(torch.randn(4, 35), w, b, betas, plans, [-1] * 3, True)
    with pytest.raises(ValueError, match="2-D"):
        op(torch.randn(4, 6, 6), w, b, betas, plans, [-1] * 3, True)
    with pytest.raises(ValueError, match="no sparse plan"):
        op(x, w, b, betas, [10**9] * 3, [-1] * 3, True)


@pytest.mark.parametrize("sets", [["sparsity.method=topk"], ["sparsity.method=none"],
                                  ["sparsity.method=none", "decentralized.strategy=diffusion"]],
                         ids=["topk", "none", "decentralized"])
def test_compute_sparse_without_a_support_is_said_once_with_the_reason(tmp_path, sets, caplog):
    cfg = flconfig.load(None, ["run.rounds=2", "data.clients=4", "server.clients_per_round=2",
                               "client.epochs=1", "client.compute=sparse", *sets])
    with caplog.at_level("WARNING", logger="sparsefl"):
        hist = engine.run(cfg, tmp_path / "run")
    said = [r for r in caplog.records if "client.compute = 'sparse'" in r.getMessage()]
    assert len(said) == 1 and "no fixed support" in said[0].getMessage()
    assert "all layers" in hist.rounds[-1]["dense_layers"]
    assert "all layers" in hist.final["dense_layers"]


def test_layers_left_dense_by_strict_false_are_named(tmp_path, caplog):
    """FLASH's round 1 is dense (beta = 1, no mask yet): under compute = sparse the engine
    names each layer that ran dense and why, in the log (once) and in summary.json."""
    cfg = flconfig.load(None, ["run.rounds=2", "data.clients=4", "server.clients_per_round=2",
                               "client.epochs=1", "client.compute=sparse",
                               "sparsity.method=flash", "sparsity.beta=1.0"])
    with caplog.at_level("WARNING", logger="sparsefl"):
        hist = engine.run(cfg, tmp_path / "run")
    dense = hist.final.get("dense_layers", {})
    said = [r.getMessage() for r in caplog.records if "runs dense" in r.getMessage()]
    assert dense and len(said) == len(dense)
    assert all(why.startswith("from round 1: beta = 1") for why in dense.values())
    assert all(hist.rounds[0]["compute_layers"][n] == "dense" for n in dense)
    # round 2 has FLASH's fixed mask: the same layers compute sparse, and nothing new is said
    assert set(hist.rounds[1]["compute_layers"].values()) == {"sparse"}


def test_no_sparse_kernel_off_the_cpu_is_refused_or_dense_never_labelled_sparse():
    m = PowerpropLinear(8, 4)
    with torch.no_grad():
        m.weight.mul_(ops.topk_mask(m.weight, 0.5))
    m = m.to("meta")
    from sparsefl.nn.sparse_compute import unsupported

    assert "C++ CPU kernels" in unsupported(m)
    net = nn.Sequential(m)
    with pytest.raises(ValueError, match="C\\+\\+ CPU kernels"):
        set_compute(net, "sparse")
    assert set_compute(net, "sparse", strict=False) == {"0": "dense"}
    assert set_compute(net, "auto", strict=False) == {"0": "dense"}
