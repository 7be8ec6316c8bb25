"""Attention step (issue 4): fused Triton vs eager (bmm -> masked softmax -> bmm) vs torch.compile(eager).

    python benchmarks/bench_attention.py [--quick] [--sizes notes,large,long,tf] [--dtypes float32,bfloat16]
    pytest benchmarks/bench_attention.py --benchmark-only

One decoder step as the model runs it: query (B, D) = s_t W_a, keys = values = H (B, L, D)
(``values=None``), lengths mask; "tf" is teacher forcing, T = 50 queries per batch row at once
(query (B, T, D)), where "fused" runs the tiled tl.dot kernels and "fused_rows" the per-query-row
kernels (``tiled=False``) for comparison. "fwd" is the forward under no_grad; "fwd+bwd" is the forward with
grad plus the backward for a gradient on the context (the weights are returned, not differentiated).
Bandwidth counts the minimal traffic: fwd reads q, H and writes ctx, weights; the backward also
reads q, H, ctx, weights, dctx and writes dq, dH. Without CUDA the fused column is skipped (the
kernels run under the interpreter there: correct, not fast) and only the notes' size is timed.

Before a fused implementation is timed at a (size, dtype), ``check_fused`` runs it once on the same
inputs against a float64 oracle (``attention_eager`` on the inputs upcast to float64) and eager in
the same dtype, by SPEC section 5's rule: ctx, weights, and dq, dH for a random dctx (the weights
get no upstream gradient, as in the timed fwd+bwd case); the verdict goes in the rows' check column.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (B, T, L, D); T = 1: one decoder step (a (B, D) query); T > 1: teacher forcing
SIZES = {"notes": (32, 1, 10, 256), "large": (256, 1, 512, 1024), "long": (8, 1, 4096, 512),
         "tf": (128, 50, 50, 512)}
IMPLS = ("fused", "fused_rows", "eager", "compile")


def _eager(query, keys, values=None, mask=None):
    from fused_s2s.reference import attention_eager

    return attention_eager(query, keys, values, mask)


def impl_fn(impl: str):
    """(query, keys, values, mask) -> (ctx, weights) for impl in IMPLS."""
    if impl in ("fused", "fused_rows"):
        from fused_s2s.attention import attention_step

        tiled = None if impl == "fused" else False  # fused_rows: the per-row kernels even at T >= 16
        return lambda q, k, v, m: attention_step(q, k, v, m, backend="triton", tiled=tiled)
    if impl == "eager":
        return _eager
    return common.compile_fresh(_eager)


def make_inputs(size: str, dtype, device, requires_grad=False):
    B, T, L, D = SIZES[size]
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: H is 134M values at "large"
    q = torch.randn(*((B, D) if T == 1 else (B, T, D)), generator=g, device=device).to(dtype)
    H = (torch.randn(B, L, D, generator=g, device=device) / D ** 0.5).to(dtype)
    lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g, device=device)
    q.requires_grad_(requires_grad)
    H.requires_grad_(requires_grad)
    return q, H, lengths


def traffic_bytes(size: str, dtype, pass_: str) -> int:
    B, T, L, D = SIZES[size]
    e = torch.finfo(dtype).bits // 8
    R = B * T  # query rows
    fwd = R * D + B * L * D + R * D + R * L  # q, H in; ctx, weights out
    bwd = R * D + B * L * D + R * D + R * L + R * D + R * D + B * L * D  # q, H, ctx, w, dctx in; dq, dH out
    return e * (fwd if pass_ == "fwd" else fwd + bwd)


def case_fn(impl: str, size: str, dtype, pass_: str):
    dev = common.DEVICE
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


def check_fused(impl: str, size: str, dtype) -> common.Check:
    """impl ("fused" / "fused_rows") vs eager in dtype vs the float64 oracle on make_inputs(size):
    forward ctx, weights; backward dq, dH for a random dctx (no gradient on the weights)."""
    from fused_s2s.reference import attention_eager

    dev = common.DEVICE
    q, H, lengths = make_inputs(size, dtype, dev)  # the timed inputs
    dctx = torch.randn(q.shape, generator=torch.Generator(device=dev).manual_seed(1), device=dev).to(dtype)
    out = {}
    for name, fn, dt in (("fused", impl_fn(impl), dtype), ("eager", attention_eager, dtype),
                         ("oracle", attention_eager, torch.float64)):
        q_, H_ = (t.detach().to(dt, copy=True).requires_grad_() for t in (q, H))
        ctx, weights = fn(q_, H_, None, lengths)  # (B, [T,] D), (B, [T,] L)
        dq, dH = torch.autograd.grad(ctx, (q_, H_), dctx.to(dt))
        out[name] = (ctx.detach(), weights.detach(), dq, dH)
        del q_, H_, ctx, weights, dq, dH
    c = common.Check()
    for i, name in enumerate(("ctx", "weights", "dq", "dH")):
        c.oracle(name, out["fused"][i], out["eager"][i], out["oracle"][i])
    return c


def available(impl: str, size: str = "notes") -> str | None:
    """None when impl can run here, else why not."""
    if impl == "fused_rows" and SIZES[size][1] == 1:
        return "same kernels as fused at T = 1"
    if impl.startswith("fused") and not common.HAS_CUDA:
        return "fused column needs CUDA (the kernels only run interpreted on CPU)"
    return None


def run(sizes=("notes", "large", "long", "tf"), dtypes=(torch.float32, torch.bfloat16), quick=False) -> list[dict]:
    rows, graphed = [], []  # graphed: the fused and eager calls, timed again by graph replay
    if not common.HAS_CUDA:
        print("bench_attention: no CUDA device: the fused column needs CUDA; timing eager and "
              "torch.compile(eager) at the notes' size only")
        sizes = ("notes",)
    for size in sizes:
        B, T, L, D = SIZES[size]
        case = f"B{B}_L{L}_D{D}" if T == 1 else f"B{B}_T{T}_L{L}_D{D}"
        for dtype in dtypes:
            checks = {impl: common.run_check(f"{case:<18} {str(dtype):<15} {impl:<8}",
                                             lambda: check_fused(impl, size, dtype))
                      for impl in IMPLS if impl.startswith("fused") and not available(impl, size) and common.wanted(impl)}
            for pass_ in ("fwd", "fwd+bwd"):
                for impl in IMPLS:
                    why = available(impl, size)
                    if why:
                        print(f"{case:<18} {str(dtype):<15} {pass_:<8} {impl:<8} skipped: {why}")
                        continue
                    common.measure_into(
                        rows, graphed, check=checks.get(impl, ""), label=f"{case:<18} {str(dtype):<15} {pass_:<8} {impl:<8}",
                        make_fn=functools.partial(case_fn, impl, size, dtype, pass_), bench="attention",
                        impl=impl, case=case, dtype=dtype, pass_=pass_,
                        nbytes=traffic_bytes(size, dtype, pass_), note="values=None lengths mask", quick=quick)
    return rows + common.measure_graphed(graphed)


def main(argv=None) -> list[dict]:
    return common.main_for(run, SIZES, "notes,large,long,tf", argv)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, dtype, pass_):
    why = available(impl, "notes")
    if why:
        pytest.skip(why)
    if not common.HAS_CUDA and dtype != torch.float32:
        pytest.skip("CPU: float32 only")
    benchmark(case_fn(impl, "notes", dtype, pass_))


if __name__ == "__main__":
    main()
