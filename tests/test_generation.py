"""Decoding (fused_s2s.generation): greedy, sampling, beam search.

Most tests use FakeModel: a model obeying the generation interface whose next-token logits are a
fixed random table indexed by a hash of (source, whole prefix), so beam search can be compared with
an exhaustive search, and a wrong state reorder changes the results. The last tests use the real
reference model.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fused_s2s import generation
from fused_s2s.generation import GenerateOutput, beam_search, generate, greedy, sample

PAD, BOS, EOS = 0, 1, 2
P = 2147483647  # hash modulus


class FakeState(NamedTuple):
    h: Tensor  # (B,) hash of (source, prefix)
    t: Tensor  # (B,) steps taken
    eos_at: Tensor  # (B,) step (1-based) at which EOS is forced (boosted; suppressed before); 0 = never

    def reorder(self, index: Tensor) -> "FakeState":
        return FakeState(*(x.index_select(0, index) for x in self))


class FakeDecoder:
    def __init__(self, V, rows, scale, eos_boost, gen):
        self.V, self.rows, self.eos_boost = V, rows, eos_boost
        self.table = torch.randn(rows, V, generator=gen) * scale  # (rows, V) logits
        self.calls = 0

    def step(self, inp, state, memory, memory_mask):
        B = inp.shape[0]
        assert inp.dtype == torch.long and inp.shape == (B,)
        assert memory.shape[0] == B and memory_mask.shape == (B,) and state.h.shape == (B,)
        self.calls += 1
        h = (state.h * 1000003 + inp + 1) % P  # (B,) depends on the whole prefix
        t = state.t + 1
        logits = self.table[h % self.rows].clone()  # (B, V)
        # with eos_at set, EOS is suppressed before step eos_at and boosted at it
        logits[:, EOS] += self.eos_boost * ((t == state.eos_at).float() - (t < state.eos_at).float())
        L = memory.shape[1]
        e = memory[..., 0] * ((h % 7) + 1).float()[:, None]  # (B, L) prefix-dependent scores
        valid = torch.arange(L)[None, :] < memory_mask[:, None]
        alpha = torch.softmax(e.masked_fill(~valid, -math.inf), -1).nan_to_num(0.0)  # (B, L)
        return logits, alpha, FakeState(h, t, state.eos_at)


class FakeModel:
    padding_idx, bos_idx, eos_idx = PAD, BOS, EOS

    def __init__(self, V=6, rows=4096, scale=2.0, force_eos=False, eos_boost=30.0, D=3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.decoder = FakeDecoder(V, rows, scale, eos_boost, gen)
        self.src_emb = torch.randn(11, D, generator=gen)  # source vocab 11
        self.force_eos = force_eos  # if set, EOS is forced at step src[:, 0] - 2 (see with_eos_at)

    def encode(self, src, src_lengths):
        B, L = src.shape
        valid = torch.arange(L)[None, :] < src_lengths[:, None]  # (B, L)
        memory = self.src_emb[src] * valid[..., None]  # (B, L, D)
        h0 = ((src + 1) * valid * (torch.arange(L) + 3) ** 3).sum(1) % P  # (B,)
        eos_at = src[:, 0] - 2 if self.force_eos else torch.zeros(B, dtype=torch.long)
        return memory, src_lengths.long(), FakeState(h0, torch.zeros(B, dtype=torch.long), eos_at)


def make_src(B=3, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 11, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    return src, lengths


def with_eos_at(src, eos_at):
    """Sources whose first token tells a force_eos FakeModel to emit EOS at step eos_at (1..8)."""
    src = src.clone()
    src[:, 0] = eos_at + 2
    return src


def replay(model, src, src_lengths, seqs):
    """Teacher-forced scores and alignments of token sequences for one sentence.

    src (1, L), src_lengths (1,), seqs (S, n) -> raw sum of log-probs (S,), alpha (S, n, L), using
    the documented rule (float32 log_softmax, padding_idx never emitted).
    """
    S, n = seqs.shape
    memory, mask, state = model.encode(src.expand(S, -1), src_lengths.expand(S))
    if isinstance(mask, Tensor):
        mask = mask.expand(S) if mask.dim() == 1 else mask
    inp = torch.full((S,), model.bos_idx, dtype=torch.long, device=src.device)
    score = torch.zeros(S, device=src.device)
    attn = []
    with torch.no_grad():
        for i in range(n):
            logits, alpha, state = model.decoder.step(inp, state, memory, mask)
            logp = F.log_softmax(logits.float(), -1)
            logp[:, model.padding_idx] = -math.inf
            score = score + logp.gather(1, seqs[:, i : i + 1]).squeeze(1)
            attn.append(alpha.float())
            inp = seqs[:, i]
    return score, torch.stack(attn, 1)


def lp(penalty, alpha, n):
    return {"none": 1.0, "average": float(n), "gnmt": ((5.0 + n) / 6.0) ** alpha}[penalty]


def hyp_length(tokens_row):
    """Length of one hypothesis (EOS included): position of the first EOS + 1, else non-pad count."""
    eos = (tokens_row == EOS).nonzero()
    return int(eos[0]) + 1 if len(eos) else int((tokens_row != PAD).sum())


def exhaustive(model, src, src_lengths, max_len, penalty, alpha):
    """Every hypothesis (EOS-terminated of length <= max_len, or truncated at max_len), best first."""
    V = model.decoder.V
    words = [v for v in range(V) if v not in (PAD, EOS)]
    hyps = []  # (penalised score, tokens tuple)
    for n in range(1, max_len + 1):
        prefixes = list(itertools.product(words, repeat=n - 1))
        groups = [[p + (EOS,) for p in prefixes]]
        if n == max_len:
            groups.append([p + (w,) for p in prefixes for w in words])
        for seqs in groups:
            raw, _ = replay(model, src, src_lengths, torch.tensor(seqs, dtype=torch.long))
            hyps += [(float(r) / lp(penalty, alpha, n), s) for r, s in zip(raw, seqs)]
    hyps.sort(key=lambda x: -x[0])
    return hyps


# -- beam search ------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty,alpha", [("none", 0.0), ("gnmt", 0.6), ("gnmt", 2.0), ("average", 0.0)])
@pytest.mark.parametrize("max_len", [3, 4])
def test_beam_matches_exhaustive_search(penalty, alpha, max_len):
    V = 5  # pad, bos, eos + 2 words: 3 emittable non-EOS tokens
    model = FakeModel(V=V, scale=1.5)
    src, lengths = make_src(B=3, L=4, seed=max_len)
    K = 4 * 3 ** (max_len - 1)  # >= every finite candidate at every step: the search is complete
    n_best = 6
    out = beam_search(model, src, lengths, max_len, beam_size=K, length_penalty=penalty, alpha=alpha, n_best=n_best,
                      early_stop="bound")
    assert out.tokens.shape[:2] == (3, n_best) and out.scores.shape == (3, n_best)
    for b in range(3):
        best = exhaustive(model, src[b : b + 1], lengths[b : b + 1], max_len, penalty, alpha)[:n_best]
        want_scores = torch.tensor([s for s, _ in best])
        torch.testing.assert_close(out.scores[b], want_scores, rtol=1e-5, atol=1e-5)
        assert (out.scores[b][:-1] >= out.scores[b][1:]).all(), "n-best list must be sorted best first"
        for j, (_, seq) in enumerate(best):
            got = out.tokens[b, j]
            assert got[: len(seq)].tolist() == list(seq), (b, j, got.tolist(), seq)
            assert (got[len(seq) :] == PAD).all()


@pytest.mark.parametrize("penalty,alpha", [("none", 0.0), ("gnmt", 0.6), ("gnmt", 1.5), ("average", 0.0)])
@pytest.mark.parametrize("seed", [0, 5])
def test_beam_size_one_equals_greedy(penalty, alpha, seed):
    """Default early_stop="count": one beam follows the argmax and stops at greedy's EOS, under every
    penalty. Scores: the beam's are penalised, so they must equal greedy's sum of log-probs divided
    by lp(length) of the same (identical) hypothesis — the same raw sum, the same division."""
    model = FakeModel(V=7, seed=seed)
    src, lengths = make_src(B=16, L=5, seed=seed)
    g = greedy(model, src, lengths, max_len=7)
    b = beam_search(model, src, lengths, max_len=7, beam_size=1, length_penalty=penalty, alpha=alpha)
    assert torch.equal(b.tokens, g.tokens)
    n = torch.tensor([hyp_length(g.tokens[i, 0]) for i in range(16)])
    want = g.scores / torch.tensor([[lp(penalty, alpha, int(k))] for k in n])
    torch.testing.assert_close(b.scores, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.attention, g.attention, rtol=0, atol=0)
    # Seq2Seq-style dispatch forwards early_stop too
    b2 = generate(model, src, lengths, 7, strategy="beam", beam_size=1, length_penalty=penalty, alpha=alpha,
                  early_stop="count")
    assert torch.equal(b2.tokens, b.tokens) and torch.equal(b2.scores, b.scores)


@pytest.mark.parametrize("penalty,alpha", [("gnmt", 0.6), ("gnmt", 1.5), ("average", 0.0)])
def test_beam_size_one_bound_never_worse_than_greedy_with_penalty(penalty, alpha):
    """early_stop="bound" with a length-rewarding penalty: beam 1 may continue past greedy's EOS
    (documented), but it keeps greedy's hypothesis in its n-best list, so its penalised score is >=
    greedy's; where the tokens agree the scores agree. (Some rows do differ: the case exists.)"""
    model = FakeModel(V=7, seed=5)
    src, lengths = make_src(B=16, L=5, seed=5)
    g = greedy(model, src, lengths, max_len=6)
    b = beam_search(model, src, lengths, max_len=6, beam_size=1, length_penalty=penalty, alpha=alpha,
                    early_stop="bound")
    T = min(g.tokens.shape[-1], b.tokens.shape[-1])
    differ = 0
    for i in range(16):
        n = hyp_length(g.tokens[i, 0])
        g_pen = float(g.scores[i, 0]) / lp(penalty, alpha, n)
        assert float(b.scores[i, 0]) >= g_pen - 1e-5
        if torch.equal(b.tokens[i, 0, :T], g.tokens[i, 0, :T]) and hyp_length(b.tokens[i, 0]) == n:
            assert abs(float(b.scores[i, 0]) - g_pen) < 1e-5
        else:
            differ += 1
    assert differ > 0, "no row where the exact rule goes past greedy's EOS: the count test would be vacuous"


# A scripted model (V = 5: PAD, BOS, EOS, A, B) where the count and bound rules part ways with
# K = 2, "average": step 1 ranks A, EOS, B; after A, EOS then A; after A A, A is nearly certain.
# count: [EOS] finishes at step 1 and [A EOS] at step 2 -> 2 = K finished, stop. bound: the live
# beam A A (raw -1.31) can still reach -1.31 / max_len > -0.60 = [A EOS]'s score, so it goes on to
# the truncated A^max_len (raw ~ -1.31 - 0.03 (max_len - 2)), the better average score.
A_, B_ = 3, 4


def _scripted_probs(prefix):
    if prefix == ():
        return {A_: 0.6, EOS: 0.3, B_: 0.1}
    if prefix == (A_,):
        return {EOS: 0.5, A_: 0.45, B_: 0.05}
    if prefix[:2] == (A_, A_):
        return {A_: 0.97, EOS: 0.02, B_: 0.01}
    return {A_: 0.45, B_: 0.45, EOS: 0.1}


class ScriptedState(NamedTuple):
    prefix: Tensor  # (B, 16) tokens so far, PAD-filled
    t: Tensor  # (B,) steps taken

    def reorder(self, index):
        return ScriptedState(self.prefix.index_select(0, index), self.t.index_select(0, index))


class ScriptedDecoder:
    V = 5

    def __init__(self, probs):
        self.calls, self.probs = 0, probs

    def step(self, inp, state, memory, memory_mask):
        self.calls += 1
        B = inp.shape[0]
        prefix = state.prefix.clone()
        rows = torch.arange(B)
        started = state.t > 0  # the first input is BOS, not part of the prefix
        prefix[rows[started], state.t[started] - 1] = inp[started]
        logits = torch.full((B, self.V), -30.0)  # PAD and BOS: practically never
        for i in range(B):
            n = int(state.t[i])
            for tok, p in self.probs(tuple(prefix[i, :n].tolist())).items():
                logits[i, tok] = math.log(p)
        alpha = torch.zeros(B, memory.shape[1])
        alpha[:, 0] = 1.0
        return logits, alpha, ScriptedState(prefix, state.t + 1)


class ScriptedModel:
    padding_idx, bos_idx, eos_idx = PAD, BOS, EOS

    def __init__(self, probs=_scripted_probs):
        self.decoder = ScriptedDecoder(probs)

    def encode(self, src, src_lengths):
        B, L = src.shape
        memory = torch.ones(B, L, 1)
        return memory, src_lengths.long(), ScriptedState(torch.zeros(B, 16, dtype=torch.long), torch.zeros(B, dtype=torch.long))


def test_beam_count_stops_at_beam_size_finished_bound_goes_on():
    src, lengths = torch.full((1, 2), 5), torch.tensor([2])
    max_len, K = 10, 2
    model = ScriptedModel()
    c = beam_search(model, src, lengths, max_len, beam_size=K, length_penalty="average", n_best=2)  # default
    calls_count = model.decoder.calls
    model = ScriptedModel()
    b = beam_search(model, src, lengths, max_len, beam_size=K, length_penalty="average", n_best=2, early_stop="bound")
    calls_bound = model.decoder.calls

    # count: the n-best list is exactly the K = 2 hypotheses finished by step 2, best first
    assert c.tokens[0, 0].tolist() == [A_, EOS] and c.tokens[0, 1].tolist() == [EOS, PAD]
    want = torch.tensor([(math.log(0.6) + math.log(0.5)) / 2, math.log(0.3)])
    torch.testing.assert_close(c.scores[0], want, rtol=1e-5, atol=1e-6)
    assert calls_count <= 2 + generation.SYNC_EVERY - 1 < max_len
    # bound: goes on to the truncated A^max_len, whose average score beats [A EOS]
    assert b.tokens[0, 0].tolist() == [A_] * max_len
    raw, _ = replay(ScriptedModel(), src, lengths, b.tokens[0, :1])
    torch.testing.assert_close(b.scores[0, 0], raw[0] / max_len, rtol=1e-5, atol=1e-6)
    assert float(b.scores[0, 0]) > float(c.scores[0, 0])
    assert calls_bound == max_len


def _two_eos_probs(prefix):
    """Step 1 ranks A, EOS, B; step 2's two best candidates are A EOS and B EOS."""
    if prefix == ():
        return {A_: 0.5, EOS: 0.35, B_: 0.15}
    if len(prefix) == 1:
        return {EOS: 0.9, A_: 0.05, B_: 0.05}
    return {A_: 0.4, B_: 0.4, EOS: 0.2}


def test_beam_count_finishes_at_most_beam_size_hypotheses():
    """K = 2: [EOS] finishes at step 1; at step 2 both top candidates end in EOS, but only the
    better one (A EOS) may finish — as in fairseq — although B EOS would beat [EOS] under "average".
    The exact rule has no cap: it keeps both step-2 hypotheses."""
    src, lengths = torch.full((1, 2), 5), torch.tensor([2])
    lp_a, lp_b, lp_e = math.log(0.5), math.log(0.15), math.log(0.35)
    assert (lp_b + math.log(0.9)) / 2 > lp_e  # B EOS does beat [EOS]: the cap is what drops it
    c = beam_search(ScriptedModel(_two_eos_probs), src, lengths, 6, beam_size=2, length_penalty="average", n_best=2)
    assert c.tokens[0].tolist() == [[A_, EOS], [EOS, PAD]]
    torch.testing.assert_close(c.scores[0], torch.tensor([(lp_a + math.log(0.9)) / 2, lp_e]), rtol=1e-5, atol=1e-6)
    b = beam_search(ScriptedModel(_two_eos_probs), src, lengths, 6, beam_size=2, length_penalty="average", n_best=2,
                    early_stop="bound")
    assert b.tokens[0, :, :2].tolist() == [[A_, EOS], [B_, EOS]]
    assert (b.tokens[0, :, 2:] == PAD).all()


@pytest.mark.parametrize("penalty,alpha", [("gnmt", 0.6), ("average", 0.0), ("none", 0.0)])
def test_beam_scores_attention_are_the_replayed_ones(penalty, alpha):
    """Small beam (not exhaustive): every returned hypothesis is self-consistent with the model."""
    model = FakeModel(V=9, seed=3)
    src, lengths = make_src(B=4, L=6, seed=3)
    K, N, max_len = 3, 3, 6
    out = beam_search(model, src, lengths, max_len, beam_size=K, length_penalty=penalty, alpha=alpha, n_best=N)
    B, _, T, L = out.attention.shape
    assert out.tokens.shape == (B, N, T) and out.scores.shape == (B, N) and L == src.shape[1]
    for b in range(B):
        assert (out.scores[b][:-1] >= out.scores[b][1:]).all()
        for j in range(N):
            n = hyp_length(out.tokens[b, j])
            seq = out.tokens[b, j, :n][None]
            raw, alpha_ref = replay(model, src[b : b + 1], lengths[b : b + 1], seq)
            torch.testing.assert_close(out.scores[b, j], raw[0] / lp(penalty, alpha, n), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.attention[b, j, :n], alpha_ref[0], rtol=0, atol=0)
            assert (out.tokens[b, j, n:] == PAD).all() and (out.attention[b, j, n:] == 0).all()
            assert (out.tokens[b, j, : n - 1] != EOS).all()


def test_beam_fewer_hypotheses_than_n_best():
    """max_len=1 with V=5: only 4 hypotheses exist (pad is never emitted); extra slots are empty."""
    model = FakeModel(V=5, seed=4)
    src, lengths = make_src(B=2, L=3)
    out = beam_search(model, src, lengths, 1, beam_size=6, n_best=6, length_penalty="none")
    assert out.tokens.shape == (2, 6, 1)
    assert torch.isfinite(out.scores[:, :4]).all() and (out.scores[:, 4:] == -math.inf).all()
    assert (out.tokens[:, 4:] == PAD).all() and (out.attention[:, 4:] == 0).all()
    assert sorted(out.tokens[0, :4, 0].tolist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("early_stop", ["count", "bound"])
@pytest.mark.parametrize("penalty", ["none", "gnmt"])
def test_beam_eos_handling_and_early_stop(penalty, early_stop):
    """EOS forced at step 2/3/1 per sentence: the best hypotheses end there, padded after, and the
    search stops long before max_len."""
    eos_at = torch.tensor([2, 3, 1])
    model = FakeModel(V=8, seed=6, force_eos=True, eos_boost=40.0)
    src, lengths = make_src(B=3, L=4, seed=6)
    src = with_eos_at(src, eos_at)
    K, max_len = 4, 40
    out = beam_search(model, src, lengths, max_len, beam_size=K, length_penalty=penalty, n_best=1,
                      early_stop=early_stop)
    for b in range(3):
        n = int(eos_at[b])
        assert out.tokens[b, 0, n - 1] == EOS and (out.tokens[b, 0, n:] == PAD).all()
        assert (out.tokens[b, 0, : n - 1] != EOS).all()
    assert out.tokens.shape[-1] < max_len
    assert model.decoder.calls <= 3 + 1 + generation.SYNC_EVERY, model.decoder.calls


# -- greedy -----------------------------------------------------------------------------------------
def test_greedy_eos_padding_scores_and_early_stop():
    eos_at = torch.tensor([2, 4, 1, 3])
    model = FakeModel(V=8, seed=7, force_eos=True)
    src, lengths = make_src(B=4, L=5, seed=7)
    src = with_eos_at(src, eos_at)
    out = greedy(model, src, lengths, max_len=50)
    calls = model.decoder.calls
    assert out.tokens.shape == (4, 1, 4) and out.scores.shape == (4, 1) and out.attention.shape == (4, 1, 4, 5)
    for b in range(4):
        n = int(eos_at[b])
        row = out.tokens[b, 0]
        assert row[n - 1] == EOS and (row[: n - 1] != EOS).all() and (row[n:] == PAD).all()
        raw, alpha_ref = replay(model, src[b : b + 1], lengths[b : b + 1], row[:n][None])
        torch.testing.assert_close(out.scores[b, 0], raw[0], rtol=0, atol=0)
        torch.testing.assert_close(out.attention[b, 0, :n], alpha_ref[0], rtol=0, atol=0)
        assert (out.attention[b, 0, n:] == 0).all()
    assert calls <= 4 + generation.SYNC_EVERY  # stopped early, not after 50 steps


def test_greedy_is_argmax_of_replay_and_truncates_at_max_len():
    model = FakeModel(V=9, seed=8)
    src, lengths = make_src(B=5, L=4, seed=8)
    out = greedy(model, src, lengths, max_len=3)
    assert out.tokens.shape[-1] <= 3
    memory, mask, state = model.encode(src, lengths)
    inp = torch.full((5,), BOS)
    alive = torch.ones(5, dtype=torch.bool)
    for t in range(out.tokens.shape[-1]):
        logits, _, state = model.decoder.step(inp, state, memory, mask)
        logits[:, PAD] = -math.inf
        want = torch.where(alive, logits.argmax(-1), torch.full_like(inp, PAD))
        assert torch.equal(out.tokens[:, 0, t], want)
        alive &= want != EOS
        inp = want


# -- sampling ---------------------------------------------------------------------------------------
def test_sample_reproducible_with_manual_seed_and_generator():
    model = FakeModel(V=12, seed=9, scale=0.5)
    src, lengths = make_src(B=8, L=4, seed=9)
    torch.manual_seed(123)
    a = sample(model, src, lengths, 8)
    torch.manual_seed(123)
    b = sample(model, src, lengths, 8)
    torch.manual_seed(124)
    c = sample(model, src, lengths, 8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.tokens, c.tokens)
    g1 = sample(model, src, lengths, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # the global RNG must not matter when a generator is given
    g2 = sample(model, src, lengths, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1.tokens, g2.tokens)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=3.0), dict(temperature=1e-4)])
def test_sample_degenerate_settings_equal_greedy(kw):
    model = FakeModel(V=10, seed=10, scale=1.0)
    src, lengths = make_src(B=6, L=4, seed=10)
    g = greedy(model, src, lengths, 6)
    s = sample(model, src, lengths, 6, **kw)
    assert torch.equal(s.tokens, g.tokens)
    torch.testing.assert_close(s.scores, g.scores, rtol=0, atol=0)
    torch.testing.assert_close(s.attention, g.attention, rtol=0, atol=0)


def _nucleus(p: Tensor, top_p: float) -> Tensor:
    """Independent top-p: the smallest most-likely-first set with mass >= top_p."""
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep, mass = torch.zeros(len(p), dtype=torch.bool), 0.0
    for i in order:
        keep[i] = True
        mass += float(p[i])
        if mass >= top_p:
            break
    return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.3, 0, 0.7), (0.8, 4, 0.9)])
def test_sample_first_token_frequencies_chi_square(temperature, top_k, top_p):
    scipy_stats = pytest.importorskip("scipy.stats")
    V, B = 8, 6000
    model = FakeModel(V=V, seed=11, scale=1.0)
    src = torch.full((B, 3), 5)
    lengths = torch.full((B,), 3)
    memory, mask, state = model.encode(src[:1], lengths[:1])
    logits, _, _ = model.decoder.step(torch.tensor([BOS]), state, memory, mask)
    z = logits[0].double() / temperature
    z[PAD] = -math.inf
    if top_k:
        z[z < z.topk(top_k).values[-1]] = -math.inf
    p = torch.softmax(z, 0)
    if top_p < 1.0:
        cum = torch.sort(p, descending=True).values.cumsum(0)
        assert (cum - top_p).abs().min() > 1e-3, "pick top_p away from a boundary"
        p = torch.where(_nucleus(p, top_p), p, torch.zeros_like(p))
        p = p / p.sum()
    out = sample(model, src, lengths, 1, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=torch.Generator().manual_seed(17))
    counts = torch.bincount(out.tokens[:, 0, 0], minlength=V).double()
    support = p > 0
    assert counts[~support].sum() == 0, "sampled a token outside top-k / nucleus / pad"
    res = scipy_stats.chisquare(counts[support].numpy(), (p[support] * B).numpy())
    assert res.pvalue > 1e-3, (counts.tolist(), (p * B).tolist())


def _needs_triton_on_cpu():
    from fused_s2s import backend

    if not backend.interpret_mode():
        pytest.skip("the FakeModel lives on the CPU: the Triton backend needs TRITON_INTERPRET=1 here")
    pytest.importorskip("triton")


@pytest.mark.parametrize("kw", [dict(), dict(top_k=3), dict(top_p=0.6, temperature=0.7), dict(top_k=4, top_p=0.9)])
def test_sample_through_fused_kernel_equals_eager(kw, monkeypatch):
    """The decoder's backend attribute picks the Gumbel-softmax backend; the Triton kernel draws the
    same Philox noise in-kernel, so the samples equal the eager ones, and -inf (filtered, pad) logits
    are never chosen."""
    _needs_triton_on_cpu()
    from fused_s2s.kernels import gumbel as K

    launches = []
    fwd = K.gumbel_fwd
    monkeypatch.setattr(K, "gumbel_fwd", lambda x, *a, **k: launches.append(x.clone()) or fwd(x, *a, **k))
    model = FakeModel(V=12, seed=23, scale=1.5)
    src, lengths = make_src(B=7, L=4, seed=23)
    outs = {}
    for be in ("eager", "triton"):
        model.decoder.backend = be
        outs[be] = sample(model, src, lengths, 6, generator=torch.Generator().manual_seed(3), **kw)
        if be == "eager":
            assert not launches
    assert len(launches) >= 1, "the Triton backend was not used"
    assert all(torch.isneginf(z[:, PAD]).all() for z in launches)
    if kw:
        assert any(torch.isneginf(z[:, 3:]).any() for z in launches), "no filtered logits reached the kernel"
    assert torch.equal(outs["triton"].tokens, outs["eager"].tokens)
    assert torch.equal(outs["triton"].scores, outs["eager"].scores)
    for z, step in zip(launches, range(outs["triton"].tokens.shape[-1])):
        tok = outs["triton"].tokens[:, 0, step]
        alive = (outs["triton"].tokens[:, 0, :step] != EOS).all(1)
        assert torch.isfinite(z.gather(1, tok[:, None]))[alive].all(), "a -inf logit was sampled"


def test_sample_chi_square_through_fused_kernel():
    """The in-kernel draw is a correct categorical sample too (filtered support, frequencies)."""
    _needs_triton_on_cpu()
    scipy_stats = pytest.importorskip("scipy.stats")
    V, B, top_k = 8, 3000, 5
    model = FakeModel(V=V, seed=11, scale=1.0)
    model.decoder.backend = "triton"
    src, lengths = torch.full((B, 3), 5), torch.full((B,), 3)
    memory, mask, state = model.encode(src[:1], lengths[:1])
    logits, _, _ = model.decoder.step(torch.tensor([BOS]), state, memory, mask)
    z = logits[0].double() / 0.8
    z[PAD] = -math.inf
    z[z < z.topk(top_k).values[-1]] = -math.inf
    p = torch.softmax(z, 0)
    out = sample(model, src, lengths, 1, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(29))
    counts = torch.bincount(out.tokens[:, 0, 0], minlength=V).double()
    support = p > 0
    assert counts[~support].sum() == 0, "sampled a token outside top-k / pad"
    res = scipy_stats.chisquare(counts[support].numpy(), (p[support] * B).numpy())
    assert res.pvalue > 1e-3, (counts.tolist(), (p * B).tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_sample_generator_on_another_device():
    model = FakeModel()
    src, lengths = make_src()
    with pytest.raises(ValueError, match="generator"):
        sample(model, src, lengths, 3, generator=torch.Generator(device="cuda"))
    assert model.decoder.calls == 0


def test_sample_eos_padding_and_early_stop():
    eos_at = torch.tensor([3, 1, 2])
    model = FakeModel(V=10, seed=12, force_eos=True, eos_boost=60.0)
    src, lengths = make_src(B=3, L=4, seed=12)
    src = with_eos_at(src, eos_at)
    out = sample(model, src, lengths, 40, temperature=1.0)
    calls = model.decoder.calls
    assert out.tokens.shape == (3, 1, 3)
    for b in range(3):
        n = int(eos_at[b])
        row = out.tokens[b, 0]
        assert row[n - 1] == EOS and (row[n:] == PAD).all() and (row[: n - 1] != EOS).all()
        raw, _ = replay(model, src[b : b + 1], lengths[b : b + 1], row[:n][None])
        torch.testing.assert_close(out.scores[b, 0], raw[0], rtol=0, atol=0)
    assert calls <= 3 + generation.SYNC_EVERY


# -- attention and output conventions -----------------------------------------------------------------
@pytest.mark.parametrize("strategy,kw", [("greedy", {}), ("sample", dict(temperature=0.7)),
                                         ("beam", dict(beam_size=3, n_best=2))])
def test_attention_shapes_and_rows(strategy, kw):
    model = FakeModel(V=9, seed=13)
    src, lengths = make_src(B=5, L=6, seed=13)
    out = generate(model, src, lengths, 7, strategy=strategy, **kw)
    assert isinstance(out, GenerateOutput)
    B, N, T = out.tokens.shape
    assert (B, N) == (5, kw.get("n_best", 1)) and out.attention.shape == (B, N, T, 6) and T <= 7
    assert out.tokens.dtype == torch.long and out.attention.dtype == torch.float32
    steps = torch.tensor([[[t < hyp_length(out.tokens[b, j]) for t in range(T)] for j in range(N)] for b in range(B)])
    sums = out.attention.sum(-1)  # (B, N, T)
    torch.testing.assert_close(sums[steps], torch.ones_like(sums[steps]))
    assert (sums[~steps] == 0).all()
    src_pad = torch.arange(6)[None, :] >= lengths[:, None]  # (B, L)
    assert (out.attention.permute(0, 3, 1, 2)[src_pad] == 0).all(), "attention on padded source"


def test_bad_inputs():
    model = FakeModel()
    src, lengths = make_src()
    cases = [
        (greedy, dict(max_len=0), ValueError, "max_len"),
        (greedy, dict(max_len=2.5), TypeError, "max_len"),
        (beam_search, dict(max_len=3, beam_size=0), ValueError, "beam_size"),
        (beam_search, dict(max_len=3, beam_size=2, n_best=3), ValueError, "n_best"),
        (beam_search, dict(max_len=3, n_best=0), ValueError, "n_best"),
        (beam_search, dict(max_len=3, length_penalty="wu"), ValueError, "length_penalty"),
        (beam_search, dict(max_len=3, alpha=float("nan")), ValueError, "alpha"),
        (beam_search, dict(max_len=3, early_stop="never"), ValueError, "early_stop"),
        (beam_search, dict(max_len=3, early_stop=None), ValueError, "early_stop"),
        (generate, dict(max_len=3, strategy="beam", early_stop="first"), ValueError, "early_stop"),
        (generate, dict(max_len=3, strategy="sample", early_stop="count"), TypeError, "early_stop"),
        (sample, dict(max_len=3, temperature=0.0), ValueError, "temperature"),
        (sample, dict(max_len=3, temperature=-1.0), ValueError, "temperature"),
        (sample, dict(max_len=3, top_k=-1), ValueError, "top_k"),
        (sample, dict(max_len=3, top_p=0.0), ValueError, "top_p"),
        (sample, dict(max_len=3, top_p=1.5), ValueError, "top_p"),
        (sample, dict(max_len=3, generator=123), TypeError, "generator"),
        (generate, dict(max_len=3, strategy="topk"), ValueError, "strategy"),
        (generate, dict(max_len=3, strategy="greedy", beam_size=2), TypeError, "beam_size"),
    ]
    for fn, kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn(model, src, lengths, **kw)
    with pytest.raises(ValueError, match="src"):
        greedy(model, src[0], lengths, 3)
    with pytest.raises(TypeError, match="src"):
        greedy(model, src.float(), lengths, 3)
    with pytest.raises(ValueError, match="src_lengths"):
        greedy(model, src, lengths[:2], 3)
    assert model.decoder.calls == 0, "validation must happen before decoding"


# -- the real reference model ----------------------------------------------------------------------------
def _reference(cell="lstm", input_feed=False, num_layers=1, seed=0):
    reference = pytest.importorskip("fused_s2s.reference")
    torch.manual_seed(seed)
    model = reference.Seq2Seq(11, 13, 8, cell=cell, num_layers=num_layers, input_feed=input_feed)
    with torch.no_grad():  # a larger EOS bias so that some sequences end early
        model.decoder.W_out.bias[EOS] += 1.5
    return model.eval()


@pytest.mark.parametrize("cell,input_feed,num_layers", [("lstm", False, 1), ("gru", True, 2)])
def test_reference_greedy_equals_manual_step_loop(cell, input_feed, num_layers):
    model = _reference(cell, input_feed, num_layers)
    src, lengths = make_src(B=5, L=6, seed=14)
    out = model.generate(src, lengths, 9)
    out2 = generate(model, src, lengths, 9, strategy="greedy")
    assert torch.equal(out.tokens, out2.tokens) and torch.equal(out.scores, out2.scores)
    assert not out.scores.requires_grad
    with torch.no_grad():
        memory, mask, state = model.encode(src, lengths)
        inp = torch.full((5,), BOS)
        alive = torch.ones(5, dtype=torch.bool)
        score = torch.zeros(5)
        toks, alphas = [], []
        for _ in range(9):
            logits, alpha, state = model.decoder.step(inp, state, memory, mask)
            logp = F.log_softmax(logits.float(), -1)
            logp[:, PAD] = -math.inf
            tok = torch.where(alive, logp.argmax(-1), torch.full_like(inp, PAD))
            score += torch.where(alive, logp.gather(1, tok[:, None])[:, 0], torch.zeros(5))
            toks.append(tok)
            alphas.append(alpha * alive[:, None])
            alive &= tok != EOS
            inp = tok
    T = out.tokens.shape[-1]
    toks, alphas = torch.stack(toks, 1), torch.stack(alphas, 1)
    assert torch.equal(out.tokens[:, 0], toks[:, :T]) and (toks[:, T:] == PAD).all()
    torch.testing.assert_close(out.scores[:, 0], score, rtol=0, atol=0)
    torch.testing.assert_close(out.attention[:, 0], alphas[:, :T], rtol=0, atol=0)


def test_reference_beam_one_equals_greedy_and_beam_replays():
    model = _reference("lstm", True, 1, seed=2)
    src, lengths = make_src(B=4, L=5, seed=15)
    g = model.generate(src, lengths, 8)
    b1 = model.generate(src, lengths, 8, strategy="beam", beam_size=1, length_penalty="none")
    assert torch.equal(b1.tokens, g.tokens)
    torch.testing.assert_close(b1.scores, g.scores, rtol=0, atol=1e-6)
    out = model.generate(src, lengths, 8, strategy="beam", beam_size=4, n_best=3, length_penalty="gnmt", alpha=0.6)
    for b in range(4):
        for j in range(3):
            n = hyp_length(out.tokens[b, j])
            raw, alpha_ref = replay(model, src[b : b + 1], lengths[b : b + 1], out.tokens[b, j, :n][None])
            torch.testing.assert_close(out.scores[b, j], raw[0] / lp("gnmt", 0.6, n), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.attention[b, j, :n], alpha_ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("penalty", ["gnmt", "average"])
def test_seq2seq_generate_forwards_early_stop(penalty):
    """reference and fused Seq2Seq.generate(strategy="beam", early_stop=...): beam 1 = greedy by
    default, and "bound" is the exact rule (equal to generation.beam_search's)."""
    fused_s2s = pytest.importorskip("fused_s2s")
    ref = _reference("lstm", True, 1, seed=2)
    fused = fused_s2s.Seq2Seq(11, 13, 8, cell="lstm", num_layers=1, input_feed=True, backend="eager").eval()
    fused.load_state_dict(ref.state_dict())
    src, lengths = make_src(B=6, L=5, seed=15)
    for model in (ref, fused):
        g = model.generate(src, lengths, 8)
        c = model.generate(src, lengths, 8, strategy="beam", beam_size=1, length_penalty=penalty, early_stop="count")
        assert torch.equal(c.tokens, g.tokens)
        b = model.generate(src, lengths, 8, strategy="beam", beam_size=1, length_penalty=penalty, early_stop="bound")
        want = beam_search(model, src, lengths, 8, beam_size=1, length_penalty=penalty, early_stop="bound")
        assert torch.equal(b.tokens, want.tokens) and torch.equal(b.scores, want.scores)
        with pytest.raises(ValueError, match="early_stop"):
            model.generate(src, lengths, 8, strategy="beam", early_stop="exact")


def test_reference_sample_reproducible():
    model = _reference("gru", False, 1, seed=3)
    src, lengths = make_src(B=4, L=5, seed=16)
    torch.manual_seed(0)
    a = model.generate(src, lengths, 6, strategy="sample", temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    b = model.generate(src, lengths, 6, strategy="sample", temperature=0.8, top_p=0.9)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("penalty,alpha,seed", [("average", 0.0, 1), ("average", 0.0, 4), ("gnmt", 1.5, 5)])
def test_beam_early_stop_rule_is_exact(penalty, alpha, seed):
    """Longer hypotheses can win under these penalties: a sentence may only stop when no live beam
    can still reach a better penalised score, so the complete beam still equals exhaustive search.
    (These seeds are ones where a bound using only the next length, s / lp(t+2), stops too early.)"""
    model = FakeModel(V=5, scale=4.0, seed=seed)
    src, lengths = make_src(B=4, L=4, seed=seed)
    max_len = 6
    out = beam_search(model, src, lengths, max_len, beam_size=4 * 3 ** (max_len - 1), length_penalty=penalty,
                      alpha=alpha, n_best=1, early_stop="bound")
    for b in range(4):
        score, seq = exhaustive(model, src[b : b + 1], lengths[b : b + 1], max_len, penalty, alpha)[0]
        torch.testing.assert_close(out.scores[b, 0], torch.tensor(score), rtol=1e-5, atol=1e-5)
        assert out.tokens[b, 0, : len(seq)].tolist() == list(seq)


def test_no_padding_index_fills_with_eos():
    """padding_idx=None: nothing is masked and EOS is the filler after the end."""
    model = FakeModel(V=6, seed=22, force_eos=True)
    model.padding_idx = None
    src, lengths = make_src(B=3, L=4, seed=22)
    src = with_eos_at(src, torch.tensor([1, 3, 2]))
    for strategy, kw in [("greedy", {}), ("sample", {}), ("beam", dict(beam_size=3))]:
        out = generate(model, src, lengths, 10, strategy=strategy, **kw)
        assert out.tokens.shape[-1] == 3, strategy
        assert (out.tokens[:, 0, 2] == EOS).all() and (out.tokens[0, 0] == EOS).all(), strategy
