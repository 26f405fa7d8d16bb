"""SAM/ASAM perturb+restore workloads on ResNet-18-shaped parameters.

Each workload is one perturb + restore of every parameter, the part of a SAM step the
fused kernels replace (the two forward/backward passes and the base optimizer step are
the same either way).  The eager baselines are written here the way davda54/sam does it:
per-tensor norms stacked into a global norm, a clone of every weight, e = (w²)·g·scale,
add_, and `p.data = old_p` to restore.

bytes/param is what each implementation moves for fp32 parameters, counted from its
passes (reads + writes, see ../shared/specs/kernels.md); GB/s = bytes moved / time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparsefl.bench.report import Workload, report
from sparsefl.bench.timing import measure_interleaved
from sparsefl.optim._perturbation import Perturbation


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """ResNet-18 with the CIFAR stem: 62 tensors, 11,173,962 parameters for 10 classes."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def make_tensors(shapes, seed: int, dtype=torch.float32, device="cpu") -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]


@torch.no_grad()
def eager_sam_step(params: list[Tensor], grads: list[Tensor], rho: float, adaptive: bool) -> None:
    """davda54-style first_step followed by its restore."""
    norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * g).norm(p=2)
                                   for p, g in zip(params, grads)]), p=2)
    scale = rho / (norm + 1e-12)
    old = []
    for p, g in zip(params, grads):
        old.append(p.data.clone())
        p.add_((torch.pow(p, 2) if adaptive else 1.0) * g * scale.to(p))
    for p, o in zip(params, old):
        p.data = o


def sam_workloads(shapes=None, device: str = "cpu", backend: str | None = None,
                  seed: int = 0) -> tuple[list[Workload], int]:
    shapes = shapes or resnet18_shapes()
    params = make_tensors(shapes, seed, device=device)
    grads = make_tensors(shapes, seed + 1, device=device)
    n = sum(p.numel() for p in params)
    flat_src = torch.cat([p.flatten() for p in params])
    flat_dst = torch.empty_like(flat_src)
    rho = [0.05] * len(params)

    def fused(adaptive: bool, restore: str) -> Callable[[], None]:
        pert = Perturbation(restore=restore, backend=backend)
        flags = [adaptive] * len(params)

        def run() -> None:
            pert.apply(params, grads, rho, flags, 0.0, 1e-12)
            pert.restore()

        return run

    workloads = [
        Workload("copy (x.copy_)", lambda: flat_dst.copy_(flat_src), 8 * n, None),
        Workload("SAM eager (davda54 way)", lambda: eager_sam_step(params, grads, 0.05, False),
                 32 * n, None),
        Workload("SAM fused (swap restore)", fused(False, "swap"), 16 * n,
                 "SAM eager (davda54 way)"),
        Workload("SAM fused (in place + copy restore)", fused(False, "copy"), 28 * n,
                 "SAM eager (davda54 way)"),
        Workload("ASAM eager (davda54 adaptive)",
                 lambda: eager_sam_step(params, grads, 0.05, True), 72 * n, None),
        Workload("ASAM fused (swap restore)", fused(True, "swap"), 20 * n,
                 "ASAM eager (davda54 adaptive)"),
    ]
    return workloads, n


def run(rounds: int = 30, device: str = "cpu", backend: str | None = None) -> str:
    workloads, n = sam_workloads(device=device, backend=backend)
    results = measure_interleaved({w.name: w.fn for w in workloads}, rounds=rounds)
    head = (f"SAM/ASAM perturb+restore, ResNet-18 shapes ({n:,} fp32 params in "
            f"{len(resnet18_shapes())} tensors), device={device}, "
            f"threads={torch.get_num_threads()}, {rounds} rounds\n\n")
    return head + report(results, workloads, n, "copy (x.copy_)")
