"""Attention step (issue 4): fused Triton vs eager (bmm -> masked softmax -> bmm) vs torch.compile(eager).

    python benchmarks/bench_attention.py [--quick] [--sizes notes,large,long] [--dtypes float32,bfloat16]
    pytest benchmarks/bench_attention.py --benchmark-only

One decoder step as the model runs it: query (B, D) = s_t W_a, keys = values = H (B, L, D)
(``values=None``), lengths mask. "fwd" is the forward under no_grad; "fwd+bwd" is the forward with
grad plus the backward for a gradient on the context (the weights are returned, not differentiated).
Bandwidth counts the minimal traffic: fwd reads q, H and writes ctx, weights; the backward also
reads q, H, ctx, weights, dctx and writes dq, dH. Without CUDA the fused column is skipped (the
kernels run under the interpreter there: correct, not fast) and only the notes' size is timed.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (B, L, D); T = 1 (one decoder step)
SIZES = {"notes": (32, 10, 256), "large": (256, 512, 1024), "long": (8, 4096, 512)}
IMPLS = ("fused", "eager", "compile")


def _eager(query, keys, values=None, mask=None):
    from fused_s2s.reference import attention_eager

    return attention_eager(query, keys, values, mask)


_COMPILED = {}


def impl_fn(impl: str):
    """(query, keys, values, mask) -> (ctx, weights) for impl in IMPLS."""
    if impl == "fused":
        from fused_s2s.attention import attention_step

        return lambda q, k, v, m: attention_step(q, k, v, m, backend="triton")
    if impl == "eager":
        return _eager
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_eager)
    return _COMPILED["fn"]


def make_inputs(size: str, dtype, device, requires_grad=False):
    B, L, D = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, D, generator=g).to(device, dtype)
    H = (torch.randn(B, L, D, generator=g) / D ** 0.5).to(device, dtype)
    lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g).to(device)
    q.requires_grad_(requires_grad)
    H.requires_grad_(requires_grad)
    return q, H, lengths


def traffic_bytes(size: str, dtype, pass_: str) -> int:
    B, L, D = SIZES[size]
    e = torch.finfo(dtype).bits // 8
    fwd = B * D + B * L * D + B * D + B * L  # q, H in; ctx, weights out
    bwd = B * D + B * L * D + B * D + B * L + B * D + B * D + B * L * D  # q, H, ctx, w, dctx in; dq, dH out
    return e * (fwd if pass_ == "fwd" else fwd + bwd)


def case_fn(impl: str, size: str, dtype, pass_: str):
    dev = torch.device("cuda" if common.HAS_CUDA else "cpu")
    fn = impl_fn(impl)
    q, H, lengths = make_inputs(size, dtype, dev, requires_grad=pass_ != "fwd")
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, H, None, lengths)
        return run
    dctx = torch.randn(q.shape, device=dev, dtype=dtype)

    def run():
        ctx, _ = fn(q, H, None, lengths)
        return torch.autograd.grad(ctx, (q, H), dctx)
    return run


def available(impl: str) -> str | None:
    """None when impl can run here, else why not."""
    if impl == "fused" and not common.HAS_CUDA:
        return "fused column needs CUDA (the kernels only run interpreted on CPU)"
    return None


def run(sizes=("notes", "large", "long"), dtypes=(torch.float32, torch.bfloat16), quick=False) -> list[dict]:
    rows = []
    if not common.HAS_CUDA:
        print("bench_attention: no CUDA device: the fused column needs CUDA; timing eager and "
              "torch.compile(eager) at the notes' size only")
        sizes = ("notes",)
    for size in sizes:
        B, L, D = SIZES[size]
        for dtype in dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                for impl in IMPLS:
                    why = available(impl)
                    case = f"B{B}_L{L}_D{D}"
                    if why:
                        print(f"{case:<18} {str(dtype):<15} {pass_:<8} {impl:<8} skipped: {why}")
                        continue
                    row = common.measure(
                        f"{case:<18} {str(dtype):<15} {pass_:<8} {impl:<8}", lambda: case_fn(impl, size, dtype, pass_),
                        bench="attention", impl=impl, case=case, dtype=dtype, pass_=pass_,
                        nbytes=traffic_bytes(size, dtype, pass_), note="values=None lengths mask", quick=quick)
                    if row:
                        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    return common.main_for(run, SIZES, "notes,large,long", argv)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, dtype, pass_):
    why = available(impl)
    if why:
        pytest.skip(why)
    if not common.HAS_CUDA and dtype != torch.float32:
        pytest.skip("CPU: float32 only")
    benchmark(case_fn(impl, "notes", dtype, pass_))


if __name__ == "__main__":
    main()
