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

    python benchmarks/host_overhead.py --cuda [--n 500]

On a GPU machine, ``--cuda`` times the same calls with the real kernels on CUDA tensors (tiny, so
the GPU keeps up and a call's time is what the host spends issuing it; calls are queued, with one
synchronisation per round outside the timing), and splits a call's host time into its parts:
Triton's own launch (a kernel that does nothing, with 1 and with 28 arguments, as our kernels
have), our launcher (``fused_s2s.kernels.*`` without the autograd Function), and single PyTorch
ops for scale. Subtract the stubbed figures of the same machine to get the launches' share. A
third column times the fused calls again with ``FUSED_S2S_DIRECT_LAUNCH``'s path (session 13,
experimental: the compiled kernel launched without Triton's per-launch binder after its first
launch; kernels/_launch.py).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time

ON_CUDA = "--cuda" in sys.argv[1:]  # decided before triton is imported: it reads TRITON_INTERPRET then
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # kernels are interpreter objects, which stub_kernels replaces

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
                # the Gumbel forward's index output, found by name (positions move when arguments are added)
                params = list(inspect.signature(obj.fn).parameters)
                setattr(mod, name, _NoLaunch(tuple(params.index(p) for p in ("idx_ptr",) if p in params)))
                names.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return names


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def per_call_us(fn, n: int, rounds: int = 7) -> float:
    for _ in range(max(n // 10, 10)):
        fn()
    times = []
    for _ in range(rounds):
        _sync()  # the queue starts empty; within the round calls are only queued (tiny: the GPU keeps up)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    _sync()
    return min(times)  # noise (other processes, frequency) only ever adds time


def cases(device: str = "cpu"):
    """(name, fused fn, eager fn): tiny tensors, so the figures are host time, not arithmetic."""
    B, T, L, D, V = 4, 3, 5, 8, 12
    torch.manual_seed(0)
    r = functools.partial(torch.randn, device=device)
    logits = r(B, V, requires_grad=True)
    dy = r(B, V)
    q, H = r(B, D, requires_grad=True), r(B, L, D, requires_grad=True)
    qT, dctx, dctxT = r(B, T, D, requires_grad=True), r(B, D), r(B, T, D)
    lengths = torch.full((B,), L, device=device)

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


def launch_parts(device: str = "cuda"):
    """(name, fn): the parts of a fused call's host time on CUDA: Triton's launch of kernels that do
    nothing (1 and 28 arguments), our launchers without the autograd Function, PyTorch ops."""
    import triton
    import triton.language as tl

    from fused_s2s import philox
    from fused_s2s.kernels import attention as KA
    from fused_s2s.kernels import gumbel as KG

    @triton.jit
    def _nop1_kernel(X):
        pass

    @triton.jit
    def _nop28_kernel(X, Y, Z, W, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                      a16, a17, a18, a19, a20, a21, F: tl.constexpr, G: tl.constexpr):
        pass

    B, L, D, V = 4, 5, 8, 12
    x = torch.randn(B, V, device=device)
    q, H = torch.randn(B, 1, D, device=device), torch.randn(B, L, D, device=device)
    lengths = torch.full((B,), L, device=device)
    ints = list(range(3, 25))  # 22 ints: 16-divisibility and 1-specialisation vary, as strides do
    seed = philox.draw_seed(x.device)
    fwd = KA.attention_forward(q, H, None, lengths, for_backward=True)
    dc = torch.randn(B, 1, D, device=device)
    return [
        ("triton launch, empty kernel, 1 argument", lambda: _nop1_kernel[(1,)](x)),
        ("triton launch, empty kernel, 26 args + 2 constexpr", lambda: _nop28_kernel[(1,)](x, x, x, x, *ints, F=1, G=2)),
        ("launcher gumbel_fwd (no autograd)", lambda: KG.gumbel_fwd(x, 2.0, False, None, seed)),
        ("launcher attention_forward (no autograd)", lambda: KA.attention_forward(q, H, None, lengths, for_backward=True)),
        ("launcher attention_backward (no autograd)",
         lambda: KA.attention_backward(q, H, None, lengths, fwd[3], fwd[4], fwd[2], dc, None)),
        ("torch.empty (B, V)", lambda: torch.empty(B, V, device=device)),
        ("torch.randint seed (philox.draw_seed)", lambda: philox.draw_seed(x.device)),
        ("x.add_(1) (one PyTorch kernel)", lambda: x.add_(1.0)),
    ]


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
    p.add_argument("--cuda", action="store_true", help="real kernels on CUDA tensors, and the launch parts")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cuda:
        if not torch.cuda.is_available():
            p.error("--cuda needs a CUDA device (without it the kernels are stubbed: drop --cuda)")
        import triton
        print(f"real kernels on {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
              f"{triton.__version__}; host time per call (queued), best of 7 rounds")
        from fused_s2s.kernels import _launch

        # the third column: FUSED_S2S_DIRECT_LAUNCH's path (kernels._launch.DirectLauncher), switched
        # on here for that column only
        print(f"{'op':44s} {'fused':>18s} {'eager (PyTorch ops)':>20s} {'fused, direct launch':>22s}")
        for name, fused, eager in cases("cuda"):
            jit_us, eager_us = per_call_us(fused, a.n), per_call_us(eager, a.n)
            _launch.DIRECT_LAUNCH = True
            try:
                direct_us = per_call_us(fused, a.n)
            finally:
                _launch.DIRECT_LAUNCH = False
            print(f"{name:44s} {jit_us:15.1f} us {eager_us:17.1f} us {direct_us:19.1f} us")
        print("\nparts")
        for name, fn in launch_parts():
            print(f"{name:52s} {per_call_us(fn, a.n):10.1f} us")
        return 0
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
