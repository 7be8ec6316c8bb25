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


@_backend.not_traced  # torch.compile runs it as it is, between its graphs (see not_traced)
def _attention_fused(query, keys, values, mask, splits, block_l, tiled):
    """The Triton path: the autograd Function when a graph is recorded, else the launcher."""
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad
                                    or (values is not None and values.requires_grad)):
        return _AttentionFn.apply(query, keys, values, mask, splits, block_l, tiled)
    # no graph to record (generation, no_grad): skip the autograd.Function's host cost
    return _backend.kernels("attention").attention_forward(query, keys, values, mask, splits=splits,
                                                           block_l=block_l, tiled=tiled)[:2]
