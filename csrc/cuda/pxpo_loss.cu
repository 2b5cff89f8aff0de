// CUDA kernels of pxpo::pxpo_loss (SPEC §5). Two launches, no host synchronisation and no
// atomics:
//   1. the fused pass. Element/pixel granularity: grid = B images x S slices; each block
//      first sums its image's weights (every slice of an image computes the same sum in
//      the same order, so they agree bit for bit), then walks its slice with 16-byte
//      packs, computing log-probs, ratios, clipped terms and d loss / d mean, and writes
//      one row of partial sums. Mean granularity (DDPO): one block per image, which
//      reduces the image's log-prob and then writes its gradient.
//   2. one block adds the partial rows in a fixed order into the loss and statistics.
// One launch, with the last block to finish adding the rows (a per-stream arrival counter, a
// fence and an atomic), was measured slower on an H100: 6.07 us against 5.86 us at B=16.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "../pxpo_checks.h"
#include "cuda_utils.cuh"

namespace pxpo::cuda {
namespace {

// A partial row: [sum w * term / (B * W_b), sum w * dlp^2, sum w * [|rho - 1| > eps], skipped units,
// W_b or 0].
constexpr int kStats = 5;
// Latent channels kept in registers by the pixel-granularity pass (Stable Diffusion has 4).
constexpr int kCachedChannels = 4;

struct LossShape {
  int64_t batch, channels, packs;  // packs: per channel plane
  int64_t slices;                  // blocks per image
  int64_t loss_type;
  bool adv_per_element;
};

template <typename T>
__device__ __forceinline__ void accumulate(T (&part)[kStats], const UnitLoss<T>& u, T w) {
  part[0] += w * u.term;
  part[1] += w * u.dlp * u.dlp;
  part[2] += u.outside ? w : T(0);
  part[3] += u.kept ? T(0) : T(1);
}

template <typename scalar_t, typename T, int VEC, bool ELEMENT, int THREADS>
__global__ void __launch_bounds__(THREADS)
    spatial_loss_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean,
                        const T* __restrict__ std_b, const T* __restrict__ logp_old, const T* __restrict__ adv,
                        const T* __restrict__ weight, scalar_t* __restrict__ grad, T* __restrict__ partials,
                        LossShape shape, ClipBounds<T> clip) {
  __shared__ T shared[THREADS / 32 * kStats];
  const int64_t b = blockIdx.x / shape.slices, slice = blockIdx.x % shape.slices;
  const int64_t channels = shape.channels, packs = shape.packs;

  const int64_t per_slice = ceil_div(packs, shape.slices);
  const int64_t v_end = min(packs, (slice + 1) * per_slice);
  // The weight sum below waits on DRAM before anything else can start; the first pack's lines are
  // requested meanwhile, so that its loads then come from L2 (at small batches each thread has one pack).
  if (weight != nullptr && slice * per_slice + threadIdx.x < v_end) {
    const int64_t v = slice * per_slice + threadIdx.x, pixel_pack = b * packs + v;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t pi = (b * channels + c) * packs + v;
      prefetch_pack<VEC>(x, pi);
      prefetch_pack<VEC>(mean, pi);
      if (ELEMENT) prefetch_pack<VEC>(logp_old, pi);
      if (ELEMENT && shape.adv_per_element) prefetch_pack<VEC>(adv, pi);
    }
    if (!ELEMENT) prefetch_pack<VEC>(logp_old, pixel_pack);
    if (!ELEMENT || !shape.adv_per_element) prefetch_pack<VEC>(adv, pixel_pack);
  }
  // Sum of this image's unit weights; each unit of an element-granularity image is one channel.
  T wsum = static_cast<T>(packs * VEC) * (ELEMENT ? static_cast<T>(channels) : T(1));
  if (weight != nullptr) {
    T acc[1] = {T(0)};
    for (int64_t v = threadIdx.x; v < packs; v += THREADS) {
      const Pack<T, VEC> wp = load_pack<VEC>(weight, b * packs + v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[0] += wp.v[k];
    }
    block_sum<1, THREADS>(acc, shared);
    wsum = acc[0] * (ELEMENT ? static_cast<T>(channels) : T(1));
  }
  const T scale = image_scale(wsum, shape.batch);
  const StdTerms<T> s = std_terms(std_b[b]);
  const T g_scale = scale * s.inv_var;  // d loss / d (w * term), times 1 / sigma^2

  T part[kStats] = {T(0), T(0), T(0), T(0), T(0)};
  for (int64_t v = slice * per_slice + threadIdx.x; v < v_end; v += THREADS) {
    const int64_t pixel_pack = b * packs + v;
    const Pack<T, VEC> wp = weight != nullptr ? load_pack<VEC>(weight, pixel_pack) : fill_pack<VEC>(T(1));
    if constexpr (ELEMENT) {
      Pack<T, VEC> ap;
      if (!shape.adv_per_element) ap = load_pack<VEC>(adv, pixel_pack);
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t pi = (b * channels + c) * packs + v;
        const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, pi), mp = load_pack<VEC>(mean, pi);
        const Pack<T, VEC> lo = load_pack<VEC>(logp_old, pi);
        if (shape.adv_per_element) ap = load_pack<VEC>(adv, pi);
        Pack<scalar_t, VEC> gp;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
          const T lp = -d * d * s.half_inv_var - s.log_norm;
          const UnitLoss<T> u = unit_loss(lp, lo.v[k], ap.v[k], clip, shape.loss_type);
          accumulate(part, u, wp.v[k]);
          gp.v[k] = static_cast<scalar_t>(mean_grad(kept_or_zero(u, u.dterm_dlp * wp.v[k] * g_scale), d));
        }
        store_pack<VEC>(grad, pi, gp);
      }
    } else {
      // Up to kCachedChannels channels stay in registers between the two passes (fully unrolled
      // loops with a guard keep the arrays out of local memory); more are read again. Every load of
      // the cached channels, the old log-probs and the advantages is issued before the first is used:
      // at small batches each thread has one pixel pack, and the loop this replaces waited on memory
      // once per two channels and once more for the log-probs (its SASS, sm_90).
      const Pack<T, VEC> lo = load_pack<VEC>(logp_old, pixel_pack), ap = load_pack<VEC>(adv, pixel_pack);
      Pack<scalar_t, VEC> xs[kCachedChannels], ms[kCachedChannels];
#pragma unroll
      for (int cc = 0; cc < kCachedChannels; ++cc) {
        if (cc < channels) {
          const int64_t pi = (b * channels + cc) * packs + v;
          xs[cc] = load_pack<VEC>(x, pi);
          ms[cc] = load_pack<VEC>(mean, pi);
        }
      }
      Pack<T, VEC> diff[kCachedChannels];
      Pack<T, VEC> acc = fill_pack<VEC>(T(0));
#pragma unroll
      for (int cc = 0; cc < kCachedChannels; ++cc) {
        if (cc < channels) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            diff[cc].v[k] = static_cast<T>(xs[cc].v[k]) - static_cast<T>(ms[cc].v[k]);
            acc.v[k] += diff[cc].v[k] * diff[cc].v[k];
          }
        }
      }
      for (int64_t c = kCachedChannels; c < channels; ++c) {
        const int64_t pi = (b * channels + c) * packs + v;
        const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, pi), mp = load_pack<VEC>(mean, pi);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
          acc.v[k] += d * d;
        }
      }
      const T norm = static_cast<T>(channels) * s.log_norm;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T lp = -acc.v[k] * s.half_inv_var - norm;
        const UnitLoss<T> u = unit_loss(lp, lo.v[k], ap.v[k], clip, shape.loss_type);
        accumulate(part, u, wp.v[k]);
        acc.v[k] = kept_or_zero(u, u.dterm_dlp * wp.v[k] * g_scale);  // now the pixel's gradient factor
      }
#pragma unroll
      for (int cc = 0; cc < kCachedChannels; ++cc) {
        if (cc < channels) {
          Pack<scalar_t, VEC> gp;
#pragma unroll
          for (int k = 0; k < VEC; ++k) gp.v[k] = static_cast<scalar_t>(mean_grad(acc.v[k], diff[cc].v[k]));
          store_pack<VEC>(grad, (b * channels + cc) * packs + v, gp);
        }
      }
      for (int64_t c = kCachedChannels; c < channels; ++c) {  // read again (from cache, mostly)
        const int64_t pi = (b * channels + c) * packs + v;
        const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, pi), mp = load_pack<VEC>(mean, pi);
        Pack<scalar_t, VEC> gp;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          gp.v[k] = static_cast<scalar_t>(mean_grad(acc.v[k], static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k])));
        }
        store_pack<VEC>(grad, pi, gp);
      }
    }
  }
  block_sum<kStats, THREADS>(part, shared);
  if (threadIdx.x == 0) {
    T* row = partials + blockIdx.x * kStats;
    row[0] = part[0] * scale;
    row[1] = part[1];
    row[2] = part[2];
    row[3] = part[3];
    row[4] = slice == 0 ? wsum : T(0);  // counted once per image
  }
}

// DDPO's per-image loss: one block per image; the log-prob needs the whole image first.
template <typename scalar_t, typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    mean_loss_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean, const T* __restrict__ std_b,
                     const T* __restrict__ logp_old, const T* __restrict__ adv, scalar_t* __restrict__ grad,
                     T* __restrict__ partials, int64_t batch, int64_t image_packs, int64_t loss_type,
                     ClipBounds<T> clip) {
  __shared__ T shared[kWarps];
  const int64_t b = blockIdx.x, base = b * image_packs;
  T sq[1] = {T(0)};
  for (int64_t v = threadIdx.x; v < image_packs; v += kThreads) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, base + v), mp = load_pack<VEC>(mean, base + v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T d = static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k]);
      sq[0] += d * d;
    }
  }
  block_sum(sq, shared);
  const T n = static_cast<T>(image_packs * VEC);
  const StdTerms<T> s = std_terms(std_b[b]);
  const T lp = -(sq[0] / n) * s.half_inv_var - s.log_norm;
  const UnitLoss<T> u = unit_loss(lp, logp_old[b], adv[b], clip, loss_type);
  const T g = kept_or_zero(u, u.dterm_dlp / static_cast<T>(batch) * s.inv_var / n);
  for (int64_t v = threadIdx.x; v < image_packs; v += kThreads) {
    const Pack<scalar_t, VEC> xp = load_pack<VEC>(x, base + v), mp = load_pack<VEC>(mean, base + v);
    Pack<scalar_t, VEC> gp;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      gp.v[k] = static_cast<scalar_t>(mean_grad(g, static_cast<T>(xp.v[k]) - static_cast<T>(mp.v[k])));
    }
    store_pack<VEC>(grad, base + v, gp);
  }
  if (threadIdx.x == 0) {
    T* row = partials + b * kStats;
    row[0] = u.term / static_cast<T>(batch);
    row[1] = u.dlp * u.dlp;
    row[2] = u.outside ? T(1) : T(0);
    row[3] = u.kept ? T(0) : T(1);
    row[4] = T(1);
  }
}

// Adds the partial rows in a fixed order (in double) into loss and [approx_kl, clipfrac, skipped].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const T* __restrict__ partials, int64_t rows, T* __restrict__ loss, T* __restrict__ stats) {
  __shared__ double shared[kWarps * kStats];
  double acc[kStats] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
#pragma unroll
    for (int k = 0; k < kStats; ++k) acc[k] += static_cast<double>(partials[r * kStats + k]);
  }
  block_sum(acc, shared);
  if (threadIdx.x == 0) {
    const double total_w = acc[4] > 0 ? acc[4] : 1.0;
    loss[0] = static_cast<T>(acc[0]);
    stats[0] = static_cast<T>(0.5 * acc[1] / total_w);
    stats[1] = static_cast<T>(acc[2] / total_w);
    stats[2] = static_cast<T>(acc[3]);
  }
}

// Slices per image: enough blocks to fill the device at small batches, each with at least
// a full block of packs.
int64_t slices_per_image(int64_t batch, int64_t packs, int threads, int device) {
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(sm_count(device)), batch);
  const int64_t most = ceil_div(packs, threads);
  return wanted < 1 ? 1 : (wanted < most ? wanted : most);
}

// Threads per block of the pixel/element pass: kThreads, or half as many where blocks of kThreads
// would leave SMs idle. At B=16 on an H200 the pass had 64 blocks of 256 threads for 132 SMs and
// took 0.74 us longer than Triton's 128 programs of 128 threads over the same data.
constexpr int kSmallThreads = kThreads / 2;
bool use_small_blocks(int64_t batch, int64_t packs, int device) {
  return batch * slices_per_image(batch, packs, kThreads, device) < sm_count(device);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pxpo_loss_cuda(const at::Tensor& x_in, const at::Tensor& mean_in,
                                                              const at::Tensor& std_in, const at::Tensor& logp_old_in,
                                                              const at::Tensor& adv_in,
                                                              const std::optional<at::Tensor>& weight_in,
                                                              double clip_range, int64_t granularity,
                                                              int64_t loss_type) {
  const bool adv_per_element =
      check_loss_args(x_in, mean_in, std_in, logp_old_in, adv_in, weight_in, clip_range, granularity, loss_type);
  check_cuda_latent_dtype(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dt = compute_dtype(x_in);
  const at::Tensor x = x_in.contiguous(), mean = mean_in.contiguous();
  const at::Tensor std_b = as_compute(std_in, dt), logp_old = as_compute(logp_old_in, dt), adv = as_compute(adv_in, dt);
  const at::Tensor weight = weight_in.has_value() ? as_compute(*weight_in, dt) : at::Tensor();
  at::Tensor grad = at::empty_like(mean, at::MemoryFormat::Contiguous);
  at::Tensor loss = at::empty({}, x.options().dtype(dt));
  at::Tensor stats = at::empty({3}, x.options().dtype(dt));
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  PXPO_DISPATCH_CUDA_LATENTS(x.scalar_type(), "pxpo_loss_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const ClipBounds<T> clip = clip_bounds<T>(clip_range);
    const auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      at::Tensor partials;
      if (granularity == kMean) {
        partials = at::empty({batch, kStats}, x.options().dtype(dt));
        mean_loss_kernel<scalar_t, T, VEC><<<batch, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
            logp_old.const_data_ptr<T>(), adv.const_data_ptr<T>(), grad.mutable_data_ptr<scalar_t>(),
            partials.mutable_data_ptr<T>(), batch, channels * pixels / VEC, loss_type, clip);
      } else {
        const int64_t packs = pixels / VEC;
        const bool small = use_small_blocks(batch, packs, device);
        const int threads = small ? kSmallThreads : kThreads;
        const LossShape shape{batch, channels, packs, slices_per_image(batch, packs, threads, device), loss_type,
                              adv_per_element};
        partials = at::empty({batch * shape.slices, kStats}, x.options().dtype(dt));
        const bool element = granularity == kElement;
        const auto kernel = small ? (element ? spatial_loss_kernel<scalar_t, T, VEC, true, kSmallThreads>
                                             : spatial_loss_kernel<scalar_t, T, VEC, false, kSmallThreads>)
                                  : (element ? spatial_loss_kernel<scalar_t, T, VEC, true, kThreads>
                                             : spatial_loss_kernel<scalar_t, T, VEC, false, kThreads>);
        kernel<<<batch * shape.slices, threads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(), std_b.const_data_ptr<T>(),
            logp_old.const_data_ptr<T>(), adv.const_data_ptr<T>(),
            weight.defined() ? weight.const_data_ptr<T>() : nullptr, grad.mutable_data_ptr<scalar_t>(),
            partials.mutable_data_ptr<T>(), shape, clip);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<T><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<T>(), partials.size(0),
                                                     loss.mutable_data_ptr<T>(), stats.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool packed = granularity == kMean
                            ? can_pack<scalar_t>(channels * pixels, {&x, &mean, &grad})
                            : can_pack<scalar_t>(pixels, {&x, &mean, &grad, &logp_old, &adv, &weight});
    if (packed) {
      launch(std::integral_constant<int, kVec<scalar_t>>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {loss, grad, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, CUDA, m) {
  m.impl("pxpo_loss", &pxpo_loss_cuda);
  m.impl("pxpo_loss_and_grad", &pxpo_loss_cuda);
}

}  // namespace pxpo::cuda
