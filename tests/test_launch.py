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
