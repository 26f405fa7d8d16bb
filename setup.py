"""Build sparsefl and its native extension sparsefl._C.

C++ CPU kernels (csrc/cpu) are always built; CUDA kernels (csrc/cuda) are added when the
torch in the build environment has CUDA and nvcc is found.  Build against the torch that
will run the code: `pip install --no-build-isolation .` (see README).

SPARSEFL_NO_EXT=1 skips the extension entirely (pure-Python install; sparsefl then runs
on its reference ops and says so once at import).
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def extensions() -> tuple[list, dict]:
    if os.environ.get("SPARSEFL_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/module.cpp"]
    extra = {"cxx": CXX_FLAGS + os.environ.get("SPARSEFL_CXXFLAGS", "").split()}
    ldflags = ["-fopenmp"] + os.environ.get("SPARSEFL_LDFLAGS", "").split()
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("SPARSEFL_NO_CUDA") == "1":
        use_cuda = False
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        extra["nvcc"] = NVCC_FLAGS if arch else NVCC_FLAGS + [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
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


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["sparsefl", "sparsefl.*"]) + ["sparsefl.triton_kernels"],
    package_dir={"sparsefl.triton_kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
