"""The GPU machine report of scripts/gpu-check.sh: HBM bandwidth measured by a copy, each
kernel's time, GB/s and share of that bandwidth (CUDA face and Triton face side by side,
each against its eager anchors: torch.topk and a kthvalue threshold for top-k, index_add_
for the aggregation, the davda54-style loop for SAM, per-tensor .cpu() copies for the
codec's device-side pack), and one federated round on the GPU
against the same round on the eager references.

    python -m sparsefl.bench.gpu_report --out DIR [--full] [--dry-run]

Writes DIR/gpu_report.json and DIR/gpu_report.md after every section (a cut run keeps
what it measured).  Needs a CUDA device, except with --dry-run: the same code on the CPU
at toy sizes (the C++ face), so a lent GPU's minutes go to measuring, not debugging.
Exit status 3 when torch sees a GPU but the extension has no CUDA kernels (a CPU-only
build): every CUDA number would silently be missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sparsefl.bench import round as round_bench
from sparsefl.bench.report import report
from sparsefl.bench.sam import sam_workloads
from sparsefl.bench.sparse import aggregate_workloads, codec_pack_workloads, topk_workloads
from sparsefl.bench.timing import measure, measure_interleaved


def copy_bandwidth(device: str, mib: int = 1024) -> float:
    """GB/s of a device-to-device copy of `mib` MiB (read + write counted)."""
    n = mib * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    t = measure(lambda: dst.copy_(src), rounds=20, warmup=3)
    return 8 * n / t.median_s / 1e9


def _rows(results, workloads, n: int, hbm: float) -> list[dict[str, Any]]:
    by = {w.name: w for w in workloads}
    rows = []
    for name, t in results.items():
        w = by[name]
        gbs = w.bytes_moved / t.median_s / 1e9 if w.bytes_moved else None
        rows.append({"workload": name, "median_ms": t.median_s * 1e3, "iqr_ms": t.iqr_s * 1e3,
                     "speedup": (results[w.baseline].median_s / t.median_s
                                 if w.baseline else None),
                     "bytes_per_param": w.bytes_moved / n if w.bytes_moved else None,
                     "gb_s": gbs, "pct_of_hbm_copy": 100 * gbs / hbm if gbs else None})
    return rows


TOY_SHAPES = [(64, 3, 3, 3), (128, 64, 3, 3), (10, 128)]  # the dry run's "model"


def main(out_dir: str, quick: bool = True, dry_run: bool = False) -> dict[str, Any]:
    from sparsefl import _native
    from sparsefl.ops import _backend

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("sparsefl.bench.gpu_report: torch sees no CUDA device (--dry-run "
                         "runs the report's code on the CPU)")
    dev = "cpu" if dry_run else "cuda"
    t0 = time.perf_counter()
    if dry_run:
        name, cap, mem = "CPU dry run (no GPU numbers)", "-", 0.0
    else:
        props = torch.cuda.get_device_properties(0)
        name, cap = props.name, f"{props.major}.{props.minor}"
        mem = round(props.total_memory / 2**30, 1)
    res: dict[str, Any] = {
        "gpu": name, "capability": cap, "memory_gib": mem, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "driver": _driver(), "dry_run": dry_run,
        "cuda_kernels": _native.has_cuda_kernels(),
        "cuda_image_error": None if dry_run else _backend.cuda_image_error(torch.device(dev)),
        "triton": "skipped (dry run)" if dry_run else
        (_backend.triton_error(torch.device(dev)) or "ok"),
    }
    hbm = copy_bandwidth(dev, mib=16 if dry_run else 1024)
    res["hbm_copy_gb_s"] = hbm
    rounds = 2 if dry_run else 5 if quick else 30
    if dry_run:
        backends = ["cpp"] if _native.has_cpu_kernels() else ["reference"]
    else:
        backends = [b for b, ok in (("cuda", res["cuda_kernels"] and not res["cuda_image_error"]),
                                    ("triton", res["triton"] == "ok")) if ok]
    shapes = TOY_SHAPES if dry_run else None
    res["kernels"] = {}
    text = [f"# sparsefl on {name} (sm {cap}), torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, driver {res['driver']}", "",
            f"{'Memory' if dry_run else 'HBM'} bandwidth measured by a "
            f"{'16 MiB' if dry_run else '1 GiB'} device copy: **{hbm:.0f} GB/s** (read + "
            "write). GB/s below counts each kernel's design reads + writes; % is of that "
            "copy.", ""]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a time limit still leaves a report
        res["seconds"] = time.perf_counter() - t0
        (out / "gpu_report.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_report.md").write_text("\n".join(text) + "\n")

    if not dry_run and not res["cuda_kernels"]:
        text += ["**The extension has no CUDA kernels** (a CPU-only build on a GPU host): "
                 "only the Triton face is measured; rebuild with nvcc.", ""]
    cases = ((2, 0.05),) if dry_run else ((10, 0.05),) if quick else (
        (10, 0.05), (100, 0.05), (100, 0.01))
    for be in backends:
        for what, make in (("sam", lambda b: sam_workloads(shapes, device=dev, backend=b)),
                           ("topk", lambda b: topk_workloads(device=dev, backend=b,
                                                             shapes=shapes)),
                           ("aggregate", lambda b: aggregate_workloads(
                               cases=cases, device=dev, backend=b, shapes=shapes)),
                           ("codec pack", lambda b: codec_pack_workloads(
                               device=dev, shapes=shapes))):
            if what == "codec pack" and be != backends[0]:
                continue  # torch ops only: one face
            workloads, n = make(be)
            timed = measure_interleaved({w.name: w.fn for w in workloads}, rounds=rounds,
                                        warmup=2)
            res["kernels"][f"{what}/{be}"] = _rows(timed, workloads, n, hbm)
            text += [f"## {what}, backend {be} ({'toy' if dry_run else 'ResNet-18'} shapes, "
                     f"{n:,} params)", "",
                     report(timed, workloads, n, "copy (x.copy_)"), ""]
            print(f"gpu report: {what}/{be} done ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            save()
    model, clients, per = ("mlp", 2, 16) if dry_run else ("resnet18", 10, 64)
    rb = round_bench.run(model, clients=clients, per_client=per, rounds=1, threads=0,
                         device=dev)
    res["round"] = rb
    text += [f"## One SparsyFed + FedSAM round on the {'CPU' if dry_run else 'GPU'} "
             f"({model}, {clients} clients x {per}), engine vs eager, per phase", "",
             round_bench.table(rb), ""]
    save()
    return res


def _driver() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", action="store_true", help="30 timing rounds instead of 5")
    ap.add_argument("--dry-run", action="store_true",
                    help="the report's code on the CPU at toy sizes (no GPU numbers)")
    args = ap.parse_args()
    r = main(args.out, quick=not args.full, dry_run=args.dry_run)
    print(f"gpu report: {args.out}/gpu_report.md ({r['seconds']:.0f} s)")
    sys.exit(3 if not args.dry_run and not r["cuda_kernels"] else 0)
