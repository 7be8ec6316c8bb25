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
"""
from __future__ import annotations

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

_COMPILED = {}


def impl_fn(impl: str):
    """(logits, hard) -> y for impl in IMPLS."""
    if impl == "fused":
        from fused_s2s.gumbel import gumbel_softmax

        return lambda x, hard: gumbel_softmax(x, TAU, hard, backend="triton")
    if impl == "eager":
        return lambda x, hard: F.gumbel_softmax(x, tau=TAU, hard=hard)
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(lambda x, hard: F.gumbel_softmax(x, tau=TAU, hard=hard))
    return _COMPILED["fn"]


def traffic_bytes(size: str, dtype, pass_: str) -> int:
    B, V = SIZES[size]
    e = torch.finfo(dtype).bits // 8
    fwd = 2 * B * V  # logits in, y out
    bwd = 3 * B * V  # logits, dy in; dlogits out
    return e * (fwd if pass_ == "fwd" else fwd + bwd)


def case_fn(impl: str, size: str, dtype, pass_: str, hard: bool):
    dev = torch.device("cuda" if common.HAS_CUDA else "cpu")
    B, V = SIZES[size]
    fn = impl_fn(impl)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(B, V, generator=g) * 2).to(dev, dtype)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, hard)
        return run
    x.requires_grad_(True)
    dy = torch.randn(B, V, generator=g).to(dev, dtype)

    def run():
        y = fn(x, hard)
        return torch.autograd.grad(y, x, dy)
    return run


def available(impl: str) -> str | None:
    """None when impl can run here, else why not."""
    if impl != "eager" and not common.HAS_CUDA:
        return f"{impl} column needs CUDA" + (" (the kernels only run interpreted on CPU)" if impl == "fused" else "")
    return None


def run(sizes=("notes", "mid", "large"), dtypes=(torch.float32, torch.bfloat16), quick=False) -> list[dict]:
    rows = []
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
                for pass_ in ("fwd", "fwd+bwd"):
                    for impl in IMPLS:
                        label = f"{case:<14} {str(dtype):<15} {mode:<5} {pass_:<8} {impl:<8}"
                        why = available(impl)
                        if why:
                            print(f"{label} skipped: {why}")
                            continue
                        row = common.measure(
                            label, lambda: case_fn(impl, size, dtype, pass_, hard), bench="gumbel", impl=impl,
                            case=case, dtype=dtype, pass_=pass_, nbytes=traffic_bytes(size, dtype, pass_),
                            note=f"{mode} tau={TAU}", quick=quick)
                        if row:
                            rows.append(row)
    return rows


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
