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
- in the step loop, the gradients of W_out (step 7) and of W_emb through the model-fed inputs are
  collected over the pass and formed in a few large ops (index_add, (V, 8B) x (8B, D) products)
  instead of one whole (V, D) gradient written and accumulated per step;
- the gold inputs of the step loop: one embedding lookup for all T steps (one (V, D) gradient
  scatter in the backward pass instead of T);
- step 2 in the step loop: the RNN layer by layer with torch.lstm_cell / gru_cell on the cell's
  weights instead of the sequence RNN called on a length-1 sequence (its per-call set-up);
- teacher forcing (ratio 1.0, no input feeding): the decoder RNN runs over the whole target at
  once (cuDNN) and the attention for all T queries is one ``attention_step`` launch.

The encoder has no fused part (it is one cuDNN call): ``fused_s2s.Encoder`` is the reference's.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from fused_s2s import reference
from fused_s2s.attention import _attention
from fused_s2s.gumbel import _gumbel_softmax, gumbel_sample
from fused_s2s.reference import DecoderOutput, DecoderState, Encoder, Seq2SeqOutput  # noqa: F401  (re-exported)

__all__ = ["Encoder", "AttentionDecoder", "Seq2Seq", "DecoderState", "DecoderOutput", "Seq2SeqOutput"]


def _autocast_off(t: Tensor):
    """Autocast off on ``t``'s device while the with-block runs (a no-op context when it is off).

    The hand-written gradients below (the backward of the Functions, _PassGrad's flushes) run their
    products in the dtypes they choose, whatever the autocast state of the thread that runs the
    backward. That state is the caller's: the autograd engine carries the thread-local autocast
    state of ``backward()`` / ``autograd.grad()`` into the backward pass (its device threads too).
    A backward called outside autocast (the usual training step) and one called inside it
    (``torch.cuda.make_graphed_callables``: its warmup and the captured backward run in the caller's
    autocast context, see fused_s2s.graphs) must give the same gradients, in the same dtypes: under
    autocast, ``A.t() @ B`` would come out in bfloat16 and the next ``buf.addmm_`` (in-place, not
    autocast) fail on a bfloat16 buffer and float32 factors.
    """
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


class _PassGrad:
    """The gradient of one weight (and bias) from every step of one decoder pass, formed in large ops.

    Per step, autograd would produce a whole (V, D) gradient of W_emb or W_out, write it and add it
    to the parameter's, T times per pass, for B rows of work each. Here each step leaves its
    factors: lookup rows (index, grad), or a product a^T b (y^T grad for y @ W_emb, grad^T h for
    h W_out^T), summed FLUSH steps at a time by one (V, FLUSH*B) x (FLUSH*B, D) product (bounded
    extra memory) into one buffer in the weight's dtype, which a _PassParam node hands over once.
    """

    FLUSH = 8

    def __init__(self, weight: Tensor, padding_idx: int | None = None):
        self.like = weight.detach()  # dtype, shape, device of the gradient (no copy)
        self.padding_idx = padding_idx
        self.rows: list = []  # (index (B,), grad (B, D))
        self.pairs: list = []  # (a (B, V), b (B, D)): buf += a^T b
        self.buf = self.bias = None

    def add_rows(self, index: Tensor, grad: Tensor, lookup: bool) -> None:
        if lookup and self.padding_idx is not None:  # nn.Embedding's rule: the padding row gets no gradient
            grad = grad.masked_fill((index == self.padding_idx).unsqueeze(-1), 0)
        self.rows.append((index, grad))

    def add_product(self, a: Tensor, b: Tensor) -> None:
        self.pairs.append((a, b))
        if len(self.pairs) >= self.FLUSH:
            self._flush()

    def add_bias(self, grad: Tensor) -> None:
        g = grad.sum(0).to(self.like.dtype)
        self.bias = g if self.bias is None else self.bias.add_(g)

    def _flush(self) -> None:
        with _autocast_off(self.like):  # the products in the weight's dtype, autocast or not
            self._flush_in(self.like.dtype)

    def _flush_in(self, dt) -> None:
        if self.pairs:
            A = torch.cat([a for a, _ in self.pairs]).to(dt)  # (k*B, V)
            Bm = torch.cat([b for _, b in self.pairs]).to(dt)  # (k*B, D)
            self.buf = A.t() @ Bm if self.buf is None else self.buf.addmm_(A.t(), Bm)
            self.pairs = []
        if self.rows:
            if self.buf is None:
                self.buf = torch.zeros_like(self.like)
            self.buf.index_add_(0, torch.cat([i for i, _ in self.rows]), torch.cat([g for _, g in self.rows]).to(dt))
            self.rows = []

    def take_weight(self):
        """The summed weight gradient (None if no step contributed); reset for a second backward."""
        self._flush()
        buf, self.buf = self.buf, None
        return buf

    def take_bias(self):
        bias, self.bias = self.bias, None
        return bias


class _PassParam(torch.autograd.Function):
    """A parameter handed to every step of one decoder pass (identity forward). Autograd runs this
    node's backward after all of theirs (they all consume its output, directly or through one cast),
    and it hands the parameter what they collected: ``take()``."""

    @staticmethod
    def forward(ctx, param, take):
        ctx.take = take
        ctx.set_materialize_grads(False)  # the steps pass None: no (V, D) zeros
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.take()
        if grad is not None:
            g = grad if g is None else g + grad
        return g, None


# Said, not fixed: the term needs y_soft's graph at the backward, i.e. every step's (B, V) sample kept
# alive through the pass (800 MB at B 128, T 50, V 32,000 in fp32) for a case few callers meet.
_HARD_SECOND_ORDER = (
    "fused 'gumbel_hard' under create_graph=True: the decoder embedding's gradient is formed from the "
    "sampled rows, so a second derivative through it lacks the straight-through term d(y_st^T g)/dlogits "
    "that the reference's y_st @ W_emb carries (the first-order gradients are the same); for a penalty "
    "on decoder.embedding.weight's gradient use fused_s2s.reference.Seq2Seq (the same state_dict; docs/model.md)")


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
    def forward(ctx, y, index, weight, sink: _PassGrad | None = None):
        ctx.save_for_backward(index, weight)
        ctx.y_dtype = None if y is None else y.dtype
        ctx.sink = sink
        return weight.index_select(0, index)  # (B, D)

    @staticmethod
    def backward(ctx, grad):
        index, weight = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(grad):  # in W_emb's dtype, as outside autocast
                grad_y = (grad.to(weight.dtype) @ weight.t()).to(ctx.y_dtype)  # (B, V)
        if ctx.needs_input_grad[2]:
            if ctx.y_dtype is not None and torch.is_grad_enabled():  # create_graph=True
                warnings.warn(_HARD_SECOND_ORDER, stacklevel=2)
            if ctx.sink is not None:
                ctx.sink.add_rows(index, grad, lookup=ctx.y_dtype is None)  # B rows, summed once per pass
            else:
                grad_w = torch.zeros_like(weight).index_add_(0, index, grad.to(weight.dtype))  # (V, D)
        return grad_y, None, grad_w, None


class _SoftEmbedding(torch.autograd.Function):
    """y @ W_emb (B, V) x (V, D), its W_emb gradient y^T grad left in ``sink``.

    ``weight`` is already in the compute dtype (cast once per pass under autocast), so the product
    runs with autocast off, as the reference's autocast matmul would.
    """

    @staticmethod
    def forward(ctx, y, weight, sink: _PassGrad):
        ctx.save_for_backward(y, weight)
        ctx.sink = sink
        with torch.autocast(y.device.type, enabled=False):
            return y.to(weight.dtype) @ weight  # (B, D)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        grad_y = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(grad):
                grad_y = (grad.to(weight.dtype) @ weight.t()).to(y.dtype)  # (B, V)
        if ctx.needs_input_grad[1]:
            ctx.sink.add_product(y, grad)  # dW_emb += y^T grad
        return grad_y, None, None


class _CollectedLinear(torch.autograd.Function):
    """Step 7, logits_t = h~_t W_out^T + b, its W_out and b gradients left in ``sink``.

    ``weight``, ``bias`` are in the compute dtype (cast once per pass under autocast).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, sink: _PassGrad):
        ctx.save_for_backward(h, weight)
        ctx.sink = sink
        with torch.autocast(h.device.type, enabled=False):
            return torch.nn.functional.linear(h.to(weight.dtype), weight, bias)  # (B, V)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = None
        if ctx.needs_input_grad[0]:
            with _autocast_off(grad):
                grad_h = (grad.to(weight.dtype) @ weight).to(h.dtype)  # (B, D)
        if ctx.needs_input_grad[1]:
            ctx.sink.add_product(grad, h)  # dW_out += grad^T h~
        if ctx.needs_input_grad[2]:
            ctx.sink.add_bias(grad)
        return grad_h, None, None, None


class AttentionDecoder(reference.AttentionDecoder):
    """Luong attention decoder on the fused kernels; a drop-in for ``reference.AttentionDecoder``.

    ``backend``: "auto" (Triton on CUDA tensors, eager on CPU; FUSED_S2S_BACKEND overrides),
    "triton" (the kernels; on CPU only with TRITON_INTERPRET=1) or "eager".
    """

    def _attend(self, query: Tensor, memory: Tensor, mask):
        # under autocast the query (a Linear output) and memory (an RNN output) may differ in dtype
        if memory.dtype != query.dtype:
            memory = memory.to(query.dtype)
        # attention_step without its argument checks: memory and mask were checked once for the pass
        # (_check_forward_args, step), the query is W_a's output
        return _attention(query, memory, None, mask, self.backend)  # (B, [T,] D), (B, [T,] L)

    def _gold_inputs(self, tgt_in: Tensor):
        # one lookup for all T steps: the embedding's backward is one (V, D) scatter instead of T
        # (each per-step lookup's backward writes and accumulates a whole (V, D) gradient)
        return self.embedding(tgt_in).unbind(1)  # T x (B, D)

    def _model_fed_input(self, logits_t: Tensor, sampling: str, tau: float, noise_t, generator) -> Tensor:
        # W_emb as this pass's steps share it (see _loop): a view for lookups, one in the compute
        # dtype for mixtures, and the sink of its gradient; outside a training pass the parameter
        W_emb, W_mix, sink = getattr(self, "_pass_emb", None) or (self.embedding.weight, self.embedding.weight, None)
        if sampling == "argmax":
            return self._lookup(logits_t.detach().argmax(-1), W_emb, sink)  # (B, D) greedy token
        if sampling == "softmax":
            return self._mix(reference.gumbel_softmax_eager(logits_t, tau, False, None), W_mix, sink)
        if sampling == "sample":  # one read of the logits: the index alone, no (B, V) y written
            index = gumbel_sample(logits_t, noise=noise_t, generator=generator, backend=self.backend)  # (B,)
            return self._lookup(index, W_emb, sink)  # (B, D) Gumbel-max sample, not differentiable
        # one launch: noise (drawn in-kernel from the same seed the reference draws), softmax, argmax;
        # the soft mode takes no index (one output less: host time per step)
        # gumbel_softmax without check_tau: tau was checked once for the pass (_check_forward_args)
        hard = sampling != "gumbel"
        out = _gumbel_softmax(logits_t, tau, hard, -1, noise_t, generator, hard, self.backend)  # (B, V) [, (B,)]
        if not hard:
            return self._mix(out, W_mix, sink)  # (B, D) soft mixture
        y, index = out
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

    def _rnn_step(self, x: Tensor, rnn):
        """Step 2 for one step, layer by layer with torch.lstm_cell / gru_cell on the cell's own
        weights: two GEMMs and one fused pointwise kernel per layer, where a length-1 call of the
        sequence RNN (cuDNN on GPU) pays its whole per-call set-up every step. Same math; the
        parameters stay nn.LSTM / nn.GRU's (state_dict unchanged), dropout between layers is 0.

        Under autocast the cells run in the parameters' dtype (fp32), autocast off: autocast would
        run lstm_cell / gru_cell in its low-precision dtype (bf16 too), where the reference's
        per-step cuDNN call runs float16 whatever the autocast dtype (ATen's autocast wrapper of
        _cudnn_rnn) and a CPU RNN float32; fp32 is at least as precise as either, for (B, D) x
        (D, 4D) products that cost microseconds. The state (any float dtype) is cast once, at
        the first step, and stays fp32."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self._cells(x, rnn, self.cell.weight_ih_l0.dtype)
        return self._cells(x, rnn, None)

    def _cells(self, x: Tensor, rnn, dt):
        """The layers of _rnn_step; dt: the dtype to run them in (None: the inputs' own)."""
        cell, lstm = self.cell, self.cell_type == "lstm"
        h0, c0 = rnn if lstm else (rnn, None)  # each (num_layers, B, D)
        if dt is not None:  # .to(own dtype) is the tensor itself: no copy once the state is in dt
            x, h0, c0 = x.to(dt), h0.to(dt), (c0.to(dt) if lstm else None)
        hs, cs = [], []
        # per-layer views of the (num_layers, B, D) state: one layer squeezes (backward: a view);
        # h0[k] would be a select, whose backward writes zeros and a copy every step
        per_layer = (lambda s: (s.squeeze(0),)) if self.num_layers == 1 else (lambda s: s.unbind(0))
        h0s, c0s = per_layer(h0), (per_layer(c0) if lstm else None)
        for k in range(self.num_layers):
            w = (getattr(cell, f"weight_ih_l{k}"), getattr(cell, f"weight_hh_l{k}"),
                 getattr(cell, f"bias_ih_l{k}"), getattr(cell, f"bias_hh_l{k}"))
            if lstm:
                h, c = torch.lstm_cell(x, (h0s[k], c0s[k]), *w)  # (B, D), (B, D)
                cs.append(c)
            else:
                h = torch.gru_cell(x, h0s[k], *w)  # (B, D)
            hs.append(h)
            x = h  # the next layer's input
        layers = (lambda t: t[0].unsqueeze(0)) if len(hs) == 1 else torch.stack  # one layer: a view, no copy
        h = layers(hs)  # (num_layers, B, D)
        return x, ((h, layers(cs)) if lstm else h)

    def _project(self, h_tilde: Tensor) -> Tensor:
        shared = getattr(self, "_pass_out", None)  # (W_out, b, sink) of this pass, see _loop
        if shared is None:
            return super()._project(h_tilde)
        return _CollectedLinear.apply(h_tilde, *shared)  # (B, V)

    def forward(self, tgt_in: Tensor, memory: Tensor, memory_mask, state: DecoderState,
                teacher_forcing_ratio=1.0, sampling="argmax", tau=1.0, *, coin="token",
                noise: Tensor | None = None, generator: torch.Generator | None = None,
                check_ids: bool = True) -> DecoderOutput:
        """Same contract as ``reference.AttentionDecoder.forward``; teacher forcing takes the fast path."""
        args = self._check_forward_args(tgt_in, memory, memory_mask, state, teacher_forcing_ratio,
                                        sampling, tau, coin, noise, generator, check_ids)
        if args.teacher_forcing and not self.input_feed and tgt_in.shape[1] > 0:
            return self._teacher_forced(tgt_in, memory, args.mask, state)
        return self._loop(tgt_in, memory, state, args, coin, noise, generator)

    def _loop(self, tgt_in, memory, state, args, coin, noise, generator) -> DecoderOutput:
        """The reference's step loop. In a training pass, W_out (step 7, every step) and W_emb (the
        model-fed inputs, ratio < 1) are handed to the steps through _PassParam nodes, cast once
        under autocast, and their gradients are formed once per pass (_PassGrad) instead of one
        whole (V, D) gradient per step."""
        if torch.is_grad_enabled():
            dev = memory.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

            def cast(t):  # the autocast dtype once per pass (the reference's autocast caches it likewise)
                return t if dt is None or t is None else t.to(dt)

            W_emb, W_out, b_out = self.embedding.weight, self.W_out.weight, self.W_out.bias
            if not args.teacher_forcing and W_emb.requires_grad:
                sink = _PassGrad(W_emb, self.padding_idx)
                W = _PassParam.apply(W_emb, sink.take_weight)
                self._pass_emb = (W, cast(W), sink)
            if W_out.requires_grad and (b_out is None or b_out.requires_grad):
                sink = _PassGrad(W_out)
                b = None if b_out is None else cast(_PassParam.apply(b_out, sink.take_bias))
                self._pass_out = (cast(_PassParam.apply(W_out, sink.take_weight)), b, sink)
        try:
            return super()._loop(tgt_in, memory, state, args, coin, noise, generator)
        finally:
            self._pass_emb = self._pass_out = None

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
