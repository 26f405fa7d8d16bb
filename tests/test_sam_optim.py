"""sparsefl.optim.SAM / ASAM against the algorithms they replace, written out eagerly here.

EagerSAM follows the davda54/sam algorithm (global norm over all groups, per-group rho
and adaptive, clone-and-copy-back restore); EagerASAM follows the SamsungLabs ASAM
algorithm (|w|+eta on "weight" tensors only, eps 1e-16, restore by p -= e).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_backends
from torch import nn

from sparsefl.optim import ASAM, SAM

BACKENDS = cpu_backends()


class EagerSAM:
    def __init__(self, param_groups, base_cls, rho, adaptive, **kw):
        self.groups = [dict(params=list(g), rho=rho, adaptive=adaptive) for g in param_groups]
        self.base = base_cls([{"params": g["params"]} for g in self.groups], **kw)
        self.old = {}

    @torch.no_grad()
    def first_step(self):
        norms = [((p.abs() if g["adaptive"] else 1.0) * p.grad).norm(p=2)
                 for g in self.groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.norm(torch.stack(norms), p=2)
        for g in self.groups:
            scale = g["rho"] / (grad_norm + 1e-12)
            for p in g["params"]:
                if p.grad is None:
                    continue
                self.old[p] = p.data.clone()
                p.add_((torch.pow(p, 2) if g["adaptive"] else 1.0) * p.grad * scale.to(p))
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p, old in self.old.items():
            p.data = old
        self.base.step()
        self.base.zero_grad()


class EagerASAM:
    def __init__(self, optimizer, model, rho, eta):
        self.optimizer, self.model, self.rho, self.eta = optimizer, model, rho, eta
        self.eps = {}

    @torch.no_grad()
    def ascent_step(self):
        t = {}
        norms = []
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            t[p] = p.abs() + self.eta if "weight" in n else torch.ones_like(p)
            norms.append(torch.norm(t[p] * p.grad, p=2))
        norm = torch.norm(torch.stack(norms), p=2) + 1e-16
        for p, tw in t.items():
            e = tw * tw * p.grad * (self.rho / norm)
            p.add_(e)
            self.eps[p] = e
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self):
        for p, e in self.eps.items():
            p.sub_(e)
        self.optimizer.step()
        self.optimizer.zero_grad()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def batches(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 14, 14, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def sam_step(model, opt, x, y):
    """One SAM step the davda54 way: backward, first_step, backward, second_step."""
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def assert_models_close(a, b, rtol=1e-5):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
@pytest.mark.parametrize("restore", ["swap", "copy"])
def test_sam_matches_davda54_algorithm_over_20_steps(backend, adaptive, rho, restore):
    ours, theirs = small_cnn(), small_cnn()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.05,
              momentum=0.9, weight_decay=5e-4, restore=restore, backend=backend)
    ref = EagerSAM([theirs.parameters()], torch.optim.SGD, rho, adaptive, lr=0.05, momentum=0.9,
                   weight_decay=5e-4)
    for x, y in batches():
        sam_step(ours, opt, x, y)
        loss_of(theirs, x, y).backward()
        ref.first_step()
        loss_of(theirs, x, y).backward()
        ref.second_step()
    assert_models_close(ours, theirs)
    with torch.no_grad():
        moved = sum(float((p - q).abs().sum()) for p, q in zip(ours.parameters(),
                                                                  small_cnn().parameters()))
    assert moved > 1.0  # the comparison is not between two models that never trained


@pytest.mark.parametrize("backend", BACKENDS)
def test_asam_matches_official_algorithm_over_20_steps(backend):
    ours, theirs = small_cnn(), small_cnn()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    minimizer = ASAM(opt_a, ours, rho=0.5, eta=0.01, backend=backend)
    ref = EagerASAM(opt_b, theirs, rho=0.5, eta=0.01)
    for x, y in batches():
        loss_of(ours, x, y).backward()
        minimizer.ascent_step()
        loss_of(ours, x, y).backward()
        minimizer.descent_step()
        loss_of(theirs, x, y).backward()
        ref.ascent_step()
        loss_of(theirs, x, y).backward()
        ref.descent_step()
    assert_models_close(ours, theirs)


def test_step_with_closure_equals_first_and_second_step():
    a, b = small_cnn(), small_cnn()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in batches(5):
        sam_step(a, opt_a, x, y)
        loss_of(b, x, y).backward()
        opt_b.step(lambda x=x, y=y: loss_of(b, x, y).backward())
        opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="closure"):
        opt_b.step()


def test_param_groups_with_own_rho_and_params_without_grad():
    ours, theirs = small_cnn(), small_cnn()
    for m in (ours, theirs):
        m[0].bias.requires_grad_(False)  # never gets a gradient: must be skipped
    groups = lambda m: [  # noqa: E731
        {"params": list(m[0].parameters()) + list(m[1].parameters()), "rho": 0.2},
        {"params": [p for i, mod in enumerate(m) if i > 1 for p in mod.parameters()]},
    ]
    opt = SAM(groups(ours), torch.optim.SGD, rho=0.05, lr=0.05)
    ref_groups = groups(theirs)
    ref = EagerSAM([g["params"] for g in ref_groups], torch.optim.SGD, 0.05, False, lr=0.05)
    ref.groups[0]["rho"] = 0.2
    frozen = ours[0].bias.clone()
    for x, y in batches(10):
        sam_step(ours, opt, x, y)
        loss_of(theirs, x, y).backward()
        ref.first_step()
        loss_of(theirs, x, y).backward()
        ref.second_step()
    assert torch.equal(ours[0].bias, frozen)
    assert_models_close(ours, theirs)


def test_state_dict_round_trip_resumes_exactly():
    data = batches(10)

    def train(model, opt, part):
        for x, y in part:
            sam_step(model, opt, x, y)

    full = small_cnn()
    opt_full = SAM(full.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.05,
                   momentum=0.9)
    train(full, opt_full, data)

    first = small_cnn()
    opt_first = SAM(first.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.05,
                    momentum=0.9)
    train(first, opt_first, data[:5])
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt_first.state_dict())
    assert any("momentum_buffer" in s for s in saved_opt["state"].values())

    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt_resumed = SAM(resumed.parameters(), torch.optim.SGD, rho=0.5, lr=1.0, momentum=0.9)
    opt_resumed.load_state_dict(saved_opt)
    assert opt_resumed.param_groups[0]["rho"] == 0.1
    assert opt_resumed.base_optimizer.param_groups[0]["lr"] == 0.05
    train(resumed, opt_resumed, data[5:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_non_finite_gradient_raises_and_keeps_weights():
    model = small_cnn()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    next(model.parameters()).grad[0, 0, 0, 0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="gradient norm is nan"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # AMP-style: no raise, no perturbation, the norm is reported
    opt.check_finite = False
    opt.first_step()
    assert not torch.isfinite(opt.last_grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.restore()


def test_perturb_twice_without_restore_is_an_error():
    model = small_cnn()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="already perturbed"):
        opt.first_step()
    opt.second_step()


def test_bad_constructor_arguments():
    model = small_cnn()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="restore"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, restore="teleport")
    with pytest.raises(ValueError, match="rho and eta"):
        ASAM(torch.optim.SGD(model.parameters(), lr=0.1), model, eta=-1.0)


def test_grad_scaler_recipe_matches_unscaled_training():
    """The documented AMP recipe (scaled grads into first_step) equals fp32 SAM."""
    a, b = small_cnn(), small_cnn()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, check_finite=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches(5):
        sam_step(a, opt_a, x, y)
        scaler.scale(loss_of(b, x, y)).backward()
        opt_b.first_step(zero_grad=True)
        scaler.scale(loss_of(b, x, y)).backward()
        opt_b.restore()
        scaler.step(opt_b.base_optimizer)
        scaler.update()
        opt_b.zero_grad()
    assert_models_close(a, b, rtol=1e-4)


@pytest.mark.parametrize("restore", ["swap", "copy"])
def test_two_direction_perturbation_and_exact_restore(restore):
    """The Agnostic-SAM step through the optimizer layer, both restore modes."""
    from sparsefl import ops
    from sparsefl.optim._perturbation import Perturbation

    model = small_cnn()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(9)
    g1 = [torch.randn(p.shape, generator=g) for p in params]
    g2 = [torch.randn(p.shape, generator=g) for p in params]
    original = [p.detach().clone() for p in params]
    want = [torch.empty_like(p) for p in original]
    ops.two_dir_perturb(original, g1, g2, want, 0.05, 0.02, backend="reference")
    pert = Perturbation(restore=restore)
    pert.apply(params, g1, [0.05] * len(params), [False] * len(params), 0.0, 1e-12,
               grads2=g2, rho2=0.02)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w)
    pert.restore()
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, original))
