"""`sparsefl run` / `sparsefl plot` end to end, and checkpoints on disk."""

import json
import subprocess
import sys

import pytest
import torch

from sparsefl import cli
from sparsefl.fl import checkpoint

TINY = ["--set", "run.rounds=2", "--set", "data.clients=4", "--set",
        "server.clients_per_round=2", "--set", "model.hidden=[16]", "--set", "client.epochs=1"]


def test_run_writes_metrics_checkpoints_summary_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "sparsefl run summary" in text and "test accuracy" in text and "bytes up" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert {"acc", "bytes_up", "bytes_down", "sparsity", "time"} <= rows[-1].keys()
    for name in ("config.toml", "summary.json", "accuracy.png", "sparsity.png", "bytes.png",
                 "ckpt-000002.json", "ckpt-000002.safetensors"):
        assert (out / name).is_file(), name
    assert cli.main(["plot", str(out)]) == 0
    # a finished run resumed does nothing more and still reports
    assert cli.main(["run", "--resume", str(out), "--quiet", "--no-plot"]) == 0


def test_run_refuses_an_existing_run_dir_and_bad_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--out", str(out), "--quiet", "--no-plot"]) == 0
    assert cli.main(["run", *TINY, "--out", str(out), "--quiet", "--no-plot"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["run", "--set", "client.learning_rate=0.1", "--quiet"]) == 2
    assert "client.learning_rate: unknown key" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


def test_bad_key_from_the_installed_command_line():
    proc = subprocess.run([sys.executable, "-m", "sparsefl.cli", "run", "--set",
                           "sparsity.sparsty=0.9"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "sparsity.sparsty: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoints_are_verified_and_pruned(tmp_path):
    for r in range(1, 5):
        checkpoint.save(tmp_path, r, {"global": torch.full((3,), float(r))}, {"x": r}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.json")) == ["ckpt-000003.json",
                                                                      "ckpt-000004.json"]
    rnd, tensors, meta = checkpoint.latest(tmp_path)
    assert rnd == 4 and meta["x"] == 4 and torch.equal(tensors["global"], torch.full((3,), 4.0))
    blob = bytearray((tmp_path / "ckpt-000004.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ckpt-000004.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="hash"):
        checkpoint.latest(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))


def test_analyze_adds_flatness_to_a_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--set", "swa.enabled=true", "--set", "swa.start=1",
                     "--set", "swa.cycle=1", "--out", str(out), "--quiet", "--no-plot"]) == 0
    assert cli.main(["analyze", str(out), "--examples", "100", "--samples", "2"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["round"] == 2 and res["global"]["top_eigenvalue"] > 0 and "swa" in res
    assert cli.main(["analyze", str(tmp_path / "none")]) == 2
