"""Philox-4x32-10 in torch integer ops: the same random numbers as Triton's ``tl.philox``/``tl.rand``.

The fused kernels draw Gumbel noise inside the kernel with a counter-based generator keyed by
(seed, logical element index); the eager reference calls this module with the same seed and the
same indices, so both see the same noise (SPEC section 5, "same seed, same run").

Noise layout of a (rows, V) tensor (``uniform_noise`` / ``gumbel_noise``; the kernels in
``fused_s2s.kernels.gumbel`` build the same counters with ``tl.philox``):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (col // 4, row & 0xffffffff, row >> 32, 0)      -> four 32-bit words w0..w3
    element (row, col) takes word w[col % 4]
One Philox evaluation (10 rounds of 32-bit multiplies) serves four neighbouring columns: the
noise costs a quarter of the integer work of one ``tl.rand`` per element, which is what bounds
the kernel on a GPU (it is not memory-bound otherwise). The element is named by its logical
(row, col), never by a memory address or a block index, so the noise does not depend on block
sizes, warps or strides, and no ``row * V + col`` product can overflow.

``uniform(seed, offsets)`` is ``tl.rand(seed, offsets)`` itself (counter (offset lo, offset hi, 0,
0), first word), kept to test this module's Philox rounds against Triton's bit for bit.

A word becomes a float in [0, 1) exactly as ``tl.uint_to_uniform_float`` does:
    x = int32(bits);  x = ~x if x < 0;  u = float32(x) * 4.6566127342e-10
Gumbel noise: g = -log(-log(max(u, U_MIN))), U_MIN the smallest non-zero u, so g is always finite.

uint32 arithmetic is emulated in int64 (products of two uint32 wrap mod 2**64 in int64, which keeps
the low 64 bits exact: that is all umulhi and the low word need).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # tl.uint_to_uniform_float's scale for 32-bit words
U_MIN = UNIFORM_SCALE  # smallest non-zero uniform; u = 0 is clamped up to it

SEED_HIGH = 2**62  # seeds are drawn in [0, SEED_HIGH): non-negative int64


def _mulhilo(a: int, b: torch.Tensor):
    p = b * a  # int64, wraps mod 2**64: the bit pattern of the 64-bit product
    return (p >> 32) & _M32, p & _M32


def philox4x32(seed: int | torch.Tensor, c0, c1, c2, c3, n_rounds: int = N_ROUNDS):
    """Philox-4x32 rounds on int64 tensors holding uint32 values; seed a Python int or int64 scalar tensor."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=c0.device)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def randint(seed, offsets: torch.Tensor) -> torch.Tensor:
    """First Philox output word for each offset, as int64 holding a uint32 (tl.randint)."""
    offsets = offsets.to(torch.int64)
    lo = offsets & _M32
    hi = (offsets >> 32) & _M32
    zero = torch.zeros_like(lo)
    return philox4x32(seed, lo, hi, zero, zero)[0]


def _word_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 words -> float32 in [0, 1), as tl.uint_to_uniform_float."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def _uniforms4(w) -> torch.Tensor:
    """The four Philox words, each (...,), as uniforms stacked on a last axis: (..., 4)."""
    return torch.stack([_word_to_uniform(x) for x in w], dim=-1)


def _gumbel_of(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp_min(U_MIN)))


def uniform(seed, offsets: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), bit for bit what ``tl.rand(seed, offsets)`` returns."""
    return _word_to_uniform(randint(seed, offsets))


def _rows_cols(shape):
    shape = tuple(int(s) for s in shape)
    V = shape[-1] if shape else 1
    R = 1
    for s in shape[:-1]:
        R *= s
    return R, V


def uniform_noise(seed, shape, device=None) -> torch.Tensor:
    """Uniforms of the kernels' noise layout for a tensor of ``shape`` (rows = leading dims flattened).

    Element (row, col) takes word ``col % 4`` of Philox(seed, (col // 4, row lo, row hi, 0)).
    """
    R, V = _rows_cols(shape)
    K = -(-V // 4)  # counters per row
    c0 = torch.arange(K, dtype=torch.int64, device=device).expand(R, K)  # (R, K)
    row = torch.arange(R, dtype=torch.int64, device=device)[:, None].expand(R, K)
    w = philox4x32(seed, c0, row & _M32, (row >> 32) & _M32, torch.zeros_like(c0))  # 4 x (R, K)
    u = _uniforms4(w).reshape(R, 4 * K)[:, :V]  # word col % 4
    return u.reshape(tuple(shape))


def gumbel_noise(seed, shape, device=None) -> torch.Tensor:
    """Gumbel(0, 1) noise in float32 for a tensor of ``shape``: what the fused kernel draws."""
    return _gumbel_of(uniform_noise(seed, shape, device))


def uniform_at(seed, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The uniforms of single elements (row, col) of that layout (broadcast), e.g. rows past 2**31 / V."""
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    w = philox4x32(seed, cols >> 2, rows & _M32, (rows >> 32) & _M32, torch.zeros_like(rows))
    return _uniforms4(w).gather(-1, (cols & 3)[..., None])[..., 0]


def gumbel_at(seed, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Gumbel noise of single elements (row, col) (broadcast)."""
    return _gumbel_of(uniform_at(seed, rows, cols))


def draw_seed(device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh seed from torch's RNG, as a 0-d int64 tensor on ``device``.

    It stays on the device (no host sync, capturable in CUDA graphs); kernels load it by pointer.
    ``torch.manual_seed`` reproduces it; ``generator`` (on the same device) is honoured.
    """
    if generator is not None:
        device = generator.device
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device, generator=generator)
