#!/usr/bin/env python3
"""Reproduce docs/results.md: every experiment of a suite x seeds, then the tables.

    .venv/bin/python scripts/results.py --suite fmnist|decentralized|agnostic [--seeds 0 1]
    .venv/bin/python scripts/results.py --suite fmnist-lr        # lr sweep, MLP
    .venv/bin/python scripts/results.py --suite fmnist-resnet    # sweep, then 2 seeds
    .venv/bin/python scripts/results.py --suite fmnist-resnet-w16  # the same at width 16

Suites are the folders of configs/.  Runs go to results/<suite>/<experiment>-seed<S>
(one thread each, `--jobs` at a time); a run that already has summary.json is skipped,
one that was interrupted is resumed from its last checkpoint, so a suite killed with its
session continues where it stopped when the same command is run again.

Sweep suites (SWEEPS) first run each swept config at every start lr (the first seed;
runs <experiment>-lr<LR>-seed<S>), pick each config's best lr by the mean test accuracy
of the last 10% of evaluations, then run every config of its family at that lr for all
seeds (the sweep's run is the first seed's).  Suites whose claims are
about flatness then run `sparsefl analyze` on each run (Hessian top eigenvalue and
trace).  The tables (mean ± std over seeds) are printed and written to
results/<suite>/tables.md, and every finished run's summary, analysis, config and metrics
(gzipped when large; no checkpoints) are copied to docs/results/data/<suite>/<run>/ to be
committed.  From that archive, without training:

    .venv/bin/python scripts/results.py --tables [--suite S]   # every table and plot

(tests/test_results_tables.py regenerates the archived suites' tables and finds them in
docs/results.md.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "results" / "data"  # the committed archive of finished runs
SUITES = ["fmnist", "decentralized", "agnostic", "fmnist-lr", "fmnist-resnet",
          "fmnist-resnet-w16", "fmnist-resnet-w32"]

FMNIST = ["fedavg", "fedavg-exp", "sparsyfed-95", "topk-95", "sparsyfed-99", "topk-99",
          "sparsyfed-90", "topk-90", "fedsam", "fedasam", "fedasam-swa", "fedbabu", "fedavg-ft",
          "flash-95", "sparsyfed-95-global", "sparsyfed-95-noact", "fedbabu-lr05",
          "fedavg-ft-lr05"]


DECENTRALIZED = ["diffusion", "consensus", "centralized"]
AGNOSTIC = ["sgd-noise40", "sam-noise40", "agnostic_sam-noise40", "sgd-data10", "sam-data10",
            "agnostic_sam-data10"]
# suite -> (start lrs, overrides of every sweep run, {swept config: configs using its lr});
# the lrs may be a list or {swept config: its list} (a method whose best lr sat at the edge
# of the shared grid is swept one step further that way)
SWEEPS = {
    "fmnist-lr": ([0.05, 0.1, 0.2, 0.5, 1.0],
                  ["client.lr_schedule=exponential", "client.lr_end=0.01"],
                  {"fedavg": [], "topk-95": [], "sparsyfed-95": [], "flash-95": []}),
    "fmnist-resnet": ({"fedavg": [0.05, 0.15, 0.5, 1.5], "sparsyfed-95": [0.05, 0.15, 0.5, 1.5],
                       "topk-95": [0.015, 0.05, 0.15, 0.5]}, [],
                      {"fedavg": ["fedavg"], "sparsyfed-95": ["sparsyfed-95", "sparsyfed-90",
                                                              "sparsyfed-99"],
                       "topk-95": ["topk-95", "topk-90", "topk-99"]}),
}
# Width suites (issue #27 item 3: does the SparsyFed gap close with width?): configs of
# configs/fmnist-resnet at another model.width, each at its family's best start lr of the
# width-8 sweep (docs/results.md), with these seeds.
WIDTHS = {
    "fmnist-resnet-w16": (16, {"fedavg": 0.5, "sparsyfed-95": 0.5, "topk-95": 0.05}, [0, 1]),
    "fmnist-resnet-w32": (32, {"fedavg": 0.5, "sparsyfed-95": 0.5}, [0]),
}
ANALYZE = {"fmnist": ["fedavg", "fedsam", "fedasam", "fedasam-swa"],
           "decentralized": DECENTRALIZED}


def analyze_one(run_dir: Path) -> str:
    if (run_dir / "analysis.json").is_file() or not (run_dir / "summary.json").is_file():
        return f"{run_dir.name}: analysis skipped"
    proc = subprocess.run([sys.executable, "-m", "sparsefl.cli", "analyze", str(run_dir)],
                          capture_output=True, text=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    return f"{run_dir.name}: analysis {'ok' if proc.returncode == 0 else proc.stderr[-500:]}"


def run_one(config: Path, seed: int, out: Path, lr: float | None = None,
            overrides: list[str] | None = None) -> str:
    tag = f"{config.stem}-lr{lr:g}" if lr is not None else config.stem
    run_dir = out / f"{tag}-seed{seed}"
    if (run_dir / "summary.json").is_file():
        return f"{run_dir.name}: done before"
    if (run_dir / "stopped.json").is_file():
        return f"{run_dir.name}: stopped before (diverged)"
    sparsefl = [sys.executable, "-m", "sparsefl.cli", "run"]
    if (run_dir / "config.toml").is_file():
        cmd = sparsefl + ["--resume", str(run_dir), "--quiet", "--no-plot"]
    else:
        sets = [f"run.seed={seed}", "run.threads=1", *(overrides or [])]
        if lr is not None:
            sets.append(f"client.lr={lr:g}")
        cmd = sparsefl + [str(config), *[a for kv in sets for a in ("--set", kv)],
                          "--out", str(run_dir), "--quiet", "--no-plot"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 3:  # the run stopped: no usable update (diverged); a result too
        why = proc.stderr.strip().splitlines()[-1]
        (run_dir / "stopped.json").write_text(json.dumps({"reason": why}))
        return f"{run_dir.name}: {why}"
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


def _metrics(run_dir: Path) -> list[dict]:
    """A run's per-round metrics: metrics.jsonl, or the archive's metrics.jsonl.gz."""
    f = run_dir / "metrics.jsonl"
    if f.is_file():
        text = f.read_text()
    elif (gz := run_dir / "metrics.jsonl.gz").is_file():
        text = gzip.decompress(gz.read_bytes()).decode()
    else:
        return []
    return [json.loads(line) for line in text.splitlines()]


# What a finished run leaves in the committed archive (DATA/<suite>/<run>/): everything the
# tables and plots read, nothing else (checkpoints stay in results/).  Metrics over this
# size are gzipped (deterministically: no name or time in the header).
ARCHIVED = ("summary.json", "analysis.json", "stopped.json", "config.toml")
GZIP_ABOVE = 64 * 1024


def archive(out: Path, suite: str) -> int:
    """Copy each finished run of results/<suite> into DATA/<suite>; returns the count."""
    dest_root = DATA / suite
    n = 0
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        if not ((run / "summary.json").is_file() or (run / "stopped.json").is_file()):
            continue  # unfinished: the archive holds only what a table may cite
        dest = dest_root / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED:
            if (run / name).is_file():
                shutil.copyfile(run / name, dest / name)
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            data = metrics.read_bytes()
            if len(data) > GZIP_ABOVE:
                (dest / "metrics.jsonl.gz").write_bytes(gzip.compress(data, 9, mtime=0))
                (dest / "metrics.jsonl").unlink(missing_ok=True)
            else:
                (dest / "metrics.jsonl").write_bytes(data)
        n += 1
    return n


def _load(out: Path, name: str, seeds: list[int], what: str = "summary.json") -> list[dict]:
    files = [out / f"{name}-seed{s}" / what for s in seeds]
    return [json.loads(f.read_text()) for f in files if f.is_file()]


def tables_decentralized(out: Path, seeds: list[int]) -> str:
    parts = ["| strategy | seeds | test acc, average model (%) | test acc, mean over agents (%) "
             "| training loss (avg model) | top Hessian eigenvalue (avg model) | "
             "mean agent top eigenvalue | Hessian trace (avg model) | disagreement |"
             + TIME_HEAD.replace("round", "iteration"), "|---" * 11 + "|"]
    for name in DECENTRALIZED:
        runs = [(_metrics(out / f"{name}-seed{s}")[-1],
                 json.loads(p.read_text()) if (p := out / f"{name}-seed{s}" /
                                               "analysis.json").is_file() else None)
                for s in seeds if (out / f"{name}-seed{s}" / "summary.json").is_file()]
        if not runs:
            parts.append(f"| {name} | (not run) |")
            continue
        last = [r for r, _ in runs]
        an = [a for _, a in runs if a]
        agents = [statistics.fmean(a["agents_top_eigenvalue"]) for a in an
                  if "agents_top_eigenvalue" in a]
        parts.append(
            f"| {name} | {len(runs)} | {_ms([r['acc'] for r in last])} | "
            f"{_ms([r['agent_acc_mean'] for r in last])} | "
            f"{_ms([r['full_train_loss'] for r in last], 1, 4)} | "
            f"{_ms([a['global']['top_eigenvalue'] for a in an], 1, 2)} | "
            f"{_ms(agents, 1, 2) if agents else '—'} | "
            f"{_ms([a['global']['trace'] for a in an], 1, 1)} | "
            f"{_ms([r['disagreement'] for r in last], 1, 6)} | "
            f"{_timing(out, [f'{name}-seed{s}' for s in seeds])} |")
    return "\n".join(parts) + "\n"


def tables_agnostic(out: Path, seeds: list[int]) -> str:
    parts = ["| condition | optimizer | seeds | test acc, last 10% of evals (%) | best (%) |"
             + TIME_HEAD, "|---|---|---|---|---|---|---|"]
    for name in AGNOSTIC:
        fs = _load(out, name, seeds)
        opt, cond = name.rsplit("-", 1)
        cond = {"noise40": "40% label noise", "data10": "10% of the data"}[cond]
        parts.append(f"| {cond} | {opt} | {len(fs)} | "
                     f"{_ms([f['acc_tail_mean'] for f in fs])} | "
                     f"{_ms([f['best_acc'] for f in fs])} | "
                     f"{_timing(out, [f'{name}-seed{s}' for s in seeds])} |")
    return "\n".join(parts) + "\n"


def tables(out: Path, seeds: list[int]) -> str:
    rows = {}
    for name in FMNIST:
        finals = []
        for s in seeds:
            f = out / f"{name}-seed{s}" / "summary.json"
            if f.is_file():
                finals.append(json.loads(f.read_text()))
        rows[name] = finals

    def line(name: str) -> str:
        return _row(out, name, name, seeds)

    head = ("| experiment | seeds | accuracy, last 10% of evals (%) | best (%) | "
            "global sparsity (%) | MB up / round | MB down / round | up: less than dense |"
            + TIME_HEAD + "\n|---|---|---|---|---|---|---|---|---|---|")
    parts = ["### SAM family and SWA", head]
    parts += [line(n) for n in ("fedavg", "fedsam", "fedasam", "fedasam-swa")]
    swa = [json.loads((out / f"fedasam-swa-seed{s}" / "summary.json").read_text())
           .get("swa_acc") for s in seeds
           if (out / f"fedasam-swa-seed{s}" / "summary.json").is_file()]
    parts.append(f"\nSWA model (FedASAM+SWA), final accuracy: {_ms(swa)} %\n")
    parts += ["### Sparsity: SparsyFed vs Top-K vs FLASH vs dense", head]
    parts += [line(n) for n in ("fedavg", "fedavg-exp", "sparsyfed-90", "topk-90",
                                "sparsyfed-95", "topk-95",
                                "flash-95", "sparsyfed-95-global", "sparsyfed-95-noact",
                                "sparsyfed-99", "topk-99")]
    parts += ["", "### Personalisation: FedBABU vs FedAvg + fine-tuning",
              "| experiment | seeds | global acc (%) | personalised before FT (%) | "
              "personalised after FT (%) |", "|---|---|---|---|---|"]
    for n in ("fedbabu", "fedavg-ft", "fedbabu-lr05", "fedavg-ft-lr05"):
        fs = [f for f in rows[n] if "personalized" in f]
        parts.append(f"| {n} | {len(fs)} | {_ms([f['acc_tail_mean'] for f in fs])} | "
                     f"{_ms([f['personalized']['before_mean'] for f in fs])} | "
                     f"{_ms([f['personalized']['after_mean'] for f in fs])} |")
    parts += ["", "### Flatness of the final global model (Hessian on 1000 training examples)",
              "| experiment | seeds | top eigenvalue | trace | SWA model top eigenvalue |",
              "|---|---|---|---|---|"]
    for n in ANALYZE["fmnist"]:
        an = _load(out, n, seeds, "analysis.json")
        swa = [a["swa"]["top_eigenvalue"] for a in an if "swa" in a]
        parts.append(f"| {n} | {len(an)} | "
                     f"{_ms([a['global']['top_eigenvalue'] for a in an], 1, 2)} | "
                     f"{_ms([a['global']['trace'] for a in an], 1, 1)} | "
                     f"{_ms(swa, 1, 2) if swa else '—'} |")
    return "\n".join(parts) + "\n"


def _summary(out: Path, run: str) -> dict | None:
    f = out / run / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _stopped(out: Path, run: str) -> bool:
    return (out / run / "stopped.json").is_file()


def sweep_lrs(suite: str, stem: str) -> list[float]:
    lrs = SWEEPS[suite][0]
    return lrs[stem] if isinstance(lrs, dict) else lrs


def all_lrs(suite: str) -> list[float]:
    lrs = SWEEPS[suite][0]
    return sorted({lr for v in lrs.values() for lr in v}) if isinstance(lrs, dict) else lrs


def best_lr(out: Path, suite: str, stem: str, seed: int) -> float | None:
    """The swept start lr with the highest last-10% test accuracy (a run that stopped,
    diverged, counts as the worst); None until all ran."""
    accs = {}
    for lr in sweep_lrs(suite, stem):
        run = f"{stem}-lr{lr:g}-seed{seed}"
        summ = _summary(out, run)
        if summ is None and not _stopped(out, run):
            return None
        accs[lr] = summ["acc_tail_mean"] if summ else float("-inf")
    return max(accs, key=accs.__getitem__)


def run_sweep_suite(suite: str, root: Path, out: Path, seeds: list[int], jobs: int,
                    only: list[str] | None) -> None:
    _, sets, families = SWEEPS[suite]
    fams = {k: v for k, v in families.items() if not only or k in only}
    first = seeds[0]
    sweep = [(root / f"{stem}.toml", first, lr) for stem in fams
             for lr in sweep_lrs(suite, stem)]
    with ThreadPoolExecutor(jobs) as pool:
        for msg in pool.map(lambda j: run_one(*j[:2], out, j[2], sets), sweep):
            print(msg, flush=True)
    main = []
    for stem, members in fams.items():
        lr = best_lr(out, suite, stem, first)
        if lr is None:
            print(f"{stem}: sweep incomplete, its family waits", flush=True)
            continue
        print(f"{stem}: best start lr {lr:g}", flush=True)
        main += [(root / f"{m}.toml", s, lr) for m in members for s in seeds
                 if (m, s) != (stem, first)]
    with ThreadPoolExecutor(jobs) as pool:
        for msg in pool.map(lambda j: run_one(*j[:2], out, j[2], sets), main):
            print(msg, flush=True)


def _timing(out: Path, runs: list[str]) -> str:
    """Two cells: seconds per round (the median over a run's rounds, mean over its seeds)
    and the training share of the wall time (compute + activation pruning + SAM). Suites
    run two runs side by side with one thread each, so read them as relative."""
    meds, shares = [], []
    for run in runs:
        ms = [m for m in _metrics(out / run) if "wall" in m and "time" in m]
        if not ms:
            continue
        meds.append(statistics.median(m["wall"] for m in ms))
        train = sum(sum(m["time"].get(k, 0.0) for k in ("compute", "act_prune", "sam"))
                    for m in ms)
        wall = sum(m["wall"] for m in ms)
        shares.append(train / wall if wall else 0.0)
    if not meds:
        return "— | —"
    return f"{statistics.fmean(meds):.2f} | {100 * statistics.fmean(shares):.0f}%"


TIME_HEAD = " s / round (median) | train share of wall |"


def _row(out: Path, label: str, run: str, seeds: list[int]) -> str:
    found = [(f"{run}-seed{s}", f) for s in seeds
             if (f := _summary(out, f"{run}-seed{s}")) is not None]
    if not found:
        return f"| {label} | (not run) |"
    done, fs = [name for name, _ in found], [f for _, f in found]
    up = statistics.fmean(f["bytes_up"] for f in fs) / fs[0]["rounds"] / 1e6
    down = statistics.fmean(f["bytes_down"] for f in fs) / fs[0]["rounds"] / 1e6
    dense = fs[0]["dense_bytes"] / fs[0]["rounds"] / 1e6
    return (f"| {label} | {len(fs)} | {_ms([f['acc_tail_mean'] for f in fs])} | "
            f"{_ms([f['best_acc'] for f in fs])} | {_ms([f['sparsity'] for f in fs])} | "
            f"{up:.3f} | {down:.3f} | {dense / up:.1f}x | {_timing(out, done)} |")


def tables_sweep(suite: str, out: Path, seeds: list[int]) -> str:
    _, sets, families = SWEEPS[suite]
    lrs = all_lrs(suite)
    parts = [f"### Start-lr sweep (seed {seeds[0]}; test accuracy, last 10% of evals, %; "
             "· = not swept)",
             "| experiment | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for stem in families:
        cells = []
        for lr in lrs:
            run = f"{stem}-lr{lr:g}-seed{seeds[0]}"
            summ = _summary(out, run)
            if lr not in sweep_lrs(suite, stem):
                cells.append("·")
                continue
            cells.append(f"{100 * summ['acc_tail_mean']:.1f}" if summ else
                         "diverged" if _stopped(out, run) else "—")
        best = best_lr(out, suite, stem, seeds[0])
        parts.append(f"| {stem} | " + " | ".join(cells) + f" | {best if best else '—'} |")
    members = [(m, stem) for stem, ms in families.items() for m in ms]
    if members:
        parts += ["", "### Each method at its best start lr",
                  "| experiment (start lr) | seeds | accuracy, last 10% of evals (%) | best (%) | "
                  "global sparsity (%) | MB up / round | MB down / round | up: less than dense |"
                  + TIME_HEAD, "|---|---|---|---|---|---|---|---|---|---|"]
        for m, stem in sorted(members):
            lr = best_lr(out, suite, stem, seeds[0])
            parts.append(_row(out, f"{m} ({lr:g})", f"{m}-lr{lr:g}", seeds) if lr
                         else f"| {m} | (sweep incomplete) |")
    return "\n".join(parts) + "\n"


def plots_sweep(suite: str, out: Path, seeds: list[int]) -> list[Path]:
    """accuracy.png: test accuracy per round of every family member at its best lr (mean
    over seeds, band = min..max), to show where the curves flatten; layer_density.png:
    the final global model's density per prunable layer for the sparse runs (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, sets, families = SWEEPS[suite]
    members = [(m, best_lr(out, suite, stem, seeds[0])) for stem, ms in families.items()
               for m in ms]
    members = [(m, lr) for m, lr in members if lr is not None]
    if not members:
        return []

    def metrics(run: str) -> list[dict]:
        return _metrics(out / run)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, lr in sorted(members):
        curves = [[(r["round"], r["acc"]) for r in metrics(f"{m}-lr{lr:g}-seed{s}")
                   if "acc" in r] for s in seeds]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        mean = [statistics.fmean(v) for v in ys]
        line, = ax.plot(xs, mean, label=f"{m} (lr {lr:g}, {len(curves)} seeds)",
                        ls="--" if m.startswith("topk") else "-")
        ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], alpha=0.15,
                        color=line.get_color())
    ax.set(xlabel="round", ylabel="test accuracy", title=f"{suite}: accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    sparse = [(m, lr) for m, lr in sorted(members) if not m.startswith("fedavg")]
    finals = {}
    for m, lr in sparse:
        rows = [r for r in metrics(f"{m}-lr{lr:g}-seed{seeds[0]}") if "layer_sparsity" in r]
        if rows:
            finals[m] = rows[-1]["layer_sparsity"]
    if finals:
        layers = list(next(iter(finals.values())))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(finals)
        for i, (m, sp) in enumerate(finals.items()):
            ax.bar([j + i * width for j in range(len(layers))],
                   [1 - sp[name] for name in layers], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
        ax.set_xticklabels([name.removesuffix(".weight") for name in layers], rotation=70,
                           fontsize=7)
        ax.set(ylabel="density (non-zero fraction)", yscale="log",
               title=f"{suite}: per-layer density of the final global model (seed "
                     f"{seeds[0]})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "layer_density.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    # edge_density.png: the first (stem) and last (classifier) layer's density per round,
    # every seed: global top-k can empty either, and nothing routes around them
    runs = {(m, s): [r for r in metrics(f"{m}-lr{lr:g}-seed{s}") if "layer_sparsity" in r]
            for m, lr in sparse for s in seeds}
    runs = {k: v for k, v in runs.items() if v}
    if runs:
        names = list(next(iter(runs.values()))[0]["layer_sparsity"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        colors = {m: f"C{i}" for i, (m, _) in enumerate(sparse)}
        for ax, name in zip(axes, (names[0], names[-1])):
            for (m, s), rows in runs.items():
                ax.plot([r["round"] for r in rows],
                        [1 - r["layer_sparsity"][name] for r in rows], color=colors[m],
                        ls="-" if s == seeds[0] else ":", lw=1.2,
                        label=f"{m} seed {s}")
            ax.set(xlabel="round", title=name.removesuffix(".weight"))
            ax.set_yscale("symlog", linthresh=0.01)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("density (non-zero fraction)")
        axes[1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"{suite}: first and last layer density per round")
        fig.tight_layout()
        paths.append(out / "edge_density.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def tables_width(suite: str, out: Path) -> str:
    width, lrs, seeds = WIDTHS[suite]
    head = ("| experiment (start lr) | seeds | accuracy, last 10% of evals (%) | best (%) | "
            "global sparsity (%) | MB up / round | MB down / round | up: less than dense |"
            + TIME_HEAD + "\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [_row(out, f"{m} ({lr:g})", f"{m}-lr{lr:g}", seeds) for m, lr in lrs.items()]
    return f"### ResNet-18 at width {width}\n{head}\n" + "\n".join(rows) + "\n"


def run_width_suite(suite: str, jobs: int, out: Path, only: list[str] | None) -> None:
    width, lrs, seeds = WIDTHS[suite]
    root = ROOT / "configs" / "fmnist-resnet"
    todo = [(root / f"{m}.toml", s, lr) for m, lr in lrs.items() if not only or m in only
            for s in seeds]
    with ThreadPoolExecutor(jobs) as pool:
        for msg in pool.map(lambda j: run_one(j[0], j[1], out, j[2], [f"model.width={width}"]),
                            todo):
            print(msg, flush=True)


def suite_tables(suite: str, out: Path, seeds: list[int], plots: Path | None) -> str:
    """The tables of one suite from the runs under `out` (markdown), and its plots written
    to `plots` (sweep suites); nothing is trained."""
    if suite in WIDTHS:
        return tables_width(suite, out)
    if suite in SWEEPS:
        text = tables_sweep(suite, out, seeds)
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            for path in plots_sweep(suite, out, seeds):
                shutil.move(str(path), plots / path.name)
                print(f"plot: {plots / path.name}")
        return text
    return {"fmnist": tables, "decentralized": tables_decentralized,
            "agnostic": tables_agnostic}[suite](out, seeds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--suite", choices=SUITES, help="default fmnist (with --tables: every "
                    "suite the archive holds)")
    ap.add_argument("--out", help="default results/<suite>")
    ap.add_argument("--only", nargs="*", help="experiment names (default: all)")
    ap.add_argument("--tables-only", action="store_true",
                    help="tables from results/<suite> (your own runs), no training")
    ap.add_argument("--tables", action="store_true",
                    help="tables and plots of docs/results.md from the committed archive "
                         "(docs/results/data), no training")
    ap.add_argument("--no-plots", action="store_true", help="with --tables: tables only")
    args = ap.parse_args()
    if args.tables:
        suites = [args.suite] if args.suite else [x for x in SUITES if (DATA / x).is_dir()]
        for suite in suites:
            if not (DATA / suite).is_dir():
                print(f"{suite}: no archived runs in {DATA / suite}", file=sys.stderr)
                return 1
            print(f"## {suite}\n")
            plots = None if args.no_plots else ROOT / "docs" / "results" / suite
            print(suite_tables(suite, DATA / suite, args.seeds, plots))
        return 0
    suite = args.suite or "fmnist"
    out = Path(args.out or f"results/{suite}")
    out.mkdir(parents=True, exist_ok=True)
    cfgs = ROOT / "configs"
    if suite in WIDTHS:
        if not args.tables_only:
            run_width_suite(suite, args.jobs, out, args.only)
    elif suite in SWEEPS:
        root = cfgs / ("fmnist" if suite == "fmnist-lr" else suite)
        if not args.tables_only:
            run_sweep_suite(suite, root, out, args.seeds, args.jobs, args.only)
    else:
        root = cfgs / suite
        order = {"fmnist": FMNIST, "decentralized": DECENTRALIZED, "agnostic": AGNOSTIC}[suite]
        names = args.only or order
        if not args.tables_only:
            jobs = [(root / f"{n}.toml", s) for n in names for s in args.seeds]
            with ThreadPoolExecutor(args.jobs) as pool:
                for msg in pool.map(lambda j: run_one(j[0], j[1], out), jobs):
                    print(msg, flush=True)
                dirs = [out / f"{n}-seed{s}" for n in ANALYZE.get(suite, [])
                        for s in args.seeds if n in names]
                for msg in pool.map(analyze_one, dirs):
                    print(msg, flush=True)
    text = suite_tables(suite, out, args.seeds, out)
    (out / "tables.md").write_text(text)
    print(text)
    if not args.tables_only and args.out is None:
        print(f"archived {archive(out, suite)} finished runs in {DATA / suite} (commit them: "
              f"docs/results.md's tables are regenerated from there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
