// The inner loop that per-pixel and per-image log-probs share: the sum over channels of
// squared differences (x - mean)^2 for a run of pixels of one image, accumulated into
// sq[0 .. p1 - p0). Channels are the outer loop so that the inner loop is contiguous.
#pragma once

#include <cstdint>

#include "../pxpo_math.h"
#include "cpu_tasks.h"

namespace pxpo::cpu {

template <typename scalar_t, typename T>
PXPO_SIMD_CLONES inline void accumulate_sq_over_channels(const scalar_t* __restrict x, const scalar_t* __restrict mean, int64_t channels,
                                        int64_t pixels, int64_t p0, int64_t p1, T* __restrict sq) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* __restrict xc = x + c * pixels;
    const scalar_t* __restrict mc = mean + c * pixels;
    for (int64_t p = p0; p < p1; ++p) {
      const T d = static_cast<T>(xc[p]) - static_cast<T>(mc[p]);
      sq[p - p0] += d * d;
    }
  }
}

// grad_mean = g * (x - mean) for every channel of a run of pixels (pxpo::mean_grad: 0 where g is 0,
// whatever x - mean is); g[p - p0] already holds d loss / d lp times 1 / sigma^2.
template <typename scalar_t, typename T>
PXPO_SIMD_CLONES inline void scatter_pixel_grad(const scalar_t* __restrict x, const scalar_t* __restrict mean, const T* __restrict g,
                               int64_t channels, int64_t pixels, int64_t p0, int64_t p1, scalar_t* __restrict grad) {
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t off = c * pixels;
    for (int64_t p = p0; p < p1; ++p) {
      const T d = static_cast<T>(x[off + p]) - static_cast<T>(mean[off + p]);
      grad[off + p] = static_cast<scalar_t>(mean_grad(g[p - p0], d));
    }
  }
}

// sum of v[0 .. n) in double, in four interleaved lanes (a fixed order, so the result still does not
// depend on the thread count) so that the additions do not wait on each other.
template <typename T>
PXPO_SIMD_CLONES inline double sum_in_double(const T* __restrict v, int64_t n) {
  double lane[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) lane[k] += static_cast<double>(v[i + k]);
  for (; i < n; ++i) lane[0] += static_cast<double>(v[i]);
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

}  // namespace pxpo::cpu
