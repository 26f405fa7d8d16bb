"""Power iteration and Hutchinson against an explicit Hessian (issue #5, acceptance 2)."""

import torch
from torch import nn
from torch.nn import functional as F

from sparsefl import analysis
from sparsefl import nn as snn


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, x, y


def _explicit_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def test_top_eigenvalue_and_trace_match_the_explicit_hessian():
    model, x, y = _setup()
    h = _explicit_hessian(model, x, y)
    eigs = torch.linalg.eigvalsh(h)
    top = eigs[eigs.abs().argmax()]
    probe = analysis.HessianProbe(model, [(x[:25], y[:25]), (x[25:], y[25:])])
    assert abs(probe.top_eigenvalue(iters=500, tol=1e-10) - float(top)) <= 0.01 * abs(float(top))
    assert abs(probe.trace(samples=3000) - float(h.trace())) <= 0.05 * abs(float(h.trace()))


def test_powerprop_models_are_analysed_in_theta():
    model, x, y = _setup(1)
    plain = analysis.plain_copy(model)
    pp = snn.sparsify(model, 1.5)
    copy = analysis.plain_copy(pp)
    assert not any(isinstance(m, (snn.PowerpropLinear, snn.PowerpropConv2d))
                   for m in copy.modules())
    torch.testing.assert_close(copy(x), plain(x))
