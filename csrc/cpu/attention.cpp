// Grouped-query attention for a few queries per sequence (decode), inference only, with RoPE
// applied on the fly (SPEC §3: rotate-half; the KV cache holds unrotated keys):
//
//   row b sees keys [start_b, len_b);  query i sits at key index len_b - Sq + i and, when causal,
//   sees keys j <= that index;  positions count from start_b (a row's left padding)
//   q' = rope(q, pos_q),  k'_j = rope(k_j, pos_j),   rope(x, p) = (x1·c_p - x2·s_p, x2·c_p + x1·s_p)
//   out = Σ_j softmax_j(scale · q'·k'_j) · v_j          (a query that sees no key: zeros)
//
// One task per (row, K/V head): its visible keys are rotated once into a scratch buffer, in fp32,
// then every query of the head group (G = Hq / Hkv heads × Sq queries) takes its scores, softmax
// and weighted sum of values from there. The rotated q and k are rounded to the input dtype, as
// the reference's rotation returns them (the products may be fused here: within about an fp32 ulp
// of |x| of the reference's rotation before that rounding; rope.h). This replaces, for a decode step, the ~20 small
// ATen ops of the SDPA path (two rotations, index tensors, the mask) by one call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "rope.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {
namespace {

template <typename scalar_t>
inline float round_to(float f) {
  return to_float(from_float<scalar_t>(f));
}

// x (D values at p, stride 1) rotated at table row `row` into dst (fp32), rounded to scalar_t
template <typename scalar_t>
inline void rotate_row(const scalar_t* p, int D, const float* cos, const float* sin, int64_t row, float* dst) {
  const int half = D / 2;
  if (cos == nullptr) {
    for (int i = 0; i < D; ++i) dst[i] = to_float(p[i]);
    return;
  }
  rotate_half_row(p, half, cos + row * half, sin + row * half, 1.f,
                  [&](int j, float y) { dst[j] = round_to<scalar_t>(y); });
}

template <typename scalar_t>
void run(const AttentionDecodeArgs& a) {
  const int B = a.B, Hkv = a.Hkv, Sq = a.Sq, Skv = a.Skv, D = a.D;
  const int G = a.Hq / Hkv;
  const scalar_t* q = static_cast<const scalar_t*>(a.q);
  const scalar_t* k = static_cast<const scalar_t*>(a.k);
  const scalar_t* v = static_cast<const scalar_t*>(a.v);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const int64_t tasks = int64_t(B) * Hkv;
  // a decode step is a few microseconds of work: threads only when there is enough of it
  const int64_t work = tasks * int64_t(Skv) * D * (G * Sq + 1);
  const int threads = work < (int64_t(1) << 18) ? 1 : threads_for(a.threads, tasks);
  Errors errors;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task)
    errors.guard([&] {
      const int b = int(task / Hkv), g = int(task % Hkv);
      const int64_t len = a.lens ? a.lens[b] : Skv, start = a.starts ? a.starts[b] : 0;
      const int64_t first = std::max<int64_t>(start, 0), end = std::min<int64_t>(len, Skv);
      const int64_t keys = std::max<int64_t>(0, end - first);
      std::vector<float> kr(size_t(keys) * D), qr(D), p(std::max<int64_t>(keys, 1)), acc(D);
      const scalar_t* kb = k + b * a.k_stride[0] + g * a.k_stride[1];
      const scalar_t* vb = v + b * a.v_stride[0] + g * a.v_stride[1];
      for (int64_t j = first; j < end; ++j)
        rotate_row(kb + j * a.k_stride[2], D, a.cos, a.sin, j - start, kr.data() + (j - first) * D);
      for (int hg = 0; hg < G; ++hg) {
        const int h = g * G + hg;
        for (int i = 0; i < Sq; ++i) {
          scalar_t* o = out + ((int64_t(b) * a.Hq + h) * Sq + i) * D;
          const int64_t qidx = len - Sq + i;  // the query's key index
          const int64_t last = a.causal ? std::min<int64_t>(end, qidx + 1) : end;
          const int64_t n = std::max<int64_t>(0, last - first);
          if (n == 0) {
            for (int e = 0; e < D; ++e) o[e] = from_float<scalar_t>(0.f);
            continue;
          }
          rotate_row(q + b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2], D, a.cos, a.sin,
                     std::max<int64_t>(qidx - start, 0), qr.data());
          float top = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            const float* kj = kr.data() + j * D;
            float dot = 0.f;
            for (int e = 0; e < D; ++e) dot += qr[e] * kj[e];
            p[j] = dot * a.scale;
            top = std::max(top, p[j]);
          }
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) {
            p[j] = std::exp(p[j] - top);
            sum += p[j];
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* vj = vb + (first + j) * a.v_stride[2];
            const float w = p[j];
            for (int e = 0; e < D; ++e) acc[e] += w * to_float(vj[e]);
          }
          const float inv = 1.f / sum;
          for (int e = 0; e < D; ++e) o[e] = from_float<scalar_t>(acc[e] * inv);
        }
      }
    });
  errors.rethrow();
}

}  // namespace

void attention_decode(const AttentionDecodeArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag)>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
