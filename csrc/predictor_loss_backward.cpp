// predictor_loss_backward for every device: predictor_loss formed its
// gradients in forward for a unit upstream gradient, so backward only scales
// them by grad_loss, in their own precision, and returns them in the loss's
// dtype. y and the dictionary are read for their shapes only; as arguments
// they tie the result's autograd history to them, so that differentiating the
// gradients again raises (see srm_ext/_op_registration.py) instead of
// treating them as constants.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace srm_ext {
namespace {

// grad_loss * unit_grad, which must have the shape `expected`.
at::Tensor scaled(const at::Tensor& grad_loss, const at::Tensor& unit_grad,
                  at::IntArrayRef expected, const char* name, bool wanted) {
  if (!wanted) return at::empty({0}, unit_grad.options().dtype(grad_loss.scalar_type()));
  TORCH_CHECK(unit_grad.sizes() == expected, name, " must have shape ", expected,
              " (formed by predictor_loss with its output_mask entry on), got ",
              unit_grad.sizes());
  return unit_grad.mul(grad_loss.to(unit_grad.scalar_type())).to(grad_loss.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictor_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_y, const at::Tensor& grad_dictionary,
    const at::Tensor& grad_intercept, const at::Tensor& y, const at::Tensor& dictionary,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must have one element, got shape ",
              grad_loss.sizes());
  const auto upstream = grad_loss.reshape({});
  return {scaled(upstream, grad_y, y.sizes(), "grad_y", output_mask[0]),
          scaled(upstream, grad_dictionary, dictionary.sizes(), "grad_dictionary",
                 output_mask[1]),
          scaled(upstream, grad_intercept, {}, "grad_intercept", output_mask[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CompositeExplicitAutograd, m) {
  m.impl("predictor_loss_backward", &predictor_loss_backward);
}

}  // namespace srm_ext
