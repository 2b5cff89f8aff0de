// The pxpo operator schemas (one TORCH_LIBRARY block; the CPU and CUDA kernels register
// their implementations in csrc/cpu and csrc/cuda, the autograd formulas in csrc/autograd.cpp)
// and a small pybind11 module with build information. Importing pxpo_ext._C loads this
// library, which registers the ops; pxpo_ext/_native.py then adds the fake (meta) kernels.
#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

#ifndef PXPO_VERSION
#define PXPO_VERSION "unknown"
#endif

TORCH_LIBRARY(pxpo, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // Log-density of x under N(mean, std^2) per element, per pixel (sum over channels) or per
  // image (mean); float32 out (float64 for float64 latents).
  m.def("gaussian_logprob(Tensor x, Tensor mean, Tensor std, int granularity) -> Tensor", tags);
  // grad (shaped like gaussian_logprob's output) times d logprob / d mean, in mean's dtype.
  m.def("gaussian_logprob_backward(Tensor grad, Tensor x, Tensor mean, Tensor std, int granularity) -> Tensor",
        tags);
  // Weighted adaptive average pooling of (B, H, W) reward maps to (B, h, w): (reward, weight).
  m.def("reward_to_latent(Tensor reward, Tensor? weight, int h, int w) -> (Tensor, Tensor)", tags);
  // The fused PXPO loss: (loss, d loss / d mean in mean's dtype, [approx_kl, clipfrac, skipped]);
  // skipped counts the units left out for a NaN, infinite or too large log-ratio (pxpo_math.h).
  m.def(
      "pxpo_loss(Tensor x, Tensor mean, Tensor std, Tensor logp_old, Tensor adv, Tensor? weight, "
      "float clip_range, int granularity, int loss_type) -> (Tensor, Tensor, Tensor)",
      tags);
  // The same kernel without an autograd formula: the trainer's fast path, which pushes the
  // gradient into the model itself, skips the autograd layer's per-call cost.
  m.def(
      "pxpo_loss_and_grad(Tensor x, Tensor mean, Tensor std, Tensor logp_old, Tensor adv, Tensor? weight, "
      "float clip_range, int granularity, int loss_type) -> (Tensor, Tensor, Tensor)",
      tags);
}

namespace {

bool has_cuda() {
#ifdef PXPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pxpo native kernels; importing this module registers the torch.ops.pxpo operators";
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled in");
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = PXPO_VERSION;
    info["cuda"] = has_cuda();
    info["openmp"] = has_openmp();
    info["compiler"] = compiler();
    info["torch"] = TORCH_VERSION;
    return info;
  }, "Version, compiler, OpenMP and CUDA of this build");
}
