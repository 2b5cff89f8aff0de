// The per-unit formulas of SPEC §1 and §5, shared by the CPU and CUDA kernels so that the
// maths lives once in C++ (and mirrors pxpo_ext/reference.py). A "unit" is what one
// log-probability belongs to: a latent element, a latent pixel or a whole image,
// depending on the granularity.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PXPO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, so that the CPU kernels' inner loops have no calls and can be vectorised.
#define PXPO_HD inline __attribute__((always_inline))
#else
#define PXPO_HD inline
#endif

namespace pxpo {

// Codes shared with pxpo_ext.reference (ELEMENT, PIXEL, MEAN; PPO, SF).
enum Granularity : int64_t { kElement = 0, kPixel = 1, kMean = 2 };
enum LossType : int64_t { kPPO = 0, kSF = 1 };

constexpr double kHalfLog2Pi = 0.91893853320467274178;

// What a Gaussian with standard deviation s contributes to every element's log-density:
// lp = -d^2 * half_inv_var - log_norm, and d lp / d mean = d * inv_var, with d = x - mean.
template <typename T>
struct StdTerms {
  T inv_var;
  T half_inv_var;
  T log_norm;  // log(s) + 0.5 * log(2 pi)
};

template <typename T>
PXPO_HD StdTerms<T> std_terms(T s) {
  StdTerms<T> t;
  t.inv_var = T(1) / (s * s);
  t.half_inv_var = T(0.5) * t.inv_var;
  t.log_norm = std::log(s) + T(kHalfLog2Pi);
  return t;
}

// Clip bounds and threshold of the PPO ratio, rounded once to the compute type (as the
// reference rounds Python floats to the tensor's dtype).
template <typename T>
struct ClipBounds {
  T lo;    // 1 - eps
  T hi;    // 1 + eps
  T eps;
};

template <typename T>
inline ClipBounds<T> clip_bounds(double eps) {
  return ClipBounds<T>{static_cast<T>(1.0 - eps), static_cast<T>(1.0 + eps), static_cast<T>(eps)};
}

// Largest |lp - lp_old| of a unit the loss uses; pxpo_ext.reference.LOG_RATIO_LIMIT says why 20
// (exp(20) * A and the gradient's factors stay far inside float32's range).
constexpr double kLogRatioLimit = 20.0;

// One unit's loss term, its derivative with respect to the unit's log-prob, and the
// pieces of the statistics. PPO: term = max(-A rho, -A clip(rho)); the gradient flows
// where the unclipped term is >= the clipped one (so rho exactly at 1 +- eps counts as
// unclipped). SF: term = -A lp. A unit with |lp - lp_old| > kLogRatioLimit, NaN or infinite
// is skipped: every field below is zero (selects, not products: 0 * NaN is NaN).
// The flags are int32_t (0 or 1), not bool: GCC keeps a struct's bool fields in memory, which
// stops it from vectorising the CPU kernels' loops over units.
template <typename T>
struct UnitLoss {
  T term;
  T dterm_dlp;
  T dlp;            // lp - lp_old, for approx_kl
  int32_t outside;  // |rho - 1| > eps, for clipfrac
  int32_t kept;     // 0: skipped, counted in stats[2]
};

// The exp that unit_loss uses by default. It is only ever given |v| <= kLogRatioLimit (skipped units
// pass 0), so a caller may pass a faster one valid on that range: the CPU kernels pass
// pxpo::cpu::VecExp (csrc/cpu/vec_exp.h), which the compiler can vectorise.
struct StdExp {
  template <typename T>
  PXPO_HD T operator()(T v) const {
    return std::exp(v);
  }
};

// Locals first and one aggregate at the end, with no short-circuit operators, so that a loop
// calling this is branch-free once inlined.
template <typename T, typename Exp = StdExp>
PXPO_HD UnitLoss<T> unit_loss(T lp, T lp_old, T adv, ClipBounds<T> clip, int64_t loss_type, Exp exp_fn = Exp{}) {
  const T diff = lp - lp_old;
  const bool kept = std::fabs(diff) <= static_cast<T>(kLogRatioLimit);  // one compare: false for NaN too
  const T dlp = kept ? diff : T(0);
  const T ratio = exp_fn(dlp);
  const bool outside = kept & (std::fabs(ratio - T(1)) > clip.eps);
  T term, dterm_dlp;
  if (loss_type == kPPO) {
    const T clamped = ratio < clip.lo ? clip.lo : (ratio > clip.hi ? clip.hi : ratio);
    const T unclipped = -adv * ratio;
    const T clipped = -adv * clamped;
    const bool flows = unclipped >= clipped;
    term = flows ? unclipped : clipped;
    dterm_dlp = flows ? unclipped : T(0);
  } else {
    term = -adv * lp;
    dterm_dlp = -adv;
  }
  return UnitLoss<T>{kept ? term : T(0), kept ? dterm_dlp : T(0), dlp, static_cast<int32_t>(outside),
                     static_cast<int32_t>(kept)};
}

// A unit's gradient factor g = d loss / d lp times its scale (which holds 1 / sigma^2): `value` for a
// kept unit, 0 for a skipped one by a select, since 1 / sigma^2 can overflow (sigma < ~5e-20 in
// float32) and 0 * inf is NaN.
template <typename T>
PXPO_HD T kept_or_zero(const UnitLoss<T>& u, T value) {
  return u.kept ? value : T(0);
}

// d loss / d mean of one element from its unit's factor g and d = x - mean. A skipped unit's d may
// be NaN or infinite, so a zero factor writes 0 rather than 0 * d.
template <typename T>
PXPO_HD T mean_grad(T g, T d) {
  return g == T(0) ? T(0) : g * d;
}

// Per-image loss scale 1 / (B * sum of unit weights); 0 for an image with no weight (L_b = 0).
template <typename T>
PXPO_HD T image_scale(T weight_sum, int64_t batch) {
  return weight_sum > T(0) ? T(1) / (static_cast<T>(batch) * weight_sum) : T(0);
}

// First output row/column of adaptive average pooling's block i (floor(i * in / out)) and
// one past its last (ceil((i + 1) * in / out)): torch.nn.functional.adaptive_avg_pool2d's boundaries.
PXPO_HD int64_t pool_start(int64_t i, int64_t in, int64_t out) { return (i * in) / out; }
PXPO_HD int64_t pool_end(int64_t i, int64_t in, int64_t out) { return ((i + 1) * in + out - 1) / out; }

}  // namespace pxpo
