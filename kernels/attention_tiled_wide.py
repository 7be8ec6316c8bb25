"""Tiled T > 1 attention for wide features (D or Dv too large for one register tile): chunked.

Same math, outputs and (m, l) statistics as ``fused_s2s.kernels.attention_tiled`` (see its
docstring; fp16 / bf16 only), for the BLOCK_D where a whole (BLOCK_T, BLOCK_D) tile spills (beyond
256). Two changes make the tiles small:

* reductions over the feature axis (the scores Q H^T and g = dc V^T) loop over it in chunks of
  BLOCK_K, reloading the (BT, BK) / (BL, BK) chunks (L1 / L2 hits) instead of holding Q and H;
* each program owns BLOCK_O output features (grid axis 2): ctx (forward), dq (dq kernel), dH and dV
  (dH/dV kernel); the scores and g are recomputed by every feature chunk of a tile. Extra tensor
  core work, but H is still read per BLOCK_T queries, not per query.

The chunk of feature-axis 0 stores the per-row outputs (raw scores, weights, (m, l), delta).
g = dc V^T is the same chunked tl.dot sum in both backward kernels; dc . c is an fp32 row sum with
the forward's fp32 ctx_acc (or, for a caller passing a 16-bit ctx, the chunked dot's diagonal).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_s2s.kernels.attention import _mask_args, _mask_valid, ctx_acc_buffer
from fused_s2s.kernels._launch import cdiv, direct
from fused_s2s.kernels.attention_tiled import (
    _alpha_dalpha_rowsum,
    _block_l,
    _dot_types,
    _load_row_stats,
    _store_stats_and_weights,
    _tiled_bwd_setup,
    _tiled_inputs,
)


@triton.jit
def _chunked_dot_t(A, B_, a_base, b_base, s_ar, s_ak, s_br, s_bk, in_a, in_b, ar_a, ar_b, ar_k, K,
                   DOT_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum over K-chunks of A (BLOCK_A, BK) @ B (BLOCK_B, BK)^T -> (BLOCK_A, BLOCK_B) fp32."""
    out = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    k0 = a_base * 0
    while k0 < K:
        in_k = ar_k < K - k0
        a = tl.load(A + a_base + k0 * s_ak + ar_a[:, None] * s_ar + ar_k[None, :] * s_ak,
                    mask=in_a[:, None] & in_k[None, :], other=0.0).to(DOT_T)
        b = tl.load(B_ + b_base + k0 * s_bk + ar_b[:, None] * s_br + ar_k[None, :] * s_bk,
                    mask=in_b[:, None] & in_k[None, :], other=0.0).to(DOT_T)
        out += tl.dot(a, tl.trans(b), input_precision="ieee")
        k0 += BLOCK_K
    return out


@triton.jit
def _attn_fwd_wide_kernel(
    Q, K, V, MASK, CTX, CTXA, W, S, LSE,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    MASK_MODE: tl.constexpr, STORE_CTXA: tl.constexpr, DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid (B, cdiv(T, BLOCK_T), cdiv(DV, BLOCK_O)). ctx[:, o0:o0+BO] (and in fp32 to CTXA with
    STORE_CTXA); chunk 0 also the weights, (m, l)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    o0 = tl.program_id(2).to(tl.int64) * BLOCK_O
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_k = tl.arange(0, BLOCK_K)
    ar_o = tl.arange(0, BLOCK_O)
    in_t = ar_t < T - t0
    in_o = ar_o < DV - o0
    first = in_t & (ar_t * 0 + o0 == 0)  # (BT,): rows whose per-row outputs this chunk writes
    rows = b * T + t0 + ar_t  # (BT,)
    s_tile = rows[:, None] * L + ar_l[None, :]  # (BT, BL) into the (B*T, L) score buffer
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
    l0 = b * 0
    while l0 < L:
        in_l = ar_l < L - l0
        valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)
        e = _chunked_dot_t(Q, K, b * s_qb + t0 * s_qt, b * s_kb + l0 * s_kl, s_qt, s_qd, s_kl, s_kd,
                           in_t, in_l, ar_t, ar_l, ar_k, D, DOT_T, BLOCK_T, BLOCK_L, BLOCK_K)  # (BT, BL)
        e = tl.where(valid[None, :], e, float("-inf"))
        tl.store(S + s_tile + l0, e.to(S.dtype.element_ty), mask=first[:, None] & in_l[None, :])
        m_new = tl.maximum(m_i, tl.max(e, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        p = tl.exp(e - m_use[:, None])
        corr = tl.exp(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=1)
        v = tl.load(V + b * s_vb + l0 * s_vl + o0 * s_vd + ar_l[:, None] * s_vl + ar_o[None, :] * s_vd,
                    mask=in_l[:, None] & in_o[None, :], other=0.0).to(DOT_T)  # (BL, BO)
        acc = acc * corr[:, None] + tl.dot(p.to(RND_T).to(DOT_T), v, input_precision="ieee")
        m_i = m_new
        l0 += BLOCK_L

    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty row: l = 0 -> all 0
    ctx = acc * inv_l[:, None]
    tl.store(CTX + rows[:, None] * DV + o0 + ar_o[None, :], ctx.to(CTX.dtype.element_ty),
             mask=in_t[:, None] & in_o[None, :])
    if STORE_CTXA:
        tl.store(CTXA + rows[:, None] * DV + o0 + ar_o[None, :], ctx, mask=in_t[:, None] & in_o[None, :])
    if o0 == 0:
        _store_stats_and_weights(S, W, LSE, rows, s_tile, in_t, ar_l, m_use, l_i, inv_l, L, BLOCK_L)


@triton.jit
def _attn_bwd_dq_wide_kernel(
    Q, K, V, MASK, CTX, W, LSE, DCTX, DW, DQ, DELTA,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    MASK_MODE: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid (B, cdiv(T, BLOCK_T), cdiv(D, BLOCK_O)). dq[:, o0:o0+BO]; chunk 0 also stores delta (B*T,)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    o0 = tl.program_id(2).to(tl.int64) * BLOCK_O
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_k = tl.arange(0, BLOCK_K)
    ar_o = tl.arange(0, BLOCK_O)
    in_t = ar_t < T - t0
    in_o = ar_o < D - o0
    rows = b * T + t0 + ar_t
    m_r, inv_l = _load_row_stats(LSE, rows, in_t)
    dw_tile = b * s_wb + t0 * s_wt + ar_t[:, None] * s_wt + ar_l[None, :] * s_wl  # (BT, BL)

    delta = tl.zeros([BLOCK_T], tl.float32)
    if HAS_DCTX:
        if CTX.dtype.element_ty == Q.dtype.element_ty:
            # dc . c as the diagonal of the same chunked dot that gives g = dc V^T below
            dcc = _chunked_dot_t(DCTX, CTX, b * s_cb + t0 * s_ct, (b * T + t0) * DV, s_ct, s_cd, DV, 1,
                                 in_t, in_t, ar_t, ar_t, ar_k, DV, DOT_T, BLOCK_T, BLOCK_T, BLOCK_K)  # (BT, BT)
            delta += tl.sum(tl.where(ar_t[:, None] == ar_t[None, :], dcc, 0.0), axis=1)
        else:
            # 16-bit inputs, c in fp32 (ctx_acc): fp32 row sums over DV chunks (see attention_tiled)
            k0 = b * 0
            while k0 < DV:
                msk = in_t[:, None] & (ar_k < DV - k0)[None, :]
                dcj = tl.load(DCTX + b * s_cb + t0 * s_ct + k0 * s_cd + ar_t[:, None] * s_ct + ar_k[None, :] * s_cd,
                              mask=msk, other=0.0).to(tl.float32)
                cj = tl.load(CTX + rows[:, None] * DV + k0 + ar_k[None, :], mask=msk, other=0.0).to(tl.float32)
                delta += tl.sum(dcj * cj, axis=1)
                k0 += BLOCK_K
    if HAS_DW:
        delta += _alpha_dalpha_rowsum(W, Q, DW, rows, dw_tile, s_wl, in_t, ar_l, m_r, inv_l, L, BLOCK_T, BLOCK_L)
    tl.store(DELTA + rows, delta, mask=in_t & (ar_t * 0 + o0 == 0))

    dq = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
    l0 = b * 0
    while l0 < L:
        in_l = ar_l < L - l0
        valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)
        e = _chunked_dot_t(Q, K, b * s_qb + t0 * s_qt, b * s_kb + l0 * s_kl, s_qt, s_qd, s_kl, s_kd,
                           in_t, in_l, ar_t, ar_l, ar_k, D, DOT_T, BLOCK_T, BLOCK_L, BLOCK_K)
        alpha = tl.where(valid[None, :], tl.exp(e - m_r[:, None]) * inv_l[:, None], 0.0)  # (BT, BL)
        g = tl.zeros([BLOCK_T, BLOCK_L], tl.float32)
        if HAS_DW:
            g += tl.load(DW + l0 * s_wl + dw_tile, mask=in_t[:, None] & in_l[None, :], other=0.0).to(tl.float32)
        if HAS_DCTX:
            g += _chunked_dot_t(DCTX, V, b * s_cb + t0 * s_ct, b * s_vb + l0 * s_vl, s_ct, s_cd, s_vl, s_vd,
                                in_t, in_l, ar_t, ar_l, ar_k, DV, DOT_T, BLOCK_T, BLOCK_L, BLOCK_K)
        de = alpha * (g - delta[:, None])
        k = tl.load(K + b * s_kb + l0 * s_kl + o0 * s_kd + ar_l[:, None] * s_kl + ar_o[None, :] * s_kd,
                    mask=in_l[:, None] & in_o[None, :], other=0.0).to(DOT_T)  # (BL, BO)
        dq += tl.dot(de.to(RND_T).to(DOT_T), k, input_precision="ieee")
        l0 += BLOCK_L
    tl.store(DQ + rows[:, None] * D + o0 + ar_o[None, :], dq.to(DQ.dtype.element_ty),
             mask=in_t[:, None] & in_o[None, :])


@triton.jit
def _attn_bwd_kv_wide_kernel(
    Q, K, V, MASK, LSE, DELTA, DCTX, DW, DK, DVAL,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    MASK_MODE: tl.constexpr, SHARED_KV: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid (B, cdiv(L, BLOCK_L), cdiv(max(D, DV), BLOCK_O)). dH[:, o0:o0+BO] and dV[:, o0:o0+BO]."""
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1).to(tl.int64) * BLOCK_L
    o0 = tl.program_id(2).to(tl.int64) * BLOCK_O
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_k = tl.arange(0, BLOCK_K)
    ar_o = tl.arange(0, BLOCK_O)
    in_l = ar_l < L - l0
    in_od = ar_o < D - o0
    in_ov = ar_o < DV - o0
    valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)  # (BL,)
    dwT_tile = ar_l[:, None] * s_wl + ar_t[None, :] * s_wt  # (BL, BT): dW read transposed
    dk = tl.zeros([BLOCK_L, BLOCK_O], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_O], tl.float32)
    t0 = b * 0
    while t0 < T:
        in_t = ar_t < T - t0
        rows = b * T + t0 + ar_t
        m_r, inv_l = _load_row_stats(LSE, rows, in_t)  # also 0 for t >= T
        delta = tl.load(DELTA + rows, mask=in_t, other=0.0)
        # scores and g in the dq kernel's orientation (BT, BL), then transposed
        e = _chunked_dot_t(Q, K, b * s_qb + t0 * s_qt, b * s_kb + l0 * s_kl, s_qt, s_qd, s_kl, s_kd,
                           in_t, in_l, ar_t, ar_l, ar_k, D, DOT_T, BLOCK_T, BLOCK_L, BLOCK_K)
        aT = tl.where(valid[:, None] & in_t[None, :], tl.exp(tl.trans(e) - m_r[None, :]) * inv_l[None, :], 0.0)
        gT = tl.zeros([BLOCK_L, BLOCK_T], tl.float32)
        if HAS_DW:
            gT += tl.load(DW + b * s_wb + l0 * s_wl + t0 * s_wt + dwT_tile,
                          mask=in_l[:, None] & in_t[None, :], other=0.0).to(tl.float32)
        if HAS_DCTX:
            g = _chunked_dot_t(DCTX, V, b * s_cb + t0 * s_ct, b * s_vb + l0 * s_vl, s_ct, s_cd, s_vl, s_vd,
                               in_t, in_l, ar_t, ar_l, ar_k, DV, DOT_T, BLOCK_T, BLOCK_L, BLOCK_K)
            gT += tl.trans(g)
            dc = tl.load(DCTX + b * s_cb + t0 * s_ct + o0 * s_cd + ar_t[:, None] * s_ct + ar_o[None, :] * s_cd,
                         mask=in_t[:, None] & in_ov[None, :], other=0.0).to(DOT_T)  # (BT, BO)
            a_dc = tl.dot(aT.to(RND_T).to(DOT_T), dc, input_precision="ieee")  # (BL, BO)
            if SHARED_KV:
                dk += a_dc
            else:
                dv += a_dc
        deT = aT * (gT - delta[None, :])
        q = tl.load(Q + b * s_qb + t0 * s_qt + o0 * s_qd + ar_t[:, None] * s_qt + ar_o[None, :] * s_qd,
                    mask=in_t[:, None] & in_od[None, :], other=0.0).to(DOT_T)  # (BT, BO)
        dk += tl.dot(deT.to(RND_T).to(DOT_T), q, input_precision="ieee")
        t0 += BLOCK_T
    tl.store(DK + (b * L + l0) * D + o0 + ar_l[:, None] * D + ar_o[None, :], dk.to(DK.dtype.element_ty),
             mask=in_l[:, None] & in_od[None, :])
    if not SHARED_KV:
        tl.store(DVAL + (b * L + l0) * DV + o0 + ar_l[:, None] * DV + ar_o[None, :], dv.to(DVAL.dtype.element_ty),
                 mask=in_l[:, None] & in_ov[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (called by attention_tiled's launchers for a BLOCK_D without a one-tile config)
# ----------------------------------------------------------------------------------------------

def attention_forward_wide(query, keys, values, mask, cfg, *, block_l=None, for_backward=False):
    """As ``attention_forward_tiled``; cfg = (BLOCK_T, BLOCK_L, BLOCK_K, BLOCK_O, num_warps)."""
    B, T, D = query.shape
    L = keys.shape[1]
    shared = values is None
    Dv = (keys if shared else values).shape[2]
    dev, dtype = query.device, query.dtype
    bt, bl, bk, bo, nw = cfg
    bl = _block_l(bl, block_l)
    blk = max(bk, bo)
    query, keys, v, mask = _tiled_inputs(query, keys, values, mask, bt, bl, blk)
    ctx = torch.empty(B, T, Dv, device=dev, dtype=dtype)
    ctx_acc, store_ctxa = ctx_acc_buffer(ctx, for_backward)
    weights = torch.empty(B, T, L, device=dev, dtype=dtype)
    lse = torch.empty(B * T, 2, device=dev, dtype=torch.float32)  # (m, l) per row
    scores = weights if dtype == torch.float32 else torch.empty(B, T, L, device=dev, dtype=torch.float32)
    m_ptr, mode, s_mb, s_ml = _mask_args(mask, query)
    dot_t, rnd_t = _dot_types(query)
    direct(_attn_fwd_wide_kernel)[(B, cdiv(T, bt), cdiv(Dv, bo))](
        query, keys, v, m_ptr, ctx, ctx_acc, weights, scores, lse,
        T, L, D, Dv,
        *query.stride(), *keys.stride(), *v.stride(), s_mb, s_ml,
        MASK_MODE=mode, STORE_CTXA=store_ctxa, DOT_T=dot_t, RND_T=rnd_t, BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, BLOCK_O=bo, num_warps=nw,
        enable_fp_fusion=True,
    )
    return ctx, weights, lse, ctx_acc, scores if store_ctxa else weights


def attention_backward_wide(query, keys, values, mask, ctx, weights, lse, dctx, dweights, cfg, *, block_l=None):
    """As ``attention_backward_tiled``; cfg = (BLOCK_T, BLOCK_L, BLOCK_K, BLOCK_O, num_warps)."""
    B, T, D = query.shape
    L = keys.shape[1]
    shared = values is None
    Dv = (keys if shared else values).shape[2]
    has_dc, has_dw = dctx is not None, dweights is not None
    bt, bl, bk, bo, nw = cfg
    bl = _block_l(bl, block_l)
    blk = max(bk, bo)
    query, keys, v, mask, dc, dw, dq, dk, dv, delta = _tiled_bwd_setup(
        query, keys, values, mask, ctx, weights, dctx, dweights, bt, bl, blk)
    m_ptr, mode, s_mb, s_ml = _mask_args(mask, query)
    dot_t, rnd_t = _dot_types(query)
    common = dict(MASK_MODE=mode, HAS_DCTX=has_dc, HAS_DW=has_dw, DOT_T=dot_t, RND_T=rnd_t,
                  BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, BLOCK_O=bo, num_warps=nw, enable_fp_fusion=True)
    strides = (*query.stride(), *keys.stride(), *v.stride(), s_mb, s_ml, *dc.stride(), *dw.stride())
    direct(_attn_bwd_dq_wide_kernel)[(B, cdiv(T, bt), cdiv(D, bo))](
        query, keys, v, m_ptr, ctx, weights, lse, dc, dw, dq, delta, T, L, D, Dv, *strides, **common,
    )
    direct(_attn_bwd_kv_wide_kernel)[(B, cdiv(L, bl), cdiv(max(D, Dv), bo))](
        query, keys, v, m_ptr, lse, delta, dc, dw, dk, dk if dv is None else dv, T, L, D, Dv, *strides,
        SHARED_KV=shared, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (part of ``python -m fused_s2s.aot attention``)
# ----------------------------------------------------------------------------------------------

def aot_configs(wide_configs: dict):
    """The three wide kernels per dtype with the launcher's one config (their tiles do not depend
    on D); innermost strides the constant 1, the mask form rotating over the dtypes."""
    from fused_s2s.aot import AOTConfig

    i32, cx = "i32", "constexpr"
    sizes = dict(T=i32, L=i32, D=i32, DV=i32)
    strides = dict(s_qb=i32, s_qt=i32, s_qd=cx, s_kb=i32, s_kl=i32, s_kd=cx, s_vb=i32, s_vl=i32, s_vd=cx,
                   s_mb=i32, s_ml=cx)
    gstrides = dict(s_cb=i32, s_ct=i32, s_cd=cx, s_wb=i32, s_wt=i32, s_wl=cx)
    unit = dict(s_qd=1, s_kd=1, s_vd=1, s_ml=1)
    masks = [("*i1", 2), ("*i64", 1), ("*i64", 0)]
    types = {torch.float16: ("fp16", tl.float16), torch.bfloat16: ("bf16", tl.bfloat16)}
    for i, (ty, tdt) in enumerate(types.values()):
        mask_ty, mode = masks[i % len(masks)]
        p, a = f"*{ty}", "*fp32"
        flags = dict(MASK_MODE=mode, DOT_T=tdt, RND_T=tdt)
        blocks = dict(BLOCK_T=cx, BLOCK_L=cx, BLOCK_K=cx, BLOCK_O=cx)

        bt, bl, bk, bo, nw = wide_configs["fwd"]
        tag = f"{ty} mask={mode} BT={bt} BL={bl} BK={bk} BO={bo}"
        sig = dict(Q=p, K=p, V=p, MASK=mask_ty, CTX=p, CTXA=a, W=p, S=a, LSE=a, **sizes, **strides, MASK_MODE=cx,
                   STORE_CTXA=cx, DOT_T=cx, RND_T=cx, **blocks)
        c = dict(unit, BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, BLOCK_O=bo, STORE_CTXA=True, **flags)
        yield AOTConfig(_attn_fwd_wide_kernel, sig, c, num_warps=nw, label=f"fwd_wide {tag}")

        bt, bl, bk, bo, nw = wide_configs["bwd"]
        tag = f"{ty} mask={mode} BT={bt} BL={bl} BK={bk} BO={bo}"
        c = dict(unit, s_cd=1, s_wl=1, HAS_DCTX=True, HAS_DW=True, BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, BLOCK_O=bo,
                 **flags)
        bwd = dict(MASK_MODE=cx, HAS_DCTX=cx, HAS_DW=cx, DOT_T=cx, RND_T=cx, **blocks)
        sig = dict(Q=p, K=p, V=p, MASK=mask_ty, CTX=a, W=a, LSE=a, DCTX=p, DW=p, DQ=p, DELTA=a, **sizes,
                   **strides, **gstrides, **bwd)
        yield AOTConfig(_attn_bwd_dq_wide_kernel, sig, c, num_warps=nw, label=f"bwd_dq_wide {tag}")
        for shared in (False, True):
            sig = dict(Q=p, K=p, V=p, MASK=mask_ty, LSE=a, DELTA=a, DCTX=p, DW=p, DK=p, DVAL=p, **sizes, **strides,
                       **gstrides, SHARED_KV=cx, **bwd)
            yield AOTConfig(_attn_bwd_kv_wide_kernel, sig, dict(c, SHARED_KV=shared), num_warps=nw,
                            label=f"bwd_kv_wide {tag} kv={int(shared)}")
