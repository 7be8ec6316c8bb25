"""fused_s2s.philox reproduces Triton's tl.rand bit for bit (SPEC section 5, same seed same run)."""
import pytest
import torch
import triton
import triton.language as tl

from fused_s2s import philox

pytestmark = pytest.mark.kernels


@triton.jit
def _rand_kernel(out_ptr, seed_ptr, base, BLOCK: tl.constexpr):
    # the counter layout our kernels use: (offset lo, offset hi, 0, 0), and tl.rand itself
    offs = base + tl.arange(0, BLOCK).to(tl.int64)
    seed = tl.load(seed_ptr)
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = lo * 0
    c0, _1, _2, _3 = tl.philox(seed, lo, hi, zero, zero)
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.random.uint_to_uniform_float(c0))
    tl.store(out_ptr + BLOCK + tl.arange(0, BLOCK), tl.rand(seed, offs))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 7, 2**62 - 1])
@pytest.mark.parametrize("base", [0, 1000, 2**31 - 17, 2**32 - 5])
def test_uniform_matches_tl_rand_bitwise(device, seed, base):
    block = 32
    out = torch.empty(2 * block, device=device)
    s = torch.tensor(seed, dtype=torch.int64, device=device)
    _rand_kernel[(1,)](out, s, base, BLOCK=block)
    ref = philox.uniform(s, base + torch.arange(block, device=device))
    assert torch.equal(out[:block], ref), (out[:block] - ref).abs().max()
    assert torch.equal(out[block:], ref)


def test_uniform_range_and_gumbel_finite():
    u = philox.uniform(7, torch.arange(200_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    g = philox.gumbel(7, torch.arange(200_000))
    assert torch.isfinite(g).all()
    # u = 0 (the two words 0 and 0xffffffff map there) is clamped: g stays finite
    assert torch.isfinite(-torch.log(-torch.log(torch.tensor(0.0).clamp_min(philox.U_MIN))))


def test_uniform_is_uniform():
    scipy_stats = pytest.importorskip("scipy.stats")
    u = philox.uniform(3, torch.arange(100_000)).double().numpy()
    assert scipy_stats.kstest(u, "uniform").pvalue > 1e-3


def test_draw_seed_follows_manual_seed():
    torch.manual_seed(5)
    a = philox.draw_seed()
    torch.manual_seed(5)
    b = philox.draw_seed()
    g = torch.Generator().manual_seed(5)
    c = philox.draw_seed(generator=g)
    assert a.dtype == torch.int64 and a.dim() == 0
    assert int(a) == int(b) and int(a) >= 0
    assert int(philox.draw_seed()) != int(b)  # fresh draw each call
    assert int(c) >= 0
