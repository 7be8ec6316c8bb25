"""The drop-in fused model (fused_s2s.Seq2Seq / AttentionDecoder) against the eager reference.

Both are loaded with the same weights; the float64 reference is the oracle. The fused model runs
backend="triton" (kernels; the interpreter on CPU) so these tests exercise the kernels inside the
real decoder loop, including the in-kernel Gumbel noise matching the reference's Philox noise.
"""
import functools
import io
import warnings

import pytest
import torch

import fused_s2s
from fused_s2s import reference
from helpers import assert_oracle_close

pytestmark = pytest.mark.kernels

MODES = ("argmax", "sample", "gumbel", "gumbel_hard", "softmax")


def _batch(device, B=3, L=5, T=4, V=11, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (B, L), generator=g)
    lengths = torch.tensor([L, max(1, L - 2), 1][:B] + [L] * max(0, B - 3))
    tgt = torch.randint(3, V, (B, T + 1), generator=g)
    tgt[:, 0] = 1
    if pad:
        src[1, lengths[1]:] = 0
        tgt[1, -1] = 0  # a padded target position, ignored by the loss
    return src.to(device), lengths.to(device), tgt.to(device)


def _models(device, V=11, D=8, cell="lstm", layers=1, input_feed=False, dtype=torch.float32):
    torch.manual_seed(0)
    ref = reference.Seq2Seq(V, V, D, cell=cell, num_layers=layers, input_feed=input_feed).to(device)
    fused = fused_s2s.Seq2Seq(V, V, D, cell=cell, num_layers=layers, input_feed=input_feed, backend="triton").to(device)
    fused.load_state_dict(ref.state_dict())
    oracle = reference.Seq2Seq(V, V, D, cell=cell, num_layers=layers, input_feed=input_feed).to(device).double()
    oracle.load_state_dict(ref.state_dict())
    return ref.to(dtype), fused.to(dtype), oracle


def _run(model, batch, ratio, sampling, seed=1, tau=0.7, coin="token"):
    torch.manual_seed(seed)
    out = model(*batch, teacher_forcing_ratio=ratio, sampling=sampling, tau=tau, coin=coin)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


def _check_all(ref, fused, oracle, batch, ratio, sampling, factor=4.0, **kw):
    o_ref, g_ref = _run(ref, batch, ratio, sampling, **kw)
    o_fus, g_fus = _run(fused, batch, ratio, sampling, **kw)
    o_ora, g_ora = _run(oracle, batch, ratio, sampling, **kw)
    for field in ("loss", "logits", "attention"):
        assert_oracle_close(getattr(o_fus, field), getattr(o_ref, field), getattr(o_ora, field),
                            factor=factor, name=field)
    for n in g_ora:
        assert_oracle_close(g_fus[n], g_ref[n], g_ora[n], factor=factor, name=f"grad {n}")


# ratio 1.0 ignores the sampling mode, so it is run once
@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax")] + [(r, m) for r in (0.5, 0.0) for m in MODES])
def test_fused_matches_reference_each_mode(device, ratio, sampling):
    ref, fused, oracle = _models(device)
    _check_all(ref, fused, oracle, _batch(device), ratio, sampling)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("input_feed", [False, True])
@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard")])
def test_fused_matches_reference_architectures(device, cell, layers, input_feed, ratio, sampling):
    ref, fused, oracle = _models(device, cell=cell, layers=layers, input_feed=input_feed)
    _check_all(ref, fused, oracle, _batch(device), ratio, sampling)


@pytest.mark.parametrize("coin", ["token", "step", "sequence"])
def test_fused_matches_reference_coins(device, coin):
    ref, fused, oracle = _models(device)
    _check_all(ref, fused, oracle, _batch(device, T=5), 0.5, "gumbel", coin=coin)


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel"), (0.5, "softmax")])
def test_fused_matches_reference_bf16(device, ratio, sampling):
    # discrete choices (argmax, hard samples) may flip between bf16 and float64 near ties, so bf16
    # is checked in the continuous modes; the coins and noise are the same draws in every model
    ref, fused, oracle = _models(device, dtype=torch.bfloat16)
    _check_all(ref, fused, oracle, _batch(device), ratio, sampling)


def test_teacher_forcing_fast_path_equals_step_loop(device):
    _, fused, oracle = _models(device)
    src, lengths, tgt = _batch(device)
    memory, mask, state = fused.encode(src, lengths)
    fast = fused.decoder(tgt[:, :-1], memory, mask, state)  # ratio 1.0: whole-sequence path
    args = fused.decoder._check_forward_args(tgt[:, :-1], memory, mask, state, 1.0, "argmax", 1.0, "token", None, None)
    loop = fused.decoder._loop(tgt[:, :-1], memory, state, args, "token", None, None)
    torch.testing.assert_close(fast.logits, loop.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.attention, loop.attention, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.state.rnn, loop.state.rnn):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.state.h_tilde, loop.state.h_tilde, rtol=1e-5, atol=1e-6)


def test_same_seed_same_run(device):
    _, fused, _ = _models(device)
    batch = _batch(device, T=5)
    for sampling in ("sample", "gumbel_hard"):
        o1, g1 = _run(fused, batch, 0.3, sampling, seed=7)
        o2, g2 = _run(fused, batch, 0.3, sampling, seed=7)
        o3, _ = _run(fused, batch, 0.3, sampling, seed=8)
        assert torch.equal(o1.logits, o2.logits)
        assert all(torch.equal(g1[n], g2[n]) for n in g1)
        assert not torch.equal(o1.logits, o3.logits)  # a different seed draws different coins/noise


def test_state_dict_round_trip_both_ways(device, tmp_path):
    ref, fused, _ = _models(device)
    batch = _batch(device)
    for src_model, dst_cls in ((ref, fused_s2s.Seq2Seq), (fused, reference.Seq2Seq)):
        buf = io.BytesIO()
        torch.save(src_model.state_dict(), buf)
        buf.seek(0)
        dst = dst_cls(11, 11, 8).to(device)
        dst.load_state_dict(torch.load(buf, weights_only=True))
        torch.manual_seed(3)
        a = src_model(*batch, teacher_forcing_ratio=0.5, sampling="gumbel", tau=0.5).loss
        torch.manual_seed(3)
        b = dst(*batch, teacher_forcing_ratio=0.5, sampling="gumbel", tau=0.5).loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_incremental_step_and_reorder(device):
    ref, fused, _ = _models(device)
    src, lengths, tgt = _batch(device)
    m_r, mask_r, st_r = ref.encode(src, lengths)
    m_f, mask_f, st_f = fused.encode(src, lengths)
    for t in range(3):
        lr, ar, st_r = ref.decoder.step(tgt[:, t], st_r, m_r, mask_r)
        lf, af, st_f = fused.decoder.step(tgt[:, t], st_f, m_f, mask_f)
        torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(af, ar, rtol=1e-5, atol=1e-6)
    index = torch.tensor([2, 2, 0], device=device)
    st = st_f.reorder(index)
    assert torch.equal(st.h_tilde, st_f.h_tilde[index])
    assert torch.equal(st.rnn[0], st_f.rnn[0][:, index])


def test_beam_one_equals_greedy_on_fused(device):
    _, fused, _ = _models(device)
    src, lengths, _ = _batch(device)
    g = fused.generate(src, lengths, max_len=6, strategy="greedy")
    b = fused.generate(src, lengths, max_len=6, strategy="beam", beam_size=1, length_penalty="none")
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.scores, b.scores)


def test_hard_embedding_gradient_is_straight_through():
    from fused_s2s.model import _HardEmbedding

    torch.manual_seed(0)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y_soft = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1).requires_grad_()
    idx = torch.tensor([1, 6, 1])
    y_hard = torch.nn.functional.one_hot(idx, 7).double()
    ref = (y_hard - y_soft.detach() + y_soft) @ W
    out = _HardEmbedding.apply(y_soft, idx, W)
    assert torch.equal(out, W[idx])
    gr = torch.randn(3, 4, dtype=torch.float64)
    d_ref = torch.autograd.grad(ref, (y_soft, W), gr)
    d_out = torch.autograd.grad(out, (y_soft, W), gr)
    for a, b in zip(d_out, d_ref):
        torch.testing.assert_close(a, b)


def test_step_loop_looks_up_the_gold_inputs_once(device):
    """Fused: one embedding call for all T gold inputs (one (V, D) gradient scatter); reference: T."""
    ref, fused, _ = _models(device)
    batch = _batch(device, T=5)
    calls = {}
    for name, model in (("ref", ref), ("fused", fused)):
        calls[name] = 0

        def count(*_, name=name):
            calls[name] += 1

        model.decoder.embedding.register_forward_hook(count)
        _run(model, batch, 0.5, "gumbel")  # "gumbel" feeds y @ W_emb: no lookup for the model's input
    assert calls == {"ref": 5, "fused": 1}


@pytest.mark.parametrize("cell,layers", [("lstm", 2), ("gru", 1)])
def test_step_loop_steps_the_cell_without_the_sequence_rnn(device, cell, layers):
    """Fused: the step loop runs the RNN layer by layer as cells (no per-step call of the sequence
    RNN, whose cuDNN set-up costs every step); the teacher-forced fast path calls it once for all T."""
    ref, fused, _ = _models(device, cell=cell, layers=layers)
    batch = _batch(device, T=5)
    calls = {}
    for name, model in (("ref", ref), ("fused", fused)):
        calls[name] = []

        def count(*_, name=name):
            calls[name].append(1)

        model.decoder.cell.register_forward_hook(count)
        for ratio in (0.5, 1.0):
            calls[name].append(ratio)
            _run(model, batch, ratio, "gumbel_hard")
    assert calls["ref"] == [0.5] + [1] * 5 + [1.0] + [1] * 5
    assert calls["fused"] == [0.5, 1.0, 1]


@pytest.mark.parametrize("sampling", MODES)
def test_step_loop_forms_W_out_and_W_emb_gradients_once_per_pass(device, monkeypatch, sampling):
    """In the step loop every step leaves its W_out / W_emb gradient factors in one sink per weight,
    formed once at the end of the backward pass; the gradients equal the reference's, and a second
    backward (retain_graph) sums afresh."""
    from fused_s2s import model as fused_model

    taken = []
    take = fused_model._PassGrad.take_weight

    def spy(self):
        taken.append((self.like.shape, len(self.rows), len(self.pairs)))  # before the last flush
        return take(self)

    monkeypatch.setattr(fused_model._PassGrad, "take_weight", spy)
    ref, fused, _ = _models(device, V=11, D=8)
    for m in (ref, fused):  # a padding row: lookups (argmax / sample) leave it out, as nn.Embedding does
        m.decoder.padding_idx = m.decoder.embedding.padding_idx = 0
    batch = _batch(device, T=4)
    grads = {}
    for name, model in (("ref", ref), ("fused", fused)):
        torch.manual_seed(1)
        out = model(*batch, teacher_forcing_ratio=0.0, sampling=sampling, tau=0.7)
        model.zero_grad(set_to_none=True)
        out.loss.backward(retain_graph=True)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.loss.backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, 2 * grads[name][n], msg=n)
    soft = sampling in ("gumbel", "softmax")
    emb = (torch.Size([11, 8]), 0, 3) if soft else (torch.Size([11, 8]), 3, 0)  # T - 1 model-fed steps
    out_ = (torch.Size([11, 8]), 0, 4)  # W_out (V, D): T steps
    assert sorted(taken) == sorted([emb, out_] * 2)  # one take per weight and backward pass
    for n in grads["ref"]:
        torch.testing.assert_close(grads["fused"][n], grads["ref"][n], rtol=1e-5, atol=1e-6, msg=n)
    assert fused.decoder._pass_emb is None and fused.decoder._pass_out is None  # nothing kept


def test_no_gradient_sinks_without_autograd(device, monkeypatch):
    """Inference (no_grad) and frozen weights take the plain per-step ops: no _PassGrad is built."""
    from fused_s2s import model as fused_model

    def refuse(*a, **k):
        raise AssertionError("_PassGrad built")

    _, fused, _ = _models(device)
    batch = _batch(device)
    monkeypatch.setattr(fused_model._PassGrad, "__init__", refuse)
    with torch.no_grad():
        fused(*batch, teacher_forcing_ratio=0.0, sampling="gumbel_hard", tau=0.7)
    for p in (fused.decoder.embedding.weight, fused.decoder.W_out.weight):
        p.requires_grad_(False)
    out = fused(*batch, teacher_forcing_ratio=0.0, sampling="gumbel", tau=0.7)
    out.loss.backward()  # the other parameters still get their gradients
    assert fused.decoder.W_c.weight.grad is not None and fused.decoder.embedding.weight.grad is None


def test_pass_grad_flushes_products_in_bounded_chunks():
    from fused_s2s.model import _PassGrad

    torch.manual_seed(0)
    W = torch.zeros(6, 3, dtype=torch.float64)
    sink = _PassGrad(W)
    A = [torch.randn(2, 6, dtype=torch.float64) for _ in range(19)]
    Bs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(19)]
    for a, b in zip(A, Bs):
        sink.add_product(a, b)
        assert len(sink.pairs) < _PassGrad.FLUSH  # never more than FLUSH steps held
    ref = sum(a.t() @ b for a, b in zip(A, Bs))
    torch.testing.assert_close(sink.take_weight(), ref)
    assert sink.take_weight() is None


def test_W_emb_sink_leaves_the_padding_row_out_of_lookups_only():
    from fused_s2s.model import _PassGrad

    W = torch.zeros(5, 2)
    index, grad = torch.tensor([0, 3, 0]), torch.ones(3, 2)
    sink = _PassGrad(W, padding_idx=0)
    sink.add_rows(index, grad, lookup=True)  # nn.Embedding: no gradient for the padding row
    sink.add_rows(index, grad, lookup=False)  # y_st @ W_emb (gumbel_hard): the padding row is a row
    sink.add_product(torch.eye(5)[[0, 4]], torch.full((2, 2), 2.0))  # y @ W_emb: y^T grad
    torch.testing.assert_close(sink.take_weight(), torch.tensor([[4.0, 4.0], [0, 0], [0, 0], [2, 2], [2, 2]]))
    assert sink.take_weight() is None  # emptied: a second backward starts afresh


def test_pass_grad_flushes_in_the_weight_dtype_under_autocast():
    """A backward may run inside autocast (the autograd engine carries the caller's autocast into it;
    make_graphed_callables' warmup and capture do so): the sink's products stay in the weight's dtype,
    and a second flush adds into the buffer instead of failing on a bfloat16 one (bench_train's
    fused_graphed bf16 scheduled sampling: 'self and mat2 must have the same dtype')."""
    from fused_s2s.model import _PassGrad

    torch.manual_seed(0)
    W = torch.zeros(6, 3)
    A = [torch.randn(2, 6).bfloat16() for _ in range(2 * _PassGrad.FLUSH + 1)]  # three flushes
    Bs = [torch.randn(2, 3).bfloat16() for _ in A]
    want = _PassGrad(W)
    for a, b in zip(A, Bs):
        want.add_product(a, b)
    want = want.take_weight()  # outside autocast: fp32 products
    sink = _PassGrad(W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(A, Bs):
            sink.add_product(a, b)
        got = sink.take_weight()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard"])
def test_backward_inside_autocast_bf16_step_loop(device, sampling):
    """loss.backward() inside the autocast block, T > _PassGrad.FLUSH steps (several flushes): runs,
    every gradient fp32, finite and within bf16 rounding of a backward outside autocast (inside it,
    torch's own backward of fp32 ops, the cells', runs in bf16; the hand-formed ones do not)."""
    from fused_s2s.model import _PassGrad

    _, fused, _ = _models(device)
    batch = _batch(device, T=_PassGrad.FLUSH + 4)
    grads = {}
    for inside in (False, True):
        torch.manual_seed(1)
        fused.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fused(*batch, teacher_forcing_ratio=0.5, sampling=sampling, tau=0.7)
            if inside:
                out.loss.backward()
        if not inside:
            out.loss.backward()
        grads[inside] = {n: p.grad for n, p in fused.named_parameters()}
    for n, g in grads[True].items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), n
        err = (g - grads[False][n]).abs().max() / grads[False][n].abs().max()
        assert err <= 2e-2, f"{n}: {err:.2e} of its largest entry from the gradient outside autocast"


def test_autocast_bf16_runs_with_fp32_accumulation(device):
    _, fused, _ = _models(device)
    batch = _batch(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fused(*batch, teacher_forcing_ratio=0.5, sampling="gumbel_hard", tau=0.7)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    torch.testing.assert_close(out.attention.float().sum(-1), torch.ones(out.attention.shape[:2], device=device),
                               atol=2e-2, rtol=0)


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel"), (0.5, "gumbel_hard"), (0.0, "sample")])
def test_autocast_bf16_matches_reference_against_oracle(device, ratio, sampling):
    """Under autocast the step loop casts W_out / W_emb once per pass (as autocast's cache does for
    the reference): loss and every gradient meet the float64 oracle as well as the reference's."""
    ref, fused, oracle = _models(device)
    batch = _batch(device)
    outs, grads = {}, {}
    for name, model in (("ref", ref), ("fused", fused), ("oracle", oracle)):
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name != "oracle"):
            out = model(*batch, teacher_forcing_ratio=ratio, sampling=sampling, tau=0.7)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        outs[name], grads[name] = out, {n: p.grad for n, p in model.named_parameters()}
    assert_oracle_close(outs["fused"].loss, outs["ref"].loss, outs["oracle"].loss, factor=4.0, name="loss")
    for n in grads["oracle"]:
        assert_oracle_close(grads["fused"][n], grads["ref"][n], grads["oracle"][n], factor=4.0, name=f"grad {n}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autocast_takes_float16_memory_and_state_as_cudnn_returns_them(device, cell, monkeypatch):
    """On CUDA, autocast runs the encoder's cuDNN RNN in float16 whatever the autocast dtype, so
    under bf16 autocast memory and the final state come as float16 while the parameters are fp32:
    the decoder takes them (no dtype error), its step loop runs the cells in fp32 (the state comes
    back fp32; autocast would run them in bf16, less precise than the reference's fp16 cuDNN step),
    and meets the float64 oracle as the fp32 pass does. Outside autocast, float16 memory for fp32
    parameters is still refused, naming memory."""
    _, fused, oracle = _models(device, cell=cell)
    src, lengths, tgt = _batch(device)
    memory, mask, state = fused.encode(src, lengths)
    half = lambda s: tuple(t.half() for t in s) if isinstance(s, tuple) else s.half()  # noqa: E731
    state16 = type(state)(half(state.rnn), state.h_tilde)
    with pytest.raises(TypeError, match="memory"):
        fused.decoder(tgt[:, :-1], memory.half(), mask, state16, 0.5, "gumbel")
    dbl = lambda s: tuple(t.double() for t in s) if isinstance(s, tuple) else s.double()  # noqa: E731
    calls, name = [], f"{cell}_cell"
    real = getattr(torch, name)

    def spy(x, hx, *w):  # what each cell step runs under: autocast off, fp32 inputs
        hs = hx if isinstance(hx, tuple) else (hx,)
        calls.append((torch.is_autocast_enabled(device.type), x.dtype, *(h.dtype for h in hs)))
        return real(x, hx, *w)

    monkeypatch.setattr(torch, name, spy)
    errs = []
    for mem, st in ((memory.half(), state16), (memory, state)):  # float16 as from cuDNN; fp32 as on CPU
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fused.decoder(tgt[:, :-1], mem, mask, st, 0.5, "gumbel", 0.7)
        for s in (out.state.rnn if isinstance(out.state.rnn, tuple) else (out.state.rnn,)):
            assert s.dtype == torch.float32
        # the float64 oracle on the same memory and state, the same coins and noise
        torch.manual_seed(1)
        want = oracle.decoder(tgt[:, :-1], mem.double(), mask, type(state)(dbl(st.rnn), st.h_tilde.double()),
                              0.5, "gumbel", 0.7)
        errs.append((out.logits.double() - want.logits).abs().max().item())
    assert errs[0] <= 2 * errs[1], errs  # float16 inputs cost no accuracy beyond their own rounding
    assert calls and set(calls) == {(False,) + (torch.float32,) * (3 if cell == "lstm" else 2)}, set(calls)


def test_bad_input_names_argument(device):
    _, fused, _ = _models(device)
    src, lengths, tgt = _batch(device)
    with pytest.raises(ValueError, match="tau"):
        fused(src, lengths, tgt, 0.5, "gumbel", tau=0.0)
    with pytest.raises(ValueError, match="sampling"):
        fused(src, lengths, tgt, 0.5, "nucleus")
    with pytest.raises(ValueError, match="teacher_forcing_ratio"):
        fused(src, lengths, tgt, 1.5)
    with pytest.raises(ValueError, match="tgt"):
        fused(src, lengths, tgt.clamp_max(5) + 20)
    with pytest.raises(ValueError, match="backend"):
        fused_s2s.Seq2Seq(11, 11, 8, backend="cuda")


@pytest.mark.parametrize("sampling", ["sample", "gumbel_hard"])
def test_autocast_explicit_noise_same_samples_as_reference(device, sampling):
    """Given noise is used in the logits' dtype by both models (bf16 logits under autocast): the
    same samples, so the same tokens are fed (they differed when the reference added the noise
    in fp32 and the fused op in bf16)."""
    torch.manual_seed(0)
    V, D, B, T = 200, 16, 32, 12
    ref = reference.Seq2Seq(20, V, D).to(device)
    fused = fused_s2s.Seq2Seq(20, V, D, backend="triton").to(device)
    fused.load_state_dict(ref.state_dict())
    src, lengths = torch.randint(3, 20, (B, 5), device=device), torch.full((B,), 5, device=device)
    tgt = torch.randint(3, V, (B, T + 1), device=device)
    tgt[:, 0] = 1
    noise = -torch.empty(B, T, V, device=device).exponential_().log()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        a, b = [m(src, lengths, tgt, 0.0, sampling, noise=noise).logits.float() for m in (ref, fused)]
    diff = (a - b).abs().max().item()
    assert diff <= 4e-3, diff  # bf16 rounding of the same computation (2e-3 here); a different token fed: ~0.15


# ------------------------------------------------------------------------------------------------
# teacher_forcing_ratio and tau as 0-d tensors (the capturable form, fused_s2s.graphs scheduled=True)


@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard", "softmax"])
def test_tensor_ratio_and_tau_give_the_float_run(device, sampling):
    """Same seed: the same coins, samples, loss and gradients as Python floats, fused and reference
    (the tensors are compared and divided on the device as the floats are: the same bits)."""
    ref, fused, _ = _models(device)
    batch = _batch(device, T=6)
    for model in (ref, fused):
        o_f, g_f = _run(model, batch, 0.5, sampling, tau=0.7)
        tensors = dict(tau=torch.tensor(0.7, dtype=torch.float64, device=device))
        o_t, g_t = _run(model, batch, torch.tensor(0.5, dtype=torch.float64, device=device), sampling, **tensors)
        for field in ("loss", "logits", "attention"):
            assert torch.equal(getattr(o_t, field), getattr(o_f, field)), field
        for n in g_f:
            assert (g_t[n] is None) == (g_f[n] is None) and (g_f[n] is None or torch.equal(g_t[n], g_f[n])), n


def test_a_pass_checks_tensor_ratio_and_tau_values_once_and_steps_skip_argument_checks(monkeypatch):
    """Host time per step: a fused training pass reads a tensor ratio's and tau's value once each
    (on CUDA each check is a device assert, a few small launches), not again in Seq2Seq.forward
    and at every step's Gumbel-softmax; the steps' attention skips attention_step's argument checks
    (memory and mask were checked for the pass)."""
    from fused_s2s import _checks
    from fused_s2s import attention as A

    value_checks, validates = [], []
    scalar, validate = _checks._scalar_tensor, A._validate

    def counting_scalar(name, *rest):  # rest: t, device, ok, expected[, values]
        if rest[4:5] != (False,):
            value_checks.append(name)
        return scalar(name, *rest)

    monkeypatch.setattr(_checks, "_scalar_tensor", counting_scalar)
    monkeypatch.setattr(A, "_validate", lambda *a: validates.append(1) or validate(*a))
    _, fused, _ = _models("cpu")
    T = 6
    batch = _batch("cpu", T=T)
    tensor = functools.partial(torch.tensor, dtype=torch.float64)
    for sampling in ("gumbel", "gumbel_hard"):
        value_checks.clear()
        _run(fused, batch, tensor(0.5), sampling, tau=tensor(0.7))
        assert sorted(value_checks) == ["tau", "teacher_forcing_ratio"], (sampling, value_checks)
    assert validates == []
    # the public ops still check their arguments
    fused_s2s.attention_step(torch.randn(2, 8), torch.randn(2, 3, 8), backend="eager")
    assert validates == [1]
    with pytest.raises(ValueError, match="tau"):
        fused_s2s.gumbel_softmax(torch.randn(2, 5), tau=tensor(-1.0), backend="eager")


def test_tensor_ratio_one_runs_the_step_loop_with_gold_inputs(device):
    """A tensor ratio is not read on the host: at 1.0 it runs the step loop, draws its coins and
    samples, and feeds every step its gold input (the loss of teacher forcing)."""
    ref, fused, oracle = _models(device)
    batch = _batch(device)
    one = torch.tensor(1.0, device=device)
    for model in (ref, fused):
        want, _ = _run(model, batch, 1.0, "argmax")
        rng_state = torch.cuda.get_rng_state if torch.device(device).type == "cuda" else torch.get_rng_state
        state = rng_state()
        got, _ = _run(model, batch, one, "gumbel_hard")
        assert not torch.equal(rng_state(), state)  # it drew (coins, Gumbel seeds)
        assert_oracle_close(got.loss, _run(ref, batch, 1.0, "argmax")[0].loss, _run(oracle, batch, 1.0, "argmax")[0].loss,
                            name="loss")
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.manual_seed(1)
    torch.testing.assert_close(_run(ref, batch, one, "gumbel")[0].loss, _run(ref, batch, 1.0, "argmax")[0].loss,
                               rtol=0, atol=0)  # the reference's step loop is the same ops either way


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard"), (0.5, "gumbel")])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(device, ratio, sampling):
    """torch.utils.checkpoint (non-reentrant) recomputes the pass in the backward: the same seeds
    (checkpoint restores torch's RNG state, the Gumbel seeds come from it), and the W_out / W_emb
    gradients the step loop forms once per pass (_PassGrad) counted once, not per recomputation."""
    from torch.utils.checkpoint import checkpoint

    src, lengths, tgt = _batch(device)
    _, fused, _ = _models(device)

    def run(ckpt):
        fused.zero_grad(set_to_none=True)
        torch.manual_seed(11)  # coins and Gumbel seeds
        fn = lambda s, n, t: fused(s, n, t, ratio, sampling).loss  # noqa: E731
        loss = checkpoint(fn, src, lengths, tgt, use_reentrant=False) if ckpt else fn(src, lengths, tgt)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in fused.named_parameters()}

    (want_loss, want), (got_loss, got) = run(False), run(True)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=f"grad of {k} under checkpoint")


@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard", "softmax"])
def test_learned_tau_gets_the_reference_gradient(device, sampling):
    """tau a 0-d tensor that requires grad (a learned temperature): the fused pass gives it the
    reference's gradient (the Gumbel op's backward runs the eager math for it; before, the fused
    model's tau.grad stayed None in the Gumbel modes)."""
    src, lengths, tgt = _batch(device)
    ref, fused, oracle = _models(device)
    got = []
    for model, dt in ((fused, torch.float32), (ref, torch.float32), (oracle, torch.float64)):
        tau = torch.tensor(0.8, device=device, dtype=dt, requires_grad=True)
        torch.manual_seed(4)
        model(src, lengths, tgt, 0.3, sampling, tau).loss.backward()
        assert tau.grad is not None
        got.append(tau.grad)
    assert_oracle_close(*got, name="dtau")


@pytest.mark.parametrize("ratio,sampling,input_feed", [(1.0, "argmax", False), (0.5, "argmax", True),
                                                      (0.5, "gumbel", False), (0.5, "gumbel_hard", False)])
def test_gradient_penalty_through_the_fused_pass(device, ratio, sampling, input_feed):
    """create_graph=True over a whole pass (a gradient penalty): the first-order gradients and the
    penalty's gradients are the reference's (float64 oracle rule).

    The ops' backward recomputes with the eager math there; against the saved inputs themselves
    autograd.grad took total derivatives (the query depends on the memory through earlier steps)
    and counted paths twice, 1e-5 off in float64. "gumbel_hard" is checked to first order only:
    the fused straight-through embedding forms dW_emb from the sampled rows, so its second
    derivative lacks the reference's d(y_st^T g)/dlogits term, which only the ST expression's
    zero-valued y_soft - y_soft.detach() carries (docs/model.md); a warning says so."""
    if device.type == "cuda":
        pytest.skip("PyTorch's CUDA RNNs (cuDNN, the fused LSTM / GRU cells) have no double backward "
                    "(pytorch/pytorch#5261, #20449): the ops' own double backward is tested on CUDA")
    src, lengths, tgt = _batch(device)
    ref, fused, oracle = _models(device, input_feed=input_feed)  # input feeding: s_t depends on H

    def grads(model):
        params = [p for _, p in model.named_parameters()]
        torch.manual_seed(4)
        loss = model(src, lengths, tgt, ratio, sampling).loss
        first = torch.autograd.grad(loss, params, create_graph=True)
        return first, torch.autograd.grad(sum(g.square().sum() for g in first), params)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = grads(fused)
    said = [w for w in caught if "straight-through term" in str(w.message)]
    assert bool(said) == (sampling == "gumbel_hard"), "the missing second-order term is said, and only there"
    first_ref, second_ref = grads(ref)
    first_oracle, second_oracle = grads(oracle)
    names = [n for n, _ in fused.named_parameters()]
    for name, a, e, o in zip(names, first, first_ref, first_oracle):
        assert_oracle_close(a, e, o, name=f"gradient of {name} under create_graph")
    if sampling != "gumbel_hard":
        for name, a, e, o in zip(names, second, second_ref, second_oracle):
            assert_oracle_close(a, e, o, name=f"penalty gradient of {name}")
