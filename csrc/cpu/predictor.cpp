// The student-side stage-2 loss on the CPU.
//
// The loss is a scalar, so its gradients can be formed in the forward pass,
// for a unit upstream gradient, and the backward op only scales them. Tile by
// tile of pixels: a GEMM writes the logits z = C_s^T y_p, two passes over
// each image's rows turn them into dloss/dz in place (with the loss on the
// way), and two GEMMs map that to y and to the dictionary, all while the
// tile's rows are in cache. Where the tiles hold whole images no (N, H, W, K)
// tensor exists at all; images too large for one tile take one for the
// duration of the op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../argument_checks.h"
#include "checks.h"
#include "matmul.h"
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
  TORCH_CHECK(y.size(0) * y.size(2) * y.size(3) > 0,
              "y must have at least one pixel (N*H*W > 0), got shape ", y.sizes());
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
  check_index_range(pixel_labels, "pixel_labels", num_codewords);
  if (image_labels.numel() > 0) {
    // aminmax propagates NaN, which then fails both comparisons.
    const auto [lo, hi] = at::aminmax(image_labels);
    const double image_lo = lo.item<double>(), image_hi = hi.item<double>();
    TORCH_CHECK_VALUE(image_lo >= 0.0 && image_hi <= 1.0, "image_labels must lie in [0, 1], got ",
                      std::isnan(image_lo) ? std::string("NaN")
                                           : c10::str("values in [", image_lo, ", ", image_hi, "]"));
  }
}

// How the work splits the pixels, by the shape alone: never by the thread
// count, so every GEMM is the same call and every sum the same order on any
// number of threads. A slice is a whole image, or a part of an image too
// large for one tile; the column sums of q and the cross-entropy are summed
// per slice, and the slices' sums added in order. A tile, the unit of work,
// is a run of whole images or one slice.
class StudentTiling {
 public:
  StudentTiling(int64_t images, int64_t per_image, int64_t num_codewords)
      : images_(images), per_image_(per_image) {
    // At most about 2^18 logits (1 MiB in float32) per tile, and at least 64
    // pixels: rows enough for efficient GEMMs, and the slices' column sums (K
    // doubles each) stay a small fraction of the logits. Images larger than
    // that are sliced.
    constexpr int64_t kTileElements = 1 << 18, kMinTilePixels = 64;
    const int64_t most_rows =
        std::max(kTileElements / std::max<int64_t>(num_codewords, 1), kMinTilePixels);
    slices_per_image_ = std::max<int64_t>(1, (per_image + most_rows - 1) / most_rows);
    slice_pixels_ = (per_image + slices_per_image_ - 1) / slices_per_image_;
    // Smaller batches are still cut into up to kTargetTiles tiles of whole
    // images, a count fixed by the shape, so that they keep several threads
    // busy too; but not into tiles much below 64 pixels, since each tile's
    // dictionary-gradient product reads and writes a whole D x K partial sum.
    constexpr int64_t kTargetTiles = 8;
    const int64_t rows = std::min(
        most_rows, std::max((images * per_image + kTargetTiles - 1) / kTargetTiles, kMinTilePixels));
    images_per_tile_ = std::max<int64_t>(rows / std::max<int64_t>(per_image, 1), 1);
  }

  bool whole_images() const { return slices_per_image_ == 1; }
  int64_t slices_per_image() const { return slices_per_image_; }
  int64_t slices() const { return images_ * slices_per_image_; }
  int64_t tiles() const {
    return whole_images() ? (images_ + images_per_tile_ - 1) / images_per_tile_ : slices();
  }
  // The most pixels in one tile.
  int64_t tile_capacity() const {
    return whole_images() ? images_per_tile_ * per_image_ : slice_pixels_;
  }
  // Slices [first, last) of tile t; for whole images, slice i is image i.
  std::pair<int64_t, int64_t> tile_slices(int64_t t) const {
    if (!whole_images()) return {t, t + 1};
    return {t * images_per_tile_, std::min(images_, (t + 1) * images_per_tile_)};
  }
  // Pixels [tile_begin(t), tile_end(t)) of tile t.
  int64_t tile_begin(int64_t t) const { return slice_begin(tile_slices(t).first); }
  int64_t tile_end(int64_t t) const { return slice_end(tile_slices(t).second - 1); }
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

// Rows of logits (K values each) for pixels from `first` on.
template <typename scalar_t>
struct LogitRows {
  scalar_t* data;
  int64_t first, num_codewords;
  scalar_t* row(int64_t p) const { return data + (p - first) * num_codewords; }
};

// The loss and its gradients for a unit upstream gradient (those in the
// output mask: y, dictionary, intercept).
template <typename scalar_t>
class StudentLoss {
 public:
  // dictionary: (D_s, K), any strides, detached.
  StudentLoss(const at::Tensor& y, const at::Tensor& dictionary, scalar_t bias,
              const int64_t* labels, const scalar_t* targets, double local_weight,
              double global_weight, std::array<bool, 3> output_mask)
      : y_(y.const_data_ptr<scalar_t>()), grid_(y), dictionary_(dictionary),
        images_(y.size(0)), per_image_(grid_.pixels_per_image()),
        num_codewords_(dictionary.size(1)), bias_(bias), labels_(labels), targets_(targets),
        tiling_(images_, per_image_, num_codewords_), want_(output_mask),
        local_weight_(local_weight), global_weight_(global_weight),
        local_scale_(static_cast<scalar_t>(local_weight / static_cast<double>(pixels()))),
        global_scale_(global_weight / static_cast<double>(terms())),
        exp_sums_(pixels()), ce_sums_(tiling_.slices(), 0.0),
        q_sums_(tiling_.slices() * num_codewords_, 0.0), bce_sums_(images_, 0.0),
        means_(terms()), global_grad_(terms()), bias_sums_(tiling_.tiles(), 0.0),
        logits_factor_(dictionary) {
    const auto opts = dictionary.options();
    if (want_[0]) {
      grad_rows_ = at::empty({pixels(), grid_.c}, opts);
      grad_y_factor_.emplace(dictionary.t());
    }
    if (want_[1]) {
      // One partial sum per worker, laid out like the dictionary; a worker's
      // first tile writes it, so it needs no zero fill.
      for (int64_t w = 0; w < at::get_num_threads(); ++w) {
        grad_dictionary_parts_.push_back(at::empty_like(dictionary));
      }
      part_started_.assign(grad_dictionary_parts_.size(), false);
    }
  }

  void run() {
    const int64_t K = num_codewords_;
    const bool any_grad = want_[0] || want_[1] || want_[2];
    PerThreadScratch<scalar_t> features(tiling_.tile_capacity() * grid_.c);
    if (tiling_.whole_images()) {
      // Each tile from logits to gradients in its worker's own buffer.
      PerThreadScratch<scalar_t> logits(tiling_.tile_capacity() * K);
      at::parallel_for(0, tiling_.tiles(), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p0 = tiling_.tile_begin(t), p1 = tiling_.tile_end(t);
          const LogitRows<scalar_t> rows{logits.get(), p0, K};
          logits_pass(p0, p1, rows, features.get());
          const auto [s0, s1] = tiling_.tile_slices(t);
          for (int64_t img = s0; img < s1; ++img) {
            sigmoid_pass(img, rows);
            finish_image(img, q_sums_.data() + img * K);
          }
          if (!any_grad) continue;
          gradient_pass(p0, p1, rows);
          gradient_products(t, rows, features.get());
        }
      });
      return;
    }
    // Larger images: the slices' logits in one buffer, kept until every slice
    // of an image has added its sums.
    auto logits = at::empty({pixels(), K}, dictionary_.options());
    const LogitRows<scalar_t> rows{logits.template mutable_data_ptr<scalar_t>(), 0, K};
    at::parallel_for(0, tiling_.slices(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        logits_pass(tiling_.slice_begin(s), tiling_.slice_end(s), rows, features.get());
        sigmoid_pass(s, rows);
      }
    });
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
    if (!any_grad) return;
    at::parallel_for(0, tiling_.slices(), 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t p0 = tiling_.slice_begin(s), p1 = tiling_.slice_end(s);
        gradient_pass(p0, p1, rows);
        if (want_[1]) gather_tile(y_, grid_, p0, p1 - p0, features.get());
        gradient_products(s, rows, features.get());
      }
    });
  }

  // Call after run().
  double loss() const {
    double ce_sum = 0.0, bce_sum = 0.0;
    for (double s : ce_sums_) ce_sum += s;
    for (double s : bce_sums_) bce_sum += s;
    return local_weight_ * ce_sum / static_cast<double>(pixels()) +
           global_weight_ * bce_sum / static_cast<double>(terms());
  }

  // Call after run(): the gradients in the output mask, (0,)-shaped others.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> gradients(const at::Tensor& y) const {
    at::Tensor grad_y = unwanted(y), grad_dict = unwanted(y), grad_bias = unwanted(y);
    if (want_[0]) {
      grad_y = grad_rows_.view({y.size(0), y.size(2), y.size(3), grid_.c}).permute({0, 3, 1, 2});
    }
    if (want_[1]) grad_dict = dictionary_gradient();
    if (want_[2]) {
      double total = 0.0;
      for (double s : bias_sums_) total += s;
      grad_bias = scalar_like(total, y);
    }
    return {grad_y, grad_dict, grad_bias};
  }

 private:
  int64_t pixels() const { return images_ * per_image_; }
  int64_t terms() const { return images_ * num_codewords_; }

  // The workers' partial sums of the dictionary gradient, added in worker
  // order. There is at least one pixel, so some worker had a tile.
  at::Tensor dictionary_gradient() const {
    at::Tensor total;
    for (size_t w = 0; w < grad_dictionary_parts_.size(); ++w) {
      if (!part_started_[w]) continue;
      if (total.defined()) {
        total.add_(grad_dictionary_parts_[w]);
      } else {
        total = grad_dictionary_parts_[w];
      }
    }
    TORCH_INTERNAL_ASSERT(total.defined(), "no tile formed a dictionary gradient");
    return total;
  }

  // z = y_p^T C_s for pixels [p0, p1), their features gathered into
  // `features` (D_s values per pixel) first.
  void logits_pass(int64_t p0, int64_t p1, const LogitRows<scalar_t>& rows,
                   scalar_t* features) {
    gather_tile(y_, grid_, p0, p1 - p0, features);
    const MatrixRef<scalar_t> tile{features, p1 - p0, grid_.c, grid_.c, 1};
    logits_factor_.multiply(tile, rows.row(p0), num_codewords_, /*accumulate=*/false);
  }

  // Slice s: q = sigmoid(z + b) in place, the slice's column sums of q and
  // its cross-entropy sum.
  void sigmoid_pass(int64_t s, const LogitRows<scalar_t>& rows) {
    double* sums = q_sums_.data() + s * num_codewords_;
    for (int64_t p = tiling_.slice_begin(s); p < tiling_.slice_end(s); ++p) {
      scalar_t* q = rows.row(p);
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

  // Pixels [p0, p1): q -> dloss/dz = (dlocal/dq + dglobal/dq) * q (1 - q).
  void gradient_pass(int64_t p0, int64_t p1, const LogitRows<scalar_t>& rows) {
    const int64_t K = num_codewords_;
    for (int64_t p = p0; p < p1; ++p) {
      scalar_t* q = rows.row(p);
      const scalar_t q_label = q[labels_[p]];
      grad_row(q, K, local_scale_ / exp_sums_[p], global_grad_.data() + (p / per_image_) * K);
      q[labels_[p]] -= local_scale_ * q_label * (scalar_t(1) - q_label);
    }
  }

  // Tile t's share of the gradients, from its dloss/dz rows G_t and its
  // features Y_t: grad_y rows G_t C_s^T, grad_dictionary += Y_t^T G_t (the
  // worker's partial sum), and the sum of G_t for the intercept.
  void gradient_products(int64_t t, const LogitRows<scalar_t>& rows, const scalar_t* features) {
    const int64_t p0 = tiling_.tile_begin(t), count = tiling_.tile_end(t) - p0;
    const int64_t K = num_codewords_, D = grid_.c;
    if (want_[0]) {
      const MatrixRef<scalar_t> G{rows.row(p0), count, K, K, 1};
      grad_y_factor_->multiply(G, grad_rows_.template mutable_data_ptr<scalar_t>() + p0 * D, D,
                               /*accumulate=*/false);
    }
    if (want_[1]) {
      const auto opts = dictionary_.options();
      const auto G = at::from_blob(rows.row(p0), {count, K}, opts);
      const auto Y = at::from_blob(const_cast<scalar_t*>(features), {count, D}, opts);
      const int64_t w = at::get_thread_num();
      matmul_into<scalar_t>(Y.t(), G, grad_dictionary_parts_[w], part_started_[w]);
      part_started_[w] = true;
    }
    if (want_[2]) {
      double total = 0.0;
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t* g = rows.row(p0 + i);
        total += sum_in_lanes<double>(K, [&](int64_t c) { return double(g[c]); });
      }
      bias_sums_[t] = total;
    }
  }

  const scalar_t* y_;
  PixelGrid grid_;
  const at::Tensor& dictionary_;
  int64_t images_, per_image_, num_codewords_;
  scalar_t bias_;
  const int64_t* labels_;
  const scalar_t* targets_;
  StudentTiling tiling_;
  std::array<bool, 3> want_;
  double local_weight_, global_weight_;
  scalar_t local_scale_;
  double global_scale_;
  std::vector<scalar_t> exp_sums_;             // sum_c exp(q_c) per pixel
  std::vector<double> ce_sums_;                // per slice
  std::vector<double> q_sums_;                 // per slice and codeword
  std::vector<double> bce_sums_;               // per image
  std::vector<scalar_t> means_, global_grad_;  // per image and codeword
  std::vector<double> bias_sums_;              // per tile
  RightFactor<scalar_t> logits_factor_;                 // C_s, for z = y_p^T C_s
  std::optional<RightFactor<scalar_t>> grad_y_factor_;  // C_s^T, for grad_y rows G C_s^T
  at::Tensor grad_rows_;                       // (pixels, D_s), pixel-major
  std::vector<at::Tensor> grad_dictionary_parts_;  // per worker
  std::vector<char> part_started_;                 // per worker (not vector<bool>: shared writes)
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> predictor_loss(
    const at::Tensor& y, const at::Tensor& dictionary, const at::Tensor& intercept,
    const at::Tensor& pixel_labels, const at::Tensor& image_labels, double local_weight,
    double global_weight, std::array<bool, 3> output_mask) {
  check_features_and_dictionary(y, "y", dictionary);
  check_intercept(intercept, y, "y");
  check_labels(pixel_labels, image_labels, y, dictionary.size(1));
  check_loss_weight(local_weight, "local_weight");
  check_loss_weight(global_weight, "global_weight");

  const auto dict = dictionary.detach();  // read by worker threads (see RightFactor)
  const auto labels = pixel_labels.contiguous();
  const auto targets = image_labels.contiguous();
  at::Tensor loss, grad_y, grad_dict, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "predictor_loss_cpu", [&] {
    StudentLoss<scalar_t> student(y, dict, intercept.item<scalar_t>(),
                                  labels.const_data_ptr<int64_t>(),
                                  targets.const_data_ptr<scalar_t>(), local_weight, global_weight,
                                  output_mask);
    student.run();
    loss = scalar_like(student.loss(), y);
    std::tie(grad_y, grad_dict, grad_bias) = student.gradients(y);
  });
  return {loss, grad_y, grad_dict, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) {
  m.impl("predictor_loss", &predictor_loss);
}

}  // namespace srm_ext::cpu
