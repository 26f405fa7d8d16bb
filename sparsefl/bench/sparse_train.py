"""Sparse training benchmark: Powerprop layers and client steps, dense vs sparse vs auto.

    sparsefl bench sparse-train [--quick] [--rounds N] [--out DIR]

Per layer: ResNet-18 CIFAR convolutions at batch 64 (every distinct shape) and the MLP's
Linear layers at batch 32; per client step: ResNet-18 width 64 on 3x32x32 at batch 16 and
64, MLP 784-200-200-10 at batch 32.  Each at 90/95/99% weight sparsity (every layer pruned
to it by magnitude), activation pruning on at the layer's density (SparsyFed).  A pass is
forward + backward (input and weight gradients).  Modes, timed round-robin in one process:

    plain   nn.Conv2d/nn.Linear on the masked weight, no Powerprop, no activation pruning
            (what SparseProp's numbers are measured against)
    dense   set_compute(model, "dense"): today's Powerprop path (dense conv on theta,
            activation pruning by top-k compress)
    sparse  set_compute(model, "sparse"): compute on the support (sparsefl.ops.sparse_conv);
            a BatchNorm after a sparse layer recomputes its input in backward instead of
            keeping it (sparsefl/nn/recompute.py)
    keep    (client steps) set_compute(model, "sparse", recompute=False): the same, keeping
            the BatchNorm inputs: what the recompute costs in time and saves in memory
    auto    set_compute(model, "auto"): per layer the faster, as calibrated
    fused   (MLP local training, per step of forward + backward + SGD) the sparse layers'
            whole epoch in one sparsefl.ops.sparse_mlp_sgd call (sparsefl.nn.fused_sgd)

FLOPs: dense = 2 x MACs x 3 passes (2 for the first layer, no input gradient); sparse =
what the kernels perform (2 |S| per output pixel for forward and input gradient, 2 x the
kept inputs each weight of S meets for the weight gradient).  Peak memory (client steps,
95%): the resident-memory high-water mark of a fresh process across one step, minus its
resident memory before the step, plus the weights (`step_memory`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sparsefl import ops
from sparsefl.bench.sparse import copy_workload
from sparsefl.bench.timing import measure, measure_interleaved
from sparsefl.nn import set_compute
from sparsefl.nn.powerprop import POWERPROP, PowerpropConv2d, PowerpropLinear

DENSITIES = (0.10, 0.05, 0.01)

# (name, cin, cout, kernel, stride, padding, H) at batch 64: ResNet-18 CIFAR, width 64
CONV_SHAPES = [
    ("stem 3->64 3x3 @32", 3, 64, 3, 1, 1, 32),
    ("64->64 3x3 @32", 64, 64, 3, 1, 1, 32),
    ("64->128 3x3 s2 @32", 64, 128, 3, 2, 1, 32),
    ("64->128 1x1 s2 @32", 64, 128, 1, 2, 0, 32),
    ("128->128 3x3 @16", 128, 128, 3, 1, 1, 16),
    ("128->256 3x3 s2 @16", 128, 256, 3, 2, 1, 16),
    ("256->256 3x3 @8", 256, 256, 3, 1, 1, 8),
    ("256->512 3x3 s2 @8", 256, 512, 3, 2, 1, 8),
    ("512->512 3x3 @4", 512, 512, 3, 1, 1, 4),
]
LINEAR_SHAPES = [("Linear 784->200", 784, 200), ("Linear 200->200", 200, 200),
                 ("Linear 200->10", 200, 10)]


@torch.no_grad()
def prune_layers(model: nn.Module, density: float) -> None:
    """Every Powerprop layer to `density` by magnitude; activation density = weight density."""
    for m in model.modules():
        if isinstance(m, POWERPROP):
            m.weight.mul_(ops.topk_mask(m.weight, density))
            m.act_density = density


def _plain(m: nn.Module) -> nn.Module:
    """An nn.Conv2d/nn.Linear with the Powerprop layer's theta as weight."""
    with torch.no_grad():
        theta = m.weight.sign() * m.weight.abs().pow(m.beta)
        if isinstance(m, PowerpropConv2d):
            p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          bias=m.bias is not None)
        else:
            p = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        p.weight.copy_(theta)
        if m.bias is not None:
            p.bias.copy_(m.bias)
    return p


@dataclass
class LayerCase:
    name: str
    layer: nn.Module
    x: torch.Tensor
    dense_flops: float


def layer_cases(density: float, quick: bool = False, seed: int = 0) -> list[LayerCase]:
    g = torch.Generator().manual_seed(seed)
    out = []
    convs = CONV_SHAPES[:2] + CONV_SHAPES[4:5] if quick else CONV_SHAPES
    for name, cin, cout, k, s, p, h in convs:
        torch.manual_seed(seed)
        m = PowerpropConv2d(cin, cout, k, s, p, bias=False, beta=1.25)
        x = torch.randn(64, cin, h, h, generator=g)
        if cin != 3:
            x = x.relu()  # a hidden layer's input is post-ReLU
        x.requires_grad_(cin != 3)
        oh = (h + 2 * p - k) // s + 1
        macs = 64 * cout * oh * oh * cin * k * k
        out.append(LayerCase(name, m, x, 2 * macs * (2 if cin == 3 else 3)))
    for name, cin, cout in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
        torch.manual_seed(seed)
        m = PowerpropLinear(cin, cout, beta=1.25)
        x = torch.randn(32, cin, generator=g).relu().requires_grad_(True)
        out.append(LayerCase(name, m, x, 2 * 32 * cin * cout * 3))
    for c in out:
        prune_layers(c.layer, density)
    return out


def sparse_flops(m: nn.Module, x: torch.Tensor) -> float:
    """FLOPs the sparse kernels perform for one forward + backward of layer m on x."""
    from sparsefl.ops import keep_count

    nnz = int((m.weight != 0).sum())
    if isinstance(m, PowerpropConv2d):
        n, c, h, w = x.shape
        oh, ow = m(x.detach()).shape[2:]
        s = m.stride[0] * m.stride[1]
        pix = n * oh * ow
    else:
        n, c, s, pix = x.shape[0], x.shape[-1], 1, x.shape[0]
    kept = keep_count(x.numel(), m.act_density) if m.act_density < 1 else int((x != 0).sum())
    fwd = 2 * nnz * pix
    dx = fwd if x.requires_grad else 0
    dw = 2 * nnz * kept / (c * s)  # each weight meets the kept inputs of its channel, phase
    return fwd + dx + dw


def _pass(m: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    def run():
        y = m(x)
        wrt = [x, m.weight] if x.requires_grad else [m.weight]
        return torch.autograd.grad(y, wrt, gy)
    return run


def bench_layers(rounds: int, quick: bool) -> list[dict]:
    rows = []
    for d in DENSITIES:
        for case in layer_cases(d, quick):
            m = case.layer
            m.train()
            gy = torch.randn(m(case.x.detach()).shape)
            plain = _plain(m)
            variants = {}
            for mode in ("dense", "sparse", "auto"):
                mm = copy.deepcopy(m)
                choice = set_compute(mm, mode, sample=case.x.detach())
                variants[mode] = (mm, next(iter(choice.values())))
            fns = {"plain": _pass(plain, case.x, gy)}
            fns.update({k: _pass(v[0], case.x, gy) for k, v in variants.items()})
            t = measure_interleaved(fns, rounds=rounds, warmup=1)
            rows.append({
                "layer": case.name, "density": d,
                "plain_ms": t["plain"].median_s * 1e3, "dense_ms": t["dense"].median_s * 1e3,
                "sparse_ms": t["sparse"].median_s * 1e3, "auto_ms": t["auto"].median_s * 1e3,
                "auto_choice": variants["auto"][1],
                "dense_gflop": case.dense_flops / 1e9,
                "sparse_gflop": sparse_flops(variants["sparse"][0], case.x) / 1e9,
            })
    return rows


def _models(name: str):
    from sparsefl.models.mlp import MLP
    from sparsefl.models.resnet import ResNet18
    from sparsefl.nn import sparsify

    torch.manual_seed(0)
    if name == "resnet18":
        return sparsify(ResNet18((3, 32, 32), 10, 64), 1.25), (3, 32, 32)
    return sparsify(MLP((1, 28, 28), 10, (200, 200)), 1.25), (1, 28, 28)


STEPS = [("resnet18", 64), ("resnet18", 16), ("mlp", 32)]


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def run():
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
    return run


def make_step(name: str, batch: int, density: float, mode: str):
    """(model, x, y) for one client step in `mode` (plain = the same masked model as plain
    nn layers)."""
    model, shape = _models(name)
    prune_layers(model, density)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if mode == "plain":
        for parent in list(model.modules()):
            for cname, child in list(parent.named_children()):
                if isinstance(child, POWERPROP):
                    setattr(parent, cname, _plain(child))
    elif mode == "keep":
        set_compute(model, "sparse", sample=x, recompute=False)
    else:  # recompute always: the memory column shows what it saves at any size
        set_compute(model, mode, sample=x, recompute=True)
    model.train()
    return model, x, y


def bench_steps(rounds: int, quick: bool) -> list[dict]:
    rows = []
    steps = STEPS[:1] + STEPS[2:] if quick else STEPS
    for name, batch in steps:
        for d in ((0.05,) if quick else DENSITIES):
            fns, choices = {}, {}
            for mode in ("plain", "dense", "sparse", "keep", "auto"):
                model, x, y = make_step(name, batch, d, mode)
                fns[mode] = _step(model, x, y)
                if mode == "auto":
                    choices = {n: m.compute for n, m in model.named_modules()
                               if isinstance(m, POWERPROP)}
            t = measure_interleaved(fns, rounds=rounds, warmup=1)
            rows.append({"model": name, "batch": batch, "density": d,
                         **{f"{k}_ms": v.median_s * 1e3 for k, v in t.items()},
                         "auto_sparse_layers": sum(c == "sparse" for c in choices.values()),
                         "layers": len(choices)})
    return rows


# Local training (forward + backward + SGD, per step over an epoch of TRAIN_BATCHES
# batches): the MLPs whose steps are small enough for the framework's cost to dominate.
TRAIN_MODELS = [("digits MLP 64-128-128-10", (1, 8, 8), (128, 128), 16),
                ("MLP 784-200-200-10", (1, 28, 28), (200, 200), 32)]
TRAIN_BATCHES = 20
TRAIN_MODES = ("plain", "dense", "sparse", "fused")


def make_training(shape: tuple[int, ...], hidden: tuple[int, ...], batch: int,
                  density: float, mode: str):
    """A function that runs one epoch of local_train (lr 0: the weights stay as they are,
    so every call does the same work) in `mode`: plain = nn.Linear on the masked weights
    and torch SGD; dense / sparse = Powerprop layers on that path, the step loop; fused =
    sparse, every step in one sparse_mlp_sgd call."""
    from sparsefl.fl import config as flconfig
    from sparsefl.fl.client import local_train
    from sparsefl.models.mlp import MLP
    from sparsefl.nn import sparsify

    torch.manual_seed(0)
    model = sparsify(MLP(shape, 10, hidden), 1.25)
    prune_layers(model, density)
    g = torch.Generator().manual_seed(1)
    n = TRAIN_BATCHES * batch
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    cfg = flconfig.load(None, ["client.epochs=1", f"client.batch_size={batch}",
                               f"client.fused={'true' if mode == 'fused' else 'false'}"]).client
    if mode == "plain":
        for parent in list(model.modules()):
            for cname, child in list(parent.named_children()):
                if isinstance(child, POWERPROP):
                    setattr(parent, cname, _plain(child))
    else:
        set_compute(model, "dense" if mode == "dense" else "sparse", sample=x[:batch])
    return lambda: local_train(model, x, y, cfg, 0.0, torch.Generator().manual_seed(2))


def bench_training(rounds: int, quick: bool) -> list[dict]:
    rows = []
    for name, shape, hidden, batch in TRAIN_MODELS:
        for d in ((0.1, 0.05) if quick else (1.0, *DENSITIES)):
            fns = {m: make_training(shape, hidden, batch, d, m) for m in TRAIN_MODES}
            t = measure_interleaved(fns, rounds=rounds, warmup=1)
            rows.append({"model": name, "batch": batch, "density": d,
                         **{f"{k}_us": v.median_s * 1e6 / TRAIN_BATCHES
                            for k, v in t.items()}})
    return rows


def _fmt_training(rows: list[dict]) -> str:
    out = ["| model | batch | sparsity | plain us | dense us | sparse us | fused us | "
           "fused vs plain | fused vs dense | fused vs sparse |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {1 - r['density']:.0%} | "
                   f"{r['plain_us']:.0f} | {r['dense_us']:.0f} | {r['sparse_us']:.0f} | "
                   f"{r['fused_us']:.0f} | {r['plain_us'] / r['fused_us']:.2f}x | "
                   f"{r['dense_us'] / r['fused_us']:.2f}x | "
                   f"{r['sparse_us'] / r['fused_us']:.2f}x |")
    return "\n".join(out)


def step_memory(name: str, batch: int, density: float, mode: str) -> dict:
    """Peak memory of one client step, measured in a fresh process (resident set high-water
    mark, with malloc returning large blocks to the OS so that it tracks live memory)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = ("import json,sys; from sparsefl.bench.sparse_train import _memory_child; "
            f"print(json.dumps(_memory_child({name!r}, {batch}, {density}, {mode!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(name: str, batch: int, density: float, mode: str) -> dict:
    model, x, y = make_step(name, batch, density, mode)
    step = _step(model, x, y)
    step()  # warm-up: first-call allocations (thread pools, kernels) out of the measure
    for p in model.parameters():
        p.grad = None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to now
        f.write("5")
    step()
    peak = _rss_kb("VmHWM")
    return {"weights_mb": weights / 2**20, "step_peak_mb": (peak - base) / 1024,
            "total_mb": weights / 2**20 + (peak - base) / 1024}


def bench_memory(quick: bool) -> list[dict]:
    rows = []
    for name, batch in (STEPS[:1] if quick else STEPS):
        row = {"model": name, "batch": batch, "density": 0.05}
        for mode in ("plain", "dense", "sparse", "keep"):
            row[mode] = step_memory(name, batch, 0.05, mode)
        rows.append(row)
    return rows


def _fmt_layers(rows: list[dict]) -> str:
    # the headline ratio is against plain torch (what a user would otherwise run)
    out = ["| layer | sparsity | plain ms | dense ms | sparse ms | auto ms (choice) | "
           "**sparse vs plain** | sparse vs dense | GFLOP dense | GFLOP sparse |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['layer']} | {1 - r['density']:.0%} | {r['plain_ms']:.2f} | "
                   f"{r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['auto_ms']:.2f} "
                   f"({r['auto_choice']}) | {r['plain_ms'] / r['sparse_ms']:.2f}x | "
                   f"{r['dense_ms'] / r['sparse_ms']:.2f}x | {r['dense_gflop']:.3f} | "
                   f"{r['sparse_gflop']:.4f} |")
    return "\n".join(out)


def _fmt_steps(rows: list[dict]) -> str:
    out = ["| model | batch | sparsity | plain ms | dense ms | sparse ms | keep ms | auto ms | "
           "**sparse vs plain** | auto vs plain | sparse vs dense | keep vs dense | "
           "auto vs dense | auto: sparse layers |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['batch']} | {1 - r['density']:.0%} | "
                   f"{r['plain_ms']:.1f} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
                   f"{r['keep_ms']:.1f} | "
                   f"{r['auto_ms']:.1f} | {r['plain_ms'] / r['sparse_ms']:.2f}x | "
                   f"{r['plain_ms'] / r['auto_ms']:.2f}x | {r['dense_ms'] / r['sparse_ms']:.2f}x | "
                   f"{r['dense_ms'] / r['keep_ms']:.2f}x | "
                   f"{r['dense_ms'] / r['auto_ms']:.2f}x | "
                   f"{r['auto_sparse_layers']}/{r['layers']} |")
    return "\n".join(out)


def _fmt_memory(rows: list[dict]) -> str:
    out = ["| model | batch | sparsity | plain MB | dense MB | sparse MB | keep MB | "
           "sparse / dense | keep / dense | sparse / plain |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, d, s, k = (r[m]["total_mb"] for m in ("plain", "dense", "sparse", "keep"))
        out.append(f"| {r['model']} | {r['batch']} | {1 - r['density']:.0%} | {p:.0f} | "
                   f"{d:.0f} | {s:.0f} | {k:.0f} | {s / d:.3f} | {k / d:.3f} | "
                   f"{s / p:.2f} |")
    return "\n".join(out)


def run(rounds: int = 5, quick: bool = False, out_dir: str | None = None,
        memory: bool = True) -> str:
    n = 1 << 24
    copy_t = measure(copy_workload(n).fn, rounds=10)
    copy_gbs = 8 * n / copy_t.median_s / 1e9
    from sparsefl import machine

    res = {"threads": torch.get_num_threads(), "copy_gbs": copy_gbs,
           "machine": machine.describe(),
           "layers": bench_layers(rounds, quick), "steps": bench_steps(rounds, quick),
           "training": bench_training(rounds, quick)}
    if memory:
        res["memory"] = bench_memory(quick)
    text = (f"Sparse training on {machine.line(res['machine'])}, {res['threads']} threads; "
            f"copy bandwidth {copy_gbs:.1f} GB/s "
            "(read + write).\n\nPer layer (forward + backward; batch 64 convs, 32 linear):\n\n"
            + _fmt_layers(res["layers"]) + "\n\nPer client step (forward + backward):\n\n"
            + _fmt_steps(res["steps"])
            + "\n\nLocal training of an MLP, per step (forward + backward + SGD, an epoch of "
            f"{TRAIN_BATCHES} batches; fused = every step in one sparse_mlp_sgd call):\n\n"
            + _fmt_training(res["training"]))
    if memory:
        text += ("\n\nPeak memory of a client step (weights + the step's resident high-water "
                 "mark):\n\n" + _fmt_memory(res["memory"]))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sparse_train.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(out_dir, "sparse_train.md"), "w") as f:
            f.write(text + "\n")
        text += f"\n\nwritten: {out_dir}/sparse_train.json, {out_dir}/sparse_train.md"
    return text
