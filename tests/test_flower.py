"""sparsefl on Flower (issue #6): same rounds as the simulator, bytes on the wire, bad nodes."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed (pip install 'sparsefl[flower]')")

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.simulation import run_simulation  # noqa: E402

from sparsefl.fl import config as flconfig  # noqa: E402
from sparsefl.fl import engine  # noqa: E402
from sparsefl.flower import client_app, server_app  # noqa: E402

SETS = ["data.clients=3", "server.clients_per_round=2", "run.rounds=2", "run.threads=1",
        "run.eval_every=1"]
NP_SAVE_HEADER = 128  # np.save v1.0 header of a 1-D uint8 array: the framing of one payload


def simulate(cfg, num_nodes=3, tamper=None):
    res: dict = {}
    run_simulation(server_app=server_app(cfg, results=res),
                   client_app=client_app(cfg, tamper=tamper), num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2}})
    return res


@pytest.fixture(scope="module")
def sparsyfed_on_flower():
    cfg = flconfig.load(None, SETS)
    assert cfg.sparsity.method == "sparsyfed"
    return cfg, simulate(cfg)


def test_flower_rounds_equal_the_simulator(sparsyfed_on_flower):
    cfg, res = sparsyfed_on_flower
    old = torch.get_num_threads()
    try:
        ref = engine.run(cfg, progress=False)  # same seed, same sampling, in process
    finally:
        torch.set_num_threads(old)
    h = res["history"]
    assert [r["clients"] for r in h.rounds] == [r["clients"] for r in ref.rounds]
    torch.testing.assert_close(h.global_flat, ref.global_flat, rtol=1e-6, atol=0)
    assert h.rounds[-1]["acc"] == pytest.approx(ref.rounds[-1]["acc"])


def test_bytes_flower_carried_match_the_codec(sparsyfed_on_flower):
    _, res = sparsyfed_on_flower
    rounds = res["history"].rounds
    codec_up = sum(r["bytes_up"] for r in rounds)
    updates = sum(len(r["clients"]) for r in rounds)
    extra = res["carried_up"] - codec_up
    assert 0 <= extra <= 2 * NP_SAVE_HEADER * updates, (res["carried_up"], codec_up)
    codec_down = sum(r["bytes_down"] for r in rounds)
    assert 0 <= res["carried_down"] - codec_down <= 2 * NP_SAVE_HEADER * updates


def test_a_node_sending_garbage_is_dropped_not_aggregated():
    cfg = flconfig.load(None, [*SETS, "server.clients_per_round=3", "run.rounds=1"])

    def tamper(cid: int, payload: bytes) -> bytes:
        return payload[:-7] + b"garbage" if cid == 1 else payload

    res = simulate(cfg, tamper=tamper)
    rec = res["history"].rounds[0]
    assert rec["dropped"]["undecodable"] == 1
    assert rec["clients"] == [0, 2]
    assert torch.isfinite(res["history"].global_flat).all()


def test_flash_is_refused_with_a_reason():
    from sparsefl.flower.app import _check_supported

    with pytest.raises(ValueError, match="flash"):
        _check_supported(flconfig.load(None, ["sparsity.method=flash"]))
