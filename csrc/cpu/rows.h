// Matrix-vector products of a few rows (decode), shared by the kernels that stream weights once
// per token: swiglu.cpp (the whole SwiGLU) and linear.cpp (a projection).
//
// y[m][o] = Σ_k x[m][k]·W[o][k] with W row-major [O][K]: each output is a dot product along one
// contiguous weight row, and the rows are taken one after the other, so a thread reads its share
// of W front to back as a single stream. That is what the hardware prefetchers follow best: on a
// 2-core AMD EPYC (Zen 4) one stream reads ~32 GB/s where interleaving 4 rows (this file's first
// design, with software prefetch) read ~19 and 8 rows ~25 (/tmp microbenchmark, 2048 × 512 and
// 512 × 2048 fp32 matrices, 2 threads, AVX-512 and AVX2 alike).
//
// The sum of an output runs over two interleaved sets of vector lanes (even and odd vectors of
// k, so two FMA chains run at once when W is in cache), then the two sets are added, the lanes
// summed in a fixed tree and the tail of K added last: an output's value depends on nothing but
// x's row and W's row — not on M, on O, on the thread count or on which thread computes it.
#pragma once

#include <algorithm>
#include <cstddef>

#include "simd.h"

namespace inl {
namespace INL_ISA {

constexpr int kRowsTask = 4;  // outputs per unit of work the threads share out

inline float lane_sum(Vec v) {  // a fixed tree
  float a[kVec];
  store(a, v);
  for (int w = kVec / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// outputs o in [o0, o1) of M rows of x ([M][K], contiguous); y rows ldy apart
template <int M>
void dot_rows(const float* x, int K, const float* W, int o0, int o1, float* y, long ldy) {
  const int k2 = K / (2 * kVec) * (2 * kVec), kv = K / kVec * kVec;
  for (int o = o0; o < o1; ++o) {
    const float* w = W + size_t(o) * K;
    Vec even[M] = {}, odd[M] = {};
    for (int k = 0; k < k2; k += 2 * kVec) {
      const Vec w0 = load(w + k), w1 = load(w + k + kVec);
      for (int m = 0; m < M; ++m) {
        even[m] += w0 * load(x + size_t(m) * K + k);
        odd[m] += w1 * load(x + size_t(m) * K + k + kVec);
      }
    }
    if (k2 < kv) {  // one vector left over
      const Vec w0 = load(w + k2);
      for (int m = 0; m < M; ++m) even[m] += w0 * load(x + size_t(m) * K + k2);
    }
    for (int m = 0; m < M; ++m) {
      float sum = lane_sum(even[m] + odd[m]);
      for (int k = kv; k < K; ++k) sum += x[size_t(m) * K + k] * w[k];
      y[m * ldy + o] = sum;
    }
  }
}

}  // namespace INL_ISA
}  // namespace inl
