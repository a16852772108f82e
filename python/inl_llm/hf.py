"""The Hugging Face face of INL-LLM (the optional `[hf]` extra: `pip install -e ".[hf]"`).

    import inl_llm.hf                                   # registers "inl_llm" with the Auto classes
    from transformers import AutoModelForCausalLM
    model = inl_llm.hf.INLForCausalLM.from_inl_checkpoint("checkpoints/demo")
    model.save_pretrained("hf/demo")
    model = AutoModelForCausalLM.from_pretrained("hf/demo")
    out = model.generate(ids, max_new_tokens=50, do_sample=False)    # transformers' generate
    loss = model(ids, labels=ids).loss                                 # transformers.Trainer trains it

- `INLLLMConfig` (PretrainedConfig, model_type "inl_llm") carries every INLConfig field.
- `INLForCausalLM` (PreTrainedModel + GenerationMixin) holds our IntegratorLanguageModel as
  `.model`, unchanged: its state dict is ours under the prefix "model.". Generation runs on our own
  static KV cache (transformers' cache classes are not used). `labels` follow the transformers
  convention: the model shifts them (position i predicts labels[i + 1]), -100 is ignored.
- `to_hf(checkpoint, hf_dir)` / `from_hf(hf_dir, checkpoint)` convert directories both ways.

Only this module imports transformers: the core package runs without it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from inl_kernels import GQAttention
from inl_kernels.reference.rope import rope_tables

from .cache import KVCache
from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .config import INLConfig
from .data import ByteTokenizer
from .model import IntegratorLanguageModel, build_model

_FIELDS = [f.name for f in dataclasses.fields(INLConfig)]
_DEFAULTS = INLConfig().to_dict()
# INLConfig fields whose name means something else to transformers (top_k is a sampling setting
# there; ours is the mixture's router): stored under another name in the transformers config
_HF_NAMES = {"top_k": "router_top_k"}


class INLLLMConfig(PretrainedConfig):
    """Every INLConfig field as an attribute (same names and defaults, top_k as router_top_k),
    plus transformers' own."""

    model_type = "inl_llm"

    def __init__(self, **kwargs):
        for name in _FIELDS:
            setattr(self, _HF_NAMES.get(name, name), kwargs.pop(_HF_NAMES.get(name, name), _DEFAULTS[name]))
        tok = ByteTokenizer
        for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id),
                           ("tie_word_embeddings", False)):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.to_inl_config()  # INLConfig checks every field now, naming a bad one

    @classmethod
    def from_inl_config(cls, config: INLConfig, **kwargs) -> "INLLLMConfig":
        return cls(**{_HF_NAMES.get(k, k): v for k, v in config.to_dict().items()}, **kwargs)

    def to_inl_config(self) -> INLConfig:
        return INLConfig(**{name: getattr(self, _HF_NAMES.get(name, name)) for name in _FIELDS})


def _shared_controller_keys(model: IntegratorLanguageModel) -> dict:
    """{every other name of a shared-controller tensor: its name under model.controller} in the
    wrapper's naming (prefix "model.")."""
    if model.controller is None:
        return {}
    own = {id(t): name for name, t in model.controller.named_parameters()}
    tied = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        if id(tensor) in own and not name.startswith("controller."):
            tied[f"model.{name}"] = f"model.controller.{own[id(tensor)]}"
    return tied


class INLForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = INLLLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # the shared controller under each block's (or expert's) name: saved once, as model.controller
    _tied_weights_keys = {r"model\.blocks\.\d+\.integrator\.(experts\.\d+\.)?controller\.": "model.controller."}

    def __init__(self, config: INLLLMConfig):
        super().__init__(config)
        inl = config.to_inl_config()
        if torch.get_default_device().type == "meta":  # from_pretrained: shapes now, weights loaded next
            self.model = IntegratorLanguageModel(inl)
        else:  # a new model: the parameters are a function of config.seed, as build_model makes them
            self.model = build_model(inl)
        self.post_init()

    # ---- transformers' hooks ----------------------------------------------------------------

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # every block's integrator reads the one shared controller: its tensors appear under each
        # block's name too, and are saved once, under model.controller
        return _shared_controller_keys(self.model)

    @torch.no_grad()
    def _init_weights(self, module):
        """Parameters come from build_model (seeded) or the loaded file; only the buffers
        transformers leaves empty after loading (those not in a state dict) are filled here."""
        if isinstance(module, GQAttention):
            cos, sin = rope_tables(module.max_seq_len, module.head_dim, module.rope_base, device=module.cos.device)
            module.cos.copy_(cos.to(module.cos.dtype))
            module.sin.copy_(sin.to(module.sin.dtype))
        elif isinstance(module, IntegratorLanguageModel):
            module._steps_run.zero_()
            module._rows_seen.zero_()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            model[0].model.budget._sync()
        else:
            model.model.budget._sync()  # the host copy of the iteration budgets, from the loaded buffer
        return model

    def state_dict(self, *args, **kwargs):
        """The weights, after every pending mu EMA update is applied (as save_checkpoint does; the
        next forward would apply them anyway): what save_pretrained writes, and what
        transformers.Trainer gathers when it saves, holds the up-to-date mu. Applying is local to
        this process (under torch.distributed the targets were combined when they were recorded),
        so one rank may call it alone."""
        self.model.apply_mu_ema()
        return super().state_dict(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """transformers' save_pretrained, pending mu EMA updates applied first (also when a
        state_dict is passed: call state_dict() for it, which applies them too)."""
        self.model.apply_mu_ema()
        return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation keeps its state in our static KVCache

    # ---- forward and generation -------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                cache: Optional[KVCache] = None, past_key_values: Optional[KVCache] = None,
                return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        """logits [B, S, V]; with labels [B, S], the mean next-token cross-entropy
        (labels shifted by one inside, -100 ignored); with use_cache, our KVCache (new, or the one
        passed as `cache` / `past_key_values`) filled with these tokens. attention_mask: 0 marks
        padding at the start (left) or end (right) of a row, as the model takes it."""
        past = cache if cache is not None else past_key_values
        if past is not None and not isinstance(past, KVCache):
            past = None  # a transformers cache object: unused, ours is created below
        use_cache = bool(use_cache) or past is not None
        logits, _, present = self.model(input_ids, past_key_values=past, use_cache=use_cache,
                                        attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        if use_cache:
            fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
            output["cache" if "cache" in fields else "past_key_values"] = present
        return output

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache=None, past_key_values=None,
                                      attention_mask=None, use_cache=True, **kwargs) -> dict:
        """The tokens our cache has not seen yet: the whole prompt first, then one token a step."""
        past = cache if cache is not None else past_key_values
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if not isinstance(past, KVCache) or not use_cache:
            if use_cache:
                past = self.model.new_cache(input_ids.shape[0])
            return {**inputs, "input_ids": input_ids, "cache": past if use_cache else None}
        return {**inputs, "input_ids": input_ids[:, past.length:], "cache": past}

    # ---- our checkpoint directories ---------------------------------------------------------

    @classmethod
    def from_inl_checkpoint(cls, directory: Union[str, Path], **runtime_overrides) -> "INLForCausalLM":
        inner = load_checkpoint(directory, **runtime_overrides)
        model = cls(INLLLMConfig.from_inl_config(inner.config))
        model.model = inner
        return model

    def save_inl_checkpoint(self, directory: Union[str, Path], extra: Optional[dict] = None) -> Path:
        return save_checkpoint(self.model, directory, extra=extra)


def to_hf(checkpoint: Union[str, Path], hf_dir: Union[str, Path]) -> Path:
    """Our checkpoint directory -> a Hugging Face model directory (config.json + model.safetensors)."""
    INLForCausalLM.from_inl_checkpoint(checkpoint).save_pretrained(str(hf_dir))
    return Path(hf_dir)


def from_hf(hf_dir: Union[str, Path], checkpoint: Union[str, Path]) -> Path:
    """A Hugging Face model directory of ours -> our checkpoint directory."""
    return INLForCausalLM.from_pretrained(str(hf_dir)).save_inl_checkpoint(checkpoint)


def is_hf_directory(directory: Union[str, Path]) -> bool:
    """Whether a directory holds a transformers model (its config.json has model_type)."""
    import json
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == INLLLMConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


AutoConfig.register(INLLLMConfig.model_type, INLLLMConfig)
AutoModelForCausalLM.register(INLLLMConfig, INLForCausalLM)

__all__ = ["INLLLMConfig", "INLForCausalLM", "to_hf", "from_hf", "is_hf_directory", "read_config"]
