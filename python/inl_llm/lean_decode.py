"""The eager decode step on a CPU without the Python around each kernel.

A decode step of `small` on 2 cores spends more time in Python than in its kernels: every op
call validates its arguments, picks a backend and checks that it may call the kernel directly,
and every module call goes through nn.Module's machinery, ~0.7 ms a layer against ~0.5 ms of
matmuls and kernels. Between two tokens of one `generate` call nothing of that changes but the
token and the position, so `LeanDecodeStep` does it once: it checks the model's structure, the
parameters (the ops' own argument checks) and picks each op's backend function when it is built,
and each token then runs the same backend functions on the same arguments as the model's
forward, in the same order (the same bits: tests/inl_llm/test_lean_decode.py compares logits
and the model's inference statistics with the forward's, step by step).

It applies to the model as `IntegratorLanguageModel` defines it, on CPU tensors, with every op
on the C++ backend ("auto" or "cpu"), a single integrator per block (no mixture), attention
projections that are inl_kernels.Linear (the model's own: the C++ few-row kernel) or plain
nn.Linear (F.linear), every module in eval mode and called as its class defines it (no hooks, no
`module.compile()`, no forward replaced on an instance), no autocast, and RoPE tables as long as
the cache; `generate` then uses it for every eager decode step with the cache (`why_not`
says what stops it). A step that finds gradients or autocast on, the profiler recording, a
tracer or a dispatch mode active runs the model's forward instead, so that a trace shows every
op. Keep `_step`, and csrc/cpu/decode.cpp (its loop body in C++), in line with
`Block.forward`, `GQAttention.forward`, `IntegratorLayer.forward` and the model's forward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

import inl_kernels
from inl_kernels import _validate as check
from inl_kernels._dispatch import implements, preferred, resolve
from inl_kernels.common import IterateParams, direct_calls, eager_direct
from inl_kernels.modules import GQAttention, IntegratorLayer, Linear, RMSNorm, SwiGLU

from .cache import KVCache
from .model import Block, IntegratorLanguageModel


class _Layer(NamedTuple):
    """One block's tensors and constants, looked up once (an nn.Module attribute costs a call)."""
    attn_norm: tuple  # (weight, eps) of each norm
    integrator_norm: tuple
    ffn_norm: tuple
    q_proj: object  # x -> the projection, as the module computes it
    k_proj: object
    v_proj: object
    o_proj: object
    heads: tuple  # (num_heads, num_kv_heads, head_dim)
    rope: tuple  # (cos, sin)
    cache: object  # the layer's LayerKVCache
    iterate: object  # (h, x) -> (x_T, IterateInfo): the C++ iterate with this layer's parameters
    ffn: object  # x -> swiglu(x, w_gate, w_up, w_down) on the C++ backend


class _Ops(NamedTuple):
    rms_norm: object
    attention: object


def _redirected(model: nn.Module) -> Optional[str]:
    """Why calling some module would not run its class's own forward: a forward hook (global or
    on a module), `module.compile()`, or a forward / __call__ set on the instance (as adapters
    that wrap modules do). The lean step reads the modules' tensors and never calls them."""
    from torch.nn.modules import module as nn_module

    if any(getattr(nn_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return "a global module hook is registered"
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return "a module hook is registered"
        if getattr(m, "_compiled_call_impl", None) is not None:
            return "a module is compiled (module.compile())"
        if "forward" in m.__dict__ or "__call__" in m.__dict__:
            return "a module's forward is replaced on the instance"
    return None


def why_not(model, cache) -> Optional[str]:
    """Why the lean step cannot run this model's decode (None when it can)."""
    if not isinstance(model, IntegratorLanguageModel) or type(model).forward is not IntegratorLanguageModel.forward:
        return "the model is not IntegratorLanguageModel's own forward"
    if "cpu" not in inl_kernels.backends():
        return "the C++ CPU backend is not built"
    if not isinstance(cache, KVCache):
        return "no static KV cache"
    weight = model.norm.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}"
    if any(m.training for m in model.modules()):
        return "the model (or one of its modules) is in training mode"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on"
    if torch.is_grad_enabled():
        return "gradients are on"
    if model.activation_dtype() not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activations in {model.activation_dtype()}"
    redirected = _redirected(model)
    if redirected is not None:
        return redirected
    if type(model.norm) is not RMSNorm:
        return "the final norm is not RMSNorm"
    for block in model.blocks:
        kinds = (type(block), type(block.attn), type(block.integrator), type(block.ffn), type(block.attn_norm),
                 type(block.integrator_norm), type(block.ffn_norm))
        if kinds != (Block, GQAttention, IntegratorLayer, SwiGLU, RMSNorm, RMSNorm, RMSNorm):
            return "a block is not made of the library's modules (a mixture of integrators, a subclass, ...)"
        at, ffn = block.attn, block.ffn
        if (any(type(m) not in (nn.Linear, Linear) for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj))
                or any(type(m) is not nn.Linear for m in (ffn.gate, ffn.up, ffn.down))):
            return "a projection is not a plain nn.Linear or inl_kernels.Linear (an adapter, a quantized layer, ...)"
        if any(m.bias is not None for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj)):
            return "an attention projection has a bias"
        if cache.max_len > at.cos.shape[0]:
            return f"the cache holds {cache.max_len} positions, the RoPE tables {at.cos.shape[0]}"
    for name, module in model.named_modules():  # what build() checks op by op
        backend = getattr(module, "backend", None)
        if isinstance(backend, str) and backend not in ("auto", "cpu"):
            return f"{name} runs backend {backend!r}; the lean step runs the C++ CPU kernels"
    return None


class LeanDecodeStep:
    """step(token [B, 1]) -> logits [B, V], what `decode_one_token(model, token, cache)` returns,
    with the same effect on the cache and the model's inference statistics. Build it with
    `LeanDecodeStep.build(model, cache)`, after the prefill and inside the `no_grad` of the
    generation: None where `why_not` gives a reason."""

    def __init__(self, model: IntegratorLanguageModel, cache: KVCache, layers: list, ops: _Ops, fused=None):
        self.model, self.cache, self.layers, self.ops = model, cache, layers, ops
        self.final_norm = (model.norm.weight, float(model.norm.eps))
        self.fused = fused  # the layers bound for _C.decode_layers, or None
        self.head = None  # the embedding, final norm and LM head bound for _C.decode_step, or None
        if fused is not None:
            from inl_kernels.cpu import _C, attention  # built: why_not checked it
            self._decode_layers, self._cpu_attention = _C.decode_layers, attention
            self._decode_step = _C.decode_step
            self.head = _fused_head(model, cache.batch_size)

    @classmethod
    def build(cls, model, cache) -> Optional["LeanDecodeStep"]:
        if why_not(model, cache) is not None:
            return None
        from inl_kernels.cpu import iterate as cpu_iterate, swiglu as cpu_swiglu  # built: why_not checked it
        cfg, B, act = model.config, cache.batch_size, model.activation_dtype()
        d = cfg.d_model
        budgets = model.iteration_budgets()
        x = torch.zeros(B, 1, d, dtype=act)
        layers, tensors, fused = [], [], []
        ops = None
        for i, block in enumerate(model.blocks):
            it = block.integrator
            it.apply_mu_ema()  # a pending update is applied at the start of a forward: none after the prefill
            # the op's own checks, once: IntegratorLayer.forward's arguments in eval mode
            params = IterateParams(**it.controller.weights(), mod_scale=it.mod_scale, mod_bias=it.mod_bias,
                                   mu=it.equilibrium(), exc_index=it.exc_index, gamma=it.gamma, phi=it.phi)
            rows = x.reshape(-1, d)
            settings = check.iterate_args(rows, rows, None, params, it.excitation_amplitude, it.dt, it.kappa,
                                          budgets[i] or it.num_iterations, it.tol, it.min_iterations, True, False)
            at = block.attn
            q = torch.zeros(B, at.num_heads, 1, at.head_dim, dtype=act)
            k = torch.zeros(B, at.num_kv_heads, cache.max_len, at.head_dim, dtype=act)
            lens = torch.zeros(B, dtype=torch.int32)
            chosen = _Ops(
                *(_cpu_function(op, module.backend, *args) for op, module, args in (
                    ("rms_norm", block.attn_norm, (x, block.attn_norm.weight, float(block.attn_norm.eps), x)),
                    ("attention", at, (q, k, k, True, None, (at.cos, at.sin), lens, lens)))))
            for norm in (block.integrator_norm, block.ffn_norm):
                if _cpu_function("rms_norm", norm.backend, x, norm.weight, float(norm.eps), x) is None:
                    return None
            ffn = block.ffn
            w_ffn = (ffn.gate.weight, ffn.up.weight, ffn.down.weight)
            if (None in chosen or (ops is not None and chosen != ops)
                    or _cpu_function("iterate", it.backend, rows, rows, None, params, settings) is None
                    or _cpu_function("swiglu", ffn.backend, x, *w_ffn) is None):
                return None
            ops = chosen
            layer_cache = cache.layers[i]
            if layer_cache.k is None or layer_cache.k.dtype != act:
                return None
            projections = [_projection(m, x.view(B, d) if m is not at.o_proj else q.view(B, -1))
                           for m in (at.q_proj, at.k_proj, at.v_proj, at.o_proj)]
            if None in projections:
                return None
            layers.append(_Layer(
                *((norm.weight, float(norm.eps)) for norm in (block.attn_norm, block.integrator_norm, block.ffn_norm)),
                *projections,
                (at.num_heads, at.num_kv_heads, at.head_dim), (at.cos, at.sin), layer_cache,
                cpu_iterate.prepared_inference(params, settings, d),
                cpu_swiglu.prepared_inference(*w_ffn, act)))
            if fused is not None:
                one = _fused_layer(block, layer_cache, params, settings, d, act, B)
                fused = None if one is None else fused + [one]
            tensors += [*params, *(p for p in block.parameters()), at.cos, at.sin]
        # eager_direct: no tensor subclass (DTensor, ...), no profiler recording, no mode
        if (_cpu_function("rms_norm", model.norm.backend, x, model.norm.weight, float(model.norm.eps), None) is None
                or not eager_direct(*tensors, model.norm.weight)):
            return None
        return cls(model, cache, layers, ops, fused or None)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        # the model's structure, hooks and tensors were checked when the step was built (generate
        # changes none of them between tokens); what may change is the global state
        if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or not eager_direct()):  # the profiler records, a tracer or a mode is on
            from .generate import decode_one_token
            return decode_one_token(self.model, token, self.cache)
        with direct_calls():
            return self._step(token)

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        model, cache, ops = self.model, self.cache, self.ops
        rms_norm, attention = ops
        B, S = token.shape
        cache.begin(S)
        index, kv_lens = cache.pending(S)
        kv_starts = cache.starts
        # every layer in one C++ call, the same bits; it calls the decode attention kernel, so only
        # where the Python path would (cpu attention's DECODE_QUERIES, read now: tests lower it)
        fused = self.fused is not None and B * S <= _FUSED_ROWS and S <= self._cpu_attention.DECODE_QUERIES
        if fused and self.head is not None and token.dtype == torch.int64:  # the whole model in one call
            logits, iterations = self._decode_step(token, self.fused, self.head, index, kv_lens, kv_starts)
            model._steps_run += iterations.sum(1, dtype=torch.int64)
            model._rows_seen += B * S
            cache.commit()
            return logits
        x = model._embed(token)
        if fused:
            x, iterations = self._decode_layers(x, self.fused, index, kv_lens, kv_starts)
            model._steps_run += iterations.sum(1, dtype=torch.int64)
            model._rows_seen += B * S
            cache.commit()
            return model._logits(rms_norm(x, *self.final_norm, None))[:, -1]
        iterations = []
        for (attn_norm, integrator_norm, ffn_norm, q_proj, k_proj, v_proj, o_proj, (Hq, Hkv, D), rope, layer_cache,
             iterate, ffn) in self.layers:
            # GQAttention.forward with a static cache (LayerKVCache.update: its checks hold for
            # every step once they held when this step was built)
            n = rms_norm(x, *attn_norm, None)
            q = q_proj(n).view(B, S, Hq, D).transpose(1, 2)
            k = k_proj(n).view(B, S, Hkv, D).transpose(1, 2)
            v = v_proj(n).view(B, S, Hkv, D).transpose(1, 2)
            layer_cache.k.index_copy_(2, index, k)
            layer_cache.v.index_copy_(2, index, v)
            out = attention(q, layer_cache.k, layer_cache.v, True, None, rope, kv_lens, kv_starts)
            a = o_proj(out.transpose(1, 2).reshape(B, S, Hq * D))
            # Block.forward (dropout is the identity in eval mode) and IntegratorLayer.forward
            state, x = rms_norm(a, *integrator_norm, x)
            d = x.shape[-1]
            s, info = iterate(a.reshape(-1, d).contiguous(), state.reshape(-1, d).contiguous())
            iterations.append(info.iterations)
            ffn_in, x = rms_norm(s.view(B, S, d), *ffn_norm, x)
            x = x + ffn(ffn_in)
        # the model's inference statistics, as its forward keeps them in eval mode
        model._steps_run += torch.stack(iterations).sum(1, dtype=torch.int64)
        model._rows_seen += B * S
        cache.commit()
        return model._logits(rms_norm(x, *self.final_norm, None))[:, -1]


_FUSED_ROWS = 4  # the rows _C.decode_layers takes (its projections' and SwiGLU's few-row kernels)


def _fused_layer(block, layer_cache, params, settings, d: int, act, B: int):
    """The block bound for `_C.decode_layers` (csrc/cpu/decode.cpp), which runs `_step`'s loop body
    in C++ with the same kernels on the same arguments: fp32 activations, at most _FUSED_ROWS rows,
    every attention projection an inl_kernels.Linear on the C++ backend (their few-row kernel), the
    decode attention kernel's RoPE tables (fp32, an even head size). None otherwise: `_step` then
    runs the layer in Python."""
    at, ffn = block.attn, block.ffn
    projections = (at.q_proj, at.k_proj, at.v_proj, at.o_proj)
    if (act != torch.float32 or B > _FUSED_ROWS or any(type(m) is not Linear for m in projections)
            or at.head_dim % 2 or at.cos.dtype != torch.float32 or at.sin.dtype != torch.float32
            or at.cos.dim() != 2):
        return None
    from inl_kernels.cpu import _C, iterate as cpu_iterate  # built: why_not checked it
    weights, rest = cpu_iterate.inference_arguments(params, settings, d)
    dt, kappa, T, tol, min_iterations, _, _, pack = rest
    return _C.DecodeLayer(
        block.attn_norm.weight, float(block.attn_norm.eps), block.integrator_norm.weight,
        float(block.integrator_norm.eps), block.ffn_norm.weight, float(block.ffn_norm.eps),
        *(m.weight.contiguous() for m in projections), at.num_heads, at.num_kv_heads, at.head_dim,
        layer_cache.k, layer_cache.v, at.cos, at.sin, list(weights[:8]), weights[8], dt, kappa, T, tol,
        min_iterations, pack, *(w.contiguous() for w in (ffn.gate.weight, ffn.up.weight, ffn.down.weight)))


def _fused_head(model, B: int):
    """The model's embedding, final norm and LM head bound for `_C.decode_step`
    (csrc/cpu/decode.cpp), which runs what `_step` runs around the layers — `model._embed`, the
    final norm, `model._logits` — as the same ATen calls and kernels: the reference embedding (an
    nn.Embedding without max_norm, or the library's low-rank one), an LM head whose projection
    takes the C++ backend's few-row kernel (an inl_kernels.Linear without bias, or tied), fp32
    plain tensors. None otherwise: `_step` then runs them in Python around _C.decode_layers."""
    from inl_kernels.cpu import _C  # built: why_not checked it
    from inl_kernels.modules import LowRankEmbedding
    embed, d = model.embed, model.config.d_model
    if any(getattr(type(model), name) is not getattr(IntegratorLanguageModel, name) or name in model.__dict__
           for name in ("_embed", "_logits")):
        return None  # a subclass, or the instance, computes them its own way
    if type(embed) is nn.Embedding:
        if embed.max_norm is not None:  # the lookup renormalises rows in place
            return None
        table, project_up = embed.weight, None
    elif isinstance(embed, LowRankEmbedding) and type(embed).forward is LowRankEmbedding.forward:
        if preferred(embed.backend, "embedding") not in ("auto", "reference"):
            return None
        table, project_up = embed.embed_low, embed.project_up
    else:
        return None
    x = torch.zeros(B, 1, d)
    if model.lm_head is not None:
        head = model.lm_head
        if type(head) is not Linear or head.bias is not None or _projection(head, x) is None:
            return None
        lm_head = head.weight
    else:  # tied: x·Eᵀ, or (x·project_up)·embed_lowᵀ, through inl_kernels.linear with the model's backend
        lm_head = None
        sample = x if project_up is None else x.new_zeros(B, 1, project_up.shape[1])
        if _cpu_function("linear", model.config.backend, sample, table, None) is None:
            return None
    tensors = [t for t in (table, project_up, lm_head, model.norm.weight) if t is not None]
    if any(t.dtype != torch.float32 or type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return None
    return _C.DecodeHead(table.detach().contiguous(), None if project_up is None else project_up.detach(),
                         model.norm.weight.detach(), float(model.norm.eps),
                         None if lm_head is None else lm_head.detach().contiguous(), model.config.vocab_size)


def _projection(module: nn.Linear, x: torch.Tensor):
    """x -> module(x) for the lean step: F.linear for a plain nn.Linear, the C++ backend's
    prepared linear for an inl_kernels.Linear whose backend runs it on such inputs (x: a sample
    of the step's input), else None."""
    weight = module.weight
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, weight)
    if _cpu_function("linear", module.backend, x, weight, None) is None:
        return None
    from inl_kernels.cpu import linear as cpu_linear  # built: why_not checked it
    return cpu_linear.prepared_inference(weight)


def _cpu_function(op: str, backend: str, *args):
    """The C++ backend's function for `op` when a module configured with `backend` would run it
    on these arguments, else None."""
    name = preferred(backend, op)
    if name not in ("auto", "cpu") or not implements("cpu", op):
        return None
    try:
        cpu = resolve(op, "cpu", "cpu", *args)
    except ValueError:  # the C++ backend does not run these arguments (their dtype)
        return None
    return cpu if resolve(op, name, "cpu", *args) is cpu else None
