"""Input validation shared by every public entry point.

All checks look at shapes, dtypes, devices and Python scalars only: nothing here reads tensor
values except :func:`check_ids`, which callers use outside the per-step path (it syncs on CUDA,
and is skipped while a CUDA graph is being captured, where values cannot be read), and the 0-d
tensor forms of tau and the teacher-forcing ratio, checked on the device (:func:`_scalar_tensor`).
Every error names the argument and says what was expected.
"""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim=None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {x.device}")
    return x


def check_float(name: str, x, **kw) -> torch.Tensor:
    return check_tensor(name, x, dtypes=FLOAT_DTYPES, **kw)


def check_int_tensor(name: str, x, **kw) -> torch.Tensor:
    check_tensor(name, x, **kw)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Integer ids in [0, vocab_size). Reads values: call once per batch, never per step.
    Inside a torch.compile / torch.export trace a traced assert instead (RuntimeError when the
    graph runs), so the check does not break the graph.

    Under CUDA-graph capture the values cannot be read (a host copy is illegal there and would
    bake one batch's verdict into the graph), so only the dtype is checked: the ids a captured
    graph replays are the caller's to check, e.g. with this function before copying a batch in.
    """
    check_int_tensor(name, ids)
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return ids
    if torch.compiler.is_compiling():  # a host read would break the graph: the assert, traced
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(),
                            f"{name} has ids outside [0, vocab_size={vocab_size})")
        return ids
    if ids.numel():
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync, not two
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} has ids in [{lo}, {hi}]; expected 0 <= id < vocab_size={vocab_size}")
    return ids


def _mapped_by_vmap(t: torch.Tensor) -> bool:
    """``t`` is mapped by an enclosing torch.func.vmap (perhaps also wrapped by grad levels)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t):
            return True
        t = F.get_unwrapped(t)
    return False


def _scalar_tensor(name: str, t: torch.Tensor, device, ok, expected: str, values: bool = True) -> torch.Tensor:
    """A 0-d float tensor on ``device`` (None: any) whose value must satisfy ``ok`` (a tensor
    predicate): the capturable form of a scalar argument, read on the device by the ops. A CPU
    tensor given with inputs on a device is returned as a Python number (reading it is no sync).

    Its value is checked without a host sync: on the CPU directly (ValueError); on a device by a
    device-side assert (``torch._assert_async``: the error surfaces at the next synchronisation),
    as on the CPU inside a torch.compile / torch.export trace (RuntimeError when the graph runs).
    While a CUDA graph is being captured nothing is checked: the values a graph replays are
    written by its owner, who checks them as Python floats (fused_s2s.graphs).
    ``values=False`` checks the form only (for a caller whose callee checks the value again)."""
    check_float(name, t)
    if t.dim() != 0:
        raise ValueError(f"{name} as a tensor must be 0-d (a scalar), got shape {tuple(t.shape)}")
    if not values:
        return t
    if not torch.compiler.is_compiling() and _mapped_by_vmap(t):  # (Dynamo does not trace functorch's C API)
        raise NotImplementedError(
            f"{name} is mapped by torch.func.vmap (a value per element), which the ops do not take "
            f"(nor can vmap read the values to check them): pass one {name} for all elements, a float "
            "or an unmapped 0-d tensor")
    if t.device.type == "cpu":
        if torch.compiler.is_compiling():  # a host read would break the graph: the assert, traced
            torch._assert_async(ok(t.detach()), f"{name} must be {expected}")
        elif not bool(ok(t.detach())):
            raise ValueError(f"{name} must be {expected}, got {t.item()}")
        if device is not None and torch.device(device).type != "cpu":
            return t.item()  # a CPU scalar with device inputs: a Python number (no device sync), as torch ops take it
        return t
    check_tensor(name, t, device=device)  # the dtype was checked above
    if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        torch._assert_async(ok(t.detach()), f"{name} must be {expected}")
    return t


# tau's range: the kernels scale by 1/tau in float32 (also for float64 logits, refined there), so
# tau and 1/tau must be normal float32 numbers. Outside it they gave NaN rows (tau 1e-39, 1e300)
# or, for bf16 logits under the interpreter, a zero y (tau 1e38: 1/tau subnormal), where a clear
# error is due; temperatures in use are many orders of magnitude inside.
TAU_MIN, TAU_MAX = 2.0 ** -126, 2.0 ** 126
_TAU_RANGE = "a number in [2**-126, 2**126] (~1.2e-38 to ~8.5e37: tau and 1/tau normal float32 numbers)"


def check_tau(tau, device=None, values: bool = True):
    """tau: a Python real in [TAU_MIN, TAU_MAX] (-> float), or a 0-d float tensor (see _scalar_tensor)
    on ``device``, which the ops read on the device (CUDA-graph capturable: an annealed tau)."""
    if isinstance(tau, torch.Tensor):
        return _scalar_tensor("tau", tau, device, lambda t: (t >= TAU_MIN) & (t <= TAU_MAX), _TAU_RANGE, values)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a Python float > 0 or a 0-d float tensor, got {type(tau).__name__}")
    tau = float(tau)
    if not TAU_MIN <= tau <= TAU_MAX:  # also NaN, inf and tau <= 0
        raise ValueError(f"tau must be {_TAU_RANGE}, got {tau}")
    return tau


def check_ratio(name: str, value, device=None, values: bool = True):
    """A Python real in [0, 1] (-> float), or a 0-d float tensor (see _scalar_tensor) on ``device``."""
    if isinstance(value, torch.Tensor):
        return _scalar_tensor(name, value, device, lambda t: (t >= 0) & (t <= 1), "in [0, 1]", values)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float in [0, 1] or a 0-d float tensor, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_generator(generator, device: torch.device, where: str) -> None:
    """None, or a torch.Generator on ``device`` (``where`` names whose device that is, for the message)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    same = gdev.type == device.type and (gdev.index is None or device.index is None or gdev.index == device.index)
    if not same:
        raise ValueError(f"generator must be on {where} {device}, got a generator on {gdev}")


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{k} is on {v.device} but {k0} is on {v0.device}; expected one device")


def check_batch(**tensors) -> int:
    """All tensors share dim 0 (the batch). Returns B."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.shape[0] != v0.shape[0]:
            raise ValueError(f"{k} has batch size {v.shape[0]} but {k0} has {v0.shape[0]}; expected equal")
    return v0.shape[0]


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on ``device`` (None: where it is). A CPU tensor goes to CUDA through pinned memory,
    non-blocking: a plain ``.to("cuda")`` waits for the stream after its copy (a host sync), this
    does not. The pinned buffer is the caching host allocator's, which keeps it until the copy has run."""
    if device is None:
        return t
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
