"""Install paths (setup.py): pip's default build isolation stops with one clear line, the
CUDA toolkit is found through nvcc itself, and the GPU architecture list ends in PTX."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")  # no setup() call


def _pip_wheel(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    if proc.returncode and ("No matching distribution" in proc.stderr
                            or "Could not find a version" in proc.stderr):
        pytest.skip("pip cannot fetch setuptools/wheel/ninja for an isolated build here")
    return proc


@pytest.mark.slow
def test_pip_with_build_isolation_stops_with_one_clear_line(tmp_path):
    proc = _pip_wheel(tmp_path, {})
    assert proc.returncode != 0
    assert "pip install --no-build-isolation ." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.whl"))


@pytest.mark.slow
def test_pure_python_wheel_builds_with_isolation(tmp_path):
    proc = _pip_wheel(tmp_path, {"SPARSEFL_NO_EXT": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("sparsefl-*.whl"))) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_home_is_the_toolkit_nvcc_belongs_to(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = Path(SETUP["cuda_home"]())
    assert (home / "bin" / "nvcc").is_file()
    assert list(home.glob("**/include/cuda_runtime.h")), f"{home} has no CUDA headers"
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    assert SETUP["cuda_home"]() == "/opt/my-cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_architectures_cover_the_toolkit_and_end_in_ptx():
    flags = SETUP["gencode_flags"](shutil.which("nvcc"))
    listed = subprocess.run([shutil.which("nvcc"), "--list-gpu-arch"], capture_output=True,
                            text=True).stdout.split()
    have = {a.removeprefix("compute_") for a in listed}
    want = [a for a in SETUP["ARCHS"] if a in have]
    assert flags[:-1] == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in want]
    assert {"80", "90"} <= set(want)
    assert flags[-1] == f"-gencode=arch=compute_{want[-1]},code=compute_{want[-1]}"  # PTX


def test_gencode_falls_back_when_nvcc_cannot_list(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    assert SETUP["gencode_flags"](str(fake))[-1] == "-gencode=arch=compute_90,code=compute_90"
