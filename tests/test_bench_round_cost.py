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
