"""Checkpoints: a directory holding `model.safetensors` (the weights and persistent buffers;
the shared controller stored once) and `config.json` (the INLConfig, plus whatever the trainer
adds under "extra").

A checkpoint is never half written: both files go to a fresh temporary directory beside the
target, which then replaces the target by rename (the old checkpoint, if any, is moved aside
first and deleted last), so a crash leaves either the old or the new checkpoint complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from safetensors.torch import load_model, save_model

from .config import RUNTIME_FIELDS, INLConfig
from .model import IntegratorLanguageModel, build_model

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_checkpoint(model: IntegratorLanguageModel, directory: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Writes the model to `directory`. Pending mu EMA updates are applied first (the model's
    next forward would apply them anyway), so the checkpoint holds the up-to-date mu."""
    model.apply_mu_ema()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({"config": model.config.to_dict(), "extra": extra or {}}, indent=2))
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: Union[str, Path]) -> tuple[INLConfig, dict]:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing {CONFIG})")
    saved = json.loads(path.read_text())
    return INLConfig.from_dict(saved["config"]), saved.get("extra", {})


def config_differences(saved: INLConfig, wanted: INLConfig) -> list[str]:
    """The architecture fields (anything outside RUNTIME_FIELDS) on which two configs differ."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: checkpoint has {a[k]!r}, model has {b[k]!r}" for k in a if k not in RUNTIME_FIELDS and a[k] != b[k]]


def load_weights(model: IntegratorLanguageModel, directory: Union[str, Path]) -> dict:
    """Loads a checkpoint into an existing model; raises ValueError naming every architecture
    field that differs. Returns the checkpoint's "extra" dict."""
    saved, extra = read_config(directory)
    diffs = config_differences(saved, model.config)
    if diffs:
        raise ValueError(f"checkpoint {directory} does not fit this model:\n  " + "\n  ".join(diffs))
    missing, unexpected = load_model(model, str(Path(directory) / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit this model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return extra


def load_checkpoint(directory: Union[str, Path], device=None, **runtime_overrides) -> IntegratorLanguageModel:
    """The model a checkpoint holds, built from its own config; fields of RUNTIME_FIELDS (tol,
    backend, ...) may be overridden."""
    saved, _ = read_config(directory)
    bad = sorted(set(runtime_overrides) - RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"only runtime fields can be overridden when loading ({sorted(RUNTIME_FIELDS)}), got {bad}")
    config = INLConfig.from_dict({**saved.to_dict(), **runtime_overrides})
    model = build_model(config)
    load_weights(model, directory)
    return model.to(device) if device is not None else model
