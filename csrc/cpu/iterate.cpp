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
// Layout: a thread takes a block of kBlockRows rows through all T steps with the block's state
// stored transposed, [column][row], so that one vector holds one column of kVec rows: the
// element-wise update, the per-row statistics and the early exit are all lane-wise, and the
// controller matmuls run as (weightsᵀ)·(stateᵀ) through the micro-kernel of simd.h with no
// repacking between steps. Backward recomputes a block's forward keeping only that block's
// per-step states and activations, then runs its steps in reverse. Parameter gradients go to
// per-tile partial sums (a tile is a fixed run of blocks, whatever the thread count) added in
// tile order, so every result is the same bits for any number of threads.
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace inl {
namespace {

constexpr int NB = kColBlock;  // rows per block: the lanes of two vectors
constexpr int MR = kRowBlock;

// sign of each controller section's output as the forward's micro-kernel gives it: -z for alpha
// and gate, z for beta and v_cand
constexpr float kSectionSign[4] = {-1.f, 1.f, -1.f, 1.f};

// The controller and the dynamics' constants, packed for the micro-kernel.
struct Params {
  int d, H, T, dp, Hp;
  Panels w_ctx;       // A(k, j) = w_h[k][j]                              (M = H, K = d)
  Panels w_in;        // A(k, j) = w_x[k][j], A(k, d + j) = w_v[k][j]     (M = H, K = 2d)
  Panels w_out[4];    // A(j, k) = sg_s·ms_s·w_o[s·d + j][k] for section s   (M = d, K = H)
  Panels w_out_t;     // A(k, s·d + j) = ms_s·w_o[s·d + j][k]             (M = H, K = 4d, backward)
  Panels w_x_t, w_v_t, w_h_t;  // A(j, k) = w[k][j]                       (M = d, K = H, backward)
  Buffer bias;        // [Hp][NB]  the summed input bias, repeated across the lanes
  Buffer z_off;       // [4][dp]   sg_s·(ms_s·b_o + mb_s): each section's offset per column
  Buffer mu;          // [dp]
  Buffer table;       // [T][dp]     zeros without excited dims
  float ms[4], mb[4];
  float dt, kappa;
  bool has_kappa, has_v;
};

void pack_params(Params& P, const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                 const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o, const at::Tensor& mod,
                 const at::Tensor& mu, const at::Tensor* table, bool backward) {
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  const float *wh = w_h.data_ptr<float>(), *wx = w_x.data_ptr<float>(), *wv = w_v.data_ptr<float>();
  const float *wo = w_o.data_ptr<float>(), *bo = b_o.data_ptr<float>();
  for (int i = 0; i < 4; ++i) {
    P.ms[i] = mod.data_ptr<float>()[i];
    P.mb[i] = mod.data_ptr<float>()[4 + i];
  }
  P.w_ctx.pack(H, d, [&](int k, int j) { return wh[size_t(k) * d + j]; });
  P.w_in.pack(H, 2 * d, [&](int k, int j) { return j < d ? wx[size_t(k) * d + j] : wv[size_t(k) * d + j - d]; });
  // the output layer gives each section's argument directly, z_s = ms_s·(c·w_oᵀ + b_o)_s + mb_s,
  // negated (sg_s = -1) for the two sigmoids, which take e^-z: four fewer operations per element
  for (int s = 0; s < 4; ++s) {
    const float scale = kSectionSign[s] * P.ms[s];
    P.w_out[s].pack(d, H, [&](int j, int k) { return scale * wo[(size_t(s) * d + j) * H + k]; });
  }
  P.bias.resize(size_t(Hp) * NB);
  P.bias.zero();
  for (int k = 0; k < H; ++k) std::fill_n(P.bias.data() + size_t(k) * NB, NB, bias.data_ptr<float>()[k]);
  P.z_off.resize(size_t(4) * dp);
  P.z_off.zero();
  for (int s = 0; s < 4; ++s)
    for (int j = 0; j < d; ++j) P.z_off[size_t(s) * dp + j] = kSectionSign[s] * (P.ms[s] * bo[size_t(s) * d + j] + P.mb[s]);
  P.mu.resize(dp);
  P.mu.zero();
  std::copy_n(mu.data_ptr<float>(), d, P.mu.data());
  P.table.resize(size_t(T) * dp);
  P.table.zero();
  if (table)
    for (int t = 0; t < T; ++t)
      std::copy_n(table->data_ptr<float>() + size_t(t) * d, d, P.table.data() + size_t(t) * dp);
  if (!backward) return;
  P.w_out_t.pack(H, 4 * d, [&](int k, int sj) { return P.ms[sj / d] * wo[size_t(sj) * H + k]; });
  P.w_x_t.pack(d, H, [&](int j, int k) { return wx[size_t(k) * d + j]; });
  P.w_v_t.pack(d, H, [&](int j, int k) { return wv[size_t(k) * d + j]; });
  P.w_h_t.pack(d, H, [&](int j, int k) { return wh[size_t(k) * d + j]; });
}

// rows [n0, n0 + R) of a row-major [N][d] tensor into columns [j][lane] of a block (and back),
// 16 columns at a time so that both sides stay in cache lines; fp32 with AVX-512 goes through
// 16×16 register transposes.
constexpr int kTransposeCols = 16;
template <typename scalar_t>
inline void load_block(const scalar_t* src, int64_t n0, int R, int d, float* dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && NB % 16 == 0) {
    for (int j0 = 0; j0 < d; j0 += 16) {
      const int cols = std::min(16, d - j0);
      const __mmask16 mask = __mmask16((1u << cols) - 1);
      for (int r0 = 0; r0 < NB; r0 += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i)
          v[i] = r0 + i < R ? _mm512_maskz_loadu_ps(mask, src + (n0 + r0 + i) * d + j0) : _mm512_setzero_ps();
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
      const scalar_t* row = src + (n0 + r) * d + j0;
      for (int jj = 0; jj < cols; ++jj) dst[(j0 + jj) * NB + r] = static_cast<float>(row[jj]);
    }
  }
}
template <typename scalar_t>
inline void store_block(const float* src, int64_t n0, int R, int d, scalar_t* dst, int64_t row_stride) {
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
        for (int i = 0; i < 16 && r0 + i < R; ++i) _mm512_mask_storeu_ps(dst + (n0 + r0 + i) * row_stride + j0, mask, v[i]);
      }
    }
    return;
  }
#endif
  for (int j0 = 0; j0 < d; j0 += kTransposeCols) {
    const int cols = std::min(kTransposeCols, d - j0);
    for (int r = 0; r < R; ++r) {
      scalar_t* row = dst + (n0 + r) * row_stride + j0;
      for (int jj = 0; jj < cols; ++jj) row[jj] = static_cast<scalar_t>(src[(j0 + jj) * NB + r]);
    }
  }
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
struct Stash {
  int dp = 0, Hp = 0;
  Buffer state;   // [T+1][2dp][NB]  [x | v] before each step, then the final one
  Buffer hidden;  // [T][Hp][NB]     c
  Buffer act;     // [T][5][dp][NB]  alpha0, beta, sigmoid(zb), gate, v_cand
  Buffer srow;    // [T][NB]         dynamic-alpha factor s
  Buffer erow;    // [T][NB]         exp(-kappa·rms)
  Buffer rms;     // [T][NB]
  void init(int T, int dp_, int Hp_) {
    dp = dp_, Hp = Hp_;
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

// Per-thread working memory of the forward.
struct Scratch {
  Buffer state, h, ctx, c, out;
  Prefetcher reads, writes;  // set by the caller of forward_block
  void init(const Params& P) {
    state.resize(size_t(2) * P.dp * NB);  // [x | v] as [2dp][NB]
    h.resize(size_t(P.dp) * NB);
    ctx.resize(size_t(P.Hp) * NB);
    c.resize(size_t(P.Hp) * NB);
    out.resize(size_t(4) * MR * NB);  // one micro-kernel's columns of a, b, g, u
    ctx.zero();  // rows H..Hp stay zero
    c.zero();
  }
};

struct ForwardOut {
  void *x, *v, *traj_x, *traj_v;  // scalar_t
  int32_t* iterations;
  float *energy, *distance;
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

// Column j of one step for the block's rows, updating the state in place.
template <bool STASH, bool EARLY, bool KAPPA>
__attribute__((always_inline)) inline void update_column(const Params& P, int t, int j, const float* o, float* xcol,
                                                         float* vcol, const Vec* s_row, const VecI* active,
                                                         RowSums& sums, Stash* stash) {
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
  if (EARLY)  // a converged row keeps its state
    for (int q = 0; q < 2; ++q) {
      vn.v[q] = select(active[q], vn.v[q], vo.v[q]);
      xn.v[q] = select(active[q], xn.v[q], xo.v[q]);
      Vec dx = xn.v[q] - xo.v[q];
      sums.step[q] += dx * dx;
    }
  store_rows(xcol, xn);
  store_rows(vcol, vn);
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

// Columns [j0, j0 + cols) of one step, from the controller outputs of those columns in `o`.
template <bool STASH, bool EARLY, bool KAPPA>
void update_panel(const Params& P, int t, int j0, int cols, const float* o, float* state, const Vec* s_row,
                  const VecI* active, RowSums& sums_io, Stash* stash) {
  RowSums sums = sums_io;  // a local copy stays in registers
  for (int jj = 0; jj < cols; ++jj) {
    const int j = j0 + jj;
    update_column<STASH, EARLY, KAPPA>(P, t, j, o + jj * NB, state + j * NB, state + (P.dp + j) * NB, s_row, active,
                                       sums, stash);
  }
  sums_io = sums;
}

using PanelFn = void (*)(const Params&, int, int, int, const float*, float*, const Vec*, const VecI*, RowSums&, Stash*);
template <bool STASH>
PanelFn panel_for(bool early_exit, bool kappa) {
  static const PanelFn table[2][2] = {{&update_panel<STASH, false, false>, &update_panel<STASH, false, true>},
                                      {&update_panel<STASH, true, false>, &update_panel<STASH, true, true>}};
  return table[early_exit][kappa];
}

// Runs rows [n0, n0 + R) through all T steps. STASH keeps what the backward needs (and never
// exits early); otherwise the outputs are written. `hidden` ([T][Hp][NB], or null) receives the
// controller's hidden activations c of each step, or, with `reuse_hidden`, supplies them: the
// backward's recompute then skips the controller's input layer.
template <typename scalar_t, bool STASH>
void forward_block(const Params& P, Scratch& S, int64_t n0, int R, const scalar_t* h, const scalar_t* x,
                   const scalar_t* v, bool early_exit, float tol, int min_iterations, const ForwardOut* out,
                   Stash* stash, float* hidden, bool reuse_hidden) {
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  float* state = S.state.data();
  S.state.zero();
  S.h.zero();
  load_block(h, n0, R, d, S.h.data());
  load_block(x, n0, R, d, state);
  if (v) load_block(v, n0, R, d, state + dp * NB);
  // the context term h·w_hᵀ + bias is the same every step
  if (!reuse_hidden)
    gemm_panels<true>(P.w_ctx, NB, 1, d, S.h.data(), NB, 0, P.bias.data(), NB, S.ctx.data(), NB);

  const VecI lane = lane_index();
  VecI active[2] = {lane < R, (lane + kVec) < R};
  Vec err2[2] = {Vec{}, Vec{}};
  for (int j = 0; j < d; ++j)
    for (int q = 0; q < 2; ++q) {
      Vec e = load(state + j * NB + q * kVec) - P.mu[j];
      err2[q] += e * e;
    }
  int32_t iterations[NB];
  std::fill_n(iterations, NB, T);
  float energy[NB], distance[NB];
  auto traj = [&](int t) {
    if (STASH || !out->traj_x) return;
    for (int r = 0; r < R; ++r) {
      const size_t off = (size_t(n0 + r) * (T + 1) + t) * d;
      scalar_t* tx = static_cast<scalar_t*>(out->traj_x) + off;
      scalar_t* tv = static_cast<scalar_t*>(out->traj_v) + off;
      for (int j = 0; j < d; ++j) {
        tx[j] = static_cast<scalar_t>(state[j * NB + r]);
        tv[j] = static_cast<scalar_t>(state[(dp + j) * NB + r]);
      }
    }
  };
  traj(0);

  const int panels = (d + MR - 1) / MR;
  const size_t reads_per_panel = (S.reads.lines() + size_t(T) * panels - 1) / (size_t(T) * panels);
  const size_t writes_per_panel = (S.writes.lines() + size_t(T) * panels - 1) / (size_t(T) * panels);
  int t = 0;
  for (; t < T; ++t) {
    if (early_exit && !any(active[0]) && !any(active[1])) break;
    if (STASH) std::copy_n(state, size_t(2) * dp * NB, stash->x(t));
    // controller input layer: c = relu(ctx + [x | v]·[w_x | w_v]ᵀ); the v half is zero at t = 0 without v
    if (reuse_hidden) {
      std::copy_n(hidden + size_t(t) * Hp * NB, size_t(Hp) * NB, S.c.data());
    } else {
      const int segments = (t == 0 && !P.has_v) ? 1 : 2;
      gemm_panels<true>(P.w_in, NB, segments, d, state, NB, long(dp) * NB, S.ctx.data(), NB, S.c.data(), NB);
      for (int i = 0; i < H * NB; i += kVec) store(S.c.data() + i, vmax(splat(0.f), load(S.c.data() + i)));
      if (hidden) std::copy_n(S.c.data(), size_t(Hp) * NB, hidden + size_t(t) * Hp * NB);
    }
    if (STASH) std::copy_n(S.c.data(), size_t(Hp) * NB, stash->c(t));
    Vec s_row[2] = {splat(1.f), splat(1.f)};
    if (P.has_kappa)
      for (int q = 0; q < 2; ++q) {
        Vec rms;
        for (int i = 0; i < kVec; ++i) rms[i] = std::sqrt(err2[q][i] / float(d));
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
      const int cols = P.w_out[0].rows(p);
      MicroFn micro = micro_for_rows<kRowBias, 1>(cols);
      for (int s = 0; s < 4; ++s)
        micro(1, H, P.w_out[s].panel(p), MR, 0, S.c.data(), NB, 0, P.z_off.data() + s * dp + j0, 1,
              S.out.data() + s * MR * NB, NB);
      S.reads.issue<false>(reads_per_panel);
      S.writes.issue<true>(writes_per_panel);
      update(P, t, j0, cols, S.out.data(), state, s_row, active, sums, stash);
    }
    for (int q = 0; q < 2; ++q) {
      err2[q] = sums.err2[q];
      Vec e = sums.energy[q] / float(d), dist = sums.dist[q] / float(d);
      for (int i = 0; i < kVec; ++i) {
        energy[q * kVec + i] = e[i];
        distance[q * kVec + i] = dist[i];
      }
      if (early_exit && t + 1 >= min_iterations) {
        Vec norm;
        for (int i = 0; i < kVec; ++i) norm[i] = std::sqrt(sums.step[q][i]);
        VecI converged = active[q] & (norm < tol);
        for (int i = 0; i < kVec; ++i)
          if (converged[i]) iterations[q * kVec + i] = t + 1;
        active[q] &= ~converged;
      }
    }
    if (!STASH)
      for (int r = 0; r < R; ++r) {
        out->energy[(n0 + r) * T + t] = energy[r];
        out->distance[(n0 + r) * T + t] = distance[r];
      }
    traj(t + 1);
  }
  if (STASH) {
    std::copy_n(state, size_t(2) * dp * NB, stash->x(T));
    return;
  }
  for (; t < T; ++t) {  // every row of the block converged: the remaining steps repeat its state
    for (int r = 0; r < R; ++r) {
      out->energy[(n0 + r) * T + t] = energy[r];
      out->distance[(n0 + r) * T + t] = distance[r];
    }
    traj(t + 1);
  }
  std::copy_n(iterations, R, out->iterations + n0);
  store_block(state, n0, R, d, static_cast<scalar_t*>(out->x), d);
  store_block(state + dp * NB, n0, R, d, static_cast<scalar_t*>(out->v), d);
}

void check_inputs(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                  std::initializer_list<std::pair<const char*, const at::Tensor*>> fp32) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2 && h.is_contiguous(), "h must be a contiguous [N, d] CPU tensor");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf,
              "the cpu iterate runs float32, bfloat16 and float16 inputs, got ", h.scalar_type());
  TORCH_CHECK(x.sizes() == h.sizes() && x.scalar_type() == h.scalar_type() && x.is_contiguous() && x.device().is_cpu(),
              "x must match h");
  if (v)
    TORCH_CHECK(v->sizes() == h.sizes() && v->scalar_type() == h.scalar_type() && v->is_contiguous() &&
                    v->device().is_cpu(),
                "v must match h");
  for (auto& [name, t] : fp32)  // null: an absent optional input
    TORCH_CHECK(!t || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu()), name,
                " must be a contiguous float32 CPU tensor");
}

void init_params(Params& P, const at::Tensor& h, const at::Tensor& w_h, const at::Tensor& w_o, const at::Tensor* table,
                 const at::Tensor& mod, const c10::optional<at::Tensor>& v, double dt, c10::optional<double> kappa,
                 int64_t num_iterations) {
  // the launchers divide by d, H and T (means over columns, work per step): zero is no size
  TORCH_CHECK(h.size(1) >= 1 && w_h.dim() == 2 && w_h.size(0) >= 1 && num_iterations >= 1,
              "iterate: d, H and num_iterations must be at least 1, got d = ", h.size(1), ", H = ", w_h.size(0),
              ", num_iterations = ", num_iterations);
  P.d = int(h.size(1));
  P.H = int(w_h.size(0));
  P.T = int(num_iterations);
  P.dp = round_up(P.d, NB);
  P.Hp = round_up(P.H, NB);
  TORCH_CHECK(w_h.size(1) == P.d && w_o.dim() == 2 && w_o.size(0) == 4 * P.d && w_o.size(1) == P.H &&
                  mod.numel() == 8 && (!table || (table->dim() == 2 && table->size(0) == P.T && table->size(1) == P.d)),
              "iterate: inconsistent weight shapes");
  P.dt = float(dt);
  P.has_kappa = kappa.has_value();
  P.kappa = P.has_kappa ? float(*kappa) : 0.f;
  P.has_v = v.has_value();
}

}  // namespace

std::vector<at::Tensor> iterate_forward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                        const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                        const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                        const at::Tensor& mod, const at::Tensor& mu,
                                        const c10::optional<at::Tensor>& table, double dt, c10::optional<double> kappa,
                                        int64_t num_iterations, c10::optional<double> tol, int64_t min_iterations,
                                        bool trajectory, bool save_hidden) {
  const at::Tensor* exc = table ? &*table : nullptr;
  check_inputs(h, x, v, {{"w_h", &w_h}, {"w_x", &w_x}, {"w_v", &w_v}, {"w_o", &w_o}, {"bias", &bias},
                         {"b_o", &b_o}, {"mod", &mod}, {"mu", &mu}, {"table", exc}});
  Params P;
  init_params(P, h, w_h, w_o, exc, mod, v, dt, kappa, num_iterations);
  pack_params(P, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, exc, false);
  const int64_t N = h.size(0);
  auto opts = h.options();
  at::Tensor x_out = at::empty_like(x), v_out = at::empty_like(x);
  at::Tensor iterations = at::empty({N}, opts.dtype(at::kInt));
  at::Tensor energy = at::empty({N, P.T}, opts.dtype(at::kFloat));
  at::Tensor distance = at::empty({N, P.T}, opts.dtype(at::kFloat));
  at::Tensor traj_x, traj_v;
  if (trajectory) {
    traj_x = at::empty({N, P.T + 1, P.d}, opts);
    traj_v = at::empty({N, P.T + 1, P.d}, opts);
  }
  ForwardOut out{x_out.data_ptr(), v_out.data_ptr(), trajectory ? traj_x.data_ptr() : nullptr,
                 trajectory ? traj_v.data_ptr() : nullptr, iterations.data_ptr<int32_t>(), energy.data_ptr<float>(),
                 distance.data_ptr<float>()};
  const bool early_exit = tol.has_value();
  const float tol_f = early_exit ? float(*tol) : 0.f;
  const int64_t blocks = (N + NB - 1) / NB;
  // c of every step for the backward, in the kernel's own block layout [blocks][T][Hp][NB]
  at::Tensor hidden;
  if (save_hidden) hidden = at::empty({blocks, P.T, P.Hp, NB}, opts.dtype(at::kFloat));
  dispatch(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* hp = static_cast<const scalar_t*>(h.data_ptr());
    const scalar_t* xp = static_cast<const scalar_t*>(x.data_ptr());
    const scalar_t* vp = v ? static_cast<const scalar_t*>(v->data_ptr()) : nullptr;
#pragma omp parallel num_threads(threads_for(blocks))
    {
      static thread_local Scratch S;  // kept across calls: no allocation or page faults per call
      S.init(P);
      // blocks dealt round robin, so that each thread knows its next block and prefetches it
      const int64_t stride = omp_threads();
#pragma omp for schedule(static, 1)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * NB;
        const int R = int(std::min<int64_t>(NB, N - n0));
        S.reads.reset();
        S.writes.reset();
        if (b + stride < blocks) {
          const int64_t m0 = (b + stride) * NB;
          const size_t bytes = size_t(std::min<int64_t>(NB, N - m0)) * P.d * sizeof(scalar_t);
          S.reads.add(hp + m0 * P.d, bytes);
          S.reads.add(xp + m0 * P.d, bytes);
          if (vp) S.reads.add(vp + m0 * P.d, bytes);
        }
        const size_t bytes = size_t(R) * P.d * sizeof(scalar_t);
        S.writes.add(static_cast<scalar_t*>(out.x) + n0 * P.d, bytes);
        S.writes.add(static_cast<scalar_t*>(out.v) + n0 * P.d, bytes);
        float* hid = save_hidden ? hidden.data_ptr<float>() + size_t(b) * P.T * P.Hp * NB : nullptr;
        forward_block<scalar_t, false>(P, S, n0, R, hp, xp, vp, early_exit, tol_f, int(min_iterations), &out,
                                       nullptr, hid, false);
      }
    }
  });
  return {x_out, v_out, iterations, energy, distance, traj_x, traj_v, hidden};
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
    for (Buffer* b : {&gz_c, &gz, &w_in, &w_ctx, &mu, &table, &bias}) b->zero();
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
  Buffer lane_gz;     // [4dp][kVec]
  Buffer lane_mu;     // [dp][kVec]
  Buffer lane_table;  // [T][dp][kVec]
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
    lane_gz.resize(size_t(4) * dp * kVec);
    lane_mu.resize(size_t(dp) * kVec);
    lane_table.resize(size_t(T) * dp * kVec);
  }
  void start_tile() {
    lane_gz.zero();
    lane_mu.zero();
    lane_table.zero();
  }
  void end_tile(Partial& part) {
    auto reduce = [](const Buffer& lanes, Buffer& dst) {
      for (size_t i = 0; i < dst.size(); ++i) dst[i] = float(hsum(load(lanes.data() + i * kVec)));
    };
    reduce(lane_gz, part.gz);
    reduce(lane_mu, part.mu);
    reduce(lane_table, part.table);
  }
};

struct BackwardIO {
  const void *gx_T, *gv_T;             // scalar_t [N][d]
  const float *g_energy, *g_distance;  // [N][T]
  float *gh, *gx, *gv;                 // [N][d]
};

inline void accumulate(float* p, Vec v) { store(p, load(p) + v); }

template <typename scalar_t>
void backward_block(const Params& P, Scratch& S, Stash& st, BackwardScratch& B, Partial& part, int64_t n0, int R,
                    const BackwardIO& io) {
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  float* gs = B.gstate.data();
  B.gstate.zero();
  B.gctx.zero();
  load_block(static_cast<const scalar_t*>(io.gx_T), n0, R, d, gs);
  load_block(static_cast<const scalar_t*>(io.gv_T), n0, R, d, gs + dp * NB);
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
    for (int j = 0; j < d; ++j) {
      const float mu = P.mu[j];
      Vec col_gz[4] = {}, col_mu{}, col_table{};
#pragma GCC unroll 2
      for (int q = 0; q < 2; ++q) {
        const size_t at = size_t(j) * NB + q * kVec;
        Vec alpha0 = load(st.a(t, 0) + at), beta = load(st.a(t, 1) + at), beta_slope = load(st.a(t, 2) + at);
        Vec gate = load(st.a(t, 3) + at), v_cand = load(st.a(t, 4) + at);
        Vec xo = load(s0 + at), vo = load(s0 + dp * NB + at), xn = load(s1 + at), vn = load(s1 + dp * NB + at);
        float* gxp = gs + at;
        float* gvp = gs + dp * NB + at;
        Vec en = xn - mu;
        Vec sign = select(en > 0.f, splat(1.f), select(en < 0.f, splat(-1.f), Vec{}));
        Vec gdist = gd[q] * sign;
        Vec gxn = load(gxp) + gdist;
        Vec gvt = load(gvp) + ge[q] * vn + gxn * (dt * gate);
        Vec alpha = alpha0 * s_row[q];
        Vec galpha = gvt * (vo - v_cand);
        Vec gv_prev = gvt * alpha;
        Vec gerr = -gvt * beta;
        if (P.has_kappa) gsum[q] += galpha * alpha0;
        Vec gza = galpha * s_row[q] * alpha0 * (1.f - alpha0);
        Vec gzb = -gvt * (xo - mu) * beta_slope;
        Vec gzg = (gxn * dt * vn) * gate * (1.f - gate);
        Vec gzu = gvt - gv_prev;  // gv_cand = (1 - alpha)·gv~
        store(gz + at, gza);
        store(gz + size_t(dp) * NB + at, gzb);
        store(gz + size_t(2 * dp) * NB + at, gzg);
        store(gz + size_t(3 * dp) * NB + at, gzu);
        col_gz[0] += gza;
        col_gz[1] += gzb;
        col_gz[2] += gzg;
        col_gz[3] += gzu;
        col_table += gvt;
        col_mu -= gdist + gerr;
        store(gxp, gxn + gerr);
        store(gvp, gv_prev);
      }
      for (int sec = 0; sec < 4; ++sec) accumulate(B.lane_gz.data() + (size_t(sec) * dp + j) * kVec, col_gz[sec]);
      accumulate(lane_table + size_t(j) * kVec, col_table);
      accumulate(B.lane_mu.data() + size_t(j) * kVec, col_mu);
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
        accumulate(B.lane_mu.data() + size_t(j) * kVec, col_mu);
      }
    }
    // controller output layer: gc = Σ_sections gz·ms·w_o (w_out_t holds ms·w_o), then the relu
    gemm_panels<false>(P.w_out_t, NB, 4, d, gz, NB, long(dp) * NB, nullptr, 0, B.gc.data(), NB);
    const float* c = st.c(t);
    float* gpre = B.gc.data();  // in place: gc becomes gpre
    for (int i = 0; i < Hp * NB; i += kVec) {
      Vec gp = select(load(c + i) > 0.f, load(gpre + i), Vec{});
      store(gpre + i, gp);
      accumulate(B.gctx.data() + i, gp);
    }
    transpose_block(gpre, Hp, Hp, B.gpre.data() + size_t(t) * NB * Hp);
    transpose_block(c, Hp, Hp, B.c_rows.data() + size_t(t) * NB * Hp);
    // controller input layer: [gx | gv] += [w_x | w_v]ᵀ·gpre
    gemm_panels<true>(P.w_x_t, NB, 1, H, gpre, NB, 0, gs, NB, gs, NB);
    gemm_panels<true>(P.w_v_t, NB, 1, H, gpre, NB, 0, gs + dp * NB, NB, gs + dp * NB, NB);
  }
  // context: gh = gctx·w_h
  gemm_panels<false>(P.w_h_t, NB, 1, H, B.gctx.data(), NB, 0, nullptr, 0, B.gh.data(), NB);
  store_block(B.gh.data(), n0, R, d, io.gh, d);
  store_block(gs, n0, R, d, io.gx, d);
  store_block(gs + dp * NB, n0, R, d, io.gv, d);
  // this block's share of the parameter gradients, each summed over rows and steps in one product
  // (lanes ≥ R carry zero gradients, so the padding rows add nothing)
  for (int sec = 0; sec < 4; ++sec) {
    float* dst = part.gz_c.data() + size_t(sec) * dp * Hp;
    gemm_rows<true>(d, Hp, T, B.gz.data() + size_t(sec) * dp * NB, long(4) * dp * NB, B.c_rows.data(), Hp,
                    long(NB) * Hp, dst, Hp, dst, Hp);
  }
  for (int half = 0; half < 2; ++half) {
    float* dst = part.w_in.data() + size_t(half) * dp * Hp;
    gemm_rows<true>(d, Hp, T, st.state.data() + size_t(half) * dp * NB, long(2) * dp * NB, B.gpre.data(), Hp,
                    long(NB) * Hp, dst, Hp, dst, Hp);
  }
  transpose_block(B.gctx.data(), Hp, Hp, B.gctx_rows.data());
  gemm_rows<true>(d, Hp, 1, S.h.data(), 0, B.gctx_rows.data(), Hp, 0, part.w_ctx.data(), Hp, part.w_ctx.data(), Hp);
  for (int k = 0; k < H; ++k)
    part.bias[k] += float(hsum(load(B.gctx.data() + k * NB)) + hsum(load(B.gctx.data() + k * NB + kVec)));
}

// out[i] = Σ_tile parts[tile][i], tiles in order.
void reduce_partials(std::vector<Partial>& parts, Buffer Partial::*field, Buffer& out) {
  const int64_t n = int64_t(out.size());
#pragma omp parallel for num_threads(threads_for(n / 4096 + 1)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (auto& p : parts) s += (p.*field)[i];
    out[i] = s;
  }
}

}  // namespace

std::vector<at::Tensor> iterate_backward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                         const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                         const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                         const at::Tensor& mod, const at::Tensor& mu,
                                         const c10::optional<at::Tensor>& table, double dt,
                                         c10::optional<double> kappa, int64_t num_iterations, const at::Tensor& grad_x,
                                         const at::Tensor& grad_v, const at::Tensor& grad_energy,
                                         const at::Tensor& grad_distance, const c10::optional<at::Tensor>& hidden) {
  const at::Tensor* exc = table ? &*table : nullptr;
  check_inputs(h, x, v, {{"w_h", &w_h}, {"w_x", &w_x}, {"w_v", &w_v}, {"w_o", &w_o}, {"bias", &bias},
                         {"b_o", &b_o}, {"mod", &mod}, {"mu", &mu}, {"table", exc},
                         {"grad_energy", &grad_energy}, {"grad_distance", &grad_distance}});
  TORCH_CHECK(grad_x.sizes() == h.sizes() && grad_x.scalar_type() == h.scalar_type() && grad_x.is_contiguous() &&
                  grad_v.sizes() == h.sizes() && grad_v.scalar_type() == h.scalar_type() && grad_v.is_contiguous(),
              "iterate_backward: grad_x and grad_v must be contiguous and match h");
  Params P;
  init_params(P, h, w_h, w_o, exc, mod, v, dt, kappa, num_iterations);
  const int64_t N = h.size(0);
  TORCH_CHECK(grad_energy.dim() == 2 && grad_energy.size(0) == N && grad_energy.size(1) == P.T &&
                  grad_distance.sizes() == grad_energy.sizes(),
              "iterate_backward: grad_energy and grad_distance must be [N, T]");
  pack_params(P, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, exc, true);
  const int d = P.d, H = P.H, T = P.T, dp = P.dp, Hp = P.Hp;
  if (hidden)
    TORCH_CHECK(hidden->scalar_type() == at::kFloat && hidden->is_contiguous() &&
                    hidden->numel() == ((N + NB - 1) / NB) * T * Hp * NB,
                "iterate_backward: hidden must be what iterate_forward(save_hidden=True) returned for these inputs");

  auto f32 = h.options().dtype(at::kFloat);
  at::Tensor gh = at::empty({N, d}, f32), gx = at::empty({N, d}, f32), gv = at::empty({N, d}, f32);
  BackwardIO io{grad_x.data_ptr(), grad_v.data_ptr(), grad_energy.data_ptr<float>(), grad_distance.data_ptr<float>(),
                gh.data_ptr<float>(), gx.data_ptr<float>(), gv.data_ptr<float>()};
  // fixed tiles of blocks, whatever the thread count: at most 16, and fewer when their partial
  // sums (~7·d·H floats each) would pass 128 MiB
  const int64_t blocks = (N + NB - 1) / NB;
  const int64_t tile_bytes = int64_t(7) * dp * Hp * sizeof(float);
  const int64_t max_tiles = std::clamp<int64_t>((int64_t(128) << 20) / tile_bytes, 1, 16);
  const int64_t tile_blocks = std::max<int64_t>(1, (blocks + max_tiles - 1) / max_tiles);
  const int64_t tiles = (blocks + tile_blocks - 1) / tile_blocks;
  std::vector<Partial> parts(tiles);

  dispatch(h.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* hp = static_cast<const scalar_t*>(h.data_ptr());
    const scalar_t* xp = static_cast<const scalar_t*>(x.data_ptr());
    const scalar_t* vp = v ? static_cast<const scalar_t*>(v->data_ptr()) : nullptr;
#pragma omp parallel num_threads(threads_for(tiles))
    {
      static thread_local Scratch S;
      static thread_local Stash st;
      static thread_local BackwardScratch B;
      S.init(P);
      st.init(T, dp, Hp);
      B.init(P);
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        parts[tile].init(P);
        B.start_tile();
        const int64_t tile_end = std::min(blocks, (tile + 1) * tile_blocks);
        for (int64_t b = tile * tile_blocks; b < tile_end; ++b) {
          const int64_t n0 = b * NB;
          const int R = int(std::min<int64_t>(NB, N - n0));
          const size_t bytes = size_t(R) * d * sizeof(scalar_t);
          S.reads.reset();
          S.writes.reset();
          S.reads.add(static_cast<const scalar_t*>(io.gx_T) + n0 * d, bytes);
          S.reads.add(static_cast<const scalar_t*>(io.gv_T) + n0 * d, bytes);
          if (b + 1 < tile_end) {
            const int64_t m0 = n0 + NB;
            const size_t next = size_t(std::min<int64_t>(NB, N - m0)) * d * sizeof(scalar_t);
            S.reads.add(hp + m0 * d, next);
            S.reads.add(xp + m0 * d, next);
            if (vp) S.reads.add(vp + m0 * d, next);
          }
          S.writes.add(io.gh + n0 * d, size_t(R) * d * sizeof(float));
          S.writes.add(io.gx + n0 * d, size_t(R) * d * sizeof(float));
          S.writes.add(io.gv + n0 * d, size_t(R) * d * sizeof(float));
          float* hid = hidden ? hidden->data_ptr<float>() + size_t(b) * T * Hp * NB : nullptr;
          forward_block<scalar_t, true>(P, S, n0, R, hp, xp, vp, false, 0.f, 0, nullptr, &st, hid, hid != nullptr);
          backward_block<scalar_t>(P, S, st, B, parts[tile], n0, R, io);
        }
        B.end_tile(parts[tile]);
      }
    }
  });

  Buffer sum_gz_c(size_t(4) * dp * Hp), sum_gz(size_t(4) * dp), sum_w_in(size_t(2) * dp * Hp);
  Buffer sum_w_ctx(size_t(dp) * Hp), sum_mu(dp), sum_table(size_t(T) * dp), sum_bias(Hp);
  reduce_partials(parts, &Partial::gz_c, sum_gz_c);
  reduce_partials(parts, &Partial::gz, sum_gz);
  reduce_partials(parts, &Partial::w_in, sum_w_in);
  reduce_partials(parts, &Partial::w_ctx, sum_w_ctx);
  reduce_partials(parts, &Partial::mu, sum_mu);
  reduce_partials(parts, &Partial::table, sum_table);
  reduce_partials(parts, &Partial::bias, sum_bias);

  at::Tensor gw_h = at::empty({H, d}, f32), gw_x = at::empty({H, d}, f32), gw_v = at::empty({H, d}, f32);
  at::Tensor gw_o = at::empty({4 * d, H}, f32), gbias = at::empty({H}, f32), gb_o = at::empty({4 * d}, f32);
  at::Tensor gmod = at::empty({8}, f32), gmu = at::empty({d}, f32);
  at::Tensor gtable = exc ? at::empty({T, d}, f32) : at::Tensor();
  float *p_wh = gw_h.data_ptr<float>(), *p_wx = gw_x.data_ptr<float>(), *p_wv = gw_v.data_ptr<float>();
  for (int k = 0; k < H; ++k)
    for (int j = 0; j < d; ++j) {
      p_wh[size_t(k) * d + j] = sum_w_ctx[size_t(j) * Hp + k];
      p_wx[size_t(k) * d + j] = sum_w_in[size_t(j) * Hp + k];
      p_wv[size_t(k) * d + j] = sum_w_in[size_t(dp + j) * Hp + k];
    }
  // z_s = ms_s·(c·w_oᵀ + b_o)_s + mb_s:  gw_o = ms·gzᵀc,  gb_o = ms·Σgz,  gmb = ΣΣgz,
  // gms = Σ gz·(c·w_oᵀ + b_o) = <w_o, gzᵀc> + <b_o, Σgz>
  const float* wo = w_o.data_ptr<float>();
  const float* bo = b_o.data_ptr<float>();
  float* p_wo = gw_o.data_ptr<float>();
  float* p_bo = gb_o.data_ptr<float>();
  for (int sec = 0; sec < 4; ++sec) {
    const float ms = P.ms[sec];
    double g_scale = 0, g_shift = 0;
    for (int j = 0; j < d; ++j) {
      const size_t src = size_t(sec) * dp + j, dst = size_t(sec) * d + j;
      const float* gzc = sum_gz_c.data() + src * Hp;
      for (int k = 0; k < H; ++k) {
        p_wo[dst * H + k] = ms * gzc[k];
        g_scale += double(wo[dst * H + k]) * gzc[k];
      }
      p_bo[dst] = ms * sum_gz[src];
      g_scale += double(bo[dst]) * sum_gz[src];
      g_shift += sum_gz[src];
    }
    gmod.data_ptr<float>()[sec] = float(g_scale);
    gmod.data_ptr<float>()[4 + sec] = float(g_shift);
  }
  std::copy_n(sum_bias.data(), H, gbias.data_ptr<float>());
  std::copy_n(sum_mu.data(), d, gmu.data_ptr<float>());
  if (exc)
    for (int t = 0; t < T; ++t)
      std::copy_n(sum_table.data() + size_t(t) * dp, d, gtable.data_ptr<float>() + size_t(t) * d);
  return {gh, gx, gv, gw_h, gw_x, gw_v, gw_o, gbias, gb_o, gmod, gmu, gtable};
}

}  // namespace inl
