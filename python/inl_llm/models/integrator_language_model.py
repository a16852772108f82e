"""The original package's language model API (`inl_llm.models`), served by our model.

`UltraOptimizedIntegratorLanguageModel` (also `IntegratorLanguageModel` here) takes the
original's keyword constructor and defaults and builds this project's INL-LLM (SPEC §4: RMSNorm,
GQA attention with RoPE, the fused iterate, SwiGLU) from them. Its forward, generate,
get_num_params and get_inference_stats take the original's arguments and return its shapes:

    logits, aux = model(input_ids, return_aux=True)        # aux: one dict per layer
    logits, aux, cache = model(input_ids, use_cache=True, return_aux=True)   # the v3 document's form

aux[i] = {'x', 'v': the layer's iterate trajectory [B·S, T+1, d] (initial state first), 'mu' [d],
'mu_global', 'mu_offsets' (hierarchical mu, else None), 'energy', 'distance' [B·S, T], and in eval
mode 'iterations_used' [B·S] (steps each row ran), 'converged' [B·S], 'avg_iterations'}. The list
also carries our own aux dict as `.aux` (what inl_llm.IntegratorLoss reads).

`model.layers[i].inl.avg_iterations` is the running average (rate 0.01, started at the first
eval forward) of the mean steps per row layer i ran in eval-mode forwards. The top-level
`inl_llm.IntegratorLanguageModel` (INLConfig constructor, three return values) is unchanged.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..config import INLConfig
from ..model import Float32Buffers, MixtureOfIntegrators
from ..model import IntegratorLanguageModel as _Model

_MODEL_TAKES_MASK = "attention_mask" in inspect.signature(_Model.forward).parameters


class LayerAux(list):
    """One aux dict per layer (the original's list), with our aux dict as `.aux`."""

    aux: Optional[dict] = None


class _InlView:
    """A block's integrator seen as the original's `layer.inl`: avg_iterations, get_mu(),
    mu_global / mu_local_offsets, a settable excitation_amplitude; anything else is the
    integrator's own attribute."""

    def __init__(self, model, index):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_index", index)

    @property
    def _layer(self):
        return self._model.blocks[self._index].integrator

    @property
    def avg_iterations(self) -> torch.Tensor:
        return self._model._avg_iterations[self._index]

    @property
    def mu_local_offsets(self):
        return self._layer.mu_local

    def get_mu(self) -> torch.Tensor:
        layer = self._layer
        if isinstance(layer, MixtureOfIntegrators):
            return torch.stack([e.equilibrium() for e in layer.experts])
        return layer.equilibrium()

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __setattr__(self, name, value):
        if name == "excitation_amplitude":
            block = self._model.blocks[self._index]
            layers = block.integrator.experts if isinstance(block.integrator, MixtureOfIntegrators) else [
                block.integrator]
            for layer in layers:
                layer.excitation_amplitude = float(value)
        else:
            setattr(self._layer, name, value)


class _LayerView:
    """`model.layers[i]`: block i with the original's `.inl`."""

    def __init__(self, model, index):
        self._block = model.blocks[index]
        self.inl = _InlView(model, index)

    def __getattr__(self, name):
        return getattr(self._block, name)


def _is_causal_mask(mask: torch.Tensor, seq_len: int) -> bool:
    """True for nn.MultiheadAttention's causal attn_mask ([S, S], True / -inf above the diagonal)."""
    if mask.shape != (seq_len, seq_len):
        return False
    above = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else torch.isinf(mask) & (mask < 0)
    return bool(torch.equal(blocked, above))


class CompatLanguageModel(Float32Buffers, _Model):
    """What the original's language models share: the call signature, the aux list, the layer
    views and the running average of the steps run."""

    float32_buffers = ("_avg_iterations",)  # a running average: fp32 under any cast

    def __init__(self, config: INLConfig, seeded: bool = False):
        """seeded (the caller passed `seed=`): the parameters are a function of config.seed alone,
        drawn under it with the caller's RNG left untouched, as build_model draws them; without it
        they come from the caller's RNG, as the original's did (torch.manual_seed before the
        constructor)."""
        if seeded:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                super().__init__(config)
        else:
            super().__init__(config)
        L = config.num_layers
        self.register_buffer("_avg_iterations", torch.zeros(L, dtype=torch.float32), persistent=False)
        self.register_buffer("_num_forwards", torch.zeros((), dtype=torch.int64), persistent=False)

    # the original's attribute names
    @property
    def layers(self) -> list:
        return [_LayerView(self, i) for i in range(len(self.blocks))]

    @property
    def token_embedding(self):
        return self.embed

    @property
    def final_norm(self):
        return self.norm

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def _mask_kwargs(self, attention_mask, input_ids) -> dict:
        if attention_mask is None:
            return {}
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        B, S = input_ids.shape
        if _is_causal_mask(attention_mask, S):  # the original's own default: our attention is causal already
            return {}
        if _MODEL_TAKES_MASK:  # a [B, S] padding mask, for the model to apply
            return {"attention_mask": attention_mask}
        if attention_mask.shape == (B, S) and bool((attention_mask != 0).all()):  # nothing padded
            return {}
        raise NotImplementedError("attention_mask: padded batches need a model that takes attention_mask (only the "
                                  "causal [S, S] mask and an all-ones [B, S] mask are accepted here)")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                return_aux: bool = False, *, past_key_values=None, use_cache: bool = False):
        """-> (logits [B, S, V], aux list or None), or (logits, aux, cache) with use_cache."""
        kwargs = self._mask_kwargs(attention_mask, input_ids)
        before = None if self.training else (self._steps_run.clone(), self._rows_seen.clone())
        logits, aux, cache = super().forward(input_ids, past_key_values=past_key_values, use_cache=use_cache,
                                             return_aux=return_aux, return_trajectories=return_aux, **kwargs)
        if before is not None:
            self._record_iterations(*before)
        layers = self._layer_aux(aux) if return_aux else None
        return (logits, layers, cache) if use_cache else (logits, layers)

    @torch.no_grad()
    def _record_iterations(self, steps_before, rows_before):
        rows = self._rows_seen - rows_before
        if not bool((rows > 0).all()):
            return
        mean = (self._steps_run - steps_before).float() / rows.float()
        first = self._num_forwards == 0
        self._avg_iterations.copy_(torch.where(first, mean, 0.99 * self._avg_iterations + 0.01 * mean))
        self._num_forwards += 1

    def _layer_aux(self, aux: dict) -> LayerAux:
        out = LayerAux()
        out.aux = aux
        mixture = any(isinstance(b.integrator, MixtureOfIntegrators) for b in self.blocks)
        for i, block in enumerate(self.blocks):
            xs, vs = aux["trajectory_x"][i], aux["trajectory_v"][i]
            layer = block.integrator
            hier = not mixture and layer.mu_group_size
            entry = {"x": xs.reshape(-1, *xs.shape[2:]), "v": vs.reshape(-1, *vs.shape[2:]), "mu": aux["mu"][i],
                     "mu_global": layer.mu_global if hier else None, "mu_offsets": layer.mu_local if hier else None}
            if not mixture:
                stats = aux["integrators"][i]
                entry.update(energy=stats.energy, distance=stats.distance)
                if not self.training:
                    used = stats.iterations.float()
                    entry.update(iterations_used=used, converged=used < xs.shape[2] - 1,
                                 avg_iterations=self._avg_iterations[i].item())
            out.append(entry)
        return out

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = True, **kwargs):
        """The original's arguments; ours (repetition_penalty, eos_token_id, use_cache=True,
        generator) by keyword. -> [B, S + n] ids (KV-cached decoding, early exit on)."""
        return super().generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                do_sample=do_sample, **kwargs)

    def get_num_params(self) -> int:
        """Distinct parameters (the shared controller counted once)."""
        return self.num_params()

    def _optimizations(self) -> dict:
        c = self.config
        return {"low_rank_embeddings": c.low_rank_embeddings, "shared_controllers": c.shared_controller,
                "hierarchical_equilibrium": c.hierarchical_mu, "sparse_excitation": c.sparse_excitation,
                "gradient_checkpointing": c.gradient_checkpointing, "adaptive_stopping": c.adaptive_stopping}


class UltraOptimizedIntegratorLanguageModel(CompatLanguageModel):
    """The original's keyword constructor and defaults (every optimization on), plus the v3
    document's num_kv_heads (default: num_heads, i.e. plain multi-head attention as the
    original) and any INLConfig field by keyword (seed, backend, ...). With `seed=` the
    parameters are a function of it alone; without, they come from torch's global RNG, as the
    original's did."""

    def __init__(self, vocab_size: int, d_model: int = 512, num_layers: int = 6, num_heads: int = 8,
                 num_iterations_per_layer: int = 5, feedforward_dim: Optional[int] = None, max_seq_len: int = 2048,
                 dropout: float = 0.1, use_lowrank_embeddings: bool = True, lowrank_ratio: float = 0.125,
                 use_gradient_checkpointing: bool = True, use_shared_controllers: bool = True,
                 use_adaptive_stopping: bool = True, adaptive_convergence_threshold: float = 0.001,
                 hierarchical_group_size: int = 64, excitation_sparsity: float = 0.1,
                 num_kv_heads: Optional[int] = None, **config):
        super().__init__(INLConfig(
            vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads, feedforward_dim=feedforward_dim or 4 * d_model,
            max_seq_len=max_seq_len, num_iterations=num_iterations_per_layer, dropout=dropout,
            low_rank_embeddings=use_lowrank_embeddings, embedding_rank_ratio=lowrank_ratio,
            gradient_checkpointing=use_gradient_checkpointing, shared_controller=use_shared_controllers,
            adaptive_stopping=use_adaptive_stopping, tol=adaptive_convergence_threshold,
            min_iterations=min(3, num_iterations_per_layer), hierarchical_mu=True, mu_group_size=hierarchical_group_size,
            sparse_excitation=True, excitation_sparsity=excitation_sparsity, **config), seeded="seed" in config)

    def get_inference_stats(self) -> dict:
        """The original's keys (num_params, num_layers, d_model, optimizations_enabled) and ours
        (avg_iterations_per_layer, max_iterations_per_layer, avg_iterations, rows_per_layer)."""
        return {"num_params": self.get_num_params(), "num_layers": self.config.num_layers,
                "d_model": self.config.d_model, "optimizations_enabled": self._optimizations(),
                **super().get_inference_stats()}


IntegratorLanguageModel = UltraOptimizedIntegratorLanguageModel

# the original's sizes: d_model, layers, heads, iterations per layer, FF width
ULTRA_SIZES = {
    "small": (512, 6, 8, 5, 2048), "medium": (768, 12, 12, 7, 3072), "large": (1024, 24, 16, 10, 4096),
    "xlarge": (1536, 32, 24, 12, 6144), "3B": (2048, 40, 32, 15, 8192), "7B": (4096, 32, 32, 10, 16384),
    "13B": (5120, 40, 40, 12, 20480), "30B": (6656, 60, 52, 12, 26624), "70B": (8192, 80, 64, 12, 32768),
}


def create_ultra_optimized_model(size: str = "small", vocab_size: int = 50000,
                                 **config) -> UltraOptimizedIntegratorLanguageModel:
    """The original's named sizes (ULTRA_SIZES), every optimization on, max_seq_len 2048."""
    if size not in ULTRA_SIZES:
        raise ValueError(f"size must be one of {list(ULTRA_SIZES)}, got {size!r}")
    d, layers, heads, iterations, ff = ULTRA_SIZES[size]
    return UltraOptimizedIntegratorLanguageModel(
        vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=heads, num_iterations_per_layer=iterations,
        feedforward_dim=ff, max_seq_len=2048, use_lowrank_embeddings=True, lowrank_ratio=0.125,
        use_gradient_checkpointing=True, use_shared_controllers=True, hierarchical_group_size=64,
        excitation_sparsity=0.1, **config)


create_model = create_ultra_optimized_model
