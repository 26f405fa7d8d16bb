"""What a finished run shows: a summary table and plots (accuracy, sparsity, bytes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a sparsefl run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_table(final: dict[str, Any], name: str = "") -> str:
    if not final:
        return "no rounds were run"
    rows = [("rounds", str(final["rounds"]))]
    if final.get("acc") is not None:
        rows += [("test accuracy (last)", f"{final['acc']:.4f}"),
                 ("test accuracy (mean of last 10% evals)", f"{final['acc_tail_mean']:.4f}"),
                 ("test accuracy (best)", f"{final['best_acc']:.4f}"),
                 ("global weight sparsity", f"{final['sparsity']:.4f}")]
    if "swa_acc" in final:
        rows.append(("SWA model accuracy", f"{final['swa_acc']:.4f}"))
    if "personalized" in final:
        p = final["personalized"]
        rows += [("personalised acc before fine-tuning",
                  f"{p['before_mean']:.4f} ± {p['before_std']:.4f}"),
                 ("personalised acc after fine-tuning",
                  f"{p['after_mean']:.4f} ± {p['after_std']:.4f} ({p['clients']} clients)")]
    up, down, dense = final["bytes_up"], final["bytes_down"], final["dense_bytes"]
    rows += [("bytes up (encoded)", f"{_mb(up)}  (dense would be {_mb(dense)}, "
              f"{dense / up:.1f}x less)" if up else "0"),
             ("bytes down (encoded)", f"{_mb(down)}  ({dense / down:.1f}x less than dense)"
              if down else "0"),
             ("wall time", f"{final['wall']:.1f} s")]
    total = sum(final["time"].values()) or 1.0
    rows += [(f"  {k}", f"{v:.2f} s ({100 * v / total:.0f}%)")
             for k, v in final["time"].items() if v > 0]
    width = max(len(r[0]) for r in rows)
    title = f"sparsefl run summary{': ' + name if name else ''}"
    return "\n".join([title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows])


def plot(run_dir: str | Path) -> list[Path]:
    """accuracy.png, sparsity.png and bytes.png in the run directory.  Figures are made
    without pyplot (no backend set-up, nothing global) and with fixed margins (a layout
    engine cost ~0.1 s a figure): part of keeping `sparsefl run` quick to start and end."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = load_metrics(run_dir)
    evals = [r for r in rows if "acc" in r]
    out: list[Path] = []

    def figure(name: str, draw, legend: dict) -> None:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.15, right=0.97, bottom=0.12, top=0.92)
        ax = fig.add_subplot()
        draw(ax)
        ax.grid(alpha=0.3)
        ax.legend(**legend)
        out.append(run_dir / name)
        fig.savefig(out[-1], dpi=120)

    def accuracy(ax) -> None:
        ax.plot([r["round"] for r in evals], [r["acc"] for r in evals], label="global model")
        swa = [r for r in evals if "swa_acc" in r]
        if swa:
            ax.plot([r["round"] for r in swa], [r["swa_acc"] for r in swa], label="SWA model")
        ax.set(xlabel="round", ylabel="test accuracy", title=f"{run_dir.name}: accuracy")

    def sparsity(ax) -> None:
        rounds = [r["round"] for r in evals]
        ax.plot(rounds, [r["sparsity"] for r in evals], lw=2, label="global")
        for n in sorted({k for r in evals for k in r.get("layer_sparsity", {})}):
            ax.plot(rounds, [r["layer_sparsity"].get(n, math.nan) for r in evals], lw=0.8,
                    alpha=0.7, label=n)
        ax.set(xlabel="round", ylabel="fraction of zero weights", ylim=(-0.02, 1.02),
               title=f"{run_dir.name}: weight sparsity")

    def communication(ax) -> None:
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [r["bytes_up"] / 1e6 for r in rows], label="up (encoded)")
        ax.plot(rounds, [r["bytes_down"] / 1e6 for r in rows], label="down (encoded)")
        ax.plot(rounds, [r["dense_bytes"] / 1e6 for r in rows], "--",
                label="dense fp32, each way")
        ax.set(xlabel="round", ylabel="MB per round", yscale="log",
               title=f"{run_dir.name}: communication")

    figure("accuracy.png", accuracy, {})
    figure("sparsity.png", sparsity, {"fontsize": 6, "ncol": 2})
    figure("bytes.png", communication, {})
    return out
