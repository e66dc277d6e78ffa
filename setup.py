"""Builds onepass._C: the native CPU kernels always, the CUDA kernels where CUDA torch + nvcc exist.

ONEPASS_BUILD_CUDA=0 forces a CPU-only build, =1 requires CUDA (and fails without it); unset, CUDA
is built when torch has CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST is respected; unset, the build
targets the GPUs this machine shows (sm_90 on an H100 / H200), or sm_90 where it shows none.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("ONEPASS_BUILD_CUDA", "auto").lower()
    available = bool(cpp_extension.CUDA_HOME) and shutil.which("nvcc") is not None
    available = available and __import__("torch").version.cuda is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not available:
            raise RuntimeError("ONEPASS_BUILD_CUDA=1 but no CUDA torch + nvcc was found")
        return True
    return available


def _visible_gpu_archs() -> str:
    """The compute capabilities of the GPUs this machine shows ("8.0;9.0"), "" if none: one
    architecture each, where torch's own default would compile for every one CUDA supports
    when it sees no GPU (minutes more per kernel file)."""
    torch = __import__("torch")
    if not torch.cuda.is_available():
        return ""
    archs = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(archs))


def _extension() -> cpp_extension.CppExtension:
    cpu_sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into
    # this extension; without the flag it silently runs on one thread. The OpenMP symbols bind to
    # the runtime torch already loaded.
    # No fused multiply-add contraction (-ffp-contract=off, nvcc --fmad=false; Triton launches
    # with enable_fp_fusion=False): every backend rounds each product and sum as the reference
    # does, so a result that cancels to ~0 (Lion's sign) or sits on a low-precision rounding
    # boundary comes out the same everywhere. The steps are memory-bound: FMAs would not pay.
    cxx = [
        "-O3",
        "-std=c++20",
        "-fno-math-errno",
        "-ffp-contract=off",
        "-fopenmp",
        "-Wall",
        "-Wno-unknown-pragmas",
    ]
    link = ["-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if _want_cuda() and cuda_sources:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _visible_gpu_archs() or "9.0"
        return cpp_extension.CUDAExtension(
            "onepass._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("ONEPASS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--fmad=false"]},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "onepass._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(
            use_ninja=shutil.which("ninja") is not None
        )
    },
)
