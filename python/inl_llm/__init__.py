"""INL-LLM: the thin model layer on top of inl_kernels (SPEC §4).

    model = inl_llm.create_model("small", vocab_size=50000)      # or "tiny", "medium", ..., "70B"
    logits, aux, cache = model(input_ids, use_cache=True, return_aux=True)
    out = model.generate(input_ids, max_new_tokens=100, temperature=0.8, top_p=0.9)
    model.get_inference_stats()                                  # steps per layer after early exit

One module per concern: config, model (blocks, mixture of integrators, iteration budgets),
cache, generate, losses, scheduler, data, checkpoint, train, cli (`python -m inl_llm`).
"""
from .cache import KVCache
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .config import SIZES, INLConfig
from .data import ByteTokenizer, load_corpus, load_parquet, load_stdlib, load_text
from .generate import generate
from .losses import IntegratorLoss
from .model import IntegratorLanguageModel, IntegratorStats, build_model, create_model
from .scheduler import PRESETS, CycleScheduler, PhaseConfig, create_cycle_scheduler
from .train import TrainConfig, evaluate, train

__all__ = [
    "INLConfig", "SIZES", "create_model", "build_model", "IntegratorLanguageModel", "IntegratorStats", "KVCache",
    "generate", "IntegratorLoss", "CycleScheduler", "PhaseConfig", "PRESETS", "create_cycle_scheduler",
    "ByteTokenizer", "load_stdlib", "load_text", "load_parquet", "load_corpus",
    "save_checkpoint", "load_checkpoint", "load_weights", "TrainConfig", "train", "evaluate",
]
