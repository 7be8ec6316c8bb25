"""fused_s2s: attention RNN seq2seq with fused Triton kernels.

Public API (SPEC section 4):
    attention_step, gumbel_softmax          fused ops (Triton on CUDA, eager elsewhere)
    gumbel_sample                            Gumbel-max categorical samples (gumbel_softmax's index alone)
    Encoder, AttentionDecoder, Seq2Seq       the drop-in model classes
    schedules, reference                     ratio/temperature schedules; the eager textbook model
    graphs.graph_decoder_loss                CUDA-graph replay of a training step's decoder pass (experimental)
Names are loaded lazily so ``import fused_s2s`` does not import triton (or decorate kernels)
before the caller had a chance to set TRITON_INTERPRET.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "attention_step": ("fused_s2s.attention", "attention_step"),
    "gumbel_softmax": ("fused_s2s.gumbel", "gumbel_softmax"),
    "gumbel_sample": ("fused_s2s.gumbel", "gumbel_sample"),
    "Encoder": ("fused_s2s.model", "Encoder"),
    "AttentionDecoder": ("fused_s2s.model", "AttentionDecoder"),
    "Seq2Seq": ("fused_s2s.model", "Seq2Seq"),
}
_SUBMODULES = ("schedules", "reference", "philox", "backend", "aot", "model", "attention", "gumbel", "graphs", "data",
               "cli")

__all__ = list(_LAZY) + ["schedules", "reference"]


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fused_s2s.{name}")
    raise AttributeError(f"module 'fused_s2s' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
