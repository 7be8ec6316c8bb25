"""CUDA-graph replay of a training step's decoder pass and loss (experimental).

    step = fused_s2s.graphs.graph_decoder_loss(model, src, src_lengths, tgt, teacher_forcing_ratio=0.5,
                                               sampling="gumbel_hard", tau=1.0)
    for src, src_lengths, tgt in batches:        # every batch of the sample's shapes, dtypes, device
        opt.zero_grad(set_to_none=True)
        out = step(src, src_lengths, tgt)        # Seq2SeqOutput; out.loss is differentiable
        out.loss.backward()
        opt.step()

With a teacher-forcing schedule and an annealed tau (SPEC section 2), capture with ``scheduled=True``
and pass each call's values; one capture serves the whole run:

    step = graph_decoder_loss(model, src, src_lengths, tgt, ratio_schedule(0), "gumbel_hard",
                              tau_schedule.tau, scheduled=True)
    for i, (src, src_lengths, tgt) in enumerate(batches):
        out = step(src, src_lengths, tgt, teacher_forcing_ratio=ratio_schedule(i), tau=tau_schedule.tau)

``scheduled=True`` captures the step loop with the ratio and tau in device tensors. Calls at a
ratio of exactly 1.0 (a schedule that starts with pure teacher forcing, or keeps it) replay a
second graph instead, of the teacher-forcing fast path (without input feeding). Each of the two is
captured when first needed: the one of the capture's ratio at once, the other at its first call.
Without ``scheduled=True``, a ratio of 1.0 (and no input feeding) captures the fast path alone.

Why: in scheduled sampling the decoder runs step by step, ~30 small kernels per step launched from
Python (attention, cell, W_c, W_out, coin, Gumbel-softmax, lookup, and their backward), and at the
benchmark sizes the host takes longer to issue them than the GPU to run them. Replaying the pass
from a CUDA graph issues them all at once.

How: ``torch.cuda.make_graphed_callables`` captures the decoder pass and the loss (forward and
backward) once, on the sample batch. Each call runs the encoder eagerly (packing the source needs
its lengths on the host), copies memory, encoder state and target into the graph's static inputs and
replays the forward; ``loss.backward()`` replays the captured backward, and the gradients of
memory and encoder state flow on into the encoder's eager backward.

Rules (checked on each call before anything runs, except where noted):
- CUDA only, model in training mode (as captured; eval mode raises), the same shapes / dtypes /
  device as the sample batch (bucket by length for several shapes: one graph per shape);
- ``sampling`` and ``coin`` are fixed at capture, and so are ``teacher_forcing_ratio`` and ``tau``
  unless the pass is captured with ``scheduled=True``: then every call may pass its own (a
  schedule's values, checked as Python floats and written into 0-d device tensors the replayed
  kernels read; see below). ``noise`` and ``generator`` are not supported: coins and Gumbel seeds
  come from the default CUDA generator, whose graph-safe Philox offsets advance on every replay
  (``torch.manual_seed`` reproduces a run);
- under ``torch.autocast`` the capture and every call need the same autocast state, with
  ``cache_enabled=False`` (the fused model casts its weights once per pass itself). The captured
  forward runs under that state and the captured backward outside autocast, as an eager step's
  ``loss.backward()`` called after its autocast block (make_graphed_callables would otherwise run
  its warmup and captured backward inside the caller's autocast, which the autograd engine
  carries into the backward pass: fp32 ops' backward in the autocast dtype);
- ``out.logits`` and ``out.attention`` are the graph's static buffers, overwritten by the next
  call (clone them to keep them), and carry no gradient: only the loss is differentiable;
- the parameters must stay the same tensors (in-place optimiser updates are fine; replacing or
  re-allocating them, e.g. ``model.to(...)`` after capture, is not);
- one process: DistributedDataParallel wraps the model's forward, which the replay bypasses (not
  supported, not tested).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fused_s2s._checks import check_ratio, check_tau
from fused_s2s.reference import Seq2SeqOutput

__all__ = ["graph_decoder_loss", "GraphedDecoderLoss"]


class _DecoderLoss(nn.Module):
    """The decoder pass and the loss as a function of tensors only (what make_graphed_callables takes)."""

    def __init__(self, model, mode, autocast=None):
        super().__init__()
        self.decoder = model.decoder  # only the decoder's parameters are the graph's inputs
        self.loss, self.mode = model.loss, mode
        # (device type, dtype): the forward runs under this autocast itself (the capture runs with
        # autocast off, so that the backward does); None: the caller's state
        self.autocast = autocast

    def forward(self, tgt, memory, lengths, *rnn):  # (B, T+1), (B, L, D), (B,), 1 or 2 x (layers, B, D)
        if self.autocast is None:
            return self._forward(tgt, memory, lengths, *rnn)
        device_type, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            return self._forward(tgt, memory, lengths, *rnn)

    def _forward(self, tgt, memory, lengths, *rnn):
        state = self.decoder.init_state(tuple(rnn) if len(rnn) == 2 else rnn[0])
        ratio, sampling, tau, coin = self.mode
        # the ids were checked before (graph_decoder_loss, each call): no host sync in the capture
        out = self.decoder(tgt[:, :-1], memory, lengths, state, ratio, sampling, tau, coin=coin, check_ids=False)
        loss = self.loss(out.logits, tgt[:, 1:])  # ()
        # the loss is the only output: autograd would hand a replayed backward a zero-filled (B, T, V)
        # gradient for every other output of the graph, every step. The logits and attention of the
        # last pass run in Python are kept here instead: after capture, the graph's static buffers
        # (the replays never run this method; the wrapper refuses eval mode, the one eager fallback)
        self.outputs = (out.logits.detach(), out.attention.detach())
        return loss


def _encode(model, src, src_lengths, check_ids: bool = True):
    """The eager encoder: memory (B, L, D), lengths (B,), the final state as a tuple of tensors."""
    memory, lengths, state = model.encode(src, src_lengths, check_ids=check_ids)
    return memory, lengths, (state.rnn if isinstance(state.rnn, tuple) else (state.rnn,))


def _static_inputs(tgt, memory, lengths, rnn) -> tuple:
    """A graph's static inputs: every call copies its batch into them, so they must be tensors of
    our own (tgt.long() and the lengths may be the caller's own tensors)."""
    return (tgt.long().clone(), memory.detach().requires_grad_(memory.requires_grad), lengths.clone(),
            *(s.detach().requires_grad_(s.requires_grad) for s in rnn))


def _autocast_state(device_type="cuda"):
    on = torch.is_autocast_enabled(device_type)
    return (on, torch.get_autocast_dtype(device_type) if on else None)


def _signature(t: Tensor):
    return tuple(t.shape), t.dtype, t.device


class GraphedDecoderLoss:
    """What :func:`graph_decoder_loss` returns: call it as ``step(src, src_lengths, tgt)``."""

    # the capture (the CPU tests put an identity here to run the wrapper's own logic without CUDA)
    make_graphed = staticmethod(lambda module, args: torch.cuda.make_graphed_callables(module, args,
                                                                                       allow_unused_input=True))

    def __init__(self, model, src, src_lengths, tgt, mode, scheduled: bool = False):
        self.model, self.mode, self.scheduled = model, mode, bool(scheduled)
        self.sample = {name: _signature(t) for name, t in (("src", src), ("src_lengths", src_lengths), ("tgt", tgt))}
        self.device_type = next(model.parameters()).device.type  # "cuda" (the CPU tests: "cpu")
        self.autocast = _autocast_state(self.device_type)
        memory, lengths, rnn = _encode(model, src, src_lengths)
        self.ratio_now = mode[0]  # the ratio of the next replay, as a Python float: picks its graph
        captured = mode
        if self.scheduled:  # ratio and tau as 0-d fp64 tensors on the device, which the replays read
            ratio, sampling, tau, coin = mode
            self.ratio = torch.tensor(ratio, dtype=torch.float64, device=memory.device)
            self.tau = torch.tensor(tau, dtype=torch.float64, device=memory.device)
            captured = (self.ratio, sampling, self.tau, coin)
        # the mode each graph replays, keyed by "the teacher-forcing fast path": scheduled, calls at
        # ratio 1.0 replay it (the step loop with a tensor ratio of 1.0 gives the same loss, at its
        # own cost); input feeding has none
        self.modes = {False: captured}
        if self.scheduled and not model.decoder.input_feed:
            self.modes[True] = (1.0, *mode[1:])
        self.graphs = {}  # captured when first needed: the capture ratio's now
        self._graph(tgt, memory, lengths, rnn)

    def _graph(self, tgt, memory, lengths, rnn):
        """The graph for the next replay's ratio, captured at its first use; copies of this batch's
        tensors become its static inputs (``self.static_inputs``: the latest capture's)."""
        fast = True in self.modes and self.ratio_now == 1.0
        if fast not in self.graphs:
            self.static_inputs = _static_inputs(tgt, memory, lengths, rnn)
            self.graphs[fast] = self._capture(self.modes[fast], self.static_inputs)
        return self.graphs[fast]

    def _capture(self, mode, args):
        on, dtype = self.autocast
        module = _DecoderLoss(self.model, mode, (self.device_type, dtype) if on else None)
        # the warmup and the capture with autocast off: make_graphed_callables runs forward and
        # backward (autograd.grad) in the state it is called in, and the autograd engine carries the
        # caller's autocast into the backward pass. The module turns autocast on for the forward
        # alone: the captured backward is the one an eager step runs (loss.backward() outside autocast)
        with torch.autocast(self.device_type, enabled=False):
            return self.make_graphed(module, args)

    def __call__(self, src: Tensor, src_lengths: Tensor, tgt: Tensor, teacher_forcing_ratio=None,
                 tau=None, *, check_ids: bool = True) -> Seq2SeqOutput:
        """The decoder pass and loss for this batch. teacher_forcing_ratio, tau: this call's values
        (Python floats; None keeps the previous call's, at first the capture's); only with a
        pass captured with ``scheduled=True``. check_ids: as Seq2Seq.forward's (False: the caller
        built the ids from the vocabulary; an id out of range would assert inside the graph)."""
        if not self.scheduled and (teacher_forcing_ratio is not None or tau is not None):
            raise ValueError("teacher_forcing_ratio and tau were fixed at capture; capture with "
                             "graph_decoder_loss(..., scheduled=True) to pass them per call")
        # checked before anything runs; written into the graph's tensors after the other checks
        _no_tensors(teacher_forcing_ratio=teacher_forcing_ratio, tau=tau)
        ratio = None if teacher_forcing_ratio is None else check_ratio("teacher_forcing_ratio", teacher_forcing_ratio)
        tau = None if tau is None else check_tau(tau)
        for name, t in (("src", src), ("src_lengths", src_lengths), ("tgt", tgt)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if _signature(t) != self.sample[name]:
                shape, dtype, device = self.sample[name]
                raise ValueError(f"{name} must match the captured batch: shape {shape}, {dtype} on {device}; got "
                                 f"shape {tuple(t.shape)}, {t.dtype} on {t.device} (one graph per shape: capture "
                                 f"another with graph_decoder_loss)")
        if not self.model.training:
            raise RuntimeError("the decoder pass was captured in training mode; call model.train() (or evaluate "
                               "with the model itself)")
        if _autocast_state(self.device_type) != self.autocast:
            raise RuntimeError(f"autocast state (enabled, dtype) must be {self.autocast} as at capture, got "
                               f"{_autocast_state(self.device_type)}")
        # as Seq2Seq.forward (an out-of-range id would assert inside the graph)
        self.model._check_args(src, src_lengths, tgt, *self.mode, check_ids)
        if self.scheduled:
            for t, value in ((self.ratio, ratio), (self.tau, tau)):
                if value is not None:
                    t.fill_(value)  # a fill kernel with the value as its argument: no host sync
            self.ratio_now = self.ratio_now if ratio is None else ratio
        memory, lengths, rnn = _encode(self.model, src, src_lengths, check_ids)
        graphed = self._graph(tgt, memory, lengths, rnn)
        loss = graphed(tgt.long(), memory, lengths, *rnn)
        return Seq2SeqOutput(loss, *graphed.outputs)  # the static buffers of logits, attention


def _no_tensors(**values) -> None:
    for name, v in values.items():
        if isinstance(v, Tensor):
            raise TypeError(f"{name} must be a Python float here (the step writes it into its own device "
                            f"tensor), got a tensor")


def graph_decoder_loss(model, src: Tensor, src_lengths: Tensor, tgt: Tensor, teacher_forcing_ratio=1.0,
                       sampling="argmax", tau=1.0, *, coin="token", scheduled: bool = False) -> GraphedDecoderLoss:
    """Capture ``model``'s decoder pass and loss for batches shaped like (src, src_lengths, tgt).

    ``model`` is a ``fused_s2s.Seq2Seq`` (or the reference) on CUDA, in training mode; the arguments
    after the batch are Seq2Seq.forward's (Python floats for the ratio and tau) and stay fixed,
    except, with ``scheduled=True``, teacher_forcing_ratio and tau, which each call of the returned
    step may change. The capture runs the pass 3 times to warm up (kernel compilation, cuDNN
    choices, the allocator) and once more under capture; it advances the CUDA RNG. See the module
    docstring for the rules of the returned step.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "decoder") or not hasattr(model, "_check_args"):
        raise TypeError(f"model must be a fused_s2s.Seq2Seq, got {type(model).__name__}")
    _no_tensors(teacher_forcing_ratio=teacher_forcing_ratio, tau=tau)
    mode = model._check_args(src, src_lengths, tgt, teacher_forcing_ratio, sampling, tau, coin)  # as forward's
    device = next(model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"graph_decoder_loss needs the model on a CUDA device (CUDA graphs), got {device}")
    if not model.training:
        raise RuntimeError("graph_decoder_loss captures a training pass: call model.train() first")
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        raise RuntimeError("under torch.autocast, capture with cache_enabled=False "
                           "(torch.autocast('cuda', dtype=..., cache_enabled=False)), and call the step likewise")
    return GraphedDecoderLoss(model, src, src_lengths, tgt, mode, scheduled)
