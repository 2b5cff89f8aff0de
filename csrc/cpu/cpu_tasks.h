// How the CPU kernels split work: every image's pixels are cut into fixed chunks of
// kPixelsPerTask, independent of the thread count, and reductions add per-chunk partials
// in chunk order. The results are therefore the same for any number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// The inner loops are compiled twice, for AVX2 and for baseline x86-64 (SSE2), and the library picks
// one when it loads (GCC/Clang function multiversioning, an ifunc). AVX2 without FMA: no
// multiply-add is contracted, so both versions give the same bits.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(PXPO_NO_SIMD_CLONES)
#define PXPO_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PXPO_SIMD_CLONES
#endif

namespace pxpo::cpu {

constexpr int64_t kPixelsPerTask = 2048;

struct PixelTasks {
  int64_t pixels;     // h * w
  int64_t per_image;  // chunks per image
  int64_t count;      // chunks in the batch

  PixelTasks(int64_t batch, int64_t pixels_per_image)
      : pixels(pixels_per_image),
        per_image((pixels_per_image + kPixelsPerTask - 1) / kPixelsPerTask),
        count(batch * per_image) {}

  int64_t image(int64_t task) const { return task / per_image; }
  int64_t begin(int64_t task) const { return (task % per_image) * kPixelsPerTask; }
  int64_t end(int64_t task) const { return std::min(begin(task) + kPixelsPerTask, pixels); }
};

// Fewer elements than this stay on one thread: waking the pool costs more than it saves
// (the value of ATen's at::internal::GRAIN_SIZE, which lives in a heavy header).
constexpr int64_t kGrainElements = 32768;

// Runs f(task) for every task, in parallel over at::get_num_threads() threads.
template <typename F>
void for_each_task(int64_t count, int64_t elements_per_task, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_task));
  at::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) f(t);
  });
}

}  // namespace pxpo::cpu
