"""Shared benchmark plumbing: timing with CUDA events, peak memory, bandwidth, one results CSV.

Every row carries the device name and the torch / triton versions so figures from different
cards are never mixed (SPEC section 6). Rows are appended to benchmarks/results/results.csv as
they are measured (a benchmark killed half-way keeps the rows it had), or to the file named by the
environment variable FUSED_S2S_RESULTS_CSV. FUSED_S2S_BENCH_IMPLS (a comma list, e.g. "fused,eager")
restricts which implementations are timed, so the GPU runbook can time the fused and eager columns
before the slow-to-compile torch.compile ones (benchmarks/gpu_session.sh).

Correctness at the timed size: before timing a fused implementation, bench_attention,
bench_gumbel and bench_train run one forward + backward of it on the timed inputs against a float64 oracle and
eager PyTorch in the same dtype (``Check``, SPEC section 5's criterion from tests/helpers.py) and
record the verdict in the row's ``check`` column: "ok 0.31" (worst err / bound), "FAIL 5.2 dq"
(the failing quantities), "error: <Type>" when the check itself raised; empty when no check ran.
"""
from __future__ import annotations

import csv
import datetime
import importlib.util
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summarize  # noqa: E402  (stdlib only: the CSV's columns are defined once, there)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_CSV = os.path.join(RESULTS_DIR, "results.csv")
RESULTS_CSV_ENV = "FUSED_S2S_RESULTS_CSV"
IMPLS_ENV = "FUSED_S2S_BENCH_IMPLS"
FIELDS = summarize.FIELDS

# Peak HBM bandwidth (GB/s) of the cards we report on; bandwidth fraction is left empty elsewhere.
PEAK_BW_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # where every benchmark runs


def sweep_args(prog: str, doc: str, argv, *, seconds: float, sizes: str, dtypes: str):
    """The kernel sweeps' (sweep_attention / sweep_gumbel) command line: --seconds, --sizes,
    --dtypes with these defaults, --stages-only (the launcher's config and its loops' num_stages
    alternatives, nothing else) and --device. None, after saying so, without CUDA (a sweep times
    kernels). ``--device cpu`` runs the sweep under Triton's interpreter (TRITON_INTERPRET=1): a
    smoke test of the script (tests/test_sweeps.py, size "tiny"), its times meaningless."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--seconds", type=float, default=seconds)
    p.add_argument("--sizes", default=sizes)
    p.add_argument("--dtypes", default=dtypes)
    p.add_argument("--stages-only", action="store_true",
                   help="only the launcher's config at each num_stages (software pipelining depth)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: under TRITON_INTERPRET=1, to check the script itself (times meaningless)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not HAS_CUDA:
        print(f"{prog}: needs CUDA", file=sys.stderr)
        return None
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("--device cpu runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    return a


def kernel_ms(fn, device) -> float:
    """A sweep's kernel time (ms): ``triton.testing.do_bench`` (L2 flushed, median) on CUDA; on the
    CPU (interpreter smoke runs) one timed call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def compile_fresh(fn):
    """torch.compile(fn) with static shapes after torch._dynamo.reset(): each benchmark case gets its
    own compile. One compiled function shared by every size, dtype and pass would go dynamic-shape
    after the second shape and, past dynamo's recompile limit (8), fall back to eager silently."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


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
    """Median and 20/80% quantiles in ms; CUDA events on GPU, perf_counter on CPU. Also peak memory.

    On a GPU the calls are queued back to back, one pair of events around each, and synchronised
    once at the end (as triton.testing.do_bench and a training loop do): a call's time is then its
    GPU time when the GPU is the bottleneck, and its host issue time when the host is (the GPU
    waits between the events). Rows before 2026-11-26T10:00Z synchronised after every call, which
    added the host's issue latency to every call at every size."""
    for _ in range(warmup):
        fn()
    times = []
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "peak_mem_mb": peak}


def time_graphed(fn, *, warmup: int = 3, rep: int = 20, per: int = 10) -> dict:
    """GPU time per call with the host out of the way: ``fn`` captured once in a CUDA graph and
    replayed ``per`` times between two events, ``rep`` times (CUDA only).

    At small sizes a call's wall time (``time_fn``) is the host's issuing time: Python, dispatch,
    launches. This is what the kernels themselves take, for every impl alike (each one's own
    kernels, replayed). Rows timed so carry the pass name with " (g)" (GRAPH_SUFFIX).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS handles) off the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per)
    del graph
    q = statistics.quantiles(times, n=5)
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "peak_mem_mb": float("nan")}


GRAPH_SUFFIX = summarize.GRAPH_SUFFIX  # pass names of rows timed by graph replay: "fwd (g)", "fwd+bwd (g)"


GRAPH_IMPLS = ("fused", "eager")  # what the op benchmarks also time by graph replay, at every size


def measure_into(rows: list[dict], graphed: list[dict], check: str = "", **call) -> None:
    """``measure(**call)`` with its row appended to ``rows``; the call kept in ``graphed`` (for
    ``measure_graphed``, run last) when its impl is one of GRAPH_IMPLS: at every size the kernels'
    GPU time next to the call's wall time."""
    row = measure(**call, check=check)
    if row:
        rows.append(row)
    if call["impl"] in GRAPH_IMPLS:
        graphed.append(call)


def measure_graphed(calls: list[dict]) -> list[dict]:
    """``measure`` again for each recorded call (its keyword arguments; ``make_fn`` must bind its
    case, not close over loop variables), timed by CUDA-graph replay: GPU time where a call's wall
    time is mostly the host's. Benchmarks run it last, so a time limit cuts these rows first."""
    rows = []
    if HAS_CUDA:
        for kw in calls:
            row = measure(**dict(kw, check="", graph=True))
            if row:
                rows.append(row)
    return rows


def make_row(bench: str, impl: str, case: str, dtype, pass_: str, timing: dict, nbytes: int | None = None,
             note: str = "", check: str = "") -> dict:
    gbps = (nbytes / (timing["median_ms"] * 1e-3) / 1e9) if nbytes else None
    peak = peak_bandwidth()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(), "torch": torch.__version__, "triton": triton_version(),
        "bench": bench, "impl": impl, "case": case, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
        "median_ms": round(timing["median_ms"], 5), "p20_ms": round(timing["p20_ms"], 5),
        "p80_ms": round(timing["p80_ms"], 5), "bytes": nbytes or "",
        "gbps": round(gbps, 1) if gbps else "", "peak_bw_frac": round(gbps / peak, 3) if gbps and peak else "",
        "peak_mem_mb": round(timing["peak_mem_mb"], 2), "note": note, "check": check,
    }


def results_csv() -> str:
    """Where rows go: $FUSED_S2S_RESULTS_CSV, else benchmarks/results/results.csv."""
    return os.environ.get(RESULTS_CSV_ENV) or RESULTS_CSV


def wanted(impl: str, default: bool = True) -> bool:
    """Whether $FUSED_S2S_BENCH_IMPLS lists impl; ``default`` when it is not set (False: opt-in impls)."""
    only = os.environ.get(IMPLS_ENV, "").strip()
    return default if not only else impl in {s.strip() for s in only.split(",")}


def append_rows(rows: list[dict], path: str | None = None) -> str:
    path = path or results_csv()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    # a CSV written before a column was added gets the new header (its old rows an empty cell)
    fields = FIELDS if new else summarize.ensure_header(path, FIELDS)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def measure(label: str, make_fn, *, bench: str, impl: str, case: str, dtype, pass_: str,
            nbytes: int | None = None, note: str = "", quick: bool = False, check: str = "",
            graph: bool = False) -> dict | None:
    """Build one case with ``make_fn()``, time it, print one line and append the row to the results
    CSV at once; the row, or None if it fails here or impl is not in $FUSED_S2S_BENCH_IMPLS.
    ``check``: the verdict of the correctness check of this impl at this size (``run_check``).
    ``graph``: GPU time by graph replay (``time_graphed``), the pass named with GRAPH_SUFFIX."""
    if not wanted(impl):
        return None
    try:
        if graph:
            pass_ += GRAPH_SUFFIX
            label += GRAPH_SUFFIX
            t = time_graphed(make_fn(), rep=5 if quick else 20)
        else:
            t = time_fn(make_fn(), warmup=3 if quick else 10, rep=5 if quick else 50)
    except Exception as e:  # e.g. torch.compile without a C++ toolchain: report, keep going
        print(f"{label} failed: {type(e).__name__}: {e}"[:300])
        return None
    row = make_row(bench, impl, case, dtype, pass_, t, nbytes, note=note, check=check)
    frac = f"{row['peak_bw_frac']:.0%} of peak" if row["peak_bw_frac"] != "" else ""
    print(f"{label} {t['median_ms']:9.4f} ms {row['gbps'] or 0:8.1f} GB/s peak {t['peak_mem_mb']:8.1f} MB {frac}",
          flush=True)
    append_rows([row])
    return row


# ------------------------------------------------------------------------------------------------
# Correctness check of a fused implementation at the timed size
# ------------------------------------------------------------------------------------------------
def _load_helpers():
    """tests/helpers.py, loaded by path (tests/ is not a package): the one implementation of SPEC
    section 5's criterion, shared with every test."""
    name = "fused_s2s_test_helpers"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


class Check:
    """The quantities of one check: each compared with the float64 oracle by SPEC section 5's rule
    (max|fused - oracle| <= 4 x max|eager - oracle| + atol; ratio = err / bound, ok when <= 1),
    or a count of bad elements (e.g. sampled indices that differ from the oracle's)."""

    def __init__(self):
        self.items = []  # (name, ratio err / bound or None for a count, ok, short text, detail)

    def oracle(self, name: str, actual, eager, oracle) -> None:
        err, bound, message = _load_helpers().oracle_check(actual, eager, oracle, name=name)
        ratio = err / bound if bound > 0 else math.inf
        self.items.append((name, ratio, message is None, name, message or f"{name} {err:.2e} <= {bound:.2e}"))

    def count(self, name: str, bad: int, total: int, detail: str = "") -> None:
        short = f"{name} {bad}/{total}"
        self.items.append((name, None, bad == 0, short, short + (f" {detail}" if detail else "")))

    def cell(self) -> str:
        """The results CSV's check cell: "ok 0.31", "FAIL 5.2 dq,dH", "FAIL index 3/256"."""
        ratios = [r for _, r, _, _, _ in self.items if r is not None]
        worst = f"{max(ratios):.2g}" if ratios else ""
        bad_ratio = [n for n, r, ok, _, _ in self.items if not ok and r is not None]
        bad_count = [s for _, r, ok, s, _ in self.items if not ok and r is None]
        if not bad_ratio and not bad_count:
            return f"ok {worst}".strip()
        return " ".join(["FAIL"] + ([worst, ",".join(bad_ratio)] if bad_ratio else []) + bad_count)

    def details(self) -> str:
        return "; ".join(d for _, _, _, _, d in self.items)


def run_check(label: str, fn) -> str:
    """Run ``fn() -> Check`` once, print one line, free what it allocated; the check cell.
    A check that raises is recorded as "error: <Type>" and the benchmark goes on."""
    try:
        c = fn()
        cell, detail = c.cell(), c.details()
    except Exception as e:  # e.g. out of memory or a kernel launch error at this size
        cell, detail = f"error: {type(e).__name__}", str(e)[:300]
    if HAS_CUDA:  # the check's tensors are gone (locals of fn): do not count them in the timed peaks
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # a sticky CUDA error: the timing that follows will say so too
            detail += f"; then {type(e).__name__}"
    print(f"{label} check: {cell} ({detail})"[:600], flush=True)
    return cell


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
