// Grouped-query attention for a few queries per sequence (decode), inference only, with RoPE
// applied on the fly (SPEC §3: rotate-half; the KV cache holds unrotated keys):
//
//   row b sees keys [start_b, len_b);  query i sits at key index len_b - Sq + i and, when causal,
//   sees keys j <= that index;  positions count from start_b (a row's left padding)
//   q' = rope(q, pos_q),  k'_j = rope(k_j, pos_j),   rope(x, p) = (x1·c_p - x2·s_p, x2·c_p + x1·s_p)
//   out = Σ_j softmax_j(scale · q'·k'_j) · v_j          (a query that sees no key: zeros)
//
// One task per (row, K/V head): its visible keys are rotated once into a scratch buffer, in fp32,
// then every query of the head group (G = Hq / Hkv heads × Sq queries) takes its scores (dot
// products over vector lanes, rows.h), softmax (weights below 2^-64 of the largest dropped, as in
// the prefill below) and weighted sum of values from there. The rotated q and k are rounded to the input dtype, as
// the reference's rotation returns them (the products may be fused here: within about an fp32 ulp
// of |x| of the reference's rotation before that rounding; rope.h). This replaces, for a decode step, the ~20 small
// ATen ops of the SDPA path (two rotations, index tensors, the mask) by one call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "rope.h"
#include "rows.h"
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

// e^x for x <= 0 (a softmax weight relative to the row's largest, 1), 0 below 2^-64: a weight that
// small, or its product with a value in the sum of values, can be subnormal, and every FMA that
// reads or makes a subnormal takes a microcode assist (measured: a prefill with peaked scores ran
// 2.7x slower). Dropping the weights below 2^-64 changes a sum of weights of at least 1 by less
// than S·2^-64, far below fp32 rounding. Clamped before the exponential too (vexp's own scaling
// would make the subnormal). NaN stays NaN.
inline Vec weight_exp(Vec x) {
  constexpr float kLowest = -44.36141956f;  // ln 2^-64
  return select(x < kLowest, Vec{}, vexp(vmax(splat(kLowest), x)));
}
// d with its subnormal values flushed to 0 (NaN stays NaN)
inline Vec flush_subnormal(Vec d) { return select(vabs(d) < 1.17549435e-38f, Vec{}, d); }

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
      std::vector<float> kr(size_t(keys) * D), qr(D), p(size_t(round_up(int(std::max<int64_t>(keys, 1)), kVec))), acc(D);
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
          // scores: each a dot product of vectors (rows.h), then scaled
          dot_rows<1>(qr.data(), D, kr.data(), 0, int(n), p.data(), 0);
          float top = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            p[j] *= a.scale;
            top = std::max(top, p[j]);
          }
          // weights e^(s - top) a vector at a time (the padding past n gives 0), their sum
          const int64_t nv = round_up(int(n), kVec);
          std::fill(p.begin() + n, p.begin() + nv, -INFINITY);
          Vec sums{};
          for (int64_t j = 0; j < nv; j += kVec) {
            const Vec w = weight_exp(load(p.data() + j) - top);
            store(p.data() + j, w);
            sums += w;
          }
          const float sum = lane_sum(sums);
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
// to the micro-kernel's kColBlock, the padding zero). Phase 2 takes one task per (row, query
// head, block of kPrefillQueries queries): the scores of its queries against the keys up to its
// last query (causal: the blocks past it are never computed, which SDPA's CPU kernel does not
// skip below 512 keys), a softmax per query over the keys it sees, then the weighted sum of the
// values, both products by the register-blocked micro-kernel (simd.h), and the division by the
// softmax's sum last. A query's result is one fixed sequence of operations on its own row's data:
// independent of the batch, the block it falls in and the thread count. The (row, K/V head)
// groups go in chunks whose scratch takes at most ~64 MiB.
constexpr int kPrefillQueries = 64;
constexpr int64_t kPrefillScratchFloats = int64_t(16) << 20;

// how many (row, K/V head) groups of group_floats scratch floats each go in one chunk
inline int64_t groups_per_chunk(int64_t groups, size_t group_floats) {
  return std::max<int64_t>(1, std::min<int64_t>(groups, kPrefillScratchFloats / std::max<int64_t>(1, group_floats)));
}


// x's S rows (stride `stride`, D values each) as [Sp / kColBlock][D][kColBlock]: column j of the
// run j / kColBlock holds row j (rows S..Sp zero): the B operand of a product with xᵀ
template <typename scalar_t>
void lay_out_runs(const scalar_t* x, int64_t stride, int S, int Sp, int D, float* dst) {
  for (int j = 0; j < Sp; ++j) {
    float* col = dst + (size_t(j / kColBlock) * D) * kColBlock + j % kColBlock;
    for (int e = 0; e < D; ++e) col[e * kColBlock] = j < S ? to_float(x[j * stride + e]) : 0.f;
  }
}

// x's S rows as [Sp][Dp] (padding zero): the B operand of a product with x
template <typename scalar_t>
void lay_out_rows(const scalar_t* x, int64_t stride, int S, int Sp, int D, int Dp, float* dst) {
  for (int j = 0; j < Sp; ++j) {
    float* row = dst + size_t(j) * Dp;
    for (int e = 0; e < Dp; ++e) row[e] = j < S && e < D ? to_float(x[j * stride + e]) : 0.f;
  }
}

// dst [segment][rows][kColBlock] = A · runsᵀ for the queries q0.. of panels `a` (K = D), segment s
// holding keys [s·kColBlock, (s + 1)·kColBlock); under a causal mask each panel of rows stops at the
// segment of its last query's key
inline void scores(const Panels& a, int rows, int q0, int S, int D, bool causal, const float* runs, float* dst) {
  const int panels = (rows + kRowBlock - 1) / kRowBlock;
  for (int pi = 0; pi < panels; ++pi) {
    const int last_key = causal ? q0 + std::min(rows, (pi + 1) * kRowBlock) - 1 : S - 1;
    for (int s = 0; s * kColBlock <= last_key; ++s)
      micro_for_rows<kZero, 1>(a.rows(pi))(1, D, a.panel(pi), kRowBlock, 0, runs + size_t(s) * D * kColBlock,
                                           kColBlock, 0, nullptr, 0,
                                           dst + (size_t(s) * rows + pi * kRowBlock) * kColBlock, kColBlock);
  }
}

// C[j] += Σ_i A[i][j] · X[i] for keys j < nseg·kColBlock: A in the [segment][rows][kColBlock]
// layout of scores(), X [rows][Dp], C [·][Dp] (the transposed product of the backward). Under a
// causal mask (rows = queries q0..) the sum for keys j.. starts at the first query that sees key
// j: the earlier ones' weights are 0 (the same sums for finite X).
inline void add_transposed(const float* A, int rows, int q0, int nseg, bool causal, const float* X, int Dp, float* C) {
  constexpr int R = kRowsFor<2>;
  for (int s = 0; s < nseg; ++s)
    for (int c0 = 0; c0 < kColBlock; c0 += R) {
      const int r = std::min(R, kColBlock - c0);
      const int i0 = causal ? std::clamp(s * kColBlock + c0 - q0, 0, rows) : 0;
      if (i0 == rows) continue;
      float* c = C + size_t(s * kColBlock + c0) * Dp;
      const float* a = A + (size_t(s) * rows + i0) * kColBlock + c0;
      for (int n0 = 0; n0 < Dp; n0 += kColBlock)
        micro_for_rows<kLoad, 1>(r)(1, rows - i0, a, kColBlock, 0, X + size_t(i0) * Dp + n0, Dp, 0, c + n0, Dp,
                                    c + n0, Dp);
    }
}

// C [rows][Dp] = A·X with A in the [segment][rows][kColBlock] layout of scores() and X [keys][Dp],
// in panels of kValueRows rows; under a causal mask each panel stops at the segment of its last
// query's key (the weights past it are 0: the sums are those of the full product for finite X)
constexpr int kValueRows = kRowsFor<2>;
inline void weighted_rows(const float* A, int rows, int q0, int nseg, bool causal, const float* X, int Dp, float* C) {
  for (int m0 = 0; m0 < rows; m0 += kValueRows) {
    const int r = std::min(kValueRows, rows - m0);
    const int segs = causal ? std::min(nseg, (q0 + m0 + r - 1) / kColBlock + 1) : nseg;
    gemm_rows_nv<false, 2>(r, Dp, segs, A + size_t(m0) * kColBlock, long(rows) * kColBlock, X, Dp,
                           long(kColBlock) * Dp, nullptr, 0, C + size_t(m0) * Dp, Dp);
  }
}

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
  const int64_t chunk = groups_per_chunk(groups, group_floats);
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
        lay_out_runs(k + b * a.k_stride[0] + g * a.k_stride[1], a.k_stride[2], S, Sp, D, kt);
        lay_out_rows(v + b * a.v_stride[0] + g * a.v_stride[1], a.v_stride[2], S, Sp, D, Dp, kt + kt_floats);
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
          // segments of keys up to the last query of row i's panel of the values' product
          auto panel_segments = [&](int i) {
            if (!a.causal) return nseg;
            const int last = std::min(rows, (i / kValueRows + 1) * kValueRows) - 1;
            return (q0 + last) / kColBlock + 1;
          };
          const scalar_t* qb = q + b * a.q_stride[0] + h * a.q_stride[1];
          qp.pack_rows(rows, D, qb + q0 * a.q_stride[2], a.q_stride[2], [](scalar_t x) { return to_float(x); });
          p.resize(size_t(nseg) * rows * kColBlock);
          scores(qp, rows, q0, S, D, a.causal, kt, p.data());
          // softmax over the keys each query sees; the others, up to the last key of the query's
          // panel (what the product with the values reads), get weight 0
          for (int i = 0; i < rows; ++i) {
            const int seen = a.causal ? q0 + i + 1 : S;
            Vec top = splat(-INFINITY);
            for (int s = 0; s * kColBlock < seen; ++s) {
              const float* r = p.data() + (size_t(s) * rows + i) * kColBlock;
              for (int c = 0; c < kColBlock; c += kVec)
                top = vmax(top, select(lanes + (s * kColBlock + c) < seen, load(r + c) * a.scale, splat(-INFINITY)));
            }
            float m = -INFINITY;
            for (int l = 0; l < kVec; ++l) m = std::max(m, top[l]);
            Vec sum{};
            for (int s = 0, end = panel_segments(i); s < end; ++s) {
              float* r = p.data() + (size_t(s) * rows + i) * kColBlock;
              for (int c = 0; c < kColBlock; c += kVec) {
                const VecI visible = lanes + (s * kColBlock + c) < seen;
                const Vec e =
                    s * kColBlock < seen ? select(visible, weight_exp(load(r + c) * a.scale - m), Vec{}) : Vec{};
                store(r + c, e);
                sum += e;
              }
            }
            const double total = hsum(sum);
            inv[i] = float(1.0 / total);
            if (a.lse) a.lse[(int64_t(b) * Hq + h) * S + q0 + i] = m + float(std::log(total));
          }
          o.resize(size_t(rows) * Dp);
          weighted_rows(p.data(), rows, q0, nseg, a.causal, vp, Dp, o.data());
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

// The backward, from the forward's lse (softmax weights p = e^(scale·s − lse)):
//   δ_i = Σ_e dO_ie·O_ie,  ds_ij = p_ij·(dO_i·v_j − δ_i),
//   dq_i = scale·Σ_j ds_ij·k_j,  dk_j = scale·Σ_i ds_ij·q_i,  dv_j = Σ_i p_ij·dO_i
// Phase 1 lays out each (row, K/V head)'s keys and values as product operands (as the forward).
// Phase 2 takes one task per (row, query head): its query blocks in order, each recomputing its
// scores and dO·vᵀ up to its last key (causal), writing dq and adding into the head's own dk and dv
// (so no two tasks write one value). Phase 3 sums the G heads' dk and dv of each K/V head in head
// order. Every sum has one fixed order: the bits do not depend on the thread count or the batch.
template <typename scalar_t>
void run_prefill_backward(const AttentionPrefillBackwardArgs& a) {
  const int B = a.B, Hq = a.Hq, Hkv = a.Hkv, S = a.S, D = a.D;
  const int G = Hq / Hkv;
  const int Sp = round_up(S, kColBlock), Dp = round_up(D, kColBlock);
  const scalar_t* q = static_cast<const scalar_t*>(a.q);
  const scalar_t* k = static_cast<const scalar_t*>(a.k);
  const scalar_t* v = static_cast<const scalar_t*>(a.v);
  const scalar_t* out = static_cast<const scalar_t*>(a.out);
  const scalar_t* grad = static_cast<const scalar_t*>(a.grad);
  scalar_t* gq = static_cast<scalar_t*>(a.gq);
  scalar_t* gk = static_cast<scalar_t*>(a.gk);
  scalar_t* gv = static_cast<scalar_t*>(a.gv);
  const int64_t groups = int64_t(B) * Hkv;
  // per group: k and v as runs, k as rows; per query head of it: its dk and dv, [Sp][Dp] each
  const size_t runs_floats = size_t(D) * Sp, rows_floats = size_t(Sp) * Dp;
  const size_t group_floats = 2 * runs_floats + rows_floats + size_t(G) * 2 * rows_floats;
  const int64_t chunk = groups_per_chunk(groups, group_floats);
  Buffer scratch(size_t(chunk) * group_floats);
  const int blocks = (S + kPrefillQueries - 1) / kPrefillQueries;
  const VecI lanes = lane_index();
  Errors errors;
  for (int64_t first = 0; first < groups; first += chunk) {
    const int64_t n_groups = std::min(chunk, groups - first);
#pragma omp parallel for num_threads(threads_for(a.threads, n_groups)) schedule(static)
    for (int64_t gi = 0; gi < n_groups; ++gi)
      errors.guard([&] {
        const int b = int((first + gi) / Hkv), g = int((first + gi) % Hkv);
        float* base = scratch.data() + size_t(gi) * group_floats;
        const scalar_t* kb = k + b * a.k_stride[0] + g * a.k_stride[1];
        lay_out_runs(kb, a.k_stride[2], S, Sp, D, base);
        lay_out_runs(v + b * a.v_stride[0] + g * a.v_stride[1], a.v_stride[2], S, Sp, D, base + runs_floats);
        lay_out_rows(kb, a.k_stride[2], S, Sp, D, Dp, base + 2 * runs_floats);
        std::memset(base + 2 * runs_floats + rows_floats, 0, size_t(G) * 2 * rows_floats * sizeof(float));
      });
    errors.rethrow();
    const int64_t tasks = n_groups * G;
#pragma omp parallel num_threads(threads_for(a.threads, tasks))
    {
      Panels qp, gp;
      Buffer p, dp, qrows, grows, orows, dq;
      float delta[kPrefillQueries], lse[kPrefillQueries];
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task)
        errors.guard([&] {
          const int64_t gi = task / G;
          const int b = int((first + gi) / Hkv), hg = int(task % G);
          const int h = int((first + gi) % Hkv) * G + hg;
          const float* base = scratch.data() + size_t(gi) * group_floats;
          const float *kruns = base, *vruns = base + runs_floats, *krows = base + 2 * runs_floats;
          float* dk = scratch.data() + size_t(gi) * group_floats + 2 * runs_floats + rows_floats +
                      size_t(hg) * 2 * rows_floats;
          float* dv = dk + rows_floats;
          const scalar_t* qb = q + b * a.q_stride[0] + h * a.q_stride[1];
          const scalar_t* ob = out + b * a.out_stride[0] + h * a.out_stride[1];
          const scalar_t* gb = grad + b * a.grad_stride[0] + h * a.grad_stride[1];
          const float* lb = a.lse + (int64_t(b) * Hq + h) * S;
          scalar_t* gqb = gq + (int64_t(b) * Hq + h) * int64_t(S) * D;
          for (int blk = 0; blk < blocks; ++blk) {
            const int q0 = blk * kPrefillQueries, rows = std::min(kPrefillQueries, S - q0);
            const int keys = a.causal ? q0 + rows : S, nseg = (keys + kColBlock - 1) / kColBlock;
            qp.pack_rows(rows, D, qb + q0 * a.q_stride[2], a.q_stride[2], [](scalar_t x) { return to_float(x); });
            gp.pack_rows(rows, D, gb + q0 * a.grad_stride[2], a.grad_stride[2], [](scalar_t x) { return to_float(x); });
            qrows.resize(size_t(rows) * Dp);
            grows.resize(size_t(rows) * Dp);
            lay_out_rows(qb + q0 * a.q_stride[2], a.q_stride[2], rows, rows, D, Dp, qrows.data());
            lay_out_rows(gb + q0 * a.grad_stride[2], a.grad_stride[2], rows, rows, D, Dp, grows.data());
            orows.resize(size_t(rows) * Dp);
            lay_out_rows(ob + q0 * a.out_stride[2], a.out_stride[2], rows, rows, D, Dp, orows.data());
            for (int i = 0; i < rows; ++i) {
              Vec d{};
              for (int e = 0; e < Dp; e += kVec)
                d += load(grows.data() + size_t(i) * Dp + e) * load(orows.data() + size_t(i) * Dp + e);
              delta[i] = float(hsum(d));
              lse[i] = lb[q0 + i];
            }
            p.resize(size_t(nseg) * rows * kColBlock);
            dp.resize(size_t(nseg) * rows * kColBlock);
            scores(qp, rows, q0, S, D, a.causal, kruns, p.data());
            scores(gp, rows, q0, S, D, a.causal, vruns, dp.data());
            // p (kept in p, for dv) and scale·ds (over dp, for dq and dk); 0 where a query sees no key
            for (int i = 0; i < rows; ++i) {
              const int seen = a.causal ? q0 + i + 1 : S;
              for (int s = 0; s < nseg; ++s) {
                float* pr = p.data() + (size_t(s) * rows + i) * kColBlock;
                float* dr = dp.data() + (size_t(s) * rows + i) * kColBlock;
                for (int c = 0; c < kColBlock; c += kVec) {
                  if (s * kColBlock >= seen) {
                    store(pr + c, Vec{});
                    store(dr + c, Vec{});
                    continue;
                  }
                  const VecI visible = lanes + (s * kColBlock + c) < seen;
                  const Vec w = select(visible, weight_exp(load(pr + c) * a.scale - lse[i]), Vec{});
                  store(pr + c, w);
                  store(dr + c, flush_subnormal(w * (load(dr + c) - delta[i]) * a.scale));
                }
              }
            }
            dq.resize(size_t(rows) * Dp);
            weighted_rows(dp.data(), rows, q0, nseg, a.causal, krows, Dp, dq.data());
            for (int i = 0; i < rows; ++i) {
              scalar_t* dst = gqb + int64_t(q0 + i) * D;
              for (int e = 0; e < D; ++e) dst[e] = from_float<scalar_t>(dq[size_t(i) * Dp + e]);
            }
            add_transposed(dp.data(), rows, q0, nseg, a.causal, qrows.data(), Dp, dk);
            add_transposed(p.data(), rows, q0, nseg, a.causal, grows.data(), Dp, dv);
          }
        });
    }
    errors.rethrow();
#pragma omp parallel for num_threads(threads_for(a.threads, n_groups)) schedule(static)
    for (int64_t gi = 0; gi < n_groups; ++gi)
      errors.guard([&] {
        const float* heads = scratch.data() + size_t(gi) * group_floats + 2 * runs_floats + rows_floats;
        const int64_t at = (first + gi) * int64_t(S) * D;
        float sums[2][kColBlock];
        for (int j = 0; j < S; ++j)
          for (int e0 = 0; e0 < Dp; e0 += kColBlock) {
            for (int kv = 0; kv < 2; ++kv)
              for (int c = 0; c < kColBlock; c += kVec) {
                Vec sum{};
                for (int hg = 0; hg < G; ++hg)
                  sum += load(heads + size_t(2 * hg + kv) * rows_floats + size_t(j) * Dp + e0 + c);
                store(sums[kv] + c, sum);
              }
            for (int e = e0; e < std::min(D, e0 + kColBlock); ++e) {
              gk[at + int64_t(j) * D + e] = from_float<scalar_t>(sums[0][e - e0]);
              gv[at + int64_t(j) * D + e] = from_float<scalar_t>(sums[1][e - e0]);
            }
          }
      });
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

void attention_prefill_backward(const AttentionPrefillBackwardArgs& a) {
  dispatch(a.dtype, [&](auto tag) { run_prefill_backward<decltype(tag)>(a); });
}

}  // namespace INL_ISA
}  // namespace inl
