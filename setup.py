"""Build sparsefl and its native extension sparsefl._C.

C++ CPU kernels (csrc/cpu) are always built; CUDA kernels (csrc/cuda) are added when the
torch in the build environment has CUDA and nvcc is found.  The extension must be built
against the torch that will run it, so build without isolation:

    pip install torch            # any build: CPU or CUDA
    pip install --no-build-isolation .

With pip's default build isolation the build environment has no torch (pyproject.toml
does not list it on purpose: pip would fetch one that need not match the runtime torch)
and setup.py stops with one line saying the above.

SPARSEFL_NO_EXT=1 skips the extension (pure-Python install on the reference ops).
SPARSEFL_NO_CUDA=1 builds the CPU kernels only.  TORCH_CUDA_ARCH_LIST overrides the GPU
architectures; by default every one of ARCHS that the toolkit supports, plus PTX of the
newest so that newer GPUs JIT-compile it.  CUDA_HOME (or CUDA_PATH) picks the toolkit;
without it, the toolkit is asked from nvcc itself (/usr/local/bin/nvcc is often a
wrapper script or a symlink, so its parent directory is not the toolkit).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# Volta .. Blackwell; CUDA 13 dropped sm_70, so the toolkit decides what remains
ARCHS = ("70", "75", "80", "86", "89", "90", "100", "120")
NO_TORCH = ("sparsefl: building the C++ kernels needs the torch that will run them, and this "
            "build environment has none (pip's build isolation): install torch first, then "
            "`pip install --no-build-isolation .` (or set SPARSEFL_NO_EXT=1 for a pure-Python "
            "install on the reference ops)")


def cuda_home() -> str | None:
    """The CUDA toolkit's root: CUDA_HOME / CUDA_PATH, else where nvcc really lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "probe.cu").write_text("")
        try:
            proc = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], cwd=d, timeout=60,
                                  capture_output=True, text=True)
            text = proc.stdout + proc.stderr
        except (OSError, subprocess.SubprocessError):
            text = ""
    m = re.search(r"^#\$ TOP=(.+?)\s*$", text, re.MULTILINE)
    if m:  # nvcc's own idea of its toolkit: <root>/bin/..
        return os.path.realpath(m.group(1))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def gencode_flags(nvcc: str) -> list[str]:
    """-gencode for each of ARCHS the toolkit knows, plus PTX of the newest."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                                timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    have = {a.removeprefix("compute_") for a in listed}
    archs = [a for a in ARCHS if a in have] or ["80", "90"]  # old nvcc: no --list-gpu-arch
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def have_zlib() -> bool:
    """zlib's header and library, for the codec's CRC-32 in C++ (optional)."""
    import ctypes.util
    import sysconfig

    dirs = ["/usr/include", "/usr/local/include", sysconfig.get_paths()["include"],
            *os.environ.get("CPATH", "").split(":")]
    return ctypes.util.find_library("z") is not None and any(
        d and os.path.exists(os.path.join(d, "zlib.h")) for d in dirs)


def extensions() -> tuple[list, dict]:
    if os.environ.get("SPARSEFL_NO_EXT") == "1":
        return [], {}
    home = cuda_home()
    if home is not None:  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("CUDA_HOME", home)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(NO_TORCH)

    sources = sorted(glob.glob("csrc/cpu/**/*.cpp", recursive=True)) + ["csrc/module.cpp"]
    extra = {"cxx": CXX_FLAGS + os.environ.get("SPARSEFL_CXXFLAGS", "").split()}
    ldflags = ["-fopenmp"] + os.environ.get("SPARSEFL_LDFLAGS", "").split()
    if have_zlib():  # the codec's checksum in C++ (else Python's zlib computes it)
        extra["cxx"].append("-DSPARSEFL_HAVE_ZLIB")
        ldflags.append("-lz")
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("SPARSEFL_NO_CUDA") == "1":
        use_cuda = False
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        # TORCH_CUDA_ARCH_LIST set: torch adds the matching -gencode flags itself
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        extra["nvcc"] = NVCC_FLAGS if arch else NVCC_FLAGS + gencode_flags(nvcc)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="sparsefl._C",
        sources=sources,
        extra_compile_args=extra,
        extra_link_args=ldflags,
        depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
        py_limited_api=False,
    )
    cmd = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmd


if __name__ == "__main__":  # pip (setuptools.build_meta) and `python setup.py` alike
    ext_modules, cmdclass = extensions()
    setup(
        packages=find_packages(include=["sparsefl", "sparsefl.*"]) + ["sparsefl.triton_kernels"],
        package_dir={"sparsefl.triton_kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
