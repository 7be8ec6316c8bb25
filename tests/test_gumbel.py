"""Fused Gumbel-softmax (issue 5): kernels against F.gumbel_softmax, a float64 oracle and the
Philox mirror; statistics of the in-kernel noise; block-size independence; edge cases.

On CPU the kernels run under Triton's interpreter (conftest), so shapes stay small; the statistical
tests pack many rows into one program (block_r) so 100k draws take one launch of ~100 programs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_s2s
from fused_s2s import philox
from fused_s2s.kernels import gumbel as K
from tests.helpers import DTYPES, assert_oracle_close, no_host_sync

pytestmark = pytest.mark.kernels

# V = 1, odd, leading dims, one 8192-wide block, the loop over 4096-wide blocks (V > 16384)
SHAPES = [(1, 1), (3, 37), (2, 3, 300), (2, 5000), (2, 17000)]


def _gs(logits, tau=1.0, hard=False, **kw):
    kw.setdefault("backend", "triton")
    return fused_s2s.gumbel_softmax(logits, tau, hard, **kw)


def _torch_noise(like):
    # exactly how F.gumbel_softmax draws its noise
    return -torch.empty_like(like, memory_format=torch.legacy_contiguous_format).exponential_().log()


def _mirror_seed(seed_value, device):
    """The seed a call made right after torch.manual_seed(seed_value) draws."""
    torch.manual_seed(seed_value)
    return philox.draw_seed(device)


# ------------------------------------------------------------------------------------------------
# same noise: equal to torch.nn.functional.gumbel_softmax


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape,tau", [((4, 37), 0.7), ((2, 3, 300), 2.0), ((2, 5000), 1.0), ((2, 9000), 0.5),
                                       ((2, 17000), 1.5)])
def test_matches_F_gumbel_softmax_with_same_noise(device, shape, tau, hard):
    logits = torch.randn(shape, device=device) * 3
    dy = torch.randn(shape, device=device)
    torch.manual_seed(123)
    noise = _torch_noise(logits)
    x = logits.clone().requires_grad_()
    y = _gs(x, tau, hard, noise=noise)
    y.backward(dy)
    torch.manual_seed(123)
    x_ref = logits.clone().requires_grad_()
    y_ref = F.gumbel_softmax(x_ref, tau=tau, hard=hard)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if hard:
        assert torch.equal(y.argmax(-1), y_ref.argmax(-1))
        assert torch.equal(y, F.one_hot(y.argmax(-1), shape[-1]).float())  # exact 0/1 forward


# ------------------------------------------------------------------------------------------------
# the in-kernel noise is fused_s2s.philox's (what the reference model draws)


@pytest.mark.parametrize("R,V,block_v", [(5, 37, None), (3, 300, 64), (2, 5000, None), (2, 17000, None)])
def test_kernel_noise_equals_philox_mirror(device, R, V, block_v):
    x = torch.randn(R, V, device=device)
    seed = philox.draw_seed(device)
    _, idx, _, _, g = K.gumbel_fwd(x, 1.0, False, None, seed, block_v=block_v, write_noise=True)
    g_ref = philox.gumbel_noise(seed, (R, V), device)
    # the uniforms are bit-exact (test_philox); only the two logs may round differently
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(g, g_ref, rtol=4 * eps, atol=4 * eps)
    assert torch.equal(idx, (x + g_ref).argmax(-1))


@pytest.mark.parametrize("shape", [(64, 37), (16, 300), (3, 5000), (2, 17000)])
def test_sampled_index_is_argmax_of_logits_plus_mirror_noise(device, shape):
    logits = torch.randn(shape, device=device) * 2
    torch.manual_seed(7)
    _, idx = _gs(logits, 0.5, return_index=True)
    seed = _mirror_seed(7, device)
    g = philox.gumbel_noise(seed, shape, device)
    assert torch.equal(idx, (logits + g).argmax(-1))


@pytest.mark.parametrize("hard", [False, True])
def test_triton_and_eager_backends_draw_the_same_noise(device, hard):
    logits = torch.randn(3, 6, 41, device=device)
    torch.manual_seed(11)
    y_t, i_t = _gs(logits, 0.8, hard, dim=1, return_index=True, backend="triton")
    torch.manual_seed(11)
    y_e, i_e = _gs(logits, 0.8, hard, dim=1, return_index=True, backend="eager")
    assert torch.equal(i_t, i_e)
    torch.testing.assert_close(y_t, y_e)


# ------------------------------------------------------------------------------------------------
# gumbel_sample: the sampled index alone (no y written)


@pytest.mark.parametrize("backend", ["triton", "eager"])
# float64 under the newest triton only (CI time: its (2, 3, 300) case is 600 rows, ~16 s interpreted)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, pytest.param(torch.float64, marks=pytest.mark.newest_only)])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((64, 37), -1), ((2, 3, 300), 1), ((3, 5000), -1),
                                       ((2, 17000), -1)])
def test_gumbel_sample_is_the_hard_gumbel_softmax_index(device, backend, dtype, shape, dim):
    """Same RNG state, same seed drawn: gumbel_sample's index is gumbel_softmax's (any tau), and
    argmax(logits + g) with the Philox mirror's g, in float32 (float64 for float64 logits)."""
    logits = (torch.randn(shape, device=device) * 2).to(dtype)
    torch.manual_seed(5)
    idx = fused_s2s.gumbel_sample(logits, dim, backend=backend)
    torch.manual_seed(5)
    _, want = fused_s2s.gumbel_softmax(logits, 0.3, True, dim, return_index=True, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == want.shape
    assert torch.equal(idx, want)
    x = logits.movedim(dim, -1)
    g = philox.gumbel_noise(_mirror_seed(5, device), x.reshape(-1, x.shape[-1]).shape, device).reshape(x.shape)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(idx, (x.to(cdt) + g.to(cdt)).argmax(-1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
@pytest.mark.parametrize("given_noise", [False, True])
@pytest.mark.parametrize("block_v", [None, 16])
def test_gumbel_sample_kernel_index_alone_equals_full_forward(device, given_noise, block_v):
    """The launcher's store_y=False: no y, the same index as the full hard forward, over one block
    and over several (block_v=16): ties, NaNs (first NaN column), -inf columns, a row of -1e4."""
    V = 70
    logits = torch.randn(6, V, device=device)
    logits[0, 7] = float("nan")
    logits[1, [50, 66]] = float("nan")
    logits[2, :40] = float("-inf")
    logits[3] = -1e4
    logits[4, [20, 37]] = 1e3  # a tie (zero noise below) in different blocks
    logits[5, 3] = float("inf")  # no NaN, but the index-only kernel's NaN flag (sum t) is NaN: a scan finding none
    noise = _torch_noise(logits) if given_noise else None
    if given_noise:
        noise[4] = 0.0
    seed = None if given_noise else philox.draw_seed(device)
    y, idx, m, s = K.gumbel_fwd(logits, 1.0, True, noise, seed, block_v=block_v, store_y=False)
    _, want, m_full, _ = K.gumbel_fwd(logits, 1.0, True, noise, seed, block_v=block_v)
    assert y is None and s is None  # no softmax sum either: no exp per element
    assert torch.equal(m[2:], m_full[2:])  # max t (rows 0, 1: NaN)
    assert idx.tolist() == want.tolist()
    g = noise if given_noise else philox.gumbel_noise(seed, logits.shape, device)
    assert idx.tolist() == (logits + g).argmax(-1).tolist()
    assert idx[0] == 7 and idx[1] == 50 and idx[2] >= 40 and idx[5] == 3
    if given_noise:
        assert idx[4] == 20
    with pytest.raises(ValueError, match="hard"):
        K.gumbel_fwd(logits, 1.0, False, noise, seed, store_y=False)


def test_gumbel_sample_takes_no_gradient_and_draws_like_gumbel_softmax(device, monkeypatch):
    logits = torch.randn(4, 50, device=device, requires_grad=True)
    calls = []
    fwd = K.gumbel_fwd
    monkeypatch.setattr(K, "gumbel_fwd", lambda *a, **k: calls.append(k) or fwd(*a, **k))
    torch.manual_seed(3)
    a = fused_s2s.gumbel_sample(logits, backend="triton")
    b = fused_s2s.gumbel_sample(logits, backend="triton")
    after = torch.rand(1)
    torch.manual_seed(3)
    fused_s2s.gumbel_softmax(logits, 1.0, True, backend="triton")
    fused_s2s.gumbel_softmax(logits, 1.0, True, backend="triton")
    assert torch.equal(torch.rand(1), after)  # one seed per call each: the same RNG consumption
    assert not a.requires_grad and not torch.equal(a, b)  # fresh noise per call
    assert [k.get("store_y", True) for k in calls] == [False, False, True, True]  # the index alone: no y
    noise = _torch_noise(logits)
    state = torch.get_rng_state()
    assert torch.equal(fused_s2s.gumbel_sample(logits, noise=noise, backend="triton"), (logits + noise).argmax(-1))
    assert torch.equal(torch.get_rng_state(), state)  # given noise: nothing drawn
    gen = torch.Generator(device=device).manual_seed(1)
    c = fused_s2s.gumbel_sample(logits, generator=gen, backend="triton")
    gen.manual_seed(1)
    assert torch.equal(fused_s2s.gumbel_sample(logits, generator=gen, backend="eager"), c)


# ------------------------------------------------------------------------------------------------
# statistics of the in-kernel noise (>= 100k draws, one launch)

_P_MIN = 1e-3  # seeds are fixed (conftest), so these are deterministic; a wrong noise gives p ~ 0


@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
def test_argmax_frequencies_follow_softmax_chi2(device, tau):
    """Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)), whatever tau; the soft y
    carries the same sample at every tau (its argmax), so both are counted."""
    stats = pytest.importorskip("scipy.stats")
    N, K_ = 100_000, 10
    logits = torch.linspace(-2.0, 1.5, K_, device=device)
    x = logits.expand(N, K_)  # (N, K) stride-0 rows: one launch of N draws
    seed = philox.draw_seed(device)
    y, idx, _, _ = K.gumbel_fwd(x, 1.0 / tau, False, None, seed, block_r=1024, block_v=16)
    p = torch.softmax(logits.double(), 0).cpu().numpy()
    for name, sample in (("index", idx), ("argmax of soft y", y.argmax(-1))):
        counts = torch.bincount(sample.cpu(), minlength=K_).numpy()
        res = stats.chisquare(counts, N * p)
        assert res.pvalue > _P_MIN, f"{name} at tau={tau}: chi2={res.statistic:.1f} p={res.pvalue:.2e} counts={counts}"
    # tau rescales only the soft y: mean of max(y) goes from ~1 (tau 0.1) to ~1/K (tau 10)
    ymax = float(y.float().max(-1).values.mean())
    assert (ymax > 0.9) if tau == 0.1 else (ymax < 0.25 if tau == 10.0 else 0.3 < ymax < 0.9), ymax


@pytest.mark.parametrize("R,V", [(4, 25_000), (100_000, 1)])
def test_noise_is_gumbel_ks(device, R, V):
    stats = pytest.importorskip("scipy.stats")
    x = torch.zeros(R, V, device=device)
    seed = philox.draw_seed(device)
    kw = {"block_r": 1024, "block_v": 16} if V == 1 else {}
    *_, g = K.gumbel_fwd(x, 1.0, False, None, seed, write_noise=True, **kw)
    g = g.double().flatten().cpu().numpy()
    res = stats.kstest(g, "gumbel_r")
    assert res.pvalue > _P_MIN, f"KS vs Gumbel(0, 1): D={res.statistic:.4f} p={res.pvalue:.2e}"
    assert abs(g.mean() - 0.5772156649) < 0.02 and abs(g.var() - math.pi**2 / 6) < 0.05


# ------------------------------------------------------------------------------------------------
# bitwise reproducibility: block size, warps, seeds, generator


# (3, 1000) under the newest triton only (CI time: ~10 s interpreted; (6, 300) covers triton 3.6)
@pytest.mark.parametrize("R,V", [(6, 300), pytest.param(3, 1000, marks=pytest.mark.newest_only)])
def test_samples_bitwise_independent_of_block_size_and_warps(device, R, V):
    x = torch.randn(R, V, device=device)
    seed = philox.draw_seed(device)
    # num_stages: the loop path's software pipelining (loads in flight ahead), never the values
    configs = [dict(), dict(block_v=16), dict(block_v=64, num_warps=1), dict(block_r=2, block_v=1024, num_warps=8),
               dict(block_v=256, num_warps=2), dict(block_v=64, num_stages=1), dict(block_v=64, num_stages=4)]
    outs = [K.gumbel_fwd(x, 1 / 0.3, hard, None, seed, write_noise=True, **cfg) for cfg in configs for hard in (0, 1)]
    y0s, i0, m0, _, g0 = outs[0]
    y0h = outs[1][0]
    for cfg_i, (y, idx, m, s, g) in enumerate(outs):
        hard = cfg_i % 2
        assert torch.equal(g, g0) and torch.equal(idx, i0) and torch.equal(m, m0)
        if hard:
            assert torch.equal(y, y0h)
        else:  # the sum over V is accumulated in a block-dependent order: rounding only
            torch.testing.assert_close(y, y0s, rtol=2e-6, atol=1e-7)
    assert torch.equal(y0h, F.one_hot(i0, V).float())


@pytest.mark.parametrize("hard", [False, True])
def test_without_graph_same_samples(device, hard):
    """Under no_grad, or for logits not requiring grad, the launcher runs without the autograd
    Function (less host time per call): same seed, so bitwise the same y and index."""
    logits = torch.randn(2, 3, 40, device=device)
    outs = []
    for mode in ("graph", "no_grad", "detached"):
        torch.manual_seed(5)
        x = logits.clone().requires_grad_(mode != "detached")
        with torch.set_grad_enabled(mode != "no_grad"):
            y, idx = _gs(x, 0.7, hard, dim=1, return_index=True)
        assert (y.grad_fn is not None) == (mode == "graph")
        outs.append((y.detach(), idx))
    for y, idx in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(idx, outs[0][1])


@pytest.mark.parametrize("hard", [False, True])
def test_return_index_changes_nothing_else(device, hard):
    """With return_index=False the autograd Function returns y alone (less host time); y and the
    gradient are bitwise those of return_index=True, also with dim not last (moved back)."""
    logits = torch.randn(2, 40, 3, device=device)
    dy = torch.randn(2, 40, 3, device=device)
    outs = []
    for with_index in (False, True):
        torch.manual_seed(5)
        x = logits.clone().requires_grad_(True)
        out = _gs(x, 0.7, hard, dim=1, return_index=with_index)
        y = out[0] if with_index else out
        assert isinstance(y, torch.Tensor) and y.shape == logits.shape
        (dx,) = torch.autograd.grad(y, x, dy)
        outs.append((y.detach(), dx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_explicit_noise_draws_nothing(device):
    logits = torch.randn(3, 20, device=device)
    noise = _torch_noise(logits)
    gen = torch.Generator(device).manual_seed(1)
    gen_state, state = gen.get_state(), torch.get_rng_state()
    y = _gs(logits, 1.0, noise=noise, generator=gen)  # the generator is not needed and not advanced
    assert torch.equal(gen.get_state(), gen_state) and torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(y, torch.softmax(logits + noise, -1))


def test_manual_seed_reproduces_and_each_call_draws_fresh(device):
    logits = torch.randn(4, 50, device=device)
    torch.manual_seed(3)
    a, ia = _gs(logits, 0.5, return_index=True)
    b, ib = _gs(logits, 0.5, return_index=True)
    torch.manual_seed(3)
    c, ic = _gs(logits, 0.5, return_index=True)
    assert torch.equal(a, c) and torch.equal(ia, ic)
    assert not torch.equal(a, b)


def test_generator_is_honoured(device):
    logits = torch.randn(4, 50, device=device)
    state = torch.get_rng_state()
    a = _gs(logits, generator=torch.Generator(device).manual_seed(5))
    b = _gs(logits, generator=torch.Generator(device).manual_seed(5))
    c = _gs(logits, generator=torch.Generator(device).manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    if device.type == "cpu":
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    seed = philox.draw_seed(device, torch.Generator(device).manual_seed(5))
    torch.testing.assert_close(a, torch.softmax(logits + philox.gumbel_noise(seed, (4, 50), device), -1))


# ------------------------------------------------------------------------------------------------
# accuracy: float64 oracle criterion, gradcheck


def _oracle_case(shape, dtype, device):
    logits = (torch.randn(shape, device=device) * 2).to(dtype)
    noise = philox.gumbel_noise(philox.draw_seed(device), shape, device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    return logits, noise, dy


def _softmax_grads(logits, noise, dy, tau, compute_dtype):
    x = logits.to(compute_dtype).requires_grad_()
    y = torch.softmax((x + noise.to(compute_dtype)) / tau, -1)
    y.backward(dy.to(compute_dtype))
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hard", [False, True])
def test_float64_oracle_forward_backward(device, dtype, shape, hard):
    tau = 0.6
    logits, noise, dy = _oracle_case(shape, dtype, device)
    x = logits.clone().requires_grad_()
    y, idx = _gs(x, tau, hard, noise=noise, return_index=True)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and idx.dtype == torch.int64
    y_o, dx_o = _softmax_grads(logits, noise, dy, tau, torch.float64)
    y_e, dx_e = _softmax_grads(logits, noise, dy, tau, dtype)  # eager PyTorch in the same dtype
    if hard:
        # the sample of the perturbed logits t = x + g (rounded once to fp32, where t is formed)
        t = logits.float() + noise.float()
        assert torch.equal(idx, t.argmax(-1))
        assert torch.equal(y, F.one_hot(idx, shape[-1]).to(dtype))
    else:
        assert_oracle_close(y, y_e, y_o, name="y")
    assert_oracle_close(x.grad, dx_e, dx_o, name="dlogits")  # straight-through: the soft gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_kernel_noise", [False, True])
def test_float64_oracle_loop_path_forced_small_blocks(device, dtype, in_kernel_noise):
    """V over several blocks (block_v=64) in both passes of the forward and the backward. The two
    noise sources take different second passes: given noise re-reads x and the noise; in-kernel
    noise keeps q = exp(z - m_b) (forward) or y (backward) in the output in its dtype."""
    tau, shape = 1.3, (3, 300)
    logits, noise, dy = _oracle_case(shape, dtype, device)
    seed = philox.draw_seed(device)
    if in_kernel_noise:  # the oracle and eager take the mirror's noise (fp32, like the kernel's)
        noise = philox.gumbel_noise(seed, shape, device)
    given = None if in_kernel_noise else noise
    y, idx, m, s = K.gumbel_fwd(logits, 1 / tau, False, given, seed, block_v=64)
    dx = K.gumbel_bwd(dy, logits, m, s, 1 / tau, given, seed, idx=idx, block_v=64)
    y_o, dx_o = _softmax_grads(logits, noise, dy, tau, torch.float64)
    y_e, dx_e = _softmax_grads(logits, noise, dy, tau, dtype)
    assert_oracle_close(y, y_e, y_o, name="y")
    assert_oracle_close(dx, dx_e, dx_o, name="dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_backend_meets_oracle(device, dtype):
    tau, shape = 0.6, (3, 37)
    logits, noise, dy = _oracle_case(shape, dtype, device)
    x = logits.clone().requires_grad_()
    y = _gs(x, tau, noise=noise, backend="eager")
    y.backward(dy)
    y_o, dx_o = _softmax_grads(logits, noise, dy, tau, torch.float64)
    y_e, dx_e = _softmax_grads(logits, noise, dy, tau, dtype)
    assert_oracle_close(y, y_e, y_o, name="y")
    assert_oracle_close(x.grad, dx_e, dx_o, name="dlogits")


@pytest.mark.newest_only
def test_gradcheck_float64_explicit_noise(device):
    logits = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    noise = philox.gumbel_noise(philox.draw_seed(device), (3, 7), device).double()
    assert torch.autograd.gradcheck(lambda x: _gs(x, 0.7, noise=noise), (logits,))
    # dim != -1 and leading dims
    logits3 = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    noise3 = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda x: _gs(x, 1.7, noise=noise3, dim=1), (logits3,))


@pytest.mark.newest_only
def test_gradcheck_float64_in_kernel_noise_regenerated_in_backward(device):
    logits = torch.randn(2, 9, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x: _gs(x, 0.9, generator=torch.Generator(device).manual_seed(17))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("hard", [False, True])
def test_double_backward_gives_the_eager_second_order_gradients(hard, device):
    """create_graph=True: dlogits is differentiable and its gradient is the eager backend's with
    the same seed (the same Philox noise). Before, the backward was once_differentiable, whose
    error node a torch.autograd.grad(penalty, logits) never reaches: the penalty's gradient
    silently lacked the term through dlogits."""
    logits = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    dy = torch.randn(3, 11, dtype=torch.float64, device=device)

    def second(backend):
        y = _gs(logits, 0.7, hard, generator=torch.Generator(device).manual_seed(5), backend=backend)
        (dx,) = torch.autograd.grad((y * dy).sum(), logits, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum() + logits.square().sum(), logits)
        return dx, ddx

    for a, b in zip(second("triton"), second("eager")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("learned", ["tau", "noise_scale"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("logits_grad", [True, False])
def test_tensor_arguments_that_require_grad_get_the_eager_gradient(learned, hard, logits_grad, device):
    """A learned temperature (tau a 0-d tensor with requires_grad), or noise= from a differentiable
    computation (here times a learned scale; t = logits + g, so the noise gets dlogits' values):
    F.gumbel_softmax and the eager backend give them gradients. The Triton kernel takes no tau
    gradient, so that backward runs the eager math. Before, both were silently None, also with
    logits that need none."""
    g = _torch_noise(torch.empty(3, 13, device=device))
    got = []
    for backend, dtype in (("triton", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        logits = torch.randn(3, 13, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        logits.requires_grad_(logits_grad)
        p = torch.tensor(0.8 if learned == "tau" else 1.3, device=device, dtype=dtype, requires_grad=True)
        if learned == "tau":
            y = _gs(logits, p, hard, generator=torch.Generator(device).manual_seed(9), backend=backend)
        else:
            y = _gs(logits, 0.6, hard, noise=g.to(dtype) * p, backend=backend)
        (y.square() * torch.arange(13.0, device=device, dtype=dtype)).sum().backward()
        assert p.grad is not None, backend
        got.append((p.grad, logits.grad))
    (p_t, x_t), (p_e, x_e), (p_o, x_o) = got  # Triton, eager, float64 oracle
    assert_oracle_close(p_t, p_e, p_o, name=f"d{learned}")
    if logits_grad:
        assert_oracle_close(x_t, x_e, x_o, name="dlogits")


@pytest.mark.newest_only
def test_gradgradcheck_float64_in_kernel_noise(device):
    logits = torch.randn(2, 6, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x: _gs(x, 0.9, generator=torch.Generator(device).manual_seed(17))  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_hard_backward_is_the_soft_gradient(device):
    logits = torch.randn(4, 33, device=device)
    noise = _torch_noise(logits)
    dy = torch.randn(4, 33, device=device)
    grads = []
    for hard in (False, True):
        x = logits.clone().requires_grad_()
        _gs(x, 0.5, hard, noise=noise).backward(dy)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------
# extremes: +-1e4 logits, NaN, -inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_huge_logits_stay_finite(device, dtype, tau):
    logits = (torch.randn(4, 300, device=device).sign() * 1e4).to(dtype)
    logits[1] = 1e4  # a row of equal huge logits
    for hard in (False, True):
        x = logits.clone().requires_grad_()
        y = _gs(x, tau, hard)
        y.float().square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(y.float().sum(-1), torch.ones(4, device=device), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_stay_finite_over_blocks(device, dtype):
    """The loop path (block_v=64) with in-kernel noise: q = exp(z - m_b) kept in y and y kept in
    dx stay finite and in [0, 1] for logits of +-1e4 at tau 0.1 (z up to 1e5)."""
    logits = (torch.randn(4, 300, device=device).sign() * 1e4).to(dtype)
    logits[1] = 1e4
    logits[2, :100] = -1e4  # the first blocks far below the row's max
    seed = philox.draw_seed(device)
    y, idx, m, s = K.gumbel_fwd(logits, 10.0, False, None, seed, block_v=64)
    dx = K.gumbel_bwd(torch.ones_like(logits), logits, m, s, 10.0, None, seed, idx=idx, block_v=64)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and (y >= 0).all() and (y <= 1).all()
    torch.testing.assert_close(y.float().sum(-1), torch.ones(4, device=device), atol=1e-2, rtol=0)
    torch.testing.assert_close(dx.float(), torch.zeros_like(dx, dtype=torch.float32), atol=1e-2, rtol=0)  # dy = 1: 0


def test_nan_logits_give_nan_rows(device):
    logits = torch.randn(4, 40, device=device)
    logits[1, 7] = float("nan")
    logits[2, 30] = float("nan")
    for hard in (False, True):
        x = logits.clone().requires_grad_()
        y, idx = _gs(x, 0.5, hard, return_index=True)
        y.sum().backward()
        bad = torch.tensor([False, True, True, False], device=device)
        assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
        assert torch.isnan(x.grad[bad]).all() and torch.isfinite(x.grad[~bad]).all()
        assert idx[1] == 7 and idx[2] == 30  # torch.argmax semantics: the NaN's column


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / inf rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("given_noise", [False, True])
def test_nan_index_over_blocks_is_torch_argmax(device, given_noise, dtype):
    """Rows over several blocks (block_v=16): the sampled index of a row with NaNs is its first
    NaN column, in the first block or a later one, as torch.argmax; other rows are untouched.
    bf16: the scan for a NaN past the first block compares in fp32 (under the interpreter a bf16
    load is raw bits, where NaN != NaN never holds)."""
    V = 70
    logits = torch.randn(5, V, device=device).to(dtype)
    logits[0, 7] = float("nan")
    logits[1, 50] = float("nan")
    logits[1, 66] = float("nan")
    logits[2, 33] = float("inf")  # s is NaN (inf - inf) but there is no NaN: the argmax is the inf
    noise = _torch_noise(logits)
    if given_noise:
        noise[3, 40] = float("nan")  # a NaN in the given noise is a NaN of t = x + g
    seed = philox.draw_seed(device)
    for hard in (False, True):
        y, idx, _, _ = K.gumbel_fwd(logits, 2.0, hard, noise if given_noise else None,
                                    None if given_noise else seed, block_v=16)
        g = noise if given_noise else philox.gumbel_noise(seed, logits.shape, device)
        want = (logits.float() + g.float()).argmax(-1)
        assert idx.tolist() == want.tolist()
        assert idx[0] == 7 and idx[1] == 50 and idx[2] == 33 and (idx[3] == 40) == given_noise
        assert torch.isnan(y[:3]).all() and torch.isfinite(y[4]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on 1 / 0 (the NaN row)
def test_neg_inf_logits_are_masked_across_blocks(device):
    V = 40
    logits = torch.randn(3, V, device=device)
    logits[0, :20] = float("-inf")  # the first blocks (block_v=16) are all -inf
    logits[1, 5] = float("-inf")
    logits[2] = float("-inf")  # nothing to sample: NaN, like torch.softmax
    logits = torch.cat([logits, logits[:1] - 5000.0])  # all -inf blocks, then a max of about -1e4
    noise = _torch_noise(logits)
    y, idx, m, s = K.gumbel_fwd(logits, 2.0, False, noise, None, block_v=16)
    y_ref = torch.softmax((logits + noise) * 2.0, -1)
    torch.testing.assert_close(y[[0, 1, 3]], y_ref[[0, 1, 3]])
    assert (y[0, :20] == 0).all() and y[1, 5] == 0 and idx[0] >= 20
    assert torch.isnan(y[2]).all()
    yh, *_ = K.gumbel_fwd(logits, 2.0, True, noise, None, block_v=16)
    assert torch.isnan(yh[2]).all() and torch.equal(yh[:2], F.one_hot(idx[:2], V).float())
    assert torch.equal(yh[3], F.one_hot(idx[3], V).float())


@pytest.mark.parametrize("block_v", [None, 16])
def test_ties_pick_the_first_column_like_torch_argmax(device, block_v):
    logits = torch.zeros(3, 40, device=device)
    logits[0, [3, 20, 37]] = 5.0  # equal maxima in different blocks of 16
    logits[1, [17, 18]] = 5.0  # within one block
    logits[2] = 1.0  # all equal
    noise = torch.zeros_like(logits)
    for hard in (False, True):
        y, idx, _, _ = K.gumbel_fwd(logits, 1.0, hard, noise, None, block_v=block_v)
        assert idx.tolist() == [3, 17, 0] == logits.argmax(-1).tolist()


# ------------------------------------------------------------------------------------------------
# shapes, dims, return_index, empty


@pytest.mark.parametrize("dim", [0, 1, -2, 3])
def test_leading_dims_and_dim(device, dim):
    shape = (5, 3, 4, 6)
    logits = torch.randn(shape, device=device)
    noise = _torch_noise(logits)
    y, idx = _gs(logits, 0.9, False, dim=dim, noise=noise, return_index=True)
    y_ref = torch.softmax((logits + noise) / 0.9, dim)
    torch.testing.assert_close(y, y_ref)
    assert idx.shape == tuple(s for i, s in enumerate(shape) if i != dim % 4)
    assert torch.equal(idx, (logits + noise).argmax(dim))
    yh, idh = _gs(logits, 0.9, True, dim=dim, noise=noise, return_index=True)
    assert torch.equal(idh, idx) and torch.equal(yh.argmax(dim), idx)
    assert torch.equal(yh.sum(dim), torch.ones_like(idx).float())  # exact one-hot along dim


def test_non_contiguous_inputs(device):
    base = torch.randn(6, 80, device=device)
    logits = base[::2, ::2]  # (3, 40), strided both ways
    noise = _torch_noise(base)[1::2, ::2]
    x = logits.clone().requires_grad_()
    y = _gs(x, 1.0, noise=noise)
    dy = torch.randn(40, 3, device=device).t()  # non-contiguous upstream gradient
    y.backward(dy)
    x_ref = logits.clone().requires_grad_()
    y_ref = torch.softmax(x_ref + noise, -1)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_empty_rows(device):
    logits = torch.randn(0, 7, device=device, requires_grad=True)
    y, idx = _gs(logits, return_index=True)
    assert y.shape == (0, 7) and idx.shape == (0,)
    y.sum().backward()
    assert logits.grad.shape == (0, 7)


def test_auto_backend_on_cpu_is_eager(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched for a CPU tensor with backend='auto'")

    monkeypatch.setattr(K, "gumbel_fwd", boom)
    monkeypatch.delenv("FUSED_S2S_BACKEND", raising=False)
    y = fused_s2s.gumbel_softmax(torch.randn(2, 5), 1.0)
    assert y.shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# bad inputs: clear errors, raised before any kernel


@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the input was validated")

    monkeypatch.setattr(K, "gumbel_fwd", boom)
    monkeypatch.setattr(K, "gumbel_bwd", boom)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf"), 1e-39, 1e300])
def test_bad_tau(device, no_kernels, tau):
    with pytest.raises(ValueError, match="tau"):
        _gs(torch.randn(2, 5, device=device), tau)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tau", [2.0 ** -126, 1e-30, 2.0 ** 126])
def test_tau_at_the_ends_of_its_range_gives_no_nan(backend, dtype, tau, device):
    """Outside [2**-126, 2**127] tau is a ValueError (the kernels gave NaN rows at 1e-39 and 1e300);
    inside, both backends give finite y and gradients: for a tiny tau the soft y is the one-hot of
    the sample (the eager backend divided before subtracting the max and gave NaN rows from tau
    ~1e-37 with logits of a few units), for a huge one the uniform distribution."""
    logits = (torch.randn(3, 9, generator=torch.Generator().manual_seed(1)) * 5).to(device, dtype).requires_grad_()
    w = torch.arange(9.0, device=device)
    ys = []
    for hard in (False, True):
        y = _gs(logits, tau, hard, generator=torch.Generator(device).manual_seed(3), backend=backend)
        (dx,) = torch.autograd.grad((y.float() * w).sum(), logits)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all(), (hard, y, dx)
        ys.append(y.float())
    if tau < 1:
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)  # soft = the one-hot sample
    else:
        torch.testing.assert_close(ys[0], torch.full_like(ys[0], 1 / 9), rtol=1e-2, atol=0)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf"), 1e-39, 1e300])
def test_bad_tau_tensor_on_cpu(no_kernels, tau):
    # a CPU tensor's value is read directly (no device to sync with): the same ValueError as a float
    with pytest.raises(ValueError, match=r"tau must be a number in \[2\*\*-126, 2\*\*126\]"):
        _gs(torch.randn(2, 5), torch.tensor(tau, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(logits=torch.ones(2, 5, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.tensor(1.0)), ValueError, "logits"),
    (dict(logits=torch.randn(2, 0)), ValueError, "category"),
    (dict(tau=torch.tensor([1.0])), ValueError, "tau as a tensor must be 0-d"),
    (dict(tau=torch.tensor(1)), TypeError, "tau"),
    (dict(tau=torch.tensor(1.0, device="meta")), ValueError, "tau"),
    (dict(dim=2), ValueError, "dim"),
    (dict(dim=-3), ValueError, "dim"),
    (dict(dim=1.0), TypeError, "dim"),
    (dict(noise=torch.randn(2, 4)), ValueError, "noise"),
    (dict(noise=torch.ones(2, 5, dtype=torch.int32)), TypeError, "noise"),
    (dict(noise=torch.randn(2, 5, device="meta")), ValueError, "noise"),
    (dict(generator=0), TypeError, "generator"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_inputs(no_kernels, kwargs, exc, match):
    args = dict(logits=torch.randn(2, 5), tau=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_s2s.gumbel_softmax(args.pop("logits"), args.pop("tau"), backend=args.pop("backend", "triton"), **args)
    if "tau" not in kwargs:  # gumbel_sample shares every check but tau's
        args = dict(logits=torch.randn(2, 5))
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            fused_s2s.gumbel_sample(args.pop("logits"), backend=args.pop("backend", "triton"), **args)


@pytest.mark.gpu
def test_generator_on_another_device_cuda(no_kernels):
    with pytest.raises(ValueError, match="generator"):
        fused_s2s.gumbel_softmax(torch.randn(2, 5, device="cuda"), generator=torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        fused_s2s.gumbel_sample(torch.randn(2, 5, device="cuda"), generator=torch.Generator())


def test_given_noise_backward_takes_the_loop_past_8192_columns():
    """(the one-block 16384 form spilled under triton 3.7.1; test_matches_F_gumbel_softmax_with_same_noise
    runs V 9000 through it)"""
    assert K.pick_config(16384)[3] and K.pick_config(16384, given_noise_bwd=True) == (*K._MULTI_CONFIG, False)
    assert K.pick_config(8192, given_noise_bwd=True) == K.pick_config(8192)
    assert K.pick_config(8192)[1] == K._GIVEN_NOISE_BWD_MAX_SINGLE
    labels = [c.label for c in K._aot_configs()]
    assert "bwd fp32 noise=given 1x16384" not in labels and "fwd fp32 noise=given 1x16384" in labels
    assert "bwd fp32 noise=philox 1x16384" in labels and "bwd fp32 noise=given 1x8192" in labels


def test_bad_launcher_block():
    with pytest.raises(ValueError, match="block_v"):
        K.pick_config(100, block_v=48)
    with pytest.raises(ValueError, match="block_r"):
        K.pick_config(100, block_r=4, block_v=32)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_stages"):
            K.loop_stages(False, False, torch.float32, bad)
    assert K.loop_stages(True, False, torch.float32, 4) == 1  # one block: no loop to pipeline
    # the launcher pipelines the in-kernel-noise loop path; given noise and fp64 (verification) stay flat
    assert K.loop_stages(False, False, torch.bfloat16) == K._LOOP_STAGES >= 2
    assert K.loop_stages(False, True, torch.float32) == K.loop_stages(False, False, torch.float64) == 1
    # rows Triton does not specialise as 16-aligned (scalar loads) stay unpipelined too
    assert K.loop_stages(False, False, torch.float32, aligned=False) == 1
    x = torch.zeros(4, 48)
    assert K.rows_aligned(32, x[:, :32]) and K.rows_aligned(48, x, torch.zeros(4, 48))
    assert not K.rows_aligned(30, x[:, :30])  # V
    assert not K.rows_aligned(47, x[:, 1:])  # V and the pointer (4 bytes in)
    assert not K.rows_aligned(32, x[:, 1:33])  # the pointer
    assert not K.rows_aligned(32, torch.zeros(4, 40)[:, :32])  # the row stride


@pytest.mark.parametrize("V", [300, 320], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("given", [False, True])
def test_backward_bitwise_independent_of_num_stages(device, given, V):
    """Software pipelining (loads in flight ahead, through shared memory on a GPU) moves data, never
    the arithmetic: forward and backward are bitwise the same at every num_stages, with in-kernel
    and with given noise (the loop path, 5 blocks of 64 per row; V 300: the last one partial, rows
    Triton specialises as unaligned; V 320: aligned, the launcher's default pipelined path)."""
    R = 3
    x, dy = torch.randn(R, V, device=device), torch.randn(R, V, device=device)
    noise = -torch.empty(R, V, device=device).exponential_().log() if given else None
    seed = None if given else philox.draw_seed(device)
    outs = []
    for ns in (1, 2, 3):
        y, idx, m, s = K.gumbel_fwd(x, 1 / 0.7, False, noise, seed, block_v=64, num_stages=ns)
        dx = K.gumbel_bwd(dy, x, m, s, 1 / 0.7, noise, seed, idx=idx, block_v=64, num_stages=ns)
        outs.append((y, idx, m, s, dx))
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("block_v", [None, 64], ids=["one_block", "loop"])
def test_softmax_exponent_is_shift_invariant(device, block_v):
    """softmax((x + c) / tau) = softmax(x / tau): logits offset by 1000 (exactly representable, zero
    noise so t = x) give y and dlogits within a few fp32 ulps of the float64 values. The kernels
    scale after subtracting the max, exp((t - max t) / tau); the form t / tau - (max t) / tau
    rounds at |t / tau| ~ 2000 and was ~1e-4 off in y here (as eager fp32 is)."""
    R, V, tau = 3, 200, 0.7  # 1/tau inexact: x * fp32(1/tau) rounds
    x = (1000 + torch.randint(-256, 256, (R, V), device=device) / 64).float()  # exact in fp32
    dy = torch.randn(R, V, device=device)
    noise = torch.zeros(R, V, device=device)
    y, idx, m, s = K.gumbel_fwd(x, 1 / tau, False, noise, None, block_v=block_v)
    dx = K.gumbel_bwd(dy, x, m, s, 1 / tau, noise, None, idx=idx, block_v=block_v)
    x64 = x.double().requires_grad_()
    y64 = torch.softmax(x64 / tau, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    eps = torch.finfo(torch.float32).eps
    assert (y.double() - y64).abs().max() <= 8 * eps * y64.abs().max()
    assert (dx.double() - dx64).abs().max() <= 16 * eps * dx64.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_off_draws_the_noise_again_in_the_second_passes(device, dtype):
    """The loop path's KEEP (kernels/gumbel.py: _KEEP): on, the soft forward's and the backward's
    second passes read back what pass 1 kept in the output (q, y); off, they re-read the logits
    and draw the noise again. Same samples and (m, s) either way. In fp32, keep off is exactly the
    given-noise path fed the in-kernel noise (same arithmetic, bitwise); in both dtypes both are
    within the float64 rule of the same noise's softmax and gradient."""
    R, V, tau = 3, 320, 0.7  # 5 blocks of 64 a row
    x = torch.randn(R, V, device=device).to(dtype)
    dy = torch.randn(R, V, device=device).to(dtype)
    seed = philox.draw_seed(device)
    outs = {}
    for keep in (True, False):
        y, idx, m, s, g = K.gumbel_fwd(x, 1 / tau, False, None, seed, block_v=64, keep=keep, write_noise=True)
        dx = K.gumbel_bwd(dy, x, m, s, 1 / tau, None, seed, idx=idx, block_v=64, keep=keep)
        outs[keep] = y, idx, m, s, dx
    for a, b in zip(outs[True][1:4], outs[False][1:4]):  # pass 1 is the same
        assert torch.equal(a, b)
    if dtype == torch.float32:
        y_n, idx_n, m_n, s_n = K.gumbel_fwd(x, 1 / tau, False, g, None, block_v=64)
        dx_n = K.gumbel_bwd(dy, x, m_n, s_n, 1 / tau, g, None, idx=idx_n, block_v=64)
        assert torch.equal(outs[False][0], y_n) and torch.equal(outs[False][4], dx_n)
    # float64 oracle on the same noise; eager in the same dtype for the error scale
    x64 = (x.double() + g.double()).requires_grad_()
    y64 = torch.softmax(x64 / tau, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    xe = (x + g.to(dtype)).requires_grad_()
    ye = torch.softmax(xe / tau, -1)
    (dxe,) = torch.autograd.grad(ye, xe, dy)
    for keep, (y, _, _, _, dx) in outs.items():
        assert_oracle_close(y, ye, y64, name=f"y keep={keep}")
        assert_oracle_close(dx, dxe, dx64, name=f"dx keep={keep}")


def test_keep_flag_only_where_it_changes_something():
    """KEEP is a compile-time flag: launches where it changes nothing (one block, given noise)
    pass KEEP=True whatever ``keep`` says, so they never compile a second variant."""
    assert K.keep_flag(True, False, False) and K.keep_flag(False, True, False)
    assert not K.keep_flag(False, False, False) and K.keep_flag(False, False, True)
    assert K.keep_flag(False, False, None) == K._KEEP
    assert K.keep_flag(False, False, False, hard=True)  # a hard forward: no second pass over the logits



def test_launchers_pass_keep_only_to_second_passes(monkeypatch):
    """What the launchers hand the kernels as KEEP (recorded, nothing launched): ``keep`` on the
    loop path's soft forward and backward; True for a hard forward (no second pass over the
    logits), given noise and one block."""
    seen = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta["KEEP"])

    monkeypatch.setattr(K, "_gumbel_fwd_kernel", Record())
    monkeypatch.setattr(K, "_gumbel_bwd_kernel", Record())
    x, seed = torch.randn(2, 100), philox.draw_seed("cpu")
    m = s = torch.zeros(2)
    idx = torch.zeros(2, dtype=torch.int64)
    for keep in (False, True):
        for block_v in (32, 128):  # the loop path; one block
            seen.clear()
            K.gumbel_fwd(x, 1.0, False, None, seed, block_v=block_v, keep=keep)
            K.gumbel_fwd(x, 1.0, True, None, seed, block_v=block_v, keep=keep)
            K.gumbel_fwd(x, 1.0, False, x, None, block_v=block_v, keep=keep)  # given noise
            K.gumbel_bwd(x, x, m, s, 1.0, None, seed, idx=idx, block_v=block_v, keep=keep)
            loop = block_v < 100
            bwd = [keep, keep] if loop else [True]  # the loop's backward: PHASE 1 and 2
            assert seen == [keep or not loop, True, True] + bwd, (keep, block_v, seen)


@pytest.mark.parametrize("path", ["one_block", "loop", "loop_keep_off", "split"])
def test_sample_entry_of_peaked_rows_has_no_cancellation(device, path):
    """dlogits at the sample's entry k of a peaked row (y_k near 1): dy_k - sum(dy * y) is a small
    difference of numbers near dy_k, so eager's formula (and the kernels' before session 12) is
    off by about one ulp of dy_k / tau there, far more than the entry's size warrants. The kernels
    compute it as y_k (dy_k A - B) / tau from A = sum_{j != k} y_j, B = sum_{j != k} dy_j y_j; its
    error is bounded by a few ulps of the terms it sums, which this checks against float64 on the
    kernel's own t = x + g."""
    R, V, tau = 4, 320, 0.5  # 5 blocks of 64 on the loop paths
    x = torch.randn(R, V, device=device) * 0.5
    x[torch.arange(R), torch.tensor([3, 100, 250, 319])] = 6.0  # y_k ~ 1 - 1e-6 .. 1e-4
    dy = torch.randn(R, V, device=device)
    seed = philox.draw_seed(device)
    kw = {"one_block": {}, "loop": dict(block_v=64), "loop_keep_off": dict(block_v=64, keep=False),
          "split": dict(block_v=64, split=3)}[path]
    _, idx, m, s, g = K.gumbel_fwd(x, 1 / tau, False, None, seed, write_noise=True, **kw)
    dx = K.gumbel_bwd(dy, x, m, s, 1 / tau, None, seed, idx=idx, **kw)
    t64 = (x + g).double().requires_grad_()  # the kernel's t (rounded as it rounds it), in float64
    y64 = torch.softmax(t64 / tau, -1)
    (dx64,) = torch.autograd.grad(y64, t64, dy.double())
    rows = torch.arange(R, device=device)
    assert torch.equal(idx, t64.argmax(-1))
    y64 = y64.detach()
    off = y64.clone()
    off[rows, idx] = 0
    scale = y64[rows, idx] * (dy[rows, idx].abs().double() * off.sum(-1) + (dy.abs().double() * off).sum(-1)) / tau
    err = (dx[rows, idx].double() - dx64[rows, idx]).abs()
    assert (err <= 16 * torch.finfo(torch.float32).eps * scale).all(), (err / scale / torch.finfo(torch.float32).eps)
    # the rest of the row as before: within the float64 rule against eager fp32
    t32 = (x + g).requires_grad_()
    (dxe,) = torch.autograd.grad(torch.softmax(t32 / tau, -1), t32, dy)
    assert_oracle_close(dx, dxe, dx64, name="dlogits")


@pytest.mark.newest_only  # CI time: under triton 3.6 the loop tests run PHASE 1 / 2 too, and a split fuzz case
@pytest.mark.parametrize("dtype,hard,keep", [(torch.float32, False, True), (torch.bfloat16, False, True),
                                             (torch.float32, False, False), (torch.bfloat16, True, True)])
def test_split_rows_match_one_program_per_row(device, dtype, hard, keep):
    """Split rows (kernels/gumbel.py: split_plan, PHASE 1 / 2): chunks of a row in programs of their
    own, their partials combined by a second launch. The sample and the row max m are exactly one
    program's (max is exact; ties and NaN rows keep torch.argmax's first-column rule across chunks);
    s, y and dlogits differ only by summation order: each meets the float64 rule of the same noise.
    Rows: plain, a NaN in a later chunk, the first two chunks all -inf (masked logits)."""
    R, V, tau = 4, 330, 0.7  # 6 blocks of 64 (the last one partial): 2 and 6 chunks
    x = (torch.randn(R, V, device=device) * 3).to(dtype)
    x[1, 250] = float("nan")
    x[2, :140] = float("-inf")
    dy = torch.randn(R, V, device=device).to(dtype)
    seed = philox.draw_seed(device)
    kw = dict(block_v=64, keep=keep)
    y1, idx1, m1, s1, g = K.gumbel_fwd(x, 1 / tau, hard, None, seed, write_noise=True, **kw)
    # float64 oracle and eager in dtype, on the same noise (rows without the NaN)
    ok = torch.tensor([True, False, True, True], device=device)
    x64 = (x.double() + g.double())[ok].requires_grad_()
    y64 = torch.softmax(x64 / tau, -1)
    (dx64,) = torch.autograd.grad(y64, x64, dy[ok].double())
    xe = (x + g.to(dtype))[ok].requires_grad_()
    ye = torch.softmax(xe / tau, -1)
    (dxe,) = torch.autograd.grad(ye, xe, dy[ok])
    for split in (2, 6):
        assert K.split_plan(R, V, 64, False, x.device, split)[0] == split
        y, idx, m, s = K.gumbel_fwd(x, 1 / tau, hard, None, seed, split=split, **kw)
        dx = K.gumbel_bwd(dy, x, m, s, 1 / tau, None, seed, idx=idx, split=split, **kw)
        assert torch.equal(idx, idx1) and torch.equal(m[ok], m1[ok]), split
        assert int(idx[1]) == 250  # the first NaN, found in chunk 250 // chunk_v
        assert y[1].isnan().all() and dx[1].isnan().all()
        torch.testing.assert_close(s[ok], s1[ok], rtol=4 * torch.finfo(torch.float32).eps, atol=0)
        if hard:
            assert torch.equal(y[ok], y1[ok])  # the one-hot: exact
        else:
            assert_oracle_close(y[ok], ye, y64, name=f"y split={split}")
        assert_oracle_close(dx[ok], dxe, dx64, name=f"dx split={split}")
    # the index alone (gumbel_sample's launch)
    _, idx, m, _ = K.gumbel_fwd(x, 1.0, True, None, seed, block_v=64, store_y=False, split=3)
    assert torch.equal(idx, idx1) and torch.equal(m[ok], m1[ok])


def test_split_rows_keep_the_first_of_equal_maxima(device):
    """A tie between chunks goes to the lower column, as torch.argmax (given noise makes the tie)."""
    R, V = 2, 200
    x = torch.zeros(R, V, device=device)
    noise = torch.zeros(R, V, device=device)
    noise[0, [30, 90, 150]] = 5.0  # chunks 0, 1 and 2 of 64 columns each hold the max
    noise[1, [70, 190]] = 5.0  # chunks 1 and 2
    for split in (1, 2, 4):
        _, idx, m, _ = K.gumbel_fwd(x, 1.0, True, noise, None, block_v=32, split=split)
        assert idx.tolist() == [30, 70] and m.tolist() == [5.0, 5.0], split


def test_split_plan(monkeypatch):
    """How many chunks a launch cuts its rows into: forced (clipped to whole blocks) or, on CUDA,
    until ~_SPLIT_PROGRAMS_PER_SM programs per SM, chunks of at least _SPLIT_MIN_BLOCKS blocks."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(K, "num_sms", lambda device: 132)  # an H200; no GPU needed to plan
    monkeypatch.setattr(K, "_SPLIT_PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(K, "_SPLIT_MIN_BLOCKS", 2)
    assert K.split_plan(256, 128_000, 4096, False, cuda) == (3, 11 * 4096)  # 528 programs wanted: 3 chunks of 11 blocks
    assert K.split_plan(32, 32_000, 4096, False, cuda) == (4, 2 * 4096)  # 8 blocks: at most 4 chunks of 2
    assert K.split_plan(4096, 128_000, 4096, False, cuda) == (1, 128_000)  # the rows fill the GPU
    assert K.split_plan(8, 10_000, 16384, True, cuda) == (1, 10_000)  # one block a row
    assert K.split_plan(8, 128_000, 4096, False, cuda, auto=False) == (1, 128_000)  # given noise, fp64
    assert K.split_plan(8, 128_000, 4096, False, cpu) == (1, 128_000)  # the interpreter: forced only
    assert K.split_plan(2, 330, 64, False, cpu, 4) == (3, 128)  # 6 blocks: 2 a chunk -> 3 chunks
    assert K.split_plan(2, 330, 64, False, cpu, 100) == (6, 64)  # at most one chunk a block
    assert K.split_plan(2, 100_000, 16, False, cpu, 1000)[0] == K._MAX_SPLIT_N
    assert K.split_plan(2, 2**30 + 1, 4096, False, cpu, 4) == (1, 2**30 + 1)  # chunk ends stay within int32
    # the launchers let it split on its own only on the timed path: in-kernel noise, not fp64, aligned rows
    assert K._auto_split(False, torch.bfloat16, True) and K._auto_split(False, torch.float32, True)
    assert not K._auto_split(True, torch.float32, True) and not K._auto_split(False, torch.float64, True)
    assert not K._auto_split(False, torch.float32, False)
    monkeypatch.setattr(K, "_SPLIT_PROGRAMS_PER_SM", 0)  # the documented off switch
    assert K.split_plan(8, 128_000, 4096, False, cuda) == (1, 128_000)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="split must be an int"):
            K.split_plan(2, 330, 64, False, cpu, bad)


def test_split_launches_two_phases(monkeypatch):
    """A split launch is PHASE 1 then PHASE 2 on an (R, NSPLIT) grid, forward and backward; one
    program per row is one PHASE 0 launch in the forward and, on the loop path, PHASE 1 then 2 on
    (R, 1) in the backward (recorded, nothing launched)."""
    seen = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((grid, meta["PHASE"]))

    monkeypatch.setattr(K, "_gumbel_fwd_kernel", Record())
    monkeypatch.setattr(K, "_gumbel_bwd_kernel", Record())
    x, seed = torch.randn(3, 256), philox.draw_seed("cpu")  # 4 blocks of 64
    m = s = torch.zeros(3)
    idx = torch.zeros(3, dtype=torch.int64)
    whole = [((3, 1), 1), ((3, 1), 2)]
    for split, fwd, bwd in ((None, [((3, 1), 0)], whole), (1, [((3, 1), 0)], whole),
                            (4, [((3, 4), 1), ((3, 4), 2)], [((3, 4), 1), ((3, 4), 2)])):
        seen.clear()
        K.gumbel_fwd(x, 1.0, False, None, seed, block_v=64, split=split)
        K.gumbel_bwd(x, x, m, s, 1.0, None, seed, idx=idx, block_v=64, split=split)
        assert seen == fwd + bwd, (split, seen)
    seen.clear()
    K.gumbel_bwd(x, x, m, s, 1.0, None, seed, idx=idx)  # one block a row: PHASE 0
    assert seen == [((1, 1), 0)], seen  # 3 rows packed in one program (4 x 256)


# ------------------------------------------------------------------------------------------------
# GPU only: no host sync, offsets past 2**31


@pytest.mark.gpu
@pytest.mark.parametrize("V,hard", [(3000, True), (20_000, False), (20_000, True)])  # one block; the loop
def test_no_host_sync_cuda(V, hard):
    logits = torch.randn(8, V, device="cuda", requires_grad=True)
    fused_s2s.gumbel_softmax(logits, 0.5, hard).sum().backward()  # warm up (compile)
    fused_s2s.gumbel_sample(logits)
    with no_host_sync():
        y, idx = fused_s2s.gumbel_softmax(logits, 0.5, hard, return_index=True)
        y.sum().backward()
        fused_s2s.gumbel_sample(logits)


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_2_31_cuda():
    V = 65_536
    R = 2**31 // V + 3  # the last rows' elements lie past 2**31 (row * stride overflows int32)
    row = torch.randn(1, V, device="cuda", dtype=torch.bfloat16)
    x = row.expand(R, V)  # stride-0 rows: only the output is R x V
    torch.manual_seed(9)
    y, idx = fused_s2s.gumbel_softmax(x, 1.0, True, return_index=True)
    seed = _mirror_seed(9, torch.device("cuda"))
    for r in (0, R - 1):
        t = row[0].float() + philox.gumbel_at(seed, torch.tensor(r, device="cuda"), torch.arange(V, device="cuda"))
        assert int(idx[r]) == int(t.argmax())
    del y
    # the soft loop path keeps q in y and the block maxima per row: its last rows too
    torch.manual_seed(9)
    y = fused_s2s.gumbel_softmax(x, 1.0, False)
    for r in (0, R - 1):
        t = row[0].float() + philox.gumbel_at(seed, torch.tensor(r, device="cuda"), torch.arange(V, device="cuda"))
        torch.testing.assert_close(y[r], torch.softmax(t, -1).to(y.dtype))
    del y


def test_inv_tau_split_for_fp64_kernels():
    """Triton passes a float argument as fp32; fp64 kernels rebuild 1/tau as hi + lo (~48 bits)."""
    import struct

    for tau in (0.3, 0.7, 1.0, 1e-3, 1e3, 3.0e-7):
        hi, lo = K.split_inv_tau(1.0 / tau)
        for v in (hi, lo):  # both exactly representable in fp32
            assert struct.unpack("f", struct.pack("f", v))[0] == v
        assert abs((hi + lo) - 1.0 / tau) <= 1e-14 / tau
        assert abs(hi - 1.0 / tau) > 0 or lo == 0  # hi alone is the fp32 rounding
    assert K.split_inv_tau(1e40) == (float("inf"), 0.0)


def test_fp64_kernels_meet_fp64_eager(device):
    logits = torch.randn(3, 300, dtype=torch.float64, device=device)
    noise = _torch_noise(logits)
    for hard in (False, True):
        y = _gs(logits, 0.3, hard, noise=noise)
        want = fused_s2s.reference.gumbel_softmax_eager(logits, 0.3, hard, noise)
        # 1/tau to ~48 bits: |z| * 2**-48 ~ 1e-13 here (|z| <= ~20); fp32(1/tau) alone gives ~1e-8
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# tau as a 0-d tensor, read by the kernels on the device (a CUDA graph replays it with new values)


@pytest.mark.parametrize("tau_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape,tau", [((4, 37), 0.7), ((2, 3, 300), 2.0), ((2, 17000), 0.5)])
def test_tau_tensor_gives_the_float_tau_bits(device, shape, tau, hard, dtype, tau_dtype):
    """The kernels invert the fp64 tau on the device and round to fp32 as the host rounds 1/tau: the
    same bits forward and backward as the float tau, for the same seed. An fp32 tensor holds
    fp32(tau), so its bits match only where tau is exact in fp32 (0.5, 2.0)."""
    if tau_dtype == torch.float32 and tau == 0.7:
        pytest.skip("fp32(0.7) is another temperature")
    logits = (torch.randn(shape, device=device) * 3).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    outs = []
    for t in (tau, torch.tensor(tau, dtype=tau_dtype, device=device)):
        x = logits.clone().requires_grad_()
        torch.manual_seed(11)
        y, idx = _gs(x, t, hard, return_index=True)
        y.backward(dy)
        outs.append((y.detach(), idx, x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_v", [None, 64])
def test_tau_tensor_launcher_loop_path_and_fp64(device, block_v):
    """The launchers' tau tensor on the loop path (forced small blocks), and in fp64, where the kernel
    divides in fp64 (closer than the hi + lo float pair: both within 1e-15 of the fp64 oracle)."""
    x = torch.randn(3, 300, dtype=torch.float64, device=device) * 3
    dy = torch.randn_like(x)
    g = _torch_noise(x)  # fp64 noise given: the oracle is exact up to the softmax's rounding
    tau = 0.37
    tau_t = torch.tensor(tau, dtype=torch.float64, device=device)
    y_t, i_t, m_t, s_t = K.gumbel_fwd(x, 123.0, False, g, block_v=block_v, tau=tau_t)  # inv_tau unused
    want, want_dx = _softmax_grads(x, g, dy, tau, torch.float64)
    torch.testing.assert_close(y_t, want, rtol=1e-13, atol=1e-15)
    assert torch.equal(i_t, (x + g).argmax(-1))
    dx_t = K.gumbel_bwd(dy, x, m_t, s_t, 123.0, g, idx=i_t, block_v=block_v, tau=tau_t)
    torch.testing.assert_close(dx_t, want_dx, rtol=1e-12, atol=1e-14)
    seed = philox.draw_seed(x.device)
    # fp32 logits on the loop path: the float tau's bits
    x32, dy32 = x.float(), dy.float()
    y_f, i_f, m, s = K.gumbel_fwd(x32, 1.0 / tau, False, None, seed, block_v=block_v)
    y_t, _, _, _ = K.gumbel_fwd(x32, 123.0, False, None, seed, block_v=block_v,
                                tau=torch.tensor(tau, dtype=torch.float64, device=device))
    assert torch.equal(y_t, y_f)
    assert torch.equal(K.gumbel_bwd(dy32, x32, m, s, 123.0, None, seed, idx=i_f, block_v=block_v, tau=tau_t),
                       K.gumbel_bwd(dy32, x32, m, s, 1.0 / tau, None, seed, idx=i_f, block_v=block_v))


def test_tau_tensor_changed_before_backward_is_an_error(device):
    """The backward reads tau again: a tau changed in place after the forward (the next step's value
    of a schedule) would give the gradient of another temperature, so autograd refuses it."""
    x = torch.randn(2, 37, device=device, requires_grad=True)
    tau = torch.tensor(0.5, dtype=torch.float64, device=device)
    y = _gs(x, tau, True)
    tau.fill_(0.25)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_tau_tensor_eager_backend_matches_float(device):
    x = torch.randn(3, 40, device=device)
    torch.manual_seed(4)
    a = _gs(x, 0.7, False, backend="eager")
    torch.manual_seed(4)
    b = _gs(x, torch.tensor(0.7, dtype=torch.float64, device=device), False, backend="eager")
    assert torch.equal(a, b)


def test_cpu_tau_tensor_with_device_inputs_is_a_number():
    """A CPU scalar tensor with inputs on a device is read as a Python number (no device sync), as
    torch ops take CPU scalars; on that device it would have to be a device tensor otherwise."""
    from fused_s2s._checks import check_ratio, check_tau

    meta = torch.device("meta")  # stands in for a GPU
    assert check_tau(torch.tensor(0.5, dtype=torch.float64), meta) == 0.5
    assert check_ratio("teacher_forcing_ratio", torch.tensor(0.25), meta) == 0.25
    with pytest.raises(ValueError, match=r"tau must be a number in \[2\*\*-126"):
        check_tau(torch.tensor(0.0), meta)  # its value still checked
    t = torch.tensor(0.5)
    assert check_tau(t, "cpu") is t  # with CPU inputs it stays the tensor (the kernels' pointer)
    with pytest.raises(ValueError, match="tau must be on cpu"):
        check_tau(torch.tensor(0.5, device="meta"), "cpu")


@pytest.mark.gpu
def test_tau_tensor_check_is_a_device_assert_and_skipped_under_capture_cuda():
    """On CUDA the tau tensor's value is checked without a sync (torch._assert_async, not run here:
    a failing device assert poisons the process's CUDA context); under capture not at all."""
    x = torch.randn(2, 37, device="cuda")
    tau = torch.tensor(0.5, dtype=torch.float64, device="cuda")
    with no_host_sync():
        _gs(x, tau, True)  # a valid tau: no sync, no error
    g = torch.cuda.CUDAGraph()
    _gs(x, tau, False)  # warm up (compile the soft kernel) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        y = _gs(x, tau, False)
    for t in (0.5, 2.0):
        tau.fill_(t)
        g.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.allclose(y.sum(-1), torch.ones(2, device="cuda"))


@pytest.mark.parametrize("case", [
    (torch.float32, 3, 300, 64, True, 0.7, "fp64", 3.0, False, None),  # the loop path, hard, tau tensor
    (torch.bfloat16, 2, 37, None, False, 2.0, "float", 1.0, True, None),  # one block, soft, given noise
    (torch.float16, 4, 16390, None, False, 0.5, "fp32", 0.1, False, None),  # just over one block, soft
    (torch.float32, 2, 700, 64, False, 1.3, "float", 3.0, False, 3),  # split rows, soft
])
def test_fuzz_gumbel_cases_pass(device, case):
    """tests/fuzz_gumbel.py's checks on fixed cases (the harness itself cannot rot unnoticed)."""
    from tests import fuzz_gumbel

    assert fuzz_gumbel.run_case(torch, device, *case, seed=5) is None


def test_fuzz_driver_counts_every_kind_of_failure(capsys, monkeypatch):
    """tests/_fuzz.py: a returned message, an AssertionError and any other exception each count as
    a failing case (printed with its description); passing cases do not; exit status 1."""
    from tests import _fuzz

    clock = [0.0]  # a fake clock: each case takes 1 "second", the run 5
    monkeypatch.setattr(_fuzz.time, "time", lambda: clock[0])

    def boom():
        raise RuntimeError("crash")

    def wrong():
        raise AssertionError("over the bound")

    def passes():
        return None

    checks = iter([passes, lambda: "bad value", wrong, boom, passes])

    def draw(rng, torch_, device):
        clock[0] += 1.0
        check = next(checks)
        return f"case {check.__name__}", check

    assert _fuzz.main("doc", ["--seconds", "4.5"], draw) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL ") == 3 and "bad value" in out and "over the bound" in out and "RuntimeError: crash" in out
    assert "5 cases, 3 failed" in out
    assert _fuzz.main("doc", ["--seconds", "0"], draw) == 0  # no case run: nothing failed


def test_plain_backward_runs_the_kernel_and_create_graph_the_eager_math(monkeypatch, device):
    """The eager recomputation serves only create_graph=True and a tau that requires grad: a
    training backward stays on the Triton kernel (a silent fallback would only cost speed)."""
    calls = []
    bwd = K.gumbel_bwd
    monkeypatch.setattr(K, "gumbel_bwd", lambda *a, **k: calls.append(1) or bwd(*a, **k))
    x = torch.randn(2, 9, device=device, requires_grad=True)
    for create_graph, tau, want in ((False, 0.5, 1), (True, 0.5, 0), (False, torch.tensor(0.5, device=device, requires_grad=True), 0)):
        calls.clear()
        y = _gs(x, tau, generator=torch.Generator(device).manual_seed(1))
        torch.autograd.grad(y.square().sum(), x, create_graph=create_graph)
        assert len(calls) == want, (create_graph, tau)
