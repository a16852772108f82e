// inl_kernels._C: the compiled backends. Only inl_kernels/cpu/*.py and inl_kernels/cuda/*.py
// call these; they wrap them in autograd Functions and check arguments first.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor casters, lighter to compile than torch/extension.h

#include "cuda/iterate_layout.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "Compiled INL-Kernels backends (C++ CPU kernels; CUDA kernels when built with CUDA)";
  pybind11::class_<inl::IteratePack, inl::IteratePackPtr>(m, "IteratePack",
                                                          "The controller's weights packed for one CPU path")
      .def_property_readonly("capability", [](const inl::IteratePack& p) { return std::string(p.kernels->name); })
      .def_readonly("backward", &inl::IteratePack::backward);
  m.def("iterate_pack", &inl::iterate_pack, "Packs the controller for the CPU iterate (reused while it is unchanged)",
        "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "mod_scale"_a, "backward"_a);
  m.def("iterate_forward", &inl::iterate_forward, "The integrator iterate on CPU tensors (SPEC §2)", "h"_a, "x"_a,
        "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a, "kappa"_a,
        "num_iterations"_a, "tol"_a, "min_iterations"_a, "trajectory"_a, "save_hidden"_a = false,
        "pack"_a = inl::IteratePackPtr());
  m.def("iterate_backward", &inl::iterate_backward, "Gradients of iterate_forward (no early exit)", "h"_a, "x"_a,
        "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a, "kappa"_a,
        "num_iterations"_a, "grad_x"_a, "grad_v"_a, "grad_energy"_a, "grad_distance"_a, "hidden"_a = pybind11::none(),
        "pack"_a = inl::IteratePackPtr(), "table_columns"_a = pybind11::none());
  m.attr("iterate_max_iterations") = inl::kMaxIterations;
  m.def("rms_norm_forward", &inl::rms_norm_forward, "RMSNorm on CPU tensors (SPEC §3)", "x"_a, "weight"_a, "eps"_a,
        "residual"_a);
  m.def("rms_norm_backward", &inl::rms_norm_backward, "Gradients of rms_norm_forward", "grad_y"_a, "grad_s"_a, "x"_a,
        "weight"_a, "rstd"_a);
  m.def("swiglu_forward", &inl::swiglu_forward,
        "silu(gate)·up on CPU tensors (SwiGLU's pointwise part), into `out` when given (gate itself allowed)",
        "gate"_a, "up"_a, "out"_a = pybind11::none());
  m.def("swiglu_backward", &inl::swiglu_backward, "Gradients of gate and up from the gradient of silu(gate)·up",
        "grad"_a, "gate"_a, "up"_a);
  m.def("swiglu_rows", &inl::swiglu_rows,
        "(silu(x·w_gateᵀ)·(x·w_upᵀ))·w_downᵀ of 1 to 4 fp32 rows as matrix-vector products (decode, inference)",
        "x"_a, "w_gate"_a, "w_up"_a, "w_down"_a);
  pybind11::class_<inl::DecodeLayer, std::shared_ptr<inl::DecodeLayer>>(
      m, "DecodeLayer", "One layer's tensors and constants for decode_layers (bound once, by inl_llm's lean step)")
      .def(pybind11::init([](at::Tensor attn_norm, double attn_eps, at::Tensor integrator_norm, double integrator_eps,
                             at::Tensor ffn_norm, double ffn_eps, at::Tensor w_q, at::Tensor w_k, at::Tensor w_v,
                             at::Tensor w_o, int64_t Hq, int64_t Hkv, int64_t D, at::Tensor cache_k,
                             at::Tensor cache_v, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> iterate,
                             c10::optional<at::Tensor> table, double dt, c10::optional<double> kappa,
                             int64_t num_iterations, c10::optional<double> tol, int64_t min_iterations,
                             inl::IteratePackPtr pack, at::Tensor w_gate, at::Tensor w_up, at::Tensor w_down) {
             TORCH_CHECK(iterate.size() == 8, "iterate: the 8 weights of iterate_forward");
             auto layer = std::make_shared<inl::DecodeLayer>();
             *layer = inl::DecodeLayer{attn_norm, integrator_norm, ffn_norm, attn_eps, integrator_eps, ffn_eps,
                                       w_q, w_k, w_v, w_o, Hq, Hkv, D, cache_k, cache_v, cos, sin,
                                       std::move(iterate), table, dt, kappa, num_iterations, tol, min_iterations,
                                       std::move(pack), w_gate, w_up, w_down, attn_norm.size(0)};
             return layer;
           }),
           "attn_norm"_a, "attn_eps"_a, "integrator_norm"_a, "integrator_eps"_a, "ffn_norm"_a, "ffn_eps"_a, "w_q"_a,
           "w_k"_a, "w_v"_a, "w_o"_a, "Hq"_a, "Hkv"_a, "D"_a, "cache_k"_a, "cache_v"_a, "cos"_a, "sin"_a,
           "iterate"_a, "table"_a, "dt"_a, "kappa"_a, "num_iterations"_a, "tol"_a, "min_iterations"_a, "pack"_a,
           "w_gate"_a, "w_up"_a, "w_down"_a);
  pybind11::class_<inl::DecodeHead, std::shared_ptr<inl::DecodeHead>>(
      m, "DecodeHead", "The model's embedding, final norm and LM head for decode_step (bound once)")
      .def(pybind11::init([](at::Tensor embed, c10::optional<at::Tensor> project_up, at::Tensor norm, double eps,
                             c10::optional<at::Tensor> lm_head, int64_t vocab_size) {
             return std::make_shared<inl::DecodeHead>(
                 inl::DecodeHead{embed, project_up, norm, eps, lm_head, vocab_size});
           }),
           "embed"_a, "project_up"_a, "norm"_a, "eps"_a, "lm_head"_a, "vocab_size"_a);
  m.def("decode_step", &inl::decode_step,
        "one decode step of the whole model: ids [B, S] (fp32, 1 to 4 rows) -> {logits of the last position, "
        "iterations}; writes the KV caches", "ids"_a, "layers"_a, "head"_a, "index"_a, "kv_lens"_a, "kv_starts"_a);
  m.def("decode_layers", &inl::decode_layers,
        "x [B, S, d] through every DecodeLayer (fp32, 1 to 4 rows): {x, iterations}; writes the KV caches", "x"_a,
        "layers"_a, "index"_a, "kv_lens"_a, "kv_starts"_a);
  m.def("linear_rows", &inl::linear_rows,
        "x·weightᵀ (+ bias) of 1 to 4 fp32 rows as matrix-vector products (decode, inference)", "x"_a, "weight"_a,
        "bias"_a = pybind11::none());
  m.def("linear_rows_parts", &inl::linear_rows_parts,
        "[x·wᵀ for w in weights] (1 to 3 weights; bias only with one) in one parallel region: linear_rows' bits",
        "x"_a, "weights"_a, "bias"_a = pybind11::none());
  m.def("rope_forward", &inl::rope_forward,
        "q and k rotated (RoPE, rotate-half) at positions [S] or [B, S]; inverse rotates back (the gradient)",
        "q"_a, "k"_a, "cos"_a, "sin"_a, "q_pos"_a, "k_pos"_a, "inverse"_a);
  m.def("attention_decode", &inl::attention_decode,
        "Attention of a few queries per row (decode) with RoPE on the fly, inference only", "q"_a, "k"_a, "v"_a,
        "causal"_a, "scale"_a, "cos"_a, "sin"_a, "kv_lens"_a, "kv_starts"_a);
  m.def("attention_prefill", &inl::attention_prefill,
        "Attention of every query over its own sequence's keys (Sq = Skv), q and k rotated, inference only", "q"_a,
        "k"_a, "v"_a, "causal"_a, "scale"_a);
  m.def("attention_prefill_lse", &inl::attention_prefill_lse,
        "attention_prefill and each query's log-sum-exp of its scaled scores (float32 [B, Hq, S]): [out, lse]", "q"_a,
        "k"_a, "v"_a, "causal"_a, "scale"_a);
  m.def("attention_prefill_backward", &inl::attention_prefill_backward,
        "The gradients [dq, dk, dv] of attention_prefill from the gradient of out, its inputs, out and lse", "grad"_a,
        "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "causal"_a, "scale"_a);
  m.def("cpu_capabilities", &inl::cpu_capabilities, "The CPU paths built in and runnable here, best first");
  m.def("cpu_built_capabilities", &inl::cpu_built_capabilities, "The CPU paths this build holds, best first");
  m.def("cpu_capability", &inl::cpu_capability, "The CPU path the ops run (avx512, avx2 or base)");
  m.def("threads_set_by_caller", &inl::threads_set_by_caller,
        "torch.set_num_threads(n) was called: n is the adaptive thread count's maximum from now on");
  m.def("set_cpu_capability", &inl::set_cpu_capability, "Runs the CPU ops on the named path ('auto': the best)",
        "name"_a);
  m.def("cpu_vector_width", [] { return inl::cpu_kernels().vector_width; }, "Floats per vector of the CPU path in use");
#ifdef INL_WITH_CUDA
  m.def("iterate_forward_cuda", &inl::iterate_forward_cuda, "The iterate's forward on CUDA tensors (decode shapes)",
        "h"_a, "x"_a, "v"_a, "w_h"_a, "w_x"_a, "w_v"_a, "w_o"_a, "bias"_a, "b_o"_a, "mod"_a, "mu"_a, "table"_a, "dt"_a,
        "kappa"_a, "num_iterations"_a, "tol"_a, "min_iterations"_a, "blocks"_a, "cols"_a, "shared_bytes"_a);
  m.def("iterate_decode_limits", &inl::iterate_decode_limits,
        "(multiprocessors, opt-in shared memory per block) of a CUDA device", "device"_a);
  m.def("iterate_decode_resident", &inl::iterate_decode_resident,
        "Blocks of the decode kernel resident per multiprocessor with this much shared memory", "dtype"_a,
        "shared_bytes"_a, "device"_a);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // the decode kernel's shared memory, in every build: the planner in inl_kernels/cuda/iterate.py
  // mirrors this formula and is tested against it without a GPU
  m.def("iterate_decode_shared_bytes", &inl::cuda::iterate_decode_shared_bytes,
        "Shared memory of one block of the CUDA decode iterate", "N"_a, "H"_a, "cols"_a);
  m.attr("iterate_decode_min_cols") = inl::cuda::kMinCols;
}
