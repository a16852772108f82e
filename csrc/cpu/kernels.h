// The interface between the ATen-facing entry points (csrc/cpu/entry.cpp, compiled for any
// x86-64 CPU) and the CPU kernels (iterate.cpp, rms_norm.cpp, swiglu.cpp, linear.cpp, attention.cpp,
// rope.cpp), which setup.py
// compiles once per instruction set into namespaces inl::avx512, inl::avx2 and inl::base. Plain
// structs of sizes and raw pointers only: no ATen type crosses it, so the kernel translation units
// include no ATen header. The entry checks every argument and allocates every output; a kernel
// trusts what it gets.
#pragma once

#include <cstdint>

namespace inl {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The largest num_iterations the CPU iterate accepts (inl_kernels.MAX_ITERATIONS, which the
// Python validation checks first): far above any use (the seeds run at most 15 steps), and small
// enough that every step index stays an int and the [T, d] table's size a size_t.
constexpr int64_t kMaxIterations = int64_t(1) << 20;

// The controller's weights as the iterate's micro-kernel wants them, made once and reused while
// the weights do not change (inl_kernels/cpu/iterate.py caches it per parameter version).
struct IterateWeights {
  int d, H;
  const float *w_h, *w_x, *w_v, *w_o;  // [H][d] three times, [4d][H]; fp32, contiguous
  float mod_scale[4];                  // folded into the packed output layer
  bool backward;                       // also pack the transposed layouts the backward reads
};

// What the forward and the backward share. Pointers of the input dtype are void*.
struct IterateArgs {
  DType dtype;
  int64_t N;
  int d, H, T;
  const void *h, *x, *v;        // [N][d]; v null: zeros
  const float* bias;            // [H]  b_h + b_x + b_v
  const float* w_o;             // [4d][H]  (the backward's gradient of mod_scale reads it)
  const float* b_o;             // [4d]
  const float* mod;             // [8]  mod_scale, mod_bias
  const float* mu;              // [d]
  const float* table;           // [T][d] excitation, or null
  const uint8_t* table_columns;  // [d] columns whose table gradient is wanted (the excited ones), or
                                 // null for all
  float dt, kappa;
  bool has_kappa;
  int threads;                  // OpenMP threads to use at most
  const void* pack;             // from iterate_pack with these weights (backward: packed for it)
};

struct IterateForwardArgs : IterateArgs {
  bool early_exit;
  float tol;
  int min_iterations;
  void *x_out, *v_out;          // [N][d]
  void *traj_x, *traj_v;        // [N][T+1][d], or null
  int32_t* iterations;          // [N]
  float *energy, *distance;     // [N][T]
  float* hidden;                // iterate_hidden_floats(N, T, H) floats, or null
};

struct IterateBackwardArgs : IterateArgs {
  const void *grad_x, *grad_v;              // [N][d] input dtype
  const float *grad_energy, *grad_distance;  // [N][T]
  const float* hidden;                      // what the forward saved, or null
  float *gh, *gx, *gv;                      // [N][d]
  float *gw_h, *gw_x, *gw_v;                // [H][d]
  float *gw_o;                              // [4d][H]
  float *gbias, *gb_o, *gmod, *gmu;         // [H], [4d], [8], [d]
  float* gtable;                            // [T][d] (null without a table)
};

struct RmsNormArgs {
  DType dtype;
  int64_t rows, D;
  const void *x, *residual;  // [rows][D]; residual may be null
  const void* weight;        // [D], fp32 or the input dtype
  bool weight_fp32;
  float eps;
  void *y, *s;               // [rows][D]; s (x + residual) only with a residual
  float* rstd;               // [rows]
  int threads;
};

struct RmsNormBackwardArgs {
  DType dtype;
  int64_t rows, D;
  const void *grad_y, *grad_s, *x;  // grad_s may be null
  const void* weight;
  bool weight_fp32;
  const float* rstd;
  float *gx, *gw;
  int threads;
};

// silu(g)·u and its gradients, element by element over n elements.
struct SwigluArgs {
  DType dtype;
  int64_t n;
  const void *gate, *up;          // the two projections
  const void* grad;               // backward: the gradient of the product (null in the forward)
  void *out;                      // forward: silu(g)·u; backward: the gradient of gate
  void* grad_up;                  // backward: the gradient of up
  int threads;
};

// The whole SwiGLU of a few rows (decode), fp32, inference only: out = (silu(x·w_gateᵀ) ·
// (x·w_upᵀ))·w_downᵀ as matrix-vector products streaming the weights once; csrc/cpu/swiglu.cpp.
constexpr int kSwigluRows = 4;  // the most rows it takes
struct SwigluRowsArgs {
  int M, d, F;                         // M <= kSwigluRows rows of x [M][d]
  const float *x, *w_gate, *w_up;      // [M][d], [F][d], [F][d], contiguous
  const float* w_down;                 // [d][F]
  float* out;                          // [M][d]
  int threads;
};

// A projection of a few rows (decode), fp32, inference only: out = x·Wᵀ (+ b) as matrix-vector
// products streaming W once; csrc/cpu/linear.cpp.
constexpr int kLinearRows = 4;  // the most rows it takes
constexpr int kLinearParts = 3;  // projections of one x run in one parallel region (decode's q, k, v)
struct LinearPart {
  int O;                    // outputs
  const float* w;           // [O][K], contiguous
  const float* bias;        // [O], or null
  float* out;               // [M][O]
};
struct LinearRowsArgs {
  int M, K;                 // M <= kLinearRows rows of x [M][K]
  const float* x;
  int parts;                // 1 to kLinearParts
  LinearPart part[kLinearParts];
  int threads;
};

// Attention of a few queries per sequence (decode), inference only; csrc/cpu/attention.cpp.
struct AttentionDecodeArgs {
  DType dtype;
  int B, Hq, Hkv, Sq, Skv, D;
  const void *q, *k, *v;         // [B][H][S][D] with these element strides (the last is 1)
  int64_t q_stride[3], k_stride[3], v_stride[3];
  const float *cos, *sin;        // [rows][D/2] RoPE tables (rows > every position), or null: no rotation
  const int64_t *lens, *starts;  // [B] keys [starts, lens) of each row, or null: [0, Skv)
  bool causal;
  float scale;
  void* out;                     // [B][Hq][Sq][D], contiguous
  int threads;
};

// Attention of every query of a sequence over the same keys (Sq = Skv = S: a prefill), inference
// only, q and k already rotated; csrc/cpu/attention.cpp.
struct AttentionPrefillArgs {
  DType dtype;
  int B, Hq, Hkv, S, D;
  const void *q, *k, *v;         // [B][H][S][D] with these element strides (the last is 1)
  int64_t q_stride[3], k_stride[3], v_stride[3];
  bool causal;                   // query i sees keys j <= i; else every key
  float scale;
  void* out;                     // [B][Hq][S][D], contiguous
  float* lse;                    // [B][Hq][S]: each query's log-sum-exp of its scaled scores, or null
  int threads;
};

// Its backward from the forward's out and lse: the gradients of q, k and v (q and k rotated).
struct AttentionPrefillBackwardArgs {
  DType dtype;
  int B, Hq, Hkv, S, D;
  const void *q, *k, *v, *out, *grad;  // [B][H][S][D] with these element strides (the last is 1)
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], grad_stride[3];
  const float* lse;                    // [B][Hq][S], contiguous
  bool causal;
  float scale;
  void *gq, *gk, *gv;                  // [B][Hq][S][D], [B][Hkv][S][D] twice, contiguous
  int threads;
};

// RoPE (rotate-half) of q and k in one call, or its inverse (the gradient); csrc/cpu/rope.cpp.
struct RopeArgs {
  DType dtype;
  int B, Hq, Hkv, Sq, Sk, D;
  const void *q, *k;              // [B][H][S][D] with these element strides (the last is 1)
  int64_t q_stride[3], k_stride[3];
  const float *cos, *sin;         // [rows][D/2]; every position < rows
  const int64_t *q_pos, *k_pos;   // positions [Sq], [Sk]; or with per_row [B][Sq], [B][Sk]
  bool per_row;
  bool inverse;                   // rotate by −θ
  void *q_out, *k_out;            // [B][Hq][Sq][D], [B][Hkv][Sk][D], contiguous
  int threads;
};
struct CpuKernels {
  const char* name;  // "avx512", "avx2", "base"
  int vector_width;  // floats per vector
  int row_block;     // rows the iterate keeps in one block (two vectors)
  void* (*iterate_pack)(const IterateWeights&);
  void (*iterate_pack_free)(void*);
  int64_t (*iterate_hidden_floats)(int64_t N, int T, int H);
  void (*iterate_forward)(const IterateForwardArgs&);
  void (*iterate_backward)(const IterateBackwardArgs&);
  void (*rms_norm_forward)(const RmsNormArgs&);
  void (*rms_norm_backward)(const RmsNormBackwardArgs&);
  void (*swiglu_forward)(const SwigluArgs&);
  void (*swiglu_backward)(const SwigluArgs&);
  void (*attention_decode)(const AttentionDecodeArgs&);
  void (*swiglu_rows)(const SwigluRowsArgs&);
  void (*rope)(const RopeArgs&);
  void (*attention_prefill)(const AttentionPrefillArgs&);
  void (*attention_prefill_backward)(const AttentionPrefillBackwardArgs&);
  void (*linear_rows)(const LinearRowsArgs&);
};

// One table per compiled path. Weak: a build pinned to one target (INL_KERNELS_MARCH) holds
// only that path, and the others are then null.
namespace avx512 {
extern const CpuKernels kernels __attribute__((weak));
}
namespace avx2 {
extern const CpuKernels kernels __attribute__((weak));
}
namespace base {
extern const CpuKernels kernels __attribute__((weak));
}

}  // namespace inl
