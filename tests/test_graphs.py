"""fused_s2s.graphs: the decoder pass and loss replayed from a CUDA graph.

On the CPU: the captured module computes Seq2Seq.forward's loss (same coins and samples for the
same seed), and bad arguments are refused with clear errors. On a GPU: a replayed step gives the
eager step's gradients (teacher forcing: nothing random), each replay draws new coins and Gumbel
noise, and a batch of another shape is refused before anything runs.
"""
import pytest
import torch

import fused_s2s
from fused_s2s import graphs

B, L, T, V, D = 3, 5, 4, 23, 8


def _batch(device):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (B, L), generator=g).to(device)
    lengths = torch.tensor([5, 2, 4], device=device)
    tgt = torch.randint(3, V, (B, T + 1), generator=g).to(device)
    tgt[1, 3:] = 0  # padding in the targets
    return src, lengths, tgt


def _model(device, cell="lstm"):
    torch.manual_seed(0)
    return fused_s2s.Seq2Seq(V, V, D, cell=cell, padding_idx=0).to(device)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard"), (0.5, "gumbel")])
def test_captured_module_computes_the_forward_loss(cell, ratio, sampling):
    model = _model("cpu", cell)
    src, lengths, tgt = _batch("cpu")
    torch.manual_seed(5)
    want = model(src, lengths, tgt, teacher_forcing_ratio=ratio, sampling=sampling, tau=0.7)
    memory, mask, state = model.encode(src, lengths)
    rnn = state.rnn if isinstance(state.rnn, tuple) else (state.rnn,)
    torch.manual_seed(5)  # the encoder draws nothing: the decoder draws the same coins and noise
    module = graphs._DecoderLoss(model, (ratio, sampling, 0.7, "token"))
    loss = module(tgt, memory, mask, *rnn)  # the only output: no zero-filled gradients of the others
    logits, attention = module.outputs
    torch.testing.assert_close(loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)
    assert not logits.requires_grad and not attention.requires_grad  # only the loss takes a gradient
    # only the decoder's parameters are inputs of the graphed function
    assert {id(p) for p in module.parameters()} == {id(p) for p in model.decoder.parameters()}


def test_refuses_bad_arguments():
    model = _model("cpu")
    batch = _batch("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        graphs.graph_decoder_loss(model, *batch)
    with pytest.raises(ValueError, match="sampling"):
        graphs.graph_decoder_loss(model, *batch, 0.5, "nucleus")
    with pytest.raises(ValueError, match="tau"):
        graphs.graph_decoder_loss(model, *batch, 0.5, "gumbel", 0.0)
    with pytest.raises(TypeError, match="model"):
        graphs.graph_decoder_loss(torch.nn.Linear(2, 2), *batch)


def test_wrapper_logic_without_cuda(monkeypatch):
    """GraphedDecoderLoss around an identity 'capture' (the module runs eagerly): the encoder is
    run per call, the loss is forward's, outputs carry no gradient, the static inputs are copies,
    and mismatched batches, out-of-range ids and eval mode are refused."""
    monkeypatch.setattr(graphs.GraphedDecoderLoss, "make_graphed", staticmethod(lambda module, args: module))
    model = _model("cpu")
    batch = _batch("cpu")
    step = graphs.GraphedDecoderLoss(model, *batch, (0.5, "gumbel_hard", 0.7, "token"))
    src, lengths, tgt = batch
    static_tgt, static_lengths = step.static_inputs[0], step.static_inputs[2]
    assert static_tgt.data_ptr() != tgt.data_ptr() and static_lengths.data_ptr() != lengths.data_ptr()
    torch.manual_seed(3)
    out = step(*batch)
    torch.manual_seed(3)
    want = model(*batch, teacher_forcing_ratio=0.5, sampling="gumbel_hard", tau=0.7)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.attention, want.attention, rtol=0, atol=0)
    assert out.loss.requires_grad and not out.logits.requires_grad and not out.attention.requires_grad
    out.loss.backward()  # the gradient reaches the encoder through memory and the final state
    assert model.encoder.embedding.weight.grad is not None and model.decoder.W_out.weight.grad is not None
    with pytest.raises(ValueError, match="src must match the captured batch"):
        step(src[:, :-1], lengths, tgt)
    with pytest.raises(ValueError, match="tgt must match the captured batch"):
        step(src, lengths, tgt.int())
    with pytest.raises(TypeError, match="src_lengths must be a torch.Tensor"):
        step(src, [5, 2, 4], tgt)
    with pytest.raises(ValueError, match="tgt has ids"):
        step(src, lengths, tgt.clone().fill_(V))
    model.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        step(*batch)


def test_scheduled_wrapper_takes_each_calls_ratio_and_tau(monkeypatch):
    """scheduled=True: the 'captured' pass reads the ratio and tau from the step's own 0-d tensors,
    so each call's values (a schedule's) give forward's loss at those values; the capture's values
    until a call passes others, which then stay. Without scheduled=True they are refused per call,
    and the values are checked as Python floats before anything runs."""
    captured = []

    def capture(module, args):
        captured.append(tuple(m if isinstance(m, (str, float)) else "tensor" for m in module.mode))
        return module

    monkeypatch.setattr(graphs.GraphedDecoderLoss, "make_graphed", staticmethod(capture))
    model = _model("cpu")
    batch = _batch("cpu")
    step = graphs.GraphedDecoderLoss(model, *batch, (1.0, "gumbel", 0.7, "token"), scheduled=True)
    assert captured == [(1.0, "gumbel", 0.7, "token")]  # the capture's ratio 1.0: the fast path
    calls = [(None, None, 1.0, 0.7), (0.5, 2.0, 0.5, 2.0), (None, 0.3, 0.5, 0.3), (0.0, None, 0.0, 0.3),
             (1.0, None, 1.0, 0.3), (0.25, None, 0.25, 0.3)]
    losses = []
    for ratio, tau, want_ratio, want_tau in calls:
        torch.manual_seed(3)
        out = step(*batch, teacher_forcing_ratio=ratio, tau=tau)
        torch.manual_seed(3)
        want = model(*batch, teacher_forcing_ratio=want_ratio, sampling="gumbel", tau=want_tau)
        torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0, msg=lambda m: f"{ratio, tau}: {m}")
        losses.append(out.loss.item())
    assert len(set(losses)) == len(losses) - 1  # each call's values mattered (the two at ratio 1.0 agree)
    # ratios under 1.0 replay the step loop (ratio and tau read on the device), captured at its first
    # call; ratio 1.0 the fast path's graph: two captures in all
    assert captured == [(1.0, "gumbel", 0.7, "token"), ("tensor", "gumbel", "tensor", "token")]
    for bad, match in ((dict(tau=0.0), "tau"), (dict(teacher_forcing_ratio=1.5), "teacher_forcing_ratio"),
                       (dict(tau=torch.tensor(0.5)), "tau")):
        with pytest.raises((ValueError, TypeError), match=match):
            step(*batch, **bad)
    assert step.tau.item() == 0.3 and step.ratio.item() == 0.25  # a refused call wrote nothing
    # input feeding has no fast path: ratio 1.0 replays the step loop (gold inputs, same loss)
    captured.clear()
    torch.manual_seed(0)
    feed = fused_s2s.Seq2Seq(V, V, D, padding_idx=0, input_feed=True)
    step = graphs.GraphedDecoderLoss(feed, *batch, (0.5, "gumbel", 0.7, "token"), scheduled=True)
    torch.manual_seed(3)
    out = step(*batch, teacher_forcing_ratio=1.0)
    torch.manual_seed(3)
    torch.testing.assert_close(out.loss, feed(*batch, teacher_forcing_ratio=1.0).loss, rtol=0, atol=0)
    assert captured == [("tensor", "gumbel", "tensor", "token")]
    fixed = graphs.GraphedDecoderLoss(model, *batch, (0.5, "gumbel", 0.7, "token"))
    with pytest.raises(ValueError, match="scheduled=True"):
        fixed(*batch, tau=0.5)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard"])
def test_capture_under_autocast_runs_the_backward_as_an_eager_step(monkeypatch, sampling, scheduled):
    """Under bf16 autocast, scheduled sampling, T > _PassGrad.FLUSH steps: the 'capture' (here what
    make_graphed_callables does before capturing: the pass and autograd.grad over its inputs and
    parameters, in the state it is called in) succeeds, and its gradients are those of an eager step
    whose forward runs under autocast and backward after it (bench_train's fused_graphed; it failed
    with 'self and mat2 must have the same dtype' when the backward ran inside autocast)."""
    from fused_s2s.model import _PassGrad

    captured = {}

    def warmup(module, args):
        loss = module(*args)
        captured["autocast_in_backward"] = torch.is_autocast_enabled("cpu")
        params = [p for p in module.parameters() if p.requires_grad]
        captured["grads"] = torch.autograd.grad(loss, [a for a in args if a.requires_grad] + params)[-len(params):]
        captured["names"] = [n for n, p in module.named_parameters() if p.requires_grad]
        captured["loss"] = loss.detach()
        return module

    monkeypatch.setattr(graphs.GraphedDecoderLoss, "make_graphed", staticmethod(warmup))
    model = _model("cpu")
    g = torch.Generator().manual_seed(1)
    Tl = _PassGrad.FLUSH + 4
    src, lengths, _ = _batch("cpu")
    tgt = torch.randint(3, V, (B, Tl + 1), generator=g)
    mode = (0.5, sampling, 0.7, "token")
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        step = graphs.GraphedDecoderLoss(model, src, lengths, tgt, mode, scheduled)  # scheduled: tensors
    assert not captured["autocast_in_backward"]
    torch.manual_seed(7)  # the encoder draws nothing: the same coins and noise as the capture's
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        out = model(src, lengths, tgt, *mode[:3], coin=mode[3])
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.testing.assert_close(captured["loss"], out.loss.detach(), rtol=0, atol=0)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.bfloat16  # the forward ran under autocast
    params = dict(model.named_parameters())  # the module's names: "decoder.*"
    for n, got in zip(captured["names"], captured["grads"]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, params[n].grad, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    # the step keeps the capture's autocast state: a call under it runs, one without it is refused
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        step(src, lengths, tgt)
    with pytest.raises(RuntimeError, match="autocast state"):
        step(src, lengths, tgt)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.gpu
@pytest.mark.kernels
def test_replayed_step_matches_eager_and_redraws_noise():
    batch = _batch("cuda")
    # teacher forcing draws nothing: a replayed step's gradients are the eager step's
    eager, model = _model("cuda"), _model("cuda")  # the same seed: the same weights
    eager(*batch).loss.backward()
    step = graphs.graph_decoder_loss(model, *batch)
    for _ in range(2):  # the second replay after zero_grad(set_to_none=True) gives them again
        model.zero_grad(set_to_none=True)
        out = step(*batch)
        out.loss.backward()
    torch.cuda.synchronize()
    want = eager(*batch)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    # the logits and attention returned are the graph's static outputs, filled by the replay
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attention, want.attention, rtol=1e-5, atol=1e-6)
    for n, g in _grads(eager).items():
        assert _grads(model)[n] is not None, f"{n}: no gradient from the replayed step"
        torch.testing.assert_close(_grads(model)[n], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # scheduled sampling: each replay draws new coins and Gumbel noise (graph-safe Philox offsets)
    model = _model("cuda")
    step = graphs.graph_decoder_loss(model, *batch, 0.5, "gumbel_hard")
    seen = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        step(*batch).loss.backward()
        seen.append(model.decoder.embedding.weight.grad.clone())
    assert all(torch.isfinite(g).all() for g in seen)
    assert not (torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])), "replays drew the same samples"
    # scheduled=True: one capture of the step loop, each replay at its own ratio and tau (read on the
    # device), and one of the fast path for ratio 1.0. A tau far above the logits' spread makes the
    # soft samples uniform whatever the noise, and ratio 1.0 makes every input gold: both replays then
    # match an eager step at the same values
    sched, eager = _model("cuda"), _model("cuda")
    step_s = graphs.graph_decoder_loss(sched, *batch, 0.5, "gumbel", 0.7, scheduled=True)
    for ratio, tau in ((1.0, 0.7), (0.0, 1e8), (0.5, 0.7)):
        out = step_s(*batch, teacher_forcing_ratio=ratio, tau=tau)
        if ratio == 0.5:
            assert torch.isfinite(out.loss)
            continue
        want = eager(*batch, teacher_forcing_ratio=ratio, sampling="gumbel", tau=tau)
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5, msg=lambda m: f"{ratio, tau}: {m}")
    # other batches of the same shape: copied into the graph's own inputs, never into the sample's
    sample = [t.clone() for t in batch]
    src, lengths, tgt = batch
    other = (src.flip(0), lengths.flip(0), tgt.flip(0))
    model.zero_grad(set_to_none=True)
    step(*other).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(batch, sample)), "a call wrote into the capture's sample batch"
    # another shape is refused before anything runs
    with pytest.raises(ValueError, match="tgt must match the captured batch"):
        step(src, lengths, tgt[:, :-1])
    model.eval()
    with pytest.raises(RuntimeError, match="training mode"):
        step(*batch)
