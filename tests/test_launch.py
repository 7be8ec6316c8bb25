"""kernels/_launch.py: the launchers' host-side helpers, and the interpreter fix that lets the
kernels loop with ``for`` over a runtime bound (Triton pipelines ``for`` loops, never ``while``)."""
import pytest
import torch
import triton
import triton.language as tl

from fused_s2s.backend import interpret_mode
from fused_s2s.kernels import _launch

pytestmark = pytest.mark.kernels


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, n, start, BLOCK: tl.constexpr):
    """out[0:BLOCK] = sum over the blocks of x[start:n] (a runtime start and bound, a pipelined loop)."""
    ar = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.range(start, n, BLOCK, num_stages=2):
        acc += tl.load(x_ptr + i + ar, mask=i + ar < n, other=0.0)
    tl.store(out_ptr + ar, acc)


def test_cdiv_and_next_power_of_2():
    assert [_launch.cdiv(a, 4) for a in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert [_launch.next_power_of_2(n) for n in (0, 1, 2, 3, 17, 64)] == [1, 1, 2, 4, 32, 64]


def test_aligned16_reads_sizes_strides_and_starts():
    x = torch.zeros(2, 3, 48)
    assert _launch.aligned16((32, 16), (x[..., :32], None, torch.zeros(5, 16)))
    assert not _launch.aligned16((32, 17), (x,))  # a size
    assert not _launch.aligned16((32,), (x[..., 1:33],))  # the start: 4 bytes in
    assert _launch.aligned16((32,), (x[..., 4:36],))  # 16 bytes in
    assert _launch.aligned16((32,), (torch.zeros(2, 48, dtype=torch.float16)[:, 8:40],))  # 16 bytes in
    assert not _launch.aligned16((32,), (torch.zeros(4, 40)[:, :32],))  # a row stride
    assert not _launch.aligned16((16,), (torch.zeros(200).as_strided((3, 2, 16), (40, 16, 1)),))  # batch stride
    assert not _launch.aligned16((16,), (torch.zeros(16, 16).t(),))  # last stride 16, not 1
    assert _launch.aligned16((), ())


@pytest.mark.parametrize("n,start", [(100, 0), (100, 16), (16, 16), (5, 0)])
def test_for_loop_over_a_runtime_bound(device, n, start):
    """A tl.range loop over runtime (start, n): the kernels' loop form. Under triton 3.6's
    interpreter with NumPy >= 2.4 this fails without interpreter_range_fix."""
    x = torch.arange(n, dtype=torch.float32, device=device)
    out = torch.zeros(16, device=device)
    _strided_sum_kernel[(1,)](x, out, n, start, BLOCK=16)
    assert out.sum().item() == x[start:].sum().item()


@pytest.mark.skipif(not interpret_mode(), reason="the fix is for the interpreter")
def test_interpreter_range_fix_is_installed_idempotent_and_restored(device):
    from triton.runtime import interpreter

    assert _launch.interpreter_range_fix()  # importing fused_s2s.kernels installed it already
    patched = interpreter._patch_lang_tensor
    assert getattr(patched, "_fused_s2s_range_fix", False)
    assert _launch.interpreter_range_fix()
    assert interpreter._patch_lang_tensor is patched  # not wrapped twice
    out = torch.zeros(16, device=device)
    _strided_sum_kernel[(1,)](torch.ones(40, device=device), out, 40, 0, BLOCK=16)
    assert out.sum().item() == 40
    # the interpreter's per-call patches of tl.tensor are undone after the call, ours with them
    assert not hasattr(tl.tensor, "__index__")


class _FakeParam:
    def __init__(self, name, is_constexpr, default=None):
        import inspect

        self.name, self.is_constexpr = name, is_constexpr
        self.default = inspect.Parameter.empty if default is None else default


class _FakeCompiled:
    """A CompiledKernel's launch form: ``kernel[grid](*all parameters, stream=)``, recorded."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.calls.append(("direct", grid, args, stream))


class _FakeJIT:
    """A JITFunction's launch, ``fn[grid](*args, **meta)`` -> CompiledKernel, recorded."""

    def __init__(self, params):
        self.params = params
        self.arg_names = [p.name for p in params]
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiled(self.calls)
        return run


def test_args_key_tells_apart_what_triton_specialises_on():
    x = torch.zeros(64)
    p = torch.nn.Parameter(torch.zeros(8))  # a Tensor subclass: through arg_spec
    key = _launch.args_key
    assert key((x, 32, 0.5)) == key((torch.zeros(32), 32, 2.0))  # a float's value is not specialised
    assert key((x[1:],)) != key((x,))  # 4 bytes off 16-byte alignment
    assert key((x.to(torch.float16),)) != key((x,))
    assert key((p,)) == key((torch.zeros(4),)) and key((p[1:],)) != key((p,))
    for a, b in ((32, 40), (32, 1), (2**31 - 16, 2**31), (1, True), (None, 0)):
        assert key((a,)) != key((b,)), (a, b)
    assert key((None,)) == key((None,))


def test_direct_launcher_skips_the_binder_only_for_a_launch_it_has_seen():
    fn = _FakeJIT([_FakeParam("x_ptr", False), _FakeParam("n", False), _FakeParam("BLOCK", True),
                   _FakeParam("FLAG", True, default=7)])
    d = _launch.DirectLauncher(fn, device=lambda: 0, stream=lambda dev: 1234)
    x = torch.zeros(64)
    d[(4,)](x, 32, BLOCK=16, num_warps=4)  # first: through Triton, which compiles
    assert fn.calls[-1] == ("jit", (4,), (x, 32), {"BLOCK": 16, "num_warps": 4})
    y = torch.ones(64)
    d[(5, 2)](y, 32, BLOCK=16, num_warps=4)  # same specialisation: the compiled kernel, every parameter
    assert fn.calls[-1] == ("direct", (5, 2, 1), (y, 32, 16, 7), 1234)
    for args, meta in (((x[1:], 32), {"BLOCK": 16, "num_warps": 4}),  # misaligned
                       ((x, 40), {"BLOCK": 16, "num_warps": 4}),  # an int not divisible by 16
                       ((x, 1), {"BLOCK": 16, "num_warps": 4}),  # an int Triton folds to 1
                       ((x, 32), {"BLOCK": 32, "num_warps": 4}),  # another constexpr
                       ((x, 32), {"BLOCK": 16, "num_warps": 8})):  # another option
        n = len(fn.calls)
        d[(4,)](*args, **meta)
        assert fn.calls[n][0] == "jit", (args, meta)
        d[(4,)](*args, **meta)
        assert fn.calls[n + 1][0] == "direct", (args, meta)
    # a constexpr passed by position: its value is not in the key, so Triton's path every time
    d[(4,)](x, 32, 16, num_warps=4)
    d[(4,)](x, 32, 16, num_warps=4)
    assert [c[0] for c in fn.calls[-2:]] == ["jit", "jit"]
    # another device: its own compile
    d.device = lambda: 1
    d[(4,)](x, 32, BLOCK=16, num_warps=4)
    assert fn.calls[-1][0] == "jit"
    # a callable grid (of the meta-parameters): Triton's own path
    d[lambda meta: (4,)](x, 32, BLOCK=16, num_warps=4)
    assert fn.calls[-1][0] == "jit"


def test_direct_launcher_forgets_its_keys_past_the_cap(monkeypatch):
    monkeypatch.setattr(_launch, "_MAX_KEYS", 3)
    fn = _FakeJIT([_FakeParam("n", False)])
    d = _launch.DirectLauncher(fn, device=lambda: 0, stream=lambda dev: 0)
    for n in range(5):  # one shape a key (ints by value)
        d[(1,)](n)
        assert len(d.compiled) <= 3
    d[(1,)](4)
    assert fn.calls[-1][0] == "direct"  # the newest key survived the clear


def test_direct_is_the_kernel_itself_unless_switched_on(monkeypatch):
    fn = _FakeJIT([_FakeParam("x_ptr", False)])
    assert _launch.direct(fn) is fn
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
    assert _launch.direct(fn) is fn  # not a JITFunction (the interpreter's kernels, a stub)


@pytest.mark.gpu
def test_direct_launch_gives_bitwise_the_jit_launch_results(monkeypatch):
    # FUSED_S2S_DIRECT_LAUNCH's path on real kernels: Gumbel-softmax (split rows too) and attention,
    # forward and backward, each op run three times (the first launch of a specialisation goes
    # through Triton, the later ones direct), against the default path with the same seeds
    import fused_s2s

    dev = torch.device("cuda")
    x = torch.randn(4, 40_000, device=dev)  # 16-aligned rows over several blocks: split on CUDA
    q, H = torch.randn(3, 5, 64, device=dev), torch.randn(3, 37, 64, device=dev)
    lengths = torch.tensor([37, 20, 1], device=dev)

    def ops():
        out = []
        for hard in (False, True):
            xi = x.clone().requires_grad_()
            torch.manual_seed(1)
            y = fused_s2s.gumbel_softmax(xi, 0.7, hard)
            (gx,) = torch.autograd.grad(y, xi, torch.ones_like(y).cumsum(-1))
            out += [y, gx]
        qi, Hi = q.clone().requires_grad_(), H.clone().requires_grad_()
        ctx, w = fused_s2s.attention_step(qi, Hi, None, lengths)
        out += [ctx, w, *torch.autograd.grad((ctx.square().sum() + w.sum()), (qi, Hi))]
        return out

    want = ops()
    monkeypatch.setattr(_launch, "DIRECT_LAUNCH", True)
    for _ in range(3):
        got = ops()
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert any(isinstance(d, _launch.DirectLauncher) and d.compiled for _, d in _launch._DIRECT_LAUNCHERS.values())


def test_launchers_run_on_the_first_tensors_device(monkeypatch):
    """on_tensor_device: Triton launches on the current CUDA device, so a tensor on another GPU
    must make its device current around the launcher, and only then (no guard otherwise)."""
    entered = []

    class Guard:  # stands for torch.cuda.device, which needs a CUDA build to enter
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class On:  # what the launcher reads of its first argument
        def __init__(self, dev):
            self.device = torch.device(dev)

    seen = []

    @_launch.on_tensor_device
    def launcher(x, y, *, z):
        seen.append((list(entered), y, z))
        return "out"

    assert launcher(On("cuda:1"), 2, z=3) == "out"
    assert seen[-1] == ([torch.device("cuda:1")], 2, 3) and entered[-1] == "exit"
    entered.clear()
    assert launcher(On("cuda:0"), 2, z=3) == "out" and launcher(On("cpu"), 2, z=3) == "out"
    assert entered == [], "a guard was entered for the current device or the CPU"


def test_every_public_launcher_has_the_device_guard():
    from fused_s2s.kernels import attention, gumbel

    for fn in (attention.attention_forward, attention.attention_backward, gumbel.gumbel_fwd, gumbel.gumbel_bwd):
        assert getattr(fn, "on_tensor_device", False), f"{fn.__name__} launches without on_tensor_device"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_gpu_that_is_not_current_give_the_current_gpus_results():
    """Both ops, forward and backward, on cuda:1 while cuda:0 is current: the results of cuda:0."""
    import fused_s2s

    def run(dev):
        torch.manual_seed(0)
        q, H = torch.randn(3, 2, 8, device=dev, requires_grad=True), torch.randn(3, 5, 8, device=dev, requires_grad=True)
        x = torch.randn(4, 300, device=dev, requires_grad=True)
        ctx, w = fused_s2s.attention_step(q, H, mask=torch.tensor([5, 2, 1], device=dev), backend="triton")
        y = fused_s2s.gumbel_softmax(x, 0.5, hard=True, backend="triton")
        loss = ctx.square().sum() + w.square().sum() + (y * x).sum()
        return [t.cpu() for t in (ctx, w, y, *torch.autograd.grad(loss, (q, H, x)))]

    with torch.cuda.device(0):
        want = run("cuda:0")
        got = run("cuda:1")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
