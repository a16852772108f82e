// RMSNorm (SPEC §3) on the CPU, forward and backward, one row at a time.
//
// Forward:   y = x · r · w,  r = 1 / sqrt(mean(x²) + eps)   (statistics in fp32)
//            with a residual, x is first replaced by s = x + residual rounded to x's dtype,
//            and s is returned beside y.
// Backward:  with x̂ = x·r and gŵ = gy·w:  gx = r · (gŵ - x̂ · mean(gŵ · x̂)),  gw = Σ_rows gy · x̂
//            (with a residual, the gradient reaching s is gx + gs, for x and residual alike).
// gw is summed per fixed tile of rows, then over tiles in order: the same bits for any thread count.
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {
namespace {

template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
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
void weight_row(const void* weight, bool fp32, int64_t D, float* w) {
  if (fp32) std::copy_n(static_cast<const float*>(weight), D, w);
  else load_row(static_cast<const scalar_t*>(weight), D, w);
}

template <typename scalar_t>
void forward_impl(const RmsNormArgs& a) {
  const int64_t D = a.D, rows = a.rows;
  Buffer w(D);
  weight_row<scalar_t>(a.weight, a.weight_fp32, D, w.data());
  const scalar_t* xp = static_cast<const scalar_t*>(a.x);
  const scalar_t* rp = static_cast<const scalar_t*>(a.residual);
  scalar_t* yp = static_cast<scalar_t*>(a.y);
  scalar_t* sp = static_cast<scalar_t*>(a.s);
  float* rs = a.rstd;
  const float eps = a.eps;
  Errors errors;
#pragma omp parallel num_threads(threads_for(a.threads, rows * D / kFloatsPerThread))
  {
    Buffer row;
    errors.guard([&] { row.resize(D + kVec); });
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i)
      errors.guard([&] {
        const scalar_t* xi = xp + i * D;
        if (rp) {
          const scalar_t* ri = rp + i * D;
          for (int64_t j = 0; j < D; ++j) {
            scalar_t sum = from_float<scalar_t>(to_float(xi[j]) + to_float(ri[j]));
            sp[i * D + j] = sum;
            row[j] = to_float(sum);
          }
        } else {
          load_row(xi, D, row.data());
        }
        const float r = 1.f / std::sqrt(float(row_dot(row.data(), row.data(), D) / D) + eps);
        rs[i] = r;
        scalar_t* yi = yp + i * D;
        for (int64_t j = 0; j < D; ++j) yi[j] = from_float<scalar_t>(row[j] * r * w[j]);
      });
  }
  errors.rethrow();
}

template <typename scalar_t>
void backward_impl(const RmsNormBackwardArgs& a) {
  const int64_t D = a.D, rows = a.rows;
  Buffer w(D);
  weight_row<scalar_t>(a.weight, a.weight_fp32, D, w.data());
  const int64_t tile_rows = std::max<int64_t>(32, (rows + 255) / 256);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  Buffer partial(size_t(tiles) * D);
  partial.zero();
  const scalar_t* xp = static_cast<const scalar_t*>(a.x);
  const scalar_t* gyp = static_cast<const scalar_t*>(a.grad_y);
  const scalar_t* gsp = static_cast<const scalar_t*>(a.grad_s);
  const float* rs = a.rstd;
  float* gxp = a.gx;
  Errors errors;
#pragma omp parallel num_threads(threads_for(a.threads, std::min(rows * D / kFloatsPerThread, tiles)))
  {
    Buffer xhat, gyw, gyrow;
    errors.guard([&] {
      xhat.resize(D + kVec);
      gyw.resize(D + kVec);
      gyrow.resize(D + kVec);
    });
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile)
      errors.guard([&] {
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
            for (int64_t j = 0; j < D; ++j) gxi[j] += to_float(gsp[i * D + j]);
        }
      });
  }
  errors.rethrow();
  for (int64_t j = 0; j < D; ++j) {
    float s = 0.f;
    for (int64_t tile = 0; tile < tiles; ++tile) s += partial[size_t(tile) * D + j];
    a.gw[j] = s;
  }
}

}  // namespace

void rms_norm_forward(const RmsNormArgs& a) {
  dispatch(a.dtype, [&](auto tag) { forward_impl<decltype(tag)>(a); });
}

void rms_norm_backward(const RmsNormBackwardArgs& a) {
  dispatch(a.dtype, [&](auto tag) { backward_impl<decltype(tag)>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
