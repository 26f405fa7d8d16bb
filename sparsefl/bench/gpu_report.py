"""The GPU machine report of scripts/gpu-check.sh: HBM bandwidth measured by a copy, each
kernel's time, GB/s and share of that bandwidth (CUDA face and Triton face side by side),
and one federated round on the GPU against the same round on the eager references.

    python -m sparsefl.bench.gpu_report --out DIR [--quick]

Writes DIR/gpu_report.json and DIR/gpu_report.md.  Needs a CUDA device.
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
from sparsefl.bench.sparse import aggregate_workloads, topk_workloads
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


def main(out_dir: str, quick: bool = True) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("sparsefl.bench.gpu_report: torch sees no CUDA device")
    from sparsefl import _native
    from sparsefl.ops import _backend

    dev = "cuda"
    t0 = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    res: dict[str, Any] = {
        "gpu": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "cuda_kernels": _native.has_cuda_kernels(),
        "cuda_image_error": _backend.cuda_image_error(torch.device(dev)),
        "triton": _backend.triton_error(torch.device(dev)) or "ok",
    }
    hbm = copy_bandwidth(dev)
    res["hbm_copy_gb_s"] = hbm
    rounds = 5 if quick else 30
    backends = [b for b, ok in (("cuda", res["cuda_kernels"] and not res["cuda_image_error"]),
                                ("triton", res["triton"] == "ok")) if ok]
    res["kernels"] = {}
    text = [f"# sparsefl on {props.name} (sm_{props.major}{props.minor}), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}", "",
            f"HBM bandwidth measured by a 1 GiB device copy: **{hbm:.0f} GB/s** (read + "
            "write). GB/s below counts each kernel's design reads + writes; % is of that "
            "copy.", ""]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a time limit still leaves a report
        res["seconds"] = time.perf_counter() - t0
        (out / "gpu_report.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_report.md").write_text("\n".join(text) + "\n")

    cases = ((10, 0.05),) if quick else ((10, 0.05), (100, 0.05), (100, 0.01))
    for be in backends:
        for what, make in (("sam", lambda b: sam_workloads(device=dev, backend=b)),
                           ("topk", lambda b: topk_workloads(device=dev, backend=b)),
                           ("aggregate", lambda b: aggregate_workloads(
                               cases=cases, device=dev, backend=b))):
            workloads, n = make(be)
            timed = measure_interleaved({w.name: w.fn for w in workloads}, rounds=rounds,
                                        warmup=2)
            res["kernels"][f"{what}/{be}"] = _rows(timed, workloads, n, hbm)
            text += [f"## {what}, backend {be} (ResNet-18 shapes, {n:,} params)", "",
                     report(timed, workloads, n, "copy (x.copy_)"), ""]
            print(f"gpu report: {what}/{be} done ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            save()
    rb = round_bench.run("resnet18", clients=10, per_client=64, rounds=1, threads=0,
                         device=dev)
    res["round"] = rb
    text += ["## One SparsyFed + FedSAM round on the GPU (ResNet-18, 10 clients x 64)", "",
             round_bench.table(rb), ""]
    save()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", action="store_true", help="30 timing rounds instead of 10")
    args = ap.parse_args()
    r = main(args.out, quick=not args.full)
    print(f"gpu report: {args.out}/gpu_report.md ({r['seconds']:.0f} s)")
    sys.exit(0)
