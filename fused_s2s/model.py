"""The drop-in fused model: ``fused_s2s.Encoder``, ``AttentionDecoder``, ``Seq2Seq``.

Same constructor arguments, submodule names (embedding, cell, W_a, W_c, W_out), outputs and
random-draw order as ``fused_s2s.reference``, so ``fused.load_state_dict(ref.state_dict())`` works
both ways and, with the same ``torch.manual_seed``, both draw the same coins and Gumbel noise.
What differs is where the per-step work runs:

- attention (steps 3-5): ``fused_s2s.attention_step``, one Triton launch (eager on CPU by "auto");
- the model-fed input of "gumbel", "gumbel_hard" and "sample": ``fused_s2s.gumbel_softmax``, noise
  drawn inside the kernel from the same Philox stream the reference computes in torch; the hard
  mode gathers the embedding row of the sampled index instead of a (B, V) x (V, D) product, with the
  soft straight-through gradient in the backward pass, and its W_emb gradient rows of all steps
  summed in one (V, D) buffer (one dense gradient per pass, not one per step);
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


class _GradRows:
    """The W_emb gradient of one decoder pass's hard embeddings, summed row by row in one (V, D) buffer."""

    def __init__(self):
        self.buf = None

    def add(self, index: Tensor, grad: Tensor, weight: Tensor) -> None:
        if self.buf is None:
            self.buf = torch.zeros_like(weight)  # (V, D), once per backward pass
        self.buf.index_add_(0, index, grad.to(weight.dtype))

    def take(self):
        buf, self.buf = self.buf, None  # reset: a second backward (retain_graph) sums afresh
        return buf


class _SharedEmbeddingGrad(torch.autograd.Function):
    """W_emb handed to every hard embedding of one decoder pass (identity forward).

    Each per-step embedding's W_emb gradient is one_hot(index)^T grad: B rows. Returned per step it
    would be a whole (V, D) tensor to write and accumulate, T times; instead the steps add their rows
    into one shared buffer and this node, which autograd runs after all of them (they all consume its
    output), hands the buffer to W_emb once.
    """

    @staticmethod
    def forward(ctx, weight, rows: _GradRows):
        ctx.rows = rows
        ctx.set_materialize_grads(False)  # the steps pass None: no (V, D) zeros
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        buf = ctx.rows.take()
        if grad is not None:
            buf = grad if buf is None else buf + grad
        return buf, None


class _HardEmbedding(torch.autograd.Function):
    """Straight-through embedding of a one-hot sample: y_st @ W_emb without the (B, V) x (V, D) product.

    forward:  W_emb[index]                                   (B, D)   (y_st is one-hot forward)
    backward: d y     = grad @ W_emb^T                       (B, V)   (flows into the soft y)
              d W_emb = one_hot(index)^T grad = index_add    (V, D)   (into ``rows`` when given)
    which is exactly the gradient of y_st @ W_emb with y_st = y_hard - y_soft.detach() + y_soft.
    """

    @staticmethod
    def forward(ctx, y, index, weight, rows: _GradRows | None = None):
        ctx.save_for_backward(index, weight)
        ctx.y_dtype = y.dtype
        ctx.rows = rows
        return weight.index_select(0, index)  # (B, D)

    @staticmethod
    def backward(ctx, grad):
        index, weight = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad.to(weight.dtype) @ weight.t()).to(ctx.y_dtype)  # (B, V)
        if ctx.needs_input_grad[2]:
            if ctx.rows is not None:
                ctx.rows.add(index, grad, weight)  # B rows into the pass's shared buffer
            else:
                grad_w = torch.zeros_like(weight).index_add_(0, index, grad.to(weight.dtype))  # (V, D)
        return grad_y, None, grad_w, None


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
        if sampling not in ("sample", "gumbel", "gumbel_hard"):
            return super()._model_fed_input(logits_t, sampling, tau, noise_t, generator)  # argmax, softmax
        W_emb = self.embedding.weight  # (V, D)
        src = logits_t.detach() if sampling == "sample" else logits_t
        # one launch: noise (drawn in-kernel from the same seed the reference draws), softmax, argmax
        y, index = gumbel_softmax(src, tau, hard=sampling != "gumbel", noise=noise_t, generator=generator,
                                  return_index=True, backend=self.backend)  # (B, V), (B,)
        if sampling == "sample":
            return self.embedding(index)  # (B, D) Gumbel-max sample, not differentiable
        if sampling == "gumbel":
            return y.to(W_emb.dtype) @ W_emb  # (B, D) soft mixture
        shared = getattr(self, "_hard_W_emb", None)  # set by _loop for this pass: (W_emb view, rows)
        if shared is not None:
            return _HardEmbedding.apply(y, index, *shared)  # (B, D) straight-through
        return _HardEmbedding.apply(y, index, W_emb)  # (B, D) straight-through

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
        W_emb = self.embedding.weight
        if args.sampling == "gumbel_hard" and args.ratio < 1.0 and torch.is_grad_enabled() and W_emb.requires_grad:
            rows = _GradRows()
            self._hard_W_emb = (_SharedEmbeddingGrad.apply(W_emb, rows), rows)
        try:
            return super()._loop(tgt_in, memory, state, args, coin, noise, generator)
        finally:
            self._hard_W_emb = None

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
