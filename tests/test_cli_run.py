"""`sparsefl run` / `sparsefl plot` end to end, and checkpoints on disk."""

import json
import subprocess
import sys

import pytest
import torch

from sparsefl import cli
from sparsefl.errors import CheckpointError
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
    skipped: list[str] = []
    rnd, tensors, _ = checkpoint.latest(tmp_path, skipped)  # the older one verifies
    assert rnd == 3 and torch.equal(tensors["global"], torch.full((3,), 3.0))
    assert skipped == ["ckpt-000004.json: checkpoint tensors do not match their recorded hash"]
    (tmp_path / "ckpt-000003.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no checkpoint verifies.*000004.*hash.*000003"):
        checkpoint.latest(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))
    assert checkpoint.latest(tmp_path / "elsewhere") is None


def test_analyze_adds_flatness_to_a_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--set", "swa.enabled=true", "--set", "swa.start=1",
                     "--set", "swa.cycle=1", "--out", str(out), "--quiet", "--no-plot"]) == 0
    assert cli.main(["analyze", str(out), "--examples", "100", "--samples", "2"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["round"] == 2 and res["global"]["top_eigenvalue"] > 0 and "swa" in res
    assert cli.main(["analyze", str(tmp_path / "none")]) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsefl.cli", *args], capture_output=True,
                          text=True)


def test_resume_skips_a_checkpoint_that_fails_its_hash(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--set", "run.rounds=3", "--set", "run.keep_checkpoints=3",
                     "--out", str(out), "--quiet", "--no-plot"]) == 0
    want = json.loads((out / "summary.json").read_text())
    blob = bytearray((out / "ckpt-000003.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "ckpt-000003.safetensors").write_bytes(bytes(blob))
    (out / "summary.json").unlink()
    proc = _cli("run", "--resume", str(out), "--quiet", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped checkpoint ckpt-000003.json: checkpoint tensors do not match" in proc.stderr
    assert "resuming from round 2" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]  # round 3 was run again, once
    got = json.loads((out / "summary.json").read_text())
    assert got["acc_tail_mean"] == want["acc_tail_mean"]  # and gives the same result


def test_resume_with_no_verifying_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", *TINY, "--out", str(out), "--quiet", "--no-plot"]) == 0
    for f in out.glob("ckpt-*.safetensors"):
        f.write_bytes(b"garbage")
    proc = _cli("run", "--resume", str(out), "--quiet", "--no-plot")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no checkpoint verifies" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sets, words", [
    (["data.clients=1000"], "1000 clients"),
    (["data.partition=shards", "data.shards_per_client=1000"], "shards"),
    (["data.name=mnist"], "data.dir"),
])
def test_user_errors_of_run_are_one_line(tmp_path, sets, words):
    proc = _cli("run", *[a for kv in sets for a in ("--set", kv)], "--out",
                str(tmp_path / "r"), "--quiet", "--no-plot")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsefl run: ") and words in lines[0]


@pytest.mark.parametrize("method", ["none", "topk", "sparsyfed", "flash"])
def test_a_diverged_run_stops_with_one_line_and_exit_3(tmp_path, method):
    """Every client's model non-finite: each is dropped as a client fault (a sparsifying
    method must not take the top-k of NaN weights and end the run as if it were a bug),
    and the run stops with one line."""
    out = tmp_path / "r"
    proc = _cli("run", *TINY, "--set", "run.rounds=3", "--set", "client.lr=1e30",
                "--set", "server.max_retries=0", "--set", f"sparsity.method={method}",
                "--out", str(out), "--quiet", "--no-plot")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "sparsefl run: stopped: round 1: fewer than server.min_clients")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine "
                    "without CUDA")
def test_cuda_device_without_cuda_is_one_line():
    proc = _cli("run", "--set", "run.device=cuda", "--quiet", "--no-plot")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.device" in lines[0] and "CUDA" in lines[0]
    proc = _cli("bench", "round", "--device", "cuda", "--quick")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "GPU" in proc.stderr
