"""benchmarks/bench_train.py: the pieces its "fused_graphed" column is built from.

On the CPU: the decoder-pass-and-loss module that the benchmark hands to
torch.cuda.make_graphed_callables computes the same loss as Seq2Seq.forward (same coins, same
samples for the same seed), and the command line rejects unknown sizes. On a GPU: a replayed step
gives the eager step's gradients (teacher forcing: nothing random) and draws fresh coins and noise
on every replay (scheduled sampling).
"""
import importlib.util
import os

import pytest
import torch

import fused_s2s

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "..", "benchmarks", "bench_train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

B, L, T, V, D = 3, 5, 4, 23, 8


def _batch(device):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (B, L), generator=g).to(device)
    lengths = torch.tensor([5, 2, 4], device=device)
    tgt = torch.randint(3, V, (B, T + 1), generator=g).to(device)
    tgt[1, 3:] = 0  # padding in the targets
    return src, lengths, tgt


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard"), (0.5, "gumbel")])
def test_decoder_loss_module_equals_seq2seq_loss(ratio, sampling):
    torch.manual_seed(0)
    model = fused_s2s.Seq2Seq(V, V, D, padding_idx=0, backend="eager")
    src, lengths, tgt = _batch("cpu")
    torch.manual_seed(5)
    want = model(src, lengths, tgt, teacher_forcing_ratio=ratio, sampling=sampling, tau=1.0).loss
    memory, mask, state = model.encode(src, lengths)
    torch.manual_seed(5)  # the encoder draws nothing: the decoder draws the same coins and noise
    got = bench_train._DecoderLoss(model, ratio, sampling, 1.0)(tgt, memory, mask, *state.rnn)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # only the decoder's parameters are inputs of the graphed function
    assert {id(p) for p in bench_train._DecoderLoss(model, ratio, sampling, 1.0).parameters()} == \
        {id(p) for p in model.decoder.parameters()}


def test_sizes_option_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--sizes", "notes,huge"])
    assert "unknown ['huge']" in capsys.readouterr().err


def _no_amp():
    return torch.autocast("cuda", enabled=False)


@pytest.mark.gpu
@pytest.mark.kernels
def test_graphed_step_matches_eager_step_and_redraws_noise():
    size = ("tiny", B, L, T, V, D)
    # teacher forcing draws nothing: a replayed step's gradients are the eager step's
    model_e, opt_e, fwd, batch = bench_train.make_case("fused", size)
    model_g, opt_g, _, _ = bench_train.make_case("fused", size)  # the same seed: the same weights
    opt_e.step = opt_g.step = lambda: None  # the weights stay fixed: every step has the same gradients
    fwd(*batch, teacher_forcing_ratio=1.0, sampling="argmax", tau=1.0).loss.backward()
    step = bench_train._graphed_step(model_g, opt_g, batch, 1.0, "argmax", _no_amp)
    for _ in range(2):  # the second replay after zero_grad(set_to_none=True) gives them again
        step()
    torch.cuda.synchronize()
    want = {n: p.grad for n, p in model_e.named_parameters()}
    got = {n: p.grad for n, p in model_g.named_parameters()}
    for n, g in want.items():
        assert got[n] is not None, f"{n}: no gradient from the graphed step"
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # scheduled sampling: each replay draws new coins and Gumbel noise (graph-safe Philox offsets)
    model_s, opt_s, _, batch = bench_train.make_case("fused", size)
    opt_s.step = lambda: None
    step = bench_train._graphed_step(model_s, opt_s, batch, 0.5, "gumbel_hard", _no_amp)
    seen = []
    for _ in range(3):
        step()
        seen.append(model_s.decoder.embedding.weight.grad.clone())
    assert all(torch.isfinite(g).all() for g in seen)
    assert not (torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])), "replays drew the same samples"


@pytest.mark.kernels
@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard")])
def test_check_fused_passes_and_can_fail(monkeypatch, ratio, sampling):
    monkeypatch.setenv("FUSED_S2S_BACKEND", "triton")  # the kernels (interpreted on CPU)
    size = ("tiny", B, L, T, V, D)
    c = bench_train.check_fused(size, ratio, sampling)
    assert c.cell().startswith("ok"), c.details()
    assert {"loss", "decoder.W_out.weight", "encoder.embedding.weight"} <= {n for n, *_ in c.items}
    real = fused_s2s.Seq2Seq.loss
    monkeypatch.setattr(fused_s2s.Seq2Seq, "loss", lambda self, logits, tgt_out: real(self, logits, tgt_out) * 1.001)
    c = bench_train.check_fused(size, ratio, sampling)
    assert c.cell().startswith("FAIL") and "loss" in c.cell(), c.cell()


def test_check_skips_16_bit_samples():
    assert bench_train.check_applies(torch.bfloat16, 0.5, "gumbel_hard")
    assert bench_train.check_applies(torch.bfloat16, 1.0, "argmax") is None  # teacher forcing draws nothing
    assert bench_train.check_applies(torch.bfloat16, 0.5, "gumbel") is None  # soft: only the coins
    assert bench_train.check_applies(torch.float32, 0.5, "gumbel_hard") is None
