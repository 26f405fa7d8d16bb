"""One ResNet-18 width-64 client step at batch 64 (forward + backward), 95% and 99% weight
sparsity: plain torch, the dense Powerprop path and the sparse path, interleaved (median
of 5), and the step's peak memory at 95% (issue #25 item 4).  To run the AVX2 code paths
of torch, oneDNN and our kernels on an AVX-512 machine:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SPARSEFL_DISABLE_AVX512=1 \
        .venv/bin/python scripts/bench_step_isa.py
"""

import json

import torch

from sparsefl.bench.sparse_train import _step, make_step, step_memory
from sparsefl.bench.timing import measure_interleaved
from sparsefl.machine import describe, line

torch.set_num_threads(2)
print(line(describe()), "torch", torch.backends.cpu.get_cpu_capability(), flush=True)
for d in (0.05, 0.01):
    fns = {}
    for mode in ("plain", "dense", "sparse"):
        model, x, y = make_step("resnet18", 64, d, mode)
        fns[mode] = _step(model, x, y)
    t = measure_interleaved(fns, rounds=5, warmup=1)
    ms = {k: v.median_s * 1e3 for k, v in t.items()}
    print(f"sparsity {1 - d:.0%}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
          + f" | sparse vs plain {ms['plain'] / ms['sparse']:.2f}x, "
          f"vs dense {ms['dense'] / ms['sparse']:.2f}x", flush=True)
mem = {m: step_memory("resnet18", 64, 0.05, m) for m in ("plain", "dense", "sparse")}
print("memory 95%:", json.dumps(mem))
