"""Gumbel-softmax (issue 5): fused Triton vs F.gumbel_softmax vs torch.compile(F.gumbel_softmax).

    python benchmarks/bench_gumbel.py [--quick] [--sizes notes,mid,large] [--dtypes float32,bfloat16]
    pytest benchmarks/bench_gumbel.py --benchmark-only

logits (B, V), soft and hard (straight-through), "fwd" under no_grad and "fwd+bwd" (forward with
grad, then the backward of a random upstream gradient). Bandwidth counts the minimal traffic:
fwd reads logits and writes y; the backward reads logits and dy and writes dlogits (the fused
kernels draw the noise again instead of reading it). Peak memory is what the call allocates on
top of its inputs: the fused path keeps O(B) per-row statistics for the backward, eager keeps
the noise and y_soft (O(B x V)). Without CUDA the fused and torch.compile columns are skipped
(the kernels only run interpreted on CPU) and eager is timed at the smallest size only.

Before the fused column is timed at a (size, dtype, soft/hard), ``check_fused`` runs it once on the
same logits with a fixed torch.Generator seed against the library's eager backend in the same
dtype and in float64 (the oracle) with the same seed: both draw the kernel's Philox noise (in
float32, upcast for float64), see fused_s2s.philox. Soft: y and dlogits by SPEC section 5's rule.
Hard: the sampled index must be the oracle's except at near-ties (the top two logits + g within
NEAR_TIE_ULPS float32 ulps: the GPU kernel's hardware log moves g by a few ulps), y must be the
one-hot of its index, and dlogits by SPEC section 5's rule. The verdict goes in the check column.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (B, V): the notes' decoder step, a mid vocabulary, the large end of the issue's range
SIZES = {"notes": (32, 10_000), "mid": (256, 32_000), "large": (256, 128_000)}
IMPLS = ("fused", "eager", "compile")
TAU = 0.5
CHECK_SEED = 1234  # the generator seed of the correctness check
NEAR_TIE_ULPS = 16  # hard check: another sample is tolerated where the oracle's top two (logits + g) are this close

def impl_fn(impl: str):
    """(logits, hard) -> y for impl in IMPLS."""
    if impl == "fused":
        from fused_s2s.gumbel import gumbel_softmax

        return lambda x, hard: gumbel_softmax(x, TAU, hard, backend="triton")
    if impl == "eager":
        return lambda x, hard: F.gumbel_softmax(x, tau=TAU, hard=hard)
    return common.compile_fresh(lambda x, hard: F.gumbel_softmax(x, tau=TAU, hard=hard))


def traffic_bytes(size: str, dtype, pass_: str) -> int:
    B, V = SIZES[size]
    e = torch.finfo(dtype).bits // 8
    fwd = 2 * B * V  # logits in, y out
    bwd = 3 * B * V  # logits, dy in; dlogits out
    return e * (fwd if pass_ == "fwd" else fwd + bwd)


def make_inputs(size: str, dtype, device):
    """logits x (B, V) and an upstream gradient dy (B, V), the same for every impl."""
    B, V = SIZES[size]
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: 33M values each at "large"
    x = (torch.randn(B, V, generator=g, device=device) * 2).to(dtype)
    dy = torch.randn(B, V, generator=g, device=device).to(dtype)
    return x, dy


def case_fn(impl: str, size: str, dtype, pass_: str, hard: bool):
    dev = common.DEVICE
    fn = impl_fn(impl)
    x, dy = make_inputs(size, dtype, dev)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, hard)
        return run
    x.requires_grad_(True)

    def run():
        y = fn(x, hard)
        return torch.autograd.grad(y, x, dy)
    return run


def gumbel_call(x, hard: bool, backend: str, generator):
    """(y, index) of the library's Gumbel-softmax: what check_fused compares (a hook for its tests)."""
    from fused_s2s.gumbel import gumbel_softmax

    return gumbel_softmax(x, TAU, hard, generator=generator, return_index=True, backend=backend)


def check_fused(size: str, dtype, hard: bool) -> common.Check:
    """The fused backend vs the eager backend in dtype vs the float64 oracle, one seed, on
    make_inputs(size): soft y or the hard sample (index, one-hot), and dlogits for dy."""
    from fused_s2s import philox

    dev = common.DEVICE
    x, dy = make_inputs(size, dtype, dev)  # the timed inputs, (B, V)

    def gen():  # a fresh generator per call: every backend draws the same seed, so the same noise
        return torch.Generator(device=dev).manual_seed(CHECK_SEED)

    out = {}
    for name, backend, dt in (("fused", "triton", dtype), ("eager", "eager", dtype), ("oracle", "eager", torch.float64)):
        x_ = x.detach().to(dt, copy=True).requires_grad_()
        y, idx = gumbel_call(x_, hard, backend, gen())  # (B, V), (B,)
        (dx,) = torch.autograd.grad(y, x_, dy.to(dt))
        out[name] = (y.detach(), idx, dx)
        del x_, y, dx
    (y_f, i_f, dx_f), (y_e, _, dx_e), (y_o, i_o, dx_o) = out["fused"], out["eager"], out["oracle"]
    c = common.Check()
    if hard:
        rows = (i_f != i_o).nonzero()[:, 0]  # rows whose sample differs from the oracle's
        ties = 0
        if rows.numel():
            seed = philox.draw_seed(dev, gen())  # the seed every backend drew
            cols = torch.stack([i_o[rows], i_f[rows]])  # (2, n): the oracle's and the fused pick
            xs = x.to(torch.float64)[rows[None], cols]
            gs = philox.gumbel_at(seed, rows[None].expand_as(cols), cols).to(torch.float64)
            z = xs + gs  # (2, n) perturbed logits, float64
            scale = torch.stack([xs.abs(), gs.abs()]).amax(dim=(0, 1)).clamp_min(1.0)
            ties = int(((z[0] - z[1]).abs() <= NEAR_TIE_ULPS * torch.finfo(torch.float32).eps * scale).sum())
        c.count("index", rows.numel() - ties, len(i_o), f"({ties} near-ties tolerated)")
        one_hot = torch.zeros_like(y_f).scatter_(1, i_f[:, None], 1.0)
        c.count("onehot", int((y_f != one_hot).any(dim=1).sum()), len(i_f))
    else:
        c.oracle("y", y_f, y_e, y_o)
    c.oracle("dlogits", dx_f, dx_e, dx_o)
    return c


def available(impl: str) -> str | None:
    """None when impl can run here, else why not."""
    if impl != "eager" and not common.HAS_CUDA:
        return f"{impl} column needs CUDA" + (" (the kernels only run interpreted on CPU)" if impl == "fused" else "")
    return None


def run(sizes=("notes", "mid", "large"), dtypes=(torch.float32, torch.bfloat16), quick=False) -> list[dict]:
    rows, graphed = [], []  # graphed: the fused and eager calls, timed again by graph replay
    if not common.HAS_CUDA:
        print("bench_gumbel: no CUDA device: the fused column needs CUDA; timing eager "
              "F.gumbel_softmax at the smallest size only")
        sizes = ("notes",)
    for size in sizes:
        B, V = SIZES[size]
        case = f"B{B}_V{V}"
        for dtype in dtypes:
            for hard in (False, True):
                mode = "hard" if hard else "soft"
                check = ""
                if not available("fused") and common.wanted("fused"):
                    check = common.run_check(f"{case:<14} {str(dtype):<15} {mode:<5} fused   ",
                                             lambda: check_fused(size, dtype, hard))
                for pass_ in ("fwd", "fwd+bwd"):
                    for impl in IMPLS:
                        label = f"{case:<14} {str(dtype):<15} {mode:<5} {pass_:<8} {impl:<8}"
                        why = available(impl)
                        if why:
                            print(f"{label} skipped: {why}")
                            continue
                        common.measure_into(
                            rows, graphed, check=check if impl == "fused" else "", label=label,
                            make_fn=functools.partial(case_fn, impl, size, dtype, pass_, hard), bench="gumbel",
                            impl=impl, case=case, dtype=dtype, pass_=pass_,
                            nbytes=traffic_bytes(size, dtype, pass_), note=f"{mode} tau={TAU}", quick=quick)
    return rows + common.measure_graphed(graphed)


def main(argv=None) -> list[dict]:
    return common.main_for(run, SIZES, "notes,mid,large", argv)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_gumbel(benchmark, impl, dtype, pass_, hard):
    why = available(impl)
    if why:
        pytest.skip(why)
    if not common.HAS_CUDA and dtype != torch.float32:
        pytest.skip("CPU: float32 only")
    benchmark(case_fn(impl, "notes", dtype, pass_, hard))


if __name__ == "__main__":
    main()
