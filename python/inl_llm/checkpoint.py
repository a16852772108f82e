"""Checkpoints: one directory that either loads whole or fails naming the file at fault.

    model.safetensors   the weights and persistent buffers (the shared controller stored once)
    config.json         {"config": the INLConfig, "extra": whatever the trainer adds}
    train/              training checkpoints only: model + optimizer through
                        torch.distributed.checkpoint (DCP), sharded one file per rank, so a run
                        resumes on any world size
    train_state.pt      training checkpoints only: step, LR and cycle-scheduler position, data
                        position, every RNG of every rank, the eval history
    manifest.json       sha256 and size of every other file, written last

Saving writes everything into a fresh temporary directory beside the target (`.NAME.tmp-PID-*`);
the manifest goes in last, so a temporary directory with a manifest is complete. The target is
then replaced by two renames: target -> `.NAME.old-PID`, temporary -> target, and the old copy is
deleted. A process killed at any instant therefore leaves either the old or the new checkpoint
whole: between the two renames the target path is missing, and loading reads the newest complete
copy a killed save left beside it (read-only); the next save puts it back in place and deletes
every temporary or old directory whose process is gone.

Loading checks each file it reads against the manifest (a flipped bit or a truncated file is a
CheckpointError naming the file), and every field of config.json (a CheckpointError naming the
file and the field). Checkpoints written before manifests existed load without the check.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .config import RUNTIME_FIELDS, INLConfig
from .model import IntegratorLanguageModel, build_model

WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"
TRAIN_DIR, TRAIN_STATE = "train", "train_state.pt"
MANIFEST_FORMAT = 1

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file (and field)."""


# ---- processes ------------------------------------------------------------------------------

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _dcp_errors() -> tuple:
    """What a DCP load raises on a bad file: its CheckpointException derives from BaseException,
    which `except Exception` (ours, and a user's) does not catch."""
    from torch.distributed.checkpoint.api import CheckpointException
    return (Exception, CheckpointException)


def _dcp(method, state: dict, path: Path):
    """torch.distributed.checkpoint save or load; in one process without a process group too
    (DCP then warns that it assumes one process: that is the intent here)."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        getattr(dcp, method)(state, checkpoint_id=str(path), no_dist=not _distributed())


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _broadcast(obj):
    """rank 0's obj on every rank (a no-op in one process)."""
    if not _distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _pid_alive(pid: int) -> bool:
    """Whether a save of that process may still be running. Our own pid counts as gone: saves
    within one process run one after the other, so a leftover of ours is from a failed one."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- files ----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _manifest_digest(saved_at_ns: int, files: dict) -> str:
    return hashlib.sha256(json.dumps({"saved_at_ns": saved_at_ns, "files": files}, sort_keys=True).encode()).hexdigest()


def _write_manifest(directory: Path):
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            _fsync(path)
            files[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    saved_at = time.time_ns()
    body = {"format": MANIFEST_FORMAT, "saved_at_ns": saved_at, "files": files,
            "sha256": _manifest_digest(saved_at, files)}
    _write_text(directory / MANIFEST, json.dumps(body, indent=1, sort_keys=True))
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        _fsync(sub)


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The manifest, or None for a checkpoint written before manifests existed."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        files, saved_at = body["files"], body["saved_at_ns"]
        intact = body["sha256"] == _manifest_digest(saved_at, files)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}): the checkpoint cannot be checked")
    if not intact:
        raise CheckpointError(f"{path} is corrupt: its own checksum does not match its contents")
    return body


def verify_checkpoint(directory: PathLike, files: Optional[list] = None) -> bool:
    """Checks `files` (default: every file the manifest lists) against the manifest: present,
    of the recorded size and sha256. Returns False (nothing checked) for a checkpoint without a
    manifest; raises CheckpointError naming the first file that fails."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    listed = manifest["files"]
    for rel in files if files is not None else sorted(listed):
        path = directory / rel
        if rel not in listed:
            raise CheckpointError(f"{path} is not in {directory / MANIFEST}: the checkpoint was changed after saving")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {directory / MANIFEST})")
        size = path.stat().st_size
        if size != listed[rel]["bytes"]:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, the manifest records "
                                  f"{listed[rel]['bytes']}")
        if _sha256(path) != listed[rel]["sha256"]:
            raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one recorded when it was saved "
                                  f"(changed on disk since; a deliberate edit must delete {MANIFEST})")
    return True


# ---- the atomic directory swap --------------------------------------------------------------

def _leftovers(directory: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, pid) of the `.NAME.tmp-PID-*` or `.NAME.old-PID` directories beside `directory`."""
    prefix = f".{directory.name}.{kind}-"
    out = []
    if directory.parent.is_dir():
        for path in directory.parent.iterdir():
            if path.name.startswith(prefix) and path.is_dir():
                pid = path.name[len(prefix):].split("-")[0]
                if pid.isdigit():
                    out.append((path, int(pid)))
    return out


def _complete_copies(directory: Path) -> list[tuple[Path, int]]:
    """(path, pid) of the complete copies a killed save left beside a missing `directory`,
    newest first: old checkpoints moved aside and temporary directories whose manifest was
    written."""
    found = []
    for path, pid in _leftovers(directory, "old") + _leftovers(directory, "tmp"):
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            continue
        if manifest is not None:
            found.append((manifest["saved_at_ns"], str(path), pid))
        elif path.name.startswith(f".{directory.name}.old-") and (path / CONFIG).exists():
            found.append((-1, str(path), pid))  # moved aside by a save that predates manifests
    return [(Path(path), pid) for _, path, pid in sorted(found, reverse=True)]


def resolve_checkpoint(directory: PathLike) -> Path:
    """The directory to read: `directory` itself, or, when a save was killed between its two
    renames, the newest complete copy it left beside it (nothing is moved: see the module
    docstring)."""
    directory = Path(directory)
    if directory.exists():
        return directory
    copies = _complete_copies(directory)
    if not copies:
        raise FileNotFoundError(f"no checkpoint at {directory}")
    warnings.warn(f"{directory} is missing: a save was interrupted between its renames; reading the complete copy "
                  f"it left at {copies[0][0]} (the next save to {directory} puts it back in place)", stacklevel=3)
    return copies[0][0]


def _repair(directory: Path):
    """Before a save: put back a checkpoint an interrupted save left aside, and delete the
    temporary and old directories of saves whose process is gone."""
    if not directory.exists():
        copies = [path for path, pid in _complete_copies(directory) if not _pid_alive(pid)]
        if copies:
            os.replace(copies[0], directory)
    for path, pid in _leftovers(directory, "tmp") + _leftovers(directory, "old"):
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


CHECKPOINT_ENTRIES = frozenset({WEIGHTS, CONFIG, MANIFEST, TRAIN_DIR, TRAIN_STATE})


def _refuse_foreign(directory: Path):
    """A save replaces the whole directory: refused (OSError naming what is there) when the
    target exists and holds anything a checkpoint does not (other checkpoints, a Hugging Face
    export, the user's files), which the replacement would delete."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OSError(f"{directory} exists and is not a directory")
    foreign = sorted(set(os.listdir(directory)) - CHECKPOINT_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OSError(f"{directory} holds entries that are not part of a checkpoint ({shown}); a save replaces the "
                      f"whole directory and would delete them: save to a new or empty directory, or to a checkpoint's "
                      f"own directory")


def _swap_into_place(tmp: Path, directory: Path):
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def _save_directory(directory: PathLike, write_all_ranks, write_rank0) -> Path:
    """Writes a checkpoint atomically: write_all_ranks(tmp) runs on every rank (collective
    writes such as DCP), then write_rank0(tmp) on rank 0, then rank 0 adds the manifest and swaps
    the directory into place. Every rank returns only once it is in place (or raises)."""
    directory = Path(directory)
    tmp = None
    error = None
    if _rank() == 0:
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            _repair(directory)
            _refuse_foreign(directory)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
        except OSError as e:
            error = f"cannot prepare {directory}: {e}"
    tmp, error = _broadcast((tmp, error))
    if error:
        raise CheckpointError(error)
    try:
        write_all_ranks(tmp)
        if _rank() == 0:
            try:
                write_rank0(tmp)
                _write_manifest(tmp)
                _swap_into_place(tmp, directory)
            except BaseException as e:
                error = f"saving {directory} failed: {type(e).__name__}: {e}"
                _broadcast(error)
                raise
        error = _broadcast(None)
        if error:
            raise CheckpointError(error)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ---- weights --------------------------------------------------------------------------------

def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _model_for_export(model: IntegratorLanguageModel) -> Optional[IntegratorLanguageModel]:
    """A model holding every weight on rank 0 (None on the other ranks). An FSDP-sharded model
    is gathered (a collective: every rank must call this), others are returned as they are."""
    if not _is_sharded(model):
        return model if _rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    plain = build_model(model.config)
    plain.load_state_dict(full)
    return plain


def _write_weights(model: IntegratorLanguageModel, directory: Path, extra: Optional[dict]):
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
    _write_text(directory / CONFIG, json.dumps({"config": model.config.to_dict(), "extra": extra or {}}, indent=2))


def save_checkpoint(model: IntegratorLanguageModel, directory: PathLike, extra: Optional[dict] = None) -> Path:
    """Writes the model to `directory` (weights, config, manifest; see the module docstring).
    Pending mu EMA updates are applied first (the model's next forward would apply them anyway),
    so the checkpoint holds the up-to-date mu. Under torch.distributed every rank calls it (an
    FSDP model is gathered to rank 0, which writes)."""
    model.apply_mu_ema()
    holder = {}
    return _save_directory(directory, lambda tmp: holder.update(model=_model_for_export(model)),
                           lambda tmp: _write_weights(holder["model"], tmp, extra))


def read_config(directory: PathLike) -> tuple[INLConfig, dict]:
    """(config, extra) of a checkpoint; a CheckpointError names the file and field at fault."""
    directory = resolve_checkpoint(directory)
    path = directory / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing {CONFIG})")
    verify_checkpoint(directory, [CONFIG])
    try:
        saved = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{path} has no \"config\" object (the INLConfig fields)")
    extra = saved.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: field \"extra\" must be an object, got {type(extra).__name__}")
    try:
        config = INLConfig.from_dict(saved["config"])
    except (TypeError, ValueError) as e:  # INLConfig's messages name the field
        raise CheckpointError(f"{path}: config field {e}") from None
    return config, extra


def config_differences(saved: INLConfig, wanted: INLConfig) -> list[str]:
    """The architecture fields (anything outside RUNTIME_FIELDS) on which two configs differ."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: checkpoint has {a[k]!r}, model has {b[k]!r}" for k in a if k not in RUNTIME_FIELDS and a[k] != b[k]]


def _load_weights_file(model: IntegratorLanguageModel, path: Path):
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    except RuntimeError as e:  # shape mismatches from load_state_dict
        raise CheckpointError(f"{path} does not fit the model its config describes: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")


def _load_weights_from_dcp(model: IntegratorLanguageModel, directory: Path):
    """The weights of a training checkpoint whose model.safetensors was not written (FSDP runs
    may write only the sharded train/ directory): read from DCP into this (plain) model."""
    state = {"model": model.state_dict()}
    try:
        _dcp("load", state, directory / TRAIN_DIR)
    except _dcp_errors() as e:
        raise CheckpointError(f"{directory / TRAIN_DIR} could not be read: {type(e).__name__}: {e}") from None
    model.load_state_dict(state["model"])


def load_weights(model: IntegratorLanguageModel, directory: PathLike) -> dict:
    """Loads a checkpoint into an existing (plain) model; raises ValueError naming every
    architecture field that differs, CheckpointError naming a file that fails its checksum or
    cannot be read. Returns the checkpoint's "extra" dict."""
    directory = resolve_checkpoint(directory)
    saved, extra = read_config(directory)
    diffs = config_differences(saved, model.config)
    if diffs:
        raise ValueError(f"checkpoint {directory} does not fit this model:\n  " + "\n  ".join(diffs))
    if (directory / WEIGHTS).exists():
        verify_checkpoint(directory, [WEIGHTS])
        _load_weights_file(model, directory / WEIGHTS)
    elif (directory / TRAIN_DIR).is_dir():
        verify_checkpoint(directory, sorted(p.relative_to(directory).as_posix()
                                            for p in (directory / TRAIN_DIR).rglob("*") if p.is_file()))
        _load_weights_from_dcp(model, directory)
    else:
        raise CheckpointError(f"{directory} holds no weights ({WEIGHTS} or {TRAIN_DIR}/)")
    return extra


def load_checkpoint(directory: PathLike, device=None, **runtime_overrides) -> IntegratorLanguageModel:
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


def export_checkpoint(source: PathLike, destination: PathLike) -> Path:
    """A checkpoint that holds only sharded training state (train/) -> a plain checkpoint
    directory with model.safetensors (in one process, no process group needed)."""
    return save_checkpoint(load_checkpoint(source), destination, extra=read_config(source)[1])


# ---- training checkpoints (model + optimizer + everything a resume needs) ---------------------

def rng_state() -> dict:
    """Every RNG of this process: torch (CPU and, when present, each CUDA device), Python, numpy."""
    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(obj):
    """random.getstate() is nested tuples; torch.load(weights_only=True) gives them back as
    lists where they were saved as lists, so they are kept tuples here for setstate."""
    if isinstance(obj, list):
        return tuple(_to_tuples(o) for o in obj)
    return obj


def save_training_checkpoint(model: IntegratorLanguageModel, directory: PathLike, optimizer: torch.optim.Optimizer,
                             train_state: dict, extra: Optional[dict] = None, export_weights: bool = True) -> Path:
    """A checkpoint a run resumes from exactly: the model and optimizer through DCP (sharded,
    every rank writes its own file), train_state (step, scheduler, data position, history...)
    plus every rank's RNG state in train_state.pt, and, with export_weights, model.safetensors
    (an FSDP model is gathered to rank 0 for it). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model.apply_mu_ema()
    rngs = [rng_state()]
    if _distributed():
        rngs = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rngs, rng_state())
    holder = {}

    def write_all_ranks(tmp: Path):
        model_state, optim_state = get_state_dict(model, optimizer)
        _dcp("save", {"model": model_state, "optim": optim_state}, tmp / TRAIN_DIR)
        holder["model"] = _model_for_export(model) if export_weights else None

    def write_rank0(tmp: Path):
        if holder["model"] is not None:
            _write_weights(holder["model"], tmp, extra)
        else:
            _write_text(tmp / CONFIG, json.dumps({"config": model.config.to_dict(), "extra": extra or {}}, indent=2))
        state = {**train_state, "rng": rngs, "world_size": len(rngs)}
        with open(tmp / TRAIN_STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    return _save_directory(directory, write_all_ranks, write_rank0)


def load_training_checkpoint(model: IntegratorLanguageModel, directory: PathLike,
                             optimizer: torch.optim.Optimizer) -> dict:
    """Restores model, optimizer and this rank's RNGs from a training checkpoint written by any
    world size (DCP reshards); returns its train_state. Every rank calls it. The model must have
    the checkpoint's architecture (a ValueError names each field that differs)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = resolve_checkpoint(directory)
    saved, _ = read_config(directory)
    diffs = config_differences(saved, model.config)
    if diffs:
        raise ValueError(f"checkpoint {directory} does not fit this model:\n  " + "\n  ".join(diffs))
    if not (directory / TRAIN_STATE).exists() or not (directory / TRAIN_DIR).is_dir():
        raise CheckpointError(f"{directory} is not a training checkpoint (no {TRAIN_STATE} / {TRAIN_DIR}/): it holds "
                              f"weights only; start a new run from it with load_weights")
    error = None
    if _rank() == 0:  # one rank reads every byte against the manifest
        try:
            verify_checkpoint(directory)
        except CheckpointError as e:
            error = str(e)
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    try:
        state = torch.load(directory / TRAIN_STATE, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{directory / TRAIN_STATE} could not be read: {type(e).__name__}: {e}") from None
    model_state, optim_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optim": optim_state}
    try:
        _dcp("load", both, directory / TRAIN_DIR)
    except _dcp_errors() as e:
        raise CheckpointError(f"{directory / TRAIN_DIR} could not be read: {type(e).__name__}: {e}") from None
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    world = torch.distributed.get_world_size() if _distributed() else 1
    rngs = state.pop("rng")
    if len(rngs) == world:
        rng = rngs[_rank()]
        rng["python"] = _to_tuples(rng["python"])
        set_rng_state(rng)
    else:
        warnings.warn(f"{directory} was saved by {len(rngs)} ranks and is resumed on {world}: the per-rank RNG "
                      f"states cannot carry over (the data position and everything else do)", stacklevel=2)
    return state
