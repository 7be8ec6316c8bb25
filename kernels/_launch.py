"""Host-side helpers for the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in the triton versions we
support: called from host code each costs 2-3.5 microseconds (argument unwrapping), several per
launch, which at the notes' sizes is a noticeable part of a call (benchmarks/host_overhead.py).
"""
from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def stages(num_stages, default: int) -> int:
    """NUM_STAGES of a launch (the loops' software-pipelining depth): ``num_stages`` (an int >= 1)
    when the caller forces one (tests, sweeps), else ``default``, the launcher's choice."""
    if num_stages is None:
        return default
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    return num_stages


def interpreter_range_fix() -> bool:
    """Let Triton's interpreter run ``for i in range(a, n, b)`` / ``tl.range`` over a runtime ``n``.

    Why the kernels need it: Triton software-pipelines ``for`` loops (``num_stages``: the next
    blocks' loads are in flight while this block computes) and never ``while`` loops, so the
    kernels loop with ``for``. The interpreter of triton <= 3.6 turns a runtime bound into an int
    with ``int(array of shape (1,))``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); later versions squeeze the array first. This wraps the
    interpreter's per-call patch of ``tl.tensor`` to set the squeezing ``__index__`` after its
    own (restored with it after the call). Idempotent; a no-op where the interpreter has no such
    hook. Returns whether the wrapper is installed. Only called when TRITON_INTERPRET is set:
    compiled kernels never go through it.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:
        return False
    if getattr(patch, "_fused_s2s_range_fix", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fused_s2s_range_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: a device-properties query per launch
    would cost host time); 4, a small pretend GPU, elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
