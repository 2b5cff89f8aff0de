// CPU kernel of pxpo::reward_to_latent: weighted adaptive average pooling (SPEC §3).
// Every output pixel is written by exactly one task, so the result does not depend on
// the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../pxpo_checks.h"
#include "cpu_tasks.h"

namespace pxpo::cpu {
namespace {

// Adds one input row into the column sums: col_num += w * r and col_den += w (WEIGHTED), or col_num += r.
template <typename T, bool WEIGHTED>
PXPO_SIMD_CLONES void add_row(const T* __restrict r, const T* __restrict w, T* __restrict col_num,
                              T* __restrict col_den, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    if constexpr (WEIGHTED) {
      col_num[x] += w[x] * r[x];
      col_den[x] += w[x];
    } else {
      col_num[x] += r[x];
    }
  }
}

// Sums over one block: sum w * r and sum w (WEIGHTED), or sum r. For one output row, the block's
// input rows are first added column by column in T (contiguous, vectorised loops), then each
// block adds its columns in double.
template <typename T, bool WEIGHTED>
void pool_kernel(const T* __restrict reward, const T* __restrict weight, T* __restrict r_out, T* __restrict w_out,
                 int64_t batch, int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  // One task per output row of one image.
  for_each_task(batch * h, ((in_h + h - 1) / h + 1) * in_w, [&](int64_t task) {
    const int64_t b = task / h, i = task % h;
    const int64_t r0 = pool_start(i, in_h, h), r1 = pool_end(i, in_h, h);
    const T* rb = reward + b * in_h * in_w;
    const T* wb = WEIGHTED ? weight + b * in_h * in_w : nullptr;
    std::vector<T> col(WEIGHTED ? 2 * in_w : in_w, T(0));  // column sums: w * r (or r), then w
    T* __restrict col_num = col.data();
    T* __restrict col_den = WEIGHTED ? col.data() + in_w : nullptr;
    for (int64_t y = r0; y < r1; ++y) {
      add_row<T, WEIGHTED>(rb + y * in_w, WEIGHTED ? wb + y * in_w : nullptr, col_num, col_den, in_w);
    }
    for (int64_t j = 0; j < w; ++j) {
      const int64_t c0 = pool_start(j, in_w, w), c1 = pool_end(j, in_w, w);
      double num = 0, den = 0;
      for (int64_t xx = c0; xx < c1; ++xx) {
        num += col_num[xx];
        if constexpr (WEIGHTED) den += col_den[xx];
      }
      const double area = static_cast<double>((r1 - r0) * (c1 - c0));
      const int64_t o = task * w + j;
      if constexpr (WEIGHTED) {
        r_out[o] = static_cast<T>(den > 0 ? num / den : 0.0);
        w_out[o] = static_cast<T>(den / area);
      } else {
        r_out[o] = static_cast<T>(num / area);
        w_out[o] = T(1);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> reward_to_latent_cpu(const at::Tensor& reward_in,
                                                        const std::optional<at::Tensor>& weight_in, int64_t h,
                                                        int64_t w) {
  check_reward_args(reward_in, weight_in, h, w);
  const auto dt = compute_dtype(reward_in);
  const at::Tensor reward = as_compute(reward_in, dt);
  const at::Tensor weight = weight_in.has_value() ? as_compute(*weight_in, dt) : at::Tensor();
  const int64_t batch = reward.size(0), in_h = reward.size(1), in_w = reward.size(2);
  at::Tensor r = at::empty({batch, h, w}, reward.options());
  at::Tensor wl = at::empty({batch, h, w}, reward.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "pxpo_reward_to_latent_cpu", [&] {
    const auto kernel = weight.defined() ? pool_kernel<scalar_t, true> : pool_kernel<scalar_t, false>;
    kernel(reward.const_data_ptr<scalar_t>(), weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr,
           r.mutable_data_ptr<scalar_t>(), wl.mutable_data_ptr<scalar_t>(), batch, in_h, in_w, h, w);
  });
  return {r, wl};
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CPU, m) { m.impl("reward_to_latent", &reward_to_latent_cpu); }

}  // namespace pxpo::cpu
