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

// Prefill: every query of a sequence over its own keys (Sq = Skv = S), q and k rotated already.
// Phase 1 lays out each (row, K/V head)'s keys transposed in runs of kColBlock keys,
// [Sp / kColBlock][D][kColBlock], and its values, [Sp][Dp], in fp32 (Sp, Dp: S and D rounded up
// to the micro-kernel's kColBlock, the padding zero). Phase 2 takes one
// task per (row, query head, block of kPrefillQueries queries): the scores of its queries against
// the keys up to its last query (causal: the blocks past it are never computed, which SDPA's CPU
// kernel does not skip below 512 keys), a softmax per query over the keys it sees, then the
// weighted sum of the values, both products by the register-blocked micro-kernel (simd.h), and
// the division by the softmax's sum last. A query's result is one fixed sequence of operations on
// its own row's data: independent of the batch, the block it falls in and the thread count.
constexpr int kPrefillQueries = 64;

template <typename scalar_t>
void run_prefill(const AttentionPrefillArgs& a) {
  const int B = a.B, Hq = a.Hq, Hkv = a.Hkv, S = a.S, D = a.D;
  const int G = Hq / Hkv;
  const int Sp = round_up(S, kColBlock), Dp = round_up(D, kColBlock);
  const scalar_t* q = static_cast<const scalar_t*>(a.q);
  const scalar_t* k = static_cast<const scalar_t*>(a.k);
  const scalar_t* v = static_cast<const scalar_t*>(a.v);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const int64_t groups = int64_t(B) * Hkv;
  const size_t kt_floats = size_t(D) * Sp, group_floats = kt_floats + size_t(Sp) * Dp;
  // the (row, K/V head) groups go in chunks whose laid-out keys and values take at most ~64 MiB
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(groups, (int64_t(16) << 20) / int64_t(group_floats)));
  Buffer kv(size_t(chunk) * group_floats);
  const int blocks = (S + kPrefillQueries - 1) / kPrefillQueries;
  const VecI lanes = lane_index();
  Errors errors;
  for (int64_t first = 0; first < groups; first += chunk) {
    const int64_t n_groups = std::min(chunk, groups - first);
#pragma omp parallel for num_threads(threads_for(a.threads, n_groups)) schedule(static)
    for (int64_t gi = 0; gi < n_groups; ++gi)
      errors.guard([&] {
        const int b = int((first + gi) / Hkv), g = int((first + gi) % Hkv);
        float* kt = kv.data() + size_t(gi) * group_floats;
        float* vp = kt + kt_floats;
        const scalar_t* kb = k + b * a.k_stride[0] + g * a.k_stride[1];
        const scalar_t* vb = v + b * a.v_stride[0] + g * a.v_stride[1];
        for (int j = 0; j < Sp; ++j) {
          float* kr = kt + (size_t(j / kColBlock) * D) * kColBlock + j % kColBlock;  // column j of its run
          float* vr = vp + size_t(j) * Dp;
          if (j < S) {
            const scalar_t* kj = kb + j * a.k_stride[2];
            const scalar_t* vj = vb + j * a.v_stride[2];
            for (int e = 0; e < D; ++e) kr[e * kColBlock] = to_float(kj[e]);
            for (int e = 0; e < D; ++e) vr[e] = to_float(vj[e]);
          } else {
            for (int e = 0; e < D; ++e) kr[e * kColBlock] = 0.f;
            for (int e = 0; e < D; ++e) vr[e] = 0.f;
          }
          for (int e = D; e < Dp; ++e) vr[e] = 0.f;
        }
      });
    errors.rethrow();
    const int64_t tasks = n_groups * G * blocks;
#pragma omp parallel num_threads(threads_for(a.threads, tasks))
    {
      Panels qp;
      Buffer p, o, inv(kPrefillQueries);
      // the last blocks (most keys under a causal mask) first, so that the dynamic schedule ends even
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t)
        errors.guard([&] {
          const int64_t task = tasks - 1 - t;
          const int64_t gi = task / blocks / G;
          const int blk = int(task % blocks), b = int((first + gi) / Hkv);
          const int h = int((first + gi) % Hkv) * G + int(task / blocks % G);
          const int q0 = blk * kPrefillQueries, rows = std::min(kPrefillQueries, S - q0);
          const int keys = a.causal ? q0 + rows : S, nseg = (keys + kColBlock - 1) / kColBlock;
          const float* kt = kv.data() + size_t(gi) * group_floats;
          const float* vp = kt + kt_floats;
          const scalar_t* qb = q + b * a.q_stride[0] + h * a.q_stride[1];
          qp.pack(rows, D, [&](int i, int e) { return to_float(qb[(q0 + i) * a.q_stride[2] + e]); });
          // scores, [segment][row][kColBlock]: segment s holds keys [s·kColBlock, (s + 1)·kColBlock)
          p.resize(size_t(nseg) * rows * kColBlock);
          const int panels = (rows + kRowBlock - 1) / kRowBlock;
          for (int pi = 0; pi < panels; ++pi) {
            const int last_key = a.causal ? q0 + std::min(rows, (pi + 1) * kRowBlock) - 1 : S - 1;
            for (int s = 0; s * kColBlock <= last_key; ++s)
              micro_for_rows<kZero, 1>(qp.rows(pi))(1, D, qp.panel(pi), kRowBlock, 0, kt + size_t(s) * D * kColBlock,
                                                    kColBlock, 0, nullptr, 0,
                                                    p.data() + (size_t(s) * rows + pi * kRowBlock) * kColBlock,
                                                    kColBlock);
          }
          // softmax over the keys each query sees; the others get weight 0
          for (int i = 0; i < rows; ++i) {
            const int seen = a.causal ? q0 + i + 1 : S;
            Vec top = splat(-INFINITY);
            for (int s = 0; s * kColBlock < seen; ++s) {
              float* r = p.data() + (size_t(s) * rows + i) * kColBlock;
              for (int c = 0; c < kColBlock; c += kVec) {
                const Vec x = load(r + c) * a.scale;
                store(r + c, x);
                top = vmax(top, select(lanes + (s * kColBlock + c) < seen, x, splat(-INFINITY)));
              }
            }
            float m = -INFINITY;
            for (int l = 0; l < kVec; ++l) m = std::max(m, top[l]);
            Vec sum{};
            for (int s = 0; s < nseg; ++s) {
              float* r = p.data() + (size_t(s) * rows + i) * kColBlock;
              for (int c = 0; c < kColBlock; c += kVec) {
                const VecI visible = lanes + (s * kColBlock + c) < seen;
                const Vec e = s * kColBlock < seen ? select(visible, vexp(load(r + c) - m), Vec{}) : Vec{};
                store(r + c, e);
                sum += e;
              }
            }
            inv[i] = float(1.0 / hsum(sum));
          }
          o.resize(size_t(rows) * Dp);
          gemm_rows_nv<false, 2>(rows, Dp, nseg, p.data(), long(rows) * kColBlock, vp, Dp, long(kColBlock) * Dp,
                                 nullptr, 0, o.data(), Dp);
          scalar_t* ob = out + (int64_t(b) * Hq + h) * int64_t(S) * D;
          for (int i = 0; i < rows; ++i) {
            const float* orow = o.data() + size_t(i) * Dp;
            scalar_t* dst = ob + int64_t(q0 + i) * D;
            for (int e = 0; e < D; ++e) dst[e] = from_float<scalar_t>(orow[e] * inv[i]);
          }
        });
    }
    errors.rethrow();
  }
}

}  // namespace

void attention_decode(const AttentionDecodeArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run<decltype(tag)>(a); });
}

void attention_prefill(const AttentionPrefillArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run_prefill<decltype(tag)>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
