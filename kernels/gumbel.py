"""Fused Gumbel-softmax over the last dimension of a (rows, V) tensor: kernels + plain launchers.

Forward (one launch; a program owns BLOCK_R rows, one row when V is large):
    g   = -log(-log(max(u, U_MIN))),  u = uniform(word col % 4 of philox(seed, (col // 4, row, 0)))
    t   = logits + g                                          (argmax taken on t: tau-free)
    y   = softmax(t / tau) = exp((t - m) * inv_tau) / s,  m = max t,  s = sum exp((t - m) * inv_tau)
                                                              (online over V blocks)
    (tau: a launch argument, or with TAU_PTR read on the device from a 0-d tensor; inv_tau = fp32(1/tau))
    The exponent is scaled after the subtraction: t - m is exact near the max (Sterbenz), so the
    entries that carry the probability get one rounding, of a small number, where t * inv_tau - m *
    inv_tau rounds two products of |t / tau| (at fp32 logits x 3, half the oracle-rule failures).
    exp(a * inv_tau) is computed as exp2(a * inv_tau2), inv_tau2 = inv_tau * log2(e) formed once.
    hard: y = one_hot(argmax t) (exact 0/1; a row whose m or s is not finite becomes NaN)
    index only (STORE_Y off, hard): argmax t and m, no y and no s (Gumbel-max sampling: no exp)
The noise is never written: the backward pass draws it again from the same seed and counters and
rebuilds y from the saved per-row (m, s): O(rows) saved state beyond the logits.
Backward (straight-through for hard: the gradient of the soft y):
    dlogits = y * (dy - sum(dy * y)) / tau
    (at the sample's entry k as y_k sum_j (dy_k - dy_j) y_j / tau: no cancellation on peaked rows;
    see _gumbel_bwd_kernel)
Counter and uniform conventions are those of ``fused_s2s.philox`` (bit-exact torch mirror).
Everything is computed in fp32 (fp64 for fp64 logits); outputs are stored in the input dtype.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fused_s2s import aot, philox
from fused_s2s.backend import interpret_mode
from fused_s2s.kernels._launch import aligned16, cdiv, direct, num_sms, on_tensor_device, stages

_U_MIN = tl.constexpr(philox.U_MIN)
_NEG_INF = tl.constexpr(float("-inf"))
_INF = tl.constexpr(float("inf"))
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(a * inv_tau) = exp2(a * inv_tau * log2(e)): one product per element

# (max V, BLOCK_R, BLOCK_V, num_warps): small V packs BLOCK_R rows per program (one tile of
# BLOCK_R x BLOCK_V); V beyond the last entry loops over BLOCK_V-wide blocks of one row. A row in
# one block is read once and its noise drawn once per pass; the loop reads the logits and draws the
# noise twice in the soft forward and in the backward. Up to 16384 columns fit one block without
# spilling (AOT tool: at most 64 registers at 32 warps; 8192 at 16 warps spilled 8 bytes under
# triton 3.6 on sm_80, so it takes 32 warps too).
_SINGLE_CONFIGS = ((32, 32, 32, 4), (256, 4, 256, 4), (1024, 1, 1024, 4), (4096, 1, 4096, 8),
                   (8192, 1, 8192, 32), (16384, 1, 16384, 32))
_MULTI_CONFIG = (1, 4096, 16)
# The backward with explicit noise (one more (R, V) load) spilled 8 bytes in one block of 16384 at
# 32 warps under triton 3.7.1 (generic, sm_90: 64 registers is the cap at 1024 threads), so from
# 8193 columns it takes the loop. Explicit noise is the verification path; the forward keeps the block.
_GIVEN_NOISE_BWD_MAX_SINGLE = 8192
# The loop path's software pipelining: blocks of logits (and dy, q) in flight ahead of the one being
# computed (``tl.range(num_stages=)``; the loads go through shared memory, NUM_STAGES - 1 buffers
# of each). One program per row, so one or two programs per SM: without it each warp waits out
# every block's HBM latency. In-kernel noise, fp32 / fp16 / bf16, rows Triton specialises as 16-
# aligned (V, the row strides and the pointers divisible by 16: 128-bit loads) only. Unaligned
# rows compile to scalar loads, whose pipelined fp32 loop took 116-128 registers (AOT: one 16-warp
# program per SM, so B 256 rows would run in two waves where 40 registers fit three programs per SM);
# with given noise (one more load) or fp64 the unaligned variants spilled 8-24 bytes. Those keep 1
# (no pipelining), as does a row in one block (SINGLE).
_LOOP_STAGES = 2
# The loop path's second passes with in-kernel noise: KEEP (the default) keeps pass 1's q (soft
# forward) or y (backward) in the output buffer and reads it back, so the noise is drawn once per
# element and direction; off, pass 2 re-reads the logits and draws the noise again, as given noise
# does. Per fp32 element that is 4 bytes less HBM traffic each way (backward 20 bytes instead of 24,
# soft forward 12 instead of 16) for ~50 more instructions (docs/gumbel.md's static count): which is
# faster is the GPU's to say (benchmarks/sweep_gumbel.py prints both, "keep=0" lines).
_KEEP = True
# fp64 (gradcheck, verification) keeps its tiles small: twice the registers per element
_SINGLE_CONFIGS_FP64 = ((256, 1, 256, 2), (1024, 1, 1024, 4))
_MULTI_CONFIG_FP64 = (1, 1024, 8)
_AOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Split rows (flash-decoding style, ``split_plan``): when a few long rows cannot fill the GPU (one
# program per row: B 256 rows on 132 SMs is ~2 programs of 16 warps per SM, where registers allow
# 3), each row's columns are cut into chunks of at least _SPLIT_MIN_BLOCKS blocks, one program
# each, until there are about _SPLIT_PROGRAMS_PER_SM programs per SM. Two launches instead of one
# (PHASE 1: pass 1 per chunk, its partial statistics; PHASE 2: combine them, then the chunk's
# epilogue); the same HBM traffic. On the H200 the same elements as 4096 rows of 8000 ran 1.15-1.56x
# (forward) and ~2x (backward) faster than 256 rows of 128,000 (session 7's diagnostic), an upper
# bound; benchmarks/sweep_gumbel.py prints "split=" lines against the launcher's choice.
_SPLIT_PROGRAMS_PER_SM = 4
_SPLIT_MIN_BLOCKS = 2
_MAX_SPLIT_N = 64  # chunks per split row at most (PHASE 2 loads a row's partials as one vector)
_MAX_SPLIT = tl.constexpr(_MAX_SPLIT_N)


@triton.jit
def _uniform_tile(seed, rows, start, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """u in [0, 1) for rows x columns [start, start + BLOCK_V), fused_s2s.philox.uniform_noise's layout.

    One Philox-4x32-10 call per 4 columns: counter (col // 4, row lo, row hi, 0), element (row, col)
    takes word col % 4. Philox's integer rounds dominate this kernel's instruction count, so using
    all four words (not tl.rand's first) cuts them 4x. start is a multiple of BLOCK_V (>= 16), so
    the groups of 4 never straddle tiles. rows (BLOCK_R,) int64 -> (BLOCK_R, BLOCK_V) fp32.
    """
    k = start // 4 + tl.arange(0, BLOCK_V // 4)  # (BLOCK_V/4,) counter word 0
    zero = tl.zeros((BLOCK_R, BLOCK_V // 4), dtype=tl.uint32)
    c0 = k.to(tl.uint32)[None, :] + zero
    c1 = rows.to(tl.uint32)[:, None] + zero  # rows is int64: row lo / row hi, no row * V product
    c2 = (rows >> 32).to(tl.uint32)[:, None] + zero
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    u0 = tl.random.uint_to_uniform_float(w0)
    u1 = tl.random.uint_to_uniform_float(w1)
    u2 = tl.random.uint_to_uniform_float(w2)
    u3 = tl.random.uint_to_uniform_float(w3)
    # interleave: [r, 4k + 2i + j] = u_{2i+j}[r, k]
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # (BLOCK_R, BLOCK_V/4, 2, 2)
    return tl.reshape(u, (BLOCK_R, BLOCK_V))


@triton.jit
def _gumbel_tile(seed, rows, start, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, FAST_LOG: tl.constexpr):
    """Gumbel(0, 1) noise in fp32 on the tile (fused_s2s.philox.gumbel_noise).

    e = -log(u) needs the accurate log: near u = 1 it is a small difference (down to 6e-8) that an
    approximate log (absolute error ~2^-22) could round to 0 or below. The outer log of e in
    [6e-8, 21.5] only needs relative accuracy, so on a GPU (FAST_LOG) it is the hardware lg2
    (__nv_fast_logf: 2 instructions instead of ~25 for libdevice's logf; |error| < 2e-7 on g,
    under fp32 resolution of logits + g). The interpreter has no fast_logf: there it is tl.log.
    """
    u = _uniform_tile(seed, rows, start, BLOCK_R, BLOCK_V)
    u = tl.maximum(u, _U_MIN)  # u = 0 would give g = -inf
    e = -tl.log(u)  # (0, 21.5]: Exp(1) noise
    if FAST_LOG:
        return -libdevice.fast_logf(e)
    else:
        return -tl.log(e)


@triton.jit
def _t_tile(x_ptr, noise_ptr, seed, rows, start, mask, stride_x, stride_n,
            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_NOISE: tl.constexpr, FP64: tl.constexpr,
            FAST_LOG: tl.constexpr):
    """t = logits + g and g on the tile rows x [start, start + BLOCK_V), in the compute dtype;
    masked lanes t = -inf.

    rows (BLOCK_R,) int64, mask (BLOCK_R, BLOCK_V).
    """
    r = rows[:, None]
    c = start + tl.arange(0, BLOCK_V)[None, :]
    x = tl.load(x_ptr + r * stride_x + c, mask=mask, other=0.0)
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    if HAS_NOISE:
        g = tl.load(noise_ptr + r * stride_n + c, mask=mask, other=0.0).to(x.dtype)
    else:
        g = _gumbel_tile(seed, rows, start, BLOCK_R, BLOCK_V, FAST_LOG).to(x.dtype)
    t = tl.where(mask, x + g, _NEG_INF)
    return t, g



@triton.jit
def _inv_tau(inv_tau, inv_tau_lo, tau_ptr, FP64: tl.constexpr, TAU_PTR: tl.constexpr):
    """1/tau in the kernel's compute dtype. From the arguments: fp32(1/tau), or in fp64 hi + lo
    (a float argument is passed as fp32; split_inv_tau). TAU_PTR: from tau itself, read on the device
    from a 0-d fp64 tensor (CUDA-graph capturable: the value may change between replays) and
    inverted in fp64, then rounded to fp32 as the host rounds 1/tau (the same bits for the same tau);
    fp64 kernels refine fp32's 1/tau in fp64 instead (tau >= ~1e-38, fp32's range)."""
    if TAU_PTR:
        tau = tl.load(tau_ptr)  # fp64
        if FP64:
            # two Newton steps from fp32's 1/tau (~24 -> ~48 -> ~53 bits): the fp64 division is a
            # subroutine call whose registers spilled 8 bytes in the fp64 backward (AOT, sm_90)
            inv = (1.0 / tau.to(tl.float32)).to(tl.float64)
            inv = inv + inv * (1.0 - tau * inv)
            inv = inv + inv * (1.0 - tau * inv)
        else:
            inv = (1.0 / tau).to(tl.float32)  # fp64 division, correctly rounded, then rounded as the host's
    elif FP64:
        inv = tl.cast(inv_tau, tl.float64) + tl.cast(inv_tau_lo, tl.float64)
    else:
        inv = inv_tau
    return inv


@triton.jit
def _program_rows(R, inv_tau, inv_tau_lo, tau_ptr, seed_ptr, BLOCK_R: tl.constexpr, HAS_NOISE: tl.constexpr,
                  FP64: tl.constexpr, TAU_PTR: tl.constexpr):
    """This program's BLOCK_R rows (int64: row * stride stays exact past 2**31 elements) and their
    mask, 1/tau and its base-2 scale, and the noise seed (0, unused, when the noise is given)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) int64
    rmask = rows < R
    inv_tau = _inv_tau(inv_tau, inv_tau_lo, tau_ptr, FP64, TAU_PTR)
    inv_tau2 = inv_tau * _LOG2E  # the exponents' scale in base 2 (tl.exp would multiply by log2(e) again)
    seed = 0
    if not HAS_NOISE:
        seed = tl.load(seed_ptr)
    return rows, rmask, inv_tau, inv_tau2, seed


@triton.jit
def _chunk(V, CHUNK_V, PHASE: tl.constexpr):
    """The columns [lo, hi) of this program: the whole row (PHASE 0), or chunk program_id(1) of a
    split row (PHASE 1 / 2)."""
    if PHASE == 0:
        lo = 0
        hi = V
    else:
        lo = tl.program_id(1) * CHUNK_V
        hi = tl.minimum(lo + CHUNK_V, V)
    return lo, hi


@triton.jit
def _row_partials(rows, rmask, NSPLIT):
    """PHASE 2: the offsets (BLOCK_R, _MAX_SPLIT) of the row's chunks' partial pairs in an
    (R, NSPLIT, 2) buffer, their mask, and the chunk numbers (_MAX_SPLIT,)."""
    ks = tl.arange(0, _MAX_SPLIT)
    kmask = rmask[:, None] & (ks < NSPLIT)[None, :]
    return rows[:, None] * (NSPLIT * 2) + ks[None, :] * 2, kmask, ks


@triton.jit
def _own_partial(rows, NSPLIT):
    """PHASE 1: the offset (BLOCK_R,) of this chunk's partial pair in an (R, NSPLIT, 2) buffer."""
    return rows * (NSPLIT * 2) + tl.program_id(1) * 2


@triton.jit
def _gumbel_fwd_kernel(
    x_ptr, noise_ptr, seed_ptr, tau_ptr, y_ptr, idx_ptr, m_ptr, s_ptr, g_ptr, mb_ptr, pf_ptr, pi_ptr,
    stride_x, stride_n, stride_y, R, V, NBLK, CHUNK_V, NSPLIT, inv_tau, inv_tau_lo,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, HARD: tl.constexpr,
    HAS_NOISE: tl.constexpr, FP64: tl.constexpr, WRITE_NOISE: tl.constexpr, FAST_LOG: tl.constexpr,
    STORE_Y: tl.constexpr, TAU_PTR: tl.constexpr, NUM_STAGES: tl.constexpr, KEEP: tl.constexpr,
    PHASE: tl.constexpr,
):
    """BLOCK_R rows: argmax and max m of t = x + g, online s = sum exp((t - m) / tau), then y (unless
    not STORE_Y: hard only, the sampled index alone, a pass over the logits with no (R, V) write).

    m_sub (m with -inf replaced by 0) keeps t - m and the rescale exp((m_old - m_new) / tau) free of
    (-inf) - (-inf) when a leading block is all -inf (masked logits); an all -inf row ends with
    s = 0 and gives NaN, like torch.softmax.
    Soft rows over several blocks, in-kernel noise: pass 1 keeps q = exp((t - m_b) / tau) in y, m_b the running
    max after block b (saved in mb, (R, NBLK)), and pass 2 rescales it, y = q * exp((m_b - m) / tau) / s, instead of
    re-reading the logits and drawing the noise again (the noise is ~80% of a pass's
    instructions). m_b <= m, so the factor is <= 1; m_b = -inf (all logits -inf so far) gives 0.
    Given noise, or KEEP off: pass 2 re-reads x and the noise (two loads; or draws the noise again) instead.
    Split rows (PHASE 1 / 2, the loop path only; ``split_plan``): a row's columns are cut into NSPLIT
    chunks of CHUNK_V, program_id(1) one chunk, so a few long rows still fill the GPU. PHASE 1 runs
    pass 1 over its chunk and stores the chunk's (max t, s relative to it) in pf (R, NSPLIT, 2) and
    (argmax, first NaN column) in pi (R, NSPLIT, 2); PHASE 2, a second launch, combines the row's
    partials (the row's max, s rescaled to it, the first chunk's argmax among equal maxima: the
    same lowest-column rule) and runs the epilogue (y, or pass 2) over its chunk. PHASE 0: the
    whole row in one program.
    """
    rows, rmask, inv_tau, inv_tau2, seed = _program_rows(R, inv_tau, inv_tau_lo, tau_ptr, seed_ptr,
                                                         BLOCK_R, HAS_NOISE, FP64, TAU_PTR)
    cols = tl.arange(0, BLOCK_V)
    lo, hi = _chunk(V, CHUNK_V, PHASE)

    if PHASE == 2:
        # the row's statistics from its chunks' partials, (BLOCK_R, NSPLIT) (BLOCK_R is 1 here)
        part, kmask, ks = _row_partials(rows, rmask, NSPLIT)
        pm = tl.load(pf_ptr + part, mask=kmask, other=_NEG_INF)
        ps = tl.load(pf_ptr + part + 1, mask=kmask, other=0.0)
        pbest = tl.load(pi_ptr + part, mask=kmask, other=0)
        pnan = tl.load(pi_ptr + part + 1, mask=kmask, other=V)
        m, kbest = tl.max(pm, 1, return_indices=True)  # ties -> the lowest chunk: the lowest column
        best_i = tl.sum(tl.where(ks[None, :] == kbest[:, None], pbest, 0), 1)
        nan_i = tl.min(pnan, 1)
        m_sub = tl.where(m == _NEG_INF, 0.0, m)
        if STORE_Y:  # each chunk's s is relative to its own max (an empty or all -inf chunk: s 0)
            s = tl.sum(ps * tl.exp2((pm - m_sub[:, None]) * inv_tau2), 1)
        else:
            s = tl.sum(ps, 1)  # sums of t: NaN flags only
    else:
        # first block (the only one when SINGLE) initialises the running statistics, all (BLOCK_R,)
        c = lo + cols
        mask = rmask[:, None] & (c < hi)[None, :]
        t, g = _t_tile(x_ptr, noise_ptr, seed, rows, lo, mask, stride_x, stride_n,
                       BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
        if WRITE_NOISE:  # debug/test only: never picked by the launcher's default path
            tl.store(g_ptr + rows[:, None] * V + c[None, :], g.to(tl.float32), mask=mask)
        best_t, best_i = tl.max(t, 1, return_indices=True)  # ties -> lowest column
        best_i += lo
        m = best_t  # the running max of t: the argmax's value, no second reduction
        m_sub = tl.where(m == _NEG_INF, 0.0, m)
        if STORE_Y:
            p = tl.exp2((t - m_sub[:, None]) * inv_tau2)
            s = tl.sum(p, 1)
        else:
            # the index alone needs no softmax sum; s = sum t only flags NaN rows for the scan below
            # (NaN where t has a NaN, or +inf beside the -inf of masked lanes: a scan that finds none)
            s = tl.sum(t, 1)
        if not SINGLE and not HARD and not HAS_NOISE and KEEP:  # keep q for pass 2
            tl.store(y_ptr + rows[:, None] * stride_y + c[None, :], p.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(mb_ptr + rows * NBLK + lo // BLOCK_V, m, mask=rmask)
        nan_i = tl.min(tl.where(t != t, c[None, :], V), 1)  # torch.argmax picks the first NaN
        if not SINGLE:
            for start in tl.range(lo + BLOCK_V, hi, BLOCK_V, num_stages=NUM_STAGES):
                c = start + cols
                mask = rmask[:, None] & (c < hi)[None, :]
                t, g = _t_tile(x_ptr, noise_ptr, seed, rows, start, mask, stride_x, stride_n,
                              BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
                if WRITE_NOISE:
                    tl.store(g_ptr + rows[:, None] * V + c[None, :], g.to(tl.float32), mask=mask)
                bt, bi = tl.max(t, 1, return_indices=True)
                better = bt > best_t  # strict: an earlier block keeps ties
                best_i = tl.where(better, bi + start, best_i)
                best_t = tl.where(better, bt, best_t)
                m_new = best_t  # the running max of t, as above
                m_sub_new = tl.where(m_new == _NEG_INF, 0.0, m_new)
                if STORE_Y:
                    p = tl.exp2((t - m_sub_new[:, None]) * inv_tau2)
                    s = s * tl.exp2((m - m_sub_new) * inv_tau2) + tl.sum(p, 1)  # m = -inf (s = 0): 0, not 0 * exp(+big)
                else:
                    s += tl.sum(t, 1)
                if not HARD and not HAS_NOISE and KEEP:  # keep q for pass 2
                    tl.store(y_ptr + rows[:, None] * stride_y + c[None, :], p.to(y_ptr.dtype.element_ty), mask=mask)
                    tl.store(mb_ptr + rows * NBLK + start // BLOCK_V, m_new, mask=rmask)
                m = m_new
                m_sub = m_sub_new
                if HAS_NOISE:  # a NaN may come from the given noise: look in t, per block
                    nan_i = tl.minimum(nan_i, tl.min(tl.where(t != t, c[None, :], V), 1))
            if not HAS_NOISE:
                # g is finite, so t = x + g is NaN where x is, and then s is NaN: only such rows (rare)
                # look for the first NaN column, reading x again, instead of a reduction per block
                if tl.sum((s != s).to(tl.int32), 0) > 0:
                    for start in range(lo + BLOCK_V, hi, BLOCK_V):
                        c = start + cols
                        mask = rmask[:, None] & (c < hi)[None, :]
                        # in fp32: a float compare (the interpreter keeps bf16 as raw uint16 bits)
                        xn = tl.load(x_ptr + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
                        nan_i = tl.minimum(nan_i, tl.min(tl.where(xn != xn, c[None, :], V), 1))
    if PHASE == 1:
        # this chunk's partials for PHASE 2; nothing else is written (y is PHASE 2's)
        part = _own_partial(rows, NSPLIT)
        tl.store(pf_ptr + part, m, mask=rmask)
        tl.store(pf_ptr + part + 1, s, mask=rmask)
        tl.store(pi_ptr + part, best_i.to(tl.int32), mask=rmask)
        tl.store(pi_ptr + part + 1, nan_i.to(tl.int32), mask=rmask)
    else:
        idx = tl.where(nan_i < V, nan_i, best_i)  # (BLOCK_R,)
        own = rmask
        if PHASE == 2:
            own = rmask & ((tl.zeros((BLOCK_R,), tl.int32) + tl.program_id(1)) == 0)  # once, by the row's first chunk
        tl.store(idx_ptr + rows, idx.to(tl.int64), mask=own)
        tl.store(m_ptr + rows, m, mask=own)
        if STORE_Y:
            tl.store(s_ptr + rows, s, mask=own)

        inv_s = 1.0 / tl.where(rmask, s, 1.0)  # padding rows (s = 0) stay quiet
        y_rows = y_ptr + rows[:, None] * stride_y
        if HARD:
            if STORE_Y:
                # exact one-hot; NaN row where softmax would be NaN (NaN / +-inf logits), as in torch
                ok = (s > 0) & (s < _INF) & (m > _NEG_INF) & (m < _INF)
                poison = tl.where(ok, 0.0, float("nan"))
                for start in range(lo, hi, BLOCK_V):
                    c = start + cols
                    y = tl.where(c[None, :] == idx[:, None], 1.0, 0.0) + poison[:, None]
                    tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & (c < hi)[None, :])
        elif SINGLE:
            y = tl.exp2((t - m_sub[:, None]) * inv_tau2) * inv_s[:, None]
            tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        elif HAS_NOISE or not KEEP:
            # pass 2, given noise: t is two loads away, cheaper to re-read than q to keep (not KEEP: x
            # re-read and the noise drawn again)
            for start in tl.range(lo, hi, BLOCK_V, num_stages=NUM_STAGES):
                c = start + cols
                mask = rmask[:, None] & (c < hi)[None, :]
                t, g = _t_tile(x_ptr, noise_ptr, seed, rows, start, mask, stride_x, stride_n,
                              BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
                y = tl.exp2((t - m_sub[:, None]) * inv_tau2) * inv_s[:, None]
                tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            # pass 2: q (pass 1's, in y) rescaled to the final (m, s); no logits, no noise
            tl.debug_barrier()  # q was written by other threads of this program
            for start in tl.range(lo, hi, BLOCK_V, num_stages=NUM_STAGES):
                c = start + cols
                mask = rmask[:, None] & (c < hi)[None, :]
                m_b = tl.load(mb_ptr + rows * NBLK + start // BLOCK_V, mask=rmask, other=0.0)
                scale = tl.exp2((m_b - m_sub) * inv_tau2) * inv_s  # (BLOCK_R,); 0 * inf = NaN for an all -inf row
                q = tl.load(y_rows + c[None, :], mask=mask, other=0.0).to(m.dtype)
                tl.store(y_rows + c[None, :], (q * scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gumbel_bwd_kernel(
    x_ptr, noise_ptr, seed_ptr, tau_ptr, m_ptr, s_ptr, idx_ptr, dy_ptr, dx_ptr, pd_ptr,
    stride_x, stride_n, stride_dy, stride_dx, R, V, CHUNK_V, NSPLIT, inv_tau, inv_tau_lo,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, HAS_NOISE: tl.constexpr,
    FP64: tl.constexpr, FAST_LOG: tl.constexpr, TAU_PTR: tl.constexpr, NUM_STAGES: tl.constexpr,
    KEEP: tl.constexpr, PHASE: tl.constexpr,
):
    """dx = y * (dy - sum(dy * y)) * inv_tau, y rebuilt from logits, the same noise and (m, s).

    The sample's entry k (the forward's index: t_k = m, so y_k = 1 / s) is computed apart, as
        dx_k = y_k e inv_tau,   e = sum_j (dy_k - dy_j) y_j     (= dy_k - sum(dy * y) as sum(y) = 1)
    On a peaked row (y_k near 1) dy_k - sum(dy * y) is a small difference of two numbers near dy_k,
    one ulp of which is the largest error of the row (eager's softmax backward keeps it); e is a
    sum of small terms (its k term is exactly 0), so dx_k is accurate to a few ulps of them.

    One block a row (SINGLE, PHASE 0): one pass from registers. Rows over several blocks take two
    launches on an (R, NSPLIT) grid, a program per chunk of CHUNK_V columns (NSPLIT = 1: one per
    row; split_plan): PHASE 1 runs pass 1 over its chunk and stores its parts of sum(dy * y) and e
    in pd (R, NSPLIT, 2); PHASE 2 sums the row's parts, stores dx_k if k is in its chunk, and runs
    pass 2 over the chunk with k masked out. (Both passes in one program kept e or the dot live
    across pass 2: 59-84 registers for the fp32 loop, against 32 / 40 for the two phases; AOT.)
    With in-kernel noise, PHASE 1 keeps y in dx (in dx's dtype, as eager's softmax backward keeps
    y_soft in the logits' dtype) and PHASE 2 reads it back, so the noise is drawn once: one more
    write per element for ~70 fewer instructions per element. Given noise makes y two loads away
    (and KEEP off draws the noise again): PHASE 2 rebuilds it as PHASE 1 does.
    """
    tl.static_assert(SINGLE == (PHASE == 0), "one block a row is PHASE 0; the loop is PHASE 1 then 2")
    rows, rmask, inv_tau, inv_tau2, seed = _program_rows(R, inv_tau, inv_tau_lo, tau_ptr, seed_ptr,
                                                         BLOCK_R, HAS_NOISE, FP64, TAU_PTR)
    cols = tl.arange(0, BLOCK_V)
    lo, hi = _chunk(V, CHUNK_V, PHASE)
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
    m_sub = tl.where(m == _NEG_INF, 0.0, m)[:, None]
    y_k = 1.0 / s  # exp((m - m) / tau) / s: y at the sample's column k (one division: fp64's is a call)
    inv_s = y_k[:, None]
    k = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int32)  # (BLOCK_R,) the sample's column
    dy_k = tl.load(dy_ptr + rows * stride_dy + k, mask=rmask, other=0.0).to(m.dtype)
    dy_rows = dy_ptr + rows[:, None] * stride_dy
    dx_rows = dx_ptr + rows[:, None] * stride_dx

    if PHASE == 2:
        part, kmask, _ = _row_partials(rows, rmask, NSPLIT)
        dot = tl.sum(tl.load(pd_ptr + part, mask=kmask, other=0.0), 1)
        e = tl.sum(tl.load(pd_ptr + part + 1, mask=kmask, other=0.0), 1)
        # dx_k first (behind PHASE 1's y store there: the previous launch); pass 2 skips it
        tl.store(dx_ptr + rows * stride_dx + k, (y_k * e * inv_tau).to(dx_ptr.dtype.element_ty),
                 mask=rmask & (k >= lo) & (k < hi))
        for start in tl.range(lo, hi, BLOCK_V, num_stages=NUM_STAGES):
            c = start + cols
            mask = rmask[:, None] & (c < hi)[None, :]
            if HAS_NOISE or not KEEP:  # given noise (or KEEP off): y rebuilt as in PHASE 1
                t, g = _t_tile(x_ptr, noise_ptr, seed, rows, start, mask, stride_x, stride_n,
                              BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
                y = tl.exp2((t - m_sub) * inv_tau2) * inv_s
            else:
                y = tl.load(dx_rows + c[None, :], mask=mask, other=0.0).to(dot.dtype)
            dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(y.dtype)
            dx = y * (dy - dot[:, None]) * inv_tau
            tl.store(dx_rows + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask & (c != k[:, None]))
    else:
        c = lo + cols
        mask = rmask[:, None] & (c < hi)[None, :]
        t, g = _t_tile(x_ptr, noise_ptr, seed, rows, lo, mask, stride_x, stride_n,
                       BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
        y = tl.exp2((t - m_sub) * inv_tau2) * inv_s
        dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(y.dtype)
        dot = tl.sum(dy * y, 1)
        e = tl.sum((dy_k[:, None] - dy) * y, 1)
        if SINGLE:
            dx = y * (dy - dot[:, None]) * inv_tau
            # dx_k: a select for packed rows, k masked out and a scalar store for one row a program
            # (each form spilled in the other's configs: 32x32 fp16 under triton 3.6, 16384 columns under 3.9)
            dx_k = y_k * e * inv_tau
            if BLOCK_R > 1:
                dx = tl.where(c[None, :] == k[:, None], dx_k[:, None], dx)
                tl.store(dx_rows + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(dx_rows + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask & (c[None, :] != k[:, None]))
                tl.store(dx_ptr + rows * stride_dx + k, dx_k.to(dx_ptr.dtype.element_ty), mask=rmask)
        else:  # PHASE 1
            if not HAS_NOISE and KEEP:
                tl.store(dx_rows + c[None, :], y.to(dx_ptr.dtype.element_ty), mask=mask)
            for start in tl.range(lo + BLOCK_V, hi, BLOCK_V, num_stages=NUM_STAGES):
                c = start + cols
                mask = rmask[:, None] & (c < hi)[None, :]
                t, g = _t_tile(x_ptr, noise_ptr, seed, rows, start, mask, stride_x, stride_n,
                              BLOCK_R, BLOCK_V, HAS_NOISE, FP64, FAST_LOG)
                y = tl.exp2((t - m_sub) * inv_tau2) * inv_s
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(y.dtype)
                dot += tl.sum(dy * y, 1)
                e += tl.sum((dy_k[:, None] - dy) * y, 1)
                if not HAS_NOISE and KEEP:
                    tl.store(dx_rows + c[None, :], y.to(dx_ptr.dtype.element_ty), mask=mask)
            part = _own_partial(rows, NSPLIT)
            tl.store(pd_ptr + part, dot, mask=rmask)
            tl.store(pd_ptr + part + 1, e, mask=rmask)


# ----------------------------------------------------------------------------------------------
# launchers


def _configs(dtype):
    if dtype == torch.float64:
        return _SINGLE_CONFIGS_FP64, _MULTI_CONFIG_FP64
    return _SINGLE_CONFIGS, _MULTI_CONFIG


def _one_block_ok(block_v: int, given_noise_bwd: bool) -> bool:
    """Whether a one-block-a-row config of width ``block_v`` may serve (the given-noise backward's
    cap, _GIVEN_NOISE_BWD_MAX_SINGLE): the one test that pick_config and the AOT registry
    (_aot_stages) both apply. (Defined below the kernels: Triton's cache key holds each kernel's
    starting line, so a line added above them recompiles every one of them, ~7 CPU-minutes in CI.)"""
    return not (given_noise_bwd and block_v > _GIVEN_NOISE_BWD_MAX_SINGLE)


def pick_config(V: int, dtype=torch.float32, *, block_r=None, block_v=None, num_warps=None,
                given_noise_bwd: bool = False):
    """(BLOCK_R, BLOCK_V, num_warps, SINGLE) for rows of length V; the keywords force a choice (tests).
    ``given_noise_bwd``: for the backward with explicit noise, whose one-block form is kept to
    _GIVEN_NOISE_BWD_MAX_SINGLE columns. The loop path's NUM_STAGES is ``loop_stages``."""
    singles, multi = _configs(dtype)
    for max_v, br, bv, nw in singles:
        if V <= max_v and _one_block_ok(bv, given_noise_bwd):
            break
    else:
        br, bv, nw = multi
    if block_v is not None:
        if block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
        bv = block_v
        br = 1 if block_r is None else br
    if block_r is not None:
        if block_r < 1 or block_r & (block_r - 1):
            raise ValueError(f"block_r must be a power of two >= 1, got {block_r}")
        br = block_r
    if br > 1 and V > bv:
        raise ValueError(f"block_r > 1 needs the row in one block: V={V} > block_v={bv}")
    return br, bv, num_warps or nw, V <= bv


def loop_stages(single: bool, has_noise: bool, dtype, num_stages=None, aligned: bool = True) -> int:
    """NUM_STAGES for a launch: ``num_stages`` (>= 1) forces it on the loop path (tests, sweeps).
    ``aligned``: the launch's rows are 16-aligned (``rows_aligned``)."""
    if single:
        return 1
    return stages(num_stages, _LOOP_STAGES if aligned and not has_noise and dtype != torch.float64 else 1)


def keep_flag(single: bool, has_noise: bool, keep=None, hard: bool = False) -> bool:
    """KEEP for a launch: ``keep`` (None: _KEEP) on the loop path with in-kernel noise; True where
    it changes nothing (one block, given noise, a hard forward: ``hard``, which has no second pass
    over the logits), so those launches compile one variant."""
    if single or has_noise or hard:
        return True
    return _KEEP if keep is None else bool(keep)


def split_plan(R: int, V: int, block_v: int, single: bool, device, split=None, auto: bool = True) -> tuple[int, int]:
    """(NSPLIT, CHUNK_V) of a launch: its rows cut into NSPLIT chunks of CHUNK_V columns (a multiple
    of block_v), or (1, V), one program per row. ``split`` forces the count (tests, sweeps; clipped
    so every chunk holds at least one block); None: on CUDA, split when the rows alone give fewer
    than _SPLIT_PROGRAMS_PER_SM programs per SM, if ``auto`` (the launchers: in-kernel noise, not
    fp64, 16-aligned rows: the path that is timed; given noise and fp64 are for verification;
    _auto_split). One block a row (``single``) never splits."""
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be an int >= 1, got {split!r}")
    if single or V > 2**30:  # lo + CHUNK_V stays within int32
        return 1, V
    nblk = cdiv(V, block_v)
    if split is None:
        if not auto or device.type != "cuda":  # the interpreter: tests force split
            return 1, V
        split = min(cdiv(_SPLIT_PROGRAMS_PER_SM * num_sms(device), max(R, 1)), nblk // _SPLIT_MIN_BLOCKS)
    split = max(1, min(split, nblk, _MAX_SPLIT_N))
    if split == 1:
        return 1, V
    per = cdiv(nblk, split)  # blocks per chunk
    return cdiv(nblk, per), per * block_v


def _auto_split(has_noise: bool, dtype, aligned: bool) -> bool:
    """Whether split_plan may split a launch on its own: in-kernel noise, not fp64, 16-aligned rows
    (the pipelined path; unaligned rows' scalar loads took 103 registers in the backward's PHASE 1,
    sm_90: one 16-warp program per SM, fewer than one program per row runs)."""
    return not has_noise and dtype != torch.float64 and aligned


def rows_aligned(V: int, *rows) -> bool:
    """Whether Triton's JIT specialises a launch over these (R, V) tensors (unit column stride) as
    16-aligned (the AOT tool's "aligned" variant, 128-bit loads): V, each row stride and each pointer
    divisible by 16 (``_launch.aligned16``). Only the pipelining depth depends on it, never a result."""
    return aligned16((V,), rows)


# whether this module's kernels are interpreted: fixed when they were decorated (at import), as
# triton reads TRITON_INTERPRET then; read once, not per launch
_INTERPRETED = interpret_mode()


def _fast_log(x) -> bool:
    # the hardware log for the noise's outer log: compiled kernels only (the interpreter lacks it)
    return x.is_cuda and not _INTERPRETED


def _placeholder_seed(device):
    # the seed pointer is not read when the noise is explicit; any int64 tensor keeps the signature
    return torch.empty((1,), dtype=torch.int64, device=device)


def split_inv_tau(inv_tau: float) -> tuple[float, float]:
    """1/tau as two fp32 values, hi + lo (hi = fp32(1/tau), lo = fp32(1/tau - hi)): Triton passes a
    Python float argument as fp32, so fp64 kernels would compute z = t * fp32(1/tau), 1e-8 off in y
    where fp64 eager is 1e-16 off; they add hi + lo in fp64 (~48 bits). Other dtypes use hi alone."""
    try:
        hi = struct.unpack("f", struct.pack("f", inv_tau))[0]
    except OverflowError:  # (some Pythons) 1/tau beyond fp32's range, tau < ~3e-39
        hi = float("inf")
    if hi == float("inf"):  # inf, as an fp32 argument would be; no inf - inf in lo
        return hi, 0.0
    return hi, struct.unpack("f", struct.pack("f", inv_tau - hi))[0]


def _inv_tau_args(inv_tau: float, tau) -> tuple[float, float]:
    # with a tau tensor the kernel reads tau itself; the float arguments are placeholders
    return (1.0, 0.0) if tau is not None else split_inv_tau(inv_tau)


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@on_tensor_device
def gumbel_fwd(x, inv_tau: float, hard: bool, noise=None, seed=None, *, tau=None, block_r=None, block_v=None,
               num_warps=None, num_stages=None, keep=None, split=None, write_noise: bool = False,
               store_y: bool = True):
    """x (R, V) with unit column stride; noise (R, V) in x.dtype or None (then seed, a 0-d int64 tensor).
    tau: None, or a 0-d float64 tensor on x's device holding tau, read by the kernel (inv_tau unused).
    keep: the loop path's KEEP (None: _KEEP); only a soft forward with in-kernel noise over several
    blocks has a pass 2 that it changes. split: chunks per row on the loop path (None: split_plan's
    choice; two launches when > 1).

    Returns y (R, V) in x.dtype (None when not store_y: index only, hard only), idx (R,) int64,
    m (R,) = max of t = x + g, s (R,) = sum exp((t - m) / tau) (None when not store_y)
    [, g (R, V) fp32 if write_noise].
    """
    R, V = x.shape
    if not (store_y or hard):
        raise ValueError("store_y=False (the index alone) needs hard=True")
    BR, BV, nw, single = pick_config(V, x.dtype, block_r=block_r, block_v=block_v, num_warps=num_warps)
    y = torch.empty((R, V), dtype=x.dtype, device=x.device) if store_y else None
    idx = torch.empty((R,), dtype=torch.int64, device=x.device)
    m = torch.empty((R,), dtype=_stats_dtype(x.dtype), device=x.device)
    s = torch.empty_like(m) if store_y else None
    g = torch.empty((R, V), dtype=torch.float32, device=x.device) if write_noise else x  # x: not written
    has_noise = noise is not None
    # soft rows over several blocks with in-kernel noise: the running max after each block, for
    # pass 2's rescale of q
    nblk = cdiv(V, BV)
    keep = keep_flag(single, has_noise, keep, hard)
    mb = torch.empty((R, nblk), dtype=m.dtype, device=x.device) if keep and not (single or hard or has_noise) else m
    aligned = single or rows_aligned(V, x)
    nsplit, chunk_v = split_plan(R, V, BV, single, x.device, split, _auto_split(has_noise, x.dtype, aligned))
    if nsplit > 1:  # the chunks' partials: (max t, s) and (argmax, first NaN column)
        pf = torch.empty((R, nsplit, 2), dtype=m.dtype, device=x.device)
        pi = torch.empty((R, nsplit, 2), dtype=torch.int32, device=x.device)
    else:
        pf, pi = m, idx  # not read
    for phase in ((1, 2) if nsplit > 1 else (0,)) if R else ():
        direct(_gumbel_fwd_kernel)[(cdiv(R, BR), nsplit)](
            x, noise if has_noise else x, idx if has_noise else seed, m if tau is None else tau,
            x if y is None else y, idx, m, m if s is None else s, g, mb, pf, pi,
            x.stride(0), noise.stride(0) if has_noise else 0, 0 if y is None else y.stride(0), R, V, nblk,
            chunk_v, nsplit, *_inv_tau_args(inv_tau, tau),
            BLOCK_R=BR, BLOCK_V=BV, SINGLE=single, HARD=bool(hard), HAS_NOISE=has_noise,
            FP64=x.dtype == torch.float64, WRITE_NOISE=bool(write_noise), FAST_LOG=_fast_log(x),
            STORE_Y=y is not None, TAU_PTR=tau is not None,
            NUM_STAGES=loop_stages(single, has_noise, x.dtype, num_stages, aligned),
            KEEP=keep, PHASE=phase, num_warps=nw, enable_fp_fusion=True,
        )
    if write_noise:
        return y, idx, m, s, g
    return y, idx, m, s


@on_tensor_device
def gumbel_bwd(dy, x, m, s, inv_tau: float, noise=None, seed=None, *, idx, tau=None, block_r=None, block_v=None,
               num_warps=None, num_stages=None, keep=None, split=None):
    """dlogits (R, V) in x.dtype from dy (R, V) (unit column stride), the forward's (m, s), its index
    ``idx`` (R,) (the argmax of t, whose entry the kernel computes apart) and noise source;
    tau, keep and split as gumbel_fwd's."""
    R, V = x.shape
    has_noise = noise is not None
    BR, BV, nw, single = pick_config(V, x.dtype, block_r=block_r, block_v=block_v, num_warps=num_warps,
                                     given_noise_bwd=has_noise)
    dx = torch.empty((R, V), dtype=x.dtype, device=x.device)
    aligned = single or rows_aligned(V, x, dy)
    nsplit, chunk_v = split_plan(R, V, BV, single, x.device, split, _auto_split(has_noise, x.dtype, aligned))
    # the loop path is always two launches, also at one chunk a row (the kernel's docstring: registers)
    pd = m if single else torch.empty((R, nsplit, 2), dtype=m.dtype, device=x.device)  # parts of sum(dy * y), e
    for phase in ((0,) if single else (1, 2)) if R else ():
        direct(_gumbel_bwd_kernel)[(cdiv(R, BR), nsplit)](
            x, noise if has_noise else x, _placeholder_seed(x.device) if has_noise else seed, m if tau is None else tau,
            m, s, idx, dy, dx, pd,
            x.stride(0), noise.stride(0) if has_noise else 0, dy.stride(0), dx.stride(0), R, V, chunk_v, nsplit,
            *_inv_tau_args(inv_tau, tau), BLOCK_R=BR, BLOCK_V=BV, SINGLE=single, HAS_NOISE=has_noise,
            FP64=x.dtype == torch.float64, FAST_LOG=_fast_log(x), TAU_PTR=tau is not None,
            NUM_STAGES=loop_stages(single, has_noise, x.dtype, num_stages, aligned),
            KEEP=keep_flag(single, has_noise, keep), PHASE=phase, num_warps=nw, enable_fp_fusion=True,
        )
    return dx


# ----------------------------------------------------------------------------------------------
# ahead-of-time compile configurations: every (dtype, block config, flag) the launchers pick on
# their default path (WRITE_NOISE, a test hook, is never picked)


def _tt(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}[dtype]


def _block_configs(dtype):
    singles, multi = _configs(dtype)
    for _max_v, br, bv, nw in singles:
        yield br, bv, nw, True
    yield multi[0], multi[1], multi[2], False


def _aot_configs():
    for dtype in _AOT_DTYPES:
        dt, st = _tt(dtype), _tt(_stats_dtype(dtype))
        for has_noise in (False, True):  # explicit noise comes in logits' dtype (fused_s2s.gumbel casts it)
            for br, bv, nw, single in _block_configs(dtype):
                # TAU_PTR (tau read from a tensor: the decoder pass replayed from a CUDA graph) with
                # the in-kernel noise, which is what that pass draws; its tau_ptr is fp64
                tau_ptr = (False, True) if not has_noise else (False,)
                for tp in tau_ptr:
                    yield from _aot_one(dtype, dt, st, has_noise, br, bv, nw, single, tp)


def _aot_one(dtype, dt, st, has_noise, br, bv, nw, single, tau_ptr):
    # the loop path's NUM_STAGES depends on the rows' alignment (loop_stages): unaligned rows run the
    # generic variant at its stages, aligned rows the aligned one at theirs
    ns_generic = loop_stages(single, has_noise, dtype, aligned=False)
    ns_aligned = loop_stages(single, has_noise, dtype, aligned=True)
    if ns_generic == ns_aligned:
        yield from _aot_stages(dtype, dt, st, has_noise, br, bv, nw, single, tau_ptr, ns_aligned, aot.VARIANTS)
    else:
        yield from _aot_stages(dtype, dt, st, has_noise, br, bv, nw, single, tau_ptr, ns_generic, ("generic",))
        yield from _aot_stages(dtype, dt, st, has_noise, br, bv, nw, single, tau_ptr, ns_aligned, ("aligned",))


def _aot_stages(dtype, dt, st, has_noise, br, bv, nw, single, tau_ptr, stages, variants):
    common = {"BLOCK_R": br, "BLOCK_V": bv, "SINGLE": single, "HAS_NOISE": has_noise,
              "FP64": dtype == torch.float64, "FAST_LOG": True,  # what a CUDA launch picks
              "TAU_PTR": tau_ptr, "NUM_STAGES": stages, "KEEP": keep_flag(single, has_noise)}
    tp = "fp64" if tau_ptr else st
    label = (f"{dt} noise={'given' if has_noise else 'philox'} {br}x{bv}{'' if single else ' loop'}"
             f"{' tau_ptr' if tau_ptr else ''}{'' if single else f' stages={stages}'}")
    # the forward: split rows (split_plan: the loop path with in-kernel noise, not fp64, aligned
    # rows) add the two phases
    phases = (0, 1, 2) if not single and _auto_split(has_noise, dtype, "aligned" in variants) else (0,)
    for phase in phases:
        pl = f" phase={phase}" if phase else ""
        vs = ("aligned",) if phase else variants  # the launcher splits aligned rows only
        ints = {"pi_ptr": "*i32" if phase else "*i64"}  # PHASE 0: the index buffer stands in (not read)
        # the index alone (gumbel_sample) is tau-free: no TAU_PTR variant
        for hard, store_y in ((False, True), (True, True)) + (() if tau_ptr else ((True, False),)):
            sig = {"x_ptr": f"*{dt}", "noise_ptr": f"*{dt}", "seed_ptr": "*i64", "tau_ptr": f"*{tp}", "y_ptr": f"*{dt}",
                   "idx_ptr": "*i64", "m_ptr": f"*{st}", "s_ptr": f"*{st}", "g_ptr": f"*{dt}",
                   "mb_ptr": f"*{st}", "pf_ptr": f"*{st}", **ints, "stride_x": "i32", "stride_n": "i32",
                   "stride_y": "i32", "R": "i32", "V": "i32", "NBLK": "i32", "CHUNK_V": "i32", "NSPLIT": "i32",
                   "inv_tau": "fp32", "inv_tau_lo": "fp32", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "SINGLE": "constexpr",
                   "HARD": "constexpr", "HAS_NOISE": "constexpr", "FP64": "constexpr",
                   "WRITE_NOISE": "constexpr", "FAST_LOG": "constexpr", "STORE_Y": "constexpr",
                   "TAU_PTR": "constexpr", "NUM_STAGES": "constexpr", "KEEP": "constexpr", "PHASE": "constexpr"}
            kind = " index" if not store_y else " hard" if hard else ""
            # a hard PHASE 2 only writes the one-hot (no pipelined loop); the index alone, nothing
            piped = stages > 1 and not (phase == 2 and hard)
            yield aot.AOTConfig(_gumbel_fwd_kernel, sig,
                                dict(common, HARD=hard, WRITE_NOISE=False, STORE_Y=store_y, PHASE=phase,
                                     KEEP=keep_flag(single, has_noise, hard=hard)),  # as gumbel_fwd passes it
                                num_warps=nw, label=f"fwd {label}{kind}{pl}",
                                pipelined=piped, variants=vs)
    # the backward: one block a row is PHASE 0; the loop is always PHASE 1 then 2 (gumbel_bwd),
    # split or not, aligned or not; explicit noise takes the loop past _GIVEN_NOISE_BWD_MAX_SINGLE
    for phase in () if single and not _one_block_ok(bv, has_noise) else ((0,) if single else (1, 2)):
        sig = {"x_ptr": f"*{dt}", "noise_ptr": f"*{dt}", "seed_ptr": "*i64", "tau_ptr": f"*{tp}", "m_ptr": f"*{st}",
               "s_ptr": f"*{st}", "idx_ptr": "*i64", "dy_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "pd_ptr": f"*{st}", "stride_x": "i32",
               "stride_n": "i32", "stride_dy": "i32", "stride_dx": "i32", "R": "i32", "V": "i32",
               "CHUNK_V": "i32", "NSPLIT": "i32",
               "inv_tau": "fp32", "inv_tau_lo": "fp32", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "SINGLE": "constexpr",
               "HAS_NOISE": "constexpr", "FP64": "constexpr", "FAST_LOG": "constexpr", "TAU_PTR": "constexpr",
               "NUM_STAGES": "constexpr", "KEEP": "constexpr", "PHASE": "constexpr"}
        yield aot.AOTConfig(_gumbel_bwd_kernel, sig, dict(common, PHASE=phase), num_warps=nw,
                            label=f"bwd {label}{f' phase={phase}' if phase else ''}",
                            pipelined=stages > 1, variants=variants)


aot.register("gumbel", _aot_configs)
