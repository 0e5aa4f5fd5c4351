// The student-side stage-2 loss on the CPU.
//
// The loss is a scalar, so its whole gradient with respect to the
// pre-activations z = C_s^T y_p + b_s can be formed in the forward pass, in the
// one (N, H, W, K) buffer the op keeps (grad_logits): one GEMM writes z there,
// and two passes over its rows turn it into the gradient in place. The
// backward op then needs only the GEMMs that map that gradient to y and to
// the dictionary.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "pixel_tiles.h"
#include "sparse_math.h"
#include "vector_math.h"

namespace srm_ext::cpu {
namespace {

// The denominator of torch's binary_cross_entropy gradient is clamped at
// 1e-12, as is ours, so saturated means keep a finite gradient.
constexpr double kBceEpsilon = 1e-12;

// Pass-1 row: q = sigmoid(z + b) in place, q added to the image's column
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

// A fixed partition of the pixels into contiguous segments for pass 1; it
// depends on the pixel count only, so every partial sum is formed in the
// same order whatever the thread count. Each segment keeps column sums for
// just the images it overlaps: (N + segments) x K partials in all.
class PixelSegments {
 public:
  PixelSegments(int64_t pixels, int64_t per_image)
      : pixels_(pixels), per_image_(per_image),
        count_(std::min<int64_t>(kMaxSegments, num_pieces(pixels))), first_row_(count_ + 1, 0) {
    for (int64_t s = 0; s < count_; ++s) {
      first_row_[s + 1] = first_row_[s] + last_image(s) - first_image(s) + 1;
    }
  }

  int64_t count() const { return count_; }
  int64_t rows() const { return first_row_[count_]; }
  int64_t begin(int64_t s) const { return pixels_ * s / count_; }
  int64_t end(int64_t s) const { return pixels_ * (s + 1) / count_; }
  int64_t first_image(int64_t s) const { return begin(s) / per_image_; }
  int64_t last_image(int64_t s) const { return (end(s) - 1) / per_image_; }
  // Row of image `img` among segment s's column sums.
  int64_t row(int64_t s, int64_t img) const { return first_row_[s] + img - first_image(s); }

 private:
  static constexpr int64_t kMaxSegments = 64;
  int64_t pixels_, per_image_, count_;
  std::vector<int64_t> first_row_;
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
  check_intercept(intercept, y);
  const int64_t num_codewords = dictionary.size(1);
  check_labels(pixel_labels, image_labels, y, num_codewords);

  const PixelGrid grid(y);
  const int64_t pixels = grid.pixels(), per_image = grid.pixels_per_image(), n = grid.n;
  auto grad_logits = at::empty({grid.n, grid.h, grid.w, num_codewords}, y.options());
  const auto labels = pixel_labels.contiguous();
  const auto targets = image_labels.contiguous();
  const PixelSegments segments(pixels, per_image);
  double loss = 0.0;

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "predictor_loss_cpu", [&] {
    const scalar_t bias = intercept.item<scalar_t>();
    scalar_t* G = grad_logits.mutable_data_ptr<scalar_t>();
    const int64_t* label = labels.const_data_ptr<int64_t>();
    std::vector<scalar_t> exp_sums(pixels);  // sum_c exp(q_c) per pixel
    // Per segment: the cross-entropy sum and its images' column sums of q.
    std::vector<double> ce_sums(segments.count(), 0.0);
    std::vector<double> q_sums(segments.rows() * num_codewords, 0.0);

    // z for every pixel in one GEMM: the (pixels x K) result is the buffer the
    // op keeps anyway, and one large product runs BLAS at full speed.
    auto logits = grad_logits.view({pixels, num_codewords});
    at::mm_out(logits, pixel_rows(y), dictionary);

    // Pass 1: q = sigmoid(z + b) in place, per-pixel sums of exp(q).
    at::parallel_for(0, segments.count(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t p = segments.begin(s); p < segments.end(s); ++p) {
          scalar_t* q = G + p * num_codewords;
          double* image_sums = q_sums.data() + segments.row(s, p / per_image) * num_codewords;
          exp_sums[p] = sigmoid_row(q, num_codewords, bias, image_sums);
          ce_sums[s] += std::log(exp_sums[p]) - q[label[p]];
        }
      }
    });
    // The first segment overlapping each image.
    std::vector<int64_t> first_segment(n, 0);
    for (int64_t s = segments.count() - 1; s >= 0; --s) {
      for (int64_t img = segments.first_image(s); img <= segments.last_image(s); ++img) {
        first_segment[img] = s;
      }
    }

    // Per image and codeword: the BCE term and its gradient with respect to
    // each pixel's q (through the image mean). Partial sums per fixed block
    // of terms, added in order, so the loss does not depend on the threads.
    const int64_t terms = n * num_codewords;
    constexpr int64_t kTermsPerBlock = 1024;
    std::vector<scalar_t> means(terms), global_grad(terms);
    std::vector<double> bce_sums((terms + kTermsPerBlock - 1) / kTermsPerBlock, 0.0);
    const double global_scale = global_weight / static_cast<double>(std::max<int64_t>(terms, 1));
    const scalar_t* target = targets.const_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(bce_sums.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t block = b0; block < b1; ++block) {
        const int64_t i0 = block * kTermsPerBlock, i1 = std::min(terms, i0 + kTermsPerBlock);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t img = i / num_codewords, c = i % num_codewords;
          double q_sum = 0.0;
          for (int64_t s = first_segment[img];
               s < segments.count() && segments.first_image(s) <= img; ++s) {
            q_sum += q_sums[segments.row(s, img) * num_codewords + c];
          }
          const auto mean = static_cast<scalar_t>(q_sum / static_cast<double>(per_image));
          means[i] = mean;
          const double dmean =
              (static_cast<double>(mean) - target[i]) /
              std::max<double>(static_cast<double>(mean) * (1.0 - mean), kBceEpsilon);
          global_grad[i] =
              static_cast<scalar_t>(global_scale * dmean / static_cast<double>(per_image));
        }
        bce_sums[block] = binary_cross_entropy_sum(means.data() + i0, target + i0, i1 - i0);
      }
    });
    double bce_sum = 0.0;
    for (double s : bce_sums) bce_sum += s;

    // Pass 2: G = dloss/dz = (dlocal/dq + dglobal/dq) * q (1 - q), in place.
    const auto local_scale = static_cast<scalar_t>(local_weight / static_cast<double>(pixels));
    at::parallel_for(0, pixels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* q = G + p * num_codewords;
        const scalar_t q_label = q[label[p]];
        grad_row(q, num_codewords, local_scale / exp_sums[p],
                 global_grad.data() + (p / per_image) * num_codewords);
        q[label[p]] -= local_scale * q_label * (scalar_t(1) - q_label);
      }
    });

    double ce_sum = 0.0;
    for (double s : ce_sums) ce_sum += s;
    loss = local_weight * ce_sum / static_cast<double>(pixels) +
           global_weight * bce_sum / static_cast<double>(terms);
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
