"""Powerprop layers, activation pruning and the sparsify converter vs plain torch."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsefl import nn as snn
from sparsefl import ops


@pytest.mark.parametrize("beta", [1.0, 1.125, 1.25, 1.5, 2.0, 3.0])
def test_powerprop_matches_reference_and_kills_gradient_at_zero(beta):
    w = torch.randn(500, dtype=torch.float64)
    w[::7] = 0.0
    a = w.clone().requires_grad_()
    b = w.clone().requires_grad_()
    snn.powerprop(a, beta).pow(2).sum().backward()
    (b.sign() * b.abs().pow(beta)).pow(2).sum().backward()
    torch.testing.assert_close(snn.powerprop(w, beta), w.sign() * w.abs().pow(beta))
    torch.testing.assert_close(a.grad, b.grad)
    if beta > 1:
        assert torch.all(a.grad[::7] == 0)


def test_init_keeps_the_usual_scale():
    torch.manual_seed(0)
    plain = nn.Linear(300, 300)
    torch.manual_seed(0)
    pp = snn.PowerpropLinear(300, 300, beta=1.25)
    torch.testing.assert_close(snn.powerprop(pp.weight, 1.25), plain.weight)


def test_sparsify_preserves_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(4, 3, 6, 6)
    before = model(x)
    snn.sparsify(model, 1.5)
    assert isinstance(model[0], snn.PowerpropConv2d) and isinstance(model[4], snn.PowerpropLinear)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in snn.prunable(model)] == ["0.weight", "4.weight"]
    with pytest.raises(ValueError, match="beta"):
        snn.sparsify(model, 0.5)


def _pruned(x, density):
    idx, val = ops.topk_compress(x.detach(), density)
    return torch.zeros(x.numel()).index_copy_(0, idx, val).view_as(x)


@pytest.mark.parametrize("density", [1.0, 0.3, 0.05, 0.0])
def test_activation_pruning_linear_gradients(density):
    torch.manual_seed(1)
    layer = snn.PowerpropLinear(20, 7, beta=1.25)
    layer.act_density = density
    x = torch.randn(6, 20, requires_grad=True)
    gy = torch.randn(6, 7)
    layer(x).backward(gy)
    theta = snn.powerprop(layer.weight, 1.25).detach()
    t = layer.weight.detach().abs().pow(0.25)
    xp = _pruned(x, density)
    torch.testing.assert_close(x.grad, gy @ theta)  # dL/dx stays dense
    torch.testing.assert_close(layer.weight.grad, (gy.t() @ xp) * 1.25 * t)
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))


@pytest.mark.parametrize("density", [1.0, 0.2])
def test_activation_pruning_conv_gradients(density):
    torch.manual_seed(2)
    layer = snn.PowerpropConv2d(3, 4, 3, stride=2, padding=1, beta=2.0)
    layer.act_density = density
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    theta = snn.powerprop(layer.weight, 2.0).detach().requires_grad_()
    xp = _pruned(x, density).requires_grad_()
    F.conv2d(xp, theta, layer.bias.detach(), 2, 1).backward(gy)
    torch.testing.assert_close(layer.weight.grad, theta.grad * 2.0 * layer.weight.detach().abs())
    x2 = x.detach().clone().requires_grad_()
    F.conv2d(x2, theta.detach(), layer.bias.detach(), 2, 1).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_eval_does_not_prune_and_set_activation_density():
    torch.manual_seed(3)
    model = snn.sparsify(nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)), 1.25)
    with torch.no_grad():
        model[0].weight[:, :5] = 0
    snn.set_activation_density(model)
    assert model[0].act_density == 0.5 and model[2].act_density == 1.0
    assert snn.layer_sparsity(model) == {"0.weight": 0.5, "2.weight": 0.0}
    x = torch.randn(3, 10)
    model.eval()
    with torch.no_grad():
        ref = F.linear(F.relu(F.linear(x, snn.powerprop(model[0].weight, 1.25), model[0].bias)),
                       snn.powerprop(model[2].weight, 1.25), model[2].bias)
    torch.testing.assert_close(model(x), ref)
    snn.set_activation_density(model, enabled=False)
    assert model[0].act_density == 1.0
