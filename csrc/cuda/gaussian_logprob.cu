// CUDA kernels of pxpo::gaussian_logprob and its backward (SPEC §1-2). One thread handles
// a pack of VEC consecutive pixels (16-byte loads) across all channels; per-image means
// use one block per image and a deterministic block reduction.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../pxpo_checks.h"
#include "cuda_utils.cuh"

namespace pxpo::cuda {
namespace {

// Element or pixel log-probs: out is (B, C, h, w) or (B, h, w) in the compute type T.
template <typename scalar_t, typename T, int VEC, bool ELEMENT>
__global__ void __launch_bounds__(kThreads)
    logprob_spatial_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean,
                           const T* __restrict__ std_b, T* __restrict__ out, int64_t batch, int64_t channels,
                           int64_t packs) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < batch * packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / packs, v = i % packs;
    const StdTerms<T> s = std_terms(std_b[b]);
    Pack<T, VEC> acc = fill_pack<VEC>(T(0));
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t pi = (b * channels + c) * packs + v;
      const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, pi), mp = load_pack<VEC>(mean, pi);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
        if constexpr (ELEMENT) {
          acc.v[k] = -d * d * s.half_inv_var - s.log_norm;
        } else {
          acc.v[k] += d * d;
        }
      }
      if constexpr (ELEMENT) store_pack<VEC>(out, pi, acc);
    }
    if constexpr (!ELEMENT) {
      const T norm = static_cast<T>(channels) * s.log_norm;
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc.v[k] = -acc.v[k] * s.half_inv_var - norm;
      store_pack<VEC>(out, i, acc);
    }
  }
}

// DDPO's per-image mean log-prob: one block per image.
template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    logprob_mean_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean,
                        const T* __restrict__ std_b, T* __restrict__ out, int64_t image_packs) {
  __shared__ T shared[kWarps];
  const int64_t b = blockIdx.x;
  T sq[1] = {T(0)};
  for (int64_t v = threadIdx.x; v < image_packs; v += blockDim.x) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, b * image_packs + v), mp = load_pack<VEC>(mean, b * image_packs + v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
      sq[0] += d * d;
    }
  }
  block_sum(sq, shared);
  if (threadIdx.x == 0) {
    const StdTerms<T> s = std_terms(std_b[b]);
    out[b] = -(sq[0] / static_cast<T>(image_packs * VEC)) * s.half_inv_var - s.log_norm;
  }
}

// grad_mean = grad(unit) * (x - mean) / sigma^2, with the unit's grad divided by C*h*w for means.
template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    logprob_backward_kernel(const T* __restrict__ grad, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ mean, const T* __restrict__ std_b,
                            scalar_t* __restrict__ grad_mean, int64_t batch, int64_t channels, int64_t packs,
                            int64_t granularity) {
  const int64_t total = batch * channels * packs;
  const T inv_n = T(1) / static_cast<T>(channels * packs * VEC);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / (channels * packs), v = i % packs;
    const T inv_var = std_terms(std_b[b]).inv_var;
    Pack<T, VEC> g;
    if (granularity == kElement) {
      g = load_pack<VEC>(grad, i);
    } else if (granularity == kPixel) {
      g = load_pack<VEC>(grad, b * packs + v);
    } else {
      g = fill_pack<VEC>(grad[b] * inv_n);
    }
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, i), mp = load_pack<VEC>(mean, i);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
      out.v[k] = static_cast<scalar_t>(g.v[k] * d * inv_var);
    }
    store_pack<VEC>(grad_mean, i, out);
  }
}

at::Tensor gaussian_logprob_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& std_in,
                                 int64_t granularity) {
  check_latents(x_in, mean_in, std_in);
  check_granularity(granularity);
  check_cuda_latent_dtype(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous(), std_b = as_compute(std_in, dt);
  at::Tensor out = at::empty(unit_shape(x, granularity), x.options().dtype(dt));
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  PXPO_DISPATCH_CUDA_LATENTS(x.scalar_type(), "pxpo_gaussian_logprob_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t packs = pixels / VEC;
      if (granularity == kMean) {
        logprob_mean_kernel<scalar_t, T, VEC><<<batch, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
            out.mutable_data_ptr<T>(), channels * packs);
      } else if (granularity == kElement) {
        logprob_spatial_kernel<scalar_t, T, VEC, true><<<grid_for(batch * packs, device), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
            out.mutable_data_ptr<T>(), batch, channels, packs);
      } else {
        logprob_spatial_kernel<scalar_t, T, VEC, false><<<grid_for(batch * packs, device), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
            out.mutable_data_ptr<T>(), batch, channels, packs);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (can_pack<scalar_t>(pixels, {&x, &mean, &out})) {
      launch(std::integral_constant<int, kVec<scalar_t>>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

at::Tensor gaussian_logprob_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean_in,
                                          const at::Tensor& std_in, int64_t granularity) {
  check_latents(x_in, mean_in, std_in);
  check_granularity(granularity);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(unit_shape(x_in, granularity)),
              "pxpo: gaussian_logprob_backward: grad must have the shape of the log-probs, ",
              at::IntArrayRef(unit_shape(x_in, granularity)), ", got ", grad_in.sizes());
  check_cuda_latent_dtype(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor std_b = as_compute(std_in, dt), grad = as_compute(grad_in, dt);
  at::Tensor grad_mean = at::empty_like(mean, at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  PXPO_DISPATCH_CUDA_LATENTS(x.scalar_type(), "pxpo_gaussian_logprob_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t packs = pixels / VEC;
      logprob_backward_kernel<scalar_t, T, VEC><<<grid_for(batch * channels * packs, device), kThreads, 0, stream>>>(
          grad.const_data_ptr<T>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
          std_b.const_data_ptr<T>(), grad_mean.mutable_data_ptr<scalar_t>(), batch, channels, packs, granularity);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (can_pack<scalar_t>(pixels, {&x, &mean, &grad_mean, &grad})) {
      launch(std::integral_constant<int, kVec<scalar_t>>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return grad_mean;
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CUDA, m) {
  m.impl("gaussian_logprob", &gaussian_logprob_cuda);
  m.impl("gaussian_logprob_backward", &gaussian_logprob_backward_cuda);
}

}  // namespace pxpo::cuda
