// The student-side stage-2 loss on the CPU.
//
// The loss is a scalar, so its whole gradient with respect to the
// pre-activations z = C_s^T y_p + b_s can be formed in the forward pass, in the
// one (N, H, W, K) buffer the op keeps (grad_logits): one GEMM writes z there,
// and two passes over each image's rows, one after the other while the rows
// are in cache, turn it into the gradient in place. The backward op then
// needs only the GEMMs that map that gradient to y and to the dictionary.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "checks.h"
#include "pixel_tiles.h"
#include "sparse_math.h"
#include "vector_math.h"

namespace srm_ext::cpu {
namespace {

// The denominator of torch's binary_cross_entropy gradient is clamped at
// 1e-12, as is ours, so saturated means keep a finite gradient.
constexpr double kBceEpsilon = 1e-12;

// Pass-1 row: q = sigmoid(z + b) in place, q added to the slice's column
// sums; returns sum_c exp(q_c). q lies in (0, 1), so exp(q) needs no
// max-shift. float32 rows use the vectorized version in vector_math.cpp.
double sigmoid_row(double* row, int64_t n, double bias, double* column_sums) {
  double total = 0;
  for (int64_t c = 0; c < n; ++c) {
    row[c] = sigmoid(row[c] + bias);
    total += std::exp(row[c]);
    column_sums[c] += row[c];
  }
  return total;
}
float sigmoid_row(float* row, int64_t n, float bias, double* column_sums) {
  return sigmoid_exp_sum_row(row, n, bias, column_sums);
}

// Pass-2 row: q -> dloss/dz = (local_scale * softmax(q) + global_grad) * q (1 - q),
// in place, with softmax_scale = local_scale / sum_c exp(q_c); the one-hot
// part of the cross-entropy is handled by the caller.
void grad_row(double* row, int64_t n, double softmax_scale, const double* global_grad) {
  for (int64_t c = 0; c < n; ++c) {
    const double q = row[c];
    row[c] = (softmax_scale * std::exp(q) + global_grad[c]) * q * (1.0 - q);
  }
}
void grad_row(float* row, int64_t n, float softmax_scale, const float* global_grad) {
  softmax_sigmoid_grad_row(row, n, softmax_scale, global_grad);
}

void check_labels(const at::Tensor& pixel_labels, const at::Tensor& image_labels,
                  const at::Tensor& y, int64_t num_codewords) {
  TORCH_CHECK(pixel_labels.scalar_type() == at::kLong, "pixel_labels must be int64, got ",
              pixel_labels.scalar_type());
  TORCH_CHECK(pixel_labels.dim() == 3 && pixel_labels.size(0) == y.size(0) &&
                  pixel_labels.size(1) == y.size(2) && pixel_labels.size(2) == y.size(3),
              "pixel_labels must have shape (", y.size(0), ", ", y.size(2), ", ", y.size(3),
              ") to match y, got ", pixel_labels.sizes());
  TORCH_CHECK(image_labels.dim() == 2 && image_labels.size(0) == y.size(0) &&
                  image_labels.size(1) == num_codewords,
              "image_labels must have shape (", y.size(0), ", ", num_codewords, "), got ",
              image_labels.sizes());
  check_same_dtype(y, "y", image_labels, "image_labels");
  if (pixel_labels.numel() > 0) {
    const auto [lo, hi] = at::aminmax(pixel_labels);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < num_codewords,
                "pixel_labels must lie in [0, ", num_codewords, ")");
  }
}

// How the passes over the logits split the pixels, by the shape alone. A
// slice is a whole image, or a part of an image too large for one tile; the
// column sums of q and the cross-entropy are summed per slice, and the
// slices' sums added in order, so the result does not depend on the threads.
// A tile, the unit of work, is a run of whole images or one slice. A tile of
// whole images finishes its images (means, gradient pass) while their rows
// are still in L2; slices of a larger image wait for its other slices.
class StudentTiling {
 public:
  StudentTiling(int64_t images, int64_t per_image, int64_t num_codewords)
      : images_(images), per_image_(per_image) {
    // About 2^17 logits (512 KiB in float32) per tile, and at least 64
    // pixels per slice, so the slices' column sums (K doubles each) stay a
    // small fraction of the logits whatever K.
    constexpr int64_t kTileElements = 1 << 17, kMinSlicePixels = 64;
    const int64_t rows =
        std::max(kTileElements / std::max<int64_t>(num_codewords, 1), kMinSlicePixels);
    slices_per_image_ = std::max<int64_t>(1, (per_image + rows - 1) / rows);
    slice_pixels_ = (per_image + slices_per_image_ - 1) / slices_per_image_;
    // Runs of whole images, at most a thread's share of them.
    const int64_t threads = std::max(at::get_num_threads(), 1);
    images_per_tile_ = std::clamp<int64_t>(rows / std::max<int64_t>(per_image, 1), 1,
                                           std::max<int64_t>((images + threads - 1) / threads, 1));
  }

  bool whole_images() const { return slices_per_image_ == 1; }
  int64_t slices_per_image() const { return slices_per_image_; }
  int64_t slices() const { return images_ * slices_per_image_; }
  int64_t tiles() const {
    return whole_images() ? (images_ + images_per_tile_ - 1) / images_per_tile_ : slices();
  }
  // Slices [first, last) of tile t; for whole images, slice i is image i.
  std::pair<int64_t, int64_t> tile_slices(int64_t t) const {
    if (!whole_images()) return {t, t + 1};
    return {t * images_per_tile_, std::min(images_, (t + 1) * images_per_tile_)};
  }
  // Pixels [slice_begin(s), slice_end(s)) of slice s.
  int64_t slice_begin(int64_t s) const {
    return (s / slices_per_image_) * per_image_ + (s % slices_per_image_) * slice_pixels_;
  }
  int64_t slice_end(int64_t s) const {
    const int64_t image_end = (s / slices_per_image_ + 1) * per_image_;
    return std::min(image_end, slice_begin(s) + slice_pixels_);
  }

 private:
  int64_t images_, per_image_, slices_per_image_, slice_pixels_, images_per_tile_;
};

// The two passes that turn the logits z, a (pixels x K) row-major buffer,
// into dloss/dz in place (via q = sigmoid(z + b)), and the loss on the way.
template <typename scalar_t>
class StudentLossPasses {
 public:
  StudentLossPasses(scalar_t* logits, int64_t images, int64_t per_image, int64_t num_codewords,
                    scalar_t bias, const int64_t* labels, const scalar_t* targets,
                    double local_weight, double global_weight)
      : G_(logits), images_(images), per_image_(per_image), num_codewords_(num_codewords),
        bias_(bias), labels_(labels), targets_(targets),
        tiling_(images, per_image, num_codewords),
        local_weight_(local_weight), global_weight_(global_weight),
        local_scale_(static_cast<scalar_t>(local_weight / static_cast<double>(pixels()))),
        global_scale_(global_weight / static_cast<double>(std::max<int64_t>(terms(), 1))),
        exp_sums_(pixels()), ce_sums_(tiling_.slices(), 0.0),
        q_sums_(tiling_.slices() * num_codewords, 0.0), bce_sums_(images, 0.0),
        means_(terms()), global_grad_(terms()) {}

  void run() {
    const int64_t K = num_codewords_;
    at::parallel_for(0, tiling_.tiles(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto [s0, s1] = tiling_.tile_slices(t);
        for (int64_t s = s0; s < s1; ++s) sigmoid_pass(s);
        if (!tiling_.whole_images()) continue;
        for (int64_t img = s0; img < s1; ++img) {
          finish_image(img, q_sums_.data() + img * K);
          gradient_pass(img * per_image_, (img + 1) * per_image_);
        }
      }
    });
    if (tiling_.whole_images()) return;
    // Each larger image: its slices' sums added in order, then the gradient
    // pass over all pixels.
    const int64_t slices = tiling_.slices_per_image();
    at::parallel_for(0, images_, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t img = i0; img < i1; ++img) {
        double* sums = q_sums_.data() + img * slices * K;
        for (int64_t s = 1; s < slices; ++s) {
          for (int64_t c = 0; c < K; ++c) sums[c] += sums[s * K + c];
        }
        finish_image(img, sums);
      }
    });
    at::parallel_for(0, pixels(), 1, [&](int64_t p0, int64_t p1) { gradient_pass(p0, p1); });
  }

  // Call after run().
  double loss() const {
    double ce_sum = 0.0, bce_sum = 0.0;
    for (double s : ce_sums_) ce_sum += s;
    for (double s : bce_sums_) bce_sum += s;
    return local_weight_ * ce_sum / static_cast<double>(pixels()) +
           global_weight_ * bce_sum / static_cast<double>(terms());
  }

 private:
  int64_t pixels() const { return images_ * per_image_; }
  int64_t terms() const { return images_ * num_codewords_; }

  // Pass 1 over slice s: q = sigmoid(z + b) in place, the slice's column
  // sums of q and its cross-entropy sum.
  void sigmoid_pass(int64_t s) {
    double* sums = q_sums_.data() + s * num_codewords_;
    for (int64_t p = tiling_.slice_begin(s); p < tiling_.slice_end(s); ++p) {
      scalar_t* q = G_ + p * num_codewords_;
      exp_sums_[p] = sigmoid_row(q, num_codewords_, bias_, sums);
      ce_sums_[s] += std::log(exp_sums_[p]) - q[labels_[p]];
    }
  }

  // From the sums of q over image img's pixels, per codeword: the BCE term
  // of the image mean and its gradient with respect to each pixel's q.
  void finish_image(int64_t img, const double* q_sum) {
    const int64_t K = num_codewords_;
    const auto per_image = static_cast<double>(per_image_);
    scalar_t* means = means_.data() + img * K;
    scalar_t* global_grad = global_grad_.data() + img * K;
    const scalar_t* target = targets_ + img * K;
    for (int64_t c = 0; c < K; ++c) {
      const auto mean = static_cast<scalar_t>(q_sum[c] / per_image);
      means[c] = mean;
      const double dmean = (static_cast<double>(mean) - target[c]) /
                           std::max<double>(static_cast<double>(mean) * (1.0 - mean), kBceEpsilon);
      global_grad[c] = static_cast<scalar_t>(global_scale_ * dmean / per_image);
    }
    bce_sums_[img] = binary_cross_entropy_sum(means, target, K);
  }

  // Pass 2 over pixels [p0, p1): q -> dloss/dz = (dlocal/dq + dglobal/dq) * q (1 - q).
  void gradient_pass(int64_t p0, int64_t p1) {
    const int64_t K = num_codewords_;
    for (int64_t p = p0; p < p1; ++p) {
      scalar_t* q = G_ + p * K;
      const scalar_t q_label = q[labels_[p]];
      grad_row(q, K, local_scale_ / exp_sums_[p], global_grad_.data() + (p / per_image_) * K);
      q[labels_[p]] -= local_scale_ * q_label * (scalar_t(1) - q_label);
    }
  }

  scalar_t* G_;
  int64_t images_, per_image_, num_codewords_;
  scalar_t bias_;
  const int64_t* labels_;
  const scalar_t* targets_;
  StudentTiling tiling_;
  double local_weight_, global_weight_;
  scalar_t local_scale_;
  double global_scale_;
  std::vector<scalar_t> exp_sums_;             // sum_c exp(q_c) per pixel
  std::vector<double> ce_sums_;                // per slice
  std::vector<double> q_sums_;                 // per slice and codeword
  std::vector<double> bce_sums_;               // per image
  std::vector<scalar_t> means_, global_grad_;  // per image and codeword
};

// (N*H*W, C) pixel-major rows of an (N, C, H, W) map: a view when it is
// channels_last, else a copy made tile by tile (for NCHW by in-register
// transposes, several times faster than a permuted at::copy_).
at::Tensor pixel_rows(const at::Tensor& y) {
  const int64_t pixels = y.size(0) * y.size(2) * y.size(3), channels = y.size(1);
  const auto pixel_major = y.permute({0, 2, 3, 1});
  if (pixel_major.is_contiguous()) return pixel_major.view({pixels, channels});
  auto rows = at::empty({pixels, channels}, y.options());
  const PixelGrid grid(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "pixel_rows_cpu", [&] {
    for_each_piece(0, pixels, [&](int64_t, int64_t p0, int64_t count) {
      gather_tile(y.const_data_ptr<scalar_t>(), grid, p0, count,
                  rows.mutable_data_ptr<scalar_t>() + p0 * channels);
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> predictor_loss(const at::Tensor& y,
                                                  const at::Tensor& dictionary,
                                                  const at::Tensor& intercept,
                                                  const at::Tensor& pixel_labels,
                                                  const at::Tensor& image_labels,
                                                  double local_weight, double global_weight) {
  check_features_and_dictionary(y, "y", dictionary);
  check_intercept(intercept, y, "y");
  const int64_t num_codewords = dictionary.size(1);
  check_labels(pixel_labels, image_labels, y, num_codewords);

  const int64_t images = y.size(0), per_image = y.size(2) * y.size(3);
  auto grad_logits = at::empty({images, y.size(2), y.size(3), num_codewords}, y.options());
  // z for every pixel in one GEMM, into the buffer the op keeps anyway: BLAS
  // packs the dictionary once, where a GEMM per tile would pack it per tile.
  auto logits = grad_logits.view({images * per_image, num_codewords});
  at::mm_out(logits, pixel_rows(y), dictionary);
  const auto labels = pixel_labels.contiguous();
  const auto targets = image_labels.contiguous();
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "predictor_loss_cpu", [&] {
    StudentLossPasses<scalar_t> passes(
        grad_logits.mutable_data_ptr<scalar_t>(), images, per_image, num_codewords,
        intercept.item<scalar_t>(), labels.const_data_ptr<int64_t>(),
        targets.const_data_ptr<scalar_t>(), local_weight, global_weight);
    passes.run();
    loss = passes.loss();
  });
  return {at::scalar_tensor(loss, y.options()), grad_logits};
}

// Sum of a (rows x cols) matrix with per-piece partials added in order: the
// same bits for any thread count, which at::sum does not promise.
double ordered_sum(const at::Tensor& matrix) {
  const auto m = matrix.contiguous();
  const int64_t cols = m.size(1);
  PieceSums sums(m.size(0));
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "ordered_sum_cpu", [&] {
    const scalar_t* data = m.const_data_ptr<scalar_t>();
    for_each_piece(0, m.size(0), [&](int64_t piece, int64_t r0, int64_t count) {
      for (int64_t r = r0; r < r0 + count; ++r) {
        const scalar_t* row = data + r * cols;
        sums[piece] += sum_in_lanes<double>(cols, [&](int64_t c) { return double(row[c]); });
      }
    });
  });
  return sums.total();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictor_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_logits, const at::Tensor& y,
    const at::Tensor& dictionary, std::array<bool, 3> output_mask) {
  check_features_and_dictionary(y, "y", dictionary);
  const int64_t n = y.size(0), dim = y.size(1), h = y.size(2), w = y.size(3);
  const int64_t num_codewords = dictionary.size(1);
  TORCH_CHECK(grad_logits.sizes() == at::IntArrayRef({n, h, w, num_codewords}),
              "grad_logits must have shape (", n, ", ", h, ", ", w, ", ", num_codewords,
              "), got ", grad_logits.sizes());
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must have one element");
  const double scale = grad_loss.item<double>();
  // The gradient for a unit loss was formed in forward; BLAS applies the
  // scale (alpha) as it writes the small results, with no pass over them.
  const auto G = grad_logits.reshape({n * h * w, num_codewords});
  at::Tensor grad_y = unwanted(y), grad_dict = unwanted(dictionary), grad_bias = unwanted(y);
  if (output_mask[0]) {
    auto rows = at::empty({n * h * w, dim}, y.options());
    at::addmm_out(rows, rows, G, dictionary.t(), /*beta=*/0, /*alpha=*/scale);
    grad_y = rows.view({n, h, w, dim}).permute({0, 3, 1, 2});
  }
  if (output_mask[1]) {
    grad_dict = at::empty_like(dictionary);  // laid out like the dictionary
    at::addmm_out(grad_dict, grad_dict, pixel_rows(y).t(), G, /*beta=*/0, /*alpha=*/scale);
  }
  if (output_mask[2]) grad_bias = at::scalar_tensor(ordered_sum(G) * scale, y.options());
  return {grad_y, grad_dict, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) {
  m.impl("predictor_loss", &predictor_loss);
  m.impl("predictor_loss_backward", &predictor_loss_backward);
}

}  // namespace srm_ext::cpu
