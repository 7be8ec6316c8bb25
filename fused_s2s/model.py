"""The drop-in fused model: ``fused_s2s.Encoder``, ``AttentionDecoder``, ``Seq2Seq``.

Same constructor arguments, submodule names (embedding, cell, W_a, W_c, W_out), outputs and
random-draw order as ``fused_s2s.reference``, so ``fused.load_state_dict(ref.state_dict())`` works
both ways and, with the same ``torch.manual_seed``, both draw the same coins and Gumbel noise.
What differs is where the per-step work runs:

- attention (steps 3-5): ``fused_s2s.attention_step``, one Triton launch (eager on CPU by "auto");
- the model-fed input of "gumbel", "gumbel_hard" and "sample": ``fused_s2s.gumbel_softmax``, noise
  drawn inside the kernel from the same Philox stream the reference computes in torch; the hard
  mode gathers the embedding row of the sampled index instead of a (B, V) x (V, D) product, with the
  soft straight-through gradient in the backward pass;
- the W_emb gradient of the model-fed inputs (every mode) is collected over the pass and formed once
  (one index_add, one (V, B*T) x (B*T, D) product) instead of one whole (V, D) gradient per step;
- the gold inputs of the step loop: one embedding lookup for all T steps (one (V, D) gradient
  scatter in the backward pass instead of T);
- teacher forcing (ratio 1.0, no input feeding): the decoder RNN runs over the whole target at
  once (cuDNN) and the attention for all T queries is one ``attention_step`` launch.

The encoder has no fused part (it is one cuDNN call): ``fused_s2s.Encoder`` is the reference's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fused_s2s import reference
from fused_s2s.attention import attention_step
from fused_s2s.gumbel import gumbel_softmax
from fused_s2s.reference import DecoderOutput, DecoderState, Encoder, Seq2SeqOutput  # noqa: F401  (re-exported)

__all__ = ["Encoder", "AttentionDecoder", "Seq2Seq", "DecoderState", "DecoderOutput", "Seq2SeqOutput"]


class _WembGrad:
    """W_emb's gradient from the model-fed inputs of one decoder pass, formed once.

    Each step's model-fed input touches W_emb through a lookup (rows: index, grad) or a soft mixture
    y @ W_emb (pairs: y, grad). Returned per step, each would be a whole (V, D) gradient to write and
    add to the parameter's, T times per pass; collected here they become one index_add and one
    (V, B*T) x (B*T, D) product at the end of the backward pass.
    """

    def __init__(self, padding_idx: int | None):
        self.padding_idx = padding_idx
        self.rows: list = []  # (index (B,), grad (B, D))
        self.pairs: list = []  # (y (B, V), grad (B, D))

    def add_rows(self, index: Tensor, grad: Tensor, lookup: bool) -> None:
        if lookup and self.padding_idx is not None:  # nn.Embedding's rule: the padding row gets no gradient
            grad = grad.masked_fill((index == self.padding_idx).unsqueeze(-1), 0)
        self.rows.append((index, grad))

    def take(self, weight: Tensor):
        """The summed (V, D) gradient (None if no step contributed); resets for a second backward."""
        buf = None
        if self.pairs:
            Y = torch.cat([y for y, _ in self.pairs]).to(weight.dtype)  # (B*T', V)
            G = torch.cat([g for _, g in self.pairs]).to(weight.dtype)  # (B*T', D)
            buf = Y.t() @ G  # (V, D)
        if self.rows:
            buf = torch.zeros_like(weight) if buf is None else buf
            buf.index_add_(0, torch.cat([i for i, _ in self.rows]),
                           torch.cat([g for _, g in self.rows]).to(weight.dtype))
        self.rows, self.pairs = [], []
        return buf


class _SharedWemb(torch.autograd.Function):
    """W_emb handed to every model-fed input of one decoder pass (identity forward); autograd runs
    this node's backward after all of theirs (they all consume its output), and it hands W_emb the
    gradient they collected in ``sink``."""

    @staticmethod
    def forward(ctx, weight, sink: _WembGrad):
        ctx.sink = sink
        ctx.weight_like = weight.detach()  # dtype / shape / device of the gradient (no copy)
        ctx.set_materialize_grads(False)  # the steps pass None: no (V, D) zeros
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        buf = ctx.sink.take(ctx.weight_like)
        if grad is not None:
            buf = grad if buf is None else buf + grad
        return buf, None


class _HardEmbedding(torch.autograd.Function):
    """Straight-through embedding of a one-hot sample: y_st @ W_emb without the (B, V) x (V, D) product.

    forward:  W_emb[index]                                   (B, D)   (y_st is one-hot forward)
    backward: d y     = grad @ W_emb^T                       (B, V)   (flows into the soft y)
              d W_emb = one_hot(index)^T grad = index_add    (V, D)   (rows into ``sink`` when given)
    which is exactly the gradient of y_st @ W_emb with y_st = y_hard - y_soft.detach() + y_soft.
    With y None it is a plain lookup W_emb[index] (argmax / sample inputs; nn.Embedding's gradient,
    the padding row left out).
    """

    @staticmethod
    def forward(ctx, y, index, weight, sink: _WembGrad | None = None):
        ctx.save_for_backward(index, weight)
        ctx.y_dtype = None if y is None else y.dtype
        ctx.sink = sink
        return weight.index_select(0, index)  # (B, D)

    @staticmethod
    def backward(ctx, grad):
        index, weight = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad.to(weight.dtype) @ weight.t()).to(ctx.y_dtype)  # (B, V)
        if ctx.needs_input_grad[2]:
            if ctx.sink is not None:
                ctx.sink.add_rows(index, grad, lookup=ctx.y_dtype is None)  # B rows, summed once per pass
            else:
                grad_w = torch.zeros_like(weight).index_add_(0, index, grad.to(weight.dtype))  # (V, D)
        return grad_y, None, grad_w, None


class _SoftEmbedding(torch.autograd.Function):
    """y @ W_emb (B, V) x (V, D) whose W_emb gradient y^T grad is formed once per pass in ``sink``."""

    @staticmethod
    def forward(ctx, y, weight, sink: _WembGrad):
        ctx.save_for_backward(y, weight)
        ctx.sink = sink
        return y.to(weight.dtype) @ weight  # (B, D)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad.to(weight.dtype) @ weight.t()).to(y.dtype)  # (B, V)
        if ctx.needs_input_grad[1]:
            ctx.sink.pairs.append((y.detach(), grad))
        return grad_y, None, None


class AttentionDecoder(reference.AttentionDecoder):
    """Luong attention decoder on the fused kernels; a drop-in for ``reference.AttentionDecoder``.

    ``backend``: "auto" (Triton on CUDA tensors, eager on CPU; FUSED_S2S_BACKEND overrides),
    "triton" (the kernels; on CPU only with TRITON_INTERPRET=1) or "eager".
    """

    def _attend(self, query: Tensor, memory: Tensor, mask):
        # under autocast the query (a Linear output) and memory (an RNN output) may differ in dtype
        if memory.dtype != query.dtype:
            memory = memory.to(query.dtype)
        return attention_step(query, memory, None, mask, backend=self.backend)  # (B, [T,] D), (B, [T,] L)

    def _gold_inputs(self, tgt_in: Tensor):
        # one lookup for all T steps: the embedding's backward is one (V, D) scatter instead of T
        # (each per-step lookup's backward writes and accumulates a whole (V, D) gradient)
        return self.embedding(tgt_in).unbind(1)  # T x (B, D)

    def _model_fed_input(self, logits_t: Tensor, sampling: str, tau: float, noise_t, generator) -> Tensor:
        # W_emb as all steps of this pass share it (see _loop), or the plain parameter
        W_emb, sink = getattr(self, "_pass_W_emb", None) or (self.embedding.weight, None)
        if sampling == "argmax":
            return self._lookup(logits_t.detach().argmax(-1), W_emb, sink)  # (B, D) greedy token
        if sampling == "softmax":
            return self._mix(reference.gumbel_softmax_eager(logits_t, tau, False, None), W_emb, sink)
        src = logits_t.detach() if sampling == "sample" else logits_t
        # one launch: noise (drawn in-kernel from the same seed the reference draws), softmax, argmax
        y, index = gumbel_softmax(src, tau, hard=sampling != "gumbel", noise=noise_t, generator=generator,
                                  return_index=True, backend=self.backend)  # (B, V), (B,)
        if sampling == "sample":
            return self._lookup(index, W_emb, sink)  # (B, D) Gumbel-max sample, not differentiable
        if sampling == "gumbel":
            return self._mix(y, W_emb, sink)  # (B, D) soft mixture
        return _HardEmbedding.apply(y, index, W_emb, sink)  # (B, D) straight-through

    def _lookup(self, index: Tensor, W_emb: Tensor, sink) -> Tensor:
        if sink is None:
            return self.embedding(index)  # (B, D)
        return _HardEmbedding.apply(None, index, W_emb, sink)  # (B, D), gradient rows into the sink

    @staticmethod
    def _mix(y: Tensor, W_emb: Tensor, sink) -> Tensor:
        if sink is None:
            return y.to(W_emb.dtype) @ W_emb  # (B, D)
        return _SoftEmbedding.apply(y, W_emb, sink)  # (B, D), W_emb gradient formed once per pass

    def forward(self, tgt_in: Tensor, memory: Tensor, memory_mask, state: DecoderState,
                teacher_forcing_ratio=1.0, sampling="argmax", tau=1.0, *, coin="token",
                noise: Tensor | None = None, generator: torch.Generator | None = None) -> DecoderOutput:
        """Same contract as ``reference.AttentionDecoder.forward``; teacher forcing takes the fast path."""
        args = self._check_forward_args(tgt_in, memory, memory_mask, state, teacher_forcing_ratio,
                                        sampling, tau, coin, noise, generator)
        if args.ratio == 1.0 and not self.input_feed and tgt_in.shape[1] > 0:
            return self._teacher_forced(tgt_in, memory, args.mask, state)
        return self._loop(tgt_in, memory, state, args, coin, noise, generator)

    def _loop(self, tgt_in, memory, state, args, coin, noise, generator) -> DecoderOutput:
        """The reference's step loop; with model-fed inputs (ratio < 1) and gradients, their W_emb
        gradient is collected over the pass and formed once (_WembGrad)."""
        W_emb = self.embedding.weight
        if args.ratio < 1.0 and torch.is_grad_enabled() and W_emb.requires_grad:
            sink = _WembGrad(self.padding_idx)
            self._pass_W_emb = (_SharedWemb.apply(W_emb, sink), sink)
        try:
            return super()._loop(tgt_in, memory, state, args, coin, noise, generator)
        finally:
            self._pass_W_emb = None

    def _teacher_forced(self, tgt_in, memory, mask, state) -> DecoderOutput:
        """All T gold inputs at once: one RNN call and one attention launch instead of T steps."""
        Y = self.embedding(tgt_in.long())  # (B, T, D)   step 1 for every t (ids of any integer dtype)
        S, rnn = self.cell(Y, state.rnn)  # (B, T, D)   step 2: s_1 .. s_T (cuDNN over the sequence)
        C, alpha = self._attend(self.W_a(S), memory, mask)  # (B, T, D), (B, T, L)   steps 3-5, T queries
        H_tilde = torch.tanh(self.W_c(torch.cat([C, S], dim=-1)))  # (B, T, D)   step 6
        logits = self.W_out(H_tilde)  # (B, T, V)   step 7
        return DecoderOutput(logits, alpha, DecoderState(rnn, H_tilde[:, -1]))


class Seq2Seq(reference.Seq2Seq):
    """Encoder + fused attention decoder; a drop-in for ``reference.Seq2Seq`` (same state_dict)."""

    decoder_cls = AttentionDecoder
