"""The SparsyFed authors' options: LeCun-normal init drawn in theta, and conv layers that
reuse the activation threshold of the round's first batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsefl.fl import config as flconfig
from sparsefl.models import ResNet18
from sparsefl.models.init import apply_init, lecun_normal_
from sparsefl.nn import set_activation_density, set_compute, sparsify
from sparsefl.nn.powerprop import PowerpropConv2d, PowerpropLinear, act_keep, powerprop


def test_lecun_normal_std_truncation_and_zero_bias():
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    lecun_normal_(lin)
    w = lin.weight.detach()
    std = 1 / math.sqrt(400)
    assert abs(float(w.std()) - std) / std < 0.02
    assert float(w.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-7
    assert torch.count_nonzero(lin.bias) == 0
    conv = nn.Conv2d(16, 32, 3)
    lecun_normal_(conv)
    std = 1 / math.sqrt(16 * 9)
    assert abs(float(conv.weight.std()) - std) / std < 0.05


def test_lecun_normal_is_drawn_for_theta_under_powerprop():
    torch.manual_seed(1)
    model = apply_init(nn.Sequential(nn.Linear(256, 128)), "lecun_normal")
    theta = model[0].weight.detach().clone()
    sparsify(model, beta=1.25)
    assert isinstance(model[0], PowerpropLinear)
    torch.testing.assert_close(powerprop(model[0].weight, 1.25), theta, rtol=1e-5, atol=1e-7)


def test_unknown_init_and_threshold_are_refused():
    with pytest.raises(ValueError, match="unknown init"):
        apply_init(nn.Linear(2, 2), "xavier")
    with pytest.raises(flconfig.ConfigError, match="model.init"):
        flconfig.load(None, overrides=["model.init=xavier"])
    with pytest.raises(flconfig.ConfigError, match="sparsity.act_threshold"):
        flconfig.load(None, overrides=["sparsity.act_threshold=last"])
    with pytest.raises(ValueError, match="threshold"):
        set_activation_density(nn.Sequential(PowerpropLinear(2, 2)), threshold="x")


def _conv(density: float) -> PowerpropConv2d:
    torch.manual_seed(2)
    m = PowerpropConv2d(4, 8, 3, padding=1, bias=False, beta=1.25)
    with torch.no_grad():
        m.weight.mul_((torch.rand_like(m.weight) < density).float())
    return m


def test_first_batch_threshold_fixes_tau_then_counts():
    m = _conv(0.1)
    set_activation_density(nn.Sequential(m), threshold="first_batch")
    d = m.act_density
    x1 = torch.randn(8, 4, 10, 10)
    k1 = act_keep(m, x1)
    tau = m.act_tau
    # the first batch keeps its top-k (no ties in random data) and fixes tau there
    assert k1 == x1.numel() - round((1 - d) * x1.numel())
    assert float(x1.abs().flatten().sort(descending=True).values[k1 - 1]) == tau
    x2 = 3 * torch.randn(8, 4, 10, 10)  # a larger-scale batch keeps more under the same tau
    assert act_keep(m, x2) == int((x2.abs() >= tau).sum())
    assert act_keep(m, x2) > k1
    assert m.act_tau == tau
    set_activation_density(nn.Sequential(m), threshold="first_batch")  # a new round
    assert m.act_tau is None


def test_per_batch_and_linear_layers_ignore_the_threshold():
    m = _conv(0.1)
    set_activation_density(nn.Sequential(m))
    x = 3 * torch.randn(2, 4, 6, 6)
    assert act_keep(m, x) == x.numel() - round((1 - m.act_density) * x.numel())
    assert m.act_tau is None
    lin = PowerpropLinear(16, 4)
    set_activation_density(nn.Sequential(lin), threshold="first_batch")
    assert act_keep(lin, torch.randn(3, 16)) == 48 - round((1 - lin.act_density) * 48)
    assert lin.act_tau is None


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_first_batch_gradients_use_the_threshold_set(mode):
    """The weight gradient of a later batch is the dense gradient of that batch's input
    masked to |x| >= tau of the first batch (both compute paths)."""
    m = _conv(0.2)
    model = nn.Sequential(m)
    set_activation_density(model, threshold="first_batch")
    set_compute(model, mode)
    m.train()
    m(torch.randn(4, 4, 8, 8)).sum().backward()  # the first batch: tau fixed
    tau = m.act_tau
    m.weight.grad = None
    x = 2 * torch.randn(4, 4, 8, 8)
    gy = torch.randn(4, 8, 8, 8)
    (m(x) * gy).sum().backward()
    xm = (x * (x.abs() >= tau)).double()
    w = powerprop(m.weight.detach(), m.beta)
    slope = m.beta * m.weight.detach().double().abs() ** (m.beta - 1)
    ref = torch.nn.grad.conv2d_weight(xm, w.shape, gy.double(), padding=1) * slope
    # each entry is a float32 sum of 256 products, in an order of the kernel's choosing:
    # the bound is fp32 rounding of that sum (of its absolute terms), not a fixed atol
    terms = torch.nn.grad.conv2d_weight(xm.abs(), w.shape, gy.double().abs(), padding=1) * slope
    err = (m.weight.grad.double() - ref).abs()
    assert bool((err <= 32 * 2.0**-24 * terms + 1e-12).all()), float((err / terms).max())


def test_calibration_does_not_set_the_threshold():
    model = sparsify(ResNet18((1, 12, 12), 10, width=4), 1.25)
    for p in model.parameters():
        if p.dim() > 1:
            with torch.no_grad():
                p.mul_((torch.rand_like(p) < 0.1).float())
    set_activation_density(model, threshold="first_batch")
    set_compute(model, "auto", sample=torch.randn(2, 1, 12, 12))
    assert all(m.act_tau is None for m in model.modules() if isinstance(m, PowerpropConv2d))


def test_engine_options_reach_the_model(tmp_path):
    from sparsefl.fl.engine import Simulation

    cfg = flconfig.load(None, overrides=["model.init=lecun_normal", "sparsity.method=sparsyfed",
                                         "sparsity.act_threshold=first_batch", "run.rounds=1",
                                         "data.clients=4", "server.clients_per_round=2"])
    sim = Simulation(cfg)
    w = powerprop(sim.model[1].weight.detach(), cfg.sparsity.beta)
    std = 1 / math.sqrt(sim.model[1].in_features)
    assert abs(float(w.std()) - std) / std < 0.05
    assert torch.count_nonzero(sim.model[1].bias) == 0
    sim.sparsifier.begin_client(sim.model, 1)
    assert sim.model[1].act_threshold == "first_batch"


@pytest.mark.parametrize("threshold", ["per_batch", "first_batch"])
@pytest.mark.parametrize("density", [0.1, 0.6])  # saved compressed / dense and masked
@pytest.mark.parametrize("stride", [1, 2])
def test_dense_path_gradients_match_plain_torch(threshold, density, stride):
    """The dense Powerprop path (one convolution_backward for dx, dw and the bias): dx from
    theta, dw from the pruned input, db from dy -- equal to plain torch on the same
    pruned input, whether the input was kept dense and masked or compressed."""
    torch.manual_seed(4)
    m = PowerpropConv2d(4, 6, 3, stride=stride, padding=1, bias=True, beta=1.25)
    with torch.no_grad():
        m.weight.mul_((torch.rand_like(m.weight) < density).float())
    set_activation_density(nn.Sequential(m), threshold=threshold)
    m.act_density = density
    m.train()
    m(torch.randn(5, 4, 9, 9)).sum().backward()  # the first batch (fixes tau)
    m.zero_grad()
    x = (2 * torch.randn(5, 4, 9, 9)).requires_grad_(True)
    y = m(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    if threshold == "first_batch":
        keep = x.detach().abs() >= m.act_tau
    else:
        idx = torch.ops.sparsefl.topk_compress([x.detach()], [], act_keep(m, x), "reference")[0]
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        keep[idx] = True
        keep = keep.view(x.shape)
    theta = powerprop(m.weight.detach(), m.beta)
    xr = x.detach().clone().requires_grad_(True)
    yr = nn.functional.conv2d(xr, theta, m.bias.detach(), stride, 1)
    torch.testing.assert_close(y, yr)
    dx_ref, = torch.autograd.grad((yr * gy).sum(), xr)
    dtheta = torch.nn.grad.conv2d_weight(x.detach() * keep, theta.shape, gy, stride, 1)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        m.weight.grad, dtheta * m.beta * m.weight.detach().abs() ** (m.beta - 1),
        rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.bias.grad, gy.sum((0, 2, 3)))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_per_batch_cut_among_zeros_keeps_the_input_without_a_selection(mode):
    """A post-ReLU input with fewer nonzeros than the top k: the k largest are every
    nonzero plus some zeros, so the pruned input is x itself; act_cut says so (k = -1)
    and both paths give the unpruned weight gradient."""
    from sparsefl.nn.powerprop import act_cut

    torch.manual_seed(5)
    m = PowerpropConv2d(4, 6, 3, padding=1, bias=False, beta=1.25)
    with torch.no_grad():
        m.weight.mul_((torch.rand_like(m.weight) < 0.5).float())
    set_activation_density(nn.Sequential(m))
    m.act_density = 0.8
    x = torch.relu(torch.randn(5, 4, 9, 9))  # ~50% zeros: the 80% cut falls among them
    assert act_cut(m, x) == (-1, None) and act_keep(m, x) == int(torch.count_nonzero(x))
    dense_x = torch.randn(5, 4, 9, 9)  # no zeros, no ties: the top k are |x| >= tau
    k = dense_x.numel() - round(0.2 * dense_x.numel())
    tau = float(dense_x.abs().reshape(-1).kthvalue(dense_x.numel() - k + 1).values)
    assert act_cut(m, dense_x) == (-1, tau) and act_keep(m, dense_x) == k
    tied = (dense_x.abs() * 4).ceil()  # no zeros, few values: a tie split at the k-th
    assert act_cut(m, tied) == (k, None) and act_keep(m, tied) == k
    set_compute(nn.Sequential(m), mode)
    m.train()
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    theta = powerprop(m.weight.detach(), m.beta)
    dtheta = torch.nn.grad.conv2d_weight(x, theta.shape, gy, 1, 1)
    torch.testing.assert_close(
        m.weight.grad, dtheta * m.beta * m.weight.detach().abs() ** (m.beta - 1),
        rtol=1e-4, atol=1e-6)
