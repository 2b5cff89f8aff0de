// Autograd formulas of pxpo::gaussian_logprob and pxpo::pxpo_loss, registered under the Autograd
// key for every device. They live in C++ rather than in torch.library.register_autograd, whose
// Python wrapper ran on every call, even when no input needs a gradient (a tiny call took 11 us
// with it, 5 us without; docs/build.md, "CPU speed"). The fake kernels torch.compile needs stay in
// pxpo_ext/_native.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace pxpo {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops, called from inside a formula under AutoDispatchBelowADInplaceOrView so that they reach
// the kernels below the Autograd key (the device kernels, or the fake ones while tracing) instead of
// this file's formulas again.
const auto& logprob_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pxpo::gaussian_logprob", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

const auto& logprob_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pxpo::gaussian_logprob_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LossSignature = LossOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const std::optional<at::Tensor>&, double, int64_t, int64_t);

const auto& loss_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pxpo::pxpo_loss", "").typed<LossSignature>();
  return op;
}

// Gradients flow into mean only (x is a sample, std a schedule constant).
class GaussianLogprob : public torch::autograd::Function<GaussianLogprob> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                            int64_t granularity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, mean, std});
    ctx->saved_data["granularity"] = granularity;
    ctx->set_materialize_grads(false);
    return logprob_op().call(x, mean, std, granularity);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_mean;
    if (grads[0].defined() && ctx->needs_input_grad(1)) {
      const variable_list saved = ctx->get_saved_variables();
      grad_mean = logprob_backward_op().call(grads[0], saved[0], saved[1], saved[2],
                                             ctx->saved_data["granularity"].toInt());
    }
    return {at::Tensor(), grad_mean, at::Tensor(), at::Tensor()};
  }
};

// The fused forward already returns d loss / d mean; the backward only scales it.
class PxpoLoss : public torch::autograd::Function<PxpoLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& std, const at::Tensor& logp_old, const at::Tensor& adv,
                               const std::optional<at::Tensor>& weight, double clip_range, int64_t granularity,
                               int64_t loss_type) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, grad_mean, stats] =
        loss_op().call(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type);
    ctx->mark_non_differentiable({grad_mean, stats});
    ctx->save_for_backward({grad_mean});
    ctx->set_materialize_grads(false);  // no zero tensors for the gradients of grad_mean and stats
    return {loss, grad_mean, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad;
    if (grads[0].defined() && ctx->needs_input_grad(1)) grad = grads[0].mul(ctx->get_saved_variables()[0]);
    return {at::Tensor(), grad, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gaussian_logprob_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                                     int64_t granularity) {
  return GaussianLogprob::apply(x, mean, std, granularity);
}

LossOutputs pxpo_loss_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                               const at::Tensor& logp_old, const at::Tensor& adv,
                               const std::optional<at::Tensor>& weight, double clip_range, int64_t granularity,
                               int64_t loss_type) {
  const variable_list out = PxpoLoss::apply(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pxpo, Autograd, m) {
  m.impl("gaussian_logprob", &gaussian_logprob_autograd);
  m.impl("pxpo_loss", &pxpo_loss_autograd);
}

}  // namespace pxpo
