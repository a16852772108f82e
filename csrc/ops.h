// The entry points of inl_kernels._C, declared once: csrc/bindings.cpp binds them, and the file
// that defines each includes this header, so the compiler holds the two to the same signature.
// Python calls them only from inl_kernels/cpu/*.py and inl_kernels/cuda/*.py, which check the
// arguments first; `table` (the [T, d] excitation) is None when no dim is excited.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace inl {

// The CPU ops, defined in csrc/cpu/entry.cpp: they check their arguments, allocate the outputs
// and run the kernels of the instruction-set path in use (csrc/cpu/kernels.h).

// The controller's weights packed for one path's iterate (opaque to Python): made by
// iterate_pack, reused by every call with the same weights and mod_scale.
struct IteratePack {
  const CpuKernels* kernels;  // the path that packed it
  void* data;
  int64_t d, H;
  float mod_scale[4];
  bool backward;
  IteratePack(const CpuKernels* k, void* p) : kernels(k), data(p) {}
  IteratePack(const IteratePack&) = delete;
  IteratePack& operator=(const IteratePack&) = delete;
  ~IteratePack() { kernels->iterate_pack_free(data); }
};
using IteratePackPtr = std::shared_ptr<IteratePack>;

// w_h, w_x, w_v [H, d], w_o [4d, H], mod_scale [4]: fp32; `backward` also packs for the backward
IteratePackPtr iterate_pack(const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v, const at::Tensor& w_o,
                            const at::Tensor& mod_scale, bool backward);

// returns x_T, v_T, iterations, energy, distance, trajectory_x, trajectory_v (None unless
// `trajectory`), hidden (the controller's activations for the backward, None unless
// `save_hidden`). `pack` may be None (the weights are then packed for this call).
std::vector<at::Tensor> iterate_forward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                        const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                        const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                        const at::Tensor& mod, const at::Tensor& mu,
                                        const c10::optional<at::Tensor>& table, double dt, c10::optional<double> kappa,
                                        int64_t num_iterations, c10::optional<double> tol, int64_t min_iterations,
                                        bool trajectory, bool save_hidden, const IteratePackPtr& pack);
// returns the gradients of h, x, v, w_h, w_x, w_v, w_o, bias, b_o, mod, mu, table (None without a
// table; with `table_columns` (the excited dims), zero outside those columns). With a pack, the backward runs on the path that packed it (the forward's, whose
// `hidden` layout it reads).
std::vector<at::Tensor> iterate_backward(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                         const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                         const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                         const at::Tensor& mod, const at::Tensor& mu,
                                         const c10::optional<at::Tensor>& table, double dt,
                                         c10::optional<double> kappa, int64_t num_iterations, const at::Tensor& grad_x,
                                         const at::Tensor& grad_v, const at::Tensor& grad_energy,
                                         const at::Tensor& grad_distance, const c10::optional<at::Tensor>& hidden,
                                         const IteratePackPtr& pack, const c10::optional<at::Tensor>& table_columns);

// returns y, x + residual (None without a residual), rstd
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                         const c10::optional<at::Tensor>& residual);
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_s,
                                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd);

// silu(gate)·up, and from its gradient the gradients of gate and up
// (into `out` when given: gate itself, for a caller that needs gate no more)
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up,
                          const c10::optional<at::Tensor>& out = c10::nullopt);
std::vector<at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up);
// the whole SwiGLU of 1 to 4 rows (decode, fp32, inference)
at::Tensor swiglu_rows(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                       const at::Tensor& w_down);
// x·weightᵀ (+ bias) of 1 to 4 rows (decode, fp32, inference)
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// the same for 1 to 3 weights of the same x in one parallel region (decode's q, k, v; a bias only with one)
std::vector<at::Tensor> linear_rows_parts(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                          const c10::optional<at::Tensor>& bias);

// One layer of the model for the fused decode step (csrc/cpu/decode.cpp): its tensors and
// constants, bound once when inl_llm's lean decode step is built (fp32, contiguous weights).
struct DecodeLayer {
  at::Tensor attn_norm, integrator_norm, ffn_norm;  // RMSNorm weights [d]
  double attn_eps, integrator_eps, ffn_eps;
  at::Tensor w_q, w_k, w_v, w_o;                    // the attention projections (no bias)
  int64_t Hq, Hkv, D;
  at::Tensor cache_k, cache_v;                      // the layer's static KV cache [B, Hkv, L, D], written in place
  at::Tensor cos, sin;                              // RoPE tables
  std::vector<at::Tensor> iterate;                  // w_h, w_x, w_v, w_o, bias, b_o, mod, mu (iterate_forward's)
  c10::optional<at::Tensor> table;
  double dt;
  c10::optional<double> kappa;
  int64_t num_iterations;
  c10::optional<double> tol;
  int64_t min_iterations;
  IteratePackPtr pack;
  at::Tensor w_gate, w_up, w_down;
  int64_t d;
};
// x [B, S, d] through every layer (B·S <= 4 rows, fp32): {x, iterations [layers, B·S]}
std::vector<at::Tensor> decode_layers(at::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                                      const at::Tensor& index, const c10::optional<at::Tensor>& kv_lens,
                                      const c10::optional<at::Tensor>& kv_starts);
// The model's ends for decode_step: the token embedding (nn.Embedding's weight [V, d], or the
// low-rank embed_low [V, r] with project_up [d, r]), the final RMSNorm, and the LM head (an untied
// head's weight [V, d], no bias; else tied to the embedding)
struct DecodeHead {
  at::Tensor embed;
  c10::optional<at::Tensor> project_up;
  at::Tensor norm;
  double eps;
  c10::optional<at::Tensor> lm_head;
  int64_t vocab_size;  // the model's: the token ids it accepts
};
// one decode step of the whole model for ids [B, S] (B·S <= 4, fp32): {logits of the last
// position [B, V], iterations [layers, B·S]}; writes the KV caches
std::vector<at::Tensor> decode_step(const at::Tensor& ids, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                                    const DecodeHead& head, const at::Tensor& index,
                                    const c10::optional<at::Tensor>& kv_lens, const c10::optional<at::Tensor>& kv_starts);

// q and k rotated (RoPE, rotate-half; by −θ with inverse) at positions q_pos [Sq] and k_pos [Sk],
// or [B, Sq] and [B, Sk] (per row); new contiguous tensors in q's dtype
std::vector<at::Tensor> rope_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                     const at::Tensor& sin, const at::Tensor& q_pos, const at::Tensor& k_pos,
                                     bool inverse);

// softmax(scale·rope(q)·rope(k)ᵀ + mask)·v for a few queries per row (decode), inference only;
// cos/sin: the RoPE tables or None; kv_lens/kv_starts: each row's keys [start, len) or None
at::Tensor attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                            const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                            const c10::optional<at::Tensor>& kv_lens, const c10::optional<at::Tensor>& kv_starts);

// softmax(scale·q·kᵀ + mask)·v of every query over its own sequence's keys (Sq = Skv: a prefill),
// q and k rotated already, inference only; causal: query i sees keys j <= i
at::Tensor attention_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale);
// the same, with each query's log-sum-exp of its scaled scores, float32 [B, Hq, S]: {out, lse}
std::vector<at::Tensor> attention_prefill_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              bool causal, double scale);
// its gradients {dq, dk, dv} from the gradient of out, the inputs, out and lse
std::vector<at::Tensor> attention_prefill_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   bool causal, double scale);

// The instruction-set paths: built into this extension and runnable on this CPU (best first),
// the one in use (chosen at first use: INL_KERNELS_CPU_CAPABILITY, else the best), and a switch.
std::vector<std::string> cpu_capabilities();
std::vector<std::string> cpu_built_capabilities();
std::string cpu_capability();
void set_cpu_capability(const std::string& name);
void threads_set_by_caller(int64_t n);
const CpuKernels& cpu_kernels();

#ifdef INL_WITH_CUDA
// csrc/cuda/iterate.cu, with the launch plan (blocks, columns per block, shared memory bytes)
// made by inl_kernels/cuda/iterate.py: returns x_T, v_T, iterations, energy, distance
std::vector<at::Tensor> iterate_forward_cuda(const at::Tensor& h, const at::Tensor& x, const c10::optional<at::Tensor>& v,
                                             const at::Tensor& w_h, const at::Tensor& w_x, const at::Tensor& w_v,
                                             const at::Tensor& w_o, const at::Tensor& bias, const at::Tensor& b_o,
                                             const at::Tensor& mod, const at::Tensor& mu,
                                             const c10::optional<at::Tensor>& table, double dt,
                                             c10::optional<double> kappa, int64_t num_iterations,
                                             c10::optional<double> tol, int64_t min_iterations, int64_t blocks,
                                             int64_t cols, int64_t shared_bytes);
// the planner's two questions to the GPU: (multiprocessors, shared memory a block may opt in to)
std::vector<int64_t> iterate_decode_limits(int64_t device);
// blocks of the decode kernel for `dtype` resident on one multiprocessor with this much shared memory
int64_t iterate_decode_resident(at::ScalarType dtype, int64_t shared_bytes, int64_t device);
#endif

}  // namespace inl
