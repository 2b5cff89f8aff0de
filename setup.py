"""Builds the native extension ``pxpo_ext._C`` (package metadata lives in pyproject.toml).

Install torch first, then build against it without build isolation (so pip never fetches
another torch)::

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

The CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit
(``nvcc``, found through ``CUDA_HOME``) and a CUDA build of torch are both present; no GPU
is needed to compile them. Environment switches (documented in docs/build.md):

- ``PXPO_FORCE_CUDA=1``: build the CUDA kernels or fail with the reason.
- ``PXPO_NO_CUDA=1``: build the CPU kernels only.
- ``PXPO_DEBUG=1``: ``-O0 -g`` instead of ``-O3``.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default: the visible GPU's, else every
  architecture this torch was built for).
- ``MAX_JOBS``: parallel compile jobs (torch's ninja build).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # build isolation hides the installed torch
    raise SystemExit(
        "pxpo's native build needs torch installed first and no build isolation:\n"
        "    pip install torch==2.13.0\n"
        "    pip install --no-build-isolation -e .\n"
        f"(import failed: {e})"
    ) from e


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def native_sources() -> tuple[list[str], list[str]]:
    """The C++ and CUDA sources of csrc/sources.txt (the list CMakeLists.txt reads too)."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    files = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [f for f in files if f.endswith(".cpp")], [f for f in files if f.endswith(".cu")]


def package_version() -> str:
    text = (ROOT / "pxpo_ext" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def build_cuda() -> bool:
    if _flag("PXPO_NO_CUDA"):
        return False
    # torch.utils.cpp_extension only looks for a toolkit when torch itself is a CUDA build.
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    elif cpp_extension.CUDA_HOME is None:
        missing = "no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)"
    else:
        return True
    if _flag("PXPO_FORCE_CUDA"):
        raise SystemExit(f"PXPO_FORCE_CUDA=1 but the CUDA kernels cannot be built: {missing}")
    return False


def default_arch_list() -> None:
    """Without a visible GPU, compile for every architecture this torch build supports."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    # torch.cuda.get_arch_list() is empty without a GPU; the build's own flags are not.
    flags = (getattr(torch._C, "_cuda_getArchFlags", lambda: None)() or "").split()
    archs = sorted({f[3:] for f in flags if f.startswith("sm_") and f[3:].isdigit()}, key=int)
    if archs:
        versions = [f"{a[:-1]}.{a[-1]}" for a in archs]
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(versions[:-1] + [versions[-1] + "+PTX"])


def extension():
    cpp_sources, cuda_sources = native_sources()
    opt = ["-O0", "-g"] if _flag("PXPO_DEBUG") else ["-O3"]
    # -fno-trapping-math: the CPU kernels never read the floating-point exception flags, and without it GCC
    # will not turn their per-unit selects into branch-free code, so their loops stay scalar (docs/build.md).
    cxx = opt + ["-fno-trapping-math", f'-DPXPO_VERSION="{package_version()}"']
    link = []
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")  # at::parallel_for compiles to OpenMP only with it
        link.append("-fopenmp")
    common = dict(name="pxpo_ext._C", extra_link_args=link)
    if build_cuda():
        default_arch_list()
        nvcc = opt + ["-lineinfo", f'-DPXPO_VERSION="{package_version()}"']
        return cpp_extension.CUDAExtension(
            sources=cpp_sources + cuda_sources,
            define_macros=[("PXPO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **common,
        )
    return cpp_extension.CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx}, **common)


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import native_sources
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )
