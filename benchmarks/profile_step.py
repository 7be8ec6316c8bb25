"""Where a training step's time goes: kernels per step and GPU-busy time against wall time.

    python benchmarks/profile_step.py [--sizes notes,large] [--impls fused,fused_graphed]
                                      [--modes teacher_forcing,ss_gumbel_hard] [--dtypes float32] [--steps 3]

For issue 6's "a scheduled-sampling step costs at most 1.5x a teacher-forced one": a step whose GPU
is busy for much less than its wall time is host-bound (Python and launch overhead), and faster
kernels will not help it; one whose GPU is busy most of the time is bound by the kernels listed.
Per case it prints one line: wall ms per step (CUDA events, without the profiler), GPU-busy ms (the
union of the kernels' intervals, from torch.profiler), their ratio, kernels per step, and the
three kernels with the most time. Without CUDA it profiles the host only (no kernel columns).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import common  # noqa: E402


def _busy_ms(intervals) -> float:
    """Length of the union of (start, end) intervals in microseconds, as ms."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def profile_case(impl: str, size, mode: str, dtype, steps: int = 3) -> dict:
    """Wall time per step and the GPU kernels of ``steps`` profiled training steps."""
    ratio, sampling = {m[0]: m[1:] for m in bench_train.MODES}[mode]
    fn = bench_train.train_step_fn(impl, size, ratio, sampling, dtype)
    wall = common.time_fn(fn, warmup=3, rep=max(steps, 5))["median_ms"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if common.HAS_CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if common.HAS_CUDA:
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = collections.Counter()
    for e in kernels:
        per_name[e.name] += e.time_range.elapsed_us() / 1e3 / steps
    busy = _busy_ms((e.time_range.start, e.time_range.end) for e in kernels) / steps
    return {"impl": impl, "size": size[0], "mode": mode, "dtype": str(dtype).replace("torch.", ""),
            "wall_ms": wall, "busy_ms": busy if common.HAS_CUDA else None,
            "kernels": len(kernels) / steps if common.HAS_CUDA else None, "top": per_name.most_common(3)}


def line(r: dict) -> str:
    head = f"[profile] {r['impl']:<13} {r['size']:<5} {r['mode']:<15} {r['dtype']:<8} wall {r['wall_ms']:8.3f} ms"
    if r["busy_ms"] is None:
        return head + "  (no CUDA: host only)"
    top = ", ".join(f"{n[:40]} {ms:.3f}" for n, ms in r["top"])
    return (head + f"  GPU busy {r['busy_ms']:8.3f} ms ({r['busy_ms'] / r['wall_ms']:4.0%})  "
            f"{r['kernels']:6.0f} kernels/step  top: {top}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="notes,large" if common.HAS_CUDA else "notes")
    p.add_argument("--impls", default="fused,fused_graphed" if common.HAS_CUDA else "reference")
    p.add_argument("--modes", default="teacher_forcing,ss_gumbel_hard")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    sizes = {s[0]: s for s in bench_train.SIZES}
    modes = {m[0] for m in bench_train.MODES}
    for name, values, known in (("sizes", a.sizes, sizes), ("modes", a.modes, modes)):
        unknown = set(values.split(",")) - set(known)
        if unknown:
            p.error(f"--{name}: unknown {sorted(unknown)}; expected a comma list of {sorted(known)}")
    rows = []
    for size in a.sizes.split(","):
        for dtype in a.dtypes.split(","):
            for mode in a.modes.split(","):
                for impl in a.impls.split(","):
                    try:
                        r = profile_case(impl, sizes[size], mode, getattr(torch, dtype), a.steps)
                    except Exception as e:  # e.g. a failed capture: report, keep going
                        print(f"[profile] {impl} {size} {mode} {dtype} failed: {type(e).__name__}: {e}"[:300], flush=True)
                        continue
                    rows.append(r)
                    print(line(r), flush=True)
    return rows


if __name__ == "__main__":
    main()
