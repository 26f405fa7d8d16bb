"""Faults (issue #8): failing clients, bad payloads, kills, hostile bytes, no pickle."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefl import codec, data, fl
from sparsefl.errors import ClientFault
from sparsefl.fl import engine, wire

DIGITS = data.load("digits")


def test_faulty_clients_are_dropped_counted_and_do_not_poison_the_model():
    cfg = fl.load(None, ["data.clients=10", "server.clients_per_round=10", "model.hidden=[16]",
                         "client.epochs=1", "client.batch_size=32", "run.rounds=4",
                         "sparsity.method=topk", "server.min_clients=2",
                         "server.max_update_norm=1e4"])
    sim = engine.Simulation(cfg, DIGITS)
    honest = sim.client_update
    rng = random.Random(0)
    injected = []

    def faulty(cid, rnd, received, down_ref, lr, timers=None):
        kind = rng.choice(["raise", "nan", "corrupt", "huge"] + ["ok"] * 9)
        injected[-1][kind] = injected[-1].get(kind, 0) + 1
        if kind == "raise":
            raise ClientFault("client crashed")
        up = honest(cid, rnd, received, down_ref, lr, timers)
        if kind == "nan":
            chunks = wire.decode(sim.layout, up.payload, reference=down_ref)
            chunks[0].values[0] = float("nan")
            up.payload = wire.encode(chunks, reference=down_ref)
        elif kind == "corrupt":
            blob = bytearray(up.payload)
            blob[len(blob) // 2] ^= 0x5A
            up.payload = bytes(blob)
        elif kind == "huge":
            chunks = wire.decode(sim.layout, up.payload, reference=down_ref)
            chunks[0].values.mul_(1e6)
            up.payload = wire.encode(chunks, reference=down_ref)
        return up

    sim.client_update = faulty
    for _ in range(4):
        injected.append({})
        rec = sim.step()
        want = injected[-1]
        assert rec["dropped"] == {"raised": want.get("raise", 0), "timeout": 0,
                                  "undecodable": want.get("corrupt", 0),
                                  "nonfinite": want.get("nan", 0), "norm": want.get("huge", 0)}
        assert len(rec["clients"]) == want.get("ok", 0)
        assert torch.isfinite(sim.global_flat).all()
    assert any(d.get(k) for d in injected for k in ("raise", "nan", "corrupt", "huge"))


def test_a_round_without_enough_updates_is_resampled_then_refused():
    cfg = fl.load(None, ["data.clients=6", "server.clients_per_round=2", "model.hidden=[8]",
                         "client.epochs=1", "run.rounds=1", "sparsity.method=none",
                         "server.min_clients=2", "server.max_retries=2"])
    sim = engine.Simulation(cfg, DIGITS)
    honest, calls = sim.client_update, []

    def flaky(cid, *args, **kw):
        calls.append(cid)
        if len(calls) <= 2:
            raise ClientFault("first sample fails")
        return honest(cid, *args, **kw)

    sim.client_update = flaky
    rec = sim.step()
    assert rec["retries"] == 1 and rec["dropped"]["raised"] == 2 and len(rec["clients"]) == 2
    sim = engine.Simulation(cfg, DIGITS)
    before = sim.global_flat.clone()
    sim.client_update = lambda *a, **k: (_ for _ in ()).throw(ClientFault("down"))
    with pytest.raises(RuntimeError, match="min_clients"):
        sim.step()
    assert torch.equal(sim.global_flat, before) and sim.round == 0


def test_a_bug_in_a_client_ends_the_run_with_the_client_and_round():
    cfg = fl.load(None, ["data.clients=4", "server.clients_per_round=2", "model.hidden=[8]",
                         "client.epochs=1", "run.rounds=2", "sparsity.method=none"])
    sim = engine.Simulation(cfg, DIGITS)
    honest = sim.client_update

    def buggy(cid, *args, **kw):
        if sim.round == 1:  # round 2
            return {}["a typo"]  # a programming error, not a client fault
        return honest(cid, *args, **kw)

    sim.client_update = buggy
    sim.step()
    with pytest.raises(KeyError) as info:
        sim.step()
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert re.search(r"client \d+ trained in round 2", note), note
    assert sim.round == 1  # the round did not complete; nothing was aggregated


@pytest.mark.parametrize("weights", ["finite", "nan"])
def test_a_kernel_refusing_nan_is_a_divergence_only_if_the_weights_diverged(monkeypatch,
                                                                            weights):
    """A kernel's NaN refusal mid-training drops the client (NonFiniteModel, counted as
    non-finite) when the client's weights went non-finite; with finite weights the NaN came
    from elsewhere (the data, a bug) and ends the run."""
    cfg = fl.load(None, ["data.clients=4", "server.clients_per_round=2", "model.hidden=[8]",
                         "client.epochs=1", "run.rounds=2", "sparsity.method=topk",
                         "server.min_clients=1"])
    sim = engine.Simulation(cfg, DIGITS)
    hit = []

    def local_train(model, *args, **kw):
        if not hit:  # the first client of the round only
            hit.append(1)
            if weights == "nan":
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            raise ValueError("sparsefl.sparse_mlp_sgd: input contains NaN")
        return real(model, *args, **kw)

    real = engine.local_train
    monkeypatch.setattr(engine, "local_train", local_train)
    if weights == "finite":
        with pytest.raises(ValueError, match="NaN") as info:
            sim.step()
        assert "a bug ends the run" in "\n".join(getattr(info.value, "__notes__", []))
    else:
        row = sim.step()
        assert row["dropped"]["nonfinite"] == 1 and row["dropped"]["raised"] == 0
        assert len(row["clients"]) == 1 and sim.round == 1


@pytest.mark.slow
def test_run_killed_five_times_and_resumed_ends_bit_identical(tmp_path):
    # 200 short rounds (the fused MLP step makes one ~10 ms): five kills land mid-run
    args = ["--set", "run.rounds=200", "--set", "data.clients=6", "--set",
            "server.clients_per_round=3", "--set", "model.hidden=[32]", "--set",
            "client.epochs=2", "--set", "run.keep_checkpoints=1"]
    cmd = [sys.executable, "-m", "sparsefl.cli", "run", *args, "--quiet", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True)
    cut = tmp_path / "cut"
    rng = random.Random(1)
    kills = 0

    def rounds_done() -> int:
        m = cut / "metrics.jsonl"
        return len(m.read_text().splitlines()) if m.is_file() else 0

    while True:
        resume = (cut / "config.toml").is_file()
        proc = subprocess.Popen(cmd[:4] + (["--resume", str(cut)] if resume else
                                           [*args, "--out", str(cut)]) + ["--quiet",
                                                                          "--no-plot"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 5:
            # Kill once this attempt has made progress (a new round recorded), after a
            # random extra delay: the kill lands mid-round, at any speed of the machine.
            start = rounds_done()
            while proc.poll() is None and rounds_done() <= start:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=300) == 0
        if (cut / "summary.json").is_file():
            break
    assert kills == 5
    from safetensors.torch import load_file

    def final(d):
        return load_file(str(sorted(d.glob("ckpt-*.safetensors"))[-1]))["global"]

    assert torch.equal(final(tmp_path / "full"), final(cut))
    full_rows = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_rows = (cut / "metrics.jsonl").read_text().splitlines()
    assert len(cut_rows) == len(full_rows) == 200


def test_ten_thousand_fuzzed_payloads_raise_only_payload_error():
    rng = np.random.default_rng(0)
    valid = []
    for n, k in ((1000, 50), (300, 300), (5000, 5), (64, 0)):
        idx = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)))
        valid.append(codec.encode([codec.SparseChunk(n, idx, torch.randn(k)),
                                   codec.SparseChunk(7, torch.arange(7), torch.randn(7))]))
    outcomes = {"error": 0, "ok": 0}
    for i in range(10_000):
        base = valid[i % len(valid)]
        kind = i % 3
        if kind == 0:
            blob = rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes()
            if i % 2:
                blob = codec.MAGIC + blob
        elif kind == 1:
            blob = base[:rng.integers(0, len(base))]
        else:
            arr = bytearray(base)
            for _ in range(rng.integers(1, 4)):
                pos = int(rng.integers(0, len(arr)))
                arr[pos] ^= 1 << int(rng.integers(0, 8))
            blob = bytes(arr)
        try:
            codec.decode(blob)
            outcomes["ok"] += 1
        except codec.PayloadError:
            outcomes["error"] += 1
    assert outcomes["error"] >= 9_900  # the CRC catches bit flips; the rest is validation


def test_no_pickle_anywhere_in_the_package():
    root = Path(__file__).resolve().parent.parent
    sources = list((root / "sparsefl").rglob("*.py")) + list((root / "kernels").rglob("*.py"))
    bad = re.compile(r"\bimport pickle\b|\bpickle\.(loads?|dumps?|Unpickler)\b|torch\.save\(|"
                     r"torch\.load\(|"
                     r"all_gather_object|broadcast_object_list|\.send_object|np\.load\(")
    hits = [f"{p.relative_to(root)}: {line.strip()}" for p in sources
            for line in p.read_text().splitlines() if bad.search(line)]
    assert hits == []
