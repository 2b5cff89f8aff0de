// CPU kernel of pxpo::reward_to_latent: weighted adaptive average pooling (SPEC §3).
// Every output pixel is written by exactly one task, so the result does not depend on
// the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../pxpo_checks.h"
#include "cpu_tasks.h"
#include "lane_sums.h"

namespace pxpo::cpu {
namespace {

// Adds one input row into the column sums: col_num += w * r and col_den += w (WEIGHTED), or col_num += r.
// The first row of a block sets them instead (0 + v is v, so the sums are those of zeroed columns).
template <typename T, bool WEIGHTED, bool FIRST>
PXPO_SIMD_CLONES void add_row(const T* __restrict r, const T* __restrict w, T* __restrict col_num,
                              T* __restrict col_den, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    if constexpr (WEIGHTED) {
      col_num[x] = (FIRST ? T(0) : col_num[x]) + w[x] * r[x];
      col_den[x] = (FIRST ? T(0) : col_den[x]) + w[x];
    } else {
      col_num[x] = (FIRST ? T(0) : col_num[x]) + r[x];
    }
  }
}

// Sum in double of every column block [c0[j], c1[j]) of one row of column sums: lane_total of the
// block's lanes_in_double (lane_sums.h). The lanes of four blocks are transposed and added together,
// so that the last additions are packed too (the same additions, in the same order).
template <typename T>
PXPO_SIMD_CLONES void block_sums(const T* __restrict col, const int64_t* __restrict c0, const int64_t* __restrict c1,
                                 int64_t w, double* __restrict out) {
  int64_t j = 0;
  for (; j + 4 <= w; j += 4) {
    double4 a, b, c, d;
    lanes_in_double(col + c0[j], c1[j] - c0[j], a);
    lanes_in_double(col + c0[j + 1], c1[j + 1] - c0[j + 1], b);
    lanes_in_double(col + c0[j + 2], c1[j + 2] - c0[j + 2], c);
    lanes_in_double(col + c0[j + 3], c1[j + 3] - c0[j + 3], d);
    // ab = (a0 + a1, b0 + b1, a2 + a3, b2 + b3), cd likewise; then the halves of each are added.
    const double4 ab = __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
    const double4 cd = __builtin_shufflevector(c, d, 0, 4, 2, 6) + __builtin_shufflevector(c, d, 1, 5, 3, 7);
    const double4 sum = __builtin_shufflevector(ab, cd, 0, 1, 4, 5) + __builtin_shufflevector(ab, cd, 2, 3, 6, 7);
    std::memcpy(out + j, &sum, sizeof(sum));
  }
  for (; j < w; ++j) {
    double4 a;
    lanes_in_double(col + c0[j], c1[j] - c0[j], a);
    out[j] = lane_total(a);
  }
}

// The outputs of one row of blocks from their sums: r = num / den (0 without weight) and
// w = den / area (WEIGHTED), or r = num / area and w = 1. Vectorised over the blocks.
template <typename T, bool WEIGHTED>
PXPO_SIMD_CLONES void finish_row(const double* __restrict num, const double* __restrict den,
                                 const double* __restrict width, double rows, int64_t w, T* __restrict r_out,
                                 T* __restrict w_out) {
  for (int64_t j = 0; j < w; ++j) {
    const double area = rows * width[j];
    if constexpr (WEIGHTED) {
      r_out[j] = static_cast<T>(den[j] > 0 ? num[j] / den[j] : 0.0);
      w_out[j] = static_cast<T>(den[j] / area);
    } else {
      r_out[j] = static_cast<T>(num[j] / area);
      w_out[j] = T(1);
    }
  }
}

// Sums over one block: sum w * r and sum w (WEIGHTED), or sum r. For one output row, the block's
// input rows are first added column by column in T (contiguous, vectorised loops), then each
// block adds its columns in double (block_sums).
template <typename T, bool WEIGHTED>
void pool_kernel(const T* __restrict reward, const T* __restrict weight, T* __restrict r_out, T* __restrict w_out,
                 int64_t batch, int64_t in_h, int64_t in_w, int64_t h, int64_t w) {
  // Column blocks, the same for every output row: computed once rather than with two divisions per output.
  std::vector<int64_t> c0(w), c1(w);
  std::vector<double> width(w);
  for (int64_t j = 0; j < w; ++j) {
    c0[j] = pool_start(j, in_w, w);
    c1[j] = pool_end(j, in_w, w);
    width[j] = static_cast<double>(c1[j] - c0[j]);
  }
  // One task per output row of one image; each thread reuses its scratch: column sums w * r (or r)
  // and w, then the blocks' sums.
  for_each_task(batch * h, ((in_h + h - 1) / h + 1) * in_w, [&](int64_t task) {
    thread_local std::vector<T> col;
    thread_local std::vector<double> sums;
    col.resize(WEIGHTED ? 2 * in_w : in_w);
    sums.resize(WEIGHTED ? 2 * w : w);
    const int64_t b = task / h, i = task % h;
    const int64_t r0 = pool_start(i, in_h, h), r1 = pool_end(i, in_h, h);
    const T* rb = reward + b * in_h * in_w;
    const T* wb = WEIGHTED ? weight + b * in_h * in_w : nullptr;
    T* col_num = col.data();
    T* col_den = WEIGHTED ? col.data() + in_w : nullptr;
    for (int64_t y = r0; y < r1; ++y) {
      const auto add = y == r0 ? add_row<T, WEIGHTED, true> : add_row<T, WEIGHTED, false>;
      add(rb + y * in_w, WEIGHTED ? wb + y * in_w : nullptr, col_num, col_den, in_w);
    }
    double* num = sums.data();
    double* den = WEIGHTED ? sums.data() + w : nullptr;
    block_sums(col_num, c0.data(), c1.data(), w, num);
    if constexpr (WEIGHTED) block_sums(col_den, c0.data(), c1.data(), w, den);
    finish_row<T, WEIGHTED>(num, den, width.data(), static_cast<double>(r1 - r0), w, r_out + task * w,
                            w_out + task * w);
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
