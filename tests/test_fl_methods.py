"""Each method's defining property, pinned on small digits runs (acceptance of issue #4)."""

import copy

import pytest
import torch
from torch.nn import functional as F

from sparsefl import codec, data, fl, ops
from sparsefl.fl import client as flclient
from sparsefl.fl import engine, server, swa, wire

DIGITS = data.load("digits")


def small(*overrides, rounds=3):
    return fl.load(None, ["data.clients=6", "server.clients_per_round=3", "model.hidden=[24, 16]",
                          "client.epochs=1", "client.batch_size=32", "client.lr=0.1",
                          f"run.rounds={rounds}", *overrides])


def sim_for(*overrides, rounds=3):
    return engine.Simulation(small(*overrides, rounds=rounds), DIGITS)


def _received(sim):
    down_ref = wire.supports(sim.layout, sim.global_flat)
    payload = wire.encode(wire.chunks_from_flat(sim.layout, sim.global_flat))
    return wire.to_flat(sim.layout, wire.decode(sim.layout, payload)), down_ref


def test_fedbabu_head_stays_bit_identical_to_its_init():
    sim = sim_for("personalization.method=fedbabu", "sparsity.method=none",
                  "personalization.epochs=1")
    head = copy.deepcopy(sim.model[-1].state_dict())
    for _ in range(3):
        sim.step()
    sim.layout.load(sim.model, sim.global_flat)
    for k, v in sim.model[-1].state_dict().items():
        assert torch.equal(v, head[k]), k
    assert all(not e.name.startswith(f"{len(sim.model) - 1}.") for e in sim.layout.entries)


def test_sparsyfed_zeros_stay_zero_and_the_update_has_exactly_the_target_sparsity():
    sim = sim_for("sparsity.method=sparsyfed", "sparsity.sparsity=0.8")
    sim.step()  # round 1 is dense, then pruned
    received, ref = _received(sim)
    prunable = sim.layout.mask(prunable=True)
    zero = (received == 0) & prunable
    assert zero.sum() > 0
    keep = ops.keep_count(sim.layout.prunable_numel, 1 - 0.8)
    for cid in range(sim.cfg.data.clients):
        sim.layout.load(sim.model, received)
        sim.sparsifier.begin_client(sim.model, 2)
        x, y = sim._client_xy(cid)
        flclient.local_train(sim.model, x, y, sim.cfg.client, 0.1,
                              torch.Generator().manual_seed(cid))
        trained = sim.layout.flatten(sim.model)
        assert torch.all(trained[zero] == 0), "a pruned weight regrew during local training"
        assert not torch.equal(trained[prunable & ~zero], received[prunable & ~zero])
        up = sim.client_update(cid, 2, received, ref, 0.1)
        chunks = codec.decode(up.payload, reference=ref)
        sent = sum(c.indices.numel() for c, e in zip(chunks, sim.layout.entries) if e.prunable)
        assert sent == keep
        assert up.activated == 0


def test_topk_baseline_regrows():
    sim = sim_for("sparsity.method=topk", "sparsity.sparsity=0.8", rounds=4)
    recs = [sim.step() for _ in range(4)]
    assert sum(r["activated"] for r in recs[1:]) > 0
    assert sum(r["mask_growth"] for r in recs[1:]) > 0


def test_flash_fixes_one_mask_after_round_one():
    sim = sim_for("sparsity.method=flash", "sparsity.sparsity=0.8", rounds=3)
    sim.step()
    masks = {k: v.clone() for k, v in sim.sparsifier.masks.items()}
    assert masks and abs(sum(int(m.sum()) for m in masks.values())
                         / sim.layout.prunable_numel - 0.2) < 0.02
    sim.step()
    sim.step()
    for e in sim.layout.prunable_entries():
        nz = sim.global_flat[e.offset:e.offset + e.numel] != 0
        assert not torch.any(nz & ~masks[e.name]), "weights outside FLASH's fixed mask"
        assert torch.equal(sim.sparsifier.masks[e.name], masks[e.name])


def test_swa_model_is_the_mean_of_the_globals_at_cycle_ends():
    cfg = small("sparsity.method=none", "swa.enabled=true", "swa.start=2", "swa.cycle=2",
                rounds=7)
    sim = engine.Simulation(cfg, DIGITS)
    taken, lrs = [], []
    for _ in range(7):
        rec = sim.step()
        lrs.append(rec["lr"])
        if swa.cycle_end(cfg, rec["round"]):
            taken.append(sim.global_flat.clone())
    assert len(taken) == 3  # rounds 3, 5, 7
    assert lrs[2] == lrs[4] == lrs[6] == cfg.swa.lr  # the cycle's lowest LR
    torch.testing.assert_close(sim.swa.average(), torch.stack(taken).mean(0), rtol=1e-6,
                               atol=1e-7)


def test_fedavg_with_one_client_and_one_step_is_plain_sgd():
    cfg = fl.load(None, ["data.clients=1", "server.clients_per_round=1", "data.partition=iid",
                         "data.test_fraction=0.0", "sparsity.method=none", "model.hidden=[16]",
                         "client.epochs=1", "client.batch_size=5000", "client.lr=0.2",
                         "client.momentum=0.0", "client.weight_decay=0.001", "run.rounds=1"])
    sim = engine.Simulation(cfg, DIGITS)
    model = copy.deepcopy(sim.model)
    sim.step()
    x, y = sim._client_xy(0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(
        engine.derive_seed(cfg.run.seed, 4, 1, 0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=0.001)
    F.cross_entropy(model(x[perm]), y[perm]).backward()
    opt.step()
    assert torch.equal(sim.global_flat, sim.layout.flatten(model))


@pytest.mark.parametrize("method", ["sparsyfed", "topk", "none"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, method):
    cfg = small(f"sparsity.method={method}", "server.optimizer=fedavgm", rounds=4)
    full = fl.run(cfg, tmp_path / "full", progress=False, dataset=DIGITS)
    fl.run(cfg, tmp_path / "cut", progress=False, dataset=DIGITS, stop_after=2)
    resumed = fl.run(cfg, tmp_path / "cut", resume=True, progress=False, dataset=DIGITS)
    assert torch.equal(full.global_flat, resumed.global_flat)
    keys = ("acc", "loss", "bytes_up", "bytes_down", "sparsity", "activated", "clients")
    assert [{k: r[k] for k in keys} for r in full.rounds] == \
           [{k: r[k] for k in keys} for r in resumed.rounds]
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("opt", ["sam", "asam", "agnostic_sam"])
def test_sam_family_clients_train_and_report_their_overhead(opt):
    sim = sim_for(f"client.optimizer={opt}", "sparsity.method=none", rounds=2)
    first = sim.step()
    second = sim.step()
    assert first["time"]["sam"] > 0
    assert second["train_loss"] < first["train_loss"] + 0.5


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam"])
def test_server_optimizers_follow_their_formulas(kind):
    cfg = small(f"server.optimizer={kind}", "server.lr=0.5", "server.momentum=0.8")
    opt = server.ServerOptimizer(cfg.server, 3)
    w, mean = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    buffers = torch.tensor([False, False, True])
    new = opt.step(w, mean, buffers)
    d = mean - w
    if kind == "fedavgm":
        expect = w + 0.5 * d
    else:
        m1, m2 = 0.1 * d, 0.01 * d * d
        expect = w + 0.5 * m1 / (m2.sqrt() + cfg.server.tau)
    expect[2] = 1.0  # buffers take the mean
    torch.testing.assert_close(new, expect)


def test_bytes_are_the_encoded_payloads():
    sim = sim_for("sparsity.method=sparsyfed", "sparsity.sparsity=0.9")
    sim.step()
    received, ref = _received(sim)
    rec = sim.step()
    assert rec["bytes_up"] < 0.35 * rec["dense_bytes"]
    down = wire.encode(wire.chunks_from_flat(sim.layout, received))
    assert rec["bytes_down"] == len(down) * len(rec["clients"])


def test_compact_and_tiled_payloads_have_the_same_entries():
    sim = sim_for("sparsity.method=topk", "sparsity.sparsity=0.8")
    sim.step()
    chunks = wire.decode(sim.layout, wire.encode(wire.chunks_from_flat(sim.layout,
                                                                       sim.global_flat)))
    wide, compact = wire.to_flat_pair(sim.layout, chunks), \
        wire.to_flat_pair(sim.layout, chunks, compact=True)
    assert wide[0].dtype == torch.int64 and compact[0].dtype == torch.int32
    assert torch.equal(wide[0], compact[0].long()) and torch.equal(wide[1], compact[1])
    want = ops.sparse_aggregate([wide], [1.0], numel=sim.layout.numel)
    assert torch.equal(want, ops.sparse_aggregate([compact], [1.0], numel=sim.layout.numel))
    # and the tiled form the engine's server merges
    tiled = ops.tile_payload(*compact, sim.layout.numel)
    assert torch.equal(want, ops.sparse_aggregate([tiled], [1.0]))
