"""Shared benchmark plumbing: timing with CUDA events, peak memory, bandwidth, one results CSV.

Every row carries the device name and the torch / triton versions so figures from different
cards are never mixed (SPEC section 6). Rows are appended to benchmarks/results/results.csv as
they are measured (a benchmark killed half-way keeps the rows it had), or to the file named by the
environment variable FUSED_S2S_RESULTS_CSV. FUSED_S2S_BENCH_IMPLS (a comma list, e.g. "fused,eager")
restricts which implementations are timed, so the GPU runbook can time the fused and eager columns
before the slow-to-compile torch.compile ones (benchmarks/gpu_session.sh).
"""
from __future__ import annotations

import csv
import datetime
import os
import statistics
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_CSV = os.path.join(RESULTS_DIR, "results.csv")
RESULTS_CSV_ENV = "FUSED_S2S_RESULTS_CSV"
IMPLS_ENV = "FUSED_S2S_BENCH_IMPLS"
FIELDS = ["timestamp", "device", "torch", "triton", "bench", "impl", "case", "dtype", "pass",
          "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "peak_bw_frac", "peak_mem_mb", "note"]

# Peak HBM bandwidth (GB/s) of the cards we report on; bandwidth fraction is left empty elsewhere.
PEAK_BW_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}

HAS_CUDA = torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else "cpu"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def peak_bandwidth() -> float | None:
    name = device_name()
    for key, bw in PEAK_BW_GBPS.items():
        if key in name:
            return bw
    return None


def time_fn(fn, *, warmup: int = 5, rep: int = 30) -> dict:
    """Median and 20/80% quantiles in ms; CUDA events on GPU, perf_counter on CPU. Also peak memory."""
    for _ in range(warmup):
        fn()
    times = []
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "peak_mem_mb": peak}


def make_row(bench: str, impl: str, case: str, dtype, pass_: str, timing: dict, nbytes: int | None = None,
             note: str = "") -> dict:
    gbps = (nbytes / (timing["median_ms"] * 1e-3) / 1e9) if nbytes else None
    peak = peak_bandwidth()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(), "torch": torch.__version__, "triton": triton_version(),
        "bench": bench, "impl": impl, "case": case, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
        "median_ms": round(timing["median_ms"], 5), "p20_ms": round(timing["p20_ms"], 5),
        "p80_ms": round(timing["p80_ms"], 5), "bytes": nbytes or "",
        "gbps": round(gbps, 1) if gbps else "", "peak_bw_frac": round(gbps / peak, 3) if gbps and peak else "",
        "peak_mem_mb": round(timing["peak_mem_mb"], 2), "note": note,
    }


def results_csv() -> str:
    """Where rows go: $FUSED_S2S_RESULTS_CSV, else benchmarks/results/results.csv."""
    return os.environ.get(RESULTS_CSV_ENV) or RESULTS_CSV


def wanted(impl: str) -> bool:
    """False when $FUSED_S2S_BENCH_IMPLS is set and does not list impl."""
    only = os.environ.get(IMPLS_ENV, "").strip()
    return not only or impl in {s.strip() for s in only.split(",")}


def append_rows(rows: list[dict], path: str | None = None) -> str:
    path = path or results_csv()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def measure(label: str, make_fn, *, bench: str, impl: str, case: str, dtype, pass_: str,
            nbytes: int | None = None, note: str = "", quick: bool = False) -> dict | None:
    """Build one case with ``make_fn()``, time it, print one line and append the row to the results
    CSV at once; the row, or None if it fails here or impl is not in $FUSED_S2S_BENCH_IMPLS."""
    if not wanted(impl):
        return None
    try:
        t = time_fn(make_fn(), warmup=3 if quick else 10, rep=5 if quick else 50)
    except Exception as e:  # e.g. torch.compile without a C++ toolchain: report, keep going
        print(f"{label} failed: {type(e).__name__}: {e}"[:300])
        return None
    row = make_row(bench, impl, case, dtype, pass_, t, nbytes, note=note)
    frac = f"{row['peak_bw_frac']:.0%} of peak" if row["peak_bw_frac"] != "" else ""
    print(f"{label} {t['median_ms']:9.4f} ms {row['gbps'] or 0:8.1f} GB/s peak {t['peak_mem_mb']:8.1f} MB {frac}",
          flush=True)
    append_rows([row])
    return row


def main_for(run, sizes: dict, default_sizes: str, argv=None) -> list[dict]:
    """The command line shared by the kernel benchmarks: --quick, --sizes, --dtypes; the rows (measure()
    has already appended each one to the results CSV)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--sizes", default=default_sizes, help=f"comma list of {list(sizes)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in a.dtypes.split(","))
    rows = run(tuple(a.sizes.split(",")), dtypes, a.quick)
    if rows:
        print(f"{len(rows)} rows appended to", results_csv())
    return rows
