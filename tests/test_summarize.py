"""benchmarks/summarize.py: the compact table's ratios and the scheduled-sampling / teacher-forcing
ratio of the training step, from a made-up results CSV (no GPU needed)."""
import csv
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("summarize", os.path.join(HERE, "..", "benchmarks", "summarize.py"))
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _row(impl, case, ms, bench="train_step", ts="2026-11-25T00:00:00+00:00"):
    return {"timestamp": ts, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6.0",
            "bench": bench, "impl": impl, "case": case, "dtype": "float32", "pass": "fwd+bwd+opt",
            "median_ms": str(ms), "note": "tokens_per_s=1"}


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=summarize.FIELDS, restval="")
        w.writeheader()
        w.writerows(rows)


def test_table_speedups_and_ss_over_tf(tmp_path):
    size = "B32_L10_T10_V10000_D256"
    rows = [_row("fused", f"{size}_teacher_forcing", 2.0), _row("reference", f"{size}_teacher_forcing", 5.0),
            _row("compile", f"{size}_teacher_forcing", 4.0), _row("fused", f"{size}_ss_gumbel_hard", 2.6),
            _row("fused", f"{size}_ss_gumbel", 3.4),
            _row("fused", f"{size}_teacher_forcing", 9.0, ts="2026-11-24T00:00:00+00:00")]  # older: ignored
    path = tmp_path / "r.csv"
    _write(path, rows)
    text = summarize.table(summarize.read_rows(str(path)))
    tf_line = next(ln for ln in text.splitlines() if ln.startswith("train_step") and "teacher_forcing" in ln)
    assert tf_line.split()[-2:] == ["2.50", "2.00"]  # x_eager = 5 / 2, x_comp = 4 / 2 (latest fused row)
    assert f"[ss/tf] fused      {size} float32: ss_gumbel_hard 1.30x, ss_gumbel 1.70x" in text
    # a graphed column: against its own teacher-forced step and against the plain fused one
    rows += [_row("fused_graphed", f"{size}_teacher_forcing", 1.0), _row("fused_graphed", f"{size}_ss_gumbel", 2.4)]
    _write(path, rows)
    text = summarize.table(summarize.read_rows(str(path)))
    assert f"[ss/tf] fused_graphed {size} float32: ss_gumbel 2.40x" in text
    assert f"[ss/tf] fused_graphed vs fused teacher forcing, {size} float32: ss_gumbel 1.20x" in text


def test_merge_appends_only_new_rows(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write(a, [_row("fused", "x_teacher_forcing", 1.0)])
    _write(b, [_row("fused", "x_teacher_forcing", 1.0), _row("fused", "x_ss_gumbel", 1.2)])
    assert summarize.merge(str(b), str(a)) == (1, 1)
    assert summarize.merge(str(b), str(a)) == (0, 2)
    assert len(summarize.read_rows(str(a))) == 2


OLD_FIELDS = [f for f in summarize.FIELDS if f != "check"]  # a CSV written before the check column


def _gumbel(impl, ps, ms, check="", dtype="float32"):
    return {"timestamp": "2026-11-25T00:00:00+00:00", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11",
            "triton": "3.6.0", "bench": "gumbel", "impl": impl, "case": "B256_V128000", "dtype": dtype,
            "pass": ps, "median_ms": str(ms), "note": "hard tau=0.5", "check": check}


def test_failed_check_is_marked_and_listed(tmp_path):
    rows = [_gumbel("fused", ps, 1.0, check) for ps, check in (("fwd", "FAIL index 3/256"), ("fwd+bwd", "FAIL index 3/256"))]
    rows += [_gumbel("eager", ps, 2.0) for ps in ("fwd", "fwd+bwd")]
    rows += [_gumbel("fused", "fwd", 1.0, "ok 0.31", dtype="bfloat16"), _gumbel("eager", "fwd", 2.0, dtype="bfloat16")]
    path = tmp_path / "r.csv"
    _write(path, rows)
    lines = summarize.table(summarize.read_rows(str(path))).splitlines()
    fused = [ln for ln in lines if ln.startswith("gumbel") and " fused " in ln]
    assert [ln.endswith(" !") for ln in fused] == [True, True, False]  # float32 fwd, fwd+bwd: failed; bf16 ok
    assert "[check] 1 ok, 1 failed (fused vs float64 oracle at the timed size)" in lines
    at = lines.index("CHECK FAILED (the timings above for these rows are of a wrong result):")
    assert lines[at + 1:] == ["  NVIDIA H100 80GB HBM3 | gumbel fused B256_V128000 hard tau=0.5 float32: FAIL index 3/256"]


def test_csv_without_check_column(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    with open(old, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=OLD_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows([_gumbel("fused", "fwd", 1.0), _gumbel("eager", "fwd", 2.0)])
    text = summarize.table(summarize.read_rows(str(old)))
    assert "!" not in text and "CHECK FAILED" not in text and "[check]" not in text
    assert next(ln for ln in text.splitlines() if " fused " in ln).split()[-1] == "2.00"  # x_eager
    # a merge into the old CSV gives it the new column; its old rows read as "no check ran"
    _write(new, [_gumbel("fused", "fwd", 0.5, "FAIL 5.2 y")])
    assert summarize.merge(str(new), str(old)) == (1, 0)
    with open(old, newline="") as f:
        assert next(csv.reader(f)) == OLD_FIELDS + ["check"]
    got = summarize.read_rows(str(old))
    assert [r["check"] for r in got] == ["", "", "FAIL 5.2 y"] and got[0]["median_ms"] == "1.0"


def test_host_share_of_graph_timed_rows(tmp_path):
    """A case timed as called and by graph replay: x_eager within each pass, and a [host] line per
    impl with the host's share of the wall time."""
    def op(impl, pass_, ms):
        return dict(_row(impl, "B32_V10000", ms, bench="gumbel"), **{"pass": pass_, "note": "hard tau=0.5"})

    rows = [op("fused", "fwd+bwd", 0.080), op("eager", "fwd+bwd", 0.100),
            op("fused", "fwd+bwd (g)", 0.010), op("eager", "fwd+bwd (g)", 0.040)]
    path = tmp_path / "r.csv"
    _write(path, rows)
    text = summarize.table(summarize.read_rows(str(path)))
    lines = [ln for ln in text.splitlines() if ln.startswith("gumbel")]
    assert [ln.split()[-1] for ln in lines] == ["1.25", "4.00"]  # x_eager: 0.100 / 0.080, 0.040 / 0.010 (no compile)
    assert "[host] gumbel B32_V10000 hard float32 fwd+bwd fused: wall 0.0800 ms, GPU 0.0100 ms (88% host)" in text
    assert "[host] gumbel B32_V10000 hard float32 fwd+bwd eager: wall 0.1000 ms, GPU 0.0400 ms (60% host)" in text
