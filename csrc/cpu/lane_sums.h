// Sums in double in fixed orders, so that results do not depend on the thread count, with
// independent chains of additions that overlap instead of waiting on each other. The lanes are
// GCC/Clang vector types, so that both PXPO_SIMD_CLONES versions get packed conversions and
// additions (GCC does not vectorise the scalar form of these loops).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_tasks.h"

namespace pxpo::cpu {

typedef double double4 __attribute__((vector_size(32)));

// acc += v[0 .. 4) in double.
template <typename T>
inline __attribute__((always_inline)) void add_four(const T* __restrict v, double4& acc) {
  typedef T T4 __attribute__((vector_size(4 * sizeof(T))));
  T4 four;
  std::memcpy(&four, v, sizeof(four));  // unaligned load
  acc += __builtin_convertvector(four, double4);
}

// Four lanes of a short run: lane k adds v[k], v[k + 4], ... in order, and the last n % 4 values go
// to lane 0. One accumulator, so the cheapest for a few values (reward_to_latent's column blocks).
template <typename T>
inline __attribute__((always_inline)) void lanes_in_double(const T* __restrict v, int64_t n, double4& lanes) {
  lanes = double4{0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) add_four(v + i, lanes);
  for (; i < n; ++i) lanes[0] += static_cast<double>(v[i]);
}

inline __attribute__((always_inline)) double lane_total(const double4& lanes) {
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// sum of v[0 .. n) in double, for long runs: four accumulators take v[0 .. 4), v[4 .. 8), v[8 .. 12),
// v[12 .. 16) and so on in turn (sixteen chains), the last n % 16 values go to the first through
// lanes_in_double, then (a0 + a1) + (a2 + a3) and lane_total.
template <typename T>
PXPO_SIMD_CLONES inline double sum_in_double(const T* __restrict v, int64_t n) {
  double4 a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    add_four(v + i, a0);
    add_four(v + i + 4, a1);
    add_four(v + i + 8, a2);
    add_four(v + i + 12, a3);
  }
  double4 rest;
  lanes_in_double(v + i, n - i, rest);
  a0 += rest;
  return lane_total((a0 + a1) + (a2 + a3));
}

}  // namespace pxpo::cpu
