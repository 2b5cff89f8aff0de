// CPU kernels of pxpo::gaussian_logprob and its backward (SPEC §1-2).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../pxpo_checks.h"
#include "channel_sums.h"
#include "cpu_tasks.h"

namespace pxpo::cpu {
namespace {

// out[i] = -(x[i] - mean[i])^2 / (2 sigma^2) - log_norm for a contiguous run.
template <typename scalar_t, typename T>
PXPO_SIMD_CLONES void element_logprob_run(const scalar_t* __restrict x, const scalar_t* __restrict mean,
                                          T* __restrict out, int64_t n, StdTerms<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    const T d = static_cast<T>(x[i]) - static_cast<T>(mean[i]);
    out[i] = -d * d * s.half_inv_var - s.log_norm;
  }
}

// out[i] = -sq[i] / (2 sigma^2) - C log_norm for a contiguous run of pixels.
template <typename T>
PXPO_SIMD_CLONES void pixel_logprob_run(const T* __restrict sq, T* __restrict out, int64_t n, T half_inv_var,
                                        T norm) {
  for (int64_t i = 0; i < n; ++i) out[i] = -sq[i] * half_inv_var - norm;
}

template <typename scalar_t, typename T>
void logprob_kernel(const scalar_t* __restrict x, const scalar_t* __restrict mean, const T* __restrict std_b,
                    T* __restrict out, int64_t batch, int64_t channels, int64_t pixels, int64_t granularity) {
  const PixelTasks tasks(batch, pixels);
  std::vector<double> image_partials(granularity == kMean ? tasks.count : 0);
  for_each_task(tasks.count, kPixelsPerTask * channels, [&](int64_t t) {
    const int64_t b = tasks.image(t), p0 = tasks.begin(t), p1 = tasks.end(t);
    const StdTerms<T> s = std_terms(std_b[b]);
    const int64_t base = b * channels * pixels;
    if (granularity == kElement) {
      // Elementwise, so the task takes its share of the image's values as one contiguous run (channels *
      // [p0, p1) of the flat image) rather than a run per channel: consecutive tasks read and write
      // one stream each, which the hardware prefetcher follows without restarting.
      const int64_t off = base + channels * p0;
      element_logprob_run(x + off, mean + off, out + off, channels * (p1 - p0), s);
      return;
    }
    T sq[kPixelsPerTask];
    sq_over_channels(x + base, mean + base, channels, pixels, p0, p1, sq);
    if (granularity == kPixel) {
      const T norm = static_cast<T>(channels) * s.log_norm;
      pixel_logprob_run(sq, out + b * pixels + p0, p1 - p0, s.half_inv_var, norm);
    } else {
      image_partials[t] = sum_in_double(sq, p1 - p0);
    }
  });
  if (granularity == kMean) {
    const double n = static_cast<double>(channels * pixels);
    for (int64_t b = 0; b < batch; ++b) {
      double acc = 0;
      for (int64_t t = b * tasks.per_image; t < (b + 1) * tasks.per_image; ++t) acc += image_partials[t];
      const StdTerms<T> s = std_terms(std_b[b]);
      out[b] = -static_cast<T>(acc / n) * s.half_inv_var - s.log_norm;
    }
  }
}

template <typename scalar_t, typename T>
void logprob_backward_kernel(const T* __restrict grad, const scalar_t* __restrict x, const scalar_t* __restrict mean,
                             const T* __restrict std_b, scalar_t* __restrict grad_mean, int64_t batch,
                             int64_t channels, int64_t pixels, int64_t granularity) {
  const PixelTasks tasks(batch, pixels);
  const T inv_n = T(1) / static_cast<T>(channels * pixels);
  for_each_task(tasks.count, kPixelsPerTask * channels, [&](int64_t t) {
    const int64_t b = tasks.image(t), p0 = tasks.begin(t), p1 = tasks.end(t);
    const T inv_var = std_terms(std_b[b]).inv_var;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t off = (b * channels + c) * pixels;
      for (int64_t p = p0; p < p1; ++p) {
        const T g = granularity == kElement ? grad[off + p]
                    : granularity == kPixel ? grad[b * pixels + p]
                                            : grad[b] * inv_n;
        const T d = static_cast<T>(x[off + p]) - static_cast<T>(mean[off + p]);
        grad_mean[off + p] = static_cast<scalar_t>(g * d * inv_var);
      }
    }
  });
}

at::Tensor gaussian_logprob_cpu(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& std_in,
                                int64_t granularity) {
  check_latents(x_in, mean_in, std_in);
  check_granularity(granularity);
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous(), std_b = as_compute(std_in, dt);
  at::Tensor out = at::empty(unit_shape(x, granularity), x.options().dtype(dt));
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pxpo_gaussian_logprob_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    logprob_kernel<scalar_t, T>(x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
                                std_b.const_data_ptr<T>(), out.mutable_data_ptr<T>(), batch, channels, pixels,
                                granularity);
  });
  return out;
}

at::Tensor gaussian_logprob_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean_in,
                                         const at::Tensor& std_in, int64_t granularity) {
  check_latents(x_in, mean_in, std_in);
  check_granularity(granularity);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(unit_shape(x_in, granularity)),
              "pxpo: gaussian_logprob_backward: grad must have the shape of the log-probs, ",
              at::IntArrayRef(unit_shape(x_in, granularity)), ", got ", grad_in.sizes());
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor std_b = as_compute(std_in, dt), grad = as_compute(grad_in, dt);
  at::Tensor grad_mean = at::empty_like(mean, at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pxpo_gaussian_logprob_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    logprob_backward_kernel<scalar_t, T>(grad.const_data_ptr<T>(), x.const_data_ptr<scalar_t>(),
                                         mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
                                         grad_mean.mutable_data_ptr<scalar_t>(), batch, channels, pixels, granularity);
  });
  return grad_mean;
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CPU, m) {
  m.impl("gaussian_logprob", &gaussian_logprob_cpu);
  m.impl("gaussian_logprob_backward", &gaussian_logprob_backward_cpu);
}

}  // namespace pxpo::cpu
