"""Gumbel-softmax with the noise drawn inside the kernel (SPEC sections 2-3, issue 5).

    y = softmax((logits + g) / tau),  g = -log(-log u),  u ~ Uniform(0, 1)
    hard=True: y = one_hot(argmax(logits + g)) forward, gradient of the soft y backward.

The noise is Philox-4x32-10 keyed by a per-call seed drawn from torch's RNG and by each element's
logical (row, col) in the logits moved to dim -1 and flattened to (rows, V) (one Philox call per
four columns: counter (col // 4, row, 0), word col % 4; see ``fused_s2s.philox``); the eager
mirror is ``fused_s2s.philox.gumbel_noise(seed, (rows, V))``, so both backends (and the reference
model) draw the same noise for the same seed. The Triton path never writes the noise: the backward
kernel draws it again and rebuilds the soft y from the saved per-row max and sum (O(rows) state).
"""
from __future__ import annotations

from typing import Optional

import torch

from fused_s2s import backend as _backend
from fused_s2s import philox
from fused_s2s._checks import check_float, check_generator, check_tau
from fused_s2s.reference import gumbel_argmax_eager, gumbel_softmax_eager


def _noise_of(x, noise, seed):
    """The Gumbel noise (R, V) of a call on x (R, V): the given one, or the seed's, drawn again in
    torch by fused_s2s.philox (what the kernels draw): for the eager paths and the derivatives."""
    return noise if noise is not None else philox.gumbel_noise(seed, x.shape, x.device)


class _GumbelSoftmaxFn(torch.autograd.Function):
    """Triton forward/backward on x (R, V). noise (R, V) or None (then seed, a 0-d int64 tensor);
    tau a float, or a 0-d float64 tensor the kernels read on the device. Returns y, and the sampled
    index only when ``with_index``: a second, non-differentiable output costs the autograd
    Function ~4 us of host time per call (benchmarks/host_overhead.py's stubs, this project's CPU)."""

    @staticmethod
    def forward(ctx, x, noise, seed, tau, hard: bool, with_index: bool):
        inv_tau, tau_t = _tau_args(tau)
        y, idx, m, s = _backend.kernels("gumbel").gumbel_fwd(x, inv_tau, hard, noise, seed, tau=tau_t)
        # tau_t saved as a tensor: changing it in place before the backward is an autograd error;
        # so is changing the returned index in place (the backward reads it, as torch.max's indices)
        # tau itself too when it is a tensor (its gradient, a learned temperature: see backward)
        tau_in = tau if isinstance(tau, torch.Tensor) else None
        ctx.save_for_backward(x, noise, seed, m, s, tau_t, idx, tau_in)  # (R, V), (R, V) | None, () | None, (R,), (R,), () | None, (R,), () | None
        ctx.inv_tau, ctx.tau = inv_tau, (None if tau_in is not None else tau)
        if not with_index:
            return y
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    @_backend.not_traced  # run by the autograd engine, also inside a compiled caller
    def backward(ctx, dy, _didx=None):
        x, noise, seed, m, s, tau_t, idx, tau_in = ctx.saved_tensors
        # create_graph=True (a gradient that is itself differentiable) or a tau tensor that
        # requires grad (a learned temperature): the eager math, as F.gumbel_softmax gives both
        if torch.is_grad_enabled() or ctx.needs_input_grad[3]:
            tau = ctx.tau if tau_in is None else tau_in
            dx, dtau = _eager_vjp(x, noise, seed, tau, dy, create_graph=torch.is_grad_enabled())
            return dx, _dnoise(ctx, dx), None, dtau, None, None
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        # straight-through: hard and soft share the soft y's gradient
        dx = _backend.kernels("gumbel").gumbel_bwd(dy, x, m, s, ctx.inv_tau, noise, seed, idx=idx, tau=tau_t)
        return dx, _dnoise(ctx, dx), None, None, None, None


class _GumbelFuncFn(torch.autograd.Function):
    """The Triton path inside torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap, ...), in
    the setup_context form that functorch requires and _GumbelSoftmaxFn (which keeps the Triton
    backward, outside transforms) lacks. As _AttentionFuncFn in fused_s2s.attention:

    - forward: the Triton forward, -> y, index (R,) (non-differentiable);
    - vmap: the mapped dimension folded into the rows (_vmap_rows), then the fused path again;
    - backward: torch.func.vjp of the eager soft y (straight-through: the hard y's derivative is
      the soft one's) with the same noise, against x, a given noise and a tau tensor; jvp: its
      formula in torch ops.
    """

    @staticmethod
    def forward(x, noise, seed, tau, hard: bool):
        inv_tau, tau_t = _tau_args(tau)
        y, idx, _, _ = _backend.kernels("gumbel").gumbel_fwd(x, inv_tau, hard, noise, seed, tau=tau_t)
        return y, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, noise, seed, tau, _ = inputs
        tau_in = tau if isinstance(tau, torch.Tensor) else None
        ctx.save_for_backward(x, noise, seed, tau_in)
        ctx.save_for_forward(x, noise, seed, tau_in)
        ctx.tau = None if tau_in is not None else tau
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _didx):
        fn, primals = _soft_fn(ctx)
        grads = iter(torch.func.vjp(fn, *primals)[1](dy))
        x, noise, _, tau_in = ctx.saved_tensors
        return (next(grads), None if noise is None else next(grads), None,
                None if tau_in is None else next(grads), None)

    @staticmethod
    def jvp(ctx, dx, dnoise, _dseed, dtau, _dhard):
        """y = softmax(z), z = (x + g) / tau: dy = y (dz - sum_j y_j dz_j) with
        dz = (dx + dg) / tau - z dtau / tau (the hard y's tangent is the soft one's: straight-through).
        In fp32 (fp64 for fp64) with the forward's noise; plain torch ops, as _attention_jvp's."""
        x, noise, seed, tau_in = ctx.saved_tensors
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = _noise_of(x, noise, seed).to(acc)  # (R, V)
        tau = ctx.tau if tau_in is None else tau_in.to(acc)
        t = x.to(acc) + g
        t = t - t.amax(-1, keepdim=True)  # a constant per row: y and dy do not change, as the forward's
        y = torch.softmax(t / tau, dim=-1)  # (R, V) soft
        dz = torch.zeros_like(t)
        for d in (dx, dnoise):
            if d is not None:
                dz = dz + d.to(acc) / tau
        if dtau is not None:
            dz = dz - t * dtau.to(acc) / tau ** 2
        dy = y * (dz - (y * dz).sum(-1, keepdim=True))
        return dy.to(x.dtype), None

    @staticmethod
    def vmap(info, in_dims, x, noise, seed, tau, hard: bool):
        if in_dims[3] is not None:
            raise NotImplementedError("gumbel_softmax under torch.func.vmap: tau must be the same for every "
                                      "mapped element (a float or an unmapped 0-d tensor), got a mapped tau")
        y, idx = _vmap_rows(info, in_dims, x, noise, seed,
                            lambda x, n, s: _gumbel_fused(x, n, s, tau, hard, True))
        return (y, idx), (0, 0)


def _soft_fn(ctx):
    """(fn, primals) for _GumbelFuncFn's backward: fn(x, [noise,] [tau]) -> the eager soft y with
    the forward's noise (the given one, or the seed's, drawn again by fused_s2s.philox)."""
    x, noise, seed, tau_in = ctx.saved_tensors
    g = _noise_of(x, noise, seed)  # (R, V)
    primals = (x,) + ((noise,) if noise is not None else ()) + ((tau_in,) if tau_in is not None else ())

    def fn(x, *rest):
        rest = iter(rest)
        n = next(rest) if noise is not None else g
        tau = next(rest) if tau_in is not None else ctx.tau
        return gumbel_softmax_eager(x, tau, False, n)  # (R, V)
    return fn, primals


class _GumbelSampleFuncFn(torch.autograd.Function):
    """gumbel_sample's Triton path inside torch.func transforms: its vmap rule (_vmap_rows); the
    index is not differentiable."""

    @staticmethod
    def forward(x, noise, seed):
        return _gumbel_index_run(x, noise, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, _didx):
        return None, None, None

    @staticmethod
    def vmap(info, in_dims, x, noise, seed):
        idx, = _vmap_rows(info, in_dims, x, noise, seed, lambda x, n, s: (_gumbel_index_fused(x, n, s),))
        return idx, 0


def _vmap_rows(info, in_dims, x, noise, seed, run):
    """The Gumbel ops' vmap rule: run(x, noise, seed) on x (R, V) mapped over N elements -> its
    outputs, each (N, R, ...). With noise given (or mapped), the elements' rows are folded into one
    call of N * R rows: one launch. With the noise drawn from a seed, one call per element, each
    the unmapped call with that element's seed: under vmap(randomness="different") the seed's draw
    (torch.randint) is mapped, one seed per element; under "same" it is one seed for all; under the
    default "error" that draw raises, as any random op does. So the two backends draw the same
    noise under vmap too (fused_s2s.philox)."""
    N = info.batch_size

    def mapped(t, d):  # (N, R, V): the mapped dim first, an unmapped tensor expanded (a view)
        return t.movedim(d, 0) if d is not None else t.expand(N, *t.shape)

    x = mapped(x, in_dims[0])
    if seed is not None:
        seeds = [seed] * N if in_dims[2] is None else seed.movedim(in_dims[2], 0).unbind()
        outs = [run(x[i], None, s) for i, s in enumerate(seeds)]
        return tuple(torch.stack(o) for o in zip(*outs))
    outs = run(x.flatten(0, 1), mapped(noise, in_dims[1]).flatten(0, 1), None)
    return tuple(o.unflatten(0, (N, -1)) for o in outs)


def _dnoise(ctx, dx):
    """A given noise tensor's gradient: t = x + g, so d/dg = d/dx (as the eager backend gives it)."""
    return dx if ctx.needs_input_grad[1] else None


def _eager_vjp(x, noise, seed, tau, dy, create_graph: bool):
    """(dx, dtau or None) for dy through the eager soft y with the same noise (straight-through:
    the hard y's gradient is the soft one's); dtau when tau is a tensor that requires grad.

    What the backward returns where the Triton kernel cannot serve: under create_graph=True (its
    dx records no graph, so a second differentiation would silently count it as a constant), and
    for a learned tau (it takes no tau gradient, which F.gumbel_softmax gives). Recorded for a
    higher-order gradient when ``create_graph``."""
    g = _noise_of(x, noise, seed)  # (R, V)
    learn_tau = isinstance(tau, torch.Tensor) and tau.requires_grad
    # differentiate against fresh tensors: partial derivatives. Against x and tau themselves,
    # autograd.grad would give total ones, which also run back through x's history to tau (a
    # learned tau in earlier decoder steps). Under create_graph, aliases keep x's and tau's graphs.
    def fresh(t):
        return t.view_as(t) if create_graph and t.requires_grad else t.detach().requires_grad_()

    x = fresh(x)
    tau = fresh(tau) if learn_tau else tau
    wrt = (x, tau) if learn_tau else (x,)
    with torch.enable_grad():
        y = gumbel_softmax_eager(x, tau, False, g)  # (R, V) soft
        grads = torch.autograd.grad(y, wrt, dy, create_graph=create_graph)
    return grads[0], (grads[1] if learn_tau else None)


def _tau_args(tau):
    """-> (1/tau as a float, None) for a float tau; (1.0 unused, tau as 0-d float64) for a tensor."""
    if isinstance(tau, torch.Tensor):
        return 1.0, tau.detach().to(torch.float64)  # the kernels read fp64 tau (a no-op for fp64)
    return 1.0 / tau, None


def _eager(x, noise, seed, tau: float, hard: bool):
    """The eager backend on x (R, V): the reference's Gumbel-softmax with the kernels' Philox noise."""
    g = _noise_of(x, noise, seed)  # (R, V)
    return gumbel_softmax_eager(x, tau, hard, g, return_index=True)


def _check_dim(dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for logits with {ndim} dimensions, got {dim}")
    return dim % ndim


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, *,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   return_index: bool = False, backend: str = "auto"):
    """Fused ``torch.nn.functional.gumbel_softmax``.

    Args:
        logits: (..., V, ...) float16 / bfloat16 / float32 / float64 unnormalised log-probabilities.
        tau: temperature, a Python float in [2**-126, 2**126]; or a 0-d float tensor on the logits' device,
            read by the kernels on the device, so that a CUDA graph replays one capture with
            an annealed tau. Its value is checked on the device without a host sync (on CUDA a
            device-side assert; none while a graph is captured). A tau tensor that requires grad (a
            learned temperature) gets its gradient, as from F.gumbel_softmax: the backward then runs
            the eager math instead of the Triton kernel.
        hard: one-hot of the sample forward, gradient of the soft sample backward (straight-through).
        dim: the category dimension.
        noise: explicit Gumbel noise of logits' shape, any float dtype, used in logits' dtype (as
            F.gumbel_softmax's own noise is); then nothing is drawn from torch's RNG.
        generator: torch.Generator on the logits' device that seeds the in-kernel noise (unused,
            and not advanced, when ``noise`` is given).
        return_index: also return the sampled index, int64 of logits' shape without ``dim``. The
            Triton backward reads it (as torch.max's backward reads its indices), so changing it
            in place before the backward is autograd's in-place error.
        backend: "auto" (Triton on CUDA, eager on CPU), "triton" or "eager".
    Returns:
        y of logits' shape and dtype, or (y, index) when ``return_index``.

    Both backends compose with torch.func (grad, vjp, jacrev, jacfwd, hessian, vmap) and forward
    AD; under vmap the noise follows its ``randomness`` ("same", "different"; the default "error"
    raises), tau must be one for all mapped elements (docs/model.md, "Under torch.func").
    """
    tau = check_tau(tau, getattr(logits, "device", None))
    return _gumbel_softmax(logits, tau, hard, dim, noise, generator, return_index, backend)


def _gumbel_softmax(logits, tau, hard, dim, noise, generator, return_index, backend):
    """gumbel_softmax with tau already checked (check_tau): the fused decoder checks it once per
    pass, not at every step (for a tau tensor the check is a device assert, three small launches)."""
    x, n, seed, impl, dim, last, flat = _prepare(logits, dim, noise, generator, backend)  # x (R, V)
    if impl == "triton":
        y, idx = _gumbel_fused(x, n, seed, tau, bool(hard), bool(return_index))
    else:
        y, idx = _eager(x, n, seed, tau, bool(hard))
    if not flat:  # back to logits' layout (views; each costs microseconds, so only when needed)
        lead = logits.shape[:dim] + logits.shape[dim + 1:]
        y = y.reshape(*lead, x.shape[1])
        if not last:
            y = y.movedim(-1, dim)
        if return_index:
            idx = idx.reshape(lead)
    if return_index:
        return y, idx
    return y


def gumbel_sample(logits: torch.Tensor, dim: int = -1, *, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """Categorical samples from softmax(logits) over ``dim`` by the Gumbel-max trick: argmax(logits + g).

    The index ``gumbel_softmax(logits, tau, hard=True, return_index=True)`` returns, for any tau,
    drawing the same seed from torch's RNG (so the same noise) without forming y: one read of the
    logits and no (..., V) write. Not differentiable (an integer result). Ties pick the first
    column and a NaN logit wins, as torch.argmax. Arguments as ``gumbel_softmax``; temperature or
    top-k / top-p filtering are the caller's to apply to the logits first.

    Returns: int64 indices of logits' shape without ``dim``.
    """
    x, n, seed, impl, dim, _, flat = _prepare(logits, dim, noise, generator, backend)  # x (R, V)
    if impl == "triton":
        idx = _gumbel_index_fused(x.detach(), None if n is None else n.detach(), seed)  # (R,)
    else:
        g = _noise_of(x, n, seed)  # (R, V)
        idx = gumbel_argmax_eager(x.detach(), g)  # (R,)
    if not flat:
        idx = idx.reshape(logits.shape[:dim] + logits.shape[dim + 1:])
    return idx


# The Triton paths: under torch.compile / torch.export the custom ops below (nodes of the graph),
# else run as they are (with FUSED_S2S_COMPILE_OPS=0 also under torch.compile, between its graphs:
# fused_s2s.backend.not_traced). The seed is drawn before, in _prepare, so a compiled caller draws
# it as its other random ops (Inductor's RNG unless torch._inductor.config.fallback_random).
def _gumbel_fused(x, n, seed, tau, hard: bool, return_index: bool):
    """-> y (R, V), index (R,) or None: the Triton kernels on x (R, V)."""
    # a learned tau or noise that requires grad: the autograd Function's eager gradients (a graph break)
    if _backend.compiling() and not (isinstance(tau, torch.Tensor) and tau.requires_grad) \
            and not (n is not None and n.requires_grad):
        inv_tau, tau_t = _tau_args(tau)
        y, idx, _, _ = torch.ops.fused_s2s.gumbel_softmax_fwd(x, n, seed, inv_tau, tau_t, hard)
        return y, (idx if return_index else None)
    if _backend.transforming():  # torch.func: the setup_context-style Function it requires
        # where a Function's jvp gives a silent 0 (nested forward AD): the eager math, same noise
        y, idx = _eager(x, n, seed, tau, hard) if _backend.nested_forward_ad() else \
            _GumbelFuncFn.apply(x, n, seed, tau, hard)
        return y, (idx if return_index else None)
    return _gumbel_run(x, n, seed, tau, hard, return_index)


@_backend.not_traced
def _gumbel_run(x, n, seed, tau, hard: bool, return_index: bool):
    """_gumbel_fused run as it is: through the autograd Function when a graph is recorded."""
    # a graph to record: for the logits, a given noise or a tau tensor (short-circuit: per step)
    if torch.is_grad_enabled() and (x.requires_grad or (n is not None and n.requires_grad)
                                    or (isinstance(tau, torch.Tensor) and tau.requires_grad)):
        out = _GumbelSoftmaxFn.apply(x, n, seed, tau, hard, return_index)
        return out if return_index else (out, None)
    # no graph to record (generation, no_grad): skip the autograd.Function's host cost
    inv_tau, tau_t = _tau_args(tau)
    y, idx, _, _ = _backend.kernels("gumbel").gumbel_fwd(x, inv_tau, hard, n, seed, tau=tau_t)
    return y, idx


def _gumbel_index_fused(x, n, seed):
    """-> the Gumbel-max index (R,) of x (R, V), one read of x and no y written."""
    if _backend.compiling():
        return torch.ops.fused_s2s.gumbel_sample(x, n, seed)
    if _backend.transforming():  # torch.func.vmap: its rule, _vmap_rows
        return _GumbelSampleFuncFn.apply(x, n, seed)
    return _gumbel_index_run(x, n, seed)


@_backend.not_traced
def _gumbel_index_run(x, n, seed):
    return _backend.kernels("gumbel").gumbel_fwd(x, 1.0, True, n, seed, store_y=False)[1]


def _prepare(logits, dim, noise, generator, backend):
    """The shared checks and layout of gumbel_softmax / gumbel_sample (before any kernel runs):
    -> x (R, V) (dim last, unit column stride), noise (R, V) in x's dtype or None, seed (0-d int64,
    drawn from torch's RNG when noise is None, else None), impl, dim (>= 0), last, flat."""
    backend = _backend.validate(backend)
    check_float("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension, got a 0-d tensor")
    dim = _check_dim(dim, logits.dim())
    V = logits.shape[dim]
    if V == 0:
        raise ValueError(f"logits must have at least one category along dim={dim}, got shape {tuple(logits.shape)}")
    if noise is not None:
        check_float("noise", noise, device=logits.device)
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
    check_generator(generator, logits.device, "the logits' device")
    impl = _backend.resolve(backend, logits.device)

    last, flat = dim == logits.dim() - 1, logits.dim() == 2 and dim == 1
    x = _rows(logits, dim, V, last, flat)  # (R, V)
    n = None
    if noise is not None:
        # in logits' dtype, as F.gumbel_softmax draws it; the kernels read it in that dtype
        n = _rows(noise, dim, V, last, flat).to(x.dtype)  # (R, V)
    seed = philox.draw_seed(logits.device, generator) if noise is None else None  # 0-d int64, on device
    return x, n, seed, impl, dim, last, flat


def _rows(t: torch.Tensor, dim: int, V: int, last: bool, flat: bool) -> torch.Tensor:
    """t with dim moved last and the rest flattened: (R, V), unit column stride (a view if it can be)."""
    if not last:
        t = t.movedim(dim, -1)
    if not flat:
        t = t.reshape(-1, V)
    return t if t.stride(-1) == 1 else t.contiguous()


# --- torch.compile and torch.export: the Triton path as torch.library custom ops ---------------------
# As fused_s2s.attention's: fused_s2s::gumbel_softmax_fwd / _bwd and fused_s2s::gumbel_sample are single
# nodes of a compiled graph (fullgraph=True, torch.export), with fake implementations for their
# shapes. x (R, V) with unit column stride, noise (R, V) in x's dtype or None, seed 0-d int64 or
# None, tau a float (as inv_tau) or a 0-d float64 tensor (tau). A learned tau and noise that
# requires grad stay with the autograd Function (_gumbel_fused), as does a second derivative.


@torch.library.custom_op("fused_s2s::gumbel_softmax_fwd", mutates_args=())
def _gumbel_fwd_op(x: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], inv_tau: float,
                   tau: Optional[torch.Tensor], hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y (R, V), index (R,), row max m (R,), row sum s (R,) (the backward's statistics)."""
    return _backend.kernels("gumbel").gumbel_fwd(x, inv_tau, hard, noise, seed, tau=tau)


@_gumbel_fwd_op.register_fake
def _(x, noise, seed, inv_tau, tau, hard):
    R = x.shape[0]
    m = x.new_empty(R, dtype=_backend.kernels("gumbel")._stats_dtype(x.dtype))
    return x.new_empty(x.shape), x.new_empty(R, dtype=torch.int64), m, torch.empty_like(m)


@torch.library.custom_op("fused_s2s::gumbel_softmax_bwd", mutates_args=())
def _gumbel_bwd_op(dy: torch.Tensor, x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, inv_tau: float,
                   noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], idx: torch.Tensor,
                   tau: Optional[torch.Tensor]) -> torch.Tensor:
    """-> dx (R, V): the soft y's gradient (also the hard y's: straight-through)."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return _backend.kernels("gumbel").gumbel_bwd(dy, x, m, s, inv_tau, noise, seed, idx=idx, tau=tau)


@_gumbel_bwd_op.register_fake
def _(dy, x, m, s, inv_tau, noise, seed, idx, tau):
    return x.new_empty(x.shape)


def _gumbel_op_setup(ctx, inputs, output):
    x, noise, seed, inv_tau, tau, _ = inputs
    _, idx, m, s = output
    ctx.save_for_backward(x, noise, seed, m, s, idx, tau)
    ctx.inv_tau = inv_tau
    ctx.mark_non_differentiable(idx, m, s)


def _gumbel_op_backward(ctx, dy, _didx, _dm, _ds):
    x, noise, seed, m, s, idx, tau = ctx.saved_tensors
    return torch.ops.fused_s2s.gumbel_softmax_bwd(dy, x, m, s, ctx.inv_tau, noise, seed, idx, tau), \
        None, None, None, None, None


_gumbel_fwd_op.register_autograd(_gumbel_op_backward, setup_context=_gumbel_op_setup)


@torch.library.custom_op("fused_s2s::gumbel_sample", mutates_args=())
def _gumbel_sample_op(x: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> torch.Tensor:
    """-> the Gumbel-max index (R,) of x (R, V) (gumbel_sample: no y written)."""
    return _gumbel_index_run.__wrapped__(x, noise, seed)  # the undecorated function (functools.wraps)


@_gumbel_sample_op.register_fake
def _(x, noise, seed):
    return x.new_empty(x.shape[0], dtype=torch.int64)
