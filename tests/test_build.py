"""The C++ sources stay within C++17.

pyproject allows any torch >= 2.6, and torch's extension builder picks the language standard:
torch 2.13 compiles extensions as C++20, torch 2.11 as C++17. A C++20-only construct therefore
builds here and fails on the older torch (std::bit_cast did, on a GPU machine with torch 2.11).
Compiling every C++ source of csrc/sources.txt as C++17, syntax only, catches that on any machine.
"""
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
from setup import native_sources  # importing setup.py builds nothing

CPP_SOURCES = native_sources()[0]


def _compile_cxx17(source: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    language = ["-x", "c++"] if stdin is not None else []
    command = ["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", *(f"-I{p}" for p in includes), *language, source]
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True, check=False)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_sources_compile_as_cxx17():
    assert CPP_SOURCES, "csrc/sources.txt lists no C++ sources"
    # The check needs torch headers that are C++17 themselves (2.13's are; 2.14's use <=> and are not).
    if _compile_cxx17("-", stdin="#include <torch/library.h>\n#include <ATen/Dispatch.h>\n").returncode != 0:
        pytest.skip(f"torch {torch.__version__}'s own headers need C++20, so they cannot check ours as C++17")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CPP_SOURCES, pool.map(_compile_cxx17, CPP_SOURCES)))
    failures = {src: r.stderr[-2000:] for src, r in results.items() if r.returncode != 0}
    assert not failures, "C++ sources that need more than C++17 (torch 2.11 builds extensions as C++17):\n" + "\n".join(
        f"--- {src}\n{err}" for src, err in failures.items())
