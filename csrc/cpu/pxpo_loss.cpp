// CPU kernel of pxpo::pxpo_loss (SPEC §5): one fused pass computes every unit's
// log-prob, ratio and clipped term, the loss and statistics, and d loss / d mean.
// Per-image weight sums come first (they scale the gradient); reductions add per-chunk
// partials in chunk order, so results do not depend on the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../pxpo_checks.h"
#include "channel_sums.h"
#include "cpu_tasks.h"
#include "vec_exp.h"

namespace pxpo::cpu {
namespace {

// Sums of one chunk: sum w * term, sum w * (lp - lp_old)^2, sum w * [|rho - 1| > eps], and the
// number of skipped units (unweighted).
struct Partial {
  double loss = 0, kl = 0, clip = 0, skipped = 0;

  template <typename T>
  void add(const UnitLoss<T>& u, T w) {
    loss += static_cast<double>(w * u.term);
    kl += static_cast<double>(w * u.dlp * u.dlp);
    clip += u.outside ? static_cast<double>(w) : 0.0;
    skipped += u.kept ? 0.0 : 1.0;
  }
};

template <typename scalar_t, typename T>
struct LossArgs {
  const scalar_t* x;
  const scalar_t* mean;
  const T* std_b;
  const T* logp_old;
  const T* adv;
  const T* weight;  // nullptr: every unit weighs 1
  scalar_t* grad;
  int64_t batch, channels, pixels, granularity, loss_type;
  bool adv_per_element;
  ClipBounds<T> clip;
};

// Sum of unit weights per image: C * sum_ij w (element), sum_ij w (pixel), 1 (mean).
template <typename scalar_t, typename T>
std::vector<double> image_weight_sums(const LossArgs<scalar_t, T>& a) {
  const double units = a.granularity == kElement ? static_cast<double>(a.channels * a.pixels)
                       : a.granularity == kPixel ? static_cast<double>(a.pixels)
                                                 : 1.0;
  std::vector<double> sums(a.batch, units);
  if (a.weight == nullptr) return sums;
  const double per_weight = a.granularity == kElement ? static_cast<double>(a.channels) : 1.0;
  for_each_task(a.batch, a.pixels, [&](int64_t b) {
    double acc = 0;
    for (int64_t p = 0; p < a.pixels; ++p) acc += a.weight[b * a.pixels + p];
    sums[b] = per_weight * acc;
  });
  return sums;
}

// The weighted per-unit pieces of a run of units (w * term, w * (lp - lp_old)^2, w * [|rho - 1| > eps],
// [skipped]), written by a loop the compiler can vectorise and then added in double by add_run.
template <typename T>
struct RunPieces {
  T loss[kPixelsPerTask], kl[kPixelsPerTask], clip[kPixelsPerTask], skipped[kPixelsPerTask];

  PXPO_HD void set(int64_t i, const UnitLoss<T>& u, T w) {
    loss[i] = w * u.term;
    kl[i] = w * u.dlp * u.dlp;
    clip[i] = w * static_cast<T>(u.outside);  // products of 0/1 flags, not selects: they vectorise
    skipped[i] = T(1) - static_cast<T>(u.kept);
  }
};

template <typename T>
void add_run(Partial& part, const RunPieces<T>& r, int64_t n) {
  part.loss += sum_in_double(r.loss, n);
  part.kl += sum_in_double(r.kl, n);
  part.clip += sum_in_double(r.clip, n);
  part.skipped += sum_in_double(r.skipped, n);
}

// kPixelsPerTask ones: the unit weights of a chunk when there is no weight map.
template <typename T>
const T* unit_weights_of_ones() {
  static const auto ones = [] {
    std::array<T, kPixelsPerTask> a;
    a.fill(T(1));
    return a;
  }();
  return ones.data();
}

// One run of n element units (one channel of a chunk): their pieces into run, d loss / d mean into grad.
// g_scale: d loss / d term without the unit weight, times 1 / sigma^2.
template <int64_t kLossType, typename scalar_t, typename T>
PXPO_SIMD_CLONES void element_units(const scalar_t* __restrict x, const scalar_t* __restrict mean,
                                    const T* __restrict logp_old, const T* __restrict adv, const T* __restrict w,
                                    scalar_t* __restrict grad, int64_t n, StdTerms<T> s, T g_scale,
                                    ClipBounds<T> clip, RunPieces<T>& run) {
  for (int64_t i = 0; i < n; ++i) {
    const T d = static_cast<T>(x[i]) - static_cast<T>(mean[i]);
    const T lp = -d * d * s.half_inv_var - s.log_norm;
    const UnitLoss<T> u = unit_loss(lp, logp_old[i], adv[i], clip, kLossType, VecExp{});
    run.set(i, u, w[i]);
    grad[i] = static_cast<scalar_t>(mean_grad(kept_or_zero(u, u.dterm_dlp * w[i] * g_scale), d));
  }
}

// One run of n pixel units: their pieces into run; sq (the sums of squares over channels) becomes the
// gradient factor of each pixel.
template <int64_t kLossType, typename T>
PXPO_SIMD_CLONES void pixel_units(T* __restrict sq, const T* __restrict logp_old, const T* __restrict adv,
                                  const T* __restrict w, int64_t n, T half_inv_var, T norm, T g_scale,
                                  ClipBounds<T> clip, RunPieces<T>& run) {
  for (int64_t i = 0; i < n; ++i) {
    const T lp = -sq[i] * half_inv_var - norm;
    const UnitLoss<T> u = unit_loss(lp, logp_old[i], adv[i], clip, kLossType, VecExp{});
    run.set(i, u, w[i]);
    sq[i] = kept_or_zero(u, u.dterm_dlp * w[i] * g_scale);
  }
}

// Element and pixel granularity: one pass per chunk, partials per chunk.
template <typename scalar_t, typename T>
std::vector<Partial> spatial_pass(const LossArgs<scalar_t, T>& a, const std::vector<T>& scale) {
  const PixelTasks tasks(a.batch, a.pixels);
  std::vector<Partial> partials(tasks.count);
  for_each_task(tasks.count, kPixelsPerTask * a.channels, [&](int64_t t) {
    const int64_t b = tasks.image(t), p0 = tasks.begin(t), p1 = tasks.end(t), n = p1 - p0;
    const StdTerms<T> s = std_terms(a.std_b[b]);
    const T g_scale = scale[b] * s.inv_var;  // d loss / d term without the unit weight, times 1 / sigma^2
    const int64_t base = b * a.channels * a.pixels, pix = b * a.pixels;
    const T* __restrict wr = a.weight ? a.weight + pix + p0 : unit_weights_of_ones<T>();  // wr[p - p0]
    Partial part;
    RunPieces<T> run;
    if (a.granularity == kElement) {
      for (int64_t c = 0; c < a.channels; ++c) {
        const int64_t off = base + c * a.pixels + p0;
        const scalar_t* __restrict xr = a.x + off;
        const scalar_t* __restrict mr = a.mean + off;
        const T* __restrict lor = a.logp_old + off;
        const T* __restrict ar = a.adv + (a.adv_per_element ? off : pix + p0);
        scalar_t* __restrict gr = a.grad + off;
        // The loss type as a template argument, so that the inner loop has no branch.
        const auto units = a.loss_type == kPPO ? element_units<kPPO, scalar_t, T> : element_units<kSF, scalar_t, T>;
        units(xr, mr, lor, ar, wr, gr, n, s, g_scale, a.clip, run);
        add_run(part, run, n);
      }
    } else {
      T sq[kPixelsPerTask];
      sq_over_channels(a.x + base, a.mean + base, a.channels, a.pixels, p0, p1, sq);
      const T norm = static_cast<T>(a.channels) * s.log_norm;
      const T* __restrict lor = a.logp_old + pix + p0;
      const T* __restrict ar = a.adv + pix + p0;
      const auto units = a.loss_type == kPPO ? pixel_units<kPPO, T> : pixel_units<kSF, T>;
      units(sq, lor, ar, wr, n, s.half_inv_var, norm, g_scale, a.clip, run);  // sq now holds the gradient factors
      add_run(part, run, n);
      scatter_pixel_grad(a.x + base, a.mean + base, sq, a.channels, a.pixels, p0, p1, a.grad + base);
    }
    partials[t] = part;
  });
  return partials;
}

// Mean granularity (DDPO): the image's log-prob needs a full reduction before any
// gradient can be written, so this is two passes over the latents.
template <typename scalar_t, typename T>
std::vector<Partial> image_pass(const LossArgs<scalar_t, T>& a) {
  const PixelTasks tasks(a.batch, a.pixels);
  std::vector<double> sq_partials(tasks.count);
  for_each_task(tasks.count, kPixelsPerTask * a.channels, [&](int64_t t) {
    const int64_t b = tasks.image(t), p0 = tasks.begin(t), p1 = tasks.end(t);
    T sq[kPixelsPerTask];
    sq_over_channels(a.x + b * a.channels * a.pixels, a.mean + b * a.channels * a.pixels, a.channels, a.pixels,
                     p0, p1, sq);
    sq_partials[t] = sum_in_double(sq, p1 - p0);
  });
  const double n = static_cast<double>(a.channels * a.pixels);
  std::vector<Partial> partials(a.batch);
  std::vector<T> g(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    double acc = 0;
    for (int64_t t = b * tasks.per_image; t < (b + 1) * tasks.per_image; ++t) acc += sq_partials[t];
    const StdTerms<T> s = std_terms(a.std_b[b]);
    const T lp = -static_cast<T>(acc / n) * s.half_inv_var - s.log_norm;
    const UnitLoss<T> u = unit_loss(lp, a.logp_old[b], a.adv[b], a.clip, a.loss_type);
    partials[b].add(u, T(1));
    g[b] = kept_or_zero(u, u.dterm_dlp / static_cast<T>(a.batch) * s.inv_var / static_cast<T>(n));
  }
  for_each_task(tasks.count, kPixelsPerTask * a.channels, [&](int64_t t) {
    const int64_t b = tasks.image(t), p0 = tasks.begin(t), p1 = tasks.end(t);
    const int64_t base = b * a.channels * a.pixels;
    T gp[kPixelsPerTask];
    std::fill(gp, gp + (p1 - p0), g[b]);
    scatter_pixel_grad(a.x + base, a.mean + base, gp, a.channels, a.pixels, p0, p1, a.grad + base);
  });
  return partials;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pxpo_loss_cpu(const at::Tensor& x_in, const at::Tensor& mean_in,
                                                             const at::Tensor& std_in, const at::Tensor& logp_old_in,
                                                             const at::Tensor& adv_in,
                                                             const std::optional<at::Tensor>& weight_in,
                                                             double clip_range, int64_t granularity,
                                                             int64_t loss_type) {
  const bool adv_per_element =
      check_loss_args(x_in, mean_in, std_in, logp_old_in, adv_in, weight_in, clip_range, granularity, loss_type);
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor std_b = as_compute(std_in, dt), logp_old = as_compute(logp_old_in, dt), adv = as_compute(adv_in, dt);
  const at::Tensor weight = weight_in.has_value() ? as_compute(*weight_in, dt) : at::Tensor();
  at::Tensor grad = at::empty_like(mean, at::MemoryFormat::Contiguous);
  at::Tensor loss = at::empty({}, x.options().dtype(dt));
  at::Tensor stats = at::empty({3}, x.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pxpo_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const LossArgs<scalar_t, T> a{x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
                                  std_b.const_data_ptr<T>(), logp_old.const_data_ptr<T>(), adv.const_data_ptr<T>(),
                                  weight.defined() ? weight.const_data_ptr<T>() : nullptr,
                                  grad.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2) * x.size(3),
                                  granularity, loss_type, adv_per_element, clip_bounds<T>(clip_range)};
    const std::vector<double> wsum = image_weight_sums(a);
    std::vector<T> scale(a.batch);
    for (int64_t b = 0; b < a.batch; ++b) scale[b] = image_scale(static_cast<T>(wsum[b]), a.batch);
    const std::vector<Partial> partials = granularity == kMean ? image_pass(a) : spatial_pass(a, scale);
    // Chunks are ordered by image, so each image's chunks are one contiguous run.
    const int64_t per_image = static_cast<int64_t>(partials.size()) / a.batch;
    double total = 0, kl = 0, clip = 0, skipped = 0, total_w = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      double num = 0;
      for (int64_t t = b * per_image; t < (b + 1) * per_image; ++t) {
        num += partials[t].loss;
        kl += partials[t].kl;
        clip += partials[t].clip;
        skipped += partials[t].skipped;
      }
      total += wsum[b] > 0 ? num / wsum[b] : 0.0;
      total_w += wsum[b];
    }
    const double safe_w = total_w > 0 ? total_w : 1.0;
    loss.mutable_data_ptr<T>()[0] = static_cast<T>(total / static_cast<double>(a.batch));
    stats.mutable_data_ptr<T>()[0] = static_cast<T>(0.5 * kl / safe_w);
    stats.mutable_data_ptr<T>()[1] = static_cast<T>(clip / safe_w);
    stats.mutable_data_ptr<T>()[2] = static_cast<T>(skipped);
  });
  return {loss, grad, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CPU, m) {
  m.impl("pxpo_loss", &pxpo_loss_cpu);
  m.impl("pxpo_loss_and_grad", &pxpo_loss_cpu);
}

}  // namespace pxpo::cpu
