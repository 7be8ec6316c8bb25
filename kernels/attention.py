"""Fused Luong attention step: score -> masked softmax -> context (SPEC section 1 steps 3-5).

Kernels and plain launchers only (the autograd wrapper is ``fused_s2s.attention``). Notation: one
"row" is one query, (b, t) flattened to ``row = b * T + t``; q = s_t W_a (D,), H = keys (L, D),
values (L, Dv) (H itself when ``values`` is None), mask m_j in {0, 1}.

Forward, per row::

    E_j     = q . H_j                      (masked: E_j = -inf)
    m       = max_j E_j,  l = sum_j exp(E_j - m)      (log-sum-exp lse = m + log l)
    alpha_j = exp(E_j - m) / l             (0 where masked; all 0 for an empty row, l = 0)
    c       = sum_j alpha_j V_j            (0 for an empty row)

One pass over L in blocks of BLOCK_L with an online softmax (running max m, running sum l and an
unnormalised context rescaled by exp(m_old - m_new)). The raw scores of the pass go into a row
buffer (the weights output itself for fp32/fp64, an fp32 scratch for fp16/bf16 so that the
normalisation does not round E to 8 bits of mantissa); once (m, l) are known the same program
normalises them into the weights: reading 4L bytes back is cheap next to the L*D of H.
The per-row statistic saved for the backward is the log-sum-exp kept in two parts, (m, l), not
lse = m + log l in one float: a rounded fp32 lse is off by up to ulp(|lse|)/2 (5e-7 at |lse| ~ 8),
so exp(E - lse) would sum to 1 +- that for the whole row, an error the backward's
alpha * (g - delta) amplifies (measured: 7x eager's dq error); exp(E - m) / l is exact to a few eps.

Split-L (flash-decoding): when B*T rows are too few to fill the GPU, grid axis 1 splits L into
chunks; each writes a partial (m, l, unnormalised context) and ``_attn_combine_kernel`` merges them:
M = max_s m_s, l = sum_s l_s exp(m_s - M), c = sum_s acc_s exp(m_s - M) / l. It runs on the same
(B*T, splits) grid: every program merges the (m, l) partials and normalises its own chunk of the
row's weights, and split 0 also writes c and (m, l). (Until session 8 one program per row did
all of L, BLOCK_L at a time: at B 8, L 4096 that is 8 programs of 256 dependent steps each, which
may be most of the H200's 0.115 ms forward there, unmeasured.) The weights are normalised _BLOCK_W
positions at a time, whatever BLOCK_L the score loop used.

Backward, per row, given dc (Dv,) and dalpha (L,) (either may be absent)::

    g_j    = dalpha_j + dc . V_j
    delta  = sum_j w_j g_j / sum_j w_j             fp32 / fp64: a first pass over V (exact, as eager)
           = sum_j alpha_j dalpha_j + dc . c       fp16 / bf16: the saved c and weights, in fp32
    dE_j   = alpha_j (g_j - delta)
    dq     = sum_j dE_j H_j
    dH_j  += sum_t dE_j q          dV_j += sum_t alpha_j dc           (summed over the T queries)

alpha is never recomputed from q.H_j: the backward reads it from what the forward saved, the
weights themselves (fp32 / fp64) or, for fp16/bf16, exp(S_j - m) / l from the forward's fp32 raw
scores S. A recomputed score differs from the forward's by a few ulps of |E| on a GPU (another
reduction order in another kernel; tl.exp is ex2.approx there), so dE_j = alpha_j (g_j - delta)
would no longer sum to ~0 over j, and a peaked row's dq = sum_j dE_j (H_j - H_k) cancels down to
where those ulps show (H200, recomputed: fp32 split-L peaked rows 6 of 48 over the 4x rule, worst
10x; 2 of 22 fuzz cases, fp32 T = 17). It also saves the score's D multiply-adds per position.
delta takes c and alpha in the accumulation dtype: for
fp16/bf16 the forward keeps an fp32 copy of c (``ctx_acc``, (B, T, Dv)) and its fp32 raw-score
scratch (``scores_acc``, alpha_j = exp(E_j - m) / l in the prologue). On a peaked row (alpha_k ~ 1)
g_k - delta is ~(1 - alpha_k) (g_k - g_other), small, and a c or an alpha_k rounded to 16 bits would
put an error of eps16 |dc| |c| or eps16 |dalpha_k| into it (measured before: fp16 dquery 30x
eager's error with a flipped sign; bf16 dkeys 400x where alpha_k = 1 - 1e-6 was stored as
1 - 2^-8 by the interpreter's truncating fp32 -> bf16 cast; round-to-nearest halves that error,
no more). With fp32 / fp64 inputs no copy is more precise than the outputs, and the rounding that
matters is g_k's own: eager's sum_j alpha_j g_j holds the same rounded g_k as g_k - delta, so it
cancels; dc . c does not (up to 6x the 4x rule's bound on peaked rows, measured). So there the row
kernel first sums w_j g_j over the row's V with the saved weights, g_j formed by the dq loop's own
``_g_block`` (DELTA_MODE 1); split-L sums ``_attn_bwd_delta_kernel``'s per-chunk partials (mode 2).
It divides by sum_j w_j, which is 1 up to rounding, and so does alpha (alpha_j = w_j / sum w): the
stored weights of a row sum to 1 +- a few ulps (on a GPU ``tl.exp`` is ``ex2.approx``; split-L
rescales partial sums), and 1 - alpha_k would amplify that error in g_k - delta.
One more read of V per backward: +50 % traffic at T == 1 with V = H. For T == 1 the row kernel
writes dH, dV directly; for T > 1 the row kernel computes dq (and delta) and ``_attn_bwd_kv_kernel``
owns an L block of one batch and loops over its T queries, so dH, dV are reduced without atomics
(deterministic).

With T >= 16 queries per batch row the launchers hand over to ``fused_s2s.kernels.attention_tiled``
(tl.dot tiles of BLOCK_T queries x BLOCK_L keys, same outputs and (m, l) statistics); the kernels
here remain the T == 1 (decode step), fp64 and large-D path.

The main loops over L (forward, backward dq/dH, the exact delta's pass) are ``for`` loops over
``tl.range(..., num_stages=NUM_STAGES)`` (session 10; ``while`` loops before, which Triton never
software-pipelines); ``_ROW_STAGES`` below. Short helper loops stay ``while`` loops. Batch, row and block
starts are int64 (tensors past 2^31 elements), offsets inside a tile int32 (see ``_tile_safe``).
Loads are cast to ACC (fp32, or fp64 for gradcheck); stores cast to the output dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

import fused_s2s.aot
from fused_s2s.kernels._launch import aligned16, cdiv, direct, next_power_of_2, num_sms, on_tensor_device, stages

# Register budget: elements of one fp32 (BLOCK_L, BLOCK_D) tile per warp. The forward holds two
# tiles (H and V) and their addresses; the backward kernels also build dH/dV tiles, so they take
# half. Sized with the AOT tool (no spills, < 255 registers up to D = 1024) while leaving room
# for 2+ resident programs per SM: these kernels are bandwidth-bound. The dH/dV kernel (T > 1)
# holds its dH and dV accumulators across the loop over T: 128 (256 spilled 8 bytes at BLOCK_D 128,
# 16-bit, V = H, sm_80, once alpha came from the saved scores; session 7).
_TILE_PER_WARP = {"fwd": 512, "bwd_row": 256, "bwd_kv": 128}
_MIN_BLOCK_D = 16
_MAX_BLOCK_L = 64
_MIN_BLOCKS_PER_SPLIT = 4
# Software pipelining of the per-row kernels' loops over L (``tl.range(num_stages=)``: the next tiles
# of H / V in flight through shared memory while this one computes). 1 = none: the block configs
# above were measured without it (session 7, when the loops were ``while`` loops, which Triton never
# pipelines); ``benchmarks/sweep_attention.py`` times 2 and 3 next to it, and decides.
_ROW_STAGES = 1
# positions per step of the weights' normalisation (a vector op per step: wide, so that few steps
# are latency-bound, whatever BLOCK_L the score loop used)
_BLOCK_W = tl.constexpr(128)


@triton.jit
def _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE: tl.constexpr):
    """(BLOCK_L,) attend-flags of positions l0 + ar_l of batch b. MASK_MODE 0: none, 1: lengths (B,), 2: bool (B, L)."""
    if MASK_MODE == 1:
        n = tl.load(MASK + b * s_mb).to(tl.int64)
        valid = in_l & (l0 + ar_l < n)
    elif MASK_MODE == 2:
        mv = tl.load(MASK + b * s_mb + l0 * s_ml + ar_l * s_ml, mask=in_l, other=0)
        valid = in_l & (mv != 0)
    else:
        valid = in_l
    return valid


@triton.jit
def _row_program(T):
    """The per-row kernels' grid (B*T, splits): row = b * T + t (int64), its split sp, b and t."""
    row = tl.program_id(0).to(tl.int64)
    return row, tl.program_id(1).to(tl.int64), row // T, row % T


@triton.jit
def _load_dc(DCTX, b, t, s_cb, s_ct, s_cd, ar_d, in_dv, HAS_DCTX: tl.constexpr, ACC: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """The incoming gradient dc (BLOCK_D,) of query (b, t) in ACC; zeros when ctx got none."""
    dc = tl.zeros([BLOCK_D], ACC)
    if HAS_DCTX:
        dc = tl.load(DCTX + b * s_cb + t * s_ct + ar_d * s_cd, mask=in_dv, other=0.0).to(ACC)
    return dc


@triton.jit
def _saved_alpha(W, Q, offs, msk, m, inv_l, ACC: tl.constexpr):
    """alpha from what the forward saved for the backward at W + offs: the weights output itself
    (W in Q's dtype), or with 16-bit inputs the fp32 raw scores (scores_acc): exp(E - m) / l."""
    if W.dtype.element_ty == Q.dtype.element_ty:
        a = tl.load(W + offs, mask=msk, other=0.0).to(ACC)
    else:
        a = tl.exp(tl.load(W + offs, mask=msk, other=float("-inf")).to(ACC) - m) * inv_l
    return a


@triton.jit
def _final_stats(m_i, l_i):
    """(m_use, 1 / l) of a row's final (m, l): m = -inf (nothing attended) -> 0, l = 0 -> 1 / l = 0."""
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    return m_use, tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)


@triton.jit
def _store_ctx_stats(CTX, CTXA, LSE, row, m_use, l_i, inv_l, acc, offs_d, DV, STORE_CTXA: tl.constexpr):
    """c = acc / l; save (m, l), i.e. lse = m + log l in two parts.

    STORE_CTXA (16-bit outputs that need a backward): c also in ACC to CTXA, for the backward's delta."""
    ctx = acc * inv_l  # acc is 0 when l is 0
    tl.store(CTX + row * DV + offs_d, ctx.to(CTX.dtype.element_ty), mask=offs_d < DV)
    if STORE_CTXA:
        tl.store(CTXA + row * DV + offs_d, ctx, mask=offs_d < DV)
    tl.store(LSE + 2 * row, m_use)
    tl.store(LSE + 2 * row + 1, l_i)


@triton.jit
def _normalize_weights(W, S, row, l0, l_end, L, m_use, inv_l, ACC: tl.constexpr):
    """weights_j = exp(E_j - m) / l for positions [l0, l_end) of a row, E the raw scores in S (0 for
    an empty row: 1 / l = 0)."""
    ar_w = tl.arange(0, _BLOCK_W)
    while l0 < l_end:
        in_w = ar_w < l_end - l0
        e = tl.load(S + row * L + l0 + ar_w, mask=in_w, other=float("-inf")).to(ACC)
        tl.store(W + row * L + l0 + ar_w, (tl.exp(e - m_use) * inv_l).to(W.dtype.element_ty), mask=in_w)
        l0 += _BLOCK_W


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, CTX, CTXA, W, S, LSE, PM, PL, PACC,
    T, L, D, DV, BLOCKS_PER_SPLIT,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd, s_mb, s_ml,
    MASK_MODE: tl.constexpr, SHARED_KV: tl.constexpr, FINALIZE: tl.constexpr, STORE_CTXA: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B*T, splits). E = q.H_j, online softmax, c = sum alpha_j V_j; see the module docstring.

    FINALIZE (splits == 1): write c, lse and the normalised weights. Otherwise write the partial
    (m, l, acc) of this split to PM/PL (rows, splits) and PACC (rows, splits, DV).
    """
    row, sp, b, t = _row_program(T)
    nsplit = tl.num_programs(1)
    # int64 scalar bases (row, batch, block start); int32 offsets inside a tile (the launcher makes a
    # tensor contiguous in the rare case a tile's span would not fit in int32).
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_d = ar_d < D
    in_dv = ar_d < DV
    q = tl.load(Q + b * s_qb + t * s_qt + ar_d * s_qd, mask=in_d, other=0.0).to(ACC)  # (BLOCK_D,)
    k_tile = ar_l[:, None] * s_kl + ar_d[None, :] * s_kd  # (BLOCK_L, BLOCK_D)
    v_tile = ar_l[:, None] * s_vl + ar_d[None, :] * s_vd

    m_i = tl.full([], float("-inf"), ACC)
    l_i = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    l_start = sp * BLOCKS_PER_SPLIT * BLOCK_L
    l_end = tl.minimum(l_start + BLOCKS_PER_SPLIT * BLOCK_L, L)
    for l0 in tl.range(l_start, l_end, BLOCK_L, num_stages=NUM_STAGES):  # int64 l0 (l_start is)
        in_l = ar_l < L - l0
        valid = _mask_valid(MASK, b, l0, ar_l, in_l, s_mb, s_ml, MASK_MODE)
        k = tl.load(K + b * s_kb + l0 * s_kl + k_tile,
                    mask=in_l[:, None] & in_d[None, :], other=0.0).to(ACC)  # (BLOCK_L, BLOCK_D)
        e = tl.sum(k * q[None, :], axis=1)  # (BLOCK_L,)
        e = tl.where(valid, e, float("-inf"))
        tl.store(S + row * L + l0 + ar_l, e.to(S.dtype.element_ty), mask=in_l)
        m_new = tl.maximum(m_i, tl.max(e, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
        p = tl.exp(e - m_use)
        corr = tl.exp(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=0)
        if SHARED_KV:
            v = k  # H read once for the score and the context
        else:
            v = tl.load(V + b * s_vb + l0 * s_vl + v_tile,
                        mask=in_l[:, None] & in_dv[None, :], other=0.0).to(ACC)
        acc = acc * corr + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new

    if FINALIZE:
        m_use, inv_l = _final_stats(m_i, l_i)
        _store_ctx_stats(CTX, CTXA, LSE, row, m_use, l_i, inv_l, acc, ar_d, DV, STORE_CTXA)
        # The raw scores were written by other threads of this program (another layout): make them visible.
        tl.debug_barrier()
        _normalize_weights(W, S, row, row * 0, L, L, m_use, inv_l, ACC)
    else:
        # m = -inf for a chunk with nothing to attend to (then l = 0 and acc = 0 too).
        tl.store(PM + row * nsplit + sp, m_i)
        tl.store(PL + row * nsplit + sp, l_i)
        tl.store(PACC + (row * nsplit + sp) * DV + ar_d, acc, mask=in_dv)


@triton.jit
def _attn_combine_kernel(CTX, CTXA, W, S, LSE, PM, PL, PACC, L, DV, BLOCKS_PER_SPLIT, STORE_CTXA: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B*T, splits), the forward's. Every program merges the row's split (m, l) partials
    (flash-decoding) and normalises the weights of its own L chunk; split 0 also merges the context
    partials and stores c and (m, l). All programs of a row merge in the same order: the same m, l."""
    row = tl.program_id(0).to(tl.int64)
    sp_own = tl.program_id(1).to(tl.int64)
    nsplit = tl.num_programs(1)
    ar_d = tl.arange(0, BLOCK_D)
    in_dv = ar_d < DV
    # A chunk with nothing to attend to stored m = -inf, l = 0, acc = 0: its scale is exp(-inf) = 0.
    m_i = tl.full([], float("-inf"), ACC)
    sp = row * 0
    while sp < nsplit:
        m_i = tl.maximum(m_i, tl.load(PM + row * nsplit + sp).to(ACC))
        sp += 1
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros([], ACC)
    sp = row * 0
    while sp < nsplit:
        l_i += tl.exp(tl.load(PM + row * nsplit + sp).to(ACC) - m_use) * tl.load(PL + row * nsplit + sp).to(ACC)
        sp += 1
    inv_l = _final_stats(m_i, l_i)[1]
    if sp_own == 0:
        acc = tl.zeros([BLOCK_D], ACC)
        sp = row * 0
        while sp < nsplit:
            scale = tl.exp(tl.load(PM + row * nsplit + sp).to(ACC) - m_use)
            acc += scale * tl.load(PACC + (row * nsplit + sp) * DV + ar_d, mask=in_dv, other=0.0).to(ACC)
            sp += 1
        _store_ctx_stats(CTX, CTXA, LSE, row, m_use, l_i, inv_l, acc, ar_d, DV, STORE_CTXA)
    l0 = sp_own * BLOCKS_PER_SPLIT * BLOCK_L
    _normalize_weights(W, S, row, l0, tl.minimum(l0 + BLOCKS_PER_SPLIT * BLOCK_L, L), L, m_use, inv_l, ACC)


@triton.jit
def _g_block(v, dc, DW, dw_off, in_l, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr, ACC: tl.constexpr,
             BLOCK_L: tl.constexpr):
    """g_j = dalpha_j + dc . V_j for a (BLOCK_L,) block, v the loaded (BLOCK_L, BLOCK_D) tile of V.
    The one expression of both exact-delta passes: delta = sum_j alpha_j g_j then holds the same
    rounded g_j as dE_j = alpha_j (g_j - delta), so their rounding cancels as in eager."""
    g = tl.zeros([BLOCK_L], ACC)
    if HAS_DW:
        g += tl.load(DW + dw_off, mask=in_l, other=0.0).to(ACC)
    if HAS_DCTX:
        g += tl.sum(v * dc[None, :], axis=1)
    return g


@triton.jit
def _delta_exact(W, V, DW, dc, row, b, t, l_start, l_end, L, s_vb, s_vl, s_vd, s_wb, s_wt, s_wl, ar_l, ar_d, in_dv,
                 HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    """(sum_j w_j g_j, sum_j w_j) over positions [l0, l_end) of a row (a multiple of BLOCK_L long, or
    ending at L): w the saved weights (in ACC: fp32 / fp64 inputs), g as the dq loop forms it
    (_g_block). The caller divides: delta is the w-weighted mean of g (module docstring)."""
    delta = tl.zeros([], ACC)
    wsum = tl.zeros([], ACC)
    v_tile = ar_l[:, None] * s_vl + ar_d[None, :] * s_vd
    for l0 in tl.range(l_start, l_end, BLOCK_L, num_stages=NUM_STAGES):
        in_l = ar_l < L - l0
        w = tl.load(W + row * L + l0 + ar_l, mask=in_l, other=0.0).to(ACC)
        v = tl.zeros([BLOCK_L, 1], ACC)
        if HAS_DCTX:
            v = tl.load(V + b * s_vb + l0 * s_vl + v_tile, mask=in_l[:, None] & in_dv[None, :], other=0.0).to(ACC)
        g = _g_block(v, dc, DW, b * s_wb + t * s_wt + l0 * s_wl + ar_l * s_wl, in_l, HAS_DCTX, HAS_DW, ACC, BLOCK_L)
        delta += tl.sum(w * g, axis=0)
        wsum += tl.sum(w, axis=0)
    return delta, wsum


@triton.jit
def _row_stats(LSE, row, ACC: tl.constexpr):
    """The forward's saved (m, l) of a row as (m, 1 / l), 1 / l = 0 for a row with nothing to attend to."""
    m = tl.load(LSE + 2 * row).to(ACC)
    l_row = tl.load(LSE + 2 * row + 1).to(ACC)
    return m, tl.where(l_row > 0, 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)


@triton.jit
def _alpha_dalpha(W, Q, DW, row, b, t, l0, l_end, L, s_wb, s_wt, s_wl, ar_l, m, inv_l, ACC: tl.constexpr,
                  BLOCK_L: tl.constexpr):
    """sum_j alpha_j dalpha_j over positions [l0, l_end) of a row, alpha as the forward saved it."""
    acc = tl.zeros([], ACC)
    while l0 < l_end:
        in_l = ar_l < L - l0
        a = _saved_alpha(W, Q, row * L + l0 + ar_l, in_l, m, inv_l, ACC)
        dwj = tl.load(DW + b * s_wb + t * s_wt + l0 * s_wl + ar_l * s_wl, mask=in_l, other=0.0).to(ACC)
        acc += tl.sum(a * dwj, axis=0)
        l0 += BLOCK_L
    return acc


@triton.jit
def _split_sums(DPART, row, ACC: tl.constexpr):
    """The two DPART (B*T, splits, 2) partials of a row summed over its splits, in a fixed order
    (deterministic)."""
    num = tl.zeros([], ACC)
    den = tl.zeros([], ACC)
    s = row * 0
    while s < tl.num_programs(1):
        num += tl.load(DPART + 2 * (row * tl.num_programs(1) + s))
        den += tl.load(DPART + 2 * (row * tl.num_programs(1) + s) + 1)
        s += 1
    return num, den


@triton.jit
def _weighted_mean(num, den):
    """num / den, 0 for a row with no weight (fully masked)."""
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _attn_bwd_delta_kernel(
    Q, W, LSE, V, DCTX, DW, DPART,
    T, L, DV, BLOCKS_PER_SPLIT,
    s_vb, s_vl, s_vd, s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr, DELTA_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B*T, splits). The split-L partials of delta, DPART (B*T, splits, 2), over each
    program's L chunk (the row kernel's chunks and tiles). DELTA_MODE 2 (the exact delta): sum_j w_j g_j
    and sum_j w_j (the same g_j as the row kernel's). 3 (delta from the saved context, with a
    weights gradient): sum_j alpha_j dalpha_j and 0, alpha as the row kernel reads it, so that no
    split program loops over the whole row for it (the row kernel adds dc . c)."""
    row, sp, b, t = _row_program(T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_dv = ar_d < DV
    l0 = sp * BLOCKS_PER_SPLIT * BLOCK_L
    l_end = tl.minimum(l0 + BLOCKS_PER_SPLIT * BLOCK_L, L)
    if DELTA_MODE == 2:
        dc = _load_dc(DCTX, b, t, s_cb, s_ct, s_cd, ar_d, in_dv, HAS_DCTX, ACC, BLOCK_D)
        part, wsum = _delta_exact(W, V, DW, dc, row, b, t, l0, l_end, L, s_vb, s_vl, s_vd, s_wb, s_wt, s_wl, ar_l,
                                  ar_d, in_dv, HAS_DCTX, HAS_DW, ACC, BLOCK_L, NUM_STAGES)
    else:
        m_row, inv_l = _row_stats(LSE, row, ACC)
        part = _alpha_dalpha(W, Q, DW, row, b, t, l0, l_end, L, s_wb, s_wt, s_wl, ar_l, m_row, inv_l, ACC, BLOCK_L)
        wsum = tl.zeros([], ACC)
    tl.store(DPART + 2 * (row * tl.num_programs(1) + sp), part)
    tl.store(DPART + 2 * (row * tl.num_programs(1) + sp) + 1, wsum)


@triton.jit
def _attn_bwd_row_kernel(
    Q, K, V, CTX, W, LSE, DCTX, DW, DQ, DK, DVAL, DELTA, DPART,
    T, L, D, DV, BLOCKS_PER_SPLIT, NROWS,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    SHARED_KV: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    WRITE_KV: tl.constexpr, DELTA_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (B*T, splits). dq of one row over its L chunk; with WRITE_KV (T == 1) also dH, dV.

    DQ is (splits, B*T, D) in ACC (summed by the launcher) when split, else (B*T, D). DCTX / DW are
    the incoming gradients with their own strides (s_c*, s_w*); CTX, W, LSE the saved outputs.
    delta (split 0 stores it for the dH/dV kernel), DELTA_MODE: 0 from the saved context and
    weights (fp16/bf16: their fp32 copies; 2L + DV reads); 1 exact, sum_j w_j g_j / sum_j w_j by a
    first pass over the row's V (fp32/fp64, one split); 2 exact, from DPART's split partials
    (_attn_bwd_delta_kernel); 3 as 0, its sum_j alpha_j dalpha_j from DPART's split partials (split
    with a weights gradient: mode 0 would loop over the whole row in every split program).
    """
    row, sp, b, t = _row_program(T)
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_d = ar_d < D
    in_dv = ar_d < DV
    q = tl.load(Q + b * s_qb + t * s_qt + ar_d * s_qd, mask=in_d, other=0.0).to(ACC)  # (BLOCK_D,)
    m_row, inv_l = _row_stats(LSE, row, ACC)

    delta = tl.zeros([], ACC)
    a_scale = tl.full([], 1.0, ACC)  # alpha = saved alpha * a_scale: 1 / sum_j w_j for the exact delta
    dc = _load_dc(DCTX, b, t, s_cb, s_ct, s_cd, ar_d, in_dv, HAS_DCTX, ACC, BLOCK_D)  # (BLOCK_D,)
    if DELTA_MODE == 1:  # delta = sum_j w_j g_j / sum_j w_j, a pass over the row's V first
        num, den = _delta_exact(W, V, DW, dc, row, b, t, row * 0, L, L, s_vb, s_vl, s_vd, s_wb, s_wt, s_wl, ar_l,
                                ar_d, in_dv, HAS_DCTX, HAS_DW, ACC, BLOCK_L, NUM_STAGES)
        delta = _weighted_mean(num, den)
        a_scale = _weighted_mean(1.0, den)
    elif DELTA_MODE == 2:  # the same, from the split partials (fixed order: deterministic)
        num, den = _split_sums(DPART, row, ACC)
        delta = _weighted_mean(num, den)
        a_scale = _weighted_mean(1.0, den)
    else:  # delta = dc . c + sum_j alpha_j dalpha_j
        if HAS_DCTX:
            c = tl.load(CTX + row * DV + ar_d, mask=in_dv, other=0.0).to(ACC)
            delta += tl.sum(dc * c, axis=0)
        if DELTA_MODE == 3:  # sum_j alpha_j dalpha_j from the split partials
            delta += _split_sums(DPART, row, ACC)[0]
    if HAS_DW and DELTA_MODE == 0:
        delta += _alpha_dalpha(W, Q, DW, row, b, t, row * 0, L, L, s_wb, s_wt, s_wl, ar_l, m_row, inv_l, ACC, BLOCK_L)
    tl.store(DELTA + 2 * row, delta, mask=sp == 0)  # (delta, a_scale) for the dH/dV kernel
    tl.store(DELTA + 2 * row + 1, a_scale, mask=sp == 0)

    k_tile = ar_l[:, None] * s_kl + ar_d[None, :] * s_kd  # (BLOCK_L, BLOCK_D)
    v_tile = ar_l[:, None] * s_vl + ar_d[None, :] * s_vd
    dk_tile = ar_l[:, None] * D + ar_d[None, :]  # dH, dV are contiguous (B, L, D) / (B, L, DV)
    dv_tile = ar_l[:, None] * DV + ar_d[None, :]
    dq = tl.zeros([BLOCK_D], ACC)
    l_start = sp * BLOCKS_PER_SPLIT * BLOCK_L
    l_end = tl.minimum(l_start + BLOCKS_PER_SPLIT * BLOCK_L, L)
    for l0 in tl.range(l_start, l_end, BLOCK_L, num_stages=NUM_STAGES):
        in_l = ar_l < L - l0
        k = tl.load(K + b * s_kb + l0 * s_kl + k_tile,
                    mask=in_l[:, None] & in_d[None, :], other=0.0).to(ACC)  # (BLOCK_L, BLOCK_D)
        # alpha as the forward saved it, not exp(q . H_j - m) / l recomputed: see the module docstring.
        # 0 where masked: the saved weights are 0 there, the saved raw scores -inf (no mask read).
        alpha = _saved_alpha(W, Q, row * L + l0 + ar_l, in_l, m_row, inv_l, ACC) * a_scale  # (BLOCK_L,)
        v = k  # H read once for dq and g
        if HAS_DCTX and not SHARED_KV:
            v = tl.load(V + b * s_vb + l0 * s_vl + v_tile, mask=in_l[:, None] & in_dv[None, :], other=0.0).to(ACC)
        g = _g_block(v, dc, DW, b * s_wb + t * s_wt + l0 * s_wl + ar_l * s_wl, in_l, HAS_DCTX, HAS_DW, ACC, BLOCK_L)
        de = alpha * (g - delta)  # (BLOCK_L,)
        dq += tl.sum(de[:, None] * k, axis=0)
        if WRITE_KV:
            dk = de[:, None] * q[None, :]
            if SHARED_KV and HAS_DCTX:
                dk += alpha[:, None] * dc[None, :]
            tl.store(DK + (b * L + l0) * D + dk_tile, dk.to(DK.dtype.element_ty),
                     mask=in_l[:, None] & in_d[None, :])
            if not SHARED_KV and HAS_DCTX:
                dv = alpha[:, None] * dc[None, :]
                tl.store(DVAL + (b * L + l0) * DV + dv_tile, dv.to(DVAL.dtype.element_ty),
                         mask=in_l[:, None] & in_dv[None, :])
    tl.store(DQ + (sp * NROWS + row) * D + ar_d, dq.to(DQ.dtype.element_ty), mask=in_d)


@triton.jit
def _attn_bwd_kv_kernel(
    Q, K, V, W, LSE, DELTA, DCTX, DW, DK, DVAL,
    T, L, D, DV,
    s_qb, s_qt, s_qd, s_kb, s_kl, s_kd, s_vb, s_vl, s_vd,
    s_cb, s_ct, s_cd, s_wb, s_wt, s_wl,
    SHARED_KV: tl.constexpr, HAS_DCTX: tl.constexpr, HAS_DW: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B, cdiv(L, BLOCK_L)). dH_j = sum_t dE_tj q_t (+ alpha_tj dc_t when V = H), dV_j = sum_t alpha_tj dc_t."""
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1).to(tl.int64) * BLOCK_L
    ar_l = tl.arange(0, BLOCK_L)
    ar_d = tl.arange(0, BLOCK_D)
    in_l = ar_l < L - l0
    in_d = ar_d < D
    in_dv = ar_d < DV
    k = tl.load(K + b * s_kb + l0 * s_kl + ar_l[:, None] * s_kl + ar_d[None, :] * s_kd,
                mask=in_l[:, None] & in_d[None, :], other=0.0).to(ACC)  # (BLOCK_L, BLOCK_D)
    v = k
    if HAS_DCTX and not SHARED_KV:
        v = tl.load(V + b * s_vb + l0 * s_vl + ar_l[:, None] * s_vl + ar_d[None, :] * s_vd,
                    mask=in_l[:, None] & in_dv[None, :], other=0.0).to(ACC)
    dk = tl.zeros([BLOCK_L, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_L, BLOCK_D], ACC)
    t = b * 0
    while t < T:
        row = b * T + t
        q = tl.load(Q + b * s_qb + t * s_qt + ar_d * s_qd, mask=in_d, other=0.0).to(ACC)
        m_row, inv_l = _row_stats(LSE, row, ACC)
        delta = tl.load(DELTA + 2 * row).to(ACC)
        a_scale = tl.load(DELTA + 2 * row + 1).to(ACC)
        alpha = _saved_alpha(W, Q, row * L + l0 + ar_l, in_l, m_row, inv_l, ACC) * a_scale  # 0 where masked
        dc = _load_dc(DCTX, b, t, s_cb, s_ct, s_cd, ar_d, in_dv, HAS_DCTX, ACC, BLOCK_D)
        g = _g_block(v, dc, DW, b * s_wb + t * s_wt + l0 * s_wl + ar_l * s_wl, in_l, HAS_DCTX, HAS_DW, ACC, BLOCK_L)
        if HAS_DCTX:
            if SHARED_KV:
                dk += alpha[:, None] * dc[None, :]
            else:
                dv += alpha[:, None] * dc[None, :]
        de = alpha * (g - delta)
        dk += de[:, None] * q[None, :]
        t += 1
    tl.store(DK + (b * L + l0) * D + ar_l[:, None] * D + ar_d[None, :], dk.to(DK.dtype.element_ty),
             mask=in_l[:, None] & in_d[None, :])
    if not SHARED_KV:
        tl.store(DVAL + (b * L + l0) * DV + ar_l[:, None] * DV + ar_d[None, :], dv.to(DVAL.dtype.element_ty),
                 mask=in_l[:, None] & in_dv[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# (BLOCK_L, num_warps) measured on an H200 (benchmarks/sweep_attention.py, session 7; T = 1, values
# = keys, the launcher's split), per (kind, BLOCK_D, "16" / "fp32"), where the register-budget rule
# below was slow: bigger tiles keep more bytes in flight per program, and 8 warps over a 16-bit
# 1024-wide tile were 4-5x slower than 4. Forward ms, old -> new: B 256, L 512, D 1024: bf16 0.507
# -> 0.103, fp32 0.173 -> 0.156; B 8, L 4096, D 512: bf16 0.203 -> 0.115, fp32 0.172 -> 0.107.
# Backward (row kernel): D 1024 bf16 0.756 -> 0.201; D 512 bf16 0.399 -> 0.179, fp32 0.145 ->
# 0.080. fp32 at D 1024 keeps the rule's (2, 8): the measured best, (4, 8) at 0.430 ms against
# 0.463, spilled 16 bytes on sm_90 with V = H and lengths (AOT). fp32 backward at D 512 takes the
# runner-up (8, 4), 0.091 ms: the best, (16, 8) at 0.080, spilled 16 bytes inside its loops under
# triton 3.6 on sm_80 (generic variant; session 8's AOT check of 3.6 on both archs).
# Unmeasured widths keep the rule.
_MEASURED_CONFIGS = {
    ("fwd", 1024, "16"): (8, 4), ("fwd", 1024, "fp32"): (16, 8),
    ("fwd", 512, "16"): (16, 8), ("fwd", 512, "fp32"): (16, 8),
    ("bwd_row", 1024, "16"): (4, 4),
    ("bwd_row", 512, "16"): (16, 8), ("bwd_row", 512, "fp32"): (8, 4),
}


# (BLOCK_L, num_warps) for launches whose operands are not 16-aligned (``launch_config``): Triton then
# compiles scalar loads, one address per element, and under triton 3.7 / 3.8 some of the tiles above
# (and the rule's fp32 forward at BLOCK_D 256) spilled there: up to 560 bytes at 255 registers, with
# spill instructions inside the loops. Each of these is the largest tile next to its aligned
# choice (same warps, or fewer: 8 warps over a 16-bit 1024-wide tile were 4-5x slower on the H200)
# that compiles without spills under triton 3.6, 3.7.1, 3.8.0 and 3.9, on sm_80 and sm_90, with no
# divisibility known and with only the D-contiguous rows 16-aligned (L not), every mask form and V
# = H or not (session 16). Their speed is unmeasured: no GPU since session 7.
_CLS = {torch.float16: "16", torch.bfloat16: "16", torch.float32: "fp32"}  # the tables' dtype classes
_UNALIGNED_CONFIGS = {
    ("fwd", 1024, "fp32"): (8, 8), ("fwd", 1024, "16"): (4, 4), ("fwd", 256, "fp32"): (4, 4),
    ("bwd_row", 1024, "16"): (2, 2), ("bwd_row", 512, "16"): (4, 4), ("bwd_row", 512, "fp32"): (4, 4),
}


@functools.lru_cache(maxsize=None)  # pure; called several times per launch (host time matters at small sizes)
def block_config(D: int, Dv: int, kind: str = "fwd", dtype: torch.dtype = torch.float32,
                 aligned: bool = True) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps) for head sizes D, Dv. kind: "fwd" / "bwd_row" or "bwd_kv".

    BLOCK_D covers max(D, Dv) (one padded width for H and V keeps the config count small). For
    operands that are not 16-aligned (``aligned=False``, see :func:`launch_config`)
    _UNALIGNED_CONFIGS decides where it has an entry; then _MEASURED_CONFIGS; else BLOCK_L keeps
    each (BLOCK_L, BLOCK_D) fp32 tile at _TILE_PER_WARP[kind] elements per warp so the kernels do
    not spill up to D = 1024.
    """
    block_d = max(_MIN_BLOCK_D, next_power_of_2(max(D, Dv)))
    cls = _CLS.get(dtype)
    if not aligned and (kind, block_d, cls) in _UNALIGNED_CONFIGS:
        block_l, num_warps = _UNALIGNED_CONFIGS[kind, block_d, cls]
        return block_d, block_l, num_warps
    if (kind, block_d, cls) in _MEASURED_CONFIGS:
        block_l, num_warps = _MEASURED_CONFIGS[kind, block_d, cls]
        return block_d, block_l, num_warps
    # The dH/dV kernel keeps 4 warps: with 8, ptxas spilled a few bytes at BLOCK_L = 2 (AOT tool).
    num_warps = 4 if block_d <= 256 or kind == "bwd_kv" or (kind == "bwd_row" and block_d <= 512) else 8
    tile = _TILE_PER_WARP[kind] * num_warps
    block_l = max(2, min(_MAX_BLOCK_L, tile // block_d))
    return block_d, block_l, num_warps


def launch_config(D: int, Dv: int, L: int, kind: str, dtype: torch.dtype, *operands) -> tuple[int, int, int]:
    """block_config for a launch over ``operands`` (what it loads row by row: query, H, V, and the
    bool mask or dc and dalpha; None skipped): the measured tiles when D, Dv, L, the operands' row
    strides and starts are all divisible by 16, as in the AOT tool's "aligned" variant (and the H200
    sweep's shapes); else, where _UNALIGNED_CONFIGS has an entry, the smaller tile that does not
    spill in Triton's less specialised compiles. Metadata only (no host sync), and only checked at
    the widths and dtypes where the two choices differ."""
    cfg = block_config(D, Dv, kind, dtype)
    if (kind, cfg[0], _CLS.get(dtype)) in _UNALIGNED_CONFIGS and not aligned16((D, Dv, L), operands):
        return block_config(D, Dv, kind, dtype, aligned=False)
    return cfg


def split_plan(rows: int, L: int, block_l: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, blocks_per_split). Split L when B*T rows cannot fill ~2 programs per SM.

    ``splits`` forces the number of chunks (tests use it to exercise the combine path); it is
    clipped so that every chunk is non-empty.
    """
    n_blocks = cdiv(L, block_l)
    if splits is None:
        want = cdiv(2 * num_sms(device), max(rows, 1))
        splits = min(want, n_blocks // _MIN_BLOCKS_PER_SPLIT) if device.type == "cuda" else 1
    splits = max(1, min(int(splits), n_blocks))
    per = cdiv(n_blocks, splits)
    return cdiv(n_blocks, per), per


def ctx_acc_buffer(ctx: torch.Tensor, for_backward: bool) -> tuple[torch.Tensor, bool]:
    """(ctx_acc, STORE_CTXA): an fp32 buffer like ctx for a 16-bit output that needs a backward,
    else ctx itself (already in the accumulation dtype, or no backward) and no second store."""
    if for_backward and ctx.dtype in (torch.float16, torch.bfloat16):
        return torch.empty(ctx.shape, device=ctx.device, dtype=torch.float32), True
    return ctx, False


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mask_args(mask, query):
    """(pointer tensor, MASK_MODE, s_mb, s_ml). The mask is read in the kernel: no host sync."""
    if mask is None:
        return query, 0, 0, 0
    if mask.dtype == torch.bool:
        return mask, 2, mask.stride(0), mask.stride(1)
    return mask, 1, mask.stride(0), 0


def _tile_safe(x, *blocks):
    """x, or a contiguous copy when a tile's int32 in-kernel offsets could overflow.

    The kernels add int64 bases (batch, row, block start) to int32 offsets inside a tile,
    sum_i (block_i - 1) * stride_i over the trailing dims; that only overflows for absurd strides
    (a view into a > 2^31-element tensor with a huge step), where a copy is the simple way out.
    """
    if x is None:
        return None
    trail = x.stride()[x.dim() - len(blocks):]
    if max(trail) * max(blocks) * len(blocks) < 2**31:  # bounds the span below: the usual case, cheap
        return x
    span = sum((blk - 1) * st for blk, st in zip(blocks, trail))
    return x.contiguous() if span >= 2**31 else x


def _query_dims(query):
    """(lead, B, T, D) of a (B, T, D) or (B, D) query; lead, (B, T) or (B,), leads the outputs' shapes."""
    lead = query.shape[:-1]
    return lead, lead[0], (lead[1] if len(lead) == 2 else 1), query.shape[-1]


def _st3(x):
    """Strides of x as (batch, query, feature): a 2-D (B, .) tensor is one query per batch row (T = 1;
    its query stride is never used). The launchers take (B, D) queries as they are: views to and from
    (B, 1, D) cost ~20 % of the host time of a decoder step's attention fwd + bwd
    (benchmarks/host_overhead.py: 105 -> 81 us stubbed, session 8)."""
    st = x.stride()
    return st if len(st) == 3 else (st[0], 0, st[1])


def _unsqueezed(*xs):
    """(B, .) tensors as (B, 1, .) views (None stays None): for the tiled kernels, which take 3-D only."""
    return [x if x is None or x.dim() == 3 else x[:, None] for x in xs]


@on_tensor_device
def attention_forward(query, keys, values, mask, *, splits=None, block_l=None, tiled=None, for_backward=False,
                      num_stages=None):
    """query (B, T, D) or (B, D), keys (B, L, D), values (B, L, Dv) or None (= keys), mask None | (B,) int |
    (B, L) bool.

    Inputs already validated (fused_s2s.attention). Returns ctx (B, [T,] Dv), weights (B, [T,] L) in
    query's dtype, the log-sum-exp stats (B*T, 2) = (m, l) in the accumulation dtype, and what
    :func:`attention_backward` takes as ctx and weights: with ``for_backward`` and fp16/bf16, the
    context in fp32 (ctx_acc, (B, T, Dv)) and the fp32 raw scores (scores_acc, (B, T, L), the
    forward's scratch, kept instead of freed; see the module docstring); else None and weights
    themselves (the fp32 / fp64 backward's exact delta reads no context: not holding the returned
    ctx lets a caller change it in place before the backward, as after eager's bmm; the 16-bit
    path without ``for_backward`` may return ctx there). ``splits``/``block_l`` override the heuristics (tests). ``tiled``: None =
    heuristic, True / False force the tiled (T > 1, ``fused_s2s.kernels.attention_tiled``) or the
    per-row kernels. ``num_stages`` (>= 1) forces the loops' software-pipelining depth (sweeps).
    """
    lead, B, T, D = _query_dims(query)
    L = keys.shape[1]
    shared = values is None
    v = keys if shared else values
    Dv = v.shape[2]
    from fused_s2s.kernels import attention_tiled as _tiled

    if _tiled.use_tiled(T, D, Dv, query.dtype, tiled):
        out = _tiled.attention_forward_tiled(*_unsqueezed(query), keys, values, mask, block_l=block_l,
                                             for_backward=for_backward, num_stages=num_stages)
        return out if query.dim() == 3 else tuple(x.squeeze(1) if x.dim() == 3 else x for x in out)
    dev, dtype = query.device, query.dtype
    ctx = torch.empty(*lead, Dv, device=dev, dtype=dtype)
    ctx_acc, store_ctxa = ctx_acc_buffer(ctx, for_backward)
    weights = torch.empty(*lead, L, device=dev, dtype=dtype)
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    rows = B * T
    lse = torch.empty(rows, 2, device=dev, dtype=acc_t)  # (m, l) per row: lse = m + log(l)
    if rows == 0:
        return ctx, weights, lse, ctx_acc if store_ctxa else None, weights
    block_d, bl, num_warps = launch_config(D, Dv, L, "fwd", query.dtype, query, keys, values,
                                           mask if mask is not None and mask.dim() == 2 else None)
    bl = block_l or bl
    nsplit, per = split_plan(rows, L, bl, dev, splits)
    query = _tile_safe(query, block_d)
    keys, values = _tile_safe(keys, bl, block_d), _tile_safe(values, bl, block_d)
    if mask is not None and mask.dim() == 2:
        mask = _tile_safe(mask, bl)
    v = keys if shared else values
    # Raw scores: in place in the weights when they are already in the accumulation dtype.
    scores = weights if dtype == acc_t else torch.empty(*lead, L, device=dev, dtype=acc_t)
    m_ptr, mode, s_mb, s_ml = _mask_args(mask, query)
    finalize = nsplit == 1
    if finalize:
        pm = pl = pacc = lse  # unused
    else:
        pm = torch.empty(rows, nsplit, device=dev, dtype=acc_t)
        pl = torch.empty(rows, nsplit, device=dev, dtype=acc_t)
        pacc = torch.empty(rows, nsplit, Dv, device=dev, dtype=acc_t)
    direct(_attn_fwd_kernel)[(rows, nsplit)](
        query, keys, v, m_ptr, ctx, ctx_acc, weights, scores, lse, pm, pl, pacc,
        T, L, D, Dv, per,
        *_st3(query), *keys.stride(), *v.stride(), s_mb, s_ml,
        MASK_MODE=mode, SHARED_KV=shared, FINALIZE=finalize, STORE_CTXA=store_ctxa, ACC=_acc(dtype),
        BLOCK_L=bl, BLOCK_D=block_d, NUM_STAGES=stages(num_stages, _ROW_STAGES), num_warps=num_warps,
        enable_fp_fusion=True,
    )
    if not finalize:
        direct(_attn_combine_kernel)[(rows, nsplit)](
            ctx, ctx_acc, weights, scores, lse, pm, pl, pacc, L, Dv, per, STORE_CTXA=store_ctxa,
            ACC=_acc(dtype), BLOCK_L=bl, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=True,
        )
    return ctx, weights, lse, ctx_acc if store_ctxa else None, scores if store_ctxa else weights


@on_tensor_device
def attention_backward(query, keys, values, mask, ctx, weights, lse, dctx, dweights, *,
                       splits=None, block_l=None, tiled=None, num_stages=None):
    """Gradients (dquery (B, [T,] D) like query, dkeys (B, L, D), dvalues (B, L, Dv) or None when values is None).

    dctx (B, [T,] Dv) and dweights (B, [T,] L) may be None (that output got no gradient) and may have
    any strides. ctx, weights, lse are what :func:`attention_forward` returned: for fp16/bf16
    preferably its ctx_acc and scores_acc (fp32; weights in fp32 with 16-bit inputs are read as raw
    scores and normalised in-kernel), else its ctx and weights (correct, less precise on peaked rows).
    ctx may be None for fp32 / fp64, whose exact delta does not read it.
    """
    lead, B, T, D = _query_dims(query)
    L = keys.shape[1]
    shared = values is None
    v = keys if shared else values
    Dv = v.shape[2]
    dev, dtype = query.device, query.dtype
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    has_dc, has_dw = dctx is not None, dweights is not None
    if ctx is None:
        if dtype != acc_t:
            raise ValueError("attention_backward needs ctx (the forward's fp32 ctx_acc) for float16 / bfloat16")
        ctx = dctx if has_dc else dweights  # an unread pointer (fp32 / fp64: exact delta, below)
    rows = B * T
    if rows == 0 or not (has_dc or has_dw):
        z = torch.zeros
        return z(*lead, D, device=dev, dtype=dtype), z(B, L, D, device=dev, dtype=dtype), \
            None if shared else z(B, L, Dv, device=dev, dtype=dtype)
    from fused_s2s.kernels import attention_tiled as _tiled

    if _tiled.use_tiled(T, D, Dv, dtype, tiled):
        q3, ctx3, w3, dc3, dw3 = _unsqueezed(query, ctx, weights, dctx, dweights)
        dq, dk, dv = _tiled.attention_backward_tiled(q3, keys, values, mask, ctx3, w3, lse, dc3, dw3,
                                                     block_l=block_l, num_stages=num_stages)
        return dq.view(query.shape), dk, dv
    dk = torch.empty(B, L, D, device=dev, dtype=dtype)
    # dV is only written where dc flows (HAS_DCTX); without it it is zero.
    dv = None if shared else (torch.empty if has_dc else torch.zeros)(B, L, Dv, device=dev, dtype=dtype)
    block_d, bl, num_warps = launch_config(D, Dv, L, "bwd_row", dtype, query, keys, values, dctx, dweights)
    _, bl_kv, nw_kv = launch_config(D, Dv, L, "bwd_kv", dtype, query, keys, values, dctx, dweights)
    bl = block_l or bl
    bl_kv = block_l or bl_kv
    blk = max(bl, bl_kv)
    query = _tile_safe(query, block_d)
    keys, values = _tile_safe(keys, blk, block_d), _tile_safe(values, blk, block_d)
    # No mask here: alpha comes from the forward's saved weights / raw scores, 0 where masked.
    dctx, dweights = _tile_safe(dctx, block_d), _tile_safe(dweights, blk)
    v = keys if shared else values
    write_kv = T == 1
    nsplit, per = split_plan(rows, L, bl, dev, splits)
    dq = torch.empty(*lead, D, device=dev, dtype=dtype) if nsplit == 1 else \
        torch.empty(nsplit, *lead, D, device=dev, dtype=acc_t)
    delta = torch.empty(rows, 2, device=dev, dtype=acc_t)  # (delta, alpha scale) per row
    dc = dctx if has_dc else ctx
    dw = dweights if has_dw else weights
    common = dict(SHARED_KV=shared, HAS_DCTX=has_dc, HAS_DW=has_dw, ACC=_acc(dtype),
                  BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=True)
    dv_ptr = dk if dv is None else dv
    # delta: exact (a pass over V first) where the saved context and weights are no more precise
    # than the inputs (fp32 / fp64) and dc flows; from the fp32 copies for fp16 / bf16, its
    # sum alpha dalpha from split partials when split (3), not from a whole-row loop per split (0).
    if dtype == acc_t and has_dc:
        delta_mode = 1 if nsplit == 1 else 2
    else:
        delta_mode = 3 if (nsplit > 1 and has_dw) else 0
    ns = stages(num_stages, _ROW_STAGES)
    dpart = delta
    if delta_mode in (2, 3):
        dpart = torch.empty(rows, nsplit, 2, device=dev, dtype=acc_t)  # per chunk: (sum w g, sum w) | (sum a da, 0)
        direct(_attn_bwd_delta_kernel)[(rows, nsplit)](
            query, weights, lse, v, dc, dw, dpart, T, L, Dv, per, *v.stride(), *_st3(dc), *_st3(dw),
            HAS_DCTX=has_dc, HAS_DW=has_dw, DELTA_MODE=delta_mode, ACC=_acc(dtype), BLOCK_L=bl, BLOCK_D=block_d,
            NUM_STAGES=ns, num_warps=num_warps, enable_fp_fusion=True,
        )
    direct(_attn_bwd_row_kernel)[(rows, nsplit)](
        query, keys, v, ctx, weights, lse, dc, dw, dq, dk, dv_ptr, delta, dpart,
        T, L, D, Dv, per, rows,
        *_st3(query), *keys.stride(), *v.stride(), *_st3(dc), *_st3(dw),
        WRITE_KV=write_kv, DELTA_MODE=delta_mode, BLOCK_L=bl, NUM_STAGES=ns, **common,
    )
    if nsplit > 1:
        dq = dq.sum(0).to(dtype)
    if not write_kv:
        common["num_warps"] = nw_kv
        direct(_attn_bwd_kv_kernel)[(B, cdiv(L, bl_kv))](
            query, keys, v, weights, lse, delta, dc, dw, dk, dv_ptr,
            T, L, D, Dv,
            *_st3(query), *keys.stride(), *v.stride(), *_st3(dc), *_st3(dw),
            BLOCK_L=bl_kv, **common,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (python -m fused_s2s.aot attention)
# ----------------------------------------------------------------------------------------------

_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


_AOT_MASKS = (("*i1", 2), ("*i64", 1), ("*i32", 1), ("*i64", 0))  # (pointer type, MASK_MODE)


def aot_kernel_configs(dtype, block_d: int, kind: str, block_l: int, num_warps: int, mask=("*i64", 1),
                       shared: bool = False, variants=fused_s2s.aot.VARIANTS, expect_no_spill: bool = True):
    """The AOT configs of one launcher choice: kind "fwd" (the forward, both FINALIZE forms, and the
    split-L combine), "bwd_row" (the row kernel's (WRITE_KV, split, DELTA_MODE) forms and the split
    delta partials) or "bwd_kv", at (BLOCK_D, BLOCK_L, num_warps), one mask form (the forward's) and
    SHARED_KV, compiled in ``variants``. The innermost strides are the constant 1, as triton's JIT
    specialises them for contiguous inputs."""
    from fused_s2s.aot import AOTConfig

    i32, cx = "i32", "constexpr"
    ty = _TL_NAME[dtype]
    p, a = f"*{ty}", "*fp32"
    unit = dict(s_qd=1, s_kd=1, s_vd=1, s_cd=1)  # innermost strides
    qkv_strides = dict(s_qb=i32, s_qt=i32, s_qd=cx, s_kb=i32, s_kl=i32, s_kd=cx, s_vb=i32, s_vl=i32, s_vd=cx)
    gstrides = dict(s_cb=i32, s_ct=i32, s_cd=cx, s_wb=i32, s_wt=i32, s_wl=i32)
    sizes = dict(T=i32, L=i32, D=i32, DV=i32)
    tag = f"{ty} BD={block_d}"
    kw = dict(num_warps=num_warps, expect_no_spill=expect_no_spill, variants=tuple(variants))
    if kind == "fwd":
        mask_ty, mode = mask
        for finalize in (True, False):
            sig = dict(Q=p, K=p, V=p, MASK=mask_ty, CTX=p, CTXA=a, W=p, S=p if ty == "fp32" else a, LSE=a, PM=a,
                       PL=a, PACC=a, **sizes, BLOCKS_PER_SPLIT=i32, **qkv_strides, s_mb=i32, s_ml=cx,
                       MASK_MODE=cx, SHARED_KV=cx, FINALIZE=cx, STORE_CTXA=cx, ACC=cx, BLOCK_L=cx, BLOCK_D=cx,
                       NUM_STAGES=cx)
            c = dict(s_qd=1, s_kd=1, s_vd=1, s_ml=1, MASK_MODE=mode, SHARED_KV=shared, FINALIZE=finalize,
                     STORE_CTXA=ty != "fp32", ACC=tl.float32, BLOCK_L=block_l, BLOCK_D=block_d,
                     NUM_STAGES=_ROW_STAGES)
            yield AOTConfig(_attn_fwd_kernel, sig, c, label=f"fwd {tag} BL={block_l} fin={int(finalize)} "
                                                              f"mask={mode} kv={int(shared)}", **kw)
        sig = dict(CTX=p, CTXA=a, W=p, S=p if ty == "fp32" else a, LSE=a, PM=a, PL=a, PACC=a, L=i32, DV=i32,
                   BLOCKS_PER_SPLIT=i32, STORE_CTXA=cx, ACC=cx, BLOCK_L=cx, BLOCK_D=cx)
        yield AOTConfig(_attn_combine_kernel, sig,
                        dict(STORE_CTXA=ty != "fp32", ACC=tl.float32, BLOCK_L=block_l, BLOCK_D=block_d),
                        label=f"combine {tag} BL={block_l}", **kw)
    elif kind == "bwd_row":
        # (WRITE_KV, split, DELTA_MODE): T == 1 split (fp32 dq partials), T == 1 one pass, T > 1. The
        # fp32 delta is exact (1: inline pass, 2: split partials); 16-bit reads the saved fp32 copies
        # (3: split, its sum alpha dalpha from partials). HAS_DCTX and HAS_DW are both on.
        forms = ((True, True, 2), (True, False, 1), (False, False, 1)) if ty == "fp32" else \
            ((True, True, 3), (False, False, 0))
        for write_kv, split, delta_mode in forms:
            sig = dict(Q=p, K=p, V=p, CTX=a, W=a, LSE=a, DCTX=p, DW=p, DQ=a if split else p,
                       DK=p, DVAL=p, DELTA=a, DPART=a, **sizes, BLOCKS_PER_SPLIT=i32, NROWS=i32, **qkv_strides,
                       **gstrides, SHARED_KV=cx, HAS_DCTX=cx, HAS_DW=cx, WRITE_KV=cx, DELTA_MODE=cx,
                       ACC=cx, BLOCK_L=cx, BLOCK_D=cx, NUM_STAGES=cx)
            c = dict(unit, SHARED_KV=shared, HAS_DCTX=True, HAS_DW=True, WRITE_KV=write_kv,
                     DELTA_MODE=delta_mode, ACC=tl.float32, BLOCK_L=block_l, BLOCK_D=block_d, NUM_STAGES=_ROW_STAGES)
            yield AOTConfig(_attn_bwd_row_kernel, sig, c, label=f"bwd_row {tag} BL={block_l} kv={int(write_kv)} "
                                                                 f"split={int(split)} shared={int(shared)} "
                                                                 f"delta={delta_mode}", **kw)
        # the split delta partials: exact (2, fp32 with dc), or sum alpha dalpha (3: 16-bit, and fp32
        # with the weights' gradient alone)
        for delta_mode, has_dc in ((2, True), (3, False)) if ty == "fp32" else ((3, True),):
            sig = dict(Q=p, W=a, LSE=a, V=p, DCTX=p, DW=p, DPART=a, T=i32, L=i32, DV=i32, BLOCKS_PER_SPLIT=i32,
                       s_vb=i32, s_vl=i32, s_vd=cx, **gstrides, HAS_DCTX=cx, HAS_DW=cx, DELTA_MODE=cx, ACC=cx,
                       BLOCK_L=cx, BLOCK_D=cx, NUM_STAGES=cx)
            c = dict(s_vd=1, s_cd=1, HAS_DCTX=has_dc, HAS_DW=True, DELTA_MODE=delta_mode, ACC=tl.float32,
                     BLOCK_L=block_l, BLOCK_D=block_d, NUM_STAGES=_ROW_STAGES)
            yield AOTConfig(_attn_bwd_delta_kernel, sig, c, label=f"bwd_delta {tag} BL={block_l} delta={delta_mode}",
                            **kw)
    elif kind == "bwd_kv":
        sig = dict(Q=p, K=p, V=p, W=a, LSE=a, DELTA=a, DCTX=p, DW=p, DK=p, DVAL=p, **sizes, **qkv_strides,
                   **gstrides, SHARED_KV=cx, HAS_DCTX=cx, HAS_DW=cx, ACC=cx, BLOCK_L=cx, BLOCK_D=cx)
        c = dict(unit, SHARED_KV=shared, HAS_DCTX=True, HAS_DW=True, ACC=tl.float32, BLOCK_L=block_l,
                 BLOCK_D=block_d)
        yield AOTConfig(_attn_bwd_kv_kernel, sig, c, label=f"bwd_kv {tag} BL={block_l} shared={int(shared)}", **kw)
    else:
        raise ValueError(f"kind must be 'fwd', 'bwd_row' or 'bwd_kv', got {kind!r}")


def _aot_configs():
    """Every (dtype, BLOCK_D, BLOCK_L, num_warps, split/finalize) the launchers pick for D, Dv <= 1024.

    The mask form (forward only: the per-row backward reads none) and SHARED_KV barely change
    register use; they rotate over the configs so that each form is compiled, with separate V (the
    larger footprint) for most. Where the launcher picks another block config for operands that are
    not 16-aligned (``_UNALIGNED_CONFIGS``), the measured one compiles in the "aligned" variant and
    the other in the "generic" one.
    BLOCK_D = 2048 (1024 < D <= 2048) is compiled too but may spill (expect_no_spill=False).
    """
    i = 0
    for dtype in _TL_NAME:
        for block_d in (16, 32, 64, 128, 256, 512, 1024, 2048):
            mask = _AOT_MASKS[i % len(_AOT_MASKS)]
            shared = i % 5 == 4
            i += 1
            for kind in ("fwd", "bwd_row", "bwd_kv"):
                aligned = block_config(block_d, block_d, kind, dtype)
                generic = block_config(block_d, block_d, kind, dtype, aligned=False)
                for cfg, variants in ((aligned, fused_s2s.aot.VARIANTS),) if aligned == generic else \
                        ((aligned, ("aligned",)), (generic, ("generic",))):
                    yield from aot_kernel_configs(dtype, block_d, kind, *cfg[1:], mask=mask, shared=shared,
                                                  variants=variants, expect_no_spill=block_d <= 1024)


def _aot_configs_all():
    """Per-row kernels, then the tiled (T > 1) kernels of ``attention_tiled``."""
    from fused_s2s.kernels import attention_tiled

    yield from _aot_configs()
    yield from attention_tiled.aot_configs()


def _aot_configs_every_form():
    """The audit family "attention_forms" (``python -m fused_s2s.aot attention_forms``, ~3000 compiles
    a triton version, never run by default): every "attention" config in every mask form (bool,
    lengths, none) and with V = H or not, where the kernel takes them. The default family rotates
    these forms over the configs to keep CI's compile short; ptxas's register allocation can differ
    between forms by a saved register (docs/attention.md)."""
    import dataclasses

    seen = set()
    for c in _aot_configs_all():
        for shared in (False, True) if "SHARED_KV" in c.constexprs else (None,):
            # the config's own mask form (None) and bool, lengths, none
            for mask_ty, mode in ((None, None), ("*i1", 2), ("*i64", 1), ("*i64", 0)) \
                    if "MASK_MODE" in c.constexprs else ((None, None),):
                cx, sig = dict(c.constexprs), dict(c.signature)
                if shared is not None:
                    cx["SHARED_KV"] = shared
                if mode is not None:
                    cx["MASK_MODE"], sig["MASK"] = mode, mask_ty
                key = (c.kernel, c.num_warps, tuple((k, repr(v)) for k, v in sorted(cx.items())),
                       tuple(sorted(sig.items())), c.variants)
                if key in seen:
                    continue
                seen.add(key)
                form = f" [kv={int(cx['SHARED_KV'])}" if "SHARED_KV" in cx else " ["
                form += f" mask={cx['MASK_MODE']} {sig['MASK']}]" if "MASK_MODE" in cx else "]"
                yield dataclasses.replace(c, signature=sig, constexprs=cx, label=c.label + form)


fused_s2s.aot.register("attention", _aot_configs_all)
fused_s2s.aot.register("attention_forms", _aot_configs_every_form, default=False)
