// The model's blocks for one decode step, fp32, 1 to 4 rows, in one call from Python: the lean
// decode step of inl_llm (python/inl_llm/lean_decode.py, `_step`) spends ~1.4 ms a token of
// `small` in the Python between its kernels (views, a dozen calls a layer, their arguments); this
// runs the same entry functions (csrc/cpu/entry.cpp) on the same arguments in the same order, so
// the bits are the step's. Each layer's tensors and constants are bound once, when the step is
// built (DecodeLayer); the KV cache is written in place, as the step writes it.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "../ops.h"

namespace inl {
namespace {

// cache[b, h, positions[s], :] = kv[b, s, h·D : (h + 1)·D] (index_copy_ along the cache's
// sequence dimension, without its dispatch: this runs twice a layer and token)
void write_cache(const at::Tensor& cache, const at::Tensor& kv, const at::Tensor& positions, int64_t B, int64_t S,
                 int64_t H, int64_t D) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(1) == H && cache.size(3) == D &&
                  cache.scalar_type() == at::kFloat && cache.device().is_cpu(),
              "the KV cache must be a float32 CPU tensor [", B, ", ", H, ", L, ", D, "], got ", cache.sizes());
  TORCH_CHECK(kv.numel() == B * S * H * D && kv.is_contiguous(), "a k/v projection gave ", kv.numel(),
              " values for ", B * S, " rows of ", H, " heads of ", D);
  if (!cache.is_contiguous()) {  // a strided view: the op itself
    cache.index_copy_(2, positions, kv.view({B, S, H, D}).transpose(1, 2));
    return;
  }
  const int64_t L = cache.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(pos[s] >= 0 && pos[s] < L, "cache position ", pos[s], " outside the cache's ", L);
  const float* src = kv.data_ptr<float>();
  float* dst = cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        std::copy_n(src + ((b * S + s) * H + h) * D, D, dst + ((b * H + h) * L + pos[s]) * D);
}

}  // namespace

std::vector<at::Tensor> decode_layers(at::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                                      const at::Tensor& index, const c10::optional<at::Tensor>& kv_lens,
                                      const c10::optional<at::Tensor>& kv_starts) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be a float32 CPU tensor [B, S, d], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), d = x.size(2);
  TORCH_CHECK(B * S >= 1 && B * S <= kLinearRows, "decode_layers runs 1 to ", kLinearRows, " rows, got ", B * S);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == S && index.scalar_type() == at::kLong && index.device().is_cpu(),
              "index must be the int64 cache positions [S] of the step's tokens, got ", index.sizes());
  const at::Tensor positions = index.contiguous();
  std::vector<at::Tensor> iterations;
  iterations.reserve(layers.size());
  for (const auto& layer : layers) {
    const DecodeLayer& L = *layer;
    TORCH_CHECK(L.d == d, "a layer of width ", L.d, " on states of width ", d);
    // GQAttention.forward with the static cache
    const at::Tensor n = rms_norm_forward(x, L.attn_norm, L.attn_eps, c10::nullopt)[0];
    // q, k and v in one parallel region; k and v straight into the cache at `index`
    const std::vector<at::Tensor> qkv = linear_rows_parts(n, {L.w_q, L.w_k, L.w_v}, c10::nullopt);
    const at::Tensor q = qkv[0].view({B, S, L.Hq, L.D}).transpose(1, 2);
    write_cache(L.cache_k, qkv[1], positions, B, S, L.Hkv, L.D);
    write_cache(L.cache_v, qkv[2], positions, B, S, L.Hkv, L.D);
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

// IntegratorLanguageModel._embed, decode_layers, the final norm and _logits, [:, -1]: the ops the
// lean step's Python runs around decode_layers, the same ATen calls and kernels on the same
// arguments (so its bits), without the Python, whose every object comes back from DRAM after
// the step has streamed the weights (~0.7 ms a token of small on the Zen 4)
std::vector<at::Tensor> decode_step(const at::Tensor& ids, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                                    const DecodeHead& head, const at::Tensor& index,
                                    const c10::optional<at::Tensor>& kv_lens, const c10::optional<at::Tensor>& kv_starts) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ids must be int64 [B, S], got ", ids.sizes());
  // the forward's check of its input ids (a ValueError naming them), before any cache is written
  if (ids.numel() > 0) {
    const at::Tensor dense = ids.contiguous();
    const int64_t* id = dense.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(id, id + dense.numel());
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < head.vocab_size, "input_ids values must lie in [0, ", head.vocab_size,
                      ") (the vocabulary), got values in [", *lo, ", ", *hi, "]");
  }
  // the reference embedding: F.embedding(ids, embed_low) @ project_upᵀ (or nn.Embedding's lookup)
  at::Tensor x = at::embedding(head.embed, ids);
  if (head.project_up.has_value()) x = at::matmul(x, head.project_up->t());
  std::vector<at::Tensor> out = decode_layers(x, layers, index, kv_lens, kv_starts);
  const at::Tensor n = rms_norm_forward(out[0], head.norm, head.eps, c10::nullopt)[0];
  at::Tensor logits;
  if (head.lm_head.has_value())
    logits = linear_rows(n, *head.lm_head, c10::nullopt);
  else if (head.project_up.has_value())  // tied low-rank: (x · project_up) · embed_lowᵀ
    logits = linear_rows(at::matmul(n, *head.project_up), head.embed, c10::nullopt);
  else
    logits = linear_rows(n, head.embed, c10::nullopt);
  return {logits.select(1, -1), out[1]};
}

}  // namespace inl
