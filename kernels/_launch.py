"""Host-side helpers for the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in the triton versions we
support: called from host code each costs 2-3.5 microseconds (argument unwrapping), several per
launch, which at the notes' sizes is a noticeable part of a call (benchmarks/host_overhead.py).
"""
from __future__ import annotations

import functools
import inspect
import os

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


def aligned16(sizes, tensors) -> bool:
    """Whether Triton's JIT specialises a launch's loads over ``tensors`` as 16-aligned (the AOT
    tool's "aligned" variant: 128-bit loads along the last dim): every size in ``sizes``, every stride
    but the last and every tensor's start (in bytes) divisible by 16, and unit last strides. The
    start from the storage offset (PyTorch's allocators align storages to 64 bytes or more):
    metadata, no data_ptr(). None entries are skipped. Launchers pick block configurations by it,
    never results."""
    if any(n % 16 for n in sizes):
        return False
    for t in tensors:
        if t is None:
            continue
        st = t.stride()
        if st[-1] != 1 or t.storage_offset() * t.element_size() % 16 or any(s % 16 for s in st[:-1]):
            return False
    return True


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


def on_tensor_device(launcher):
    """``launcher`` run with its first argument's GPU as the current CUDA device.

    Triton launches on the current device and its current stream, whatever device the pointers it
    is given live on. Tensors on cuda:1 while cuda:0 is current (a model split across GPUs, a
    process that never called torch.cuda.set_device) then give "Pointer argument cannot be
    accessed from Triton", or, where peer access maps the pointers, a kernel that runs on the
    wrong GPU and races with the tensors' own stream. The guard is entered only when the devices
    differ: one ``torch.cuda.current_device()`` per call otherwise (nothing off CUDA)."""
    @functools.wraps(launcher)
    def call(x, *args, **kwargs):
        dev = x.device
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    call.on_tensor_device = True  # tests check that every public launcher has it
    return call


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: a device-properties query per launch
    would cost host time); 4, a small pretend GPU, elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# FUSED_S2S_DIRECT_LAUNCH=1 (experimental, read at import; never measured on a GPU yet): launch a
# kernel's compiled form directly once Triton has compiled it for a specialisation (``direct``).
DIRECT_LAUNCH = os.environ.get("FUSED_S2S_DIRECT_LAUNCH", "0") not in ("", "0")
_DIRECT_LAUNCHERS: dict = {}  # id(JITFunction) -> (JITFunction, DirectLauncher)


def direct(kernel):
    """What a launcher indexes with its grid: ``direct(k)[grid](*args, **meta)`` launches as
    ``k[grid](*args, **meta)``. With DIRECT_LAUNCH on and ``k`` a compiled-mode JITFunction, through
    its DirectLauncher; otherwise (the default, the interpreter, a test's stub) ``k`` itself."""
    if not DIRECT_LAUNCH:
        return kernel
    hit = _DIRECT_LAUNCHERS.get(id(kernel))
    if hit is None or hit[0] is not kernel:
        from triton.runtime.jit import JITFunction

        hit = _DIRECT_LAUNCHERS[id(kernel)] = (kernel, DirectLauncher(kernel) if isinstance(kernel, JITFunction) else kernel)
    return hit[1]


def arg_spec(a):
    """What Triton's JIT may specialise a runtime argument on, or more (finer keys only cost
    compiles' lookups): a tensor's dtype and address mod 16; an int's value (the binder looks at
    == 1, divisibility by 16 and width; the value covers all three, one key per shape); a float
    is an fp32 argument, whatever its value (a scheduled tau must not make a key per step)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16
    if isinstance(a, bool):  # before int: bool is an int, and Triton types it i1
        return "b", a
    if isinstance(a, int):
        return a
    if isinstance(a, float):
        return ("f",)
    return "o", type(a), a  # None and the rest: by value


def args_key(args) -> tuple:
    """``arg_spec`` of each argument; plain tensors and ints inline (a launch's 20-odd arguments:
    ~3.6 us on this project's CPU against ~6.7 through arg_spec alone)."""
    T = torch.Tensor
    return tuple([(a.dtype, a.data_ptr() % 16) if type(a) is T else a if type(a) is int else arg_spec(a)
                  for a in args])


_MAX_KEYS = 4096  # per kernel: past this the DirectLauncher forgets its keys (many shapes, e.g. generation)


class DirectLauncher:
    """``fn[grid](*args, **meta)`` with Triton's per-launch binder skipped after the first launch.

    Triton's ``JITFunction.run`` specialises every argument (types, 16-byte alignment, ints equal to
    1 or divisible by 16), builds a cache key of that and the options, and looks the compiled
    kernel up: ~11 us per launch of the Gumbel kernels on this project's CPU (docs/gpu.md, session
    13). Here the first launch of each specialisation goes through ``fn[grid]``, which compiles and
    returns the CompiledKernel; later launches whose ``args_key``, keywords (constexprs and
    options) and device are the same call that kernel with the same arguments Triton would pass,
    ``CompiledKernel[grid](*all parameters, stream=)``. The key holds at least what the binder
    specialises on (``arg_spec``), so two launches with one key have one specialisation.
    Constexprs must be keywords (a positional one disables the fast path). ~3.6 us of key and
    lookup against the binder's ~11 (the Gumbel forward's 22 runtime arguments, this project's CPU)."""

    def __init__(self, fn, device=None, stream=None):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.constexpr = [p.is_constexpr for p in fn.params]
        self.defaults = {p.name: p.default for p in fn.params if p.default is not inspect.Parameter.empty}
        if device is None:
            from triton.runtime import driver

            device, stream = driver.active.get_current_device, driver.active.get_current_stream
        self.device, self.stream = device, stream
        self.compiled: dict = {}  # key -> (CompiledKernel, the constexprs' values in parameter order)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.run(grid, args, meta)

    def run(self, grid, args, meta):
        if callable(grid):  # a grid of the meta-parameters: Triton's own path
            return self.fn[grid](*args, **meta)
        device = self.device()
        key = (device, tuple(meta.items()), args_key(args))
        hit = self.compiled.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **meta)
            if not any(self.constexpr[:len(args)]):
                if len(self.compiled) >= _MAX_KEYS:
                    self.compiled.clear()
                consts = tuple(meta[n] if n in meta else self.defaults[n] for n in self.names[len(args):])
                self.compiled[key] = (kernel, consts)
            return kernel
        kernel, consts = hit
        g = tuple(grid) + (1, 1)
        kernel[g[:3]](*args, *consts, stream=self.stream(device))
        return kernel
