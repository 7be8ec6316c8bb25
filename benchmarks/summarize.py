"""Compact table of a benchmark results CSV: one line per (bench, case, variant, dtype, pass) and
fused implementation, with the eager and torch.compile times beside it and the speed-ups
fused / eager and fused / compile (> 1: fused is faster); for the training step, each
scheduled-sampling mode's time over the teacher-forced step's. Stdlib only (runs without torch).

    python benchmarks/summarize.py [CSV]                # default: benchmarks/results/results.csv
    python benchmarks/summarize.py --merge DEVICE.csv   # append DEVICE.csv's new rows to results.csv, then show them
    python benchmarks/summarize.py CSV --device H100 --full

A CSV may hold several runs and devices: the table is per device (never mixing cards), and for each
(device, bench, impl, case, variant, dtype, pass) the latest row wins. The variant is the row's
note without its per-run figures (bench_gumbel's "soft tau=0.5" / "hard tau=0.5"; bench_train's
tokens_per_s is dropped), shown only when it differs within a bench.

The ``check`` column (bench_attention / bench_gumbel / bench_train: the fused implementation
against a float64 oracle at the timed size, see benchmarks/common.py) is shown as a "!" after a row whose check
failed or raised, and those rows are listed under "CHECK FAILED" at the end. CSVs written before
the column existed read as "no check ran".
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_CSV = os.path.join(HERE, "results", "results.csv")
# the results CSV's columns, in order (benchmarks/common.py writes these: one definition, here)
FIELDS = ["timestamp", "device", "torch", "triton", "bench", "impl", "case", "dtype", "pass",
          "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "peak_bw_frac", "peak_mem_mb", "note", "check"]
EAGER = ("eager", "reference")  # the eager baseline's name in bench_attention/bench_gumbel, bench_train
COMPILE = "compile"
# identity of a measurement (a merge skips a row whose identity is already in the target)
ROW_ID = ("timestamp", "device", "bench", "impl", "case", "dtype", "pass", "note", "median_ms")


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("bench")]


def ensure_header(path: str, fields: list[str]) -> list[str]:
    """The columns of the CSV at path, rewriting it first with the columns of ``fields`` it lacks
    appended (its rows get empty cells there), so rows with those columns can be appended."""
    with open(path, newline="") as f:
        have = next(csv.reader(f), None) or []
    missing = [c for c in fields if c not in have]
    if not have or not missing:
        return have or list(fields)
    header = have + missing
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return header


def check_failed(row: dict) -> bool:
    """The row's correctness check failed or raised (empty: no check ran)."""
    return (row.get("check") or "").startswith(("FAIL", "error"))


def variant(note: str) -> str:
    """The note without per-run figures such as tokens_per_s=1234."""
    return " ".join(t for t in (note or "").split() if not re.match(r"\w+_per_s=", t))


def _ms(row: dict | None) -> float | None:
    try:
        return float(row["median_ms"]) if row else None
    except (KeyError, TypeError, ValueError):
        return None


def _f(x, fmt: str) -> str:
    return "" if x is None or x == "" else format(float(x), fmt)


def table(rows: list[dict], device_filter: str = "", full: bool = False) -> str:
    """The compact table(s), one per device, as text."""
    out, failed = [], {}  # failed: (device, bench, impl, case, variant, dtype) -> check cell
    devices = list(dict.fromkeys(r.get("device", "?") for r in rows))
    for dev in devices:
        if device_filter and device_filter.lower() not in dev.lower():
            continue
        drows = [r for r in rows if r.get("device", "?") == dev]
        latest = {}  # the latest row per measurement key (timestamps are ISO: string order is time order)
        for r in sorted(drows, key=lambda r: r.get("timestamp", "")):
            latest[(r["bench"], r["impl"], r["case"], variant(r.get("note", "")), r["dtype"], r["pass"])] = r
        vers = sorted({(r.get("torch", ""), r.get("triton", "")) for r in drows})
        out.append(f"== {dev} | torch/triton {', '.join('/'.join(v) for v in vers)} | {len(latest)} measurements")
        shown_var = {b: len({k[3] for k in latest if k[0] == b}) > 1 for b in {k[0] for k in latest}}
        groups = {}  # (bench, case, variant, dtype, pass) -> {impl: row}, in first-seen order
        for (b, impl, case, var, dt, ps), r in latest.items():
            groups.setdefault((b, case, var, dt, ps), {})[impl] = r
        cw = min(44, max([4] + [len(c) + (len(v.split()[0]) + 1 if shown_var.get(b) and v else 0)
                               for b, c, v, _, _ in groups]))  # case column width
        head = (f"{'bench':<10} {'case':<{cw}} {'dtype':<8} {'pass':<11} {'impl':<13} {'ms':>9} "
                f"{'eager_ms':>9} {'comp_ms':>9} {'GB/s':>7} {'%peak':>5} {'x_eager':>7} {'x_comp':>6}")
        out.append(head)
        for (b, case, var, dt, ps), by_impl in groups.items():
            eager = next((by_impl[e] for e in EAGER if e in by_impl), None)
            comp = by_impl.get(COMPILE)
            label = case + (f" {var.split()[0]}" if shown_var.get(b) and var else "")
            fused = [i for i in by_impl if i.startswith("fused")]
            # full: every impl on its own line; compact: the fused ones (or the baseline when none ran)
            impls = list(by_impl) if full else (fused or [next(iter(by_impl))])
            for impl in impls:
                r = by_impl[impl]
                ms, e_ms, c_ms = _ms(r), _ms(eager), _ms(comp)
                x_e = e_ms / ms if ms and e_ms and impl.startswith("fused") else None
                x_c = c_ms / ms if ms and c_ms and impl.startswith("fused") else None
                frac = r.get("peak_bw_frac", "")
                out.append(
                    f"{b[:10]:<10} {label[:cw]:<{cw}} {dt[:8]:<8} {ps[:11]:<11} {impl[:13]:<13} {_f(ms, '9.4f'):>9} "
                    f"{_f(e_ms, '9.4f'):>9} {_f(c_ms, '9.4f'):>9} {_f(r.get('gbps', ''), '7.0f'):>7} "
                    f"{_f(float(frac) * 100 if frac not in ('', None) else None, '5.0f'):>5} "
                    f"{_f(x_e, '7.2f'):>7} {_f(x_c, '6.2f'):>6}" + (" !" if check_failed(r) else ""))
        out += ss_over_tf(latest)
        out += host_share(latest)
        for (b, impl, case, var, dt, _ps), r in latest.items():
            if check_failed(r):  # one entry per check: its fwd and fwd+bwd rows share it
                failed[(dev, b, impl, case, var, dt)] = r["check"]
        checked = {k[:5] + (r.get("check", ""),) for k, r in latest.items() if r.get("check")}
        if checked:
            n_bad = sum(check_failed({"check": c[-1]}) for c in checked)
            out.append(f"[check] {len(checked) - n_bad} ok, {n_bad} failed (fused vs float64 oracle at the timed size)")
    if failed:
        out.append("CHECK FAILED (the timings above for these rows are of a wrong result):")
        out += [f"  {dev} | {b} {impl} {case}{' ' + var if var else ''} {dt}: {cell}"
                for (dev, b, impl, case, var, dt), cell in failed.items()]
    return "\n".join(out) if out else "(no rows)"


TF_MODE = "teacher_forcing"  # bench_train's case names end in _<mode>: teacher_forcing, ss_gumbel_hard, ...
SS_TARGET = 1.5  # issue 6: a scheduled-sampling training step costs at most 1.5x a teacher-forced one


def ss_over_tf(latest: dict) -> list[str]:
    """Per (impl, size, dtype) of the train_step bench: each scheduled-sampling mode's time over the
    teacher-forced step's, against the target."""
    by = {}  # (impl, size, dtype) -> {mode: ms}
    for (b, impl, case, _var, dt, _ps), r in latest.items():
        if b != "train_step" or "_" not in case:
            continue
        m = re.match(r"(.*?)_(teacher_forcing|ss_\w+)$", case)
        if m and _ms(r):
            by.setdefault((impl, m[1], dt), {})[m[2]] = _ms(r)
    def over(modes: dict, tf) -> str:  # "ss_x 1.30x, ss_y 1.70x": each scheduled-sampling mode / tf
        return ", ".join(f"{mode} {ms / tf:.2f}x" for mode, ms in modes.items() if mode != TF_MODE) if tf else ""

    own, cross = [], []
    for (impl, size, dt), modes in by.items():
        if over(modes, modes.get(TF_MODE)):
            own.append(f"[ss/tf] {impl:<10} {size} {dt}: {over(modes, modes.get(TF_MODE))} (target <= {SS_TARGET}x)")
        # a graphed scheduled-sampling step against the plain fused teacher-forced one: what a user who
        # graphs only the step loop (teacher forcing needs no graph to be launch-light) gets
        plain_tf = by.get(("fused", size, dt), {}).get(TF_MODE)
        if impl != "fused" and impl.startswith("fused") and over(modes, plain_tf):
            cross.append(f"[ss/tf] {impl} vs fused teacher forcing, {size} {dt}: {over(modes, plain_tf)}")
    return own + cross


GRAPH_SUFFIX = " (g)"  # benchmarks/common.py: the pass of a row timed by CUDA-graph replay


def host_share(latest: dict) -> list[str]:
    """For each case timed both as called and by graph replay: each impl's wall time, GPU time and
    the host's share of the wall time (1 - GPU / wall), the part a faster kernel cannot win back."""
    lines = []
    for (b, impl, case, var, dt, ps), g in latest.items():
        if not ps.endswith(GRAPH_SUFFIX):
            continue
        wall = latest.get((b, impl, case, var, dt, ps[: -len(GRAPH_SUFFIX)]))
        w_ms, g_ms = _ms(wall), _ms(g)
        if w_ms and g_ms:
            label = f"{b} {case}{' ' + var.split()[0] if var else ''} {dt} {ps[: -len(GRAPH_SUFFIX)]}"
            lines.append(f"[host] {label} {impl}: wall {w_ms:.4f} ms, GPU {g_ms:.4f} ms "
                         f"({max(0.0, 1 - g_ms / w_ms):.0%} host)")
    return lines


def merge(src: str, dst: str = RESULTS_CSV) -> tuple[int, int]:
    """Append src's rows that dst lacks to dst (columns FIELDS); (added, skipped as duplicates)."""
    have = {tuple(r.get(k, "") for k in ROW_ID) for r in read_rows(dst)}
    new = [r for r in read_rows(src) if tuple(r.get(k, "") for k in ROW_ID) not in have]
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    write_header = not os.path.exists(dst) or os.path.getsize(dst) == 0
    fields = FIELDS  # dst's own header if it has one, with the columns it lacks added
    if not write_header:
        fields = ensure_header(dst, FIELDS)
    with open(dst, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        if write_header:
            w.writeheader()
        w.writerows(new)
    return len(new), len(read_rows(src)) - len(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default=None, help="results CSV to show (default: results/results.csv)")
    p.add_argument("--merge", metavar="FILE", help="append FILE's new rows to --into, then show FILE's rows")
    p.add_argument("--into", default=RESULTS_CSV, help="merge target (default: benchmarks/results/results.csv)")
    p.add_argument("--device", default="", help="only devices whose name contains this")
    p.add_argument("--full", action="store_true", help="one line per implementation, not only the fused ones")
    a = p.parse_args(argv)
    if a.merge:
        if not read_rows(a.merge):
            print(f"{a.merge}: no rows", file=sys.stderr)
            return 1
        added, dup = merge(a.merge, a.into)
        print(f"merged {added} new rows from {a.merge} into {a.into} ({dup} already there)")
    path = a.merge or a.csv or RESULTS_CSV
    rows = read_rows(path)
    if not rows:
        print(f"{path}: no rows")
        return 1
    print(table(rows, a.device, a.full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
