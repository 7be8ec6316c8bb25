"""Training checkpoints: written atomically, validated on load.

A checkpoint is one ``torch.save`` file holding
    format, version            checkpoint layout number and the fused_s2s version that wrote it
    config                     model hyperparameters (the ``build_model`` arguments)
    vocab                      ``Vocab.to_dict()``
    model, optimizer           state_dicts (the model's loads into reference or fused Seq2Seq alike)
    schedules                  {"tf": state_dict, "tau": state_dict, ...}
    step                       optimiser steps taken
    rng                        torch (CPU and CUDA) and Python ``random`` states
    train_args                 the training flags (so ``--resume`` can reuse them)
It is written to a temporary file in the target directory and moved into place with
``os.replace``: an interrupted or failed save never leaves a half-written checkpoint behind, and a
previous checkpoint at the same path stays intact until the new one is complete.
"""
from __future__ import annotations

import os
import random
import tempfile
import warnings

import torch

import fused_s2s

FORMAT = 1


class CheckpointMismatch(ValueError):
    """The checkpoint was written for another model configuration, vocabulary or version."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj, path)`` through a temporary file in the same directory + ``os.replace``."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save(path: str, *, model, config: dict, vocab, step: int, optimizer=None, schedules: dict | None = None,
         train_args: dict | None = None, extra: dict | None = None) -> str:
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    ckpt = {
        "format": FORMAT,
        "version": fused_s2s.__version__,
        "config": dict(config),
        "vocab": vocab.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "schedules": {k: s.state_dict() for k, s in (schedules or {}).items()},
        "step": int(step),
        "rng": rng_state(),
        "train_args": dict(train_args or {}),
        "extra": dict(extra or {}),
    }
    return atomic_save(ckpt, path)


def _version_key(v: str) -> tuple:
    return tuple(v.split(".")[:2])


def config_diff(saved: dict, expected: dict) -> list[str]:
    """Human-readable differences ``field: checkpoint=X, requested=Y`` (empty when they agree)."""
    diffs = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
        if a != b:
            diffs.append(f"{key}: checkpoint={a!r}, requested={b!r}")
    return diffs


def load(path: str, *, expected_config: dict | None = None, expected_vocab=None, map_location="cpu") -> dict:
    """Read and validate a checkpoint. Raises CheckpointMismatch saying what differs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable fused_s2s checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a fused_s2s checkpoint (no 'format'/'config' entries)")
    if ckpt["format"] != FORMAT:
        raise CheckpointMismatch(f"{path}: checkpoint format {ckpt['format']} but this fused_s2s reads format {FORMAT}")
    here = fused_s2s.__version__
    if ckpt["version"] != here:
        if _version_key(ckpt["version"]) != _version_key(here):
            raise CheckpointMismatch(
                f"{path}: written by fused_s2s {ckpt['version']}, this is {here} (different minor version)")
        warnings.warn(f"{path}: written by fused_s2s {ckpt['version']}, this is {here}", stacklevel=2)
    if expected_config is not None:
        diffs = config_diff(ckpt["config"], expected_config)
        if diffs:
            raise CheckpointMismatch(f"{path}: checkpoint has a different model configuration: " + "; ".join(diffs))
    if expected_vocab is not None and ckpt["vocab"] != expected_vocab.to_dict():
        saved = set(ckpt["vocab"]["itos"])
        now = set(expected_vocab.to_dict()["itos"])
        raise CheckpointMismatch(
            f"{path}: checkpoint has a different vocabulary (vocab: {len(ckpt['vocab']['itos'])} entries in the "
            f"checkpoint, {len(now)} for this data; only in checkpoint: {''.join(sorted(saved - now))[:40]!r}, "
            f"only in data: {''.join(sorted(now - saved))[:40]!r})")
    return ckpt
