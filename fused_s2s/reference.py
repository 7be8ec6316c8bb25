"""The textbook eager model of SPEC sections 1-2: a plain per-step loop of torch ops.

Nothing here is fused or clever: every line is one step of the notes, so a reader can check it
against SPEC section 1 (steps 1-8) and section 2 (teacher forcing, scheduled sampling,
Gumbel-softmax). The fused model in ``fused_s2s/model.py`` has the same submodule names, so a
state_dict loads into either class, and it draws random numbers in the same order, so with the same
``torch.manual_seed`` both give the same loss and gradients in every sampling mode.

Two small functions are the eager backend of the fused ops (SPEC section 4):
    attention_eager(query, keys, values=None, mask=None)   -> ctx, weights   (steps 3-5)
    gumbel_softmax_eager(logits, tau, hard, noise)          -> y              (section 2)
    gumbel_argmax_eager(logits, noise)                       -> index          ("sample")

Symbols: B batch, L source length, T target steps, V vocabulary, D hidden = embedding size.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_s2s import backend as _backend
from fused_s2s import philox
from fused_s2s._checks import (
    check_batch,
    check_choice,
    check_float,
    check_generator,
    check_ids as _check_ids,
    check_int_tensor,
    check_ratio,
    check_same_device,
    check_tau,
    check_tensor,
    to_device,
)

CELLS = ("lstm", "gru")
SAMPLING_MODES = ("argmax", "sample", "gumbel", "gumbel_hard", "softmax")
COINS = ("token", "step", "sequence")

__all__ = [
    "attention_eager",
    "gumbel_softmax_eager",
    "gumbel_argmax_eager",
    "mask_from",
    "Encoder",
    "DecoderState",
    "AttentionDecoder",
    "DecoderOutput",
    "Seq2Seq",
    "Seq2SeqOutput",
]


# ----------------------------------------------------------------------------------------------
# The two eager ops
# ----------------------------------------------------------------------------------------------
def mask_from(mask, B: int, L: int, device, name: str = "mask") -> Tensor | None:
    """Normalise a source mask to bool (B, L), True = attend.

    ``mask`` is None (attend everywhere: returns None), lengths (B,) of any integer dtype (position
    j is attended iff j < length), or bool (B, L). Only shapes/dtypes are checked (no host sync).
    """
    if mask is None:
        return None
    check_tensor(name, mask, ndim=(1, 2))
    if mask.dim() == 1:  # lengths
        check_int_tensor(name, mask)
        if mask.shape[0] != B:
            raise ValueError(f"{name} (lengths) must have shape ({B},), got {tuple(mask.shape)}")
        lengths = mask.to(device=device, dtype=torch.long)  # (B,)
        return torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, L)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be integer lengths (B,) or a bool (B, L) mask, got 2-D {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{name} (bool) must have shape ({B}, {L}), got {tuple(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {mask.device}")
    return mask


def attention_eager(query: Tensor, keys: Tensor, values: Tensor | None = None, mask=None):
    """Masked dot-product attention, SPEC section 1 steps 3-5, for a query already multiplied by W_a.

        E     = query keys^T           (B, [T,] L)   masked positions -> -inf
        alpha = softmax(E)             (B, [T,] L)
        ctx   = alpha values           (B, [T,] Dv)

    query (B, D) or (B, T, D); keys (B, L, D); values (B, L, Dv) or None (values = keys);
    mask None | lengths (B,) integer | bool (B, L), True = attend (shared by all T queries).
    Returns (ctx, weights) in query's dtype. A row with nothing to attend to gives weights 0 and
    ctx 0, and zero gradient, never NaN: the softmax is taken with the max over the valid entries
    and divided by a sum that is replaced by 1 where it is 0 (a row with a valid entry has sum >= 1).
    """
    check_float("query", query, ndim=(2, 3))
    check_float("keys", keys, ndim=3, device=query.device)
    if values is None:
        values = keys
    check_float("values", values, ndim=3, device=query.device)
    B, L, D = keys.shape
    if query.shape[0] != B or query.shape[-1] != D:
        raise ValueError(f"query must have shape ({B}, D={D}) or ({B}, T, {D}) to match keys {tuple(keys.shape)}, "
                         f"got {tuple(query.shape)}")
    if values.shape[:2] != (B, L):
        raise ValueError(f"values must have shape ({B}, {L}, Dv) to match keys, got {tuple(values.shape)}")
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        raise TypeError(f"query, keys, values must share a dtype, got {query.dtype}, {keys.dtype}, {values.dtype}")
    mask = mask_from(mask, B, L, query.device)  # (B, L) bool or None

    single = query.dim() == 2
    q = query.unsqueeze(1) if single else query  # (B, T, D)
    E = torch.bmm(q, keys.transpose(1, 2))  # (B, T, L)   step 3: scores
    if mask is None:
        alpha = torch.softmax(E, dim=-1)  # (B, T, L)   step 4
    else:
        m3 = mask.unsqueeze(1)  # (B, 1, L)
        E = E.masked_fill(~m3, float("-inf"))  # (B, T, L)   padded positions get -inf
        # the max over valid entries; -inf for a fully masked row -> use 0 so exp(-inf - 0) = 0
        E_max = E.detach().amax(dim=-1, keepdim=True)  # (B, T, 1)
        E_max = torch.where(torch.isfinite(E_max), E_max, torch.zeros_like(E_max))
        p = torch.exp(E - E_max)  # (B, T, L)   masked -> exactly 0
        s = p.sum(dim=-1, keepdim=True)  # (B, T, 1)   >= 1 unless the row is fully masked
        s = torch.where(s > 0, s, torch.ones_like(s))  # fully masked row: 0 / 1 = 0, finite gradient
        alpha = p / s  # (B, T, L)   step 4
    ctx = torch.bmm(alpha, values)  # (B, T, Dv)  step 5: context
    if single:
        return ctx.squeeze(1), alpha.squeeze(1)  # (B, Dv), (B, L)
    return ctx, alpha


def gumbel_softmax_eager(logits: Tensor, tau: float, hard: bool = False, noise: Tensor | None = None, dim: int = -1,
                         return_index: bool = False):
    """Gumbel-softmax over ``dim`` with explicit noise (SPEC section 2); returns y in logits' dtype.

        y_soft = softmax((logits + g) / tau)                          (..., V)
        hard:  y = one_hot(argmax(logits + g)) + (y_soft - y_soft.detach())

    ``noise`` g has logits' shape (e.g. from ``philox.gumbel_noise``); None means g = 0, which is
    the noise-free "softmax" mode softmax(logits / tau). Like the kernels (which load in fp32), the
    math runs in float32 (float64 for float64 logits), so half-precision models pick the same argmax.
    The straight-through form is written so that its forward value is exactly one-hot
    (y_soft - y_soft.detach() is exactly 0) while its gradient is the soft one's.
    ``return_index`` also returns the sample argmax(logits + g) over ``dim`` (ties: first; NaN wins).
    """
    check_float("logits", logits)
    tau = check_tau(tau)
    _check_noise(noise, logits)
    z = _perturbed(logits, noise)  # (..., V)  perturbed logits, float32 / float64
    # the row max subtracted before the division, as the kernels do: z / tau overflows for a small
    # tau (NaN rows from tau ~1e-37 with logits of a few units); softmax is shift-invariant, and
    # the max is detached, so the gradient is softmax(z / tau)'s
    y_soft = torch.softmax((z - z.amax(dim, keepdim=True).detach()) / tau, dim=dim)  # (..., V)
    index = z.argmax(dim=dim, keepdim=True)  # (..., 1)  Gumbel-max: a categorical sample
    if hard:
        y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)  # (..., V) exact one-hot
        y_soft = y_hard + (y_soft - y_soft.detach())  # forward: y_hard; backward: d y_soft
    if return_index:
        return y_soft.to(logits.dtype), index.squeeze(dim)
    return y_soft.to(logits.dtype)


def gumbel_argmax_eager(logits: Tensor, noise: Tensor, dim: int = -1) -> Tensor:
    """The Gumbel-max trick: argmax(logits + g) over ``dim``, a sample of softmax(logits) (not
    differentiable). In float32 (float64 for float64 logits), like the kernels, so half-precision
    models pick the same index; ties pick the first column, a NaN wins (torch.argmax)."""
    check_float("logits", logits)
    if noise is None:
        raise TypeError("noise must be a tensor of logits' shape (the Gumbel noise g), got None")
    _check_noise(noise, logits)
    return _perturbed(logits.detach(), noise).argmax(dim=dim)


def _check_noise(noise, logits) -> None:
    if noise is not None:
        check_float("noise", noise, device=logits.device)
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")


def _perturbed(logits: Tensor, noise: Tensor | None) -> Tensor:
    """logits + noise in the compute dtype: float32, or float64 for float64 logits."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(cdt)  # (..., V)
    return z if noise is None else z + noise.to(cdt)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _rnn_class(cell: str):
    check_choice("cell", cell, CELLS)
    return nn.LSTM if cell == "lstm" else nn.GRU


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_padding_idx(padding_idx, vocab_size):
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral) or not (
        0 <= padding_idx < vocab_size
    ):
        raise ValueError(f"padding_idx must be None or an integer in [0, {vocab_size}), got {padding_idx!r}")
    return int(padding_idx)


class Encoder(nn.Module):
    """Embedding + LSTM/GRU over the source (SPEC section 1, encoder)."""

    def __init__(self, vocab_size, hidden_size, cell="lstm", num_layers=1, padding_idx=None):
        super().__init__()
        self.vocab_size = _check_size("vocab_size", vocab_size)
        self.hidden_size = D = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        self.cell_type = cell
        self.padding_idx = _check_padding_idx(padding_idx, vocab_size)
        self.embedding = nn.Embedding(vocab_size, D, padding_idx=self.padding_idx)  # W_emb (V, D)
        self.rnn = _rnn_class(cell)(D, D, num_layers, batch_first=True)

    def forward(self, src: Tensor, src_lengths: Tensor, *, check_ids: bool = True):
        """src (B, L) ids, src_lengths (B,) integer on any device -> memory H (B, L, D), final state.

        H is zero at padded positions. The final state is in nn.LSTM/nn.GRU format. A zero length
        gives H = 0 and a zero final state (the state of an empty sequence).

        Host syncs on a GPU: the id check (``check_ids=False`` skips it, for callers that built the
        ids themselves), and lengths on the GPU (packing needs them on the host: pass them on the
        CPU). Lengths sorted longest first also spare packing its device copy of the sort order.
        """
        check_int_tensor("src", src, ndim=2)
        check_int_tensor("src_lengths", src_lengths, ndim=1)
        check_batch(src=src, src_lengths=src_lengths)
        if src.device != self.embedding.weight.device:
            raise ValueError(f"src is on {src.device} but the encoder's parameters are on "
                             f"{self.embedding.weight.device}; expected one device")
        if check_ids:
            _check_ids("src", src, self.vocab_size)
        B, L = src.shape
        if B == 0 or L == 0:
            raise ValueError(f"src must have shape (B, L) with B >= 1 and L >= 1, got {tuple(src.shape)}")
        lengths_cpu = src_lengths.detach().to("cpu", torch.long)  # pack_padded_sequence wants CPU lengths
        if (int(lengths_cpu.min()) < 0 or int(lengths_cpu.max()) > L):
            raise ValueError(f"src_lengths must be in [0, L={L}], got values in "
                             f"[{int(lengths_cpu.min())}, {int(lengths_cpu.max())}]")
        X = self.embedding(src.long())  # (B, L, D)
        packed_lengths = lengths_cpu.clamp_min(1)
        # already longest first (checked on the host): no sort order for packing to copy to the device
        in_order = bool((packed_lengths[:-1] >= packed_lengths[1:]).all())
        packed = pack_padded_sequence(X, packed_lengths, batch_first=True, enforce_sorted=in_order)
        out, final = self.rnn(packed)
        H, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, D), zero past length
        lengths = to_device(lengths_cpu, src.device)  # (B,)
        valid = torch.arange(L, device=src.device)[None, :] < lengths[:, None]  # (B, L)
        H = H * valid.unsqueeze(-1).to(H.dtype)  # (B, L, D)  zero-length rows ran one step: clear them
        nonempty = (lengths > 0).to(H.dtype)[None, :, None]  # (1, B, 1)
        if isinstance(final, tuple):  # LSTM: (h_n, c_n) each (num_layers, B, D)
            final = tuple(s * nonempty for s in final)
        else:  # GRU: h_n (num_layers, B, D)
            final = final * nonempty
        return H, final


class DecoderState(NamedTuple):
    """Decoder recurrent state between steps."""

    rnn: object  # GRU: h (num_layers, B, D); LSTM: tuple (h, c) each (num_layers, B, D)
    h_tilde: Tensor  # (B, D) attentional hidden h~ of the previous step (zeros at start)

    def reorder(self, index: Tensor) -> "DecoderState":
        """Select/repeat batch rows (beam search): index (B',) long -> state with batch B'."""
        if isinstance(self.rnn, tuple):
            rnn = tuple(s.index_select(1, index) for s in self.rnn)  # each (num_layers, B', D)
        else:
            rnn = self.rnn.index_select(1, index)  # (num_layers, B', D)
        return DecoderState(rnn, self.h_tilde.index_select(0, index))  # h~ (B', D)


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    attention: Tensor  # (B, T, L)
    state: DecoderState


class AttentionDecoder(nn.Module):
    """Luong "general" attention decoder (SPEC section 1 steps 1-7), one step at a time."""

    def __init__(self, vocab_size, hidden_size, cell="lstm", num_layers=1, padding_idx=None,
                 backend="auto", input_feed=False):
        # SPEC section 4's positional order (vocab_size, hidden_size, cell, num_layers, padding_idx,
        # backend); input_feed (the notes' decoder does not feed h~ back) comes after it
        super().__init__()
        self.vocab_size = V = _check_size("vocab_size", vocab_size)
        self.hidden_size = D = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        self.cell_type = cell
        self.padding_idx = _check_padding_idx(padding_idx, vocab_size)
        if not isinstance(input_feed, bool):
            raise TypeError(f"input_feed must be a bool, got {type(input_feed).__name__}")
        self.input_feed = input_feed
        self.backend = _backend.validate(backend)  # accepted for API parity; the reference is eager
        self.embedding = nn.Embedding(V, D, padding_idx=self.padding_idx)  # decoder's own W_emb (V, D)
        self.cell = _rnn_class(cell)(2 * D if input_feed else D, D, num_layers, batch_first=True)
        self.W_a = nn.Linear(D, D, bias=False)  # W_a (D, D)
        self.W_c = nn.Linear(2 * D, D, bias=False)  # W_c (2D, D)
        self.W_out = nn.Linear(D, V)  # W_out (D, V) + bias

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, encoder_final) -> DecoderState:
        """s_0 = the encoder's final state; h~_0 = zeros (B, D)."""
        if self.cell_type == "lstm":
            if not (isinstance(encoder_final, tuple) and len(encoder_final) == 2):
                raise TypeError("encoder_final must be an LSTM state tuple (h, c) for cell='lstm'")
            parts = encoder_final
        else:
            if isinstance(encoder_final, tuple):
                raise TypeError("encoder_final must be a GRU state tensor h (num_layers, B, D) for cell='gru'")
            parts = (encoder_final,)
        for i, s in enumerate(parts):
            check_float(f"encoder_final[{i}]", s, ndim=3)
            if s.shape[0] != self.num_layers or s.shape[2] != self.hidden_size or s.shape[1] != parts[0].shape[1]:
                raise ValueError(f"encoder_final[{i}] must have shape (num_layers={self.num_layers}, B, "
                                 f"D={self.hidden_size}), got {tuple(s.shape)}")
        h = parts[0]
        return DecoderState(encoder_final, h.new_zeros(h.shape[1], self.hidden_size))  # h~_0 (B, D)

    def _check_state(self, state, B, device):
        if not isinstance(state, DecoderState):
            raise TypeError(f"state must be a DecoderState, got {type(state).__name__}")
        parts = state.rnn if isinstance(state.rnn, tuple) else (state.rnn,)
        if len(parts) != (2 if self.cell_type == "lstm" else 1):
            raise TypeError(f"state.rnn does not match cell={self.cell_type!r}")
        want = (self.num_layers, B, self.hidden_size)
        for s in parts:
            check_float("state.rnn", s, ndim=3, device=device)
            if tuple(s.shape) != want:
                raise ValueError(f"state.rnn must have shape {want}, got {tuple(s.shape)}")
        check_float("state.h_tilde", state.h_tilde, ndim=2, device=device)
        if tuple(state.h_tilde.shape) != (B, self.hidden_size):
            raise ValueError(f"state.h_tilde must have shape ({B}, {self.hidden_size}), "
                             f"got {tuple(state.h_tilde.shape)}")

    def _check_param_dtype(self, name: str, t: Tensor) -> None:
        """t in the parameters' dtype; under autocast any float dtype: on CUDA the encoder's cuDNN RNN
        runs (and returns) float16 whatever the autocast dtype (ATen's autocast wrapper of _cudnn_rnn)."""
        W = self.W_a.weight
        if t.dtype != W.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} has dtype {t.dtype} but the decoder's parameters are {W.dtype}; "
                            "expected the same dtype")

    def _check_memory(self, memory, B=None):
        check_float("memory", memory, ndim=3)
        if memory.shape[2] != self.hidden_size:
            raise ValueError(f"memory must have shape (B, L, D={self.hidden_size}), got {tuple(memory.shape)}")
        W = self.W_a.weight
        if memory.device != W.device:
            raise ValueError(f"memory is on {memory.device} but the decoder's parameters are on {W.device}; "
                             "expected one device")
        self._check_param_dtype("memory", memory)  # _attend casts it to the query's dtype
        if B is not None and memory.shape[0] != B:
            raise ValueError(f"memory has batch size {memory.shape[0]} but the target has {B}; expected equal")

    # -- one step -------------------------------------------------------------------------------
    def step(self, inp: Tensor, state: DecoderState, memory: Tensor, memory_mask=None):
        """One decoder step (SPEC section 1, steps 1-7).

        inp: (B,) long token ids, or (B, D) float input embeddings (a soft mixture y @ W_emb).
        Returns logits (B, V), alpha (B, L), new DecoderState. The ids' values are not read (no
        host sync per step): an id outside [0, V) fails in the embedding lookup (IndexError on
        CPU, a device-side assert on CUDA); check them once per batch (forward does).
        """
        self._check_memory(memory)
        B, L, D = memory.shape
        check_tensor("inp", inp, ndim=(1, 2), device=memory.device)
        if inp.dim() == 1:
            check_int_tensor("inp", inp)
        else:
            check_float("inp", inp)
            if inp.shape[1] != D:
                raise ValueError(f"inp (embeddings) must have shape ({B}, {D}), got {tuple(inp.shape)}")
            self._check_param_dtype("inp (embeddings)", inp)
        if inp.shape[0] != B:
            raise ValueError(f"inp has batch size {inp.shape[0]} but memory has {B}; expected equal")
        self._check_state(state, B, memory.device)
        mask = mask_from(memory_mask, B, L, memory.device, "memory_mask")  # (B, L) bool or None
        return self._step(inp, state, memory, mask)

    def _attend(self, query: Tensor, memory: Tensor, mask):
        """Steps 3-5 for a query already multiplied by W_a: -> context (B, [T,] D), alpha (B, [T,] L)."""
        if memory.dtype != query.dtype:  # autocast: the query (a Linear output) in bf16/fp16, memory (RNN) may not be
            memory = memory.to(query.dtype)
        return attention_eager(query, memory, memory, mask)

    def _step(self, inp, state, memory, mask):
        # 1. input token y_{t-1} -> y_emb (B, D); a float input is already an embedding
        y_emb = self.embedding(inp.long()) if inp.dim() == 1 else inp  # (B, D)
        x = torch.cat([y_emb, state.h_tilde], dim=-1) if self.input_feed else y_emb  # (B, D) or (B, 2D)
        # 2. s_t = Cell(y_emb, s_{t-1})
        s_t, rnn = self._rnn_step(x, state.rnn)  # (B, D)   top layer: the query
        # 3-5. E = (s_t W_a) H^T masked; alpha = softmax(E); c = alpha H
        c_t, alpha = self._attend(self.W_a(s_t), memory, mask)  # (B, D), (B, L)
        # 6. h~_t = tanh([c_t ; s_t] W_c)   (context first, then s_t)
        h_tilde = torch.tanh(self.W_c(torch.cat([c_t, s_t], dim=-1)))  # (B, D)
        # 7. logits_t = h~_t W_out + b
        logits = self._project(h_tilde)  # (B, V)
        return logits, alpha, DecoderState(rnn, h_tilde)

    def _rnn_step(self, x: Tensor, rnn):
        """Step 2 for one step: the cell stepped as a length-1 sequence -> s_t (B, D), new rnn state."""
        out, rnn = self.cell(x.unsqueeze(1), rnn)  # out (B, 1, D)
        return out.squeeze(1), rnn

    def _project(self, h_tilde: Tensor) -> Tensor:
        """Step 7: logits_t = h~_t W_out + b, (B, D) -> (B, V)."""
        return self.W_out(h_tilde)

    # -- whole sequence ---------------------------------------------------------------------------
    def forward(self, tgt_in: Tensor, memory: Tensor, memory_mask, state: DecoderState,
                teacher_forcing_ratio=1.0, sampling="argmax", tau=1.0, *, coin="token",
                noise: Tensor | None = None, generator: torch.Generator | None = None,
                check_ids: bool = True) -> DecoderOutput:
        """Run T steps; the input of step t+1 is gold or model-fed by a coin (SPEC section 2).

        tgt_in (B, T) gold inputs (BOS first); memory (B, L, D); memory_mask None | lengths (B,) |
        bool (B, L); state from init_state. teacher_forcing_ratio == 1.0 is pure teacher forcing
        and draws no random numbers. noise: optional explicit Gumbel noise (B, T, V); noise[:, t]
        perturbs logits_t (for "sample", "gumbel", "gumbel_hard"; ignored by the other modes).
        check_ids: read tgt_in's values to refuse ids outside [0, V) (one host sync per call);
        False for callers that checked them (Seq2Seq.forward) or must not sync (a CUDA-graph capture).

        teacher_forcing_ratio and tau may also be 0-d float tensors on memory's device: the
        capturable form (fused_s2s.graphs replays one captured pass with a scheduled ratio and
        tau). They are read on the device only, so a tensor ratio always runs the step loop and
        draws its coins, even when it holds 1.0; their values are checked on the device
        (_checks._scalar_tensor).
        """
        args = self._check_forward_args(tgt_in, memory, memory_mask, state, teacher_forcing_ratio,
                                        sampling, tau, coin, noise, generator, check_ids)
        return self._loop(tgt_in, memory, state, args, coin, noise, generator)

    def _check_forward_args(self, tgt_in, memory, memory_mask, state, teacher_forcing_ratio, sampling,
                            tau, coin, noise, generator, ids: bool = False) -> "ForwardArgs":
        """Validate forward's arguments (shapes, dtypes, devices, Python scalars: no host sync; and
        with ``ids``, tgt_in's values: one)."""
        check_choice("sampling", sampling, SAMPLING_MODES)
        check_choice("coin", coin, COINS)
        check_int_tensor("tgt_in", tgt_in, ndim=2)
        self._check_memory(memory)
        ratio = check_ratio("teacher_forcing_ratio", teacher_forcing_ratio, memory.device)
        tau = check_tau(tau, memory.device)
        check_same_device(memory=memory, tgt_in=tgt_in)
        B, T = tgt_in.shape
        check_batch(tgt_in=tgt_in, memory=memory)
        L, V, dev = memory.shape[1], self.vocab_size, memory.device
        self._check_state(state, B, dev)
        mask = mask_from(memory_mask, B, L, dev, "memory_mask")  # (B, L) bool or None
        if noise is not None:
            check_float("noise", noise, device=dev)
            if tuple(noise.shape) != (B, T, V):
                raise ValueError(f"noise must have shape (B, T, V) = ({B}, {T}, {V}), got {tuple(noise.shape)}")
        check_generator(generator, dev, "memory's device")
        if ids:  # last: the only check that reads values (a host sync)
            _check_ids("tgt_in", tgt_in, V)
        return ForwardArgs(ratio, sampling, tau, coin, mask)

    def _loop(self, tgt_in, memory, state, args: "ForwardArgs", coin, noise, generator) -> DecoderOutput:
        """The per-step loop of SPEC section 2, with the documented order of random draws."""
        B, T = tgt_in.shape
        L, dev = memory.shape[1], memory.device
        tgt_in = tgt_in.long()  # nn.Embedding takes int64 ids; any integer dtype is accepted
        # pure teacher forcing: no random draws at all (a tensor ratio, read on the device, always draws)
        teacher_forcing = args.teacher_forcing
        if not teacher_forcing and coin == "sequence":
            u_seq = torch.rand(B, generator=generator, device=dev)  # (B,) one coin per sequence
        golds = self._gold_inputs(tgt_in)  # T x (B, D) embeddings of the gold inputs
        x = golds[0] if T else None  # (B, D) step 0 input: gold (BOS)
        all_logits, all_alpha = [], []
        for t in range(T):
            logits_t, alpha_t, state = self._step(x, state, memory, args.mask)  # (B, V), (B, L)
            all_logits.append(logits_t)
            all_alpha.append(alpha_t)
            if t == T - 1:
                break
            gold = golds[t + 1]  # (B, D) gold input of step t+1
            if teacher_forcing:
                x = gold
                continue
            # 1. the coin (never differentiated)
            if coin == "token":
                u = torch.rand(B, generator=generator, device=dev)  # (B,)
            elif coin == "step":
                u = torch.rand(1, generator=generator, device=dev).expand(B)  # (B,) one for the batch
            else:
                u = u_seq  # (B,)
            use_gold = u < args.ratio  # (B,) bool
            # 2. the model-fed input from logits_t (draws the Gumbel seed after the coin)
            noise_t = noise[:, t] if noise is not None else None  # (B, V) or None
            model_in = self._model_fed_input(logits_t, args.sampling, args.tau, noise_t, generator)  # (B, D)
            # 3. per row: gold or model-fed
            x = torch.where(use_gold.unsqueeze(-1), gold, model_in)  # (B, D)
        if T:
            logits = torch.stack(all_logits, dim=1)  # (B, T, V)
            attention = torch.stack(all_alpha, dim=1)  # (B, T, L)
        else:
            logits = memory.new_zeros(B, 0, self.vocab_size)
            attention = memory.new_zeros(B, 0, L)
        return DecoderOutput(logits, attention, state)

    def _gold_inputs(self, tgt_in: Tensor) -> list:
        """Embeddings of the gold inputs, one (B, D) per step: one lookup per step, as in the notes."""
        return [self.embedding(tgt_in[:, t]) for t in range(tgt_in.shape[1])]

    def _model_fed_input(self, logits_t: Tensor, sampling: str, tau: float, noise_t, generator) -> Tensor:
        """The model's own input for the next step, from logits_t (B, V) -> (B, D) (SPEC section 2).

        "sample" / "gumbel" / "gumbel_hard" use noise_t (B, V), or when it is None draw one seed
        from torch's RNG (``generator`` honoured) and the Philox noise the kernels draw in-kernel.
        """
        W_emb = self.embedding.weight  # (V, D)
        if sampling == "argmax":
            return self.embedding(logits_t.detach().argmax(-1))  # (B, D) greedy token
        if sampling == "softmax":
            y = gumbel_softmax_eager(logits_t, tau, False, None)  # (B, V) softmax(logits / tau), no noise
            return y @ W_emb  # (B, D) soft mixture
        if noise_t is not None:  # given noise is used in the logits' dtype, as F.gumbel_softmax's own noise
            g = noise_t.to(logits_t.dtype)  # (B, V); so in 16-bit under autocast, as the fused op reads it
        else:
            seed = philox.draw_seed(logits_t.device, generator)  # 0-d int64 on the device
            g = philox.gumbel_noise(seed, logits_t.shape, logits_t.device)  # (B, V) float32
        if sampling == "sample":
            return self.embedding(gumbel_argmax_eager(logits_t, g))  # (B, D) Gumbel-max: a categorical sample
        y = gumbel_softmax_eager(logits_t, tau, sampling == "gumbel_hard", g)  # (B, V)
        return y @ W_emb  # (B, D) soft mixture, or exactly one-hot rows with the soft gradient


class ForwardArgs(NamedTuple):
    """Validated arguments of AttentionDecoder.forward (shared with the fused subclass)."""

    ratio: float | Tensor  # teacher_forcing_ratio (a 0-d tensor: read on the device)
    sampling: str
    tau: float | Tensor  # (a 0-d tensor: read on the device)
    coin: str
    mask: Tensor | None  # (B, L) bool, True = attend

    @property
    def teacher_forcing(self) -> bool:
        """Pure teacher forcing: a Python ratio of 1.0 (a tensor ratio is not read on the host)."""
        return not isinstance(self.ratio, Tensor) and self.ratio == 1.0


class Seq2SeqOutput(NamedTuple):
    loss: Tensor  # () mean cross-entropy over non-pad target tokens
    logits: Tensor  # (B, T, V)
    attention: Tensor  # (B, T, L)


class Seq2Seq(nn.Module):
    """Encoder + attention decoder with the loss of SPEC section 1 step 8."""

    encoder_cls = Encoder
    decoder_cls = AttentionDecoder  # the fused Seq2Seq swaps in its decoder here

    def __init__(self, src_vocab_size, tgt_vocab_size, hidden_size, cell="lstm", num_layers=1,
                 padding_idx=0, bos_idx=1, eos_idx=2, input_feed=False, backend="auto"):
        super().__init__()
        for name, idx in (("bos_idx", bos_idx), ("eos_idx", eos_idx)):
            if isinstance(idx, bool) or not isinstance(idx, numbers.Integral) or not (0 <= idx < tgt_vocab_size):
                raise ValueError(f"{name} must be an integer in [0, tgt_vocab_size={tgt_vocab_size}), got {idx!r}")
        self.padding_idx = padding_idx
        self.bos_idx = int(bos_idx)
        self.eos_idx = int(eos_idx)
        self.encoder = self.encoder_cls(src_vocab_size, hidden_size, cell, num_layers, padding_idx)
        self.decoder = self.decoder_cls(tgt_vocab_size, hidden_size, cell, num_layers, padding_idx,
                                        input_feed=input_feed, backend=backend)

    def encode(self, src: Tensor, src_lengths: Tensor, *, check_ids: bool = True):
        """-> memory H (B, L, D), memory_mask = lengths (B,) long on H's device, initial DecoderState."""
        memory, final = self.encoder(src, src_lengths, check_ids=check_ids)
        memory_mask = to_device(src_lengths.long(), memory.device)  # (B,)
        return memory, memory_mask, self.decoder.init_state(final)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt: Tensor, teacher_forcing_ratio=1.0,
                sampling="argmax", tau=1.0, *, coin="token", noise=None, generator=None,
                check_ids: bool = True) -> Seq2SeqOutput:
        """tgt (B, T+1) = BOS y_1 .. y_T EOS, right-padded. Loss: mean CE over non-pad targets.

        check_ids: read src's and tgt's values to refuse ids outside the vocabularies (a host sync
        each on a GPU); False for callers that built the ids from the vocabulary themselves. With
        that, src_lengths on the CPU and sorted longest first, a training step makes no host sync.
        """
        self._check_args(src, src_lengths, tgt, teacher_forcing_ratio, sampling, tau, coin, check_ids)
        memory, memory_mask, state = self.encode(src, src_lengths, check_ids=check_ids)
        tgt = tgt.long()
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]  # (B, T) inputs, (B, T) targets
        out = self.decoder(tgt_in, memory, memory_mask, state, teacher_forcing_ratio, sampling, tau,
                           coin=coin, noise=noise, generator=generator, check_ids=False)  # _check_args did
        return Seq2SeqOutput(self.loss(out.logits, tgt_out), out.logits, out.attention)

    def _check_args(self, src, src_lengths, tgt, teacher_forcing_ratio, sampling, tau, coin,
                    check_ids: bool = True) -> tuple:
        """forward's argument checks, cheap ones first so bad options fail before the encoder runs
        (tgt's ids are read: one host sync). -> (ratio, sampling, tau, coin) validated."""
        # a tensor ratio / tau: its form here, its value by the decoder (one device assert, not two)
        mode = (check_ratio("teacher_forcing_ratio", teacher_forcing_ratio, values=False),
                check_choice("sampling", sampling, SAMPLING_MODES),
                check_tau(tau, values=False), check_choice("coin", coin, COINS))
        check_int_tensor("src", src, ndim=2)
        check_int_tensor("tgt", tgt, ndim=2)
        check_same_device(src=src, tgt=tgt)
        check_batch(src=src, src_lengths=src_lengths, tgt=tgt)
        if tgt.shape[1] < 2:
            raise ValueError(f"tgt must have shape (B, T+1) with T >= 1 (BOS ... EOS), got {tuple(tgt.shape)}")
        if check_ids:
            _check_ids("tgt", tgt, self.decoder.vocab_size)
        return mode

    def loss(self, logits: Tensor, tgt_out: Tensor) -> Tensor:
        """8. cross-entropy of logits (B, T, V) against tgt_out (B, T) over non-pad targets, averaged
        (0, not NaN, if there are none)."""
        V = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), reduction="none")  # (B*T,)
        if self.padding_idx is None:
            keep = torch.ones_like(ce)
        else:
            keep = (tgt_out.reshape(-1) != self.padding_idx).to(ce.dtype)  # (B*T,)
        return (ce * keep).sum() / keep.sum().clamp_min(1.0)  # ()

    @torch.no_grad()
    def generate(self, src: Tensor, src_lengths: Tensor, max_len: int, strategy: str = "greedy", **kw):
        """Decode with ``fused_s2s.generation.generate`` -> GenerateOutput (tokens, scores, attention).

        strategy "greedy" (no keywords); "sample": temperature=1.0, top_k=0, top_p=1.0,
        generator=None; "beam": beam_size=4, length_penalty="gnmt", alpha=0.6, n_best=1,
        early_stop="count". A keyword the strategy does not take is a TypeError naming it.
        """
        from fused_s2s import generation  # lazy: generation imports the model classes' users

        return generation.generate(self, src, src_lengths, max_len, strategy, **kw)
