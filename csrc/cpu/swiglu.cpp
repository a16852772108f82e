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

}  // namespace

void swiglu_forward(const SwigluArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag), false>(a); });
}

void swiglu_backward(const SwigluArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag), true>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
