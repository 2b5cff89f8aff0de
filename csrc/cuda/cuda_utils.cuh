// Pieces shared by the pxpo CUDA kernels: vector (16-byte) loads and stores, a
// deterministic block reduction, launch helpers. Only c10/cuda headers are used (no
// cuBLAS), so the kernels compile with nothing but nvcc and torch's headers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>

namespace pxpo::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// N consecutive values moved as one aligned load or store (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The pack width for a latent dtype: 16 bytes per load.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t pack_index) {
  return reinterpret_cast<const Pack<T, N>*>(base)[pack_index];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t pack_index, const Pack<T, N>& p) {
  reinterpret_cast<Pack<T, N>*>(base)[pack_index] = p;
}

// Asks for pack `pack_index`'s line to be brought into L2, without waiting for it.
template <int N, typename T>
__device__ __forceinline__ void prefetch_pack(const T* base, int64_t pack_index) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const Pack<T, N>*>(base) + pack_index));
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> fill_pack(T value) {
  Pack<T, N> p;
#pragma unroll
  for (int k = 0; k < N; ++k) p.v[k] = value;
  return p;
}

// Sums K values over the block in a fixed order (warp shuffles, then warp 0 over the
// warps' sums), so the result is bit-identical from run to run. Every thread gets the
// totals. `shared` holds THREADS / 32 * K values; blockDim.x must be THREADS.
template <int K, int THREADS = kThreads, typename T>
__device__ __forceinline__ void block_sum(T (&v)[K], T* shared) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "a block of whole warps");
  constexpr int warps = THREADS / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) shared[warp * K + k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < warps ? shared[lane * K + k] : T(0);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) shared[k] = v[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = shared[k];
}

inline bool is_aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Whether VEC = kVec<scalar_t> packs may be used: every plane of `pixels` values splits into
// whole packs and every defined tensor (latents and float per-unit tensors alike) is
// aligned to one pack of its own dtype. Otherwise the kernels run with VEC = 1.
template <typename scalar_t>
inline bool can_pack(int64_t pixels, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int vec = kVec<scalar_t>;
  if (pixels % vec != 0) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && !is_aligned(t->const_data_ptr(), vec * t->element_size())) return false;
  return true;
}

// The latent dtypes of the CUDA kernels. float64 is left out on purpose (it would double the
// compile time for no training use); gradchecks in float64 run on the CPU backend.
#define PXPO_DISPATCH_CUDA_LATENTS(TYPE, NAME, ...)                                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                  \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline void check_cuda_latent_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "pxpo: the CUDA kernels take float32, float16 or bfloat16 latents, got ", x.scalar_type(),
              "; run float64 (e.g. gradcheck) on the CPU backend");
}

// Streaming multiprocessors of a device, queried once per device.
inline int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride launches: enough blocks to fill the device a few times over, no more than the work.
inline int64_t grid_for(int64_t work_items, int device) {
  const int64_t blocks = ceil_div(work_items, kThreads);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  return blocks < 1 ? 1 : (blocks < cap ? blocks : cap);
}

}  // namespace pxpo::cuda
