"""How the server-side kernels scale: with model size, with client count, against the
bytes they must move, and how much memory the server holds (issue #7, item 3).

Sweeps (fp32 values, int32 indices, 5% density, 2 threads unless told):
- model size n = 1M .. 50M, 10 clients: aggregation (fused tiled merge vs index_add_ loop)
  and the global top-k mask (radix select vs torch.topk);
- clients C = 10 .. 200 at ResNet-18 size: aggregation, and the clients' top-k total;
- server peak memory vs C, each point in a fresh process (peak RSS, VmHWM, reset just
  before the server starts): the engine's streaming server (`ops.SparseAccumulator`)
  against a server that buffers every payload and aggregates once.

The floor on every time plot is the bytes the kernel must move divided by the copy
bandwidth measured in the same run (copy counted as 8 B/param, as in the other tables).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from sparsefl import ops
from sparsefl.bench.report import write_outputs
from sparsefl.bench.sparse import copy_workload, index_add_aggregate
from sparsefl.bench.timing import measure, measure_interleaved

RESNET18 = 11_173_962
DENSITY = 0.05


def payload(n: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted random int32 indices (uniform gaps, mean 1/density) and fp32 values."""
    g = torch.Generator().manual_seed(seed)
    mean_gap = 1.0 / density
    gaps = torch.randint(1, int(2 * mean_gap), (int(n * density * 1.1) + 16,), generator=g)
    idx = torch.cumsum(gaps, 0) - 1
    idx = idx[idx < n].int()
    return idx, torch.randn(idx.numel(), generator=g)


def copy_gbs(n: int = RESNET18, rounds: int = 10) -> float:
    copy = copy_workload(n)  # the same copy row as the other tables, 8 B/param
    return copy.bytes_moved / measure(copy.fn, rounds=rounds).median_s / 1e9


def _aggregate_point(n: int, C: int, rounds: int, eager: bool) -> dict[str, Any]:
    pays = [payload(n, DENSITY, seed=1000 * C + c) for c in range(C)]
    w = [1.0 / C] * C
    base, out = torch.randn(n), torch.empty(n)
    fns = {"fused": lambda: ops.sparse_aggregate(pays, w, out=out, base=base)}
    if eager:
        pays64 = [(i.long(), v) for i, v in pays]
        fns["eager"] = lambda: index_add_aggregate(pays64, w, base)
    res = measure_interleaved(fns, rounds=rounds, warmup=1)
    entries = sum(i.numel() for i, _ in pays)
    return {"n": n, "clients": C, "entries": entries,
            "bytes": 8 * entries + 8 * n,  # payloads (int32 + fp32) + read base + write out
            "fused_s": res["fused"].median_s,
            "eager_s": res["eager"].median_s if eager else None}


def _topk_point(n: int, copies: int, rounds: int, eager: bool) -> dict[str, Any]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = ops.keep_count(n, DENSITY)

    def torch_topk():
        thr = torch.topk(x.abs(), k, sorted=False).values.min()
        return x.abs() >= thr

    fns = {"fused": lambda: [ops.topk_mask(x, DENSITY) for _ in range(copies)]}
    if eager:
        fns["eager"] = lambda: [torch_topk() for _ in range(copies)]
    res = measure_interleaved(fns, rounds=rounds, warmup=1)
    return {"n": n, "clients": copies, "bytes": copies * 5 * n,  # read |x| once, write a bool
            "fused_s": res["fused"].median_s,
            "eager_s": res["eager"].median_s if eager else None}


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch
    from sparsefl import ops
    from sparsefl.bench.scaling import payload
    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    torch.set_num_threads(2)
    n, C, mode, density = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    model = torch.randn(n)                      # the global model the server keeps
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    before = status("VmRSS:")
    if mode == "stream":                        # the engine's server: merge as they arrive
        acc = ops.SparseAccumulator(n, group=16)
        for c in range(C):
            acc.add(payload(n, density, seed=c), 1.0)
        new = acc.result(divisor=C, base=model)
    else:                                       # buffer every payload, aggregate once
        pays = [payload(n, density, seed=c) for c in range(C)]
        new = ops.sparse_aggregate(pays, [1.0 / C] * C, base=model)
    print(json.dumps({"grown_bytes": (status("VmHWM:") - before) * 1024}))
""")


def server_memory(n: int, C: int, mode: str, density: float = DENSITY) -> int:
    """Peak RSS growth (bytes) of a server aggregating C payloads, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), str(C), mode,
                           str(density)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr[-1000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["grown_bytes"])


def _linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    t = torch.tensor([xs, ys], dtype=torch.float64)
    x, y = t[0], t[1]
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    a = float(y.mean() - b * x.mean())
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return a, b, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def run(sizes=(1_000_000, 5_000_000, RESNET18, 25_000_000, 50_000_000),
        clients=(10, 25, 50, 100, 200), size_clients: int = 10, client_n: int = RESNET18,
        memory_n: int = RESNET18, rounds: int = 5, eager_max: int = 100,
        threads: int = 2, progress=print) -> dict[str, Any]:
    """All sweeps; `eager_max`: largest client count (and n/1M) timed on the eager path."""
    if threads:
        torch.set_num_threads(threads)
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "density": DENSITY,
                           "copy_gbs": copy_gbs(), "agg_size": [], "agg_clients": [],
                           "topk_size": [], "topk_clients": [], "memory": []}
    for n in sizes:
        progress(f"model size {n:,}: aggregation and top-k")
        res["agg_size"].append(_aggregate_point(n, size_clients, rounds, eager=True))
        res["topk_size"].append(_topk_point(n, 1, rounds, eager=True))
    for nc in clients:
        progress(f"{nc} clients: aggregation, top-k, server memory")
        res["agg_clients"].append(_aggregate_point(client_n, nc, rounds, eager=nc <= eager_max))
        res["topk_clients"].append(_topk_point(client_n, nc, max(1, rounds // 2),
                                               eager=nc <= size_clients))
        res["memory"].append({"clients": nc,
                              "stream": server_memory(memory_n, nc, "stream"),
                              "buffer_all": server_memory(memory_n, nc, "buffer_all")})
    res["memory_n"] = memory_n
    pts = res["agg_size"] + res["agg_clients"]
    res["agg_fit"] = dict(zip(("a_s", "s_per_byte", "r2"), _linear_fit(
        [p["bytes"] for p in pts], [p["fused_s"] for p in pts])))
    mem = res["memory"]
    res["memory_fit"] = {mode: dict(zip(("a_bytes", "bytes_per_client", "r2"), _linear_fit(
        [m["clients"] for m in mem], [m[mode] for m in mem]))) for mode in ("stream",
                                                                             "buffer_all")}
    return res


def table(res: dict[str, Any]) -> str:
    bw = res["copy_gbs"] * 1e9
    rows = [f"scaling, {res['threads']} threads, density {res['density']:.0%}, int32 indices, "
            f"fp32 values; copy bandwidth {res['copy_gbs']:.1f} GB/s (floor = bytes / that)",
            "", "| sweep | n | clients | bytes moved | floor ms | fused ms | eager ms | "
            "eager / fused | fused / floor |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("agg_size", "aggregate"), ("agg_clients", "aggregate"),
                       ("topk_size", "top-k mask"), ("topk_clients", "top-k (all clients)")):
        for p in res[key]:
            floor = p["bytes"] / bw
            eager = p["eager_s"]
            rows.append(f"| {label} | {p['n']:,} | {p['clients']} | {p['bytes'] / 1e6:,.0f} MB"
                        f" | {floor * 1e3:.1f} | {p['fused_s'] * 1e3:.1f} | "
                        + (f"{eager * 1e3:.1f} | {eager / p['fused_s']:.1f}x" if eager
                           else "— | ") + f" | {p['fused_s'] / floor:.1f}x |")
    fit = res["agg_fit"]
    rows.append(f"\naggregation (fused) time vs bytes moved, least squares over all points: "
                f"{fit['a_s'] * 1e3:.1f} ms + bytes / {1 / fit['s_per_byte'] / 1e9:.2f} GB/s, "
                f"R² = {fit['r2']:.4f}")
    rows += ["", f"server peak memory (RSS growth, fresh process, n = {res['memory_n']:,}):",
             "", "| clients | streaming (engine) MB | buffer all payloads MB |",
             "|---:|---:|---:|"]
    for m in res["memory"]:
        rows.append(f"| {m['clients']} | {m['stream'] / 1e6:,.0f} | "
                    f"{m['buffer_all'] / 1e6:,.0f} |")
    for mode, f in res["memory_fit"].items():
        rows.append(f"\n{mode}: {f['bytes_per_client'] / 1e6:+.2f} MB per extra client "
                    f"(R² {f['r2']:.3f})")
    return "\n".join(rows)


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = res["copy_gbs"] * 1e9
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    for key, marker, label in (("agg_size", "o", "vs model size"),
                               ("agg_clients", "s", "vs clients")):
        pts = res[key]
        xs = [p["bytes"] / 1e9 for p in pts]
        ax.plot(xs, [p["fused_s"] * 1e3 for p in pts], marker, label=f"fused, {label}")
        e = [(x, p["eager_s"] * 1e3) for x, p in zip(xs, pts) if p["eager_s"]]
        ax.plot(*zip(*e), marker, mfc="none", label=f"index_add_, {label}")
    allx = sorted(p["bytes"] for p in res["agg_size"] + res["agg_clients"])
    ax.plot([x / 1e9 for x in allx], [x / bw * 1e3 for x in allx], "k--",
            label="bytes / copy bandwidth")
    ax.set(xscale="log", yscale="log", xlabel="bytes moved (GB)", ylabel="ms",
           title="aggregation time vs payload bytes")
    ax.legend(fontsize=7)
    ax = axes[1]
    pts = res["topk_size"]
    ns = [p["n"] / 1e6 for p in pts]
    ax.plot(ns, [p["fused_s"] * 1e3 for p in pts], "o-", label="radix select (fused)")
    ax.plot(ns, [p["eager_s"] * 1e3 for p in pts], "o--", mfc="none", label="torch.topk")
    ax.plot(ns, [p["bytes"] / bw * 1e3 for p in pts], "k--", label="bytes floor")
    ax.set(xscale="log", yscale="log", xlabel="model size (M params)", ylabel="ms",
           title="global top-k mask (5%) vs model size")
    ax.legend(fontsize=7)
    ax = axes[2]
    for key, label in (("agg_clients", "aggregate"), ("topk_clients", "top-k, all clients")):
        pts = res[key]
        cs = [p["clients"] for p in pts]
        ax.plot(cs, [p["fused_s"] * 1e3 for p in pts], "o-", label=f"{label} (fused)")
        ax.plot(cs, [p["bytes"] / bw * 1e3 for p in pts], ":", label=f"{label} floor")
        e = [(p["clients"], p["eager_s"] * 1e3) for p in pts if p["eager_s"]]
        if e:
            ax.plot(*zip(*e), "o--", mfc="none", label=f"{label} (eager)")
    ax.set(xscale="log", yscale="log", xlabel="clients", ylabel="ms",
           title=f"vs client count (n = {res['agg_clients'][0]['n'] / 1e6:.1f}M)")
    ax.legend(fontsize=7)
    ax = axes[3]
    mem = res["memory"]
    cs = [m["clients"] for m in mem]
    ax.plot(cs, [m["stream"] / 1e6 for m in mem], "o-", label="streaming (engine)")
    ax.plot(cs, [m["buffer_all"] / 1e6 for m in mem], "s--", label="buffer all payloads")
    ax.set(xlabel="clients", ylabel="peak RSS growth (MB)", ylim=(0, None),
           title=f"server peak memory (n = {res['memory_n'] / 1e6:.1f}M)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(out_dir: str | None, quick: bool = False, threads: int = 2) -> str:
    kw: dict[str, Any] = {"threads": threads}
    if quick:  # a minute-scale smoke run
        kw.update(sizes=(200_000, 1_000_000), clients=(4, 16), client_n=500_000,
                  memory_n=1_000_000, rounds=2)
    res = run(**kw, progress=lambda m: print(m, file=sys.stderr, flush=True))
    return write_outputs(out_dir, "scaling", res, table(res), plot)
