// The pointwise part of SwiGLU (SPEC §3) on the CPU, element by element, in fp32:
//
//   forward:   out = silu(g)·u = g·σ(g)·u
//   backward:  from the gradient o of out:  gu = o·silu(g),  gg = o·u·σ(g)·(1 + g·(1 - σ(g)))
//
// g and u are the two projections x·w_gateᵀ and x·w_upᵀ (computed by torch's matmul); one pass
// reads them and writes the product (forward) or both gradients (backward), where eager PyTorch
// makes three passes (silu, multiply; and five in the backward).
#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "rows.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel task

template <typename scalar_t>
inline Vec load_as_float(const scalar_t* p, int n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kVec) return load(p);
  }
  Vec v{};
  for (int i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}
template <typename scalar_t>
inline void store_from_float(scalar_t* p, Vec v, int n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kVec) return store(p, v);
  }
  for (int i = 0; i < n; ++i) p[i] = from_float<scalar_t>(v[i]);
}

template <typename scalar_t, bool BACKWARD>
void run(const SwigluArgs& a) {
  const scalar_t* g = static_cast<const scalar_t*>(a.gate);
  const scalar_t* u = static_cast<const scalar_t*>(a.up);
  const scalar_t* o = static_cast<const scalar_t*>(a.grad);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  scalar_t* gu = static_cast<scalar_t*>(a.grad_up);
  const int64_t n = a.n, chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads_for(a.threads, chunks)) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; i += kVec) {
      const int m = int(std::min<int64_t>(kVec, end - i));
      const Vec gv = load_as_float(g + i, m), uv = load_as_float(u + i, m);
      // σ(g) is 0 below -88.72 (simd.h), so silu(-1e30) is -0 and not -1e30·σ(-80)
      const Vec sig = vsigmoid(gv), silu = gv * sig;
      if constexpr (!BACKWARD) {
        store_from_float(out + i, silu * uv, m);
      } else {
        const Vec ov = load_as_float(o + i, m);
        store_from_float(gu + i, ov * silu, m);
        store_from_float(out + i, ov * uv * (sig * (1.f + gv * (1.f - sig))), m);
      }
    }
  }
}

// ---- a few rows (decode): the whole SwiGLU as matrix-vector products -----------------------
//
// At one token the three products stream 3·F·d weights for 6·F·d FLOPs: memory-bound. Each
// output element is a dot product along a contiguous weight row (rows.h), so each thread
// streams its share of every weight matrix front to back. The threads split the F outputs of
// gate and up (each thread applies silu·u to its own), meet at a barrier, then split the d
// outputs of down.

template <int M>
void swiglu_rows_m(const SwigluRowsArgs& a, float* gate, float* up) {
  const int d = a.d, F = a.F;
#pragma omp parallel num_threads(threads_for(a.threads, (F + kRowsTask - 1) / kRowsTask))
  {
    const int tid = omp_thread_id(), nth = omp_threads();
    int f0, f1;
    share_outputs(F, tid, nth, f0, f1);
    dot_rows<M>(a.x, d, a.w_gate, f0, f1, gate, F);
    dot_rows<M>(a.x, d, a.w_up, f0, f1, up, F);
    for (int m = 0; m < M; ++m)  // gate becomes silu(gate)·up, as swiglu_forward computes it
      for (int f = f0; f < f1; f += kVec) {
        const int n = std::min(kVec, f1 - f);
        float* g = gate + size_t(m) * F + f;
        const Vec gv = load_as_float(g, n), uv = load_as_float(up + size_t(m) * F + f, n);
        const Vec sig = vsigmoid(gv), silu = gv * sig;
        store_from_float(g, silu * uv, n);
      }
#pragma omp barrier
    int j0, j1;
    share_outputs(d, tid, nth, j0, j1);
    dot_rows<M>(gate, F, a.w_down, j0, j1, a.out, d);
  }
}

}  // namespace

void swiglu_rows(const SwigluRowsArgs& a) {
  static thread_local Buffer gate, up;
  gate.resize(size_t(a.M) * a.F);
  up.resize(size_t(a.M) * a.F);
  switch (a.M) {
    case 1: return swiglu_rows_m<1>(a, gate.data(), up.data());
    case 2: return swiglu_rows_m<2>(a, gate.data(), up.data());
    case 3: return swiglu_rows_m<3>(a, gate.data(), up.data());
    default: return swiglu_rows_m<4>(a, gate.data(), up.data());
  }
}

void swiglu_forward(const SwigluArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag), false>(a); });
}

void swiglu_backward(const SwigluArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag), true>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
