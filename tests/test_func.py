"""torch.func transforms over the fused ops' Triton path: grad, vjp, jacrev, jacfwd, hessian, vmap.

Inside a transform the ops run setup_context-style autograd Functions (fused_s2s.attention.
_AttentionFuncFn, fused_s2s.gumbel._GumbelFuncFn and _GumbelSampleFuncFn): the Triton forward, vmap
folded into the batch (attention) or the rows (Gumbel, given noise), derivatives by torch.func of
the eager math. Before, the classic Functions raised functorch's "must override the setup_context
staticmethod", and vmap "Cannot access storage of BatchedTensorImpl" from inside the launcher.
Everything is compared with the eager backend, whose plain torch ops the transforms take natively.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fused_s2s
from fused_s2s import backend as _backend
from tests.conftest import DEVICE
from tests.helpers import assert_oracle_close

pytestmark = pytest.mark.kernels

F64 = dict(dtype=torch.float64, device=DEVICE)


def _gen(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


# --- attention_step ----------------------------------------------------------------------------------

def _attention_inputs(mask_form, with_values):
    """q (3, 8), H (3, 5, 8), V (3, 5, 6) or None; the mask with one row that attends to nothing."""
    g = _gen(0)
    q, H = torch.randn(3, 8, generator=g, **F64), torch.randn(3, 5, 8, generator=g, **F64)
    V = torch.randn(3, 5, 6, generator=g, **F64) if with_values else None
    mask = {"none": None,
            "lengths": torch.tensor([5, 2, 0], device=DEVICE),
            "bool": torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE).bool()}[mask_form]
    return q, H, V, mask


def _attention_loss(backend, mask, V):
    """A scalar of both outputs (the weights' gradient path too) as a function of (q, H)."""
    def loss(q, H):
        ctx, w = fused_s2s.attention_step(q, H, V, mask, backend=backend)
        return ctx.sin().sum() + (w * w * torch.arange(1.0, 6.0, **F64)).sum()
    return loss


_ATTENTION_TRANSFORMS = {
    "grad": lambda f, q, H: grad(f, argnums=(0, 1))(q, H),
    "vjp": lambda f, q, H: vjp(f, q, H)[1](torch.tensor(1.5, **F64)),
    "jacrev": lambda f, q, H: jacrev(f, argnums=(0, 1))(q, H),
    "jacfwd": lambda f, q, H: jacfwd(f, argnums=(0, 1))(q, H),
    "hessian": lambda f, q, H: hessian(f)(q, H),
    # per-sample gradients: 4 queries for the same memory, one gradient each
    "vmap_grad": lambda f, q, H: vmap(grad(f, argnums=(0, 1)), in_dims=(0, None))(
        torch.randn(4, *q.shape, generator=_gen(1), **F64), H),
    "grad_vmap": lambda f, q, H: grad(lambda q: vmap(f, in_dims=(0, None))(q, H).square().sum())(
        torch.randn(4, *q.shape, generator=_gen(1), **F64)),
    "vmap_keys": lambda f, q, H: vmap(f, in_dims=(None, 0))(q, torch.stack([H, 2 * H, -H])),
    # nested forward mode: the eager math (an autograd.Function's jvp gives the outer level a 0)
    "jacfwd_jacfwd": lambda f, q, H: jacfwd(jacfwd(f))(q, H),
    "jvp_jvp": lambda f, q, H: jvp(lambda q: jvp(f, (q, H), (q.cos(), H))[1], (q,), (q.sin(),)),
}


@pytest.mark.parametrize("transform", list(_ATTENTION_TRANSFORMS))
@pytest.mark.parametrize("mask_form", ["none", "lengths", "bool"])
@pytest.mark.parametrize("with_values", [False, True])
def test_attention_under_func_transforms_equals_the_eager_backend(transform, mask_form, with_values):
    q, H, V, mask = _attention_inputs(mask_form, with_values)
    run = _ATTENTION_TRANSFORMS[transform]
    got = run(_attention_loss("triton", mask, V), q, H)
    want = run(_attention_loss("eager", mask, V), q, H)
    torch.testing.assert_close(got, want, msg=f"{transform} of attention_step, triton vs eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mapped", ["query_and_keys", "query"])
def test_attention_vmap_is_one_folded_launch_with_the_triton_backward(dtype, mapped, monkeypatch):
    """vmap folds the mapped dim into B (into T when only the query is mapped: the memory is not
    copied): one forward launch for all elements, and outside other transforms the classic
    Function (its Triton backward, one launch) records the graph."""
    mod = _backend.kernels("attention")
    calls = {"fwd": [], "bwd": 0}
    fwd, bwd = mod.attention_forward, mod.attention_backward

    def count_fwd(query, keys, *a, **k):
        calls["fwd"].append((tuple(query.shape), keys.data_ptr()))
        return fwd(query, keys, *a, **k)

    def count_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(mod, "attention_forward", count_fwd)
    monkeypatch.setattr(mod, "attention_backward", count_bwd)
    g = _gen(2)
    N, B, T, L, D = 3, 2, 4, 7, 12
    q64 = torch.randn(N, B, T, D, generator=g, **F64)
    H64 = torch.randn(N, B, L, D, generator=g, **F64)
    lengths = torch.tensor([7, 3], device=DEVICE)  # unmapped: the same lengths for every element
    dctx = torch.randn(N, B, T, D, generator=g, **F64)

    if mapped == "query":
        H64 = H64[0]  # (B, L, D), one memory for the N queries

    def run(backend, dt):
        q, H = (t.to(dt).requires_grad_() for t in (q64, H64))
        ctx, w = vmap(lambda q, H: fused_s2s.attention_step(q, H, mask=lengths, backend=backend),
                      in_dims=(0, 0 if mapped != "query" else None))(q, H)
        (ctx * dctx.to(dt)).sum().backward()
        return ctx, w, q.grad, H.grad, H

    *got, H = run("triton", dtype)
    if mapped == "query":
        assert calls == {"fwd": [((B, N * T, D), H.data_ptr())], "bwd": 1}
    else:
        assert [shape for shape, _ in calls["fwd"]] == [(N * B, T, D)] and calls["bwd"] == 1
    eager, oracle = run("eager", dtype)[:4], run("eager", torch.float64)[:4]
    for name, a, e, o in zip(("ctx", "weights", "dq", "dH"), got, eager, oracle):
        assert a.dtype == dtype
        assert_oracle_close(a, e, o, name=f"vmap {name}")


def test_outside_transforms_the_classic_functions_record_the_graph():
    """The hot path is unchanged: the setup_context Functions only inside a transform."""
    q, H, _, _ = _attention_inputs("none", False)
    ctx, _ = fused_s2s.attention_step(q.requires_grad_(), H, backend="triton")
    assert type(ctx.grad_fn).__name__ == "_AttentionFnBackward"
    y = fused_s2s.gumbel_softmax(q, 0.5, backend="triton")
    assert type(y.grad_fn).__name__ == "_GumbelSoftmaxFnBackward"


def test_one_forward_level_takes_the_function_nested_ones_the_eager_math(monkeypatch):
    """jvp / jacfwd: the Triton forward and _attention_jvp; jvp inside jvp (jacfwd(jacfwd)): the
    eager math, since through an autograd.Function's jvp the outer level sees 0 (pytorch#197867)."""
    import fused_s2s.attention as A

    seen, jvp_of = [], A._attention_jvp
    monkeypatch.setattr(A, "_attention_jvp", lambda *a: seen.append(1) or jvp_of(*a))
    q, H, _, _ = _attention_inputs("none", False)

    def f(q):
        return fused_s2s.attention_step(q, H, backend="triton")[0]

    jvp(f, (q,), (q.cos(),))
    assert seen == [1]
    seen.clear()
    jvp(lambda q: jvp(f, (q,), (q.cos(),))[1], (q,), (q.sin(),))
    assert seen == []


@pytest.mark.parametrize("with_values", [False, True])
def test_forward_ad_dual_tensors_carry_their_tangents(with_values):
    """torch.autograd.forward_ad outside torch.func: the classic path records no graph for a dual
    input (it requires no grad) and returned no tangent; the ops now take it as torch.func's jvp."""
    import torch.autograd.forward_ad as fwAD

    q, H, V, mask = _attention_inputs("lengths", with_values)
    x, noise, _ = _gumbel_inputs()
    g = _gen(5)
    dq, dH, dx = (torch.randn(t.shape, generator=g, **F64) for t in (q, H, x))
    tau, dtau = torch.tensor(0.6, **F64), torch.tensor(0.25, **F64)
    tangents = {}
    for backend in ("triton", "eager"):
        with fwAD.dual_level():
            ctx, w = fused_s2s.attention_step(fwAD.make_dual(q, dq), fwAD.make_dual(H, dH), V, mask, backend=backend)
            y = fused_s2s.gumbel_softmax(fwAD.make_dual(x, dx), fwAD.make_dual(tau, dtau), True, noise=noise,
                                         backend=backend)
            tangents[backend] = [fwAD.unpack_dual(t).tangent for t in (ctx, w, y)]
    for name, a, b in zip(("ctx", "weights", "y"), tangents["triton"], tangents["eager"]):
        assert a is not None, f"{name}: the tangent was dropped"
        torch.testing.assert_close(a, b, msg=f"forward-AD tangent of {name}")


# --- gumbel_softmax / gumbel_sample ------------------------------------------------------------------

def _gumbel_inputs():
    g = _gen(3)
    x = torch.randn(3, 7, generator=g, **F64)
    noise = -torch.empty(3, 7, **F64).exponential_(generator=g).log()
    w = torch.randn(3, 7, generator=g, **F64)
    return x, noise, w


def _gumbel_loss(backend, hard, w):
    def loss(x, noise):
        return (fused_s2s.gumbel_softmax(x, 0.7, hard, noise=noise, backend=backend) * w).sum()
    return loss


_GUMBEL_TRANSFORMS = {
    "grad": lambda f, x, n: grad(f, argnums=(0, 1))(x, n),
    "jacrev": lambda f, x, n: jacrev(f, argnums=(0, 1))(x, n),
    "jacfwd": lambda f, x, n: jacfwd(f, argnums=(0, 1))(x, n),
    "hessian": lambda f, x, n: hessian(f)(x, n),
    "vmap_grad": lambda f, x, n: vmap(grad(f), in_dims=(0, None))(torch.randn(4, *x.shape, generator=_gen(4), **F64), n),
    "vmap_noise": lambda f, x, n: vmap(f, in_dims=(None, 0))(x, torch.stack([n, 2 * n, n - 1])),
    "jacfwd_jacfwd": lambda f, x, n: jacfwd(jacfwd(f))(x, n),
    "jvp_jvp": lambda f, x, n: jvp(lambda x: jvp(f, (x, n), (x.cos(), n.sin()))[1], (x,), (x.sin(),)),
}


@pytest.mark.parametrize("transform", list(_GUMBEL_TRANSFORMS))
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_with_given_noise_under_func_transforms_equals_the_eager_backend(transform, hard):
    x, noise, w = _gumbel_inputs()
    run = _GUMBEL_TRANSFORMS[transform]
    got = run(_gumbel_loss("triton", hard, w), x, noise)
    want = run(_gumbel_loss("eager", hard, w), x, noise)
    torch.testing.assert_close(got, want, msg=f"{transform} of gumbel_softmax(hard={hard}), triton vs eager")


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_in_kernel_noise_and_learned_tau_under_func_transforms(hard):
    """The seed's noise (drawn again by fused_s2s.philox for the derivatives), and a tau tensor's
    derivative, reverse and forward mode."""
    x, _, w = _gumbel_inputs()
    tau = torch.tensor(0.6, **F64)

    def loss(backend):
        def f(x, tau):
            torch.manual_seed(11)
            return (fused_s2s.gumbel_softmax(x, tau, hard, backend=backend) * w).sum()
        return f

    # jacfwd vmaps its tangents: "same", one draw for all of them
    for run in (lambda f: grad(f, argnums=(0, 1))(x, tau),
                lambda f: jacfwd(f, argnums=(0, 1), randomness="same")(x, tau)):
        torch.testing.assert_close(run(loss("triton")), run(loss("eager")))


def test_gumbel_vmap_with_given_noise_is_one_folded_launch(monkeypatch):
    mod = _backend.kernels("gumbel")
    rows, fwd = [], mod.gumbel_fwd

    def count(x, *a, **k):
        rows.append(tuple(x.shape))
        return fwd(x, *a, **k)

    monkeypatch.setattr(mod, "gumbel_fwd", count)
    x, noise, _ = _gumbel_inputs()
    xs = torch.stack([x, x + 1, -x, 2 * x])  # (4, 3, 7)
    y, idx = vmap(lambda x: fused_s2s.gumbel_softmax(x, 0.5, True, noise=noise, return_index=True,
                                                     backend="triton"))(xs)
    assert rows == [(12, 7)]
    y_e, idx_e = vmap(lambda x: fused_s2s.gumbel_softmax(x, 0.5, True, noise=noise, return_index=True,
                                                         backend="eager"))(xs)
    assert torch.equal(idx, idx_e) and torch.equal(y, y_e)


def test_gumbel_vmap_draws_follow_vmaps_randomness_like_the_eager_backend():
    """randomness="error" (the default) raises at the seed's draw; "same": every element draws
    the noise of the unmapped call; "different": one seed per element, the noise the eager backend
    draws for it (the same Philox stream: fused_s2s.philox)."""
    x, _, _ = _gumbel_inputs()
    xs = torch.stack([x, x.flip(1), -x, x])  # (4, 3, 7); elements 0 and 3 equal

    def soft(backend):
        return lambda x: fused_s2s.gumbel_softmax(x, 0.5, backend=backend)

    def sample(backend):
        return lambda x: fused_s2s.gumbel_sample(x, backend=backend)

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(soft("triton"))(xs)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(sample("triton"))(xs)

    torch.manual_seed(5)
    y_same = vmap(soft("triton"), randomness="same")(xs)
    torch.manual_seed(5)
    y_one = soft("triton")(xs[1])
    assert torch.equal(y_same[1], y_one)
    assert torch.equal(y_same[0], y_same[3])  # same input, same noise

    # the kernel's noise is fused_s2s.philox's to a few float32 ulps (test_gumbel.py), and y carries
    # that: |dy| <= 2 max|dg| / tau, with |dg| <= 4 eps32 |g| and |g| < 10 here
    noise_atol = 2 * 4 * torch.finfo(torch.float32).eps * 10 / 0.5
    for make, tol in ((soft, dict(rtol=0, atol=noise_atol)), (sample, dict(rtol=0, atol=0))):
        torch.manual_seed(6)
        got = vmap(make("triton"), randomness="different")(xs)
        torch.manual_seed(6)
        want = vmap(make("eager"), randomness="different")(xs)
        torch.testing.assert_close(got, want, **tol)
        assert not torch.equal(got[0], got[3])  # same input, its own noise


def test_gumbel_sample_takes_a_noise_with_a_tangent():
    """The index is not differentiable: a noise that carries a tangent (jvp, jacfwd) is read
    detached, as by the eager backend, not a missing-jvp error."""
    x, noise, _ = _gumbel_inputs()
    for backend in ("triton", "eager"):
        idx, didx = jvp(lambda n: fused_s2s.gumbel_sample(x, noise=n, backend=backend), (noise,), (noise.cos(),))
        assert torch.equal(idx, (x + noise).argmax(-1))


def test_gumbel_vmap_over_tau_is_a_clear_error():
    """One tau for every mapped element: the kernels take one. A mapped tau is refused at its check
    (vmap cannot read its values to range-check them: before, vmap's "data-dependent control flow"
    error), and by the Triton path's vmap rule should one reach it unchecked."""
    x, noise, _ = _gumbel_inputs()
    taus = torch.tensor([0.5, 1.0], **F64)
    for backend in ("triton", "eager"):
        with pytest.raises(NotImplementedError, match="tau"):
            vmap(lambda t: fused_s2s.gumbel_softmax(x, t, noise=noise, backend=backend))(taus)
    from fused_s2s.gumbel import _gumbel_softmax

    with pytest.raises(NotImplementedError, match="tau"):
        vmap(lambda t: _gumbel_softmax(x, t, False, -1, noise, None, False, "triton"))(taus)
    # an unmapped tau tensor under vmap is checked and taken
    y = vmap(lambda x: fused_s2s.gumbel_softmax(x, taus[0], noise=noise, backend="triton"))(x[None])
    torch.testing.assert_close(y[0], fused_s2s.gumbel_softmax(x, 0.5, noise=noise, backend="eager"))
