// The inner loops that per-pixel and per-image log-probs share: the sum over channels of
// squared differences (x - mean)^2 for a run of pixels of one image, and the scatter of a
// per-pixel gradient. Channels are the outer loop so that the inner loop is contiguous.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../pxpo_math.h"
#include "cpu_tasks.h"
#include "lane_sums.h"

namespace pxpo::cpu {

// sq[0 .. p1 - p0) = sum over channels of (x - mean)^2, added channel by channel in T. The first
// channel sets sq (0 + d * d is d * d), so the caller need not zero it.
template <typename scalar_t, typename T>
PXPO_SIMD_CLONES inline void sq_over_channels(const scalar_t* __restrict x, const scalar_t* __restrict mean,
                                              int64_t channels, int64_t pixels, int64_t p0, int64_t p1,
                                              T* __restrict sq) {
  if (channels == 0) {  // an empty sum
    std::fill(sq, sq + (p1 - p0), T(0));
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const T d = static_cast<T>(x[p]) - static_cast<T>(mean[p]);
    sq[p - p0] = d * d;
  }
  for (int64_t c = 1; c < channels; ++c) {
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

}  // namespace pxpo::cpu
