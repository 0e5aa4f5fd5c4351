// Dense matrix products for the CPU kernels: the encode GEMM and the three
// products of the student loss, which are most of their time.
//
// float32 products run on the packed AVX-512 kernel of matmul.cpp where the
// CPU has AVX-512F. BLAS libraries may pick a narrower code path by CPU
// vendor: MKL runs its AVX2 code on AMD CPUs, at about half the float32 peak
// of those with AVX-512. float64, CPUs without AVX-512F, and
// SRM_EXT_CPU_GEMM=blas use ATen's BLAS. Each product runs on the calling
// thread (the kernels call them from their workers, one pixel tile each), so
// the AVX-512 kernel's results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace srm_ext::cpu {

// Whether float32 products use the AVX-512 kernel: compiled in, supported
// by this CPU and not overridden by SRM_EXT_CPU_GEMM. Decided once.
bool avx512_matmul_enabled();

// The kernel float32 products use on this machine: "avx512" or "blas".
inline const char* float32_matmul_kernel() { return avx512_matmul_enabled() ? "avx512" : "blas"; }

// A matrix in memory: element (i, j) at data[i * row_stride + j * col_stride].
template <typename scalar_t>
struct MatrixRef {
  const scalar_t* data;
  int64_t rows, cols, row_stride, col_stride;
};

// out (a.rows x b.cols, row stride out_row_stride, unit column stride)
// = a @ b, or += a @ b when accumulate, on the AVX-512 kernel.
void multiply_avx512(const MatrixRef<float>& a, const MatrixRef<float>& b, float* out,
                     int64_t out_row_stride, bool accumulate);

// The right factor b of products a @ b, shared by the worker threads.
template <typename scalar_t>
class RightFactor {
 public:
  // b: 2-D, any strides, detached (see multiply).
  explicit RightFactor(const at::Tensor& b)
      : b_(b), ref_{b.const_data_ptr<scalar_t>(), b.size(0), b.size(1), b.stride(0),
                    b.stride(1)} {}

  int64_t cols() const { return b_.size(1); }

  // out (a.rows x cols(), row stride out_row_stride) = a @ b, or += when
  // accumulate. Worker threads run outside the caller's autograd guard, so
  // b must not require grad.
  void multiply(const MatrixRef<scalar_t>& a, scalar_t* out, int64_t out_row_stride,
                bool accumulate) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (avx512_matmul_enabled()) {
        multiply_avx512(a, ref_, out, out_row_stride, accumulate);
        return;
      }
    }
    const auto opts = b_.options();
    const auto left = at::from_blob(const_cast<scalar_t*>(a.data), {a.rows, a.cols},
                                    {a.row_stride, a.col_stride}, opts);
    auto result = at::from_blob(out, {a.rows, cols()}, {out_row_stride, 1}, opts);
    if (accumulate) {
      result.addmm_(left, b_);
    } else {
      at::mm_out(result, left, b_);
    }
  }

 private:
  at::Tensor b_;
  MatrixRef<scalar_t> ref_;
};

// out = a @ b, or out += a @ b when accumulate: 2-D tensors of one dtype,
// out with a unit stride in one dimension. For a right factor used once.
template <typename scalar_t>
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                 bool accumulate) {
  if (out.size(1) > 1 && out.stride(1) != 1) {  // column-major out: out^T = b^T a^T
    TORCH_CHECK(out.size(0) == 1 || out.stride(0) == 1,
                "matmul_into: out needs a unit stride, got strides ", out.strides());
    matmul_into<scalar_t>(b.t(), a.t(), out.t(), accumulate);
    return;
  }
  const MatrixRef<scalar_t> left{a.const_data_ptr<scalar_t>(), a.size(0), a.size(1),
                                 a.stride(0), a.stride(1)};
  RightFactor<scalar_t>(b).multiply(left, out.mutable_data_ptr<scalar_t>(), out.stride(0),
                                    accumulate);
}

}  // namespace srm_ext::cpu
