"""The eager textbook model (fused_s2s.reference): math, masking, sampling semantics, draw order.

CPU only, small shapes, float64 where gradients are checked.
"""
import time

import pytest
import torch
from torch.func import functional_call

from fused_s2s import philox, reference
from fused_s2s.reference import (
    AttentionDecoder,
    DecoderState,
    Encoder,
    Seq2Seq,
    attention_eager,
    gumbel_argmax_eager,
    gumbel_softmax_eager,
)

MODES = ["argmax", "sample", "gumbel", "gumbel_hard", "softmax"]
COINS = ["token", "step", "sequence"]
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU ops: intra-op threads only add overhead (softmax took ~12 ms with 2 busy threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(B=2, L=3, T=3, Vs=7, Vt=7, lengths=None, tgt_lengths=None, gen=None):
    """src (B, L) right-padded, lengths (B,), tgt (B, T+1) = BOS .. EOS then PAD."""
    gen = gen or torch.Generator().manual_seed(123)
    lengths = torch.tensor(lengths if lengths is not None else [L] + [max(1, L - 1)] * (B - 1))
    src = torch.randint(3, Vs, (B, L), generator=gen)
    src[torch.arange(L)[None, :] >= lengths[:, None]] = PAD
    tgt_lengths = tgt_lengths if tgt_lengths is not None else [T] + [max(1, T - 1)] * (B - 1)
    tgt = torch.full((B, T + 1), PAD)
    for b, n in enumerate(tgt_lengths):  # n tokens after BOS, the last one EOS
        tgt[b, 0] = BOS
        tgt[b, 1:n] = torch.randint(3, Vt, (n - 1,), generator=gen)
        tgt[b, n] = EOS
    return src, lengths, tgt


def make_model(cell="lstm", input_feed=False, V=7, D=4, num_layers=1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = Seq2Seq(V, V, D, cell=cell, num_layers=num_layers, input_feed=input_feed).to(dtype)
    with torch.no_grad():  # a non-zero pad row, so that a wrong use of it would show
        m.decoder.W_out.bias.normal_()
    return m


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def manual_decode(dec, tgt_in, memory, mask, state, choose_input):
    """Reference loop over dec.step: choose_input(t, logits_t, gold_ids_next) -> next input."""
    logits_all, alpha_all = [], []
    x = tgt_in[:, 0]
    for t in range(tgt_in.shape[1]):
        logits, alpha, state = dec.step(x, state, memory, mask)
        logits_all.append(logits)
        alpha_all.append(alpha)
        if t + 1 < tgt_in.shape[1]:
            x = choose_input(t, logits, tgt_in[:, t + 1])
    return torch.stack(logits_all, 1), torch.stack(alpha_all, 1)


# ---------------------------------------------------------------------------------------------
# gradcheck of the whole model, every parameter
# ---------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    ("lstm", False, 1.0, "argmax", 1),
    ("lstm", True, 1.0, "argmax", 1),
    ("gru", False, 1.0, "argmax", 1),
    ("gru", True, 1.0, "argmax", 1),
    ("lstm", True, 0.5, "gumbel", 1),
    ("gru", False, 0.5, "gumbel", 1),
    ("lstm", False, 0.5, "softmax", 1),
    ("gru", True, 0.0, "gumbel", 2),
]


@pytest.mark.parametrize("cell, input_feed, ratio, sampling, layers", GRADCHECK_CASES)
def test_gradcheck_whole_model(cell, input_feed, ratio, sampling, layers):
    model = make_model(cell, input_feed, num_layers=layers)
    src, lengths, tgt = make_batch(B=2, L=3, T=3)
    noise = -torch.log(-torch.log(torch.rand(2, 3, 7, dtype=torch.float64)))  # explicit Gumbel noise
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def loss_fn(*ps):
        gen = torch.Generator().manual_seed(7)  # same coins on every evaluation
        out = functional_call(model, dict(zip(names, ps)), (src, lengths, tgt),
                              dict(teacher_forcing_ratio=ratio, sampling=sampling, tau=0.7,
                                   noise=noise, generator=gen))
        return out.loss

    assert torch.autograd.gradcheck(loss_fn, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_sees_all_parameters():
    """Every parameter gets a non-zero gradient (nothing is silently detached)."""
    model = make_model("lstm", True, dtype=torch.float32)
    src, lengths, tgt = make_batch(B=3, L=4, T=4)
    model(src, lengths, tgt, 0.5, "gumbel", 0.7).loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------
# one step by hand, from the notes (SPEC section 1) with explicit matrices
# ---------------------------------------------------------------------------------------------
def _cell_by_hand(cell, x, rnn, h, c=None):
    """Single-layer LSTM/GRU step written from the textbook equations (PyTorch's gate order)."""
    W_ih, W_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    gi, gh = x @ W_ih.T + b_ih, h @ W_hh.T + b_hh
    if cell == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    r_i, z_i, n_i = gi.chunk(3, -1)
    r_h, z_h, n_h = gh.chunk(3, -1)
    r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
    n = torch.tanh(n_i + r * n_h)
    return (1 - z) * n + z * h, None


@pytest.mark.parametrize("cell, input_feed", [("lstm", False), ("lstm", True), ("gru", False), ("gru", True)])
def test_step_matches_the_notes(cell, input_feed):
    V, D, B, L = 7, 5, 3, 4
    dec = AttentionDecoder(V, D, cell=cell, input_feed=input_feed).double()
    H = torch.randn(B, L, D, dtype=torch.float64)  # memory (B, L, D)
    lengths = torch.tensor([4, 1, 2])
    h0 = torch.randn(1, B, D, dtype=torch.float64)
    c0 = torch.randn(1, B, D, dtype=torch.float64)
    state = dec.init_state((h0, c0) if cell == "lstm" else h0)
    state = state._replace(h_tilde=torch.randn(B, D, dtype=torch.float64))  # as if after a step
    y_prev = torch.tensor([3, 0, 6])
    logits, alpha, new = dec.step(y_prev, state, H, lengths)

    W_emb, W_a = dec.embedding.weight, dec.W_a.weight.T  # (V, D), (D, D): s_t W_a
    W_c, W_out, b_out = dec.W_c.weight.T, dec.W_out.weight.T, dec.W_out.bias  # (2D, D), (D, V), (V,)
    y_emb = W_emb[y_prev]  # 1. (B, D)
    x = torch.cat([y_emb, state.h_tilde], -1) if input_feed else y_emb  # input feeding: [y_emb ; h~_{t-1}]
    s_t, c_t_cell = _cell_by_hand(cell, x, dec.cell, h0[0], c0[0])  # 2. (B, D)
    E = torch.einsum("bd,bld->bl", s_t @ W_a, H)  # 3. (B, L)
    E = E.masked_fill(torch.arange(L)[None] >= lengths[:, None], float("-inf"))
    a = torch.softmax(E, -1)  # 4. (B, L)
    ctx = torch.einsum("bl,bld->bd", a, H)  # 5. (B, D)
    h_t = torch.tanh(torch.cat([ctx, s_t], -1) @ W_c)  # 6. context first, then s_t
    expect = h_t @ W_out + b_out  # 7. (B, V)
    torch.testing.assert_close(alpha, a)
    torch.testing.assert_close(logits, expect)
    torch.testing.assert_close(new.h_tilde, h_t)
    if cell == "lstm":
        torch.testing.assert_close(new.rnn[0][0], s_t)
        torch.testing.assert_close(new.rnn[1][0], c_t_cell)
    else:
        torch.testing.assert_close(new.rnn[0], s_t)
    # a float input is taken as the embedding itself
    logits2, _, _ = dec.step(W_emb[y_prev], state, H, lengths)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def test_generate_delegates_to_generation(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("fused_s2s.generation")
    fake.generate = lambda *a, **kw: calls.append((a[4] if len(a) > 4 else "greedy", a, kw)) or calls[-1][0]
    monkeypatch.setitem(sys.modules, "fused_s2s.generation", fake)
    import fused_s2s

    monkeypatch.setattr(fused_s2s, "generation", fake, raising=False)
    m = Seq2Seq(7, 7, 4)
    src, lengths, _ = make_batch()
    assert m.generate(src, lengths, 5) == "greedy"
    assert m.generate(src, lengths, 6, strategy="beam", beam_size=3) == "beam"
    assert m.generate(src, lengths, 4, strategy="sample", top_k=2) == "sample"
    assert calls[1][1][0] is m and calls[1][1][3] == 6 and calls[1][2] == {"beam_size": 3}
    assert calls[2][2] == {"top_k": 2}


# ---------------------------------------------------------------------------------------------
# attention and Gumbel-softmax building blocks
# ---------------------------------------------------------------------------------------------
def test_attention_eager_matches_formula_and_masks():
    B, T, L, D, Dv = 3, 2, 5, 4, 6
    q = torch.randn(B, T, D, dtype=torch.float64)
    k = torch.randn(B, L, D, dtype=torch.float64)
    v = torch.randn(B, L, Dv, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 1], dtype=torch.int32)
    ctx, w = attention_eager(q, k, v, lengths)
    for b in range(B):
        n = int(lengths[b])
        e = q[b] @ k[b, :n].T  # (T, n)
        a = torch.softmax(e, -1)
        torch.testing.assert_close(w[b, :, :n], a)
        assert (w[b, :, n:] == 0).all()
        torch.testing.assert_close(ctx[b], a @ v[b, :n])
    # bool mask == lengths; 2-D query == T = 1
    bool_mask = torch.arange(L)[None] < lengths[:, None].long()
    ctx2, w2 = attention_eager(q, k, v, bool_mask)
    assert torch.equal(ctx, ctx2) and torch.equal(w, w2)
    ctx1, w1 = attention_eager(q[:, 0], k, v, lengths)
    torch.testing.assert_close(ctx1, ctx[:, 0])
    torch.testing.assert_close(w1, w[:, 0])
    # values=None means values = keys; no mask = plain softmax
    ctx3, w3 = attention_eager(q, k)
    torch.testing.assert_close(w3, torch.softmax(q @ k.transpose(1, 2), -1))
    torch.testing.assert_close(ctx3, w3 @ k)


def test_attention_fully_masked_row_zero_no_nan():
    B, T, L, D = 3, 2, 4, 3
    q = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True], [False] * 4, [True, False, False, False]])
    ctx, w = attention_eager(q, k, v, mask)
    assert (w[1] == 0).all() and (ctx[1] == 0).all()
    (ctx.square().sum() + (w * torch.randn_like(w)).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()
    assert torch.autograd.gradcheck(lambda a, b, c: attention_eager(a, b, c, mask), (q, k, v))
    # also with lengths containing 0
    ctx, w = attention_eager(q.detach(), k.detach(), v.detach(), torch.tensor([0, 4, 2]))
    assert (w[0] == 0).all() and (ctx[0] == 0).all() and torch.isfinite(ctx).all()


def test_gumbel_softmax_eager_soft_and_hard():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    g = philox.gumbel_noise(5, (4, 9)).double()
    y = gumbel_softmax_eager(logits, 0.6, False, g)
    torch.testing.assert_close(y, torch.softmax((logits + g) / 0.6, -1))
    y_hard = gumbel_softmax_eager(logits, 0.6, True, g)
    idx = (logits + g).argmax(-1)
    assert torch.equal(y_hard.detach(), torch.nn.functional.one_hot(idx, 9).double())  # exactly one-hot
    up = torch.randn(4, 9, dtype=torch.float64)
    (gs,) = torch.autograd.grad((y * up).sum(), logits)
    (gh,) = torch.autograd.grad((y_hard * up).sum(), logits)
    torch.testing.assert_close(gh, gs, rtol=0, atol=1e-15)  # straight-through: the soft gradient
    # half precision: computed in fp32 like the kernels, returned in logits' dtype
    for dt in (torch.float16, torch.bfloat16):
        lh = (3 * torch.randn(64, 33)).to(dt)
        gh32 = philox.gumbel_noise(8, (64, 33))
        yh = gumbel_softmax_eager(lh, 0.5, True, gh32)
        assert yh.dtype == dt
        assert torch.equal(yh.argmax(-1), (lh.float() + gh32).argmax(-1))
        ys = gumbel_softmax_eager(lh, 0.5, False, gh32)
        torch.testing.assert_close(ys, torch.softmax((lh.float() + gh32) / 0.5, -1).to(dt), rtol=0, atol=0)
    # noise=None: softmax(logits / tau)
    torch.testing.assert_close(gumbel_softmax_eager(logits, 2.0, False, None), torch.softmax(logits / 2.0, -1))


def test_gumbel_argmax_eager_is_the_hard_index_in_fp32():
    g = philox.gumbel_noise(3, (64, 33))
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        lh = (3 * torch.randn(64, 33)).to(dt).requires_grad_()
        idx = gumbel_argmax_eager(lh, g)
        assert idx.dtype == torch.int64 and not idx.requires_grad
        _, want = gumbel_softmax_eager(lh, 0.5, True, g, return_index=True)
        assert torch.equal(idx, want)
        cdt = torch.float64 if dt == torch.float64 else torch.float32
        assert torch.equal(idx, (lh.detach().to(cdt) + g.to(cdt)).argmax(-1))  # not in half precision
    # dim: the category axis
    x = torch.randn(3, 7, 5)
    g3 = philox.gumbel_noise(4, (3, 7, 5))
    assert torch.equal(gumbel_argmax_eager(x, g3, dim=1), (x + g3).argmax(1))


# ---------------------------------------------------------------------------------------------
# encoder and masking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_encoder_matches_unpadded_runs(cell):
    enc = Encoder(11, 5, cell=cell, num_layers=2, padding_idx=0).double()
    src, lengths, _ = make_batch(B=4, L=6, Vs=11, lengths=[6, 3, 0, 1])
    H, final = enc(src, lengths.to(torch.int16))
    assert H.shape == (4, 6, 5)
    # an empty source: no memory and the zero state of an empty sequence
    assert (H[2] == 0).all()
    for s in final if isinstance(final, tuple) else (final,):
        assert (s[:, 2] == 0).all() and (s[:, [0, 1, 3]] != 0).any()
    for b in (0, 1, 3):
        n = int(lengths[b])
        Hb, fb = enc.rnn(enc.embedding(src[b : b + 1, :n]))  # the row alone, no padding
        torch.testing.assert_close(H[b, :n], Hb[0])
        assert (H[b, n:] == 0).all()
        fs = final if isinstance(final, tuple) else (final,)
        fbs = fb if isinstance(fb, tuple) else (fb,)
        for s, sb in zip(fs, fbs):
            torch.testing.assert_close(s[:, b], sb[:, 0])


@pytest.mark.parametrize("cell, input_feed", [("lstm", False), ("gru", True)])
def test_padding_changes_nothing(cell, input_feed):
    model = make_model(cell, input_feed, V=9, D=5)
    src, lengths, tgt = make_batch(B=3, L=5, T=4, Vs=9, Vt=9, lengths=[5, 2, 3])
    src2 = src.clone()
    pad_pos = torch.arange(5)[None] >= lengths[:, None]
    src2[pad_pos] = torch.randint(3, 9, (int(pad_pos.sum()),))
    assert not torch.equal(src, src2)
    results = []
    for s in (src, src2):
        model.zero_grad()
        torch.manual_seed(3)
        out = model(s, lengths, tgt, 0.5, "gumbel", 0.8)
        out.loss.backward()
        results.append((out, grads(model)))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1.loss, o2.loss) and torch.equal(o1.logits, o2.logits)
    assert torch.equal(o1.attention, o2.attention)
    assert (o1.attention[pad_pos[:, None, :].expand_as(o1.attention)] == 0).all()
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_memory_padding_changes_nothing_in_decoder():
    dec = AttentionDecoder(8, 4, cell="gru", input_feed=True).double()
    B, L, T = 3, 5, 4
    memory = torch.randn(B, L, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 1, 3], dtype=torch.uint8)
    tgt_in = torch.randint(0, 8, (B, T))
    state = dec.init_state(torch.zeros(1, B, 4, dtype=torch.float64))
    out = dec(tgt_in, memory, lengths, state)
    out.logits.sum().backward()
    pad = torch.arange(L)[None] >= lengths.long()[:, None]
    assert (memory.grad[pad] == 0).all() and (memory.grad[~pad] != 0).any()
    memory2 = memory.detach().clone()
    memory2[pad] = 1e3 * torch.randn(int(pad.sum()), 4, dtype=torch.float64)
    out2 = dec(tgt_in, memory2, lengths, state)
    out3 = dec(tgt_in, memory2, torch.arange(L)[None] < lengths.long()[:, None], state)  # bool mask
    assert torch.equal(out.logits, out2.logits) and torch.equal(out2.logits, out3.logits)


def test_empty_source_row_gives_zero_attention_and_finite_grads():
    model = make_model("lstm", True, V=9, D=5, dtype=torch.float32)
    src, lengths, tgt = make_batch(B=3, L=4, T=3, Vs=9, Vt=9, lengths=[4, 0, 2])
    out = model(src, lengths, tgt, 0.5, "gumbel_hard", 0.5)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert (out.attention[1] == 0).all()
    out.loss.backward()
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n


# ---------------------------------------------------------------------------------------------
# teacher forcing and model-fed inputs, checked against hand-built inputs
# ---------------------------------------------------------------------------------------------
def _setup(cell="lstm", input_feed=True, B=3, L=4, T=5, V=9, D=6):
    model = make_model(cell, input_feed, V=V, D=D)
    src, lengths, tgt = make_batch(B=B, L=L, T=T, Vs=V, Vt=V, lengths=[L, 2, 3][:B], tgt_lengths=[T, 3, 4][:B])
    memory, mask, state = model.encode(src, lengths)
    return model, model.decoder, tgt[:, :-1], memory, mask, state


@pytest.mark.parametrize("cell, input_feed", [("lstm", True), ("gru", False)])
def test_ratio_one_is_teacher_forcing_and_draws_nothing(cell, input_feed):
    model, dec, tgt_in, memory, mask, state = _setup(cell, input_feed)
    exp_logits, exp_alpha = manual_decode(dec, tgt_in, memory, mask, state, lambda t, lg, gold: gold)
    for mode in MODES:
        for coin in COINS:
            rng = torch.get_rng_state()
            out = dec(tgt_in, memory, mask, state, 1.0, mode, 0.5, coin=coin)
            assert torch.equal(torch.get_rng_state(), rng), (mode, coin)
            torch.testing.assert_close(out.logits, exp_logits, rtol=0, atol=1e-12)
            torch.testing.assert_close(out.attention, exp_alpha, rtol=0, atol=1e-12)


def test_ratio_zero_argmax_feeds_predictions():
    model, dec, tgt_in, memory, mask, state = _setup()
    out = dec(tgt_in, memory, mask, state, 0.0, "argmax")
    exp, _ = manual_decode(dec, tgt_in, memory, mask, state, lambda t, lg, gold: lg.argmax(-1))
    torch.testing.assert_close(out.logits, exp, rtol=0, atol=1e-12)
    tf = dec(tgt_in, memory, mask, state, 1.0)
    assert not torch.allclose(out.logits[:, 1:], tf.logits[:, 1:])  # the inputs really differ


def test_ratio_zero_sample_with_noise_is_gumbel_max():
    model, dec, tgt_in, memory, mask, state = _setup()
    B, T, V = tgt_in.shape[0], tgt_in.shape[1], dec.vocab_size
    noise = philox.gumbel_noise(11, (B, T, V)).double()
    out = dec(tgt_in, memory, mask, state, 0.0, "sample", noise=noise)
    exp, _ = manual_decode(dec, tgt_in, memory, mask, state, lambda t, lg, gold: (lg + noise[:, t]).argmax(-1))
    torch.testing.assert_close(out.logits, exp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_gumbel_input_is_soft_mixture(tau):
    model, dec, tgt_in, memory, mask, state = _setup()
    B, T, V = tgt_in.shape[0], tgt_in.shape[1], dec.vocab_size
    noise = -torch.log(-torch.log(torch.rand(B, T, V, dtype=torch.float64)))
    W = dec.embedding.weight
    out = dec(tgt_in, memory, mask, state, 0.0, "gumbel", tau, noise=noise)
    exp, _ = manual_decode(dec, tgt_in, memory, mask, state,
                           lambda t, lg, gold: torch.softmax((lg + noise[:, t]) / tau, -1) @ W)
    torch.testing.assert_close(out.logits, exp, rtol=0, atol=1e-12)
    soft = dec(tgt_in, memory, mask, state, 0.0, "softmax", tau)
    exp_soft, _ = manual_decode(dec, tgt_in, memory, mask, state, lambda t, lg, gold: torch.softmax(lg / tau, -1) @ W)
    torch.testing.assert_close(soft.logits, exp_soft, rtol=0, atol=1e-12)


def test_gumbel_hard_forward_is_one_hot_rows_gradient_is_soft():
    model, dec, tgt_in, memory, mask, state = _setup()
    B, T, V = tgt_in.shape[0], tgt_in.shape[1], dec.vocab_size
    noise = -torch.log(-torch.log(torch.rand(B, T, V, dtype=torch.float64)))
    out = dec(tgt_in, memory, mask, state, 0.0, "gumbel_hard", 0.5, noise=noise)
    # forward: the embedding row of argmax(logits + g), exactly
    exp, _ = manual_decode(dec, tgt_in, memory, mask, state, lambda t, lg, gold: (lg + noise[:, t]).argmax(-1))
    assert torch.equal(out.logits, exp)
    # backward: the straight-through gradient. Build it by hand: x = W[argmax] + (y_soft - y_soft.detach()) @ W
    def st_input(t, lg, gold):
        y_soft = torch.softmax((lg + noise[:, t]) / 0.5, -1)
        return dec.embedding.weight[(lg + noise[:, t]).argmax(-1)] + (y_soft - y_soft.detach()) @ dec.embedding.weight
    w = torch.randn_like(out.logits)
    g_model = torch.autograd.grad((out.logits * w).sum(), list(dec.parameters()) + [memory])
    exp_st, _ = manual_decode(dec, tgt_in, memory, mask, state, st_input)
    g_hand = torch.autograd.grad((exp_st * w).sum(), list(dec.parameters()) + [memory])
    for a, b in zip(g_model, g_hand):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and it is not the argmax gradient (which has no path through the previous logits)
    exp_nd, _ = manual_decode(dec, tgt_in, memory, mask, state,
                              lambda t, lg, gold: (lg.detach() + noise[:, t]).argmax(-1))
    g_nd = torch.autograd.grad((exp_nd * w).sum(), dec.W_out.weight)[0]
    assert not torch.allclose(g_nd, g_model[list(dict(dec.named_parameters())).index("W_out.weight")])


# ---------------------------------------------------------------------------------------------
# randomness: draw order, reproducibility, coins
# ---------------------------------------------------------------------------------------------
def _replay(dec, tgt_in, memory, mask, state, mode, coin, ratio, tau):
    """The documented draw order, written out by hand (what the fused model must copy)."""
    B, V = tgt_in.shape[0], dec.vocab_size
    W = dec.embedding.weight
    u_seq = torch.rand(B) if coin == "sequence" else None

    def choose(t, lg, gold):
        u = {"token": lambda: torch.rand(B), "step": lambda: torch.rand(1).expand(B), "sequence": lambda: u_seq}[coin]()
        if mode in ("sample", "gumbel", "gumbel_hard"):
            g = philox.gumbel_noise(philox.draw_seed(), (B, V)).double()
        if mode == "argmax":
            m = dec.embedding(lg.argmax(-1))
        elif mode == "sample":
            m = dec.embedding((lg + g).argmax(-1))
        elif mode == "softmax":
            m = torch.softmax(lg / tau, -1) @ W
        elif mode == "gumbel":
            m = torch.softmax((lg + g) / tau, -1) @ W
        else:
            m = W[(lg + g).argmax(-1)]
        return torch.where((u < ratio)[:, None], dec.embedding(gold), m)

    return manual_decode(dec, tgt_in, memory, mask, state, choose)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("coin", COINS)
def test_draw_order_and_same_seed_same_result(mode, coin):
    model, dec, tgt_in, memory, mask, state = _setup(T=5)
    memory = memory.detach()
    state = DecoderState(tuple(s.detach() for s in state.rnn), state.h_tilde)
    # the whole model twice from the same seed: identical loss and gradients of every parameter
    src, lengths, tgt = make_batch(B=3, L=4, T=5, Vs=9, Vt=9, lengths=[4, 2, 3], tgt_lengths=[5, 3, 4])
    runs = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(42)
        out = model(src, lengths, tgt, 0.5, mode, 0.7, coin=coin)
        out.loss.backward()
        runs.append((out.loss.detach(), grads(model)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert len(runs[0][1]) == len(list(model.parameters()))
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n
    # the documented draw order, replayed by hand
    torch.manual_seed(42)
    out = dec(tgt_in, memory, mask, state, 0.5, mode, 0.7, coin=coin)
    torch.manual_seed(42)
    exp = _replay(dec, tgt_in, memory, mask, state, mode, coin, 0.5, 0.7)
    torch.testing.assert_close(out.logits, exp, rtol=0, atol=1e-12)


def test_generator_is_honoured():
    model, dec, tgt_in, memory, mask, state = _setup()
    outs = []
    for _ in range(2):
        rng = torch.get_rng_state()
        gen = torch.Generator().manual_seed(9)
        outs.append(dec(tgt_in, memory, mask, state, 0.5, "sample", generator=gen).logits)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert torch.equal(outs[0], outs[1])
    other = dec(tgt_in, memory, mask, state, 0.5, "sample", generator=torch.Generator().manual_seed(10)).logits
    assert not torch.equal(outs[0], other)


def _recorded_inputs(dec, tgt_in, memory, mask, state, coin):
    """Which rows got the gold input at each step t >= 1: (T-1, B) bool."""
    seen = []
    orig = dec._step

    def spy(x, *a):
        seen.append(x)
        return orig(x, *a)

    dec._step = spy
    try:
        dec(tgt_in, memory, mask, state, 0.5, "softmax", 1.0, coin=coin)
    finally:
        del dec._step
    gold = torch.stack([dec.embedding(tgt_in[:, t]) for t in range(1, tgt_in.shape[1])])  # (T-1, B, D)
    fed = torch.stack(seen[1:])  # (T-1, B, D)
    return (fed == gold).all(-1)


def test_coin_step_and_sequence_decisions():
    model, dec, tgt_in, memory, mask, state = _setup(B=3, T=5)
    # longer horizon: repeat the batch and steps so both outcomes appear
    idx = torch.arange(3).repeat(4)  # B = 12
    tgt_in = torch.cat([tgt_in] * 4, 1)[idx]  # (12, 20)
    memory, mask, state = memory[idx], mask[idx], state.reorder(idx)
    torch.manual_seed(1)
    tok = _recorded_inputs(dec, tgt_in, memory, mask, state, "token")
    assert tok.any() and (~tok).any()
    assert (tok.any(1) & ~tok.all(1)).any()  # token coins do mix within a step
    step = _recorded_inputs(dec, tgt_in, memory, mask, state, "step")
    assert (step.all(1) | ~step.any(1)).all()  # one decision for the whole batch at each step
    assert step.all(1).any() and (~step.any(1)).any()
    seq = _recorded_inputs(dec, tgt_in, memory, mask, state, "sequence")
    assert (seq.all(0) | ~seq.any(0)).all()  # one decision per sequence, kept across steps
    assert seq.all(0).any() and (~seq.any(0)).any()


# ---------------------------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------------------------
def test_state_dict_names_and_shapes():
    m = Seq2Seq(10, 12, 6, cell="lstm", input_feed=True)
    names = set(m.state_dict())
    for n in ["encoder.embedding.weight", "encoder.rnn.weight_ih_l0", "decoder.embedding.weight",
              "decoder.cell.weight_ih_l0", "decoder.W_a.weight", "decoder.W_c.weight", "decoder.W_out.weight",
              "decoder.W_out.bias"]:
        assert n in names, n
    assert "decoder.W_a.bias" not in names and "decoder.W_c.bias" not in names
    assert m.decoder.cell.weight_ih_l0.shape == (24, 12)  # input feeding: input 2D
    assert m.decoder.W_c.weight.shape == (6, 12) and m.decoder.W_out.weight.shape == (12, 6)


def test_reorder_state_and_zero_length_target():
    model, dec, tgt_in, memory, mask, state = _setup(cell="lstm")
    idx = torch.tensor([2, 2, 0])
    r = state.reorder(idx)
    assert torch.equal(r.rnn[0], state.rnn[0][:, idx]) and torch.equal(r.h_tilde, state.h_tilde[idx])
    out = dec(tgt_in[:, :0], memory, mask, state)
    assert out.logits.shape == (3, 0, dec.vocab_size) and out.attention.shape == (3, 0, memory.shape[1])


def test_any_integer_id_dtype():
    model = make_model("lstm", True, V=9, D=5)
    src, lengths, tgt = make_batch(B=3, L=4, T=3, Vs=9, Vt=9, lengths=[4, 2, 3])
    ref = model(src, lengths, tgt, 0.5, "gumbel", generator=torch.Generator().manual_seed(0))
    for dt in (torch.int32, torch.int16, torch.uint8):
        out = model(src.to(dt), lengths.to(dt), tgt.to(dt), 0.5, "gumbel", generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss), dt


def test_loss_ignores_padding_targets():
    model = make_model("gru", False, V=9, D=5)
    src, lengths, tgt = make_batch(B=3, L=4, T=5, Vs=9, Vt=9, lengths=[4, 2, 3], tgt_lengths=[5, 2, 3])
    out = model(src, lengths, tgt)
    gold = tgt[:, 1:]
    keep = gold != PAD
    ce = torch.nn.functional.cross_entropy(out.logits[keep], gold[keep])
    torch.testing.assert_close(out.loss, ce)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    m = make_model("lstm", False, V=7, D=4, dtype=torch.float32)
    src, lengths, tgt = make_batch(B=2, L=3, T=3)
    dec = m.decoder
    memory, mask, state = m.encode(src, lengths)
    tgt_in = tgt[:, :-1]
    f = lambda **kw: (lambda: m(**{"src": src, "src_lengths": lengths, "tgt": tgt, **kw}))  # noqa: E731
    d = lambda **kw: (lambda: dec(**{"tgt_in": tgt_in, "memory": memory, "memory_mask": mask,  # noqa: E731
                                       "state": state, **kw}))
    s = lambda **kw: (lambda: dec.step(**{"inp": tgt_in[:, 0], "state": state, "memory": memory,  # noqa: E731
                                          "memory_mask": mask, **kw}))
    return [
        (f(src=src[0]), ValueError, "src"),
        (f(src=src.float()), TypeError, "src"),
        (f(src=src + 10), ValueError, "src"),
        (f(src=src - 10), ValueError, "src"),
        (f(tgt=tgt + 10), ValueError, "tgt"),
        (f(tgt=-tgt), ValueError, "tgt"),
        (f(tgt=tgt.float()), TypeError, "tgt"),
        (f(tgt=tgt[:1]), ValueError, "tgt"),
        (f(tgt=tgt[:, :1]), ValueError, "tgt"),
        (f(src_lengths=lengths[:1]), ValueError, "src_lengths"),
        (f(src_lengths=lengths.float()), TypeError, "src_lengths"),
        (f(src_lengths=lengths + 5), ValueError, "src_lengths"),
        (f(tau=0.0), ValueError, "tau"),
        (f(tau=-1.0), ValueError, "tau"),
        (f(teacher_forcing_ratio=1.5), ValueError, "teacher_forcing_ratio"),
        (f(teacher_forcing_ratio=-0.1), ValueError, "teacher_forcing_ratio"),
        (f(teacher_forcing_ratio=torch.tensor([0.5])), ValueError, "teacher_forcing_ratio"),
        (f(teacher_forcing_ratio=torch.tensor(1)), TypeError, "teacher_forcing_ratio"),
        (f(teacher_forcing_ratio=torch.tensor(1.5)), ValueError, "teacher_forcing_ratio must be in"),
        (d(teacher_forcing_ratio=torch.tensor(0.5, device="meta")), ValueError, "teacher_forcing_ratio"),
        (f(tau=torch.tensor(0.0)), ValueError, "tau must be a number in"),
        (d(tau=torch.tensor(0.5, device="meta")), ValueError, "tau"),
        (f(sampling="beam"), ValueError, "sampling"),
        (f(coin="batch"), ValueError, "coin"),
        (f(teacher_forcing_ratio=0.5, sampling="gumbel", noise=torch.zeros(2, 3, 6)), ValueError, "noise"),
        (d(tgt_in=tgt_in[:1]), ValueError, "batch"),
        (d(tgt_in=tgt_in.float()), TypeError, "tgt_in"),
        (d(memory=memory[..., :3]), ValueError, "memory"),
        (d(memory=memory[0]), ValueError, "memory"),
        (d(memory=memory.double()), TypeError, "memory"),
        (d(memory=memory.int()), TypeError, "memory"),
        (d(memory=memory.to("meta")), ValueError, "memory"),  # device mismatch with the parameters
        (d(tgt_in=tgt_in.to("meta")), ValueError, "tgt_in"),
        (d(memory_mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, "memory_mask"),
        (f(tgt=tgt.to("meta")), ValueError, "tgt"),
        (lambda: m.encoder(src.to("meta"), lengths), ValueError, "src"),
        (d(memory_mask=mask[:1]), ValueError, "memory_mask"),
        (d(memory_mask=mask.float()), TypeError, "memory_mask"),
        (d(memory_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "memory_mask"),
        (d(state=state.reorder(torch.tensor([0]))), ValueError, "state"),
        (d(state=(state.rnn, state.h_tilde)), TypeError, "state"),
        (d(noise=torch.zeros(2, 3, 7, 1)), ValueError, "noise"),
        (d(noise=torch.zeros(2, 3, 7, dtype=torch.long)), TypeError, "noise"),
        (d(generator=3), TypeError, "generator"),
        (d(tgt_in=tgt_in + 7), ValueError, "tgt_in has ids"),  # V = 7
        (d(tgt_in=tgt_in - 7), ValueError, "tgt_in has ids"),
        (f(tau="abc"), TypeError, "tau"),
        (f(tau=None), TypeError, "tau"),
        (f(tau=True), TypeError, "tau"),
        (s(inp=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "inp"),
        (lambda: m.generate(src, lengths, 5, beam_size=4), TypeError, "accepts"),  # greedy takes none
        (s(inp=tgt_in[:1, 0]), ValueError, "inp"),
        (s(inp=torch.zeros(2, 5)), ValueError, "inp"),
        (s(inp=torch.zeros(2, 3, 4)), ValueError, "inp"),
        (lambda: Seq2Seq(7, 7, 4, cell="rnn"), ValueError, "cell"),
        (lambda: AttentionDecoder(7, 4, backend="cuda"), ValueError, "backend"),
        (lambda: Encoder(7, 0), ValueError, "hidden_size"),
        (lambda: Seq2Seq(7, 7, 4, bos_idx=9), ValueError, "bos_idx"),
        (lambda: m.encoder(src.float(), lengths), TypeError, "src"),
        (lambda: m.encoder(src + 7, lengths), ValueError, "src"),
        (lambda: m.encoder(src[:, :0], lengths * 0), ValueError, "src"),
        (lambda: dec.init_state(state.rnn[0]), TypeError, "encoder_final"),
        (lambda: m.generate(src, lengths, 5, strategy="nucleus"), ValueError, "strategy"),
        (lambda: attention_eager(memory[:, 0], memory, mask=torch.tensor([1, 2, 3])), ValueError, "mask"),
        (lambda: gumbel_softmax_eager(torch.zeros(2, 3), 0.0), ValueError, "tau"),
        (lambda: gumbel_softmax_eager(torch.zeros(2, 3), 1.0, noise=torch.zeros(3, 2)), ValueError, "noise"),
        (lambda: gumbel_argmax_eager(torch.zeros(2, 3), torch.zeros(3, 2)), ValueError, "noise"),
        (lambda: gumbel_argmax_eager(torch.zeros(2, 3), None), TypeError, "noise"),
        (lambda: gumbel_argmax_eager(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), TypeError, "logits"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    fn, exc, name = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        fn()


def test_decoder_check_ids_false_skips_reading_the_ids(monkeypatch):
    """forward reads tgt_in's values once (check_ids=True, the default); Seq2Seq.forward, which
    checked tgt already, and a CUDA-graph capture pass check_ids=False: then nothing is read."""
    from fused_s2s import _checks

    m = make_model("lstm", False, V=7, D=4, dtype=torch.float32)
    src, lengths, tgt = make_batch(B=2, L=3, T=3)
    memory, mask, state = m.encode(src, lengths)
    seen = []
    real = _checks.check_ids
    monkeypatch.setattr(reference, "_check_ids", lambda name, ids, V: seen.append(name) or real(name, ids, V))
    m.decoder(tgt[:, :-1], memory, mask, state)
    m.decoder(tgt[:, :-1], memory, mask, state, check_ids=False)
    m(src, lengths, tgt)
    assert seen == ["tgt_in", "tgt", "src"]  # the decoder's own check once; Seq2Seq's tgt (and the encoder's src), no second tgt_in
    # Seq2Seq.forward(check_ids=False), for ids the caller built: neither src nor tgt is read
    seen.clear()
    m(src, lengths, tgt, check_ids=False)
    assert seen == []


def test_encoder_packs_sorted_lengths_without_a_sort_order_and_equally(monkeypatch):
    """Lengths already longest first are packed with enforce_sorted=True (no sort order for the
    device); the result is the unsorted batch's, row for row."""
    import torch.nn.utils.rnn as rnn_utils

    m = make_model("lstm", False, V=7, D=4, dtype=torch.float32)
    src, lengths, _ = make_batch(B=4, L=5, T=3)
    lengths = torch.tensor([2, 5, 1, 4])
    order = torch.argsort(lengths, descending=True)
    calls = []
    real = rnn_utils.pack_padded_sequence
    monkeypatch.setattr(reference, "pack_padded_sequence",
                        lambda *a, **k: calls.append(k["enforce_sorted"]) or real(*a, **k))
    H, final = m.encoder(src, lengths)
    H_s, final_s = m.encoder(src[order], lengths[order])
    assert calls == [False, True]
    torch.testing.assert_close(H_s, H[order], rtol=0, atol=0)
    for a, b in zip(final_s, final):
        torch.testing.assert_close(a, b[:, order], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# training smoke test: reverse the digits
# ---------------------------------------------------------------------------------------------
def _reverse_digits(n, gen, min_len=2, max_len=5):
    """(src, lengths, tgt) for reversing digit strings; digits are ids 3..12."""
    src = torch.full((n, max_len), PAD)
    tgt = torch.full((n, max_len + 2), PAD)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    for i in range(n):
        k = int(lengths[i])
        d = torch.randint(3, 13, (k,), generator=gen)
        src[i, :k] = d
        tgt[i, 0], tgt[i, 1 : k + 1], tgt[i, k + 1] = BOS, d.flip(0), EOS
    return src, lengths, tgt


def _greedy(model, src, lengths, max_len):
    """Greedy decoding by hand over decoder.step (independent of fused_s2s.generation)."""
    memory, mask, state = model.encode(src, lengths)
    x = torch.full((src.shape[0],), BOS)
    out = []
    for _ in range(max_len):
        logits, _, state = model.decoder.step(x, state, memory, mask)
        x = logits.argmax(-1)
        out.append(x)
    return torch.stack(out, 1)


def test_reverse_digits_trains():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train = _reverse_digits(600, gen)
    test = _reverse_digits(200, gen)
    model = Seq2Seq(13, 13, 48, cell="lstm", input_feed=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.time()
    for epoch in range(40):
        perm = torch.randperm(600)
        for b in range(0, 600, 50):
            i = perm[b : b + 50]
            loss = model(train[0][i], train[1][i], train[2][i]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = _greedy(model, test[0], test[1], 6)
        gold = test[2][:, 1:]
        ok = ((pred == gold) | (gold == PAD)).all(1)  # exact match up to and including EOS
        if ok.float().mean() >= 0.9:
            break
    acc = float(ok.float().mean())
    print(f"reverse digits: exact match {acc:.2f} after {epoch + 1} epochs, {time.time() - start:.1f}s")
    # Seq2Seq.generate (fused_s2s.generation) agrees with the hand-written greedy loop
    tokens = model.generate(test[0], test[1], 6).tokens[:, 0]  # (B, T') padded after EOS
    tokens = torch.nn.functional.pad(tokens, (0, 6 - tokens.shape[1]), value=PAD)
    ok_gen = ((tokens == gold) | (gold == PAD)).all(1) & ((tokens == PAD) | (gold != PAD)).all(1)
    assert torch.equal(ok_gen, ok)
    assert acc >= 0.9, f"exact match {acc:.2f} after {epoch + 1} epochs, {time.time() - start:.1f}s"


def test_backend_error_names_where_triton_was_asked_for(monkeypatch):
    from fused_s2s import backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FUSED_S2S_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        backend.resolve("triton", torch.device("cpu"))
    monkeypatch.setenv("FUSED_S2S_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"FUSED_S2S_BACKEND=triton \(overriding backend='auto'\) needs CUDA"):
        backend.resolve("auto", torch.device("cpu"))
    assert backend.resolve("eager", torch.device("cpu")) == "eager"  # an explicit backend is not overridden


def test_decoder_positional_arguments_follow_the_spec():
    """SPEC section 4: AttentionDecoder(vocab_size, hidden_size, cell, num_layers, padding_idx, backend)."""
    import fused_s2s

    for cls in (AttentionDecoder, fused_s2s.AttentionDecoder):
        dec = cls(7, 4, "gru", 2, 0, "eager")
        assert (dec.vocab_size, dec.hidden_size, dec.cell_type, dec.num_layers, dec.padding_idx, dec.backend,
                dec.input_feed) == (7, 4, "gru", 2, 0, "eager", False)
        assert cls(7, 4, "lstm", 1, None, "auto", True).input_feed
