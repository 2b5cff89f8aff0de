#!/usr/bin/env bash
# Compiles pxpo's CUDA kernels (the .cu files of csrc/sources.txt) on a machine without a
# GPU, against the headers of a CUDA build of torch, for sm_90 (H100/H200) plus PTX.
# Fails, with the compiler's message, on the first error.
#
# Only torch's headers are needed, so the CUDA wheel is downloaded (no dependencies) and
# just its include/ folder is unpacked into a cache; nothing is installed and no venv is
# touched. The CUDA runtime headers come from the toolkit next to nvcc.
#
# Environment:
#   NVCC                   nvcc to use (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#   PYTHON                 python with pip, used to download the wheel (default: the repo's
#                          .venv/bin/python if there is one, else python3)
#   PXPO_CHECK_TORCH       torch version whose headers to compile against (default 2.14.1)
#   PXPO_CHECK_CACHE       cache folder for the wheel's headers (default ~/.cache/pxpo-cuda-check)
#   PXPO_CHECK_ARCH        compute capability, digits only (default 90)
#   PXPO_CHECK_JOBS        parallel nvcc jobs (default 2)
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
torch_version=${PXPO_CHECK_TORCH:-2.14.1}
cache=${PXPO_CHECK_CACHE:-${HOME}/.cache/pxpo-cuda-check}/torch-${torch_version}
arch=${PXPO_CHECK_ARCH:-90}
jobs=${PXPO_CHECK_JOBS:-2}
default_python=python3
[[ -x "$repo/.venv/bin/python" ]] && default_python="$repo/.venv/bin/python"
python=${PYTHON:-$default_python}

nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [[ ! -x "$nvcc" ]]; then
  echo "cuda_compile_check: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
cuda_home=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
echo "cuda_compile_check: $("$nvcc" --version | tail -n 2 | head -n 1)"

# 1. torch's headers, cached by version.
if [[ ! -f "$cache/torch/include/torch/library.h" ]]; then
  mkdir -p "$cache"
  wheel_dir=$(mktemp -d)
  trap 'rm -rf "$wheel_dir"' EXIT
  echo "cuda_compile_check: downloading torch==${torch_version} (headers only are kept)"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheel_dir" "torch==${torch_version}"
  wheel=$(ls "$wheel_dir"/torch-*.whl)
  "$python" - "$wheel" "$cache" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith("torch/include/") or n == "torch/version.py"]
    z.extractall(dest, members)
EOF
  rm -rf "$wheel_dir"
  trap - EXIT
fi
cuda_of_torch=$(sed -n "s/^cuda: Optional\[str\] = '\(.*\)'/\1/p; s/^cuda = '\(.*\)'/\1/p" "$cache/torch/version.py" | head -n 1)
echo "cuda_compile_check: torch ${torch_version} headers (built for CUDA ${cuda_of_torch:-unknown}) from $cache"

# 2. Compile every .cu of the shared source list, with torch.utils.cpp_extension's flags.
mapfile -t sources < <(grep -v '^\s*#' "$repo/csrc/sources.txt" | grep '\.cu$')
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "cuda_compile_check: no .cu files in csrc/sources.txt" >&2
  exit 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(
  -c -std=c++20 -O3 -lineinfo
  -gencode "arch=compute_${arch},code=sm_${arch}" -gencode "arch=compute_${arch},code=compute_${arch}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -DPXPO_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
  -Xcompiler -fPIC
  # A host function called from a kernel is only a warning by default; here it fails.
  -Werror cross-execution-space-call
  -isystem "$cache/torch/include" -isystem "$cache/torch/include/torch/csrc/api/include"
  -isystem "$cuda_home/include"
)
export nvcc out repo
printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -I{} bash -c '
  src={}; obj="$out/$(basename "$src").o"
  echo "cuda_compile_check: nvcc $src"
  "$nvcc" "$@" "$repo/$src" -o "$obj" || { echo "cuda_compile_check: FAILED to compile $src" >&2; exit 255; }
' _ "${flags[@]}"

echo "cuda_compile_check: OK: ${#sources[@]} CUDA sources compiled for sm_${arch} + PTX in $(( $(date +%s) - start )) s"
