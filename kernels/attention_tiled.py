"""Tiled (FlashAttention-style) attention for T > 1 queries per batch row: the teacher-forcing path.

Same math, outputs and saved statistics as ``fused_s2s.kernels.attention`` (see its docstring),
but a program owns BLOCK_T queries of one batch row, so a (BLOCK_L, BLOCK_D) tile of H is read once
per BLOCK_T queries instead of once per query, and the products run on ``tl.dot``::

    forward, grid (B, cdiv(T, BLOCK_T)), loop over L:
        E   = Q_tile (BT, BD) @ H_tile^T (BD, BL)              (masked: -inf)
        online softmax per query row (m, l), acc = acc * exp(m_old - m_new) + P @ V_tile
        raw E -> row buffer; after the loop weights = exp(E - m) / l, ctx = acc / l, save (m, l)
    backward dq, grid (B, cdiv(T, BLOCK_T)), loop over L:
        delta = rowsum(alpha * dW) + rowsum(dc * c)             (saved weights, context in fp32)
        alpha = exp(Q H^T - m) / l,  g = dW + dc @ V^T,  dE = alpha * (g - delta),  dq = dE @ H
    backward dH/dV, grid (B, cdiv(L, BLOCK_L)), loop over T (reduced in registers, no atomics):
        alpha^T = exp(H Q^T - m) / l,  dE^T = alpha^T * (g^T - delta)
        dH = sum_T dE^T @ Q  (+ alpha^T @ dc when V = H),  dV = sum_T alpha^T @ dc

fp16 / bf16 only. fp32 (and fp64) inputs run the per-query-row kernels at any T: on an H200 the
tiled kernels' fp32 ``tl.dot`` (``input_precision="ieee"``, no TF32, an FMA loop off the tensor
cores) took 22.9 ms for a B 128, T 50, L 50, D 512 forward + backward where the per-row kernels
took 0.96 ms, and its two dots' different summation orders put dc . c and g apart by more than
fp32 eager's error (e.g. dq not 0 at L = 1). The per-row kernels' exact delta is the precise one.

Precision: scores, softmax and every accumulation are fp32 (tl.dot accumulates in fp32). fp16 /
bf16 inputs feed tl.dot in their own dtype, with P, dE and alpha rounded to that dtype as
dot operands (as eager's bmm sees them). DOT_T is the operand type: the input dtype on the GPU,
fp32 under the CPU interpreter, whose tl.dot multiplies bf16 as raw uint16 bits; the operands are
first rounded to RND_T (the input dtype), so the interpreter computes the GPU's products exactly.
Features too wide for one register tile (BLOCK_D > 256) go to the chunked kernels of
``attention_tiled_wide``.

tl.dot needs every tile dimension >= 16: BLOCK_T, BLOCK_L, BLOCK_D are >= 16, padding is masked.
The three kernels' main loops are ``tl.range(..., num_stages=NUM_STAGES)`` loops (``_TILED_STAGES``;
session 10: they were ``while`` loops, which Triton never software-pipelines); the wide kernels'
nested loops and the short helper loops stay ``while`` loops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_s2s.kernels.attention import _AOT_MASKS, _mask_args, _mask_valid, _saved_alpha, _tile_safe, ctx_acc_buffer
from fused_s2s.kernels._launch import cdiv, direct, next_power_of_2, stages

_MIN_T = 16  # the launcher's heuristic: tiles pay once a batch row has this many queries

# (BLOCK_T, BLOCK_L, num_warps) per kernel ("fwd", "bwd": both backward kernels share one
# BLOCK_L, which keeps g = dc @ V^T bit-identical between them) and BLOCK_D, for fp16 / bf16 tensor-
# core dots. Sized with the AOT tool for zero spills on sm_80 / sm_90 (shared memory <= 49 KB); it
# spills beyond BLOCK_D 256, where the chunked kernels of attention_tiled_wide run (_WIDE_CONFIGS).
_TILED_CONFIGS = {
    "fwd": {16: (16, 32, 4), 32: (16, 64, 4), 64: (16, 32, 4), 128: (16, 64, 8), 256: (32, 32, 8)},
    "bwd": {16: (16, 16, 4), 32: (16, 16, 4), 64: (16, 32, 4), 128: (16, 16, 4), 256: (32, 16, 8)},
}

# Software pipelining of the three kernels' main loops (tl.range num_stages): the next H / V (or Q)
# tiles in flight while this one computes. 1 = none, as the configs above were sized and measured;
# benchmarks/sweep_attention.py (size "tf") times 2 and 3 next to it.
_TILED_STAGES = 1

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}  # the dtypes the tiled kernels take


def tiled_config(D: int, Dv: int, dtype: torch.dtype, kind: str) -> tuple[int, int, int, int] | None:
    """(BLOCK_T, BLOCK_L, BLOCK_D, num_warps) of the one-tile kernel ``kind``; None: too wide (or not 16-bit)."""
    if dtype not in _TL:
        return None  # fp32 / fp64: per-row kernels (module docstring)
    block_d = max(16, next_power_of_2(max(D, Dv)))
    cfg = _TILED_CONFIGS[kind].get(block_d)
    if cfg is None:
        return None
    bt, bl, nw = cfg
    return bt, bl, block_d, nw


# Wide features (no _TILED_CONFIGS entry for BLOCK_D): the chunked kernels of attention_tiled_wide,
# (BLOCK_T, BLOCK_L, BLOCK_K feature chunk of the score / g sums, BLOCK_O output features, num_warps);
# their tiles do not depend on D, so one config per dtype and kernel covers every D.
_WIDE_CONFIGS = {"fwd": (16, 32, 64, 128, 8), "bwd": (16, 32, 64, 128, 8)}


def use_tiled(T: int, D: int, Dv: int, dtype: torch.dtype, tiled: bool | None) -> bool:
    """Launcher choice: ``tiled`` None = heuristic (T >= 16, fp16/bf16); True forces it."""
    ok = dtype in _TL
    if tiled is None:
        return ok and T >= _MIN_T
    if tiled and not ok:
        raise ValueError(f"tiled=True needs float16/bfloat16 inputs (float32 and float64 run the per-row "
                         f"kernels: see fused_s2s.kernels.attention_tiled), got dtype {dtype}")
    return bool(tiled)


def _dot_types(x: torch.Tensor):
    """(DOT_T, RND_T): tl.dot operand dtype and the rounding of computed operands (module docstring)."""
    rnd = _TL[x.dtype]
    return (rnd if x.device.type == "cuda" else tl.float32), rnd


@triton.jit
def _load_row_stats(LSE, rows, in_t):
    """Backward prologue shared by the tiled and wide kernels: the forward's row max m and 1 / l
    (0 for an empty row, and for rows t >= T, which load l = 0)."""
    m_r = tl.load(LSE + 2 * rows, mask=in_t, other=0.0).to(tl.float32)
    l_r = tl.load(LSE + 2 * rows + 1, mask=in_t, other=0.0).to(tl.float32)
    return m_r, tl.where(l_r > 0, 1.0 / tl.where(l_r > 0, l_r, 1.0), 0.0)


@triton.jit
def _alpha_dalpha_rowsum(W, Q, DW, rows, dw_tile, s_wl, in_t, ar_l, m_r, inv_l, L, BLOCK_T: tl.constexpr,
                         BLOCK_L: tl.constexpr):
    """delta's rowsum(alpha * dalpha) (BT,) fp32, shared by the tiled and wide dq kernels: alpha as
    the forward saved it (fused_s2s.kernels.attention._saved_alpha), dalpha at DW + dw_tile."""
    part = tl.zeros([BLOCK_T], tl.float32)
    j0 = tl.program_id(0).to(tl.int64) * 0  # an int64 loop counter, as in the kernels
    while j0 < L:
        msk = in_t[:, None] & (ar_l < L - j0)[None, :]
        wj = _saved_alpha(W, Q, rows[:, None] * L + j0 + ar_l[None, :], msk, m_r[:, None], inv_l[:, None],
                          tl.float32)
        dwj = tl.load(DW + j0 * s_wl + dw_tile, mask=msk, other=0.0).to(tl.float32)
        part += tl.sum(wj * dwj, axis=1)
        j0 += BLOCK_L
    return part


@triton.jit
def _store_stats_and_weights(S, W, LSE, rows, s_tile, in_t, ar_l, m_use, l_i, inv_l, L, BLOCK_L: tl.constexpr):
    """Forward epilogue shared by the tiled and wide kernels: store the row stats (m, l) and
    normalise the raw scores S into the weights, alpha = exp(E - m) / l (0 for an empty row)."""
    tl.store(LSE + 2 * rows, m_use, mask=in_t)
    tl.store(LSE + 2 * rows + 1, l_i, mask=in_t)
    # The raw scores were stored by other threads of this program (another layout): make them visible.
    tl.debug_barrier()
    l0 = tl.program_id(0).to(tl.int64) * 0  # an int64 loop counter, as in the kernels
    while l0 < L:
        msk = in_t[:, None] & (ar_l < L - l0)[None, :]
        e = tl.load(S + s_tile + l0, mask=msk, other=float("-inf")).to(tl.float32)
        tl.store(W + s_tile + l0, (tl.exp(e - m_use[:, None]) * inv_l[:, None]).to(W.dtype.element_ty), mask=msk)
        l0 += BLOCK_L


@triton.jit
def _attn_fwd_tiled_kernel(
    Q, K, V, MASK, CTX, CTXA, W, S, LSE,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    MASK_MODE: tl.constexpr, SHARED_KV: tl.constexpr, STORE_CTXA: tl.constexpr,
    DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B, cdiv(T, BLOCK_T)). Writes ctx (B, T, DV), weights (B, T, L), (m, l) per row, and with
    STORE_CTXA ctx in fp32 to CTXA (for the backward's delta, see fused_s2s.kernels.attention)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_t = ar_t < T - t0
    in_d = ar_d < D
    in_dv = ar_d < DV
    rows = b * T + t0 + ar_t  # (BT,) int64: row = b * T + t
    q = tl.load(Q + b * s_qb + t0 * s_qt + ar_t[:, None] * s_qt + ar_d[None, :] * s_qd,
                mask=in_t[:, None] & in_d[None, :], other=0.0).to(DOT_T)  # (BT, BD)
    k_tile = ar_l[:, None] * s_kl + ar_d[None, :] * s_kd  # (BL, BD)
    v_tile = ar_l[:, None] * s_vl + ar_d[None, :] * s_vd
    s_tile = rows[:, None] * L + ar_l[None, :]  # (BT, BL) into the (B*T, L) score buffer

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for l0 in tl.range(b * 0, L, BLOCK_L, num_stages=NUM_STAGES):  # int64 l0
        in_l = ar_l < L - l0
        valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)
        k = tl.load(K + b * s_kb + l0 * s_kl + k_tile, mask=in_l[:, None] & in_d[None, :], other=0.0).to(DOT_T)
        e = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BT, BL) fp32
        e = tl.where(valid[None, :], e, float("-inf"))
        tl.store(S + s_tile + l0, e.to(S.dtype.element_ty), mask=in_t[:, None] & in_l[None, :])
        m_new = tl.maximum(m_i, tl.max(e, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        p = tl.exp(e - m_use[:, None])  # (BT, BL), 0 where masked
        corr = tl.exp(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if SHARED_KV:
            v = k  # H read once for the score and the context
        else:
            v = tl.load(V + b * s_vb + l0 * s_vl + v_tile, mask=in_l[:, None] & in_dv[None, :], other=0.0).to(DOT_T)
        acc = acc * corr[:, None] + tl.dot(p.to(RND_T).to(DOT_T), v, input_precision="ieee")
        m_i = m_new

    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # empty row: l = 0 -> all 0
    ctx = acc * inv_l[:, None]
    tl.store(CTX + rows[:, None] * DV + ar_d[None, :], ctx.to(CTX.dtype.element_ty), mask=in_t[:, None] & in_dv[None, :])
    if STORE_CTXA:
        tl.store(CTXA + rows[:, None] * DV + ar_d[None, :], ctx, mask=in_t[:, None] & in_dv[None, :])
    _store_stats_and_weights(S, W, LSE, rows, s_tile, in_t, ar_l, m_use, l_i, inv_l, L, BLOCK_L)


@triton.jit
def _attn_bwd_dq_tiled_kernel(
    Q, K, V, MASK, CTX, W, LSE, DCTX, DW, DQ, DELTA,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    MASK_MODE: tl.constexpr, SHARED_KV: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B, cdiv(T, BLOCK_T)). delta (B*T,) fp32 for the dH/dV kernel, and dq (B, T, D)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * BLOCK_T
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_t = ar_t < T - t0
    in_d = ar_d < D
    in_dv = ar_d < DV
    rows = b * T + t0 + ar_t  # (BT,)
    q = tl.load(Q + b * s_qb + t0 * s_qt + ar_t[:, None] * s_qt + ar_d[None, :] * s_qd,
                mask=in_t[:, None] & in_d[None, :], other=0.0).to(DOT_T)  # (BT, BD)
    m_r, inv_l = _load_row_stats(LSE, rows, in_t)  # empty row: alpha = 0
    dw_tile = b * s_wb + t0 * s_wt + ar_t[:, None] * s_wt + ar_l[None, :] * s_wl  # (BT, BL)

    # delta = rowsum(alpha * dalpha) + rowsum(dc * c), from the saved weights and context
    delta = tl.zeros([BLOCK_T], tl.float32)
    if HAS_DCTX:
        dc = tl.load(DCTX + b * s_cb + t0 * s_ct + ar_t[:, None] * s_ct + ar_d[None, :] * s_cd,
                     mask=in_t[:, None] & in_dv[None, :], other=0.0)  # (BT, BD)
        c = tl.load(CTX + rows[:, None] * DV + ar_d[None, :], mask=in_t[:, None] & in_dv[None, :], other=0.0)
        if CTX.dtype.element_ty == Q.dtype.element_ty:
            # a 16-bit ctx (a caller without the forward's fp32 ctx_acc): dc . c as the diagonal of a
            # tl.dot, the same operands as the dc . V_j in g below (a row attending to one position
            # has c = V_j, alpha_j = 1).
            dcc = tl.dot(dc.to(DOT_T), tl.trans(c.to(DOT_T)), input_precision="ieee")  # (BT, BT)
            delta += tl.sum(tl.where(ar_t[:, None] == ar_t[None, :], dcc, 0.0), axis=1)
        else:
            # 16-bit inputs, c saved in fp32 (ctx_acc): an fp32 row sum; rounding c to the operand
            # dtype would cost the peaked rows their precision (fused_s2s.kernels.attention docstring).
            delta += tl.sum(dc.to(tl.float32) * c.to(tl.float32), axis=1)
        dc = dc.to(DOT_T)
    if HAS_DW:
        delta += _alpha_dalpha_rowsum(W, Q, DW, rows, dw_tile, s_wl, in_t, ar_l, m_r, inv_l, L, BLOCK_T, BLOCK_L)
    tl.store(DELTA + rows, delta, mask=in_t)

    k_tile = ar_l[:, None] * s_kl + ar_d[None, :] * s_kd  # (BL, BD)
    v_tile = ar_l[:, None] * s_vl + ar_d[None, :] * s_vd
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for l0 in tl.range(b * 0, L, BLOCK_L, num_stages=NUM_STAGES):  # int64 l0
        in_l = ar_l < L - l0
        valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)
        k = tl.load(K + b * s_kb + l0 * s_kl + k_tile, mask=in_l[:, None] & in_d[None, :], other=0.0).to(DOT_T)
        e = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BT, BL)
        alpha = tl.where(valid[None, :], tl.exp(e - m_r[:, None]) * inv_l[:, None], 0.0)
        g = tl.zeros([BLOCK_T, BLOCK_L], tl.float32)
        if HAS_DW:
            g += tl.load(DW + l0 * s_wl + dw_tile, mask=in_t[:, None] & in_l[None, :], other=0.0).to(tl.float32)
        if HAS_DCTX:
            if SHARED_KV:
                v = k
            else:
                v = tl.load(V + b * s_vb + l0 * s_vl + v_tile, mask=in_l[:, None] & in_dv[None, :],
                            other=0.0).to(DOT_T)
            g += tl.dot(dc, tl.trans(v), input_precision="ieee")
        de = alpha * (g - delta[:, None])  # (BT, BL)
        dq += tl.dot(de.to(RND_T).to(DOT_T), k, input_precision="ieee")
    tl.store(DQ + rows[:, None] * D + ar_d[None, :], dq.to(DQ.dtype.element_ty), mask=in_t[:, None] & in_d[None, :])


@triton.jit
def _attn_bwd_kv_tiled_kernel(
    Q, K, V, MASK, LSE, DELTA, DCTX, DW, DK, DVAL,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    MASK_MODE: tl.constexpr, SHARED_KV: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    DOT_T: tl.constexpr, RND_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B, cdiv(L, BLOCK_L)). dH (B, L, D) and dV (B, L, DV), reduced over T in registers.

    Works on transposed tiles (BL, BT) so that dH = dE^T @ Q needs no transpose of the big tile.
    """
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1).to(tl.int64) * BLOCK_L
    ar_t = tl.arange(0, BLOCK_T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_l = ar_l < L - l0
    in_d = ar_d < D
    in_dv = ar_d < DV
    valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)  # (BL,)
    k = tl.load(K + b * s_kb + l0 * s_kl + ar_l[:, None] * s_kl + ar_d[None, :] * s_kd,
                mask=in_l[:, None] & in_d[None, :], other=0.0).to(DOT_T)  # (BL, BD)
    if HAS_DCTX:
        if SHARED_KV:
            v = k
        else:
            v = tl.load(V + b * s_vb + l0 * s_vl + ar_l[:, None] * s_vl + ar_d[None, :] * s_vd,
                        mask=in_l[:, None] & in_dv[None, :], other=0.0).to(DOT_T)
    q_tile = ar_t[:, None] * s_qt + ar_d[None, :] * s_qd  # (BT, BD)
    dc_tile = ar_t[:, None] * s_ct + ar_d[None, :] * s_cd
    dwT_tile = ar_l[:, None] * s_wl + ar_t[None, :] * s_wt  # (BL, BT): dW read transposed
    dk = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for t0 in tl.range(b * 0, T, BLOCK_T, num_stages=NUM_STAGES):  # int64 t0
        in_t = ar_t < T - t0
        rows = b * T + t0 + ar_t
        q = tl.load(Q + b * s_qb + t0 * s_qt + q_tile, mask=in_t[:, None] & in_d[None, :], other=0.0).to(DOT_T)
        m_r, inv_l = _load_row_stats(LSE, rows, in_t)  # also 0 for t >= T
        delta = tl.load(DELTA + rows, mask=in_t, other=0.0)
        eT = tl.dot(k, tl.trans(q), input_precision="ieee")  # (BL, BT)
        aT = tl.where(valid[:, None] & in_t[None, :], tl.exp(eT - m_r[None, :]) * inv_l[None, :], 0.0)
        gT = tl.zeros([BLOCK_L, BLOCK_T], tl.float32)
        if HAS_DW:
            gT += tl.load(DW + b * s_wb + l0 * s_wl + t0 * s_wt + dwT_tile,
                          mask=in_l[:, None] & in_t[None, :], other=0.0).to(tl.float32)
        if HAS_DCTX:
            dc = tl.load(DCTX + b * s_cb + t0 * s_ct + dc_tile, mask=in_t[:, None] & in_dv[None, :],
                         other=0.0).to(DOT_T)  # (BT, BD)
            # g = dc @ V^T in the orientation of the dq kernel (bit-identical g there and here)
            gT += tl.trans(tl.dot(dc, tl.trans(v), input_precision="ieee"))
            a_dc = tl.dot(aT.to(RND_T).to(DOT_T), dc, input_precision="ieee")  # (BL, BD)
            if SHARED_KV:
                dk += a_dc
            else:
                dv += a_dc
        deT = aT * (gT - delta[None, :])  # (BL, BT)
        dk += tl.dot(deT.to(RND_T).to(DOT_T), q, input_precision="ieee")
    tl.store(DK + (b * L + l0) * D + ar_l[:, None] * D + ar_d[None, :], dk.to(DK.dtype.element_ty),
             mask=in_l[:, None] & in_d[None, :])
    if not SHARED_KV:
        tl.store(DVAL + (b * L + l0) * DV + ar_l[:, None] * DV + ar_d[None, :], dv.to(DVAL.dtype.element_ty),
                 mask=in_l[:, None] & in_dv[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers (called by fused_s2s.kernels.attention when use_tiled() says so)
# ----------------------------------------------------------------------------------------------

def _block_l(cfg_bl: int, block_l: int | None) -> int:
    """The tile's BLOCK_L, or the caller's override raised to tl.dot's minimum of 16."""
    return cfg_bl if block_l is None else max(16, next_power_of_2(int(block_l)))


def _tiled_inputs(query, keys, values, mask, bt: int, bl: int, bd: int):
    """(query, keys, v, mask) made tile-safe for BLOCK_T=bt, BLOCK_L=bl, feature tile bd; v = keys
    when values is None. Shared by the tiled and the wide (chunked) launchers."""
    query = _tile_safe(query, bt, bd)
    keys, values = _tile_safe(keys, bl, bd), _tile_safe(values, bl, bd)
    if mask is not None and mask.dim() == 2:
        mask = _tile_safe(mask, bl)
    return query, keys, keys if values is None else values, mask


def _tiled_bwd_setup(query, keys, values, mask, ctx, weights, dctx, dweights, bt: int, bl: int, bd: int):
    """Inputs and outputs of the tiled / wide backward launchers:
    (query, keys, v, mask, dc, dw, dq, dk, dv, delta). A missing incoming gradient is replaced by
    its forward output as a placeholder pointer (HAS_DCTX / HAS_DW tell the kernels to skip it);
    dv is None when values is None (dk then takes both contributions)."""
    B, T, D = query.shape
    L = keys.shape[1]
    Dv = (keys if values is None else values).shape[2]
    dev, dtype = query.device, query.dtype
    query, keys, v, mask = _tiled_inputs(query, keys, values, mask, bt, bl, bd)
    dctx, dweights = _tile_safe(dctx, bt, bd), _tile_safe(dweights, bt, bl)
    dq = torch.empty(B, T, D, device=dev, dtype=dtype)
    dk = torch.empty(B, L, D, device=dev, dtype=dtype)
    dv = None if values is None else torch.empty(B, L, Dv, device=dev, dtype=dtype)  # all written (0 without dc)
    delta = torch.empty(B * T, device=dev, dtype=torch.float32)
    dc = ctx if dctx is None else dctx
    dw = weights if dweights is None else dweights
    return query, keys, v, mask, dc, dw, dq, dk, dv, delta


def attention_forward_tiled(query, keys, values, mask, *, block_l=None, for_backward=False, num_stages=None):
    """As ``attention_forward`` (same outputs, (m, l) stats, ctx_acc, scores_acc) for fp16/bf16, tiled over T."""
    B, T, D = query.shape
    L = keys.shape[1]
    shared = values is None
    Dv = (keys if shared else values).shape[2]
    dev, dtype = query.device, query.dtype
    ctx = torch.empty(B, T, Dv, device=dev, dtype=dtype)
    ctx_acc, store_ctxa = ctx_acc_buffer(ctx, for_backward)
    weights = torch.empty(B, T, L, device=dev, dtype=dtype)
    lse = torch.empty(B * T, 2, device=dev, dtype=torch.float32)  # (m, l) per row
    if B * T == 0:
        return ctx, weights, lse, ctx_acc, weights
    cfg = tiled_config(D, Dv, dtype, "fwd")
    if cfg is None:
        from fused_s2s.kernels import attention_tiled_wide as _wide

        return _wide.attention_forward_wide(query, keys, values, mask, _WIDE_CONFIGS["fwd"], block_l=block_l,
                                            for_backward=for_backward)
    bt, bl, block_d, nw = cfg
    bl = _block_l(bl, block_l)
    query, keys, v, mask = _tiled_inputs(query, keys, values, mask, bt, bl, block_d)
    # Raw fp32 scores: in place in the weights for fp32 inputs, else an fp32 scratch.
    scores = weights if dtype == torch.float32 else torch.empty(B, T, L, device=dev, dtype=torch.float32)
    m_ptr, mode, s_mb, s_ml = _mask_args(mask, query)
    dot_t, rnd_t = _dot_types(query)
    direct(_attn_fwd_tiled_kernel)[(B, cdiv(T, bt))](
        query, keys, v, m_ptr, ctx, ctx_acc, weights, scores, lse,
        T, L, D, Dv,
        *query.stride(), *keys.stride(), *v.stride(), s_mb, s_ml,
        MASK_MODE=mode, SHARED_KV=shared, STORE_CTXA=store_ctxa, DOT_T=dot_t, RND_T=rnd_t,
        BLOCK_T=bt, BLOCK_L=bl, BLOCK_D=block_d, NUM_STAGES=stages(num_stages, _TILED_STAGES), num_warps=nw,
        enable_fp_fusion=True,
    )
    return ctx, weights, lse, ctx_acc, scores if store_ctxa else weights


def attention_backward_tiled(query, keys, values, mask, ctx, weights, lse, dctx, dweights, *, block_l=None,
                             num_stages=None):
    """As ``attention_backward`` (at least one of dctx / dweights is given), tiled over T and L."""
    B, T, D = query.shape
    L = keys.shape[1]
    shared = values is None
    Dv = (keys if shared else values).shape[2]
    dtype = query.dtype
    has_dc, has_dw = dctx is not None, dweights is not None
    cfg = tiled_config(D, Dv, dtype, "bwd")
    if cfg is None:
        from fused_s2s.kernels import attention_tiled_wide as _wide

        return _wide.attention_backward_wide(query, keys, values, mask, ctx, weights, lse, dctx, dweights,
                                             _WIDE_CONFIGS["bwd"], block_l=block_l)
    bt, bl, block_d, nw = cfg
    bl = _block_l(bl, block_l)
    query, keys, v, mask, dc, dw, dq, dk, dv, delta = _tiled_bwd_setup(
        query, keys, values, mask, ctx, weights, dctx, dweights, bt, bl, block_d)
    m_ptr, mode, s_mb, s_ml = _mask_args(mask, query)
    dot_t, rnd_t = _dot_types(query)
    common = dict(MASK_MODE=mode, SHARED_KV=shared, HAS_DCTX=has_dc, HAS_DW=has_dw, DOT_T=dot_t, RND_T=rnd_t,
                  BLOCK_D=block_d, NUM_STAGES=stages(num_stages, _TILED_STAGES))
    strides = (*query.stride(), *keys.stride(), *v.stride(), s_mb, s_ml, *dc.stride(), *dw.stride())
    direct(_attn_bwd_dq_tiled_kernel)[(B, cdiv(T, bt))](
        query, keys, v, m_ptr, ctx, weights, lse, dc, dw, dq, delta, T, L, D, Dv, *strides,
        BLOCK_T=bt, BLOCK_L=bl, num_warps=nw, enable_fp_fusion=True, **common,
    )
    dv_ptr = dk if dv is None else dv
    direct(_attn_bwd_kv_tiled_kernel)[(B, cdiv(L, bl))](
        query, keys, v, m_ptr, lse, delta, dc, dw, dk, dv_ptr, T, L, D, Dv, *strides,
        BLOCK_T=bt, BLOCK_L=bl, num_warps=nw, enable_fp_fusion=True, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (part of ``python -m fused_s2s.aot attention``)
# ----------------------------------------------------------------------------------------------

def aot_configs():
    """Every (dtype, BLOCK_D) tile config of the three tiled kernels, with GPU operand types (DOT_T =
    the input dtype). Innermost strides are the constant 1 (triton's JIT specialisation); mask form
    and SHARED_KV rotate over the configs (separate V, the larger footprint, for most)."""
    from fused_s2s.aot import AOTConfig

    i32, cx = "i32", "constexpr"
    names = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    i = 0
    for dtype, ty in names.items():
        tdt = _TL[dtype]
        for block_d in _TILED_CONFIGS["fwd"]:
            mask_ty, mode = _AOT_MASKS[i % len(_AOT_MASKS)]
            shared = i % 5 == 4
            i += 1
            p, a = f"*{ty}", "*fp32"
            sizes = dict(T=i32, L=i32, D=i32, DV=i32)
            strides = dict(s_qb=i32, s_qt=i32, s_qd=cx, s_kb=i32, s_kl=i32, s_kd=cx, s_vb=i32, s_vl=i32, s_vd=cx,
                           s_mb=i32, s_ml=cx)
            gstrides = dict(s_cb=i32, s_ct=i32, s_cd=cx, s_wb=i32, s_wt=i32, s_wl=cx)
            unit = dict(s_qd=1, s_kd=1, s_vd=1, s_ml=1)
            flags = dict(MASK_MODE=mode, SHARED_KV=shared, DOT_T=tdt, RND_T=tdt, BLOCK_D=block_d,
                         NUM_STAGES=_TILED_STAGES)
            tag = f"{ty} BD={block_d} mask={mode} kv={int(shared)}"

            bt, bl, nw = _TILED_CONFIGS["fwd"][block_d]
            sig = dict(Q=p, K=p, V=p, MASK=mask_ty, CTX=p, CTXA=a, W=p, S=a, LSE=a, **sizes, **strides, MASK_MODE=cx,
                       SHARED_KV=cx, STORE_CTXA=cx, DOT_T=cx, RND_T=cx, BLOCK_T=cx, BLOCK_L=cx, BLOCK_D=cx,
                       NUM_STAGES=cx)
            yield AOTConfig(_attn_fwd_tiled_kernel, sig,
                            dict(unit, BLOCK_T=bt, BLOCK_L=bl, STORE_CTXA=True, **flags), num_warps=nw,
                            label=f"fwd_tiled {tag} BT={bt} BL={bl}")

            bt, bl, nw = _TILED_CONFIGS["bwd"][block_d]
            c = dict(unit, s_cd=1, s_wl=1, HAS_DCTX=True, HAS_DW=True, BLOCK_T=bt, BLOCK_L=bl, **flags)
            bwd = dict(MASK_MODE=cx, SHARED_KV=cx, HAS_DCTX=cx, HAS_DW=cx, DOT_T=cx, RND_T=cx, BLOCK_T=cx,
                       BLOCK_L=cx, BLOCK_D=cx, NUM_STAGES=cx)
            sig = dict(Q=p, K=p, V=p, MASK=mask_ty, CTX=a, W=a, LSE=a, DCTX=p, DW=p, DQ=p, DELTA=a, **sizes,
                       **strides, **gstrides, **bwd)
            yield AOTConfig(_attn_bwd_dq_tiled_kernel, sig, c, num_warps=nw,
                            label=f"bwd_dq_tiled {tag} BT={bt} BL={bl}")
            sig = dict(Q=p, K=p, V=p, MASK=mask_ty, LSE=a, DELTA=a, DCTX=p, DW=p, DK=p, DVAL=p, **sizes, **strides,
                       **gstrides, **bwd)
            yield AOTConfig(_attn_bwd_kv_tiled_kernel, sig, c, num_warps=nw,
                            label=f"bwd_kv_tiled {tag} BT={bt} BL={bl}")
    from fused_s2s.kernels import attention_tiled_wide as _wide

    yield from _wide.aot_configs(_WIDE_CONFIGS)
