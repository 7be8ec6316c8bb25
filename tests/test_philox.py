"""fused_s2s.philox reproduces Triton's tl.rand bit for bit (SPEC section 5, same seed same run)."""
import pytest
import torch
import triton
import triton.language as tl

from fused_s2s import philox
from fused_s2s.kernels.gumbel import _uniform_tile

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
    u = philox.uniform_noise(7, (50, 4000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # the largest word maps to 1 - 2**-24 (not 1: the scale is just under 2**-31), so -log u > 0
    top = philox._word_to_uniform(torch.tensor([2**31 - 1]))
    assert float(top) < 1.0 and torch.isfinite(philox._gumbel_of(top)).all()
    assert torch.isfinite(philox.gumbel_noise(7, (50, 4000))).all()
    # u = 0 (the two words 0 and 0xffffffff map there) is clamped: g stays finite
    assert torch.isfinite(-torch.log(-torch.log(torch.tensor(0.0).clamp_min(philox.U_MIN))))


def test_uniform_is_uniform():
    scipy_stats = pytest.importorskip("scipy.stats")
    u = philox.uniform(3, torch.arange(100_000)).double().numpy()
    assert scipy_stats.kstest(u, "uniform").pvalue > 1e-3
    u = philox.uniform_noise(3, (25, 4001)).double().flatten().numpy()  # all four words, row ends
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


# ------------------------------------------------------------------------------------------------
# the Gumbel kernel's noise layout: one Philox call per 4 columns, counter (col // 4, row lo, row hi, 0)


@triton.jit
def _uniform_tile_kernel(out_ptr, seed_ptr, row0, V, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    rows = row0 + r.to(tl.int64)
    seed = tl.load(seed_ptr)
    start = 0
    while start < V:
        c = start + tl.arange(0, BLOCK_V)
        u = _uniform_tile(seed, rows, start, BLOCK_R, BLOCK_V)
        tl.store(out_ptr + r[:, None] * V + c[None, :], u, mask=(c < V)[None, :])
        start += BLOCK_V


@pytest.mark.parametrize("seed", [0, 2**32 + 3, 2**62 - 1])
@pytest.mark.parametrize("row0", [0, 2**32 - 2, 2**40 + 1])
@pytest.mark.parametrize("V,block_v", [(37, 16), (100, 64), (5, 16)])
def test_gumbel_kernel_uniforms_match_mirror_bitwise(device, seed, row0, V, block_v):
    R = 4
    out = torch.full((R, V), -1.0, device=device)
    s = torch.tensor(seed, dtype=torch.int64, device=device)
    _uniform_tile_kernel[(1,)](out, s, row0, V, BLOCK_R=R, BLOCK_V=block_v)
    rows = row0 + torch.arange(R, device=device)[:, None]
    ref = philox.uniform_at(s, rows, torch.arange(V, device=device)[None, :])
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_uniform_noise_is_uniform_at_on_the_grid():
    u = philox.uniform_noise(123, (2, 3, 11))  # rows = leading dims flattened
    rows = torch.arange(6)[:, None]
    torch.testing.assert_close(u.reshape(6, 11), philox.uniform_at(123, rows, torch.arange(11)[None, :]),
                               rtol=0, atol=0)
    # four columns share a counter but take different words; neighbouring rows differ
    assert len(set(u.reshape(6, 11)[0, :4].tolist())) == 4
    assert not torch.equal(u.reshape(6, 11)[0], u.reshape(6, 11)[1])
