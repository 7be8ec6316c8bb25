"""benchmarks/bench_train.py: its command line, and the correctness check it runs before timing
the fused training step (passes on the real model, fails on a perturbed loss)."""
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


def test_sizes_option_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--sizes", "notes,huge"])
    assert "unknown ['huge']" in capsys.readouterr().err
    for flag, bad in (("--modes", "teacher_forcing,beam"), ("--dtypes", "float16")):
        with pytest.raises(SystemExit):
            bench_train.main([flag, bad])
        assert "unknown" in capsys.readouterr().err


def test_modes_and_dtypes_options_pick_the_cases(monkeypatch):
    """--modes / --dtypes restrict the cases timed (the GPU budget's torch.compile pass times two);
    timing and the CSV are stubbed: only which cases run is checked."""
    timed = []
    monkeypatch.setattr(bench_train, "train_step_fn", lambda impl, size, ratio, sampling, dtype: (impl, sampling, dtype))
    monkeypatch.setattr(bench_train.common, "time_fn", lambda fn, **kw: timed.append(fn) or
                        {"median_ms": 1.0, "peak_mem_mb": 0.0, "min_ms": 1.0, "mean_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})
    monkeypatch.setattr(bench_train.common, "make_row", lambda *a, **k: dict(a=a))
    monkeypatch.setattr(bench_train.common, "append_rows", lambda rows: None)
    monkeypatch.setattr(bench_train, "impls", lambda: ["reference"])
    bench_train.main(["--quick", "--modes", "teacher_forcing,ss_gumbel_hard", "--dtypes", "float32"])
    assert timed == [("reference", "argmax", torch.float32), ("reference", "gumbel_hard", torch.float32)]
    timed.clear()
    bench_train.main(["--quick"])
    assert [t[1] for t in timed] == ["argmax", "gumbel_hard", "gumbel"]  # default: every mode


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


def test_fused_compile_is_opt_in(monkeypatch):
    """torch.compile of the fused model times only when FUSED_S2S_BENCH_IMPLS names it (a compile per case)."""
    monkeypatch.setattr(bench_train.common, "HAS_CUDA", True)
    monkeypatch.delenv(bench_train.common.IMPLS_ENV, raising=False)
    assert bench_train.impls() == ["fused", "fused_graphed", "reference", "compile"]
    monkeypatch.setenv(bench_train.common.IMPLS_ENV, "reference,fused_compile")
    assert bench_train.impls() == ["reference", "fused_compile"]


def test_fused_compile_case_compiles_the_fused_model():
    model, _, fwd, _ = bench_train.make_case("fused_compile", bench_train.SIZES[0])
    assert isinstance(model, fused_s2s.Seq2Seq) and fwd is not model  # the compiled wrapper
