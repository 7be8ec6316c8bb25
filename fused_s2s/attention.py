"""Public ``attention_step``: Luong "general" attention for one decoder step or T steps at once.

    ctx, weights = attention_step(query, keys, values=None, mask=None, *, backend="auto")

query (B, D) or (B, T, D) is s_t W_a (the caller applies W_a); keys (B, L, D) is the encoder memory
H; values (B, L, Dv), None meaning values = keys. mask: None, lengths (B,) of any integer dtype, or
bool (B, L) with True = attend. Returns ctx (B, [T,] Dv) and weights alpha (B, [T,] L) in query's
dtype; a row with nothing to attend to gives ctx = 0, weights = 0 and zero gradient.

backend "triton" runs ``fused_s2s.kernels.attention`` (one launch forward, split-L when the batch
is small; Triton backward kernels), "eager" runs ``fused_s2s.reference.attention_eager`` (bmm ->
masked softmax -> bmm in PyTorch); "auto" picks Triton for CUDA tensors (see fused_s2s.backend).
"""
from __future__ import annotations

from typing import Optional

import torch

from fused_s2s import backend as _backend
from fused_s2s._checks import check_float, check_same_device, check_tensor

__all__ = ["attention_step"]


def _validate(query, keys, values, mask):
    check_float("query", query, ndim=(2, 3))
    check_float("keys", keys, ndim=3)
    if keys.dtype != query.dtype:
        raise TypeError(f"keys must have query's dtype {query.dtype}, got {keys.dtype}")
    if values is not None:
        check_float("values", values, ndim=3)
        if values.dtype != query.dtype:
            raise TypeError(f"values must have query's dtype {query.dtype}, got {values.dtype}")
    check_same_device(query=query, keys=keys, values=values, mask=mask)
    B, L, D = keys.shape
    if query.shape[0] != B:
        raise ValueError(f"query has batch size {query.shape[0]} but keys has {B}; expected equal")
    if query.shape[-1] != D:
        raise ValueError(f"query has feature size {query.shape[-1]} but keys (B, L, D) has D={D}; expected equal")
    if L < 1:
        raise ValueError(f"keys must have L >= 1 source positions, got shape {tuple(keys.shape)}")
    if D < 1:
        raise ValueError(f"keys must have D >= 1 features, got shape {tuple(keys.shape)}")
    if values is not None:
        if values.shape[0] != B or values.shape[1] != L:
            raise ValueError(f"values must be (B, L, Dv) = ({B}, {L}, Dv) like keys, got {tuple(values.shape)}")
        if values.shape[2] < 1:
            raise ValueError(f"values must have Dv >= 1 features, got shape {tuple(values.shape)}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype == torch.bool:
            if tuple(mask.shape) != (B, L):
                raise ValueError(f"bool mask must be (B, L) = ({B}, {L}) with True = attend, got {tuple(mask.shape)}")
        elif mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must be lengths (B,) of an integer dtype or a bool (B, L) tensor, got {mask.dtype}")
        elif tuple(mask.shape) != (B,):
            raise ValueError(f"mask of lengths must be (B,) = ({B},), got {tuple(mask.shape)}")


class _AttentionFn(torch.autograd.Function):
    """Triton forward (ctx, weights) and backward; saves the inputs, (m, l) (B*T, 2), and the context
    and the weights in the accumulation dtype (for fp16/bf16 an fp32 context and the fp32 raw scores:
    the backward's delta = dc . c + sum alpha dalpha needs them on peaked rows, see
    fused_s2s.kernels.attention)."""

    @staticmethod
    def forward(fctx, query, keys, values, mask, splits, block_l, tiled):
        # query (B, D) or (B, T, D) as it is: the launchers take both (no views, each of which costs
        # host time and, around apply(), an autograd node of its own)
        out, weights, lse, ctx_acc, scores_acc = _backend.kernels("attention").attention_forward(
            query, keys, values, mask, splits=splits, block_l=block_l, tiled=tiled, for_backward=True)
        fctx.save_for_backward(query, keys, values, mask, ctx_acc, scores_acc, lse)
        fctx.splits, fctx.block_l, fctx.tiled = splits, block_l, tiled
        fctx.set_materialize_grads(False)  # an output without gradient costs nothing in backward
        return out, weights

    @staticmethod
    @_backend.not_traced  # run by the autograd engine, also inside a compiled caller
    def backward(fctx, dctx, dweights):
        query, keys, values, mask, ctx_acc, scores_acc, lse = fctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return (*_eager_vjp(query, keys, values, mask, dctx, dweights), None, None, None, None)
        dq, dk, dv = _backend.kernels("attention").attention_backward(
            query, keys, values, mask, ctx_acc, scores_acc, lse, dctx, dweights,
            splits=fctx.splits, block_l=fctx.block_l, tiled=fctx.tiled)
        return dq, dk, dv, None, None, None, None


def _eager_vjp(query, keys, values, mask, dctx, dweights):
    """(dq, dk, dv) through the eager math, recorded for a higher-order gradient: what the
    backward returns under create_graph=True. The Triton backward records no graph, so its
    gradients would silently count as constants in a second differentiation (a gradient penalty,
    a Hessian-vector product); the eager recomputation from the saved inputs gives the same
    first-order values to rounding, and F-style double backward."""
    from fused_s2s.reference import attention_eager

    # fresh aliases to differentiate against: the partial derivatives. Against the saved tensors
    # themselves autograd.grad gives total ones, which also run back through one input's history
    # to another (in the decoder the query depends on the memory H through earlier steps).
    q, k, v = (None if t is None else t.view_as(t) for t in (query, keys, values))
    wrt = [t for t in (q, k, v) if t is not None and t.requires_grad]
    ctx, weights = attention_eager(q, k, v, mask)  # (B, [T,] Dv), (B, [T,] L)
    outs, grads = zip(*[(o, g) for o, g in ((ctx, dctx), (weights, dweights)) if g is not None])
    got = iter(torch.autograd.grad(outs, wrt, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in (q, k, v))


def _eager_fn(mask):
    """(query, keys[, values]) -> (ctx, weights) by the eager math with ``mask``: what
    _AttentionFuncFn's backward differentiates."""
    from fused_s2s.reference import attention_eager

    return lambda q, k, *v: attention_eager(q, k, *v, mask=mask)


def _attention_jvp(query, keys, values, mask, dquery, dkeys, dvalues):
    """The forward-mode derivative (dctx, dweights) for tangents (dquery, dkeys, dvalues) (None: 0),
    in fp32 (fp64 for fp64), returned in query's dtype:

        E = q H^T (masked),  alpha = softmax(E),  ctx = alpha V
        dE = dq H^T + q dH^T,  dalpha = alpha (dE - sum_j alpha_j dE_j),  dctx = dalpha V + alpha dV

    Masked positions and empty rows have alpha = 0, so they drop out. Plain torch ops: they take
    torch.func's jvp and jacfwd (which maps it over tangents) and a forward-AD dual level alike,
    where torch.func.jvp of the eager math would open a nested dual level (an error)."""
    from fused_s2s.reference import attention_eager

    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(acc), keys.to(acc)
    v = k if values is None else values.to(acc)

    def tangent(t, like):
        return torch.zeros_like(like) if t is None else t.to(acc)

    dq, dk = tangent(dquery, q), tangent(dkeys, k)
    dv = dk if values is None else tangent(dvalues, v)
    single = q.dim() == 2
    if single:
        q, dq = q.unsqueeze(1), dq.unsqueeze(1)  # (B, 1, D)
    _, alpha = attention_eager(q, k, v, mask)  # (B, T, L)
    dE = dq @ k.transpose(1, 2) + q @ dk.transpose(1, 2)  # (B, T, L)
    dalpha = alpha * (dE - (alpha * dE).sum(-1, keepdim=True))  # (B, T, L)
    dctx = dalpha @ v + alpha @ dv  # (B, T, Dv)
    if single:
        dctx, dalpha = dctx.squeeze(1), dalpha.squeeze(1)
    return dctx.to(query.dtype), dalpha.to(query.dtype)


class _AttentionFuncFn(torch.autograd.Function):
    """The Triton path inside torch.func transforms (grad, vjp, jacrev, hessian, jvp, jacfwd, vmap
    and their compositions, e.g. per-sample gradients vmap(grad(f))), which require the
    setup_context form. Outside them _AttentionFn serves: the Triton backward, less host time.

    - forward: the Triton forward, one launch.
    - vmap: the mapped dimension folded into B (into T when only the query is mapped: the memory
      is not copied), then the fused path again (one launch for the whole mapped batch; outside
      any other transform that is _AttentionFn, Triton backward too).
    - backward: torch.func.vjp of the eager math (attention_eager) at the saved inputs; jvp:
      _attention_jvp's formula in torch ops. functorch differentiates with create_graph=True, so
      the gradients must themselves be differentiable (hessian, jacrev of grad), and under vmap
      (jacrev, per-sample gradients) they are batched tensors: plain torch ops take both, the Triton
      backward neither. (Regular autograd.grad inside a backward does not compose with vmap:
      jacrev raised.)
    """

    @staticmethod
    def forward(query, keys, values, mask, splits, block_l, tiled):
        return _backend.kernels("attention").attention_forward(query, keys, values, mask, splits=splits,
                                                               block_l=block_l, tiled=tiled)[:2]

    @staticmethod
    def setup_context(fctx, inputs, output):
        query, keys, values, mask = inputs[:4]
        fctx.save_for_backward(query, keys, values, mask)
        fctx.save_for_forward(query, keys, values, mask)
        fctx.set_materialize_grads(False)

    @staticmethod
    def backward(fctx, dctx, dweights):
        query, keys, values, mask = fctx.saved_tensors
        primals = (query, keys) if values is None else (query, keys, values)
        outs, pullback = torch.func.vjp(_eager_fn(mask), *primals)
        grads = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, (dctx, dweights))))
        return (*grads, *(None,) * (7 - len(grads)))  # dq, dk, [dv,] then None for the rest

    @staticmethod
    def jvp(fctx, dquery, dkeys, dvalues, *_):
        return _attention_jvp(*fctx.saved_tensors, dquery, dkeys, dvalues)

    @staticmethod
    def vmap(info, in_dims, query, keys, values, mask, splits, block_l, tiled):
        N = info.batch_size

        def fold(t, d):  # (..., at d: N, ...) or unmapped -> (N * B, ...)
            if t is None:
                return None
            t = t.movedim(d, 0) if d is not None else t.expand(N, *t.shape)
            return t.flatten(0, 1)

        if all(d is None for d in in_dims[1:4]):
            # only the query mapped (per-sample gradients, one memory): the N queries of a batch row
            # become N * T queries of one call, and the memory is read as it is, not copied N times
            q = query.movedim(in_dims[0], 1)  # (B, N, [T,] D)
            ctx, weights = _attention_fused(q.flatten(1, -2), keys, values, mask, splits, block_l, tiled)  # (B, N * T, Dv), (B, N * T, L)
            if q.dim() == 4:
                ctx, weights = ctx.unflatten(1, (N, -1)), weights.unflatten(1, (N, -1))
            return (ctx, weights), (1, 1)
        q, k, v, m = (fold(t, d) for t, d in zip((query, keys, values, mask), in_dims[:4]))
        ctx, weights = _attention_fused(q, k, v, m, splits, block_l, tiled)  # (N * B, [T,] Dv), (N * B, [T,] L)
        return (ctx.unflatten(0, (N, -1)), weights.unflatten(0, (N, -1))), (0, 0)


def attention_step(query, keys, values=None, mask=None, *, backend="auto", splits=None, block_l=None,
                   tiled=None):
    """Score -> masked softmax -> context: E = query keys^T (masked), alpha = softmax(E), ctx = alpha values.

    Args:
        query: (B, D) one decoder step, or (B, T, D) T steps at once; s_t W_a (the caller applies W_a).
        keys: (B, L, D), the encoder memory H; L >= 1.
        values: (B, L, Dv), or None: values are keys (H read once for both).
        mask: None, lengths (B,) of any integer dtype, or bool (B, L) with True = attend.
        backend: "auto" (Triton on CUDA, eager elsewhere; FUSED_S2S_BACKEND overrides), "triton", "eager".
    Returns:
        ctx (B, [T,] Dv) and weights alpha (B, [T,] L), in query's dtype (fp32 accumulation). A row
        with nothing to attend to gives ctx = 0, weights = 0 and zero gradient, never NaN. Both
        outputs are differentiable (query, keys, values).

    ``splits`` and ``block_l`` override the Triton launcher's split-L and block-size heuristics
    (for tests and tuning); they are ignored by the eager backend. ``tiled`` picks the kernels for
    T queries per batch row: None = heuristic (tiled, tl.dot, when T >= 16 for fp16/bf16; fp32
    and fp64 always run the per-row kernels, faster and more precise there on an H200), True
    forces the tiled kernels (ValueError for fp32 / fp64, which they do not take), False the
    per-query-row kernels. The tiled kernels ignore
    ``splits`` and raise ``block_l`` to at least 16.

    Both backends compose with torch.func (grad, vjp, jacrev, jacfwd, hessian, vmap: a mapped call
    is one launch) and torch.autograd.forward_ad (docs/model.md, "Under torch.func").
    """
    _validate(query, keys, values, mask)
    return _attention(query, keys, values, mask, backend, splits, block_l, tiled)


def _attention(query, keys, values, mask, backend, splits=None, block_l=None, tiled=None):
    """attention_step after _validate: the fused decoder checks memory and mask once per pass (its
    query is its own W_a's output), not at every step (~7 us of host time a step)."""
    if _backend.resolve(backend, query.device) == "eager":
        from fused_s2s.reference import attention_eager  # bmm -> masked softmax -> bmm

        return attention_eager(query, keys, values, mask)
    return _attention_fused(query, keys, values, mask, splits, block_l, tiled)


def _attention_fused(query, keys, values, mask, splits, block_l, tiled):
    """The Triton path: inside a torch.compile / torch.export trace the custom op below (one node
    of the graph), inside a torch.func transform _AttentionFuncFn, else ``_attention_run``."""
    if _backend.compiling():
        return torch.ops.fused_s2s.attention_fwd(query, keys, values, mask, splits, block_l, tiled)[:2]
    if _backend.transforming():  # torch.func: the setup_context-style Function it requires
        if _backend.nested_forward_ad():  # where a Function's jvp gives a silent 0: the eager math
            from fused_s2s.reference import attention_eager

            return attention_eager(query, keys, values, mask)
        return _AttentionFuncFn.apply(query, keys, values, mask, splits, block_l, tiled)
    return _attention_run(query, keys, values, mask, splits, block_l, tiled)


@_backend.not_traced  # with FUSED_S2S_COMPILE_OPS=0, torch.compile runs it between its graphs
def _attention_run(query, keys, values, mask, splits, block_l, tiled):
    """The autograd Function when a graph is recorded, else the launcher."""
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad
                                    or (values is not None and values.requires_grad)):
        return _AttentionFn.apply(query, keys, values, mask, splits, block_l, tiled)
    # no graph to record (generation, no_grad): skip the autograd.Function's host cost
    return _backend.kernels("attention").attention_forward(query, keys, values, mask, splits=splits,
                                                           block_l=block_l, tiled=tiled)[:2]


# --- torch.compile and torch.export: the Triton path as torch.library custom ops ---------------------
# Dynamo puts fused_s2s::attention_fwd in its graph as one opaque node (fullgraph=True and torch.export
# take it; Inductor calls it as it is, around its own kernels), and AOTAutograd puts
# fused_s2s::attention_bwd in the backward graph. The fake implementations give the outputs' shapes
# and dtypes without running anything. No None outputs in a custom op's schema: the fp32 buffers
# that only 16-bit inputs have (ctx_acc, scores_acc) are empty (0,) tensors for fp32 / fp64.
# A second derivative through the op is not taken (torch.compile's AOTAutograd takes none); the
# eager call of attention_step still gives it (_eager_vjp).


def _acc16(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


@torch.library.custom_op("fused_s2s::attention_fwd", mutates_args=())
def _attention_fwd_op(query: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], splits: Optional[int], block_l: Optional[int],
                      tiled: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ctx, weights, lse (B*T, 2), ctx_acc, scores_acc (fp32 for fp16 / bf16 inputs, else (0,))."""
    ctx, weights, lse, ctx_acc, scores = _backend.kernels("attention").attention_forward(
        query, keys, values, mask, splits=splits, block_l=block_l, tiled=tiled, for_backward=True)
    if not _acc16(query.dtype):
        return ctx, weights, lse, lse.new_empty(0), lse.new_empty(0)
    if scores.dtype != torch.float32:  # zero rows: the launcher returned the weights themselves
        scores = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
    return ctx, weights, lse, ctx_acc, scores


@_attention_fwd_op.register_fake
def _(query, keys, values, mask, splits, block_l, tiled):
    lead, L, Dv = query.shape[:-1], keys.shape[1], (keys if values is None else values).shape[2]
    acc_t = torch.float64 if query.dtype == torch.float64 else torch.float32
    lse = query.new_empty((lead.numel(), 2), dtype=acc_t)  # (m, l) per query row
    ctx, weights = query.new_empty((*lead, Dv)), query.new_empty((*lead, L))
    if not _acc16(query.dtype):
        return ctx, weights, lse, lse.new_empty(0), lse.new_empty(0)
    return ctx, weights, lse, ctx.new_empty(ctx.shape, dtype=acc_t), weights.new_empty(weights.shape, dtype=acc_t)


@torch.library.custom_op("fused_s2s::attention_bwd", mutates_args=())
def _attention_bwd_op(query: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], ctx: Optional[torch.Tensor], weights: torch.Tensor,
                      lse: torch.Tensor, dctx: Optional[torch.Tensor], dweights: Optional[torch.Tensor],
                      splits: Optional[int], block_l: Optional[int],
                      tiled: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_backward -> dquery, dkeys, dvalues ((0,) when values is None)."""
    dq, dk, dv = _backend.kernels("attention").attention_backward(
        query, keys, values, mask, ctx, weights, lse, dctx, dweights, splits=splits, block_l=block_l, tiled=tiled)
    return dq, dk, (keys.new_empty(0) if dv is None else dv)


@_attention_bwd_op.register_fake
def _(query, keys, values, mask, ctx, weights, lse, dctx, dweights, splits, block_l, tiled):
    return (query.new_empty(query.shape), keys.new_empty(keys.shape),
            keys.new_empty(0) if values is None else values.new_empty(values.shape))


def _attention_op_setup(ctx, inputs, output):  # torch.library passes these by name
    query, keys, values, mask, splits, block_l, tiled = inputs
    _, weights, lse, ctx_acc, scores = output
    # what _AttentionFn saves: for fp32 / fp64 the returned weights are the backward's alpha
    acc16 = _acc16(query.dtype)
    ctx.save_for_backward(query, keys, values, mask, ctx_acc if acc16 else None, scores if acc16 else weights, lse)
    ctx.cfg = (splits, block_l, tiled)
    ctx.mark_non_differentiable(lse, ctx_acc, scores)
    ctx.set_materialize_grads(False)  # an unused output: None, not zeros (as _AttentionFn)


def _attention_op_backward(ctx, dctx, dweights, _dlse, _dctx_acc, _dscores):
    query, keys, values, mask, ctx_acc, alpha, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fused_s2s.attention_bwd(query, keys, values, mask, ctx_acc, alpha, lse,
                                                   dctx, dweights, *ctx.cfg)
    return dq, dk, (None if values is None else dv), None, None, None, None


_attention_fwd_op.register_autograd(_attention_op_backward, setup_context=_attention_op_setup)
