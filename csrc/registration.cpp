// Operator schemas of the srm_ext library. Every backend (CPU here, CUDA in
// csrc/cuda) registers implementations for these names; the Python package
// adds fake (meta) kernels and autograd on top (srm_ext/_op_registration.py).
//
// Layout conventions shared by all kernels:
//   x, y, x_hat, grad_x     (N, D, H, W), any strides
//   dictionary              (D, K)
//   intercept               one element
//   values, indices         (N, H, W, k), contiguous, indices int64
// A backward op returns an empty tensor of shape (0,) for every gradient whose
// output_mask entry is false; so does predictor_loss, which forms its
// gradients in forward, for a unit upstream gradient (float16 inputs get them
// in float32, whose range holds them unscaled); its backward op scales them,
// and takes y and the dictionary to check them against (and so that the
// scaled gradients' autograd history reaches the inputs). The encoder's
// backward ops take the intercept too: where values are rounded to a 16-bit
// dtype, the derivative of the sigmoid needs the pre-activation, recomputed
// from x, dictionary and it.
#include <torch/library.h>

TORCH_LIBRARY(srm_ext, m) {
  m.def(
      "sparse_encode(Tensor x, Tensor dictionary, Tensor intercept, int k)"
      " -> (Tensor values, Tensor indices)");
  m.def(
      "sparse_encode_backward(Tensor grad_values, Tensor values, Tensor indices,"
      " Tensor x, Tensor dictionary, Tensor intercept, bool[3] output_mask)"
      " -> (Tensor grad_x, Tensor grad_dictionary, Tensor grad_intercept)");
  m.def(
      "sparse_decode(Tensor values, Tensor indices, Tensor dictionary)"
      " -> Tensor");
  m.def(
      "sparse_decode_backward(Tensor grad_output, Tensor values, Tensor indices,"
      " Tensor dictionary, bool[2] output_mask)"
      " -> (Tensor grad_values, Tensor grad_dictionary)");
  m.def(
      "reconstruction_loss(Tensor x, Tensor dictionary, Tensor intercept, int k)"
      " -> (Tensor loss, Tensor values, Tensor indices)");
  m.def(
      "reconstruction_loss_backward(Tensor grad_loss, Tensor x, Tensor dictionary,"
      " Tensor intercept, Tensor values, Tensor indices, bool[3] output_mask)"
      " -> (Tensor grad_x, Tensor grad_dictionary, Tensor grad_intercept)");
  m.def(
      "sparse_labels(Tensor values, Tensor indices, int num_codewords)"
      " -> (Tensor pixel_labels, Tensor image_labels)");
  m.def(
      "predictor_loss(Tensor y, Tensor dictionary, Tensor intercept,"
      " Tensor pixel_labels, Tensor image_labels, float local_weight,"
      " float global_weight, bool[3] output_mask) -> (Tensor loss, Tensor grad_y,"
      " Tensor grad_dictionary, Tensor grad_intercept)");
  m.def(
      "predictor_loss_backward(Tensor grad_loss, Tensor grad_y, Tensor grad_dictionary,"
      " Tensor grad_intercept, Tensor y, Tensor dictionary, bool[3] output_mask)"
      " -> (Tensor grad_y, Tensor grad_dictionary, Tensor grad_intercept)");
}
