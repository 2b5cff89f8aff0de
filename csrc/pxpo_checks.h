// Host-side argument checks shared by the CPU and CUDA implementations. pxpo_ext.ops
// validates user input with friendly messages; these checks guard direct calls of
// torch.ops.pxpo.* so that a wrong shape fails loudly instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "pxpo_math.h"

namespace pxpo {

// float64 latents compute in float64 (for gradcheck); every other dtype in float32.
inline at::ScalarType compute_dtype(const at::Tensor& latent) {
  return latent.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A small per-unit input (old log-probs, advantages, weights, std) in the compute dtype, contiguous.
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

inline void check_latents(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std) {
  TORCH_CHECK(x.dim() == 4, "pxpo: x must be a (B, C, h, w) latent, got ", x.sizes());
  TORCH_CHECK(x.sizes() == mean.sizes(), "pxpo: x and mean must have the same shape, got ", x.sizes(), " and ",
              mean.sizes());
  TORCH_CHECK(x.scalar_type() == mean.scalar_type(), "pxpo: x and mean must have the same dtype, got ",
              x.scalar_type(), " and ", mean.scalar_type());
  TORCH_CHECK(x.device() == mean.device() && x.device() == std.device(),
              "pxpo: x, mean and std must be on one device, got ", x.device(), ", ", mean.device(), " and ",
              std.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "pxpo: latents must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) > 0, "pxpo: empty batch");
  TORCH_CHECK(std.dim() == 1 && std.size(0) == x.size(0), "pxpo: std must have shape (B,) = (", x.size(0),
              ",), got ", std.sizes());
}

inline void check_granularity(int64_t granularity) {
  TORCH_CHECK(granularity == kElement || granularity == kPixel || granularity == kMean,
              "pxpo: granularity code must be 0 (element), 1 (pixel) or 2 (mean), got ", granularity);
}

// Shape of the per-unit log-probs for a (B, C, h, w) latent.
inline std::vector<int64_t> unit_shape(const at::Tensor& x, int64_t granularity) {
  if (granularity == kElement) return x.sizes().vec();
  if (granularity == kPixel) return {x.size(0), x.size(2), x.size(3)};
  return {x.size(0)};
}

inline void check_same_device(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "pxpo: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// Validates the arguments of pxpo_loss; returns whether the advantage is per element.
inline bool check_loss_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                            const at::Tensor& logp_old, const at::Tensor& adv, const std::optional<at::Tensor>& weight,
                            double clip_range, int64_t granularity, int64_t loss_type) {
  check_latents(x, mean, std);
  check_granularity(granularity);
  TORCH_CHECK(loss_type == kPPO || loss_type == kSF, "pxpo: loss_type code must be 0 (ppo) or 1 (sf), got ",
              loss_type);
  TORCH_CHECK(loss_type == kSF || clip_range > 0, "pxpo: clip_range must be > 0, got ", clip_range);
  const auto units = unit_shape(x, granularity);
  check_same_device("logp_old", logp_old, "x", x);
  check_same_device("adv", adv, "x", x);
  TORCH_CHECK(logp_old.sizes() == at::IntArrayRef(units), "pxpo: logp_old must have shape ", at::IntArrayRef(units),
              ", got ", logp_old.sizes());
  const std::vector<int64_t> pixels = {x.size(0), x.size(2), x.size(3)};
  const bool adv_per_element = granularity == kElement && adv.sizes() == x.sizes();
  TORCH_CHECK(adv_per_element || adv.sizes() == at::IntArrayRef(granularity == kMean ? units : pixels),
              "pxpo: adv must have shape ", at::IntArrayRef(granularity == kMean ? units : pixels),
              granularity == kElement ? " or that of x" : "", ", got ", adv.sizes());
  if (weight.has_value()) {
    TORCH_CHECK(granularity != kMean, "pxpo: granularity 'mean' (DDPO) takes no weight map");
    check_same_device("weight", *weight, "x", x);
    TORCH_CHECK(weight->sizes() == at::IntArrayRef(pixels), "pxpo: weight must have shape ", at::IntArrayRef(pixels),
                ", got ", weight->sizes());
  }
  return adv_per_element;
}

inline void check_reward_args(const at::Tensor& reward, const std::optional<at::Tensor>& weight, int64_t h,
                              int64_t w) {
  TORCH_CHECK(reward.dim() == 3, "pxpo: reward must be (B, H, W), got ", reward.sizes());
  TORCH_CHECK(at::isFloatingType(reward.scalar_type()), "pxpo: reward must be floating point, got ",
              reward.scalar_type());
  TORCH_CHECK(reward.size(1) > 0 && reward.size(2) > 0, "pxpo: reward maps must not be empty, got ",
              reward.sizes());
  TORCH_CHECK(h > 0 && w > 0, "pxpo: latent size must be positive, got (", h, ", ", w, ")");
  if (weight.has_value()) {
    TORCH_CHECK(weight->sizes() == reward.sizes(), "pxpo: weight must have the reward's shape ", reward.sizes(),
                ", got ", weight->sizes());
    check_same_device("weight", *weight, "reward", reward);
  }
}

}  // namespace pxpo
