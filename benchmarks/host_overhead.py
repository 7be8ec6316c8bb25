"""Host time per call of the fused ops, kernels stubbed out: what Python costs around each launch.

    python benchmarks/host_overhead.py [--n 3000]

At the notes' sizes (B 32, V 10,000; B 32, L 10, D 256) a GPU runs each fused kernel in a few
microseconds, so a call costs what the host spends issuing it: argument checks, views, output
allocation, the autograd Function, the launcher's configuration choice and Triton's launch. Eager
PyTorch pays one dispatch per op instead. This script measures the Python side on any machine (no
GPU): it replaces every Triton kernel of fused_s2s.kernels with a no-op (the interpreter's kernel
objects, so TRITON_INTERPRET=1 is set here), times fused calls on tiny tensors and, for scale, the
eager ops they replace. Triton's own launch (binding ~25 arguments, a cache lookup, the driver
call) is not in the fused figures: on a GPU it adds a few microseconds per kernel.

A second table times a fused training pass of a tiny model per decoder step: teacher forcing
runs the target at once, scheduled sampling steps through it, and on a GPU that per-step host
time is what a CUDA graph (fused_s2s.graphs) takes away.

Figures are per call in microseconds, the best of 7 rounds (noise only adds), printed only (no
CSV: no GPU, no card).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are interpreter objects

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fused_s2s  # noqa: E402
from fused_s2s import reference  # noqa: E402


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` does nothing (outputs keep whatever
    torch.empty gave them), except ``zero`` arguments (by position), zeroed so they stay valid
    (the Gumbel forward's sampled index, which the model gathers embedding rows with)."""

    def __init__(self, zero=()):
        self.zero = zero

    def __getitem__(self, grid):
        def launch(*args, **meta):
            for i in self.zero:
                args[i].zero_()
        return launch


def stub_kernels() -> list[str]:
    """Replace every Triton kernel in fused_s2s.kernels' modules with _NoLaunch; their names."""
    from triton.runtime.interpreter import InterpretedFunction

    import fused_s2s.kernels.attention as a
    import fused_s2s.kernels.attention_tiled as at
    import fused_s2s.kernels.attention_tiled_wide as aw
    import fused_s2s.kernels.gumbel as g

    names = []
    for mod in (a, at, aw, g):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, InterpretedFunction) and name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch((4,) if name == "_gumbel_fwd_kernel" else ()))
                names.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return names


def per_call_us(fn, n: int, rounds: int = 7) -> float:
    for _ in range(max(n // 10, 10)):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)  # noise (other processes, frequency) only ever adds time


def cases():
    """(name, fused fn, eager fn): tiny tensors, so the figures are host time, not arithmetic."""
    B, T, L, D, V = 4, 3, 5, 8, 12
    logits = torch.randn(B, V, requires_grad=True)
    dy = torch.randn(B, V)
    q, H = torch.randn(B, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True)
    qT, dctx, dctxT = torch.randn(B, T, D, requires_grad=True), torch.randn(B, D), torch.randn(B, T, D)
    lengths = torch.full((B,), L)

    def timed(out, inputs, g, bwd):
        """A call of ``out()`` (the op's first output): under no_grad, or with its gradient."""
        def fn():
            if bwd:
                torch.autograd.grad(out(), inputs, g)
            else:
                with torch.no_grad():
                    out()
        return fn

    def gs(op, hard, bwd):
        return timed(lambda: op(logits, 0.5, hard), logits, dy, bwd)

    def att(op, query, dc, bwd):
        return timed(lambda: op(query, H, None, lengths)[0], (query, H), dc, bwd)

    fused_gs = functools.partial(fused_s2s.gumbel_softmax, backend="triton")
    fused_att = functools.partial(fused_s2s.attention_step, backend="triton")
    for hard in (False, True):
        for bwd in (False, True):
            name = f"gumbel_softmax {'hard' if hard else 'soft'} {'fwd+bwd' if bwd else 'fwd'}"
            yield name, gs(fused_gs, hard, bwd), gs(F.gumbel_softmax, hard, bwd)
    # the index alone (no_grad, as generation calls it); eager: the usual categorical draw
    yield ("gumbel_sample index fwd", timed(lambda: fused_s2s.gumbel_sample(logits, backend="triton"), logits, None, False),
           timed(lambda: torch.multinomial(torch.softmax(logits, -1), 1), logits, None, False))
    for label, query, dc in (("one step (B, D)", q, dctx), ("T queries (B, T, D)", qT, dctxT)):
        for bwd in (False, True):
            yield (f"attention_step {label} {'fwd+bwd' if bwd else 'fwd'}", att(fused_att, query, dc, bwd),
                   att(reference.attention_eager, query, dc, bwd))


def step_loop_us(n: int) -> list[tuple[str, float, float]]:
    """Host time of a fused training pass (forward + loss + backward) per decoder step: the pass at
    T = 20 minus the pass at T = 10, over 10 (tiny model, kernels stubbed). Teacher forcing runs
    the whole target at once (no per-step cost); scheduled sampling runs the step loop."""
    from fused_s2s.model import Seq2Seq

    torch.manual_seed(0)
    B, L, V, D = 4, 7, 50, 16
    model = Seq2Seq(30, V, D, backend="triton")
    src, lengths = torch.randint(3, 30, (B, L)), torch.full((B,), L)
    rows = []
    for ratio, sampling in ((1.0, "argmax"), (0.5, "gumbel_hard"), (0.5, "gumbel")):
        per_pass = []
        for T in (10, 20):
            tgt = torch.randint(3, V, (B, T + 1))
            per_pass.append(per_call_us(lambda: model(src, lengths, tgt, ratio, sampling).loss.backward(), n))
        rows.append((f"{sampling} ratio {ratio}", per_pass[0], (per_pass[1] - per_pass[0]) / 10))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="calls per round")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    stubbed = stub_kernels()
    print(f"kernels stubbed: {len(stubbed)}; torch {torch.__version__}; per call, best of 7 rounds")
    print(f"{'op':44s} {'fused (no launch)':>18s} {'eager (PyTorch ops)':>20s}")
    for name, fused, eager in cases():
        print(f"{name:44s} {per_call_us(fused, a.n):15.1f} us {per_call_us(eager, a.n):17.1f} us")
    print(f"\nfused training pass (B 4, D 16, V 50), kernels stubbed {'pass at T=10':>18s} {'per step':>10s}")
    for name, t10, per_step in step_loop_us(max(a.n // 100, 3)):
        print(f"{name:44s} {t10 / 1e3:15.2f} ms {per_step:10.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
