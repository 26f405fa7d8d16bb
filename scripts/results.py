#!/usr/bin/env python3
"""Reproduce docs/results.md: every configs/fmnist experiment x seeds, then the tables.

    .venv/bin/python scripts/results.py [--seeds 0 1] [--jobs 2] [--out results/fmnist]

Runs go to OUT/<experiment>-seed<S> (one thread each, `--jobs` at a time); a run that
already has summary.json is skipped, one that was interrupted is resumed from its last
checkpoint.  The tables (mean ± std over seeds) are printed and written to OUT/tables.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ORDER = ["fedavg", "sparsyfed-95", "topk-95", "sparsyfed-99", "topk-99", "sparsyfed-90",
         "topk-90", "fedsam", "fedasam", "fedasam-swa", "fedbabu", "fedavg-ft", "flash-95",
         "sparsyfed-95-global"]


def run_one(config: Path, seed: int, out: Path) -> str:
    run_dir = out / f"{config.stem}-seed{seed}"
    if (run_dir / "summary.json").is_file():
        return f"{run_dir.name}: done before"
    sparsefl = [sys.executable, "-m", "sparsefl.cli", "run"]
    if (run_dir / "config.toml").is_file():
        cmd = sparsefl + ["--resume", str(run_dir), "--quiet", "--no-plot"]
    else:
        cmd = sparsefl + [str(config), "--set", f"run.seed={seed}", "--set", "run.threads=1",
                          "--out", str(run_dir), "--quiet", "--no-plot"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return f"{run_dir.name}: FAILED ({proc.returncode})\n{proc.stderr[-2000:]}"
    return f"{run_dir.name}: {time.time() - t0:.0f} s"


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    s = statistics.pstdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def tables(out: Path, seeds: list[int]) -> str:
    rows = {}
    for name in ORDER:
        finals = []
        for s in seeds:
            f = out / f"{name}-seed{s}" / "summary.json"
            if f.is_file():
                finals.append(json.loads(f.read_text()))
        rows[name] = finals

    def line(name: str, extra: str = "") -> str:
        fs = rows[name]
        if not fs:
            return f"| {name} | (not run) |"
        up = statistics.fmean(f["bytes_up"] for f in fs) / fs[0]["rounds"] / 1e6
        down = statistics.fmean(f["bytes_down"] for f in fs) / fs[0]["rounds"] / 1e6
        dense = fs[0]["dense_bytes"] / fs[0]["rounds"] / 1e6
        return (f"| {name} | {len(fs)} | {_ms([f['acc_tail_mean'] for f in fs])} | "
                f"{_ms([f['best_acc'] for f in fs])} | {_ms([f['sparsity'] for f in fs])} | "
                f"{up:.3f} | {down:.3f} | {dense / up:.1f}x |{extra}")

    head = ("| experiment | seeds | accuracy, last 10% of evals (%) | best (%) | "
            "global sparsity (%) | MB up / round | MB down / round | up: less than dense |\n"
            "|---|---|---|---|---|---|---|---|")
    parts = ["### SAM family and SWA", head]
    parts += [line(n) for n in ("fedavg", "fedsam", "fedasam", "fedasam-swa")]
    swa = [json.loads((out / f"fedasam-swa-seed{s}" / "summary.json").read_text())
           .get("swa_acc") for s in seeds
           if (out / f"fedasam-swa-seed{s}" / "summary.json").is_file()]
    parts.append(f"\nSWA model (FedASAM+SWA), final accuracy: {_ms(swa)} %\n")
    parts += ["### Sparsity: SparsyFed vs Top-K vs FLASH vs dense", head]
    parts += [line(n) for n in ("fedavg", "sparsyfed-90", "topk-90", "sparsyfed-95", "topk-95",
                                "flash-95", "sparsyfed-95-global", "sparsyfed-99", "topk-99")]
    parts += ["", "### Personalisation: FedBABU vs FedAvg + fine-tuning",
              "| experiment | seeds | global acc (%) | personalised before FT (%) | "
              "personalised after FT (%) |", "|---|---|---|---|---|"]
    for n in ("fedbabu", "fedavg-ft"):
        fs = [f for f in rows[n] if "personalized" in f]
        parts.append(f"| {n} | {len(fs)} | {_ms([f['acc_tail_mean'] for f in fs])} | "
                     f"{_ms([f['personalized']['before_mean'] for f in fs])} | "
                     f"{_ms([f['personalized']['after_mean'] for f in fs])} |")
    return "\n".join(parts) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="results/fmnist")
    ap.add_argument("--only", nargs="*", help="experiment names (default: all)")
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent / "configs" / "fmnist"
    names = args.only or ORDER
    if not args.tables_only:
        jobs = [(root / f"{n}.toml", s) for n in names for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            for msg in pool.map(lambda j: run_one(j[0], j[1], out), jobs):
                print(msg, flush=True)
    text = tables(out, args.seeds)
    (out / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
