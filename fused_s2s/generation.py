"""Decoding for any model that obeys the interface of briefs/model_api (reference and fused alike).

Only these are used: ``model.encode(src, src_lengths) -> (memory (B, L, D), memory_mask, state)``,
``model.decoder.step(inp (B,) long, state, memory, memory_mask) -> (logits (B, V), alpha (B, L),
state)``, ``state.reorder(index)``, and ``model.bos_idx / eos_idx / padding_idx``.

Conventions shared by the three strategies (docs/generation.md has the full story):
- Log-probabilities are ``log_softmax(logits)`` in float32; ``padding_idx`` is never emitted (its
  log-prob is set to -inf, as fairseq does), because padding marks "after EOS" in the output.
- tokens (B, N, T'): EOS included, ``padding_idx`` after it; T' is the longest hypothesis.
- scores (B, N): sum of the model's log-probs of the emitted tokens (beam: divided by the length
  penalty). attention (B, N, T', L) float32: alpha of the step that emitted each token, 0 after EOS.
- Early exit of the decoding loop needs a host read of "all finished?". It is done every
  ``SYNC_EVERY`` steps only, so at most SYNC_EVERY - 1 steps are wasted; results do not depend on
  it (outputs are trimmed to the longest hypothesis, and finished rows never change).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_s2s._checks import check_batch, check_choice, check_generator, check_int_tensor
from fused_s2s.gumbel import gumbel_sample

STRATEGIES = ("greedy", "sample", "beam")
LENGTH_PENALTIES = ("gnmt", "average", "none")
EARLY_STOPS = ("count", "bound")
SYNC_EVERY = 4  # host check "every sequence finished?" once per this many steps


class GenerateOutput(NamedTuple):
    tokens: Tensor  # (B, N, T') long: EOS included, padding_idx after it
    scores: Tensor  # (B, N) float32: sum of log-probs (beam: after the length penalty)
    attention: Tensor  # (B, N, T', L) float32: alignment history, 0 after EOS


# -- argument checks (Python scalars and shapes only: no tensor values are read) -------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_inputs(src, src_lengths, max_len) -> int:
    check_int_tensor("src", src, ndim=2)
    check_int_tensor("src_lengths", src_lengths, ndim=1)
    check_batch(src=src, src_lengths=src_lengths)  # src_lengths may live on any device (model API)
    if src.shape[0] == 0:
        raise ValueError("src must have at least one row (B >= 1), got shape " f"{tuple(src.shape)}")
    return _check_int("max_len", max_len, 1)


def _specials(model):
    bos, eos, pad = model.bos_idx, model.eos_idx, model.padding_idx
    # without a padding index the filler after EOS is EOS itself and nothing is masked
    return int(bos), int(eos), (int(pad) if pad is not None else None), (int(pad) if pad is not None else int(eos))


def _log_probs(logits: Tensor, pad) -> Tensor:
    """(B, V) logits -> float32 log-probs with padding_idx at -inf (never emitted)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, V)
    if pad is not None:
        logp[:, pad] = -math.inf
    return logp


def _repeat_mask(memory_mask, index: Tensor):
    """memory_mask (lengths (B,), bool (B, L) or None) -> the rows ``index`` (beam copies)."""
    return memory_mask.index_select(0, index) if isinstance(memory_mask, Tensor) else memory_mask


# -- greedy and sampling: one hypothesis per sentence ---------------------------------------------
def _decode_one(model, src, src_lengths, max_len, pick) -> GenerateOutput:
    """Left-to-right decoding; ``pick(logits (B, V) float32 with pad -inf) -> ids (B,)``."""
    bos, eos, pad, fill = _specials(model)
    memory, memory_mask, state = model.encode(src, src_lengths)  # (B, L, D), lengths (B,), state
    B, L = memory.shape[0], memory.shape[1]
    dev = memory.device
    tokens = torch.full((B, max_len), fill, dtype=torch.long, device=dev)  # (B, T)
    attn = torch.zeros(B, max_len, L, dtype=torch.float32, device=dev)  # (B, T, L)
    score = torch.zeros(B, dtype=torch.float32, device=dev)  # (B,)
    length = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) tokens emitted, EOS included
    finished = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
    inp = torch.full((B,), bos, dtype=torch.long, device=dev)  # (B,)
    for t in range(max_len):
        logits, alpha, state = model.decoder.step(inp, state, memory, memory_mask)  # (B, V), (B, L)
        logp = _log_probs(logits, pad)  # (B, V)
        masked = logits.float()
        if pad is not None:
            masked = masked.masked_fill(torch.arange(masked.shape[1], device=dev) == pad, -math.inf)
        tok = pick(masked)  # (B,)
        alive = ~finished  # (B,) rows still writing
        tok = torch.where(alive, tok, torch.full_like(tok, fill))
        tokens[:, t] = tok
        attn[:, t] = torch.where(alive[:, None], alpha.float(), torch.zeros_like(alpha, dtype=torch.float32))
        step_lp = logp.gather(1, tok[:, None]).squeeze(1)  # (B,)
        score += torch.where(alive, step_lp, torch.zeros_like(step_lp))
        length += alive.long()
        finished |= tok == eos
        inp = tok  # finished rows feed the filler; their outputs are discarded
        if (t + 1) % SYNC_EVERY == 0 and t + 1 < max_len and bool(finished.all()):
            break  # host sync, once per SYNC_EVERY steps
    T_out = int(length.max())  # one sync at the end: trim to the longest sequence
    return GenerateOutput(tokens[:, None, :T_out], score[:, None], attn[:, None, :T_out])


def greedy(model, src: Tensor, src_lengths: Tensor, max_len: int) -> GenerateOutput:
    """Argmax at each step until EOS or max_len. scores: sum of log-probs (no length penalty)."""
    max_len = _check_inputs(src, src_lengths, max_len)
    with torch.no_grad():
        return _decode_one(model, src, src_lengths, max_len, lambda z: z.argmax(-1))


def _filter_top_k_top_p(z: Tensor, top_k: int, top_p: float) -> Tensor:
    """z (B, V) float32 scaled logits -> same with the tokens outside top-k / the nucleus at -inf.

    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept).
    top-p keeps, in order of decreasing probability, each token whose preceding mass is < top_p:
    the smallest prefix with mass >= top_p (always at least the most likely token).
    """
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1.0:
        p_sorted, order = F.softmax(z, dim=-1).sort(dim=-1, descending=True)  # (B, V)
        before = p_sorted.cumsum(-1) - p_sorted  # (B, V) mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # never drop the most likely token (guards rounding)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocab order
        z = z.masked_fill(drop, -math.inf)
    return z


def sample(model, src: Tensor, src_lengths: Tensor, max_len: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> GenerateOutput:
    """Ancestral sampling: exact categorical draws from softmax(logits / temperature) restricted to
    top-k and the top-p nucleus, by the Gumbel-max trick: the fused ``gumbel_sample(z)`` is
    argmax(z + g), Philox noise g drawn in the kernel on CUDA (eager mirror fused_s2s.philox
    otherwise), one read of z and no (B, V) output; filtered tokens (z = -inf) never win.

    One seed per step is drawn from torch's RNG (``generator``, on the model's device, if given), so
    torch.manual_seed or a seeded generator reproduces a run. The backend is the decoder's
    ``backend`` attribute ("auto" if it has none). scores: the model's log-probs (untempered,
    unfiltered) of the sampled tokens, so top_k=1 gives greedy's tokens and scores.
    """
    max_len = _check_inputs(src, src_lengths, max_len)
    temperature = _check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top_k = _check_int("top_k", top_k, 0)
    top_p = _check_real("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    check_generator(generator, src.device, "the model's device (src's)")  # src lives on the model's device
    backend = getattr(model.decoder, "backend", "auto")

    def pick(z: Tensor) -> Tensor:  # z (B, V) float32, pad at -inf
        z = _filter_top_k_top_p(z / temperature, top_k, top_p)  # (B, V) filtered at -inf
        # one seed per step from torch's RNG; index = argmax(z + g) ~ Categorical(softmax(z))
        return gumbel_sample(z, generator=generator, backend=backend)  # (B,)

    with torch.no_grad():
        return _decode_one(model, src, src_lengths, max_len, pick)


# -- beam search -------------------------------------------------------------------------------------
def _length_penalty(name: str, alpha: float, n: int) -> float:
    """lp(n) for a hypothesis of n tokens (EOS included); penalised score = sum log-probs / lp(n)."""
    if name == "gnmt":
        return ((5.0 + n) / 6.0) ** alpha
    if name == "average":
        return float(n)
    return 1.0


def beam_search(model, src: Tensor, src_lengths: Tensor, max_len: int, beam_size: int = 4,
                length_penalty: str = "gnmt", alpha: float = 0.6, n_best: int = 1,
                early_stop: str = "count") -> GenerateOutput:
    """Batched beam search (B * beam_size rows); returns the n_best hypotheses per sentence.

    Each step, the top 2K of the K*V extensions are ranked (K = beam_size). Those among the first K
    that end in EOS are finished: scored sum(log p) / lp(len) and merged into the sentence's n-best
    list; the K best non-EOS extensions become the new beams. At step max_len every one of the first
    K extensions is finished (truncated hypotheses have no EOS). scores are penalised.

    When a sentence stops (``early_stop``):
    - "count" (default, fairseq's rule): once K hypotheses of it have finished (at most K ever
      finish: within a step the best come first). beam_size=1 then equals greedy under every
      length penalty (scores: greedy's sum of log-probs / lp(length)).
    - "bound" (exact): once it has n_best finished hypotheses and the worst of them is >= the best
      score any live beam could still reach: live raw score s <= 0 can only fall, so its best is
      s / max(lp(t+2), lp(max_len)) over the lengths still possible (exact for all three penalties,
      for any alpha). With a beam wide enough this equals exhaustive search; with "gnmt" or
      "average" a small beam may continue past greedy's EOS to a longer, better-scoring hypothesis.
    Under both rules a sentence with no live beam left is done.
    """
    max_len = _check_inputs(src, src_lengths, max_len)
    K = _check_int("beam_size", beam_size, 1)
    N = _check_int("n_best", n_best, 1)
    if N > K:
        raise ValueError(f"n_best must be in [1, beam_size={K}], got {N}")
    check_choice("length_penalty", length_penalty, LENGTH_PENALTIES)
    alpha = _check_real("alpha", alpha)
    check_choice("early_stop", early_stop, EARLY_STOPS)
    count = early_stop == "count"
    lp = lambda n: _length_penalty(length_penalty, alpha, n)  # noqa: E731  (Python float)

    with torch.no_grad():
        bos, eos, pad, fill = _specials(model)
        memory, memory_mask, state = model.encode(src, src_lengths)  # (B, L, D), (B,), state
        B, L = memory.shape[0], memory.shape[1]
        dev = memory.device
        rows = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) sentence of each beam row
        memory = memory.index_select(0, rows)  # (B*K, L, D)
        memory_mask = _repeat_mask(memory_mask, rows)  # (B*K,) lengths
        state = state.reorder(rows)
        base = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1) first row of each sentence
        ninf = -math.inf

        # live beams: only beam 0 starts alive, so step 0 does not expand K identical copies
        beam_score = torch.full((B, K), ninf, dtype=torch.float32, device=dev)  # (B, K) raw
        beam_score[:, 0] = 0.0
        hist_tok = torch.full((B, K, max_len), fill, dtype=torch.long, device=dev)  # (B, K, T)
        hist_attn = torch.zeros(B, K, max_len, L, dtype=torch.float32, device=dev)  # (B, K, T, L)
        # finished n-best lists, sorted by penalised score (best first); empty slots at -inf
        fin_score = torch.full((B, N), ninf, dtype=torch.float32, device=dev)  # (B, N)
        fin_tok = torch.full((B, N, max_len), fill, dtype=torch.long, device=dev)  # (B, N, T)
        fin_attn = torch.zeros(B, N, max_len, L, dtype=torch.float32, device=dev)  # (B, N, T, L)
        fin_len = torch.zeros(B, N, dtype=torch.long, device=dev)  # (B, N)
        fin_count = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) hypotheses finished ("count")
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
        inp = torch.full((B * K,), bos, dtype=torch.long, device=dev)  # (B*K,)

        for t in range(max_len):
            last = t == max_len - 1
            logits, alpha_t, state = model.decoder.step(inp, state, memory, memory_mask)  # (B*K, V), (B*K, L)
            V = logits.shape[-1]
            logp = _log_probs(logits, pad).view(B, K, V)  # (B, K, V)
            alpha_t = alpha_t.float().view(B, K, L)  # (B, K, L)
            cand = (beam_score[:, :, None] + logp).view(B, K * V)  # (B, K*V) raw scores
            C = min(2 * K, K * V)
            top_val, top_idx = cand.topk(C, dim=1)  # (B, C) best first
            top_beam, top_tok = top_idx // V, top_idx % V  # (B, C) parent beam, token
            is_eos = top_tok == eos  # (B, C)

            def extend(sel: Tensor):
                """Histories of the candidates at positions sel (B, S): tokens (B, S, T), attn (B, S, T, L)."""
                beam = top_beam.gather(1, sel)  # (B, S)
                S = sel.shape[1]
                tok = hist_tok.gather(1, beam[:, :, None].expand(B, S, max_len))  # a new tensor
                tok[:, :, t] = top_tok.gather(1, sel)
                att = hist_attn.gather(1, beam[:, :, None, None].expand(B, S, max_len, L))
                att[:, :, t] = alpha_t.gather(1, beam[:, :, None].expand(B, S, L))
                return beam, tok, att

            # 1. finish the EOS extensions ranked in the first K (all of the first K at max_len)
            first = torch.arange(min(K, C), device=dev).expand(B, -1)  # (B, K')
            ends = torch.ones_like(is_eos[:, : first.shape[1]]) if last else is_eos[:, : first.shape[1]]
            new_score = top_val[:, : first.shape[1]] / lp(t + 1)  # (B, K') penalised
            ends = ends & torch.isfinite(new_score)
            if count:  # at most K finish per sentence; same length within a step, so best come first
                ends = ends & (fin_count[:, None] + ends.long().cumsum(1) <= K)
                fin_count = fin_count + ends.long().sum(1)
            new_score = torch.where(ends, new_score, torch.full_like(new_score, ninf))
            _, new_tok, new_attn = extend(first)
            all_score = torch.cat([fin_score, new_score], dim=1)  # (B, N+K')
            fin_score, keep = all_score.topk(N, dim=1)  # (B, N) best first
            fin_tok = torch.cat([fin_tok, new_tok], 1).gather(1, keep[:, :, None].expand(B, N, max_len))
            fin_attn = torch.cat([fin_attn, new_attn], 1).gather(1, keep[:, :, None, None].expand(B, N, max_len, L))
            fin_len = torch.cat([fin_len, torch.full_like(new_score, t + 1, dtype=torch.long)], 1).gather(1, keep)
            if last:
                break

            # 2. the K best non-EOS extensions continue (there are >= K of them among 2K)
            rank = torch.arange(C, device=dev).expand(B, -1) + C * is_eos.long()  # (B, C) EOS last
            live = rank.argsort(dim=1)[:, :K]  # (B, K) positions in the top-C list
            parent, hist_tok, hist_attn = extend(live)
            beam_score = top_val.gather(1, live)  # (B, K) raw
            inp = top_tok.gather(1, live).view(B * K)  # (B*K,)
            state = state.reorder((base + parent).view(B * K))

            # 3. per-sentence early stop
            best_live = beam_score.max(dim=1).values  # (B,) <= 0, -inf when no live beam
            if count:  # K hypotheses finished (or nothing left alive)
                done |= (fin_count >= K) | (best_live == ninf)
            else:  # nothing a live beam can reach beats the n-th best finished (-inf >= -inf: none alive)
                bound = best_live / max(lp(t + 2), lp(max_len))  # (B,)
                done |= fin_score[:, N - 1] >= bound
            beam_score = beam_score.masked_fill(done[:, None], ninf)  # done sentences stop growing
            if (t + 1) % SYNC_EVERY == 0 and bool(done.all()):
                break  # host sync, once per SYNC_EVERY steps

        # empty slots (fewer than n_best hypotheses exist): padding, zero attention, score -inf
        valid = torch.isfinite(fin_score)  # (B, N)
        fin_tok = torch.where(valid[:, :, None], fin_tok, torch.full_like(fin_tok, fill))
        fin_attn = fin_attn * valid[:, :, None, None]
        T_out = max(int(fin_len.max()), 1)  # one sync at the end: trim to the longest hypothesis
        return GenerateOutput(fin_tok[:, :, :T_out], fin_score, fin_attn[:, :, :T_out])


def generate(model, src: Tensor, src_lengths: Tensor, max_len: int, strategy: str = "greedy", **kw) -> GenerateOutput:
    """Dispatch: "greedy" -> greedy, "sample" -> sample, "beam" -> beam_search (same keywords)."""
    check_choice("strategy", strategy, STRATEGIES)
    fn = {"greedy": greedy, "sample": sample, "beam": beam_search}[strategy]
    allowed = {"greedy": (), "sample": ("temperature", "top_k", "top_p", "generator"),
               "beam": ("beam_size", "length_penalty", "alpha", "n_best", "early_stop")}[strategy]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise TypeError(f"strategy={strategy!r} got unexpected keyword argument(s) {unknown}; "
                        f"it accepts {list(allowed)}")
    return fn(model, src, src_lengths, max_len, **kw)
