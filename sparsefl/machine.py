"""What CPU this is: model name and the ISA the C++ kernels pick (benchmarks name it beside
every table; `auto` keys its recorded layer decisions by it).

Dense torch runs 2-5x slower on AVX2-only VMs than on AVX-512 ones, so every table names
the ISA beside its numbers.  The choice mirrors csrc/cpu/simd.h's `isa()` (the same CPU
flags and the same SPARSEFL_DISABLE_AVX512 / SPARSEFL_DISABLE_AVX2 switches).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def kernel_isa() -> str:
    """"AVX-512", "AVX2" or "portable": the code path the C++ kernels run here."""
    _, flags = _cpuinfo()
    if os.environ.get("SPARSEFL_DISABLE_AVX2") != "1":
        if os.environ.get("SPARSEFL_DISABLE_AVX512") != "1" and \
                {"avx512f", "avx512vl", "avx512dq"} <= flags:
            return "AVX-512"
        if {"avx2", "fma"} <= flags:
            return "AVX2"
    return "portable"


def describe() -> dict[str, str | int]:
    """CPU model, the kernels' ISA, whether the CPU has AVX-512 at all, and core count."""
    model, flags = _cpuinfo()
    return {"cpu": model, "isa": kernel_isa(),
            "cpu_avx512": "yes" if "avx512f" in flags else "no",
            "cores": os.cpu_count() or 0}


def line(info: dict | None = None) -> str:
    """One line for a table's header: 'AMD EPYC, kernels AVX-512, 2 cores'."""
    d = info or describe()
    return f"{d['cpu']}, kernels {d['isa']}, {d['cores']} cores"
