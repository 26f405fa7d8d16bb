"""Workloads, the markdown table every benchmark prints, and saving a run's outputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsefl.bench.timing import Timing


@dataclass
class Workload:
    name: str
    fn: Callable[[], object]
    bytes_moved: float | None  # reads + writes of one call, by design count; None: not counted
    baseline: str | None  # the workload this one's speedup is measured against


def report(results: dict[str, Timing], workloads: list[Workload], n: int,
           copy_name: str | None = None) -> str:
    """Time, speedup vs baseline, bytes/param, GB/s and share of the copy bandwidth."""
    by_name = {w.name: w for w in workloads}
    copy_gbs = None
    if copy_name in results:
        copy_gbs = by_name[copy_name].bytes_moved / results[copy_name].median_s / 1e9
    rows = ["| workload | median ms | IQR ms | speedup | bytes/param | GB/s | % of copy BW |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in results.items():
        w = by_name[name]
        ratio = f"{results[w.baseline].median_s / t.median_s:.2f}x" if w.baseline else ""
        bpp = gbs = share = ""
        if w.bytes_moved:
            g = w.bytes_moved / t.median_s / 1e9
            bpp, gbs = f"{w.bytes_moved / n:.3g}", f"{g:.1f}"
            share = f"{100 * g / copy_gbs:.0f}%" if copy_gbs else ""
        rows.append(f"| {name} | {t.median_s * 1e3:.2f} | {t.iqr_s * 1e3:.2f} | {ratio} | "
                    f"{bpp} | {gbs} | {share} |")
    return "\n".join(rows)


def write_outputs(out_dir: str | None, stem: str, res: dict, text: str,
                  plot: Callable[[dict, Path], Path]) -> str:
    """Save a benchmark's raw result, table and figure as stem.json/.md/.png in out_dir
    (when given); returns the table text, with the written paths appended."""
    if not out_dir:
        return text
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (d / f"{stem}.md").write_text(text + "\n")
    plot(res, d / f"{stem}.png")
    return text + f"\n\nwritten: {d / f'{stem}.json'}, {d / f'{stem}.md'}, {d / f'{stem}.png'}"
