// An exp that the compiler can vectorise, for the CPU kernels' inner loops (libm's expf is an
// opaque call, so a loop that calls it runs one element at a time). Given to pxpo::unit_loss,
// which only passes |v| <= kLogRatioLimit.
#pragma once

#include <c10/util/bit_cast.h>
#include <cmath>
#include <cstdint>

#include "../pxpo_math.h"

namespace pxpo::cpu {

// float: exp(v) = 2^n * exp(r), n = round(v / ln 2), r = v - n ln 2 (ln 2 split in two so that
// n * ln2_hi is exact), exp(r) by Cephes' degree-7 polynomial of expf (|r| <= ln 2 / 2, about
// 1 ulp). v is clamped to [-86, 88], where 2^n * exp(r) stays a normal float; inputs
// outside that range (exp < 4.5e-38 or > 1.6e38) are not what this is for. double: std::exp.
struct VecExp {
  PXPO_HD float operator()(float v) const {
    v = v < -86.0f ? -86.0f : (v > 88.0f ? 88.0f : v);
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = v * 1.44269504088896341f + kRound;
    const float n = t - kRound;
    const int32_t ni = c10::bit_cast<int32_t>(t) - c10::bit_cast<int32_t>(kRound);
    const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * (r * r) + r + 1.0f;
    return c10::bit_cast<float>(c10::bit_cast<int32_t>(e) + static_cast<int32_t>(static_cast<uint32_t>(ni) << 23));
  }
  PXPO_HD double operator()(double v) const { return std::exp(v); }
};

}  // namespace pxpo::cpu
