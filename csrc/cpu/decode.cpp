// The model's blocks for one decode step, fp32, 1 to 4 rows, in one call from Python: the lean
// decode step of inl_llm (python/inl_llm/lean_decode.py, `_step`) spends ~1.4 ms a token of
// `small` in the Python between its kernels (views, a dozen calls a layer, their arguments); this
// runs the same entry functions (csrc/cpu/entry.cpp) on the same arguments in the same order, so
// the bits are the step's. Each layer's tensors and constants are bound once, when the step is
// built (DecodeLayer); the KV cache is written in place, as the step writes it.
#include <ATen/ATen.h>

#include <cmath>

#include "../ops.h"

namespace inl {

std::vector<at::Tensor> decode_layers(at::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                                      const at::Tensor& index, const c10::optional<at::Tensor>& kv_lens,
                                      const c10::optional<at::Tensor>& kv_starts) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be a float32 CPU tensor [B, S, d], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), d = x.size(2);
  TORCH_CHECK(B * S >= 1 && B * S <= kLinearRows, "decode_layers runs 1 to ", kLinearRows, " rows, got ", B * S);
  std::vector<at::Tensor> iterations;
  iterations.reserve(layers.size());
  for (const auto& layer : layers) {
    const DecodeLayer& L = *layer;
    TORCH_CHECK(L.d == d, "a layer of width ", L.d, " on states of width ", d);
    // GQAttention.forward with the static cache
    const at::Tensor n = rms_norm_forward(x, L.attn_norm, L.attn_eps, c10::nullopt)[0];
    const at::Tensor q = linear_rows(n, L.w_q, c10::nullopt).view({B, S, L.Hq, L.D}).transpose(1, 2);
    const at::Tensor k = linear_rows(n, L.w_k, c10::nullopt).view({B, S, L.Hkv, L.D}).transpose(1, 2);
    const at::Tensor v = linear_rows(n, L.w_v, c10::nullopt).view({B, S, L.Hkv, L.D}).transpose(1, 2);
    L.cache_k.index_copy_(2, index, k);
    L.cache_v.index_copy_(2, index, v);
    const at::Tensor out = attention_decode(q, L.cache_k, L.cache_v, true, 1.0 / std::sqrt(double(L.D)), L.cos, L.sin,
                                            kv_lens, kv_starts);
    const at::Tensor a =
        linear_rows(out.transpose(1, 2).reshape({B, S, L.Hq * L.D}).contiguous(), L.w_o, c10::nullopt);
    // Block.forward and IntegratorLayer.forward
    std::vector<at::Tensor> normed = rms_norm_forward(a, L.integrator_norm, L.integrator_eps, x);
    x = normed[1];
    const auto& w = L.iterate;
    std::vector<at::Tensor> it =
        iterate_forward(a.reshape({-1, d}).contiguous(), normed[0].reshape({-1, d}).contiguous(), c10::nullopt, w[0],
                        w[1], w[2], w[3], w[4], w[5], w[6], w[7], L.table, L.dt, L.kappa, L.num_iterations, L.tol,
                        L.min_iterations, false, false, L.pack);
    iterations.push_back(it[2]);
    normed = rms_norm_forward(it[0].view({B, S, d}), L.ffn_norm, L.ffn_eps, x);
    x = normed[1];
    const at::Tensor& ffn_in = normed[0];
    x = x + swiglu_rows(ffn_in.reshape({-1, d}).contiguous(), L.w_gate, L.w_up, L.w_down).view(ffn_in.sizes());
  }
  return {x, at::stack(iterations)};
}

}  // namespace inl
