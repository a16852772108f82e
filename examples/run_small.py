"""Runs one of the original package's example scripts unchanged, at a size 2 CPU cores can run.

    python examples/run_small.py examples/simple_training.py --d-model 64 --layers 2 --rows 16
    python examples/run_small.py examples/load_and_generate.py --d-model 64 --layers 2
    python examples/run_small.py examples/test_early_stopping.py --d-model 64 --layers 2

The scripts build ~1B-parameter models (d_model 1600, 28 layers). Before running a script this
replaces the model classes of `inl_llm.models` by subclasses that override the size arguments
given here (every other argument is the script's own), so the script's body stays as written.
simple_training.py reads `part_000000.parquet` (a `text` column) beside itself: the original's
data file is not shipped, so when it is missing a stand-in of --rows snippets of the Python
standard library's own source is written there. Sizes: pass the same ones to
simple_training.py and load_and_generate.py (the second loads the first's weights).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

import inl_llm.models as models
import inl_llm.models.integrator_language_model as ultra_module
import inl_llm.models.integrator_language_model_optimized as optimized_module

SIZE_ARGS = {"d_model": "d_model", "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads",
             "ff": "feedforward_dim", "iterations": "num_iterations_per_layer", "max_seq_len": "max_seq_len"}


def shrink(cls, sizes: dict):
    class Small(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **sizes})
    Small.__name__ = Small.__qualname__ = cls.__name__
    return Small


def write_parquet(path: str, rows: int, chars: int = 400):
    """`rows` snippets of stdlib source (one per file, its first `chars` characters) as a
    parquet file with a `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from inl_llm.data import stdlib_files
    texts = []
    for f in stdlib_files():
        try:
            text = f.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= 100:
            texts.append(text[:chars])
        if len(texts) == rows:
            break
    pq.write_table(pa.table({"text": texts}), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("script")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ff", type=int, default=None, help="FFN width (default 2·d_model)")
    p.add_argument("--iterations", type=int, default=None, help="integrator steps (default: the script's)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--rows", type=int, default=16, help="rows of the stand-in parquet file, when it is missing")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the script runs")
    args = p.parse_args(argv)

    values = dict(vars(args), ff=args.ff or 2 * args.d_model)
    sizes = {kw: values[name] for name, kw in SIZE_ARGS.items() if values[name] is not None}
    for module in (models, ultra_module, optimized_module):
        for name in ("UltraOptimizedIntegratorLanguageModel", "IntegratorLanguageModel",
                     "OptimizedIntegratorLanguageModel"):
            if hasattr(module, name):
                setattr(module, name, shrink(getattr(module, name), sizes))

    script = os.path.abspath(args.script)
    data = os.path.join(os.path.dirname(script), "part_000000.parquet")
    if os.path.basename(script) == "simple_training.py" and not os.path.exists(data):
        write_parquet(data, args.rows)
        print(f"(run_small: wrote {args.rows} stdlib snippets to {data} as the training data)")
    print(f"(run_small: model sizes {sizes})")

    import torch
    torch.manual_seed(args.seed)
    sys.argv = [script]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
