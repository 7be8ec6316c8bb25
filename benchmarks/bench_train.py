"""Whole training step (forward, loss, backward, optimiser step): fused vs reference vs
torch.compile(reference), for teacher forcing and scheduled sampling ("gumbel_hard", "gumbel").

    python benchmarks/bench_train.py [--quick]       # table + rows appended to results/results.csv
    pytest benchmarks/bench_train.py --benchmark-only

Tokens/s counts target tokens (B * T) per step. Without CUDA the fused rows are skipped (the
kernels need a GPU to be fast; under the interpreter they are only correct) and the eager rows run
at the notes' size only.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (name, B, L, T, V, D)
SIZES = [("notes", 32, 10, 10, 10_000, 256), ("large", 128, 50, 50, 32_000, 512)]
# (mode name, teacher_forcing_ratio, sampling)
MODES = [("teacher_forcing", 1.0, "argmax"), ("ss_gumbel_hard", 0.5, "gumbel_hard"), ("ss_gumbel", 0.5, "gumbel")]


def make_case(impl: str, size, dtype=torch.float32, seed: int = 0):
    """Model, optimiser and one batch for ``impl`` in {"fused", "reference", "compile"}."""
    import fused_s2s
    from fused_s2s import reference

    _, B, L, T, V, D = size
    dev = torch.device("cuda" if common.HAS_CUDA else "cpu")
    torch.manual_seed(seed)
    cls = fused_s2s.Seq2Seq if impl == "fused" else reference.Seq2Seq
    model = cls(V, V, D, cell="lstm", padding_idx=0).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src = torch.randint(3, V, (B, L), device=dev)
    src_lengths = torch.randint(max(1, L // 2), L + 1, (B,), device=dev)
    tgt = torch.randint(3, V, (B, T + 1), device=dev)
    tgt[:, 0] = 1
    fwd = torch.compile(model) if impl == "compile" else model
    return model, opt, fwd, (src, src_lengths, tgt)


def train_step_fn(impl: str, size, ratio: float, sampling: str, dtype=torch.float32):
    model, opt, fwd, (src, src_lengths, tgt) = make_case(impl, size, dtype)
    amp = dtype != torch.float32 and common.HAS_CUDA

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            out = fwd(src, src_lengths, tgt, teacher_forcing_ratio=ratio, sampling=sampling, tau=1.0)
        out.loss.backward()
        opt.step()

    return step


def impls():
    names = ["fused", "reference", "compile"] if common.HAS_CUDA else ["reference"]
    return [i for i in names if common.wanted(i)]  # $FUSED_S2S_BENCH_IMPLS


def run(quick: bool = False) -> list[dict]:
    rows = []
    sizes = SIZES[:1] if (quick or not common.HAS_CUDA) else SIZES
    dtypes = [torch.float32, torch.bfloat16] if common.HAS_CUDA else [torch.float32]
    if not common.HAS_CUDA:
        print("bench_train: no CUDA device: fused and torch.compile rows need a GPU; timing the eager reference only")
    for size in sizes:
        _, B, L, T, V, D = size
        for dtype in dtypes:
            for mode, ratio, sampling in MODES:
                for impl in impls():
                    case = f"B{B}_L{L}_T{T}_V{V}_D{D}_{mode}"
                    try:
                        fn = train_step_fn(impl, size, ratio, sampling, dtype)
                        t = common.time_fn(fn, warmup=3 if quick else 5, rep=5 if quick else 20)
                    except Exception as e:  # like common.measure: report (e.g. torch.compile), keep going
                        print(f"{case:<44} {str(dtype):<15} {impl:<10} failed: {type(e).__name__}: {e}"[:300])
                        continue
                    tok_s = B * T / (t["median_ms"] * 1e-3)
                    rows.append(common.make_row("train_step", impl, case, dtype, "fwd+bwd+opt", t,
                                                note=f"tokens_per_s={tok_s:.0f}"))
                    common.append_rows(rows[-1:])  # at once: a run killed half-way keeps its rows
                    print(f"{case:<44} {str(dtype):<15} {impl:<10} {t['median_ms']:9.3f} ms  {tok_s:12.0f} tok/s  "
                          f"peak {t['peak_mem_mb']:.1f} MB", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    rows = run(a.quick)
    print(f"{len(rows)} rows appended to", common.results_csv())
    return rows


@pytest.mark.parametrize("mode,ratio,sampling", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("impl", ["fused", "reference", "compile"])
def test_train_step(benchmark, impl, mode, ratio, sampling):
    if impl != "reference" and not common.HAS_CUDA:
        pytest.skip("fused and torch.compile rows need CUDA")
    benchmark(train_step_fn(impl, SIZES[0], ratio, sampling))


if __name__ == "__main__":
    main()
