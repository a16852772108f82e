"""The INL-LLM model (SPEC §4): low-rank token embedding → N blocks → rms_norm → LM head.

Every block, pre-norm and without biases:

    a = attention(rms_norm(x))                 GQA, RoPE inside the op, static KV cache at inference
    x = x + a
    s = inl_iterate(h=a, x=rms_norm(x))        the block's integrator: per-layer modulation of one
    x = x + s                                  shared controller, hierarchical mu, sparse excitation
    x = x + swiglu(rms_norm(x))

All math runs through the public ops of inl_kernels (via its modules), so whichever backend
`backend="auto"` finds on the machine (Triton on a GPU, the compiled CPU backend, the eager
reference) runs the model.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from inl_kernels import Controller, GQAttention, IntegratorLayer, Linear, LowRankEmbedding, RMSNorm, SwiGLU
from inl_kernels import functional as F_inl
from inl_kernels._dispatch import preferred
from inl_kernels._validate import token_ids as check_token_ids

from .cache import KVCache
from .config import INLConfig


class IntegratorStats(NamedTuple):
    """What one integrator (a block's, or one expert's rows of it) reports for the losses: no
    trajectory, only the iterate's own per-step statistics (SPEC §2)."""

    x: torch.Tensor  # [rows, d] final state x_T
    mu: torch.Tensor  # [d] the equilibrium it was pulled toward
    energy: torch.Tensor  # [rows, T] mean_j v² after each step
    distance: torch.Tensor  # [rows, T] mean_j |x − mu| after each step
    iterations: torch.Tensor  # [rows] int32 steps run (fewer than T after early exit)
    layer: int = -1  # the block it belongs to (set in the model's aux)
    expert: int = -1  # a mixture's expert index (-1: a block's only integrator)
    routing: Optional["Routing"] = None  # a mixture's routing of this forward (every expert's stats)


class Routing(NamedTuple):
    """A mixture's routing of one forward, what its load-balancing term is made of."""

    counts: torch.Tensor  # [E] rows routed to each expert (top_k slots per row; no gradient)
    prob_sums: torch.Tensor  # [E] the router's probabilities summed over the rows
    rows: int
    top_k: int
    mus: Optional[torch.Tensor]  # [E, d] every expert's equilibrium (made under torch.distributed only)


def _integrator(cfg: INLConfig, controller: Controller) -> IntegratorLayer:
    layer = IntegratorLayer(
        cfg.d_model, controller, num_iterations=cfg.num_iterations, dt=cfg.dt,
        kappa=cfg.alpha_kappa if cfg.dynamic_alpha else None,
        excitation_sparsity=cfg.excitation_sparsity if cfg.sparse_excitation else 1.0,
        excitation_amplitude=cfg.excitation_amplitude,
        mu_group_size=cfg.mu_group_size if cfg.hierarchical_mu else None, mu_init=cfg.mu_init,
        learnable_mu=cfg.learnable_mu, mu_ema_rate=cfg.mu_ema_rate,
        tol=cfg.tol if cfg.adaptive_stopping else None, min_iterations=cfg.min_iterations, backend=cfg.backend)
    # the global mu as shape [1], not a 0-dim scalar: FSDP2 shards every parameter along dim 0
    # and refuses scalars (it broadcasts in equilibrium() the same way); checkpoints saved with
    # the scalar still load (_mu_global_as_vector)
    layer.mu_global.data = layer.mu_global.data.reshape(1)
    # the excitation's frequencies and phases are made in fp32; like every other parameter they
    # take the default dtype the model is built in (transformers' from_pretrained(dtype=bf16) sets
    # it), so that loading in a dtype gives what build_model(...).to(dtype) gives
    for name in ("gamma", "phi"):
        getattr(layer, name).data = getattr(layer, name).data.to(torch.get_default_dtype())
    return layer


def _mu_global_as_vector(module, state_dict, prefix, *args):
    """load_state_dict pre-hook: a checkpoint written before mu_global became [1] holds it as a
    0-dim tensor."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith("mu_global") and value.dim() == 0:
            state_dict[key] = value.reshape(1)


@torch.compiler.disable  # a collective between forwards: eager, also inside a compiled forward
def _combine_mu_targets_over_ranks(layers: list) -> None:
    """Under torch.distributed with more than one rank (data parallel: every rank runs this
    training forward on its own rows), replaces each layer's mu EMA target just recorded by the
    mean of h over every rank's rows, so every replica applies the same update: what one process
    computes with the whole batch. One all_reduce of [sum of h, rows] per layer, packed into one
    tensor, issued by every rank after every training forward (each rank's training forwards
    match one to one under DDP; eval forwards and applying an update issue nothing, so a save or
    a forward on one rank alone never waits on the others).

    A mixture's expert may get no rows on a rank: it sends zeros there. If it ran on another
    rank, the update pending from before (the same on every rank), which the ranks where it ran
    applied at the start of their forward, is applied here now, then the combined target
    replaces it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not layers:
        return
    device = layers[0].mu_local.device
    parts = []
    for layer in layers:
        rows = torch.full((1,), float(layer._mu_rows), device=device)
        own = layer._mu_target.to(device) * rows if layer._mu_rows else torch.zeros(layer.d, device=device)
        parts += [own, rows]
    packed = torch.cat(parts)
    dist.all_reduce(packed)
    sums = packed.split([n for layer in layers for n in (layer.d, 1)])
    totals = torch.cat(sums[1::2]).tolist()  # one host sync
    for layer, total, summed in zip(layers, totals, sums[0::2]):
        if total == 0:  # no rank ran it: whatever it had pending stays so
            continue
        if not layer._mu_rows and layer._mu_target is not None:
            layer.apply_mu_ema()  # the ranks where it ran applied it at the start of their forward
        layer._mu_target, layer._mu_rows = summed / total, 0


class MixtureOfIntegrators(nn.Module):
    """num_experts integrators; a linear router on the state picks top_k of them per token and
    the block's output is their weighted sum (weights: the router's softmax, renormalised over
    the chosen k). Tokens are grouped by expert with one sort, each expert runs once on its rows
    (a loop over experts, never over tokens). The router's load-balancing term
    E · Σ_e f_e · P_e (f_e: share of routed slots, P_e: mean router probability) is returned for
    the loss. With the mu EMA on, each expert's mu follows the mean of the rows routed to it."""

    def __init__(self, d: int, experts: list, top_k: int):
        super().__init__()
        self.router = nn.Linear(d, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    def forward(self, h: torch.Tensor, x: torch.Tensor, num_iterations: int, trajectory: bool = False):
        """h, x [N, d] -> (out [N, d], [IntegratorStats per expert that got rows], balance), and with
        `trajectory` the mixture's x and v trajectories [N, T+1, d] (per row, the routing-weighted
        sum of its experts' trajectories, as `out` is of their final states) as a fourth value."""
        n, E, k = x.shape[0], len(self.experts), self.top_k
        logits = self.router(x)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [N, E]
        weights, chosen = probs.topk(k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).flatten()  # [N·k], slot = row·k + j
        flat = chosen.flatten()
        share = torch.zeros(E, device=x.device, dtype=probs.dtype).index_add_(0, flat, torch.ones_like(weights))
        share = share / max(n * k, 1)
        balance = E * (share * probs.mean(0)).sum()

        if x.is_meta:  # no values to route by: every expert sees every row (shape checks only)
            groups = [(torch.arange(n, device=x.device), probs[:, e]) for e in range(E)]
        else:
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=E).tolist()  # one host sync per block
            slots = order.split(counts)
            groups = [(s // k, weights[s]) for s in slots]

        out = torch.zeros_like(x)
        if trajectory:
            path_x, path_v = (x.new_zeros(n, num_iterations + 1, x.shape[1]) for _ in range(2))
        stats = []
        for index, (expert, (rows, w)) in enumerate(zip(self.experts, groups)):
            if rows.numel() == 0:
                continue
            if trajectory:
                y, info = expert(h[rows], x[rows], num_iterations=num_iterations, return_trajectory=True)
                w3 = w.to(y.dtype)[:, None, None]
                path_x = path_x.index_add(0, rows, info.trajectory_x * w3)
                path_v = path_v.index_add(0, rows, info.trajectory_v * w3)
            else:
                y, info = expert(h[rows], x[rows], return_info=True, num_iterations=num_iterations)
            out = out.index_add(0, rows, y * w.to(y.dtype)[:, None])
            stats.append(IntegratorStats(y, expert.equilibrium(), info.energy, info.distance, info.iterations,
                                         expert=index))
        # what the balance over several processes' rows needs (IntegratorLoss under data parallelism):
        # the rows routed to each expert (no gradient) and the router's probabilities summed over rows
        distributed = dist.is_available() and dist.is_initialized()
        routing = Routing(share.detach() * max(n * k, 1), probs.sum(0), n, k,
                          torch.stack([expert.equilibrium() for expert in self.experts]) if distributed else None)
        stats = [s._replace(routing=routing) for s in stats]
        return (out, stats, balance, (path_x, path_v)) if trajectory else (out, stats, balance)


def _sync_budgets(module, incompatible_keys):
    """IterationBudget's load_state_dict post-hook: the host copy follows the loaded budgets."""
    module._sync()


class Float32Buffers(nn.Module):
    """Keeps the buffers named in `float32_buffers` (running averages) in fp32 whatever the module
    is cast to (`module.to(bf16)`, `.half()`): in bf16 an average of 3.495 is 3.5, and an update of
    0.01·Δ rounds away, so an average of steps gets stuck (and is saved so)."""

    float32_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.float32_buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = getattr(self, name)
            if now.dtype != torch.float32:
                setattr(self, name, before.to(device=now.device, dtype=torch.float32))
        return self


class IterationBudget(Float32Buffers):
    """The seeds' adaptive budget allocator: layers that converge fast get fewer steps.

    Layer l keeps a running average a_l of the steps its rows used at inference (early exit),
    a_l ← m·a_l + (1 − m)·used_l, and runs budget_l = clamp(round(a_l) + slack, min_iterations,
    num_iterations) steps (round: half to even) in every later forward, training included. A
    layer whose rows all stop at step 3 settles at 3 + slack; one that runs out of budget at
    inference gets one step more at each update, back up to num_iterations. Budgets change only
    in `update()` (the trainer calls it after an evaluation), never inside a forward, so
    generation is reproducible."""

    def __init__(self, num_layers: int, num_iterations: int, min_iterations: int, slack: int = 1,
                 momentum: float = 0.5):
        super().__init__()
        self.num_iterations, self.min_iterations = num_iterations, max(1, min_iterations)
        self.slack, self.momentum = slack, momentum
        # fp32 whatever the default dtype is while the model is built (transformers' from_pretrained
        # sets it to the dtype asked for) and whatever the model is cast to later (_apply)
        self.register_buffer("average", torch.full((num_layers,), float(num_iterations), dtype=torch.float32))
        self.register_buffer("budgets", torch.full((num_layers,), num_iterations, dtype=torch.int64))
        self._budgets = [num_iterations] * num_layers  # host copy: a forward reads it without a sync
        self.register_load_state_dict_post_hook(_sync_budgets)  # a module-level function: pickles

    # the running average stays fp32 whatever the model is cast to: in bf16 an average of 3.495 is
    # 3.5, which rounds to a budget of 4 + slack instead of 3 + slack (and is saved so)
    float32_buffers = ("average",)

    def _sync(self):
        self._budgets = [int(b) for b in self.budgets.tolist()]

    def __getitem__(self, layer: int) -> int:
        return self._budgets[layer]

    @torch.no_grad()
    def update(self, used: torch.Tensor):
        """used [L]: mean steps per row each layer ran at inference since the last update."""
        self.average.mul_(self.momentum).add_((1 - self.momentum) * used.to(self.average))
        budgets = self.average.round() + self.slack
        self.budgets.copy_(budgets.clamp(self.min_iterations, self.num_iterations).long())
        self._sync()


class Block(nn.Module):
    def __init__(self, cfg: INLConfig, controller: Controller):
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps, cfg.backend)
        self.attn = GQAttention(d, cfg.num_heads, cfg.num_kv_heads, rope_base=cfg.rope_base,
                                max_seq_len=cfg.max_seq_len, backend=cfg.backend)
        self.integrator_norm = RMSNorm(d, cfg.norm_eps, cfg.backend)
        if cfg.mixture_of_integrators:
            self.integrator = MixtureOfIntegrators(
                d, [_integrator(cfg, controller) for _ in range(cfg.num_experts)], cfg.top_k)
        else:
            self.integrator = _integrator(cfg, controller)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, cfg.backend)
        self.ffn = SwiGLU(d, cfg.feedforward_dim, cfg.backend)
        # on each residual branch (the integrator's context h stays the undropped attention output)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_iterations: int, cache=None, kv_starts=None, trajectory: bool = False):
        """x [B, S, d] -> (x, [IntegratorStats], router balance or None), and with `trajectory`
        the integrator's (x, v) trajectories [B·S, T+1, d] as a fourth value. kv_starts [B]: each
        row's left padding (no cache); a static cache carries its own."""
        B, S, d = x.shape
        a, _ = self.attn(self.attn_norm(x), past_key_value=cache, kv_starts=kv_starts)
        state, x = self.integrator_norm(self.dropout(a), residual=x)  # rms_norm(x + a), x + a in one pass
        h, state = a.reshape(-1, d), state.reshape(-1, d)
        path = None
        if isinstance(self.integrator, MixtureOfIntegrators):
            s, stats, balance, *path = self.integrator(h, state, num_iterations, trajectory)
        else:
            s, info = self.integrator(h, state, return_info=True, num_iterations=num_iterations,
                                      return_trajectory=trajectory)
            if trajectory:
                path = [(info.trajectory_x, info.trajectory_v)]
            stats = [IntegratorStats(s, self.integrator.equilibrium(), info.energy, info.distance, info.iterations)]
            balance = None
        ffn_in, x = self.ffn_norm(self.dropout(s.view(B, S, d)), residual=x)
        x = x + self.dropout(self.ffn(ffn_in))
        return (x, stats, balance, path[0]) if trajectory else (x, stats, balance)


class IntegratorLanguageModel(nn.Module):
    def __init__(self, config: INLConfig):
        super().__init__()
        cfg = self.config = config
        d = cfg.d_model
        if cfg.low_rank_embeddings:
            self.embed = LowRankEmbedding(cfg.vocab_size, d, cfg.embedding_rank, backend=cfg.backend)
        else:
            self.embed = nn.Embedding(cfg.vocab_size, d)
        new_controller = lambda: Controller(d, cfg.controller_hidden, cfg.init_alpha, cfg.init_beta,  # noqa: E731
                                            cfg.init_gate)
        self.controller = new_controller() if cfg.shared_controller else None
        self.blocks = nn.ModuleList(Block(cfg, self.controller or new_controller()) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.norm_eps, cfg.backend)
        self.lm_head = None if cfg.tie_embeddings else Linear(d, cfg.vocab_size, bias=False, backend=cfg.backend)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()  # on the embedding
        self.budget = IterationBudget(cfg.num_layers, cfg.num_iterations, cfg.min_iterations, cfg.budget_slack,
                                      cfg.budget_momentum)
        # inference statistics (early exit), accumulated on the device without a sync
        self.register_buffer("_steps_run", torch.zeros(cfg.num_layers, dtype=torch.int64), persistent=False)
        self.register_buffer("_rows_seen", torch.zeros(cfg.num_layers, dtype=torch.int64), persistent=False)
        self._init_weights()
        self.register_load_state_dict_pre_hook(_mu_global_as_vector)

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2 style: N(0, 0.02) for the projections, 0.02/sqrt(2·layers) for the two that write
        into the residual stream. The controller keeps its own initialisation (it sets where the
        dynamics start), the embedding too (unit-scale rows).

        With tied embeddings the final norm's weight starts at 1/d_model instead of 1. The head is
        the embedding matrix E itself, and at initialisation the residual stream is still mostly
        the input token's own row e (the blocks write little into it): rms_norm(x) ≈ √d·e/|e|
        with |e| ≈ √d, so the current token would get a logit of about d (124 nats of initial
        loss at `tiny`, against ln V ≈ 5.6). At 1/d it gets about 1 and every other token about
        N(0, 1/d), so the tied model starts near ln V as the untied one does; the weight is
        learned (no decay) and grows as training needs. Only the starting point changes: what the
        head computes, and so what every checkpoint computes, stays as it was."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for block in self.blocks:
            for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.ffn.gate, block.ffn.up):
                nn.init.normal_(linear.weight, std=0.02)
            for linear in (block.attn.o_proj, block.ffn.down):
                nn.init.normal_(linear.weight, std=residual_std)
            if isinstance(block.integrator, MixtureOfIntegrators):
                nn.init.normal_(block.integrator.router.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        else:
            self.norm.weight.fill_(1.0 / self.config.d_model)
        if isinstance(self.embed, nn.Embedding):
            nn.init.normal_(self.embed.weight, std=1.0)

    # ---- pieces other code drives -------------------------------------------------------------

    def integrator_layers(self):
        """Every IntegratorLayer of the model (each expert of a mixture counts)."""
        for block in self.blocks:
            if isinstance(block.integrator, MixtureOfIntegrators):
                yield from block.integrator.experts
            else:
                yield block.integrator

    def set_excitation_amplitude(self, amplitude: float):
        for layer in self.integrator_layers():
            layer.excitation_amplitude = float(amplitude)

    def iteration_budgets(self) -> list[int]:
        """Steps each layer runs now."""
        if not self.config.iteration_budgets:
            return [self.config.num_iterations] * self.config.num_layers
        return [self.budget[i] for i in range(self.config.num_layers)]

    def reset_inference_stats(self):
        self._steps_run.zero_()
        self._rows_seen.zero_()

    def get_inference_stats(self) -> dict:
        """Average steps per row that each layer ran in eval-mode forwards since the last reset
        (early exit makes them fewer than the layer's budget)."""
        rows = self._rows_seen.clamp(min=1)
        avg = (self._steps_run.double() / rows).tolist()
        seen = self._rows_seen.tolist()
        return {
            "avg_iterations_per_layer": [a if s else None for a, s in zip(avg, seen)],
            "max_iterations_per_layer": self.iteration_budgets(),
            "avg_iterations": sum(self._steps_run.tolist()) / max(sum(seen), 1) if any(seen) else None,
            "rows_per_layer": [int(s) for s in seen],
        }

    def update_iteration_budgets(self):
        """Moves each layer's budget toward the steps it used in the evaluation just run (see
        IterationBudget); a no-op when budgets are off or nothing was evaluated."""
        if self.config.iteration_budgets and bool((self._rows_seen > 0).all()):
            self.budget.update(self._steps_run.double() / self._rows_seen)

    def apply_mu_ema(self):
        """Applies every integrator's pending mu EMA update now (each layer otherwise applies it
        at the start of its next forward; see IntegratorLayer): call it before saving, so the
        checkpoint holds the up-to-date mu."""
        for layer in self.integrator_layers():
            layer.apply_mu_ema()

    def activation_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in: autocast's when it is on for the parameters' device
        (it leaves fp64 alone, and so does the model), else the parameters' own."""
        weight = self.norm.weight
        device_type = weight.device.type
        if weight.dtype != torch.float64 and device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return weight.dtype

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        """A KV cache in the dtype keys and values will have now (activation_dtype: make it
        under the autocast the forward runs under)."""
        cfg = self.config
        return KVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, max_len or cfg.max_seq_len,
                       dtype=self.activation_dtype(), device=self.norm.weight.device)

    def num_params(self) -> int:
        """Distinct parameters (the shared controller counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                return_aux: bool = False, attention_mask: Optional[torch.Tensor] = None,
                return_trajectories: bool = False):
        """input_ids [B, S] -> (logits [B, S, V], aux or None, cache or None).

        With use_cache, a KVCache (new one of max_seq_len positions when past_key_values is
        None) is filled and returned; the tokens sit at positions cache.length … + S − 1.
        attention_mask [B, S] (or [B, cached + S]): 1 for real tokens, 0 for padding, which must
        sit at the start of a row (left padding: each row then computes what it computes alone)
        or at its end (right padding: causal attention never lets a real token see it). With a
        cache, the prompt's left padding is kept for every later step.
        aux: "iterations" [L] mean steps per row per layer, "energy" / "distance" (per layer,
        [T_l] means over rows after each step), "mu" (per layer, [d]; [E, d] for a mixture),
        "integrators" (every IntegratorStats, what IntegratorLoss reads) and "router_balance"
        (mean over mixture layers, None without one). return_trajectories (implies return_aux)
        adds "trajectory_x" and "trajectory_v": per layer the iterate's states [B, S, T_l+1, d],
        the initial state first (a row that exited early repeats its final state); they are
        kept only when asked for."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {list(input_ids.shape)}")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(input_ids.shape[0])
        if not torch.compiler.is_compiling():  # a compiled decode step leaves the host count to its caller
            start = past_key_values.length if past_key_values is not None else 0
            if start + input_ids.shape[1] > cfg.max_seq_len:
                raise ValueError(f"positions up to {start + input_ids.shape[1] - 1} exceed max_seq_len="
                                 f"{cfg.max_seq_len}")
        kv_starts = None if attention_mask is None else left_padding(attention_mask, input_ids)
        cached = getattr(past_key_values, "length", 0) if not torch.compiler.is_compiling() else 0
        if kv_starts is not None and cached and attention_mask.shape[1] == input_ids.shape[1]:
            # a mask of the new tokens alone after a prefill: the prompt's padding stays as the cache
            # holds it (its leading zeros, counted here, would have overwritten it with 0)
            if not bool(attention_mask.bool().all()):
                raise ValueError(f"attention_mask covers only the {input_ids.shape[1]} new token(s) and marks some as "
                                 f"padding after {cached} cached positions: padding goes before a prompt; pass "
                                 f"[batch, cached + new] = [{input_ids.shape[0]}, {cached + input_ids.shape[1]}] "
                                 f"to restate it")
            kv_starts = None
        if past_key_values is not None:
            past_key_values.begin(input_ids.shape[1], kv_starts)
            kv_starts = None  # the cache carries it

        x = self._embed(input_ids)
        checkpointing = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        budgets = self.iteration_budgets()
        return_aux = return_aux or return_trajectories
        per_layer, balances, paths = [], [], []
        for i, block in enumerate(self.blocks):
            cache = past_key_values.layers[i] if past_key_values is not None else None
            if checkpointing:
                x, stats, balance, *path = checkpoint(block, x, budgets[i], cache, kv_starts, return_trajectories,
                                                      use_reentrant=False)
            else:
                x, stats, balance, *path = block(x, budgets[i], cache, kv_starts, return_trajectories)
            paths.extend(path)
            if not self.training:
                with torch.no_grad():
                    self._steps_run[i] += sum(s.iterations.sum(dtype=torch.int64) for s in stats)
                    self._rows_seen[i] += sum(s.iterations.numel() for s in stats)
            per_layer.append(stats)
            if balance is not None:
                balances.append(balance)

        if past_key_values is not None:
            past_key_values.commit()
        if self.training and cfg.mu_ema_rate and dist.is_available() and dist.is_initialized():
            _combine_mu_targets_over_ranks(list(self.integrator_layers()))
        logits = self._logits(self.norm(x))

        aux = None
        if return_aux:
            def mean_rows(name):
                return [torch.cat([getattr(s, name) for s in stats]).float().mean(0) for stats in per_layer]
            aux = {
                "iterations": torch.stack([torch.cat([s.iterations for s in stats]).float().mean()
                                           for stats in per_layer]),
                "energy": mean_rows("energy"),
                "distance": mean_rows("distance"),
                "mu": [torch.stack([e.equilibrium() for e in b.integrator.experts])
                       if isinstance(b.integrator, MixtureOfIntegrators) else b.integrator.equilibrium()
                       for b in self.blocks],
                "integrators": [s._replace(layer=i) for i, stats in enumerate(per_layer) for s in stats],
                "router_balance": torch.stack(balances).mean() if balances else None,
            }
            if return_trajectories:
                B, S = input_ids.shape
                aux["trajectory_x"] = [px.reshape(B, S, *px.shape[1:]) for px, _ in paths]
                aux["trajectory_v"] = [pv.reshape(B, S, *pv.shape[1:]) for _, pv in paths]
        return logits, aux, (past_key_values if use_cache else None)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The blocks' input for these ids. Under autocast the blocks compute in its dtype from the
        embedding on (fp32 weights, low-precision activations); otherwise in the parameters' dtype."""
        if isinstance(self.embed, nn.Embedding):  # the low-rank embedding checks its ids itself
            check_token_ids("input_ids", input_ids, self.config.vocab_size)
        return self.dropout(self.embed(input_ids).to(self.activation_dtype()))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on the final normed states: lm_head(x), or tied, x·Eᵀ with E [V, d] the
        embedding matrix (embed_low·project_upᵀ for the low-rank embedding, computed as
        (x·project_up)·embed_lowᵀ), unscaled. Every path to logits (forward, the lean decoder,
        the Hugging Face wrapper) goes through here."""
        if self.lm_head is not None:
            return self.lm_head(x)
        backend = preferred(self.config.backend, "linear")
        if isinstance(self.embed, LowRankEmbedding):  # tied low-rank: (x · project_up) · embed_lowᵀ
            return F_inl.linear(x @ self.embed.project_up, self.embed.embed_low, backend=backend)
        return F_inl.linear(x, self.embed.weight, backend=backend)

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: float = 1.0, do_sample: bool = True,
                 eos_token_id: Optional[int] = None, use_cache: bool = True, generator=None,
                 attention_mask: Optional[torch.Tensor] = None, compile: bool = False, cuda_graph: bool = False,
                 eos_check_every: int = 8):
        """See inl_llm.generate.generate."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, do_sample=do_sample, eos_token_id=eos_token_id,
                        use_cache=use_cache, generator=generator, attention_mask=attention_mask, compile=compile,
                        cuda_graph=cuda_graph, eos_check_every=eos_check_every)


def left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's count of leading padding positions ([B], int32) from an attention mask of 1s for
    real tokens and 0s for padding (its last S columns cover input_ids). The mask must be a run of
    0s then 1s (left padding) or of 1s then 0s (right padding, which needs nothing: causal
    attention never shows a real token what follows it); checked on CPU tensors, where reading
    them costs no device sync."""
    B, S = input_ids.shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S:
        raise ValueError(f"attention_mask must have shape [batch, seq] = [{B}, >= {S}] like input_ids, got "
                         f"{list(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on {input_ids.device} like input_ids, got {attention_mask.device}")
    mask = attention_mask.to(torch.int32)
    starts = (mask.cumsum(1) == 0).sum(1, dtype=torch.int32)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        ones = mask.sum(1)
        left = torch.arange(mask.shape[1])[None, :] >= starts[:, None]
        right = torch.arange(mask.shape[1])[None, :] < ones[:, None]
        if not bool(((mask == 0) | (mask == 1)).all()) or not bool(((mask == left.int()) | (mask == right.int()))
                                                                    .all(1).all()):
            raise ValueError("attention_mask must hold 1s for tokens and 0s for padding, the padding at the start "
                             "(left padding) or at the end (right padding) of each row")
    return starts


def create_model(size: str = "tiny", vocab_size: Optional[int] = None, device=None, dtype=None,
                 **overrides) -> IntegratorLanguageModel:
    """The model of a named size (config.SIZES), any config field overridden by keyword.

    Parameters are a function of `seed` alone: they are drawn on the CPU under that seed (the
    caller's RNG state is left untouched) and then moved to `device`. device="meta" builds the
    model without allocating anything (shape checks of the large sizes)."""
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    config = INLConfig.from_name(size, **overrides)
    return build_model(config, device=device, dtype=dtype)


def build_model(config: INLConfig, device=None, dtype=None) -> IntegratorLanguageModel:
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            model = IntegratorLanguageModel(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            with torch.device("cpu"):
                model = IntegratorLanguageModel(config)
        if device is not None:
            model = model.to(device)
    return model.to(dtype) if dtype is not None else model
