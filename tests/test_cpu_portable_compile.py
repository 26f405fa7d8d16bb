"""The C++ CPU kernels compile for aarch64 (GH200, Graviton): the x86 paths (AVX2/AVX-512
intrinsics, target attributes, function multiversioning) are guarded and the portable
paths stand alone.  Checked with a cross compiler where one is installed
(Debian: g++-aarch64-linux-gnu); code generation at -O0 is what rejects x86-only attributes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler "
                    "(apt-get install g++-aarch64-linux-gnu)")
def test_cpu_sources_compile_for_aarch64():
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    procs = {src.name: subprocess.Popen(
        [CROSS, "-std=c++17", "-c", "-O0", "-fopenmp", *includes, str(src), "-o", os.devnull],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for src in sorted((ROOT / "csrc" / "cpu").rglob("*.cpp"))}
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            failed[name] = err[-3000:]
    assert not failed, failed
