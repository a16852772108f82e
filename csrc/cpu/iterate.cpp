// The integrator iterate (SPEC §2) on the CPU, forward and backward, fused per block of rows.
//
// Forward, for each row and step t (state x, v; context h):
//   c       = relu(h·w_hᵀ + bias + x·w_xᵀ + v·w_vᵀ)             bias = b_h + b_x + b_v
//   a,b,g,u = split(c·w_oᵀ + b_o, 4)
//   alpha   = sigmoid(ms0·a + mb0) · s,  s = 1 - exp(-kappa·rms(x - mu))  (s = 1 without kappa)
//   beta    = softplus(ms1·b + mb1);  gate = sigmoid(ms2·g + mb2);  v_cand = ms3·u + mb3
//   v'      = alpha·v + (1 - alpha)·v_cand - beta·(x - mu) + table[t]
//   x'      = x + dt·gate·v'
// with the statistics energy = mean v'² and distance = mean |x' - mu| after each step and,
// without gradients, a per-row early exit once ‖x' - x‖₂ < tol after min_iterations steps.
//
// Backward, per step in reverse, from gx', gv' (plus 2v'/d·g_energy and sign(x'-mu)/d·g_distance):
//   gv~ = gv' + dt·gate·gx'                      ggate = dt·v'·gx'
//   galpha = gv~·(v - v_cand)   gv_cand = gv~·(1 - alpha)   gbeta = -gv~·(x - mu)
//   gv = alpha·gv~ + gpre·w_v   gx = gx' - beta·gv~ + gpre·w_x (+ the rms term of s)
//   go = (ms0·galpha·s·σ'(za), ms1·gbeta·σ(zb), ms2·ggate·σ'(zg), ms3·gv_cand)
//   gc = go·w_o,  gpre = gc·[pre > 0],  gw_o += goᵀc,  gw_x|w_v += gpreᵀ[x|v],  gctx += gpre
// and per row block gh = gctx·w_h, gw_h += gctxᵀh, gbias += Σ gctx.
//
// Layout: a block holds NB rows (two vectors of lanes) with its state stored transposed,
// [column][row], so that one vector holds one column of kVec rows: the element-wise update, the
// per-row statistics and the early exit are all lane-wise, and the controller matmuls run as
// (weightsᵀ)·(stateᵀ) through the micro-kernel of simd.h with no repacking between steps. A
// thread takes a group of blocks through all T steps, one step of every block at a time; without
// early exit a group is one block. With early exit, rows that converged leave the group after
// each step and the remaining rows are moved into the first blocks, so the group runs
// ceil(active rows / NB) blocks per step: the time follows the steps rows actually run. Moving a
// row moves its lane and nothing else: every row's result is the same sequence of operations
// whatever block or lane it sits in, so the bits do not depend on the batch.
//
// Backward recomputes a block's forward keeping only that block's per-step states and
// activations, then runs its steps in reverse. Parameter gradients go to per-tile partial sums
// (a tile is a fixed run of blocks, whatever the thread count) added in tile order, so every
// result is the same bits for any number of threads.
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace inl {
namespace INL_ISA {
namespace {

constexpr int NB = kColBlock;  // rows per block: the lanes of two vectors
constexpr int kMaxGroupBlocks = 64;
constexpr int MR = kRowBlock;

// sign of each controller section's output as the forward's micro-kernel gives it: -z for alpha
// and gate, z for beta and v_cand
constexpr float kSectionSign[4] = {-1.f, 1.f, -1.f, 1.f};

// A(i, k) for the few-row path's matrix-vector products: [K][Mv] with Mv = M rounded up to whole
// vectors (padding zero), so each k reads the outputs' weights as aligned whole vectors. Made
// from the micro-kernel's panels (the same values) the first time a few-row call needs them.
struct Wide {
  Buffer data;
  int M = 0, K = 0, Mv = 0;
  void from(const Panels& A) {
    M = A.M, K = A.K, Mv = round_up(A.M, kVec);
    data.resize(size_t(K) * Mv);
    data.zero();
    for (int i = 0; i < M; ++i) {
      const float* src = A.panel(i / MR) + i % MR;
      for (int k = 0; k < K; ++k) data[size_t(k) * Mv + i] = src[size_t(k) * MR];
    }
  }
  int vectors() const { return Mv / kVec; }
};

// The controller's weights packed for the micro-kernel: what iterate_pack makes and callers cache.
struct Packed {
  int d, H;
  bool backward;
  float ms[4];
  Panels w_ctx;       // A(k, j) = w_h[k][j]                              (M = H, K = d)
  Panels w_in;        // A(k, j) = w_x[k][j], A(k, d + j) = w_v[k][j]     (M = H, K = 2d)
  Panels w_out[4];    // A(j, k) = sg_s·ms_s·w_o[s·d + j][k] for section s   (M = d, K = H)
  Panels w_out_t;     // A(k, s·d + j) = ms_s·w_o[s·d + j][k]             (M = H, K = 4d, backward)
  Panels w_x_t, w_v_t, w_h_t;  // A(j, k) = w[k][j]                       (M = d, K = H, backward)
  // w_ctx, w_in and w_out in the few-row layout, made once on first use (forward_small)
  mutable std::once_flag wide_once;
  mutable Wide wide_ctx, wide_in, wide_out[4];
  void make_wide() const {
    std::call_once(wide_once, [&] {
      wide_ctx.from(w_ctx);
      wide_in.from(w_in);
      for (int s = 0; s < 4; ++s) wide_out[s].from(w_out[s]);
    });
  }
};

Packed* make_pack(const IterateWeights& W) {
  auto* pk = new Packed;
  const int d = W.d, H = W.H;
  pk->d = d, pk->H = H, pk->backward = W.backward;
  std::copy_n(W.mod_scale, 4, pk->ms);
  const float *wh = W.w_h, *wx = W.w_x, *wv = W.w_v, *wo = W.w_o;
  pk->w_ctx.pack(H, d, [&](int k, int j) { return wh[size_t(k) * d + j]; });
  pk->w_in.pack(H, 2 * d, [&](int k, int j) { return j < d ? wx[size_t(k) * d + j] : wv[size_t(k) * d + j - d]; });
  // the output layer gives each section's argument directly, z_s = ms_s·(c·w_oᵀ + b_o)_s + mb_s,
  // negated (sg_s = -1) for the two sigmoids, which take e^-z: four fewer operations per element
  for (int s = 0; s < 4; ++s) {
    const float scale = kSectionSign[s] * pk->ms[s];
    pk->w_out[s].pack(d, H, [&](int j, int k) { return scale * wo[(size_t(s) * d + j) * H + k]; });
  }
  if (W.backward) {
    pk->w_out_t.pack(H, 4 * d, [&](int k, int sj) { return pk->ms[sj / d] * wo[size_t(sj) * H + k]; });
    pk->w_x_t.pack(d, H, [&](int j, int k) { return wx[size_t(k) * d + j]; });
    pk->w_v_t.pack(d, H, [&](int j, int k) { return wv[size_t(k) * d + j]; });
    pk->w_h_t.pack(d, H, [&](int j, int k) { return wh[size_t(k) * d + j]; });
  }
  return pk;
}

// The dynamics' constants of one call, laid out for the kernel, and the packed weights.
struct Params {
  int d, H, T, dp, Hp;
  const Packed* pk;
  Buffer bias;        // [Hp][NB]  the summed input bias, repeated across the lanes
  Buffer bias_row;    // [Hp]      the same, once
  Buffer z_off;       // [4][dp]   sg_s·(ms_s·b_o + mb_s): each section's offset per column
  Buffer mu;          // [dp]
  Buffer table;       // [T][dp]     zeros without excited dims
  Array<uint8_t> table_column;  // [d] whether the table's gradient is wanted in column j
  float ms[4], mb[4];
  float dt, kappa;
  bool has_kappa, has_v;
};

void init_params(Params& P, const IterateArgs& a) {
  const int d = a.d, H = a.H, T = a.T;
  P.d = d, P.H = H, P.T = T;
  P.dp = round_up(d, NB);
  P.Hp = round_up(H, NB);
  const int dp = P.dp, Hp = P.Hp;
  P.pk = static_cast<const Packed*>(a.pack);
  for (int i = 0; i < 4; ++i) {
    P.ms[i] = a.mod[i];
    P.mb[i] = a.mod[4 + i];
  }
  P.dt = a.dt;
  P.has_kappa = a.has_kappa;
  P.kappa = a.has_kappa ? a.kappa : 0.f;
  P.has_v = a.v != nullptr;
  P.bias.resize(size_t(Hp) * NB);
  P.bias.zero();
  for (int k = 0; k < H; ++k) std::fill_n(P.bias.data() + size_t(k) * NB, NB, a.bias[k]);
  P.bias_row.resize(Hp);
  P.bias_row.zero();
  std::copy_n(a.bias, H, P.bias_row.data());
  P.z_off.resize(size_t(4) * dp);
  P.z_off.zero();
  for (int s = 0; s < 4; ++s)
    for (int j = 0; j < d; ++j)
      P.z_off[size_t(s) * dp + j] = kSectionSign[s] * (P.ms[s] * a.b_o[size_t(s) * d + j] + P.mb[s]);
  P.mu.resize(dp);
  P.mu.zero();
  std::copy_n(a.mu, d, P.mu.data());
  P.table.resize(size_t(T) * dp);
  P.table.zero();
  if (a.table)
    for (int t = 0; t < T; ++t) std::copy_n(a.table + size_t(t) * d, d, P.table.data() + size_t(t) * dp);
  P.table_column.resize(d);
  for (int j = 0; j < d; ++j) P.table_column[j] = a.table && (!a.table_columns || a.table_columns[j]);
}

// Rows rows[0..R) of a row-major [N][d] tensor into columns [j][lane] of a block (and back), 16
// columns at a time so that both sides stay in cache lines; fp32 with AVX-512 goes through 16×16
// register transposes.
constexpr int kTransposeCols = 16;
template <typename scalar_t>
inline void load_block(const scalar_t* src, const int64_t* rows, int R, int d, float* dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && NB % 16 == 0) {
    for (int j0 = 0; j0 < d; j0 += 16) {
      const int cols = std::min(16, d - j0);
      const __mmask16 mask = __mmask16((1u << cols) - 1);
      for (int r0 = 0; r0 < NB; r0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i)
          v[i] = r0 + i < R ? _mm512_maskz_loadu_ps(mask, src + rows[r0 + i] * d + j0) : _mm512_setzero_ps();
        transpose16(v);
        for (int jj = 0; jj < cols; ++jj) _mm512_storeu_ps(dst + (j0 + jj) * NB + r0, v[jj]);
      }
    }
    return;
  }
#endif
  for (int j0 = 0; j0 < d; j0 += kTransposeCols) {
    const int cols = std::min(kTransposeCols, d - j0);
    for (int r = 0; r < R; ++r) {
      const scalar_t* row = src + rows[r] * d + j0;
      for (int jj = 0; jj < cols; ++jj) dst[(j0 + jj) * NB + r] = to_float(row[jj]);
    }
  }
}
template <typename scalar_t>
inline void store_block(const float* src, const int64_t* rows, int R, int d, scalar_t* dst) {  // rows[r] < 0: skip lane r
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && NB % 16 == 0) {
    for (int j0 = 0; j0 < d; j0 += 16) {
      const int cols = std::min(16, d - j0);
      const __mmask16 mask = __mmask16((1u << cols) - 1);
      for (int r0 = 0; r0 < NB && r0 < R; r0 += 16) {
        __m512 v[16];
        for (int jj = 0; jj < 16; ++jj)
          v[jj] = jj < cols ? _mm512_loadu_ps(src + (j0 + jj) * NB + r0) : _mm512_setzero_ps();
        transpose16(v);
        for (int i = 0; i < 16 && r0 + i < R; ++i)
          if (rows[r0 + i] >= 0) _mm512_mask_storeu_ps(dst + rows[r0 + i] * d + j0, mask, v[i]);
      }
    }
    return;
  }
#endif
  for (int j0 = 0; j0 < d; j0 += kTransposeCols) {
    const int cols = std::min(kTransposeCols, d - j0);
    for (int r = 0; r < R; ++r) {
      if (rows[r] < 0) continue;
      scalar_t* row = dst + rows[r] * d + j0;
      for (int jj = 0; jj < cols; ++jj) row[jj] = from_float<scalar_t>(src[(j0 + jj) * NB + r]);
    }
  }
}
// one lane of a block into one row
template <typename scalar_t>
inline void store_lane(const float* src, int lane, int d, scalar_t* dst_row) {
  for (int j = 0; j < d; ++j) dst_row[j] = from_float<scalar_t>(src[size_t(j) * NB + lane]);
}
// [rows][NB] block → [NB][cols] row-major (the B operand of the parameter-gradient products)
inline void transpose_block(const float* src, int rows, int cols, float* dst) {
  for (int n = 0; n < NB; ++n)
    for (int k = 0; k < rows; ++k) dst[n * cols + k] = src[k * NB + n];
}

// Walks the cache lines of a few memory ranges, some at a time, so that the next block's inputs
// and this block's outputs reach L2 while the block computes rather than stalling its first
// touch of each line (the hardware prefetcher cannot follow 32 row streams at once).
class Prefetcher {
 public:
  void reset() { n_ = region_ = 0, offset_ = 0, lines_ = 0; }
  void add(const void* p, size_t bytes) {
    if (!p || !bytes || n_ == 4) return;
    base_[n_] = static_cast<const char*>(p), bytes_[n_] = bytes, ++n_;
    lines_ += (bytes + 63) / 64;
  }
  size_t lines() const { return lines_; }
  template <bool WRITE>
  void issue(size_t count) {
    for (; count > 0 && region_ < n_; --count) {
      __builtin_prefetch(base_[region_] + offset_, WRITE ? 1 : 0, 2);
      offset_ += 64;
      if (offset_ >= bytes_[region_]) ++region_, offset_ = 0;
    }
  }

 private:
  const char* base_[4];
  size_t bytes_[4], offset_ = 0, lines_ = 0;
  int n_ = 0, region_ = 0;
};

// What the backward pass keeps of one block's forward.
constexpr int kActivations = 5;
constexpr int kLaneSums = 5;  // per-column lane sums of the backward: gz of each section, mu
struct Stash {
  int dp = 0, Hp = 0;
  Buffer state;   // [T+1][2dp][NB]  [x | v] before each step, then the final one
  Buffer hidden;  // [T][Hp][NB]     c
  Buffer act;     // [T][5][dp][NB]  alpha0, beta, sigmoid(zb), gate, v_cand
  Buffer srow;    // [T][NB]         dynamic-alpha factor s
  Buffer erow;    // [T][NB]         exp(-kappa·rms)
  Buffer rms;     // [T][NB]
  Array<const float*> hidden_at;  // [T] where each step's c is (`hidden` when the forward saved it)
  void init(int T, int dp_, int Hp_) {
    dp = dp_, Hp = Hp_;
    hidden_at.resize(T);
    state.resize(size_t(T + 1) * 2 * dp * NB);
    hidden.resize(size_t(T) * Hp * NB);
    act.resize(size_t(T) * kActivations * dp * NB);
    srow.resize(size_t(T) * NB);
    erow.resize(size_t(T) * NB);
    rms.resize(size_t(T) * NB);
  }
  float* x(int t) { return state.data() + size_t(t) * 2 * dp * NB; }
  float* c(int t) { return hidden.data() + size_t(t) * Hp * NB; }
  float* a(int t, int i) { return act.data() + (size_t(t) * kActivations + i) * dp * NB; }
};

// Per-thread working memory of the forward: a group of up to `capacity` blocks.
struct Scratch {
  int dp = 0, Hp = 0, capacity = 0;
  Buffer state;             // [G][2dp][NB]  [x | v] of each block
  Buffer ctx;               // [G][Hp][NB]   h·w_hᵀ + bias of each block
  Buffer err2;              // [G][NB]       Σ (x - mu)² per row (dynamic alpha)
  Array<int64_t> rows;      // [G][NB]       the row in each lane, -1 once it left
  Array<int> count;         // [G]           lanes in use in each block: 0 .. count-1
  Buffer h, c, out;         // one block's h (the backward reads it), hidden c, output columns
  Prefetcher reads, writes;  // set by the caller of forward_group
  void init(const Params& P, int blocks) {
    dp = P.dp, Hp = P.Hp, capacity = blocks;
    state.resize(size_t(blocks) * 2 * dp * NB);
    ctx.resize(size_t(blocks) * Hp * NB);
    ctx.zero();  // rows H..Hp stay zero
    err2.resize(size_t(blocks) * NB);
    rows.resize(size_t(blocks) * NB);
    count.resize(blocks);
    h.resize(size_t(dp) * NB);
    c.resize(size_t(Hp) * NB);
    c.zero();
    out.resize(size_t(4) * MR * NB);  // one micro-kernel's columns of a, b, g, u
  }
  float* x(int b) { return state.data() + size_t(b) * 2 * dp * NB; }
  float* context(int b) { return ctx.data() + size_t(b) * Hp * NB; }
};

template <typename scalar_t>
struct ForwardIO {
  const scalar_t *h, *x, *v;
  scalar_t *x_out, *v_out, *traj_x, *traj_v;  // null in the backward's recompute
  int32_t* iterations;
  float *energy, *distance;
  bool early_exit;
  float tol;
  int min_iterations;
};

struct RowSums {  // per-row sums over the columns of one step, two vectors of rows each
  Vec step[2], energy[2], dist[2], err2[2];
};

// the block's NB rows: two vectors, processed side by side (see Vecs)
using Rows = Vecs<NB / kVec>;
inline Rows load_rows(const float* p) {
  Rows r;
  for (int q = 0; q < NB / kVec; ++q) r.v[q] = load(p + q * kVec);
  return r;
}
inline void store_rows(float* p, const Rows& r) {
  for (int q = 0; q < NB / kVec; ++q) store(p + q * kVec, r.v[q]);
}

// Column j of one step for the block's rows, updating the state in place. EARLY also sums the
// squared step ‖x' - x‖² of each row.
template <bool STASH, bool EARLY, bool KAPPA>
__attribute__((always_inline)) inline void update_column(const Params& P, int t, int j, const float* o,
                                                         const float* xcol, const float* vcol, float* xout,
                                                         float* vout, const Vec* s_row, RowSums& sums, Stash* stash) {
  const int dp = P.dp;
  const float mu = P.mu[j], exc = P.table[size_t(t) * dp + j], dt = P.dt;
  // o holds -z_alpha, z_beta, -z_gate, v_cand (see kSectionSign)
  Rows alpha0 = vsigmoid_neg(load_rows(o));
  Rows beta_slope;
  Rows beta = vsoftplus<STASH>(load_rows(o + MR * NB), &beta_slope);
  Rows gate = vsigmoid_neg(load_rows(o + 2 * MR * NB));
  Rows v_cand = load_rows(o + 3 * MR * NB);
  Rows alpha = alpha0;
  if (KAPPA)
    for (int q = 0; q < 2; ++q) alpha.v[q] = alpha0.v[q] * s_row[q];
  Rows xo = load_rows(xcol), vo = load_rows(vcol);
  Rows err = xo - mu;
  // alpha·v + (1 - alpha)·v_cand, written as v_cand + alpha·(v - v_cand)
  Rows vn = v_cand + alpha * (vo - v_cand) - beta * err + exc;
  Rows xn = xo + (gate * dt) * vn;
  if (EARLY)
    for (int q = 0; q < 2; ++q) {
      Vec dx = xn.v[q] - xo.v[q];
      sums.step[q] += dx * dx;
    }
  store_rows(xout, xn);
  store_rows(vout, vn);
  Rows en = xn - mu;
  for (int q = 0; q < 2; ++q) {
    sums.energy[q] += vn.v[q] * vn.v[q];
    sums.dist[q] += vabs(en.v[q]);
    if (KAPPA) sums.err2[q] += en.v[q] * en.v[q];
  }
  if (STASH) {
    const size_t at = size_t(j) * NB;
    store_rows(stash->a(t, 0) + at, alpha0);
    store_rows(stash->a(t, 1) + at, beta);
    store_rows(stash->a(t, 2) + at, beta_slope);
    store_rows(stash->a(t, 3) + at, gate);
    store_rows(stash->a(t, 4) + at, v_cand);
  }
}

// Columns [j0, j0 + cols) of one step, from the controller outputs of those columns in `o`: the
// state `in` ([x | v], [2dp][NB]) steps to `out` (the same buffer, or the next step's in the stash).
template <bool STASH, bool EARLY, bool KAPPA>
void update_panel(const Params& P, int t, int j0, int cols, const float* o, const float* in, float* out,
                  const Vec* s_row, RowSums& sums_io, Stash* stash) {
  RowSums sums = sums_io;  // a local copy stays in registers
  const size_t v = size_t(P.dp) * NB;
  for (int jj = 0; jj < cols; ++jj) {
    const size_t at = size_t(j0 + jj) * NB;
    update_column<STASH, EARLY, KAPPA>(P, t, j0 + jj, o + jj * NB, in + at, in + v + at, out + at, out + v + at, s_row,
                                       sums, stash);
  }
  sums_io = sums;
}

using PanelFn = void (*)(const Params&, int, int, int, const float*, const float*, float*, const Vec*, RowSums&,
                         Stash*);
template <bool STASH>
PanelFn panel_for(bool early_exit, bool kappa) {
  static const PanelFn table[2][2] = {{&update_panel<STASH, false, false>, &update_panel<STASH, false, true>},
                                      {&update_panel<STASH, true, false>, &update_panel<STASH, true, true>}};
  return table[early_exit][kappa];
}

// Step t of block b. STASH keeps what the backward needs. `hidden` ([T][Hp][NB], or null)
// receives the controller's hidden activations c of each step, or, with `reuse_hidden`, supplies
// them: the backward's recompute then skips the controller's input layer.
template <bool STASH>
RowSums step_block(const Params& P, Scratch& S, int b, int t, bool early_exit, Stash* stash, float* hidden,
                   bool reuse_hidden, size_t reads_per_panel, size_t writes_per_panel) {
  const int d = P.d, H = P.H, dp = P.dp, Hp = P.Hp;
  const Packed& pk = *P.pk;
  // the state steps in place; with STASH from one stashed step to the next (no copies)
  if (STASH && t == 0) std::copy_n(S.x(b), size_t(2) * dp * NB, stash->x(0));
  const float* in = STASH ? stash->x(t) : S.x(b);
  float* out = STASH ? stash->x(t + 1) : S.x(b);
  // controller input layer: c = relu(ctx + [x | v]·[w_x | w_v]ᵀ); the v half is zero at t = 0 without v
  const float* c = S.c.data();
  if (reuse_hidden) {
    c = hidden + size_t(t) * Hp * NB;
  } else {
    float* cw = STASH ? stash->c(t) : hidden ? hidden + size_t(t) * Hp * NB : S.c.data();
    const int segments = (t == 0 && !P.has_v) ? 1 : 2;
    gemm_panels<true>(pk.w_in, NB, segments, d, in, NB, long(dp) * NB, S.context(b), NB, cw, NB);
    for (int i = 0; i < H * NB; i += kVec) store(cw + i, vmax(splat(0.f), load(cw + i)));
    if (cw != S.c.data()) std::fill_n(cw + size_t(H) * NB, size_t(Hp - H) * NB, 0.f);  // rows H..Hp stay zero
    if (STASH && hidden) std::copy_n(cw, size_t(Hp) * NB, hidden + size_t(t) * Hp * NB);
    c = cw;
  }
  if (STASH) stash->hidden_at[t] = c;
  Vec s_row[2] = {splat(1.f), splat(1.f)};
  if (P.has_kappa)
    for (int q = 0; q < 2; ++q) {
      Vec err2 = load(S.err2.data() + size_t(b) * NB + q * kVec), rms;
      for (int i = 0; i < kVec; ++i) rms[i] = std::sqrt(err2[i] / float(d));
      Vec e = vexp(-P.kappa * rms);
      s_row[q] = 1.f - e;
      if (STASH) {
        store(stash->rms.data() + t * NB + q * kVec, rms);
        store(stash->erow.data() + t * NB + q * kVec, e);
      }
    }
  if (STASH)
    for (int q = 0; q < 2; ++q) store(stash->srow.data() + t * NB + q * kVec, s_row[q]);
  RowSums sums{};
  const PanelFn update = panel_for<STASH>(early_exit, P.has_kappa);
  // controller output layer, MR columns of each section at a time, then the update of those columns
  for (int p = 0, j0 = 0; j0 < d; ++p, j0 += MR) {
    const int cols = pk.w_out[0].rows(p);
    MicroFn micro = micro_for_rows<kRowBias, 1>(cols);
    for (int s = 0; s < 4; ++s)
      micro(1, H, pk.w_out[s].panel(p), MR, 0, c, NB, 0, P.z_off.data() + s * dp + j0, 1, S.out.data() + s * MR * NB,
            NB);
    S.reads.issue<false>(reads_per_panel);
    S.writes.issue<true>(writes_per_panel);
    update(P, t, j0, cols, S.out.data(), in, out, s_row, sums, stash);
  }
  if (P.has_kappa)
    for (int q = 0; q < 2; ++q) store(S.err2.data() + size_t(b) * NB + q * kVec, sums.err2[q]);
  return sums;
}

// Lanes of one block moved into lanes of another (or the same) block, column by column: lane
// l of the target takes lane from[l] of the source. Each column is read before it is written,
// so a block may compact into itself.
struct LaneMove {
  int from[NB];
  VecI index[2], take[2];  // per target vector: source lane, and whether it receives one
  LaneMove() {
    for (int l = 0; l < NB; ++l) from[l] = -1;
    for (int q = 0; q < 2; ++q) index[q] = VecI{}, take[q] = VecI{};
  }
  void set(int to, int src) {
    from[to] = src;
    index[to / kVec][to % kVec] = src;
    take[to / kVec][to % kVec] = -1;
  }
  // src, dst: [cols][NB]
  void apply(const float* src, float* dst, int cols) const {
#if defined(__GNUC__) && !defined(__clang__)
    for (int j = 0; j < cols; ++j) {
      const Vec s0 = load(src + size_t(j) * NB), s1 = load(src + size_t(j) * NB + kVec);
      for (int q = 0; q < 2; ++q) {
        float* out = dst + size_t(j) * NB + q * kVec;
        store(out, select(take[q], __builtin_shuffle(s0, s1, index[q]), load(out)));
      }
    }
#else
    for (int j = 0; j < cols; ++j) {
      float column[NB];
      std::copy_n(src + size_t(j) * NB, NB, column);
      for (int l = 0; l < NB; ++l)
        if (from[l] >= 0) dst[size_t(j) * NB + l] = column[from[l]];
    }
#endif
  }
};

// Rows [n0, n0 + nrows) through all T steps, ceil(nrows / NB) blocks at a time (one block with
// STASH, which keeps what the backward needs and never exits early; otherwise the outputs are
// written). With early exit, converged rows are written out and leave the group after each step.
template <typename scalar_t, bool STASH>
void forward_group(const Params& P, Scratch& S, int64_t n0, int64_t nrows, const ForwardIO<scalar_t>& io,
                   Stash* stash, float* hidden, bool reuse_hidden) {
  const int d = P.d, T = P.T, dp = P.dp;
  const Packed& pk = *P.pk;
  const int blocks = int((nrows + NB - 1) / NB);
  // loads block b: its rows, h (for the context term, the same every step), x, v
  auto load_rows_of = [&](int b) {
    const int R = int(std::min<int64_t>(NB, nrows - int64_t(b) * NB));
    int64_t* rows = S.rows.data() + size_t(b) * NB;
    for (int r = 0; r < R; ++r) rows[r] = n0 + int64_t(b) * NB + r;
    S.count[b] = R;
    float* state = S.x(b);
    // lanes ≥ R and columns ≥ d are zero (the micro-kernel reads them); so is v without one
    if (R < NB || d < dp) {
      std::fill_n(state, size_t(2) * dp * NB, 0.f);
      S.h.zero();
    } else if (!io.v) {
      std::fill_n(state + size_t(dp) * NB, size_t(dp) * NB, 0.f);
    }
    load_block(io.h, rows, R, d, S.h.data());
    load_block(io.x, rows, R, d, state);
    if (io.v) load_block(io.v, rows, R, d, state + dp * NB);
    if (!reuse_hidden)
      gemm_panels<true>(pk.w_ctx, NB, 1, d, S.h.data(), NB, 0, P.bias.data(), NB, S.context(b), NB);
    if (P.has_kappa) {
      Vec err2[2] = {Vec{}, Vec{}};
      for (int j = 0; j < d; ++j)
        for (int q = 0; q < 2; ++q) {
          Vec e = load(state + j * NB + q * kVec) - P.mu[j];
          err2[q] += e * e;
        }
      for (int q = 0; q < 2; ++q) store(S.err2.data() + size_t(b) * NB + q * kVec, err2[q]);
    }
  };
  // trajectory row `t` of lane r of block b
  auto traj = [&](int b, int r, int t) {
    const size_t off = (size_t(S.rows[size_t(b) * NB + r]) * (T + 1) + t) * d;
    const float* state = S.x(b);
    store_lane(state, r, d, io.traj_x + off);
    store_lane(state + dp * NB, r, d, io.traj_v + off);
  };
  const bool trajectory = !STASH && io.traj_x;
  const bool early_exit = !STASH && io.early_exit;
  // prefetches spread over a block's steps (its first step in a group: it may run no more)
  const size_t panels = size_t(blocks > 1 ? 1 : T) * ((d + MR - 1) / MR);
  size_t reads_per_panel = 0, writes_per_panel = 0;
  // Runs block b from step t on, one step after the other while it stays in cache, until it
  // finishes or a row leaves it: it is then parked until the step it is due at, where the
  // parked blocks are merged (see below). Returns the step it is due at next (T: finished).
  auto run_block = [&](int b, int t) -> int {
    int64_t* rows = S.rows.data() + size_t(b) * NB;
    reads_per_panel = (S.reads.lines() + panels - 1) / panels;
    writes_per_panel = (S.writes.lines() + panels - 1) / panels;
    for (; t < T; ++t) {
      const RowSums sums = step_block<STASH>(P, S, b, t, early_exit, stash, hidden, reuse_hidden, reads_per_panel,
                                             writes_per_panel);
      if (STASH) continue;
      float energy[NB], distance[NB], norm[NB];
      for (int q = 0; q < 2; ++q) {
        Vec e = sums.energy[q] / float(d), dist = sums.dist[q] / float(d);
        for (int i = 0; i < kVec; ++i) {
          energy[q * kVec + i] = e[i];
          distance[q * kVec + i] = dist[i];
          norm[q * kVec + i] = std::sqrt(sums.step[q][i]);
        }
      }
      const bool check = early_exit && t + 1 >= io.min_iterations;
      int64_t done[NB];  // rows that converged at this step, by lane (-1: none)
      int left = 0, running = 0;
      for (int r = 0; r < S.count[b]; ++r) {
        const int64_t row = rows[r];
        done[r] = -1;
        if (row < 0) continue;  // a lane that a row left earlier
        io.energy[row * T + t] = energy[r];
        io.distance[row * T + t] = distance[r];
        if (trajectory) traj(b, r, t + 1);
        if (!check || !(norm[r] < io.tol)) {
          ++running;
          continue;
        }
        // converged after t + 1 steps: the remaining steps repeat its state
        io.iterations[row] = t + 1;
        for (int u = t + 1; u < T; ++u) {
          io.energy[row * T + u] = energy[r];
          io.distance[row * T + u] = distance[r];
          if (trajectory) traj(b, r, u + 1);
        }
        done[r] = row;
        rows[r] = -1;
        ++left;
      }
      if (left == 0) continue;
      store_block(S.x(b), done, S.count[b], d, io.x_out);
      store_block(S.x(b) + dp * NB, done, S.count[b], d, io.v_out);
      if (running == 0) S.count[b] = 0;
      return t + 1;
    }
    return T;
  };

  // loads block b and runs it from step 0 (in cache); the next block's inputs are prefetched
  // during its first step
  auto start_block = [&](int b) {
    load_rows_of(b);
    if (trajectory)
      for (int r = 0; r < S.count[b]; ++r) traj(b, r, 0);
    if (b + 1 < blocks) {
      const int64_t m0 = n0 + int64_t(b + 1) * NB;
      const size_t bytes = size_t(std::min<int64_t>(NB, n0 + nrows - m0)) * d * sizeof(scalar_t);
      S.reads.reset();
      S.reads.add(io.h + m0 * d, bytes);
      S.reads.add(io.x + m0 * d, bytes);
      if (io.v) S.reads.add(io.v + m0 * d, bytes);
    }
    return run_block(b, 0);
  };


  if (!early_exit) {  // every step, block after block
    for (int b = 0; b < blocks; ++b) start_block(b);
  } else {
    // Each block runs block-major; when rows leave it, it waits for the step it is due at. There
    // the waiting blocks' remaining rows are moved, in order, into the first lanes of the first of
    // them, so the step runs on ceil(rows / NB) blocks. A row's bits do not depend on its lane.
    int due[kMaxGroupBlocks], list[kMaxGroupBlocks];
    for (int b = 0; b < blocks; ++b) due[b] = start_block(b);
    for (int t = 1; t < T; ++t) {
      int n = 0;
      for (int b = 0; b < blocks; ++b)
        if (due[b] == t && S.count[b] > 0) list[n++] = b;
      int to = 0;  // slots filled, in list order
      for (int i = 0; i < n; ++i) {
        const int b = list[i];
        // this block's remaining rows go to the next free slots: lanes of at most two blocks
        int lane_to[NB], moves = 0;
        for (int r = 0; r < S.count[b]; ++r) {
          lane_to[r] = -1;
          if (S.rows[size_t(b) * NB + r] < 0) continue;
          lane_to[r] = to++;
          moves += lane_to[r] != i * NB + r;
        }
        if (moves == 0) continue;  // every row stays where it is
        int first = 0;
        while (lane_to[first] < 0) ++first;
        for (int tb = lane_to[first] / NB; tb <= (to - 1) / NB; ++tb) {
          LaneMove m;
          for (int r = 0; r < S.count[b]; ++r)
            if (lane_to[r] >= 0 && lane_to[r] / NB == tb) m.set(lane_to[r] % NB, r);
          const int db = list[tb];
          m.apply(S.x(b), S.x(db), 2 * dp);
          m.apply(S.context(b), S.context(db), P.H);
          m.apply(S.err2.data() + size_t(b) * NB, S.err2.data() + size_t(db) * NB, 1);
          for (int l = 0; l < NB; ++l)  // ascending: a source lane is never below its target
            if (m.from[l] >= 0) S.rows[size_t(db) * NB + l] = S.rows[size_t(b) * NB + m.from[l]];
        }
      }
      for (int i = 0; i < n; ++i) S.count[list[i]] = std::clamp(to - i * NB, 0, NB);
      for (int i = 0; i * NB < to; ++i) due[list[i]] = run_block(list[i], t);
    }
  }
  if (STASH) return;
  for (int b = 0; b < blocks; ++b) {  // rows that ran all T steps
    const int64_t* rows = S.rows.data() + size_t(b) * NB;
    if (S.count[b] == 0) continue;
    for (int r = 0; r < S.count[b]; ++r)
      if (rows[r] >= 0) io.iterations[rows[r]] = T;
    store_block(S.x(b), rows, S.count[b], d, io.x_out);
    store_block(S.x(b) + dp * NB, rows, S.count[b], d, io.v_out);
  }
}

// Blocks per group with early exit: half a thread's share of the batch, so that the rows still
// running after most have left fill whole blocks while two groups per thread still balance the
// threads' work; at most ~4 MiB of state (a block stays in cache while it runs, and the group's
// state passes through it only where blocks merge).
int group_blocks(const Params& P, int64_t blocks, int threads) {
  const size_t block_bytes = (size_t(2) * P.dp + P.Hp) * NB * sizeof(float);
  const int64_t by_cache = std::max<int64_t>(1, int64_t((size_t(4) << 20) / block_bytes));
  const int64_t by_threads = (blocks + 2 * threads - 1) / (2 * threads);
  return int(std::clamp<int64_t>(std::min(by_cache, by_threads), 1, kMaxGroupBlocks));
}

// ---- a few rows (decode) ---------------------------------------------------------------------
//
// A block computes NB rows whatever it holds, so one row (a decode step at batch 1) would pay for
// NB. Up to kSmallRows rows instead run row by row: each product is a matrix-vector product over
// the same weights laid out wide (Wide: whole vectors of outputs per k, where a panel's 14
// outputs straddle cache lines: 3-4x faster at small's shape on a Zen 4), and the update runs
// along the columns. Every output element is still its init plus the same products added in the same
// k order, the element-wise math is the same functions, and each row's sums over the columns are
// added column after column as in a block: a row's bits are those the block path gives it.
constexpr int kSmallRows = 4;

// out[m] = init[m] + Σ_seg Σ_k A(m, k)·b[seg·bseg + k] for the outputs in vectors [v0, v1) of A
// (one row; init and out cover whole vectors). Each output lane adds its products in k order, one
// multiply-add each, from its init: what the micro-kernel does for that element, so a row gets
// the bits the block path gives it. NV independent vectors keep several multiply-adds in flight,
// and each k reads them as whole aligned vectors of A's wide layout.
template <int NV>
inline void gemv_vectors(const float* A, long Mv, int nseg, int kseg, const float* b, long bseg, const float* init,
                         float* out) {
  Vec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = load(init + u * kVec);
  for (int s = 0; s < nseg; ++s) {
    const float* a = A + size_t(s) * kseg * Mv;
    const float* bs = b + s * bseg;
    for (int k = 0; k < kseg; ++k) {
      const float bk = bs[k];
      for (int u = 0; u < NV; ++u) acc[u] += load(a + size_t(k) * Mv + u * kVec) * bk;
    }
  }
  for (int u = 0; u < NV; ++u) store(out + u * kVec, acc[u]);
}

inline void gemv_wide(const Wide& A, int nseg, int kseg, const float* b, long bseg, const float* init, float* out,
                      int v0, int v1) {
  constexpr int kVecsAtOnce = 8;
  for (int u = v0; u < v1; u += kVecsAtOnce) {
    const float* a = A.data.data() + size_t(u) * kVec;
    const float* in = init + size_t(u) * kVec;
    float* o = out + size_t(u) * kVec;
    switch (std::min(kVecsAtOnce, v1 - u)) {
      case 1: gemv_vectors<1>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 2: gemv_vectors<2>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 3: gemv_vectors<3>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 4: gemv_vectors<4>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 5: gemv_vectors<5>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 6: gemv_vectors<6>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      case 7: gemv_vectors<7>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
      default: gemv_vectors<8>(a, A.Mv, nseg, kseg, b, bseg, in, o); break;
    }
  }
}

// The products of a step (the controller's input layer, then its four output sections) are
// split by vectors of outputs over up to kSmallThreads threads, each computing whole output elements as one
// thread would (the same bits for any split); the update along the columns and every sum over
// them stay on one thread, between barriers.
constexpr int kSmallThreads = 4;

template <typename scalar_t>
void forward_small(const Params& P, int64_t n0, int R, const ForwardIO<scalar_t>& io, int threads) {
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  const Packed& pk = *P.pk;
  const long ld_state = 2L * dp + kVec, ld_h = long(Hp) + kVec, ld_z = 4L * dp + kVec;
  static thread_local Buffer state_buf, h_buf, ctx_buf, c_buf, z_buf;
  state_buf.resize(size_t(R) * ld_state);
  h_buf.resize(size_t(R) * (dp + kVec));
  ctx_buf.resize(size_t(R) * ld_h);
  c_buf.resize(size_t(R) * ld_h);
  z_buf.resize(size_t(R) * ld_z);
  state_buf.zero();
  h_buf.zero();
  // the calling thread's buffers, shared by the region's threads
  float *state = state_buf.data(), *h = h_buf.data(), *ctx = ctx_buf.data(), *c = c_buf.data(), *z = z_buf.data();
  for (int r = 0; r < R; ++r) {
    const int64_t row = n0 + r;
    float* x = state + r * ld_state;
    for (int j = 0; j < d; ++j) {
      h[r * (dp + kVec) + j] = to_float(io.h[row * d + j]);
      x[j] = to_float(io.x[row * d + j]);
      if (io.v) x[dp + j] = to_float(io.v[row * d + j]);
    }
  }
  // the context term, once: h·w_hᵀ + bias
  Buffer bias_rows(size_t(R) * ld_h);
  for (int r = 0; r < R; ++r) std::copy_n(P.bias_row.data(), Hp, bias_rows.data() + r * ld_h);
  pk.make_wide();
  for (int r = 0; r < R; ++r)
    gemv_wide(pk.wide_ctx, 1, d, h + r * (dp + kVec), 0, bias_rows.data() + r * ld_h, ctx + r * ld_h, 0,
              pk.wide_ctx.vectors());
  float err2[kSmallRows], energy[kSmallRows], distance[kSmallRows];
  bool running[kSmallRows];
  for (int r = 0; r < R; ++r) {
    running[r] = true;
    err2[r] = 0.f;
    const float* x = state + r * ld_state;
    for (int j = 0; j < d; ++j) {
      const float e = x[j] - P.mu[j];
      err2[r] += e * e;
    }
  }
  auto traj = [&](int r, int t) {
    if (!io.traj_x) return;
    const float* x = state + r * ld_state;
    const size_t off = (size_t(n0 + r) * (T + 1) + t) * d;
    for (int j = 0; j < d; ++j) {
      io.traj_x[off + j] = from_float<scalar_t>(x[j]);
      io.traj_v[off + j] = from_float<scalar_t>(x[dp + j]);
    }
  };
  for (int r = 0; r < R; ++r) traj(r, 0);
  const int in_vecs = pk.wide_in.vectors(), out_vecs = pk.wide_out[0].vectors();
  // the update of one row after its products: along the columns, its sums column after column
  auto update = [&](int r, int t) {
    float* x = state + r * ld_state;
    const float* zr = z + r * ld_z;
    Vec s_alpha = splat(1.f);
    if (P.has_kappa) {
      Vec rms;
      for (int l = 0; l < kVec; ++l) rms[l] = std::sqrt(err2[r] / float(d));
      s_alpha = 1.f - vexp(-P.kappa * rms);
    }
    float e_sum = 0.f, d_sum = 0.f, q_sum = 0.f, step = 0.f;
    const float* exc = P.table.data() + size_t(t) * dp;
    for (int j0 = 0; j0 < d; j0 += kVec) {
      const Vec alpha0 = vsigmoid_neg(load(zr + j0));
      Vec slope;
      const Vec beta = vsoftplus<false>(load(zr + dp + j0), &slope);
      const Vec gate = vsigmoid_neg(load(zr + 2 * dp + j0));
      const Vec v_cand = load(zr + 3 * dp + j0);
      const Vec alpha = P.has_kappa ? alpha0 * s_alpha : alpha0;
      const Vec xo = load(x + j0), vo = load(x + dp + j0), mu = load(P.mu.data() + j0);
      const Vec err = xo - mu;
      const Vec vn = v_cand + alpha * (vo - v_cand) - beta * err + load(exc + j0);
      const Vec xn = xo + (gate * P.dt) * vn;
      store(x + j0, xn);
      store(x + dp + j0, vn);
      const Vec en = xn - mu, dx = xn - xo;
      for (int l = 0; l < kVec && j0 + l < d; ++l) {  // column after column, as a block adds them
        step += dx[l] * dx[l];
        e_sum += vn[l] * vn[l];
        d_sum += std::fabs(en[l]);
        if (P.has_kappa) q_sum += en[l] * en[l];
      }
    }
    err2[r] = q_sum;
    energy[r] = e_sum / float(d);
    distance[r] = d_sum / float(d);
    const int64_t row = n0 + r;
    io.energy[row * T + t] = energy[r];
    io.distance[row * T + t] = distance[r];
    traj(r, t + 1);
    if (io.early_exit && t + 1 >= io.min_iterations && std::sqrt(step) < io.tol) {
      running[r] = false;
      io.iterations[row] = t + 1;
      for (int u = t + 1; u < T; ++u) {
        io.energy[row * T + u] = energy[r];
        io.distance[row * T + u] = distance[r];
        traj(r, u + 1);
      }
    }
  };
#pragma omp parallel num_threads(std::clamp(threads, 1, kSmallThreads))
  {
    const int tid = omp_thread_id(), nth = omp_threads();
    int in0, in1, out0, out1;
    share(in_vecs, tid, nth, in0, in1);
    share(4 * out_vecs, tid, nth, out0, out1);
    for (int t = 0; t < T; ++t) {
      // rows still running (every thread reads the same flags, written before the last barrier)
      int live[kSmallRows], L = 0;
      for (int r = 0; r < R; ++r)
        if (running[r]) live[L++] = r;
      if (L == 0) break;
      const int segments = (t == 0 && !P.has_v) ? 1 : 2;
      for (int i = 0; i < L; ++i) {  // c = relu(ctx + [x | v]·w_inᵀ): this thread's vectors
        const int r = live[i];
        float* cr = c + r * ld_h;
        gemv_wide(pk.wide_in, segments, d, state + r * ld_state, dp, ctx + r * ld_h, cr, in0, in1);
        for (int k = in0 * kVec; k < std::min(in1 * kVec, H); ++k) cr[k] = 0.f > cr[k] ? 0.f : cr[k];  // vmax(0, c): keeps NaN
      }
#pragma omp barrier
      for (int i = 0; i < L; ++i) {  // z = c·w_oᵀ per section: this thread's share of the 4 sections' vectors
        const int r = live[i];
        for (int sec = out0 / out_vecs; sec < 4 && sec * out_vecs < out1; ++sec) {
          const int first = std::max(out0 - sec * out_vecs, 0), last = std::min(out1 - sec * out_vecs, out_vecs);
          gemv_wide(pk.wide_out[sec], 1, H, c + r * ld_h, 0, P.z_off.data() + size_t(sec) * dp,
                    z + r * ld_z + size_t(sec) * dp, first, last);
        }
      }
#pragma omp barrier
      if (tid == 0)
        for (int i = 0; i < L; ++i) update(live[i], t);
#pragma omp barrier
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t row = n0 + r;
    if (running[r]) io.iterations[row] = T;
    const float* x = state + r * ld_state;
    for (int j = 0; j < d; ++j) {
      io.x_out[row * d + j] = from_float<scalar_t>(x[j]);
      io.v_out[row * d + j] = from_float<scalar_t>(x[dp + j]);
    }
  }
}

}  // namespace

void* iterate_pack(const IterateWeights& W) { return make_pack(W); }
void iterate_pack_free(void* pack) { delete static_cast<Packed*>(pack); }

int64_t iterate_hidden_floats(int64_t N, int T, int H) {
  return (N + NB - 1) / NB * T * round_up(H, NB) * NB;
}

void iterate_forward(const IterateForwardArgs& a) {
  Params P;
  init_params(P, a);
  const int64_t N = a.N;
  const int64_t blocks = (N + NB - 1) / NB;
  if (N <= kSmallRows && a.hidden == nullptr) {  // decode: row by row (see forward_small)
    dispatch(a.dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      ForwardIO<scalar_t> io{static_cast<const scalar_t*>(a.h), static_cast<const scalar_t*>(a.x),
                             static_cast<const scalar_t*>(a.v), static_cast<scalar_t*>(a.x_out),
                             static_cast<scalar_t*>(a.v_out), static_cast<scalar_t*>(a.traj_x),
                             static_cast<scalar_t*>(a.traj_v), a.iterations, a.energy, a.distance, a.early_exit,
                             a.tol, a.min_iterations};
      forward_small<scalar_t>(P, 0, int(N), io, a.threads);
    });
    return;
  }
  const bool grouped = a.early_exit && a.hidden == nullptr;
  const int G = grouped ? group_blocks(P, blocks, a.threads) : 1;
  const int64_t groups = (blocks + G - 1) / G;
  Errors errors;
  dispatch(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    ForwardIO<scalar_t> io{static_cast<const scalar_t*>(a.h), static_cast<const scalar_t*>(a.x),
                           static_cast<const scalar_t*>(a.v), static_cast<scalar_t*>(a.x_out),
                           static_cast<scalar_t*>(a.v_out), static_cast<scalar_t*>(a.traj_x),
                           static_cast<scalar_t*>(a.traj_v), a.iterations, a.energy, a.distance, a.early_exit, a.tol,
                           a.min_iterations};
    const int d = P.d;
#pragma omp parallel num_threads(threads_for(a.threads, groups))
    {
      static thread_local Scratch S;  // kept across calls: no allocation or page faults per call
      errors.guard([&] { S.init(P, G); });
      // groups (single blocks without early exit) are taken one at a time, so that a thread that
      // loses its core to another process leaves the rest to the others; each thread prefetches
      // the block one round ahead, its likely next one
      const int64_t stride = omp_threads();
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < (grouped ? 0 : groups); ++g)
        errors.guard([&] {
          const int64_t n0 = g * NB;
          const int R = int(std::min<int64_t>(NB, N - n0));
          S.reads.reset();
          S.writes.reset();
          if (g + stride < groups) {
            const int64_t m0 = (g + stride) * NB;
            const size_t bytes = size_t(std::min<int64_t>(NB, N - m0)) * d * sizeof(scalar_t);
            S.reads.add(io.h + m0 * d, bytes);
            S.reads.add(io.x + m0 * d, bytes);
            if (io.v) S.reads.add(io.v + m0 * d, bytes);
          }
          const size_t bytes = size_t(R) * d * sizeof(scalar_t);
          S.writes.add(io.x_out + n0 * d, bytes);
          S.writes.add(io.v_out + n0 * d, bytes);
          float* hid = a.hidden ? a.hidden + size_t(g) * P.T * P.Hp * NB : nullptr;
          forward_group<scalar_t, false>(P, S, n0, R, io, nullptr, hid, false);
        });
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < (grouped ? groups : 0); ++g)
        errors.guard([&] {
          const int64_t n0 = g * G * NB;
          S.reads.reset();
          S.writes.reset();
          forward_group<scalar_t, false>(P, S, n0, std::min<int64_t>(int64_t(G) * NB, N - n0), io, nullptr, nullptr,
                                         false);
        });
    }
  });
  errors.rethrow();
}

namespace {

// One tile's share of the parameter gradients; tiles are added in order at the end. The output
// layer's share is kept per pre-activation z = ms·(c·w_oᵀ + b_o) + mb: gzᵀc and Σ_rows gz, from
// which the gradients of w_o, b_o, mod_scale and mod_bias all follow.
struct Partial {
  Buffer gz_c;   // [4dp][Hp]  Σ gzᵀc
  Buffer gz;     // [4dp]      Σ_rows gz
  Buffer w_in;   // [2dp][Hp]  [w_x | w_v] transposed
  Buffer w_ctx;  // [dp][Hp]   w_h transposed
  Buffer mu;     // [dp]
  Buffer table;  // [T][dp]
  Buffer bias;   // [Hp]
  void init(const Params& P) {
    gz_c.resize(size_t(4) * P.dp * P.Hp);
    gz.resize(size_t(4) * P.dp);
    w_in.resize(size_t(2) * P.dp * P.Hp);
    w_ctx.resize(size_t(P.dp) * P.Hp);
    mu.resize(P.dp);
    table.resize(size_t(P.T) * P.dp);
    bias.resize(P.Hp);
    // gz_c, w_in and w_ctx are written by the tile's first block (no zeroing pass over them)
    for (Buffer* b : {&gz, &mu, &table, &bias}) b->zero();
  }
};

// Per-thread working memory of the backward.
struct BackwardScratch {
  Buffer gstate;     // [2dp][NB]     gradient of [x | v]
  Buffer gctx;       // [Hp][NB]
  Buffer gc;         // [Hp][NB]
  Buffer gz;         // [T][4dp][NB]  gradient of the output pre-activations (padding stays zero)
  Buffer gpre;       // [T][NB][Hp]   row-major, for the parameter gradients
  Buffer c_rows;     // [T][NB][Hp]   row-major c
  Buffer gctx_rows;  // [NB][Hp]
  Buffer gh;         // [dp][NB]
  // sums over the tile's rows kept per lane, reduced across lanes when the tile ends
  Buffer lanes;       // [dp][5][kVec]  the four output sections' gz, then mu's gradient
  Buffer lane_table;  // [T][dp][kVec]  (excited columns only)
  void init(const Params& P) {
    const int dp = P.dp, Hp = P.Hp, T = P.T;
    gstate.resize(size_t(2) * dp * NB);
    gctx.resize(size_t(Hp) * NB);
    gc.resize(size_t(Hp) * NB);
    gc.zero();
    gz.resize(size_t(T) * 4 * dp * NB);
    gz.zero();
    gpre.resize(size_t(T) * NB * Hp);
    c_rows.resize(size_t(T) * NB * Hp);
    gctx_rows.resize(size_t(NB) * Hp);
    gh.resize(size_t(dp) * NB);
    lanes.resize(size_t(dp) * kLaneSums * kVec);
    lane_table.resize(size_t(T) * dp * kVec);
  }
  void start_tile() {
    lanes.zero();
    lane_table.zero();
  }
  void end_tile(Partial& part, int dp) {
    for (int j = 0; j < dp; ++j) {
      const float* lane = lanes.data() + size_t(j) * kLaneSums * kVec;
      for (int sec = 0; sec < 4; ++sec) part.gz[size_t(sec) * dp + j] = float(hsum(load(lane + sec * kVec)));
      part.mu[j] = float(hsum(load(lane + 4 * kVec)));
    }
    for (size_t i = 0; i < part.table.size(); ++i) part.table[i] = float(hsum(load(lane_table.data() + i * kVec)));
  }
};

template <typename scalar_t>
struct BackwardIO {
  const scalar_t *gx_T, *gv_T;         // [N][d]
  const float *g_energy, *g_distance;  // [N][T]
  float *gh, *gx, *gv;                 // [N][d]
};

inline void accumulate(float* p, Vec v) { store(p, load(p) + v); }

template <typename scalar_t>
void backward_block(const Params& P, Scratch& S, Stash& st, BackwardScratch& B, Partial& part, bool first, int64_t n0,
                    int R, const BackwardIO<scalar_t>& io) {
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  const Packed& pk = *P.pk;
  float* gs = B.gstate.data();
  B.gstate.zero();
  B.gctx.zero();
  const int64_t* rows = S.rows.data();
  load_block(io.gx_T, rows, R, d, gs);
  load_block(io.gv_T, rows, R, d, gs + dp * NB);
  const float dt = P.dt;

  for (int t = T - 1; t >= 0; --t) {
    const float* s0 = st.x(t);
    const float* s1 = st.x(t + 1);
    float* gz = B.gz.data() + size_t(t) * 4 * dp * NB;
    float* lane_table = B.lane_table.data() + size_t(t) * dp * kVec;
    Vec ge[2] = {}, gd[2] = {}, s_row[2], gsum[2] = {};
    for (int r = 0; r < R; ++r) {
      ge[r / kVec][r % kVec] = io.g_energy[(n0 + r) * T + t] * 2.f / float(d);
      gd[r / kVec][r % kVec] = io.g_distance[(n0 + r) * T + t] / float(d);
    }
    for (int q = 0; q < 2; ++q) s_row[q] = load(st.srow.data() + t * NB + q * kVec);
    const float *a_alpha0 = st.a(t, 0), *a_beta = st.a(t, 1), *a_slope = st.a(t, 2), *a_gate = st.a(t, 3),
                *a_vcand = st.a(t, 4);
    const size_t v_at = size_t(dp) * NB;
    float *gz_a = gz, *gz_b = gz + v_at, *gz_g = gz + 2 * v_at, *gz_u = gz + 3 * v_at;
    float* lanes = B.lanes.data();
    const Rows s_rows{{s_row[0], s_row[1]}}, ge_rows{{ge[0], ge[1]}}, gd_rows{{gd[0], gd[1]}};
    for (int j = 0; j < d; ++j) {
      const float mu = P.mu[j];
      const size_t at = size_t(j) * NB;
      const Rows alpha0 = load_rows(a_alpha0 + at), beta = load_rows(a_beta + at), slope = load_rows(a_slope + at);
      const Rows gate = load_rows(a_gate + at), v_cand = load_rows(a_vcand + at);
      const Rows xo = load_rows(s0 + at), vo = load_rows(s0 + v_at + at);
      const Rows xn = load_rows(s1 + at), vn = load_rows(s1 + v_at + at);
      const Rows en = xn - mu;
      const Rows sign = each([](Vec e) { return select(e > 0.f, splat(1.f), select(e < 0.f, splat(-1.f), Vec{})); }, en);
      const Rows gdist = gd_rows * sign;
      const Rows gxn = load_rows(gs + at) + gdist;
      const Rows gvt = load_rows(gs + v_at + at) + ge_rows * vn + gxn * (dt * gate);
      const Rows alpha = alpha0 * s_rows;
      const Rows galpha = gvt * (vo - v_cand);
      const Rows gv_prev = gvt * alpha;
      const Rows gerr = -gvt * beta;
      if (P.has_kappa)
        for (int q = 0; q < 2; ++q) gsum[q] += galpha.v[q] * alpha0.v[q];
      const Rows gza = galpha * s_rows * alpha0 * (1.f - alpha0);
      const Rows gzb = -gvt * (xo - mu) * slope;
      const Rows gzg = (gxn * dt * vn) * gate * (1.f - gate);
      const Rows gzu = gvt - gv_prev;  // gv_cand = (1 - alpha)·gv~
      store_rows(gz_a + at, gza);
      store_rows(gz_b + at, gzb);
      store_rows(gz_g + at, gzg);
      store_rows(gz_u + at, gzu);
      store_rows(gs + at, gxn + gerr);
      store_rows(gs + v_at + at, gv_prev);
      // per-lane sums over the tile's rows: one run of 5 vectors per column
      float* lane = lanes + size_t(j) * kLaneSums * kVec;
      accumulate(lane, gza.v[0] + gza.v[1]);
      accumulate(lane + kVec, gzb.v[0] + gzb.v[1]);
      accumulate(lane + 2 * kVec, gzg.v[0] + gzg.v[1]);
      accumulate(lane + 3 * kVec, gzu.v[0] + gzu.v[1]);
      accumulate(lane + 4 * kVec, -(gdist.v[0] + gerr.v[0]) - (gdist.v[1] + gerr.v[1]));
      if (P.table_column[j]) accumulate(lane_table + size_t(j) * kVec, gvt.v[0] + gvt.v[1]);
    }
    // s = 1 - exp(-kappa·rms): d s / d err_j = kappa·exp(-kappa·rms)·err_j / (d·rms)
    if (P.has_kappa) {
      Vec coef[2];
      for (int q = 0; q < 2; ++q) {
        Vec rms = load(st.rms.data() + t * NB + q * kVec), e = load(st.erow.data() + t * NB + q * kVec);
        Vec safe = select(rms > 0.f, rms, splat(1.f));
        coef[q] = select(rms > 0.f, gsum[q] * P.kappa * e / (float(d) * safe), Vec{});
      }
      for (int j = 0; j < d; ++j) {
        Vec col_mu{};
        for (int q = 0; q < 2; ++q) {
          const size_t at = size_t(j) * NB + q * kVec;
          Vec add = coef[q] * (load(s0 + at) - P.mu[j]);
          accumulate(gs + at, add);
          col_mu -= add;
        }
        accumulate(B.lanes.data() + (size_t(j) * kLaneSums + 4) * kVec, col_mu);
      }
    }
    // controller output layer: gc = Σ_sections gz·ms·w_o (w_out_t holds ms·w_o), then the relu
    gemm_panels<false>(pk.w_out_t, NB, 4, d, gz, NB, long(dp) * NB, nullptr, 0, B.gc.data(), NB);
    const float* c = st.hidden_at[t];
    float* gpre = B.gc.data();  // in place: gc becomes gpre
    for (int i = 0; i < Hp * NB; i += kVec) {
      Vec gp = select(load(c + i) > 0.f, load(gpre + i), Vec{});
      store(gpre + i, gp);
      accumulate(B.gctx.data() + i, gp);
    }
    transpose_block(gpre, Hp, Hp, B.gpre.data() + size_t(t) * NB * Hp);
    transpose_block(c, Hp, Hp, B.c_rows.data() + size_t(t) * NB * Hp);
    // controller input layer: [gx | gv] += [w_x | w_v]ᵀ·gpre
    gemm_panels<true>(pk.w_x_t, NB, 1, H, gpre, NB, 0, gs, NB, gs, NB);
    gemm_panels<true>(pk.w_v_t, NB, 1, H, gpre, NB, 0, gs + dp * NB, NB, gs + dp * NB, NB);
  }
  // context: gh = gctx·w_h
  gemm_panels<false>(pk.w_h_t, NB, 1, H, B.gctx.data(), NB, 0, nullptr, 0, B.gh.data(), NB);
  store_block(B.gh.data(), rows, R, d, io.gh);
  store_block(gs, rows, R, d, io.gx);
  store_block(gs + dp * NB, rows, R, d, io.gv);
  // this block's share of the parameter gradients, each summed over rows and steps in one product
  // (lanes ≥ R carry zero gradients, so the padding rows add nothing); the tile's first block
  // writes the tile's sums, the others add to them
  auto product = [&](int M, int nseg, const float* A, long aseg, const float* Bm, long bseg, float* dst) {
    if (first)
      gemm_rows<false>(M, Hp, nseg, A, aseg, Bm, Hp, bseg, nullptr, 0, dst, Hp);
    else
      gemm_rows<true>(M, Hp, nseg, A, aseg, Bm, Hp, bseg, dst, Hp, dst, Hp);
  };
  for (int sec = 0; sec < 4; ++sec)
    product(d, T, B.gz.data() + size_t(sec) * dp * NB, long(4) * dp * NB, B.c_rows.data(), long(NB) * Hp,
            part.gz_c.data() + size_t(sec) * dp * Hp);
  for (int half = 0; half < 2; ++half)
    product(d, T, st.state.data() + size_t(half) * dp * NB, long(2) * dp * NB, B.gpre.data(), long(NB) * Hp,
            part.w_in.data() + size_t(half) * dp * Hp);
  transpose_block(B.gctx.data(), Hp, Hp, B.gctx_rows.data());
  product(d, 1, S.h.data(), 0, B.gctx_rows.data(), 0, part.w_ctx.data());
  for (int k = 0; k < H; ++k)
    part.bias[k] += float(hsum(load(B.gctx.data() + k * NB)) + hsum(load(B.gctx.data() + k * NB + kVec)));
}

// out[i] = Σ_tile parts[tile][i], tiles in order.
void reduce_partials(std::vector<Partial>& parts, Buffer Partial::*field, Buffer& out, int threads) {
  const int64_t n = int64_t(out.size());
#pragma omp parallel for num_threads(threads_for(threads, n / 4096 + 1)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (auto& p : parts) s += (p.*field)[i];
    out[i] = s;
  }
}

}  // namespace

void iterate_backward(const IterateBackwardArgs& a) {
  Params P;
  init_params(P, a);
  const int64_t N = a.N;
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  // fixed tiles of blocks, whatever the thread count: at most 16, and fewer when their partial
  // sums (~7·d·H floats each) would pass 128 MiB
  const int64_t blocks = (N + NB - 1) / NB;
  const int64_t tile_bytes = int64_t(7) * dp * Hp * sizeof(float);
  const int64_t max_tiles = std::clamp<int64_t>((int64_t(128) << 20) / tile_bytes, 1, 16);
  const int64_t tile_blocks = std::max<int64_t>(1, (blocks + max_tiles - 1) / max_tiles);
  const int64_t tiles = (blocks + tile_blocks - 1) / tile_blocks;
  std::vector<Partial> parts(tiles);
  Errors errors;

  dispatch(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    ForwardIO<scalar_t> fio{static_cast<const scalar_t*>(a.h),
                            static_cast<const scalar_t*>(a.x),
                            static_cast<const scalar_t*>(a.v),
                            nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, false, 0.f, 0};
    BackwardIO<scalar_t> io{static_cast<const scalar_t*>(a.grad_x), static_cast<const scalar_t*>(a.grad_v),
                            a.grad_energy, a.grad_distance, a.gh, a.gx, a.gv};
#pragma omp parallel num_threads(threads_for(a.threads, tiles))
    {
      static thread_local Scratch S;
      static thread_local Stash st;
      static thread_local BackwardScratch B;
      errors.guard([&] {
        S.init(P, 1);
        st.init(T, dp, Hp);
        B.init(P);
      });
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < tiles; ++tile)
        errors.guard([&] {
          parts[tile].init(P);
          B.start_tile();
          const int64_t tile_end = std::min(blocks, (tile + 1) * tile_blocks);
          for (int64_t b = tile * tile_blocks; b < tile_end; ++b) {
            const int64_t n0 = b * NB;
            const int R = int(std::min<int64_t>(NB, N - n0));
            const size_t bytes = size_t(R) * d * sizeof(scalar_t);
            S.reads.reset();
            S.writes.reset();
            S.reads.add(io.gx_T + n0 * d, bytes);
            S.reads.add(io.gv_T + n0 * d, bytes);
            if (b + 1 < tile_end) {
              const int64_t m0 = n0 + NB;
              const size_t next = size_t(std::min<int64_t>(NB, N - m0)) * d * sizeof(scalar_t);
              S.reads.add(fio.h + m0 * d, next);
              S.reads.add(fio.x + m0 * d, next);
              if (fio.v) S.reads.add(fio.v + m0 * d, next);
            }
            S.writes.add(io.gh + n0 * d, size_t(R) * d * sizeof(float));
            S.writes.add(io.gx + n0 * d, size_t(R) * d * sizeof(float));
            S.writes.add(io.gv + n0 * d, size_t(R) * d * sizeof(float));
            float* hid = a.hidden ? const_cast<float*>(a.hidden) + size_t(b) * T * Hp * NB : nullptr;
            forward_group<scalar_t, true>(P, S, n0, R, fio, &st, hid, hid != nullptr);
            backward_block<scalar_t>(P, S, st, B, parts[tile], b == tile * tile_blocks, n0, R, io);
          }
          B.end_tile(parts[tile], dp);
        });
    }
  });
  errors.rethrow();

  Buffer sum_gz_c(size_t(4) * dp * Hp), sum_gz(size_t(4) * dp), sum_w_in(size_t(2) * dp * Hp);
  Buffer sum_w_ctx(size_t(dp) * Hp), sum_mu(dp), sum_table(size_t(T) * dp), sum_bias(Hp);
  reduce_partials(parts, &Partial::gz_c, sum_gz_c, a.threads);
  reduce_partials(parts, &Partial::gz, sum_gz, a.threads);
  reduce_partials(parts, &Partial::w_in, sum_w_in, a.threads);
  reduce_partials(parts, &Partial::w_ctx, sum_w_ctx, a.threads);
  reduce_partials(parts, &Partial::mu, sum_mu, a.threads);
  reduce_partials(parts, &Partial::table, sum_table, a.threads);
  reduce_partials(parts, &Partial::bias, sum_bias, a.threads);

  for (int k = 0; k < H; ++k)
    for (int j = 0; j < d; ++j) {
      a.gw_h[size_t(k) * d + j] = sum_w_ctx[size_t(j) * Hp + k];
      a.gw_x[size_t(k) * d + j] = sum_w_in[size_t(j) * Hp + k];
      a.gw_v[size_t(k) * d + j] = sum_w_in[size_t(dp + j) * Hp + k];
    }
  // z_s = ms_s·(c·w_oᵀ + b_o)_s + mb_s:  gw_o = ms·gzᵀc,  gb_o = ms·Σgz,  gmb = ΣΣgz,
  // gms = Σ gz·(c·w_oᵀ + b_o) = <w_o, gzᵀc> + <b_o, Σgz>  (w_o read back from the packed ms·w_o
  // would round; the caller's w_o is what the gradient is taken at)
  const float* wo = a.w_o;
  for (int sec = 0; sec < 4; ++sec) {
    const float ms = P.ms[sec];
    double g_scale = 0, g_shift = 0;
    for (int j = 0; j < d; ++j) {
      const size_t src = size_t(sec) * dp + j, dst = size_t(sec) * d + j;
      const float* gzc = sum_gz_c.data() + src * Hp;
      for (int k = 0; k < H; ++k) {
        a.gw_o[dst * H + k] = ms * gzc[k];
        g_scale += double(wo[dst * H + k]) * gzc[k];
      }
      a.gb_o[dst] = ms * sum_gz[src];
      g_scale += double(a.b_o[dst]) * sum_gz[src];
      g_shift += sum_gz[src];
    }
    a.gmod[sec] = float(g_scale);
    a.gmod[4 + sec] = float(g_shift);
  }
  std::copy_n(sum_bias.data(), H, a.gbias);
  std::copy_n(sum_mu.data(), d, a.gmu);
  if (a.gtable)
    for (int t = 0; t < T; ++t) std::copy_n(sum_table.data() + size_t(t) * dp, d, a.gtable + size_t(t) * d);
}

}  // namespace INL_ISA
}  // namespace inl
