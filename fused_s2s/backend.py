"""Backend selection: "auto" | "triton" | "eager" (SPEC section 4).

"auto" runs the Triton kernels on CUDA tensors and eager PyTorch on CPU tensors; the environment
variable FUSED_S2S_BACKEND overrides "auto" (not an explicit "triton"/"eager"). With
TRITON_INTERPRET=1 the "triton" backend runs the kernels on CPU tensors through the interpreter.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "eager")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels(name: str):
    """The Triton module ``fused_s2s.kernels.<name>``, imported on first use: importing fused_s2s
    does not import triton (callers set TRITON_INTERPRET first). Cached, as the ops call it per
    launch, where an import statement costs ~0.7 us of host time."""
    return importlib.import_module(f"fused_s2s.kernels.{name}")


def validate(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> str:
    """The backend that actually runs for tensors on ``device``: "triton" or "eager".

    Called once per op call: the messages are only formatted on an error (host time per call)."""
    validate(backend)
    explicit = backend
    if backend == "auto":
        backend = os.environ.get("FUSED_S2S_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FUSED_S2S_BACKEND must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "eager"
    if backend == "triton" and device.type != "cuda" and not interpret_mode():
        source = (f"FUSED_S2S_BACKEND={backend} (overriding backend='auto')" if explicit == "auto"
                  else f"backend={explicit!r}")
        raise ValueError(
            f"{source} needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
            "triton to run the kernels on the CPU, or use backend='auto'/'eager'"
        )
    return backend
