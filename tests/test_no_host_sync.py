"""The fused decoder's per-step path makes no host synchronisation and no host-to-device copy,
checked without a GPU (tests/test_gpu_capture.py checks the same on one, under CUDA-graph capture).

Two runs, each under a recorder of the ops that would synchronise with or copy from the host on a
GPU (a TorchDispatchMode sees every aten op, the backward pass's included; a TorchFunctionMode the
Python methods that read values without an aten op, ``tolist`` / ``numpy``):

- on the "meta" device (what a GPU is to the host: no values, tensors the host cannot read),
  kernel launches recorded instead of run: ``.item()``, ``bool(t)``, ``tolist``, ``nonzero``, boolean
  indexing cannot run there at all; a CPU tensor that enters a device op (an H2D copy on a GPU, e.g.
  ``torch.tensor(x, device=dev)``, a CPU index, ``t.to(dev)``) is recorded. A 0-d CPU tensor in an
  elementwise op is allowed: CUDA reads it on the host as a scalar kernel argument, no copy.
- on the CPU with the real kernels (Triton's interpreter): the value-reading ops, and every tensor
  made from Python data (``torch.tensor`` / ``as_tensor`` of numbers or lists: an H2D copy when
  made on the GPU; here every tensor is on the CPU, so it cannot tell which device it is for).

Only the decoder pass is checked (forward and backward, every sampling mode, coin, cell, input
feeding, the teacher-forcing fast path): the encoder packs the source by its lengths on the host,
and check_ids reads the target ids (one sync per batch); both stay outside a captured graph.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fused_s2s
from fused_s2s import backend as _backend

pytestmark = pytest.mark.kernels

B, L, T, V, D = 3, 5, 4, 17, 16
MODES = ("argmax", "sample", "gumbel", "gumbel_hard", "softmax")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIB_DIRS = tuple(os.path.join(_REPO, d) + os.sep for d in ("fused_s2s", "kernels"))

# aten ops that read tensor values on the host (a device sync), whatever their arguments
_SYNC_OPS = {
    "_local_scalar_dense": "reads a value on the host (.item() / bool() / int() / float())",
    "is_nonzero": "reads a value on the host (bool(tensor))",
    "equal": "torch.equal reads the comparison on the host",
    "nonzero": "nonzero: its output size depends on the values",
    "argwhere": "argwhere: its output size depends on the values",
    "masked_select": "masked_select: its output size depends on the values",
    "_unique": "unique: its output size depends on the values",
    "_unique2": "unique: its output size depends on the values",
    "unique_dim": "unique: its output size depends on the values",
    "unique_consecutive": "unique_consecutive: its output size depends on the values",
    "unique_dim_consecutive": "unique_consecutive: its output size depends on the values",
    "bincount": "bincount reads the largest value on the host",
    "histc": "histc may read the range on the host",
    "multinomial": "multinomial checks its input on the host",
    "_pin_memory": "pins host memory",
}
_SYNC_METHODS = {"tolist": "tolist() copies the values to the host", "numpy": "numpy() needs host values",
                 "__array__": "numpy conversion needs host values", "cpu": "cpu() copies to the host"}  # Tensor.*


def _why(func, args, kwargs, device_type: str):
    """Why ``func`` on these arguments would sync with / copy from the host on a GPU, or None."""
    name = func.overloadpacket.__name__
    if name in _SYNC_OPS:
        return _SYNC_OPS[name]
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) >= 1 \
            and isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
        return "repeat_interleave with tensor repeats and no output_size reads their sum on the host"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"):
        idx = args[1] if len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx or ()):
            return "boolean-mask indexing (nonzero inside: its output size depends on the values)"
    if name in ("lift_fresh", "lift_fresh_copy") and device_type == "cpu":
        return "a tensor made from Python data (torch.tensor / as_tensor): an H2D copy when made on the GPU"
    if device_type != "cpu":  # a CPU tensor entering an op on the device
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if any(t.device.type == device_type for t in tensors) or kwargs.get("device") is not None:
            for t in tensors:
                if t.device.type != "cpu":
                    continue
                if name in ("_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize"):
                    return f"a host-to-device copy of a CPU tensor of shape {tuple(t.shape)}"
                if t.dim() == 0 and torch.Tag.pointwise in func.tags:
                    continue  # a CPU scalar in an elementwise op: a kernel argument, no copy
                return f"a CPU tensor of shape {tuple(t.shape)} enters a device op (an H2D copy or a device error)"
    return None


def _why_python(name: str, args, kwargs, device_type: str):
    """The Python-level calls that read values or copy Python data to the device without an aten
    op the dispatch mode would see (on meta a tensor made from Python data skips dispatch)."""
    if name in _SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
        return _SYNC_METHODS[name]
    if device_type == "cpu":  # made from Python data: lift_fresh, recorded by _why
        return None
    if name in ("tensor", "as_tensor", "asarray") and args and not isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device", args[2] if len(args) > 2 and name != "tensor" else None)
        if dev is not None and torch.device(dev).type == device_type:
            return f"torch.{name} of Python data on the device: a host-to-device copy"
    if name == "new_tensor" and len(args) > 1 and not isinstance(args[1], torch.Tensor):
        dev = kwargs.get("device") or args[0].device
        if torch.device(dev).type == device_type:
            return "Tensor.new_tensor of Python data on the device: a host-to-device copy"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and isinstance(args[0], torch.Tensor) \
            and args[0].device.type == device_type:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, (list, range)) for i in index):
            return "indexing with a Python list: the index is copied to the device"
    return None


def _where() -> str:
    """The innermost library frames of the current Python stack (the test's own frames left out)."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(_LIB_DIRS)]
    if not frames:
        return "  (no library frame: an autograd formula of the backward pass?)"
    return "\n".join(f"  {os.path.relpath(f.filename, _REPO)}:{f.lineno} in {f.name}: {f.line}" for f in frames[-3:])


class HostSyncRecorder:
    """Records (op, why, where) of every host sync / H2D copy while active; see the module docstring."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.found: list[str] = []
        self.launches: list[str] = []
        self.suspended = 0  # inside an interpreted kernel: its own host copies are the interpreter's
        recorder = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not recorder.suspended:
                    why = _why(func, args, kwargs, recorder.device_type)
                    if why:
                        recorder.record(str(func), why)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not recorder.suspended:
                    name = getattr(func, "__name__", "")
                    why = _why_python(name, args, kwargs, recorder.device_type)
                    if why:
                        recorder.record(name, why)
                return func(*args, **kwargs)

        self._modes = (_Function(), _Dispatch())

    def record(self, op: str, why: str) -> None:
        self.found.append(f"{op}: {why}\n{_where()}")

    @contextlib.contextmanager
    def suspend(self):
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1

    @contextlib.contextmanager
    def active(self):
        with self._modes[0], self._modes[1]:
            yield self

    def check(self, fn) -> None:
        """Run fn() under the recorder; fail listing what was recorded (and any error it raised:
        on meta an op that reads values cannot run)."""
        error = None
        try:
            with self.active():
                fn()
        except Exception as e:  # noqa: BLE001  (reported with the records below)
            error = e
        if self.found or error is not None:
            msg = "\n".join(dict.fromkeys(self.found))  # each offender once
            if error is not None:
                tb = "".join(traceback.format_tb(error.__traceback__)[-4:])
                msg += f"\nraised {type(error).__name__}: {error}\n{tb}"
            pytest.fail(f"host synchronisation / host-to-device copy in the decoder pass:\n{msg}", pytrace=False)


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------
def _kernel_classes():
    from triton.runtime import interpreter, jit

    return [jit.JITFunction, interpreter.InterpretedFunction]


@pytest.fixture
def meta(monkeypatch):
    """The "meta" device standing in for the GPU: backend="triton" accepted on it, kernel launches
    recorded (their tensor arguments must be on the device) instead of run, autocast off (it has no
    meta implementation; the CPU run covers autocast)."""
    rec = HostSyncRecorder("meta")

    def launch(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        name = getattr(self, "__name__", None) or self.fn.__name__
        rec.launches.append(name)
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                rec.record(f"launch {name}", f"a {a.device} tensor of shape {tuple(a.shape)} passed to the kernel")
        return None

    for cls in _kernel_classes():
        monkeypatch.setattr(cls, "run", launch)
    monkeypatch.setattr(_backend, "interpret_mode", lambda: True)
    is_enabled, autocast = torch.is_autocast_enabled, torch.autocast
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *a: False if a and a[0] == "meta" else is_enabled(*a))
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k:
                        contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *a, **k))
    return rec


@pytest.fixture
def cpu(monkeypatch):
    """The CPU with the kernels run by Triton's interpreter (their own host copies not recorded)."""
    if not _backend.interpret_mode():
        pytest.skip("the CPU run needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    from triton.runtime import interpreter

    rec = HostSyncRecorder("cpu")
    call = interpreter.GridExecutor.__call__

    def run_kernel(self, *args, **kwargs):
        rec.launches.append(self.fn.__name__)
        with rec.suspend():
            return call(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", run_kernel)
    return rec


def _decoder_inputs(device, cell="lstm", layers=1, input_feed=False, T=T, dtype=torch.float32):
    torch.manual_seed(0)
    model = fused_s2s.Seq2Seq(V, V, D, cell=cell, num_layers=layers, input_feed=input_feed, backend="triton")
    model = model.to(device=device, dtype=dtype)
    dec = model.decoder
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(B, L, D, generator=g, dtype=dtype).to(device).requires_grad_()  # the encoder's output
    lengths = torch.tensor([L, 2, 1][:B]).to(device)  # memory_mask as Seq2Seq.encode returns it
    final = [torch.randn(layers, B, D, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(2)]
    state = dec.init_state(tuple(final) if cell == "lstm" else final[0])
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    tgt[1, -1] = 0  # a padded target
    tgt = tgt.to(device)
    return model, dec, tgt[:, :-1], tgt[:, 1:], memory, lengths, state


def _pass(model, dec, tgt_in, tgt_out, memory, lengths, state, ratio, sampling="argmax", tau=0.7, **kw):
    """One training pass of the decoder: forward, loss, backward (what a captured graph holds)."""
    out = dec(tgt_in, memory, lengths, state, ratio, sampling, tau, check_ids=False, **kw)
    loss = model.loss(out.logits, tgt_out)
    loss.backward()
    return out, loss


def _check_grads(model, memory):
    assert memory.grad is not None
    assert all(p.grad is not None for n, p in model.decoder.named_parameters()), "a decoder parameter got no gradient"


# ----------------------------------------------------------------------------------------------
# The decoder on "meta" (device semantics): every mode, coin, architecture
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coin", ["token", "step", "sequence"])
@pytest.mark.parametrize("sampling", MODES)
def test_meta_step_loop_makes_no_host_sync(meta, sampling, coin):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta")
    meta.check(lambda: _pass(model, dec, tgt_in, tgt_out, memory, lengths, state, 0.5, sampling, coin=coin))
    _check_grads(model, memory)
    assert "_attn_fwd_kernel" in meta.launches  # the Triton path ran (its launches recorded)
    if sampling in ("sample", "gumbel", "gumbel_hard"):
        assert "_gumbel_fwd_kernel" in meta.launches


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard"), (0.0, "gumbel"), (0.5, "sample")])
@pytest.mark.parametrize("cell,layers,input_feed", [("lstm", 2, True), ("gru", 1, False), ("gru", 2, True)])
def test_meta_architectures_make_no_host_sync(meta, cell, layers, input_feed, ratio, sampling):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta", cell, layers, input_feed)
    meta.check(lambda: _pass(model, dec, tgt_in, tgt_out, memory, lengths, state, ratio, sampling))
    _check_grads(model, memory)


@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard", "softmax"])
def test_meta_tensor_ratio_and_tau_make_no_host_sync(meta, sampling):
    """The capturable form (fused_s2s.graphs scheduled=True): ratio and tau as 0-d device tensors,
    checked on the device and read by the kernels there."""
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta")
    ratio, tau = (torch.tensor(v, dtype=torch.float64, device="meta") for v in (0.5, 0.7))
    meta.check(lambda: _pass(model, dec, tgt_in, tgt_out, memory, lengths, state, ratio, sampling, tau))
    _check_grads(model, memory)


@pytest.mark.parametrize("steps", [T, 16])  # 16 queries: the tiled attention kernels
def test_meta_teacher_forcing_fast_path_makes_no_host_sync(meta, steps):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta", T=steps)
    meta.check(lambda: _pass(model, dec, tgt_in, tgt_out, memory, lengths, state, 1.0))
    _check_grads(model, memory)


@pytest.mark.parametrize("mask", ["lengths", "bool", "none"])
def test_meta_explicit_noise_and_masks_make_no_host_sync(meta, mask):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta")
    m = {"lengths": lengths, "none": None,
         "bool": torch.arange(L, device="meta")[None, :] < lengths[:, None]}[mask]
    noise = torch.empty(B, T, V, device="meta").exponential_().log_().neg_()  # any (B, T, V) noise
    meta.check(lambda: [_pass(model, dec, tgt_in, tgt_out, memory, m, state, 0.5, s, noise=noise)
                        for s in ("sample", "gumbel", "gumbel_hard")])


def test_meta_no_grad_pass_makes_no_host_sync(meta):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("meta")

    def run():
        with torch.no_grad():  # the launchers' direct path (no autograd.Function)
            for s in MODES:
                dec(tgt_in, memory, lengths, state, 0.5, s, 0.7, check_ids=False)
            dec(tgt_in, memory, lengths, state, 1.0, check_ids=False)

    meta.check(run)


def _fused_step_ops(q, H, logits, masks):
    """attention_step (forward + backward, once per mask form) and gumbel_softmax soft / hard and
    gumbel_sample, as one decoder step calls them."""
    for mask in masks:
        ctx, alpha = fused_s2s.attention_step(q, H, None, mask, backend="triton")
        (ctx.sum() + alpha.sum()).backward()
    for hard in (False, True):
        y, idx = fused_s2s.gumbel_softmax(logits, 0.7, hard=hard, return_index=True, backend="triton")
        y.sum().backward()
    fused_s2s.gumbel_sample(logits, backend="triton")


def test_meta_fused_ops_per_step_make_no_host_sync(meta):
    """attention_step and gumbel_softmax / gumbel_sample as one decoder step calls them."""
    q = torch.randn(B, D, device="meta", requires_grad=True)
    H = torch.randn(B, L, D, device="meta", requires_grad=True)
    lengths = torch.tensor([L, 2, 0]).to("meta")
    logits = torch.randn(B, V, device="meta", requires_grad=True)

    masks = (lengths, None, torch.arange(L, device="meta")[None, :] < lengths[:, None])
    meta.check(lambda: _fused_step_ops(q, H, logits, masks))
    kernels = {"_attn_fwd_kernel", "_attn_bwd_row_kernel", "_gumbel_fwd_kernel", "_gumbel_bwd_kernel"}
    assert kernels <= set(meta.launches)


# ----------------------------------------------------------------------------------------------
# The decoder on the CPU, kernels interpreted (real values, the kernels' outputs used)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,sampling,cell,layers,input_feed,coin", [
    *[(0.5, s, "lstm", 1, False, "token") for s in MODES],
    (1.0, "argmax", "lstm", 1, False, "token"),  # the teacher-forcing fast path
    (0.5, "gumbel_hard", "gru", 2, True, "step"),
    (0.5, "sample", "lstm", 2, False, "sequence"),
])
def test_cpu_decoder_pass_makes_no_host_sync(cpu, ratio, sampling, cell, layers, input_feed, coin):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("cpu", cell, layers, input_feed, T=3)
    res = []
    cpu.check(lambda: res.append(_pass(model, dec, tgt_in, tgt_out, memory, lengths, state, ratio, sampling,
                                       coin=coin)))
    out, loss = res[0]
    assert torch.isfinite(loss) and torch.isfinite(out.logits).all()
    _check_grads(model, memory)
    assert cpu.launches  # the kernels ran


def test_cpu_autocast_bf16_pass_makes_no_host_sync(cpu):
    model, dec, tgt_in, tgt_out, memory, lengths, state = _decoder_inputs("cpu", T=3)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dec(tgt_in, memory, lengths, state, 0.5, "gumbel_hard", 0.7, check_ids=False)
            loss = model.loss(out.logits, tgt_out)
        loss.backward()

    cpu.check(run)
    _check_grads(model, memory)


def test_cpu_fused_ops_per_step_make_no_host_sync(cpu):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, D, generator=g, requires_grad=True)
    H = torch.randn(B, L, D, generator=g, requires_grad=True)
    lengths = torch.tensor([L, 2, 0])
    logits = torch.randn(B, V, generator=g, requires_grad=True)

    cpu.check(lambda: _fused_step_ops(q, H, logits, (lengths,)))


# ----------------------------------------------------------------------------------------------
# The recorder itself: it catches what it is for (so the tests above can fail)
# ----------------------------------------------------------------------------------------------
def _offenders(dev):
    x = torch.randn(B, V, device=dev)
    return {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool((x > 0).any()),
        "float": lambda: float(x[0, 0]),
        "tolist": lambda: x.argmax(-1).tolist(),
        "nonzero": lambda: (x > 0).nonzero(),
        "mask index": lambda: x[x > 0],
        # a 0-d tensor value: torch >= 2.15 turns a Python scalar one into masked_fill_, which does not sync
        "mask assign": lambda: x.clone().__setitem__(x > 0, x.new_zeros(())),
        "masked_select": lambda: x.masked_select(x > 0),
        "unique": lambda: x.argmax(-1).unique(),
        "equal": lambda: torch.equal(x, x),
        "tensor literal": lambda: x * torch.tensor([2.0], device=dev),
        "tensor from list": lambda: x[:, torch.tensor([0, 1], device=dev)],
        "list index": lambda: x[:, [0, 1]],
        **({"to device": lambda: x + torch.ones(V).to(dev),  # on the CPU a no-op: the meta run's to catch
            "new_tensor": lambda: x.new_tensor([1.0, 2.0]),
            "cpu index": lambda: x.index_select(1, torch.zeros(2, dtype=torch.long))} if dev == "meta" else {}),
        "multinomial": lambda: torch.multinomial(x.softmax(-1), 1),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.ones(B, dtype=torch.long, device=dev)),
    }


@pytest.mark.parametrize("device_type,case", [(d, c) for d in ("meta", "cpu") for c in _offenders(d)])
def test_recorder_catches_host_syncs(device_type, case):
    rec = HostSyncRecorder(device_type)
    fn = _offenders(device_type)[case]
    with pytest.raises(pytest.fail.Exception, match="host synchronisation"):
        rec.check(fn)


def test_recorder_passes_device_side_ops():
    for device_type in ("meta", "cpu"):
        x = torch.randn(B, V, device=device_type)
        rec = HostSyncRecorder(device_type)
        cpu_scalar = [x * torch.tensor(2.0)] if device_type == "meta" else []  # CPU: any literal is recorded
        rec.check(lambda: cpu_scalar + [torch.where(x > 0, x, 0.0), x * 2.0, torch.zeros(3, device=device_type),
                           torch.full((B,), 0.5, device=device_type) < 0.7, x.argmax(-1), x.topk(2),
                           torch.rand(B, device=device_type), x.index_select(0, torch.zeros(2, dtype=torch.long,
                                                                                            device=device_type))])
