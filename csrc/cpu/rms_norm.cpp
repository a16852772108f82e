// RMSNorm (SPEC §3) on the CPU, forward and backward, one row at a time.
//
// Forward:   y = x · r · w,  r = 1 / sqrt(mean(x²) + eps)   (statistics in fp32)
//            with a residual, x is first replaced by s = x + residual rounded to x's dtype,
//            and s is returned beside y.
// Backward:  with x̂ = x·r and gŵ = gy·w:  gx = r · (gŵ - x̂ · mean(gŵ · x̂)),  gw = Σ_rows gy · x̂
//            (with a residual, the gradient reaching s is gx + gs, for x and residual alike).
// gw is summed per fixed tile of rows, then over tiles in order: the same bits for any thread count.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace inl {
namespace {

template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Σ a·b over a row: vector lanes, then the tail, in a fixed order.
inline double row_dot(const float* a, const float* b, int64_t n) {
  Vec acc{};
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc += load(a + j) * load(b + j);
  double s = hsum(acc);
  for (; j < n; ++j) s += double(a[j]) * b[j];
  return s;
}

constexpr int64_t kFloatsPerThread = 16384;  // rows of a few hundred floats are not worth waking a thread for

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, float eps, const at::Tensor* residual, at::Tensor& y,
                  at::Tensor& s, at::Tensor& rstd) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  std::vector<float> w(D);
  if (weight.scalar_type() == at::kFloat) std::copy_n(weight.data_ptr<float>(), D, w.data());
  else load_row(static_cast<const scalar_t*>(weight.data_ptr()), D, w.data());
  const scalar_t* xp = static_cast<const scalar_t*>(x.data_ptr());
  const scalar_t* rp = residual ? static_cast<const scalar_t*>(residual->data_ptr()) : nullptr;
  scalar_t* yp = static_cast<scalar_t*>(y.data_ptr());
  scalar_t* sp = residual ? static_cast<scalar_t*>(s.data_ptr()) : nullptr;
  float* rs = rstd.data_ptr<float>();
#pragma omp parallel num_threads(threads_for(rows * D / kFloatsPerThread))
  {
    Buffer row(D + kVec);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* xi = xp + i * D;
      if (rp) {
        const scalar_t* ri = rp + i * D;
        for (int64_t j = 0; j < D; ++j) {
          scalar_t sum = static_cast<scalar_t>(static_cast<float>(xi[j]) + static_cast<float>(ri[j]));
          sp[i * D + j] = sum;
          row[j] = static_cast<float>(sum);
        }
      } else {
        load_row(xi, D, row.data());
      }
      const float r = 1.f / std::sqrt(float(row_dot(row.data(), row.data(), D) / D) + eps);
      rs[i] = r;
      scalar_t* yi = yp + i * D;
      for (int64_t j = 0; j < D; ++j) yi[j] = static_cast<scalar_t>(row[j] * r * w[j]);
    }
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& gy, const at::Tensor* gs, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& rstd, at::Tensor& gx, at::Tensor& gw) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  std::vector<float> w(D);
  if (weight.scalar_type() == at::kFloat) std::copy_n(weight.data_ptr<float>(), D, w.data());
  else load_row(static_cast<const scalar_t*>(weight.data_ptr()), D, w.data());
  const int64_t tile_rows = std::max<int64_t>(32, (rows + 255) / 256);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  std::vector<float> partial(size_t(tiles) * D, 0.f);
  const scalar_t* xp = static_cast<const scalar_t*>(x.data_ptr());
  const scalar_t* gyp = static_cast<const scalar_t*>(gy.data_ptr());
  const scalar_t* gsp = gs ? static_cast<const scalar_t*>(gs->data_ptr()) : nullptr;
  const float* rs = rstd.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
#pragma omp parallel num_threads(threads_for(std::min(rows * D / kFloatsPerThread, tiles)))
  {
    Buffer xhat(D + kVec), gyw(D + kVec), gyrow(D + kVec);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      float* part = partial.data() + tile * D;
      for (int64_t i = tile * tile_rows; i < std::min(rows, (tile + 1) * tile_rows); ++i) {
        const float r = rs[i];
        load_row(xp + i * D, D, xhat.data());
        load_row(gyp + i * D, D, gyrow.data());
        for (int64_t j = 0; j < D; ++j) {
          xhat[j] *= r;
          gyw[j] = gyrow[j] * w[j];
          part[j] += gyrow[j] * xhat[j];
        }
        const float mean = float(row_dot(gyw.data(), xhat.data(), D) / D);
        float* gxi = gxp + i * D;
        for (int64_t j = 0; j < D; ++j) gxi[j] = r * (gyw[j] - xhat[j] * mean);
        if (gsp)
          for (int64_t j = 0; j < D; ++j) gxi[j] += static_cast<float>(gsp[i * D + j]);
      }
    }
  }
  float* gwp = gw.data_ptr<float>();
  for (int64_t j = 0; j < D; ++j) {
    float s = 0.f;
    for (int64_t tile = 0; tile < tiles; ++tile) s += partial[size_t(tile) * D + j];
    gwp[j] = s;
  }
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) > 0,
              "x must be a contiguous CPU tensor with a non-empty last dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "the cpu rms_norm runs float32, bfloat16 and float16, got ", x.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(-1) &&
              (weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type()),
              "weight must be a contiguous [D] tensor of x's dtype or float32");
}

}  // namespace

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         const c10::optional<at::Tensor>& residual) {
  check(x, weight);
  if (residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                residual->is_contiguous(), "residual must match x");
  at::Tensor y = at::empty_like(x), s = residual ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), [&](auto tag) {
    forward_impl<decltype(tag)>(x, weight, float(eps), residual ? &*residual : nullptr, y, s, rstd);
  });
  return {y, s, rstd};
}

// x is what was normalised (x + residual with a residual); grad_s the gradient of that sum.
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_s,
                                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  check(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.is_contiguous(),
              "grad_y must match x");
  if (grad_s)
    TORCH_CHECK(grad_s->sizes() == x.sizes() && grad_s->scalar_type() == x.scalar_type() && grad_s->is_contiguous(),
                "grad_s must match x");
  at::Tensor gx = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor gw = at::empty({x.size(-1)}, x.options().dtype(at::kFloat));
  dispatch(x.scalar_type(), [&](auto tag) {
    backward_impl<decltype(tag)>(grad_y, grad_s ? &*grad_s : nullptr, x, weight, rstd, gx, gw);
  });
  return {gx, gw};
}

}  // namespace inl
