// Matrix-vector products of a few rows (decode), shared by the kernels that stream weights once
// per token: swiglu.cpp (the whole SwiGLU) and linear.cpp (a projection); attention.cpp's decode
// softmax uses lane_sum.
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

#include "parallel.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {

constexpr int kRowsTask = 4;  // outputs per unit of work the threads share out

// thread tid of nth's outputs [o0, o1) of O: contiguous runs of kRowsTask, in order
inline void share_outputs(int O, int tid, int nth, int& o0, int& o1) {
  share((O + kRowsTask - 1) / kRowsTask, tid, nth, o0, o1);
  o0 = std::min(O, o0 * kRowsTask);
  o1 = std::min(O, o1 * kRowsTask);
}

// The lanes of v added in a fixed tree: a[i] += a[i + w] for w = kVec/2, ..., 1, then a[0]. On
// AVX-512 and AVX2 the same additions in registers (halves, then quarters, ...), which give the
// same bits as the scalar tree without its trip through memory.
inline float lane_sum(Vec v) {
#if defined(__AVX512F__) || defined(INL_AVX2)
#if defined(__AVX512F__)
  const __m512 z = (__m512)v;
  const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(z),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
#else
  const __m256 y = (__m256)v;
#endif
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));  // a[i] + a[i + 4]
  const __m128 h = _mm_add_ps(x, _mm_movehl_ps(x, x));                                  // a[i] + a[i + 2]
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));                          // a[0] + a[1]
#else
  float a[kVec];
  store(a, v);
  for (int w = kVec / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
#endif
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
