"""The per-round benchmark runs the same work on both paths (issue #7, acceptance 1)."""

import os

from sparsefl.bench import round as round_bench


def test_engine_and_eager_rounds_end_in_the_same_model(tmp_path):
    before = os.environ.get("SPARSEFL_BACKEND")
    res = round_bench.run("mlp", clients=3, per_client=40, rounds=1, threads=0)
    assert os.environ.get("SPARSEFL_BACKEND") == before
    assert res["max_rel_diff"] <= 1e-5 or res["max_abs_diff"] <= 1e-6
    assert res["engine"]["sam"] > 0 and res["eager"]["aggregate"] > 0
    text = round_bench.table(res)
    assert "| machinery |" in text and "| round |" in text
    assert round_bench.plot(res, tmp_path / "r.png").is_file()
