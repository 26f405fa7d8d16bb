"""`sparsefl bench round-cost`: a config against its plain-torch twin, same clients."""

from __future__ import annotations

import pytest

from sparsefl import cli
from sparsefl.bench import round_cost

SMALL = ["data.clients=6", "server.clients_per_round=3", "client.epochs=1",
         "run.eval_every=100"]


@pytest.fixture(autouse=True)
def _private_auto_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFL_AUTO_CACHE", str(tmp_path / "auto.json"))


def test_both_configs_run_the_same_rounds(tmp_path):
    res = round_cost.run(None, SMALL, rounds=2, warmup=1, threads=0, progress=False)
    assert res["method"] == "sparsyfed" and res["rounds"] == 2
    rounds = {name: [r["round"] for r in recs] for name, recs in res["per_round"].items()}
    assert rounds["config"] == rounds["plain"] == [2, 3]
    a, b = res["phases"]["config"], res["phases"]["plain"]
    assert a["act_prune"] > 0 and b["act_prune"] == 0  # only the sparse config prunes
    for phases in (a, b):
        assert phases["round"] >= phases["train"] > 0
    assert res["machine"]["isa"] in ("AVX-512", "AVX2", "portable")
    text = round_cost.table(res)
    assert "| **round** (wall) |" in text and res["machine"]["isa"] in text
    assert round_cost.plot(res, tmp_path / "rc.png").is_file()


def test_refuses_what_it_cannot_compare(capsys):
    with pytest.raises(ValueError, match="nothing to compare"):
        round_cost.run(None, ["sparsity.method=none"], rounds=1, progress=False)
    with pytest.raises(ValueError, match="rounds >= 1"):
        round_cost.run(None, [], rounds=0, progress=False)
    assert cli.main(["bench", "round-cost", "--set", "sparsity.method=none"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert cli.main(["bench", "round-cost", "--set", "client.lr=-1"]) == 2
    assert "client.lr" in capsys.readouterr().err


def test_pairs_interleave_per_client(tmp_path, capsys):
    """--pairs: both configs train the clients of the round after the warm-up, one by one,
    `rounds` passes; the table has the client phases and the per-pass ratios."""
    res = round_cost.run(None, SMALL, rounds=2, warmup=1, threads=0, progress=False,
                         pairs=True)
    assert res["pairs"] and res["pair_round"] == 2
    for name in ("config", "plain"):
        assert [(r["round"]) for r in res["per_round"][name]] == [2, 2]
    a, b = res["phases"]["config"], res["phases"]["plain"]
    assert a["act_prune"] > 0 and b["act_prune"] == 0
    assert a["aggregate"] == b["aggregate"] == a["eval"] == 0  # no round-level phases
    for phases in (a, b):
        assert phases["round"] >= phases["train"] > 0
    assert len(res["per_client_ratio"]) == 2 * 3  # two passes over three clients
    text = round_cost.table(res)
    assert "| **clients** (wall) |" in text and "aggregate" not in text
    assert "train ratio per pass:" in text and "per-client train ratios" in text
    assert cli.main(["bench", "round-cost", "--set", "data.clients=6", "--set",
                     "server.clients_per_round=2", "--set", "client.epochs=1", "--set",
                     "run.eval_every=100", "--rounds", "1", "--warmup", "0", "--pairs",
                     "--out", str(tmp_path)]) == 0
    assert "interleaved per client" in capsys.readouterr().out
    assert (tmp_path / "round_cost.png").is_file()
