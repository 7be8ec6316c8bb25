"""Whole training step (forward, loss, backward, optimiser step): fused vs reference vs
torch.compile(reference), for teacher forcing and scheduled sampling ("gumbel_hard", "gumbel").

    python benchmarks/bench_train.py [--quick] [--sizes notes,large] [--modes M,..] [--dtypes float32,..]
                                     # rows appended to results/results.csv
    pytest benchmarks/bench_train.py --benchmark-only

Tokens/s counts target tokens (B * T) per step. Without CUDA the fused rows are skipped (the
kernels need a GPU to be fast; under the interpreter they are only correct) and the eager rows run
at the notes' size only. ``--quick``: fewer repetitions, and the notes' size unless ``--sizes`` says.

"fused_graphed" is the fused model with its decoder pass and loss captured once and replayed every
step (``fused_s2s.graphs.graph_decoder_loss``, experimental; the encoder, whose packed sequence
needs the lengths on the host, and the optimiser stay eager): the per-step loop of scheduled
sampling launches ~30 small kernels a step from Python, which at these sizes costs more host time
than the GPU work, and a replay removes that cost. Its scheduled-sampling rows capture with
``scheduled=True`` and write the ratio and tau before every replay, as a run with schedules does
(from session 9; the rows before it had them fixed at capture).

"compile" compiles each case afresh (``common.compile_fresh``).

Every impl's step makes no host sync of its own (from session 9): the ids are not read back
(``check_ids=False``: the benchmark built them) and ``src_lengths`` lie on the CPU, longest first,
as ``fused-s2s train`` passes them. Rows before that synchronised several times per step.
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
    """Model, optimiser and one batch for ``impl`` in {"fused", "fused_graphed", "reference", "compile",
    "fused_compile"}: "compile" is torch.compile(reference), "fused_compile" torch.compile(fused) (the
    fused ops as custom ops in its graphs)."""
    import fused_s2s
    from fused_s2s import reference

    _, B, L, T, V, D = size
    dev = common.DEVICE
    torch.manual_seed(seed)
    cls = fused_s2s.Seq2Seq if impl.startswith("fused") else reference.Seq2Seq
    model = cls(V, V, D, cell="lstm", padding_idx=0).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src = torch.randint(3, V, (B, L), device=dev)
    # on the CPU, longest first: the encoder packs by them on the host (no device round trip, no
    # device copy of a sort order), as fused-s2s train passes them
    src_lengths = torch.randint(max(1, L // 2), L + 1, (B,)).sort(descending=True).values
    tgt = torch.randint(3, V, (B, T + 1), device=dev)
    tgt[:, 0] = 1
    fwd = common.compile_fresh(model) if impl in ("compile", "fused_compile") else model
    return model, opt, fwd, (src, src_lengths, tgt)


def train_step_fn(impl: str, size, ratio: float, sampling: str, dtype=torch.float32):
    model, opt, fwd, (src, src_lengths, tgt) = make_case(impl, size, dtype)
    amp = dtype != torch.float32 and common.HAS_CUDA

    def amp_ctx():  # make_graphed_callables needs autocast's weight cache off; the model casts once per pass
        return torch.autocast("cuda", dtype=dtype, enabled=amp, cache_enabled=False if impl == "fused_graphed" else None)

    if impl == "fused_graphed":
        from fused_s2s.graphs import graph_decoder_loss

        # scheduled sampling as a run with schedules trains: ratio and tau written every step
        # (scheduled=True); pure teacher forcing captures its fast path
        scheduled = ratio < 1.0
        per_call = dict(teacher_forcing_ratio=ratio, tau=1.0) if scheduled else {}
        with amp_ctx():
            graphed = graph_decoder_loss(model, src, src_lengths, tgt, ratio, sampling, 1.0, scheduled=scheduled)

        def graphed_step():
            opt.zero_grad(set_to_none=True)
            with amp_ctx():
                loss = graphed(src, src_lengths, tgt, **per_call, check_ids=False).loss
            loss.backward()
            opt.step()

        return graphed_step

    def step():
        opt.zero_grad(set_to_none=True)
        with amp_ctx():
            out = fwd(src, src_lengths, tgt, teacher_forcing_ratio=ratio, sampling=sampling, tau=1.0,
                      check_ids=False)
        out.loss.backward()
        opt.step()

    return step


def check_fused(size, ratio: float, sampling: str, dtype=torch.float32) -> common.Check:
    """One forward + backward of the fused model vs the reference in dtype vs the reference in
    float64 (the oracle), all three with the same weights, batch and seed (so the same coins and
    Gumbel noise): the loss and every parameter's gradient, by SPEC section 5's rule. In the
    sampled modes a row whose two best (logit + noise) lie within rounding of each other may pick
    another token in fp32 too (rare: a gap under ~1e-6); such a flip fails the gradients' check,
    and the check's detail line shows it as one parameter row far off, not a uniform drift."""
    out = {}
    for name, impl, dt in (("fused", "fused", dtype), ("eager", "reference", dtype),
                           ("oracle", "reference", torch.float64)):
        model, _, fwd, (src, src_lengths, tgt) = make_case(impl, size)
        model.to(dt if dt == torch.float64 else torch.float32)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=dt, enabled=common.HAS_CUDA and dt in (torch.float16, torch.bfloat16)):
            loss = fwd(src, src_lengths, tgt, teacher_forcing_ratio=ratio, sampling=sampling, tau=1.0).loss
        loss.backward()
        out[name] = {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
        del model, fwd, loss
    c = common.Check()
    for key in out["oracle"]:
        c.oracle(key, out["fused"][key], out["eager"][key], out["oracle"][key])
    return c


def check_applies(dtype, ratio: float, sampling: str) -> str | None:
    """None when the fused step can be checked against the oracle, else why not."""
    if dtype != torch.float32 and ratio < 1.0 and sampling in ("gumbel_hard", "argmax", "sample"):
        # a 16-bit logit rounding flips the argmax of near-tied rows (a different sample, a different
        # gradient) in some of the B * T rows: the oracle's samples are not the same samples
        return "discrete samples of 16-bit logits"
    return None


def impls():
    names = ["fused", "fused_graphed", "reference", "compile"] if common.HAS_CUDA else ["reference"]
    names = [i for i in names if common.wanted(i)]  # $FUSED_S2S_BENCH_IMPLS
    # torch.compile of the fused model: opt-in (FUSED_S2S_BENCH_IMPLS=...,fused_compile), a compile per case
    return names + (["fused_compile"] if common.HAS_CUDA and common.wanted("fused_compile", default=False) else [])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run(quick: bool = False, sizes: tuple | None = None, modes: tuple | None = None,
        dtypes: tuple | None = None) -> list[dict]:
    """sizes, modes, dtypes: names from SIZES, MODES, DTYPES (None: all; bfloat16 needs CUDA)."""
    rows = []
    if not common.HAS_CUDA:
        sizes = ("notes",)
    elif sizes is None:
        sizes = ("notes",) if quick else tuple(s[0] for s in SIZES)
    sizes = [s for name in sizes for s in SIZES if s[0] == name]
    modes = [m for m in MODES if modes is None or m[0] in modes]
    dtypes = [DTYPES[d] for d in (dtypes or DTYPES) if common.HAS_CUDA or d == "float32"]
    if not common.HAS_CUDA:
        print("bench_train: no CUDA device: fused and torch.compile rows need a GPU; timing the eager reference only")
    for size in sizes:
        _, B, L, T, V, D = size
        for dtype in dtypes:
            for mode, ratio, sampling in modes:
                case = f"B{B}_L{L}_T{T}_V{V}_D{D}_{mode}"
                check = ""
                if "fused" in impls() and not check_applies(dtype, ratio, sampling):
                    check = common.run_check(f"{case:<44} {str(dtype):<15} fused     ",
                                             lambda: check_fused(size, ratio, sampling, dtype))
                for impl in impls():
                    try:
                        fn = train_step_fn(impl, size, ratio, sampling, dtype)
                        t = common.time_fn(fn, warmup=3 if quick else 5, rep=5 if quick else 20)
                    except Exception as e:  # like common.measure: report (e.g. torch.compile), keep going
                        print(f"{case:<44} {str(dtype):<15} {impl:<10} failed: {type(e).__name__}: {e}"[:300])
                        continue
                    tok_s = B * T / (t["median_ms"] * 1e-3)
                    rows.append(common.make_row("train_step", impl, case, dtype, "fwd+bwd+opt", t,
                                                note=f"tokens_per_s={tok_s:.0f}", check=check if impl == "fused" else ""))
                    common.append_rows(rows[-1:])  # at once: a run killed half-way keeps its rows
                    print(f"{case:<44} {str(dtype):<15} {impl:<10} {t['median_ms']:9.3f} ms  {tok_s:12.0f} tok/s  "
                          f"peak {t['peak_mem_mb']:.1f} MB", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (and only the notes' size by default)")
    p.add_argument("--sizes", default=None, help=f"comma list of {[s[0] for s in SIZES]} (CUDA only)")
    p.add_argument("--modes", default=None, help=f"comma list of {[m[0] for m in MODES]} (default: all)")
    p.add_argument("--dtypes", default=None, help=f"comma list of {list(DTYPES)} (default: all; bfloat16: CUDA only)")
    a = p.parse_args(argv)
    picked = {}
    for flag, names in (("sizes", [s[0] for s in SIZES]), ("modes", [m[0] for m in MODES]), ("dtypes", list(DTYPES))):
        value = getattr(a, flag)
        if value:
            unknown = set(value.split(",")) - set(names)
            if unknown:
                p.error(f"--{flag}: unknown {sorted(unknown)}; expected a comma list of {names}")
        picked[flag] = tuple(value.split(",")) if value else None
    rows = run(a.quick, **picked)
    print(f"{len(rows)} rows appended to", common.results_csv())
    return rows


@pytest.mark.parametrize("mode,ratio,sampling", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("impl", ["fused", "fused_graphed", "reference", "compile"])
def test_train_step(benchmark, impl, mode, ratio, sampling):
    if impl != "reference" and not common.HAS_CUDA:
        pytest.skip("fused and torch.compile rows need CUDA")
    benchmark(train_step_fn(impl, SIZES[0], ratio, sampling))


if __name__ == "__main__":
    main()
