"""scripts/gpu-check.sh --dry-run: the GPU script's steps on the CPU (installed extension,
GPU tests skipping, the report's code at toy sizes), so the minutes of a lent GPU go to
measuring, not to debugging the script (issue #28)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    md = (out / "gpu_report.md").read_text()
    for section in ("## sam,", "## topk,", "## aggregate,", "## codec pack,",
                    "## One SparsyFed + FedSAM round"):
        assert section in md, section
    assert "kthvalue threshold" in md and "index_add_" in md
    rep = json.loads((out / "gpu_report.json").read_text())
    assert rep["dry_run"] and rep["round"]["max_abs_diff"] < 1e-4


def test_gpu_check_refuses_an_unknown_option():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--fast"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown option" in res.stderr
