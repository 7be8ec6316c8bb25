"""Backend selection: "auto" | "triton" | "eager" (SPEC section 4).

"auto" runs the Triton kernels on CUDA tensors and eager PyTorch on CPU tensors; the environment
variable FUSED_S2S_BACKEND overrides "auto" (not an explicit "triton"/"eager"). With
TRITON_INTERPRET=1 the "triton" backend runs the kernels on CPU tensors through the interpreter.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

import torch
from torch.autograd import forward_ad as _forward_ad

BACKENDS = ("auto", "triton", "eager")


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels(name: str):
    """The Triton module ``fused_s2s.kernels.<name>``, imported on first use: importing fused_s2s
    does not import triton (callers set TRITON_INTERPRET first). Cached, as the ops call it per
    launch, where an import statement costs ~0.7 us of host time."""
    return importlib.import_module(f"fused_s2s.kernels.{name}")


_NOT_TRACED: dict = {}  # fn -> torch.compiler.disable(fn), made at fn's first call once Dynamo is imported


def not_traced(fn):
    """``fn`` as torch.compile's code calls it: run as it is, not traced (a graph break), by
    ``torch.compiler.disable(fn)``. The Triton paths take it: Dynamo would trace our launchers and
    hand the kernels to Inductor, whose capture of user Triton kernels does not take every argument
    ours pass (tl.dtype constexprs; pytorch/pytorch#170049, #176712), and under TRITON_INTERPRET
    it traces the interpreter's NumPy code and raises.

    Applied at fn's first call after torch._dynamo is imported (torch.compile imports it; before,
    nothing can be compiling), not at import: torch.compiler.disable imports torch._dynamo, ~1 s
    that a user who never compiles would pay at ``import fused_s2s``. Made during a trace, it is
    skipped all the same (tests/test_compile.py). Per call: ~0.2 us, ~0.5 once Dynamo is loaded."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = _NOT_TRACED.get(fn)
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled = _NOT_TRACED[fn] = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


# FUSED_S2S_COMPILE_OPS=0: torch.compile runs the Triton paths between its graphs (not_traced)
# instead of putting the custom ops (fused_s2s::attention_fwd, ...) in them
COMPILE_OPS = os.environ.get("FUSED_S2S_COMPILE_OPS", "1") != "0"


def compiling() -> bool:
    """True while torch.compile or torch.export traces the caller (and COMPILE_OPS): the ops then
    call their torch.library custom ops, which the graph holds as single nodes."""
    return COMPILE_OPS and torch.compiler.is_compiling()


def transforming() -> bool:
    """True inside a torch.func transform (grad, vjp, jacrev, jvp, jacfwd, vmap, ...) or a forward-AD
    dual level (torch.autograd.forward_ad): the ops then run their setup_context-style autograd
    Functions (``_AttentionFuncFn``, ``_GumbelFuncFn``, ``_GumbelSampleFuncFn``), which functorch
    requires and the classic ones lack, and whose jvp carries a dual input's tangent (the classic
    path, without a graph to record, dropped it silently). ~0.2 us a call. False inside a
    torch.compile trace (Dynamo does not trace functorch's C API; it runs torch.func transforms by
    its own means)."""
    return not torch.compiler.is_compiling() and (torch._C._are_functorch_transforms_active()
                                                  or _forward_ad._current_level >= 0)


def nested_forward_ad() -> bool:
    """Two or more torch.func forward-mode levels are open (jvp / jacfwd inside another): the ops
    then run the eager math. Through an autograd.Function's jvp the outer level sees a zero
    derivative of the inner tangent (pytorch/pytorch#197867: a silent 0 from jacfwd(jacfwd(f))), so
    the Functions cannot serve there. (A forward-AD dual level does not count: torch.func.jvp opens
    one itself, and inside a user's own it raises, "Nested forward mode AD is not supported".)"""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()) >= 2


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
