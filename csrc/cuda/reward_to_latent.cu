// CUDA kernel of pxpo::reward_to_latent: weighted adaptive average pooling (SPEC §3).
// One thread per latent pixel sums its block of image pixels; no reduction crosses
// threads, so the result is deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "../pxpo_checks.h"
#include "cuda_utils.cuh"

namespace pxpo::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_kernel(const T* __restrict__ reward, const T* __restrict__ weight, T* __restrict__ r_out,
                T* __restrict__ w_out, int64_t batch, int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < batch * h * w;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = o / (h * w), i = (o / w) % h, j = o % w;
    const int64_t r0 = pool_start(i, in_h, h), r1 = pool_end(i, in_h, h);
    const int64_t c0 = pool_start(j, in_w, w), c1 = pool_end(j, in_w, w);
    const T* rb = reward + b * in_h * in_w;
    double num = 0, den = 0;
    for (int64_t y = r0; y < r1; ++y) {
      for (int64_t xx = c0; xx < c1; ++xx) {
        const double rv = rb[y * in_w + xx];
        if (weight != nullptr) {
          const double wv = weight[b * in_h * in_w + y * in_w + xx];
          num += wv * rv;
          den += wv;
        } else {
          num += rv;
        }
      }
    }
    const double area = static_cast<double>((r1 - r0) * (c1 - c0));
    if (weight != nullptr) {
      r_out[o] = static_cast<T>(den > 0 ? num / den : 0.0);
      w_out[o] = static_cast<T>(den / area);
    } else {
      r_out[o] = static_cast<T>(num / area);
      w_out[o] = T(1);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> reward_to_latent_cuda(const at::Tensor& reward_in,
                                                         const std::optional<at::Tensor>& weight_in, int64_t h,
                                                         int64_t w) {
  check_reward_args(reward_in, weight_in, h, w);
  const c10::cuda::CUDAGuard guard(reward_in.device());
  const auto dt = compute_dtype(reward_in);
  const at::Tensor reward = as_compute(reward_in, dt);
  const at::Tensor weight = weight_in.has_value() ? as_compute(*weight_in, dt) : at::Tensor();
  const int64_t batch = reward.size(0), in_h = reward.size(1), in_w = reward.size(2);
  at::Tensor r = at::empty({batch, h, w}, reward.options());
  at::Tensor wl = at::empty({batch, h, w}, reward.options());
  const int device = reward.get_device();
  AT_DISPATCH_FLOATING_TYPES(dt, "pxpo_reward_to_latent_cuda", [&] {
    pool_kernel<scalar_t><<<grid_for(batch * h * w, device), kThreads, 0, c10::cuda::getCurrentCUDAStream(device)>>>(
        reward.const_data_ptr<scalar_t>(), weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr,
        r.mutable_data_ptr<scalar_t>(), wl.mutable_data_ptr<scalar_t>(), batch, in_h, in_w, h, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {r, wl};
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CUDA, m) { m.impl("reward_to_latent", &reward_to_latent_cuda); }

}  // namespace pxpo::cuda
