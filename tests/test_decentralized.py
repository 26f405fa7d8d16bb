"""Diffusion, consensus and centralized training; topologies (issue #5, acceptance 1)."""

import pytest
import torch

from sparsefl import data, fl
from sparsefl.fl import decentralized, topology

DIGITS = data.load("digits")


@pytest.mark.parametrize("kind", topology.KINDS)
@pytest.mark.parametrize("agents", [1, 2, 5, 12])
def test_every_topology_gives_a_doubly_stochastic_matrix(kind, agents):
    adj = topology.graph(kind, agents, p=0.5, seed=agents)
    assert (adj == adj.T).all() and not adj.diagonal().any()
    a = topology.metropolis(adj)
    ones = torch.ones(agents, dtype=torch.float64)
    torch.testing.assert_close(a.sum(0), ones)
    torch.testing.assert_close(a.sum(1), ones)
    assert (a >= 0).all()
    if agents > 1:
        assert topology._connected(adj)


def test_bad_combination_matrices_and_topologies_are_refused():
    with pytest.raises(ValueError, match="doubly stochastic"):
        topology.check_combination(torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    with pytest.raises(ValueError, match="negative"):
        topology.check_combination(torch.tensor([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="unknown topology"):
        topology.graph("star", 4)


def _cfg(strategy, topo="complete", agents=4, rounds=1):
    return fl.load(None, [f"decentralized.strategy={strategy}", f"decentralized.topology={topo}",
                          "sparsity.method=none", f"data.clients={agents}", "model.hidden=[16]",
                          "client.lr=0.2", "client.batch_size=20", "client.weight_decay=0.001",
                          f"run.rounds={rounds}"])


def test_one_diffusion_iteration_on_a_complete_graph_is_the_centralized_iterate():
    diff = decentralized.DecentralizedSimulation(_cfg("diffusion"), DIGITS)
    cent = decentralized.DecentralizedSimulation(_cfg("centralized"), DIGITS)
    torch.testing.assert_close(diff.a, torch.full((4, 4), 0.25, dtype=torch.float64))
    diff.step()
    cent.step()
    for k in range(4):
        torch.testing.assert_close(diff.w[k], cent.w[0], rtol=1e-6, atol=1e-7)


def _quadratic(agents=5, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qs, bs = [], []
    for _ in range(agents):
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        qs.append(m @ m.t() / n + 0.5 * torch.eye(n, dtype=torch.float64))
        bs.append(torch.randn(n, generator=gen, dtype=torch.float64))
    w_star = torch.linalg.solve(sum(qs), sum(q @ b for q, b in zip(qs, bs)))
    return qs, bs, w_star


@pytest.mark.parametrize("step", [decentralized.diffusion_step, decentralized.consensus_step])
def test_diffusion_and_consensus_converge_to_the_quadratic_minimiser(step):
    qs, bs, w_star = _quadratic()
    a = topology.metropolis(topology.graph("ring", 5))
    errors = []
    for mu in (0.005, 0.001):
        w = torch.zeros(5, 4, dtype=torch.float64)
        for _ in range(int(40 / mu)):
            grads = torch.stack([q @ (w[k] - b) for k, (q, b) in enumerate(zip(qs, bs))])
            w = step(w, grads, a, mu)
        errors.append(float((w - w_star).norm(dim=1).max() / w_star.norm()))
    # constant steps converge to an O(mu) neighbourhood of w*: small, and linear in mu
    assert errors[1] < 0.01 and 3 < errors[0] / errors[1] < 7


def test_engine_steps_match_the_plain_tensor_reference():
    sim = decentralized.DecentralizedSimulation(_cfg("diffusion", "ring", agents=5), DIGITS)
    w0 = sim.w.clone()
    outs = [sim._grad(w0[k], k, 1) for k in range(5)]
    g = torch.stack([o[1] for o in outs])
    sim.step()
    torch.testing.assert_close(sim.w, decentralized.diffusion_step(w0.double(), g.double(),
                                                                   sim.a, 0.2).float(),
                               rtol=1e-6, atol=1e-7)
    sim = decentralized.DecentralizedSimulation(_cfg("consensus", "grid", agents=6), DIGITS)
    w0 = sim.w.clone()
    w0 += 0.01 * torch.randn_like(w0)  # start apart, so the combine matters
    sim.w = w0.clone()
    g = torch.stack([sim._grad(w0[k], k, 1)[1] for k in range(6)])
    sim.step()
    torch.testing.assert_close(sim.w, decentralized.consensus_step(w0.double(), g.double(),
                                                                   sim.a, 0.2).float(),
                               rtol=1e-5, atol=1e-6)


def test_decentralized_run_counts_bytes_and_resumes_bit_identically(tmp_path):
    cfg = _cfg("diffusion", "ring", agents=4, rounds=4)
    full = fl.run(cfg, tmp_path / "a", progress=False, dataset=DIGITS)
    fl.run(cfg, tmp_path / "b", progress=False, dataset=DIGITS, stop_after=2)
    resumed = fl.run(cfg, tmp_path / "b", resume=True, progress=False, dataset=DIGITS)
    assert torch.equal(full.global_flat, resumed.global_flat)
    assert full.rounds[-1]["bytes_up"] > 4 * 2 * 4 * full.simulation.layout.numel
    with pytest.raises(fl.ConfigError, match="decentralized"):
        decentralized.DecentralizedSimulation(
            fl.load(None, ["decentralized.strategy=diffusion", "sparsity.method=topk"]), DIGITS)


@pytest.mark.parametrize("strategy", ["diffusion", "consensus"])
def test_multi_process_mode_gives_the_in_process_iterates(tmp_path, strategy):
    from sparsefl.fl.distributed import run_distributed

    cfg = _cfg(strategy, "ring", agents=3, rounds=5)
    sim = decentralized.DecentralizedSimulation(cfg, DIGITS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each agent process runs: same matmul reduction order
    try:
        for _ in range(5):
            sim.step()
    finally:
        torch.set_num_threads(threads)
    w = run_distributed(cfg, tmp_path)
    assert torch.equal(w, sim.w)


def test_compressed_exchange_counts_fewer_bytes_and_still_learns(tmp_path):
    dense = _cfg("diffusion", "ring", agents=4, rounds=12)
    sparse = fl.load(None, [
        "decentralized.strategy=diffusion", "decentralized.topology=ring",
        "decentralized.density=0.2", "sparsity.method=none", "data.clients=4",
        "model.hidden=[16]", "client.lr=0.2", "client.batch_size=20",
        "client.weight_decay=0.001", "run.rounds=12"])
    d = fl.run(dense, tmp_path / "d", progress=False, dataset=DIGITS)
    s = fl.run(sparse, tmp_path / "s", progress=False, dataset=DIGITS)
    assert s.rounds[-1]["bytes_up"] < 0.3 * d.rounds[-1]["bytes_up"]
    assert s.final["acc"] > 0.5 and abs(s.final["acc"] - d.final["acc"]) < 0.1
    sim = s.simulation  # the public copies track the shared vectors (error feedback)
    assert float((sim.public - sim.w).norm() / sim.w.norm()) < 0.35
    fl.run(sparse, tmp_path / "c", progress=False, dataset=DIGITS, stop_after=5)
    resumed = fl.run(sparse, tmp_path / "c", resume=True, progress=False, dataset=DIGITS)
    assert torch.equal(resumed.global_flat, s.global_flat)
