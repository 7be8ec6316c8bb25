"""The benchmarks' correctness checks (benchmarks/bench_attention.py and bench_gumbel.py
``check_fused``): ok for the real kernels at tiny sizes (interpreter on CPU), FAIL when the fused
result is made wrong, "error: <Type>" when the check raises; the check cell's format."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import bench_attention  # noqa: E402
import bench_gumbel  # noqa: E402
import common  # noqa: E402

# odd tiny shapes: (B, T, L, D), T = 1 one decoder step, T = 17 the tiled kernels (T >= 16)
ATT_STEP, ATT_TF = (3, 1, 7, 20), (2, 17, 9, 16)
GUMBEL = (5, 37)  # (B, V)


def _cell_ok(c):
    cell = c.cell()
    assert cell.startswith("ok "), f"{cell}: {c.details()}"
    assert 0 <= float(cell.split()[1]) <= 1


@pytest.mark.kernels
@pytest.mark.parametrize("impl, shape, dtype", [
    ("fused", ATT_STEP, torch.float32), ("fused", ATT_STEP, torch.bfloat16),
    ("fused", ATT_TF, torch.float32), ("fused_rows", ATT_TF, torch.float32)], ids=str)
def test_attention_check_ok(monkeypatch, impl, shape, dtype):
    monkeypatch.setitem(bench_attention.SIZES, "tiny", shape)
    c = bench_attention.check_fused(impl, "tiny", dtype)
    assert [it[0] for it in c.items] == ["ctx", "weights", "dq", "dH"]
    _cell_ok(c)


@pytest.mark.kernels
def test_attention_check_fails_on_wrong_ctx(monkeypatch):
    monkeypatch.setitem(bench_attention.SIZES, "tiny", ATT_STEP)
    real = bench_attention.impl_fn

    def wrong(impl):  # feature 0 of the fused ctx off by 1e-3; gradients untouched
        fn = real(impl)
        if impl != "fused":
            return fn

        def call(q, k, v, m):
            ctx, w = fn(q, k, v, m)
            return ctx + torch.zeros_like(ctx).index_fill_(-1, torch.tensor([0], device=ctx.device), 1e-3), w
        return call

    monkeypatch.setattr(bench_attention, "impl_fn", wrong)
    cell = bench_attention.check_fused("fused", "tiny", torch.float32).cell()
    assert cell.startswith("FAIL ") and cell.split()[2] == "ctx", cell
    assert float(cell.split()[1]) > 1


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gumbel_check_ok(monkeypatch, dtype, hard):
    monkeypatch.setitem(bench_gumbel.SIZES, "tiny", GUMBEL)
    c = bench_gumbel.check_fused("tiny", dtype, hard)
    assert [it[0] for it in c.items] == (["index", "onehot", "dlogits"] if hard else ["y", "dlogits"])
    _cell_ok(c)


def _patch_fused(monkeypatch, change):
    """bench_gumbel's fused call, its (y, index) passed through change(y, index)."""
    real = bench_gumbel.gumbel_call

    def call(x, hard, backend, generator):
        y, idx = real(x, hard, backend, generator)
        return change(y, idx) if backend == "triton" else (y, idx)
    monkeypatch.setattr(bench_gumbel, "gumbel_call", call)


@pytest.mark.kernels
def test_gumbel_check_fails_on_other_sample(monkeypatch):
    monkeypatch.setitem(bench_gumbel.SIZES, "tiny", GUMBEL)
    V = GUMBEL[1]

    def other_sample(y, idx):  # the next column's one-hot, consistent with its index; soft gradient kept
        idx = (idx + 1) % V
        return torch.zeros_like(y).scatter_(1, idx[:, None], 1.0) + (y - y.detach()), idx
    _patch_fused(monkeypatch, other_sample)
    c = bench_gumbel.check_fused("tiny", torch.float32, True)
    assert c.cell() == f"FAIL index {GUMBEL[0]}/{GUMBEL[0]}", c.details()


@pytest.mark.kernels
def test_gumbel_check_fails_on_wrong_soft_y(monkeypatch):
    monkeypatch.setitem(bench_gumbel.SIZES, "tiny", GUMBEL)
    _patch_fused(monkeypatch, lambda y, idx: (y * (1 + 1e-4), idx))  # also scales dlogits
    cell = bench_gumbel.check_fused("tiny", torch.float32, False).cell()
    assert cell.startswith("FAIL ") and cell.split()[2] == "y,dlogits", cell


def test_gumbel_near_tie_is_tolerated(monkeypatch):
    """Row 0's logits built so that columns 3 and 8 tie after the noise (float64) and column 11 is
    1e-3 below them: a sample of 3 or 8 is a near-tie, not a failure; 11 or 5 is a failure. Eager
    stands in for the kernels: this tests the check's index rule, not a kernel."""
    from fused_s2s import philox

    B, V = GUMBEL
    monkeypatch.setitem(bench_gumbel.SIZES, "tiny", GUMBEL)
    seed = philox.draw_seed("cpu", torch.Generator().manual_seed(bench_gumbel.CHECK_SEED))
    g = philox.gumbel_noise(seed, (B, V)).double()  # the noise every backend draws in the check
    real_inputs, real_call = bench_gumbel.make_inputs, bench_gumbel.gumbel_call

    def inputs(size, dtype, device):
        x, dy = real_inputs(size, dtype, device)
        x = x.double()
        gd = g.to(x.device)  # philox.gumbel_noise draws on the CPU by default
        top = (x + gd)[0].max() + 5
        x[0, 3], x[0, 8], x[0, 11] = top - gd[0, 3], top - gd[0, 8], top - 1e-3 - gd[0, 11]
        return x, dy
    monkeypatch.setattr(bench_gumbel, "make_inputs", inputs)

    for col, want in ((3, "ok"), (8, "ok"), (11, f"FAIL index 1/{B}"), (5, f"FAIL index 1/{B}")):
        def call(x, hard, backend, generator, col=col):
            y, idx = real_call(x, hard, "eager", generator)
            if backend == "triton":  # the "fused" sample of row 0 is col
                idx = idx.clone()
                idx[0] = col
                y = torch.zeros_like(y).scatter_(1, idx[:, None], 1.0) + (y - y.detach())
            return y, idx
        monkeypatch.setattr(bench_gumbel, "gumbel_call", call)
        c = bench_gumbel.check_fused("tiny", torch.float64, True)
        assert c.cell().startswith("ok ") if want == "ok" else c.cell() == want, (col, c.cell(), c.details())


def test_check_cell_and_errors(capsys):
    c = common.Check()
    c.items = [("ctx", 0.31, True, "ctx", ""), ("dq", 5.24, False, "dq", ""), ("dH", 2.0, False, "dH", "")]
    assert c.cell() == "FAIL 5.2 dq,dH"
    c.items = c.items[:1] + [("index", None, False, "index 3/256", "")]
    assert c.cell() == "FAIL index 3/256"
    c.items = c.items[:1]
    assert c.cell() == "ok 0.31"

    def boom():
        raise RuntimeError("CUDA out of memory")
    assert common.run_check("x", boom) == "error: RuntimeError"
    assert "error: RuntimeError (CUDA out of memory)" in capsys.readouterr().out


def test_rows_append_to_a_csv_without_check_column(tmp_path):
    import csv

    path = str(tmp_path / "r.csv")
    old = [f for f in common.FIELDS if f != "check"]
    timing = {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "peak_mem_mb": 0.0}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        w.writeheader()
        w.writerow(common.make_row("gumbel", "eager", "B1_V2", torch.float32, "fwd", timing))
    common.append_rows([common.make_row("gumbel", "fused", "B1_V2", torch.float32, "fwd", timing, check="ok 0.5")], path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == common.FIELDS and common.FIELDS[-1] == "check"
    assert [(r["impl"], r["check"]) for r in rows] == [("eager", ""), ("fused", "ok 0.5")]


@pytest.mark.kernels
def test_run_records_checks_and_goes_on_after_a_crash(monkeypatch, tmp_path):
    """bench_attention.run as on a GPU (the fused column made available here, tiny size): the check
    verdict lands in the fused rows only; a check that raises is recorded and the timing goes on."""
    import csv

    monkeypatch.setenv(common.RESULTS_CSV_ENV, str(tmp_path / "r.csv"))
    monkeypatch.setenv(common.IMPLS_ENV, "fused,eager")
    monkeypatch.setitem(bench_attention.SIZES, "notes", ATT_STEP)  # without CUDA run() times "notes" only
    monkeypatch.setattr(bench_attention, "available", lambda impl, size="notes": None if impl != "fused_rows" else "n/a")
    real = bench_attention.check_fused

    def check(impl, size, dtype):
        if dtype == torch.bfloat16:
            raise RuntimeError("out of memory")
        return real(impl, size, dtype)
    monkeypatch.setattr(bench_attention, "check_fused", check)
    monkeypatch.setattr(common, "time_fn", lambda fn, **kw: (fn(), {"median_ms": 1.0, "p20_ms": 1.0,
                                                                     "p80_ms": 1.0, "peak_mem_mb": 0.0})[1])
    bench_attention.run(("notes",), (torch.float32, torch.bfloat16), quick=True)
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # on CUDA run() adds graph-replay rows ("fwd (g)", GPU time of the notes size) without a check
    assert all(r["check"] == "" for r in rows if r["pass"].endswith("(g)"))
    got = [(r["impl"], r["dtype"], r["pass"], r["check"].split(" ")[0]) for r in rows if not r["pass"].endswith("(g)")]
    assert got == [(i, dt, ps, c if i == "fused" else "") for dt, c in (("float32", "ok"), ("bfloat16", "error:"))
                   for ps in ("fwd", "fwd+bwd") for i in ("fused", "eager")]


def test_graph_replay_rows_retime_the_recorded_notes_calls(monkeypatch, tmp_path):
    """bench_gumbel records its notes-size fused and eager calls and, last, times them again by
    graph replay (common.measure_graphed): one " (g)" row per recorded call, each of its own case
    (the recorded make_fn binds its case), without the check verdict. time_graphed and CUDA faked:
    eager runs on the CPU, each replay timing stands in for the call it would capture."""
    monkeypatch.setenv(common.RESULTS_CSV_ENV, str(tmp_path / "r.csv"))
    monkeypatch.setattr(common, "HAS_CUDA", True)
    monkeypatch.setattr(common, "device_name", lambda: "fake GPU")
    monkeypatch.setattr(bench_gumbel, "available", lambda impl: None if impl == "eager" else "not here")
    seen = []  # what each timed fn computes: its shape and pass, and for fwd whether y is one-hot

    def fake_graphed(fn, rep):
        out = fn()  # y (fwd) or (dlogits,) (fwd+bwd)
        if isinstance(out, tuple):
            seen.append((tuple(out[0].shape), "fwd+bwd", None))
        else:
            seen.append((tuple(out.shape), "fwd", "hard" if bool(((out == 0) | (out == 1)).all()) else "soft"))
        return {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "peak_mem_mb": float("nan")}

    monkeypatch.setattr(common, "time_graphed", fake_graphed)
    monkeypatch.setattr(common, "time_fn", lambda fn, warmup, rep: dict(fake_graphed(fn, rep), median_ms=2.0))
    monkeypatch.setitem(bench_gumbel.SIZES, "notes", (3, 11))
    rows = bench_gumbel.run(sizes=("notes",), dtypes=(torch.float32,), quick=True)
    called = [r for r in rows if not r["pass"].endswith(common.GRAPH_SUFFIX)]
    graphed = [r for r in rows if r["pass"].endswith(common.GRAPH_SUFFIX)]
    assert rows[len(called):] == graphed  # last
    key = lambda r: (r["impl"], r["note"], r["pass"].removesuffix(common.GRAPH_SUFFIX))  # noqa: E731
    assert [key(r) for r in graphed] == [key(r) for r in called] and len(graphed) == 4  # soft/hard x fwd/fwd+bwd
    assert all(r["check"] == "" and r["median_ms"] == 1.0 for r in graphed)
    assert all(r["median_ms"] == 2.0 for r in called)
    # the replayed fns are the recorded cases, not the loop's last one
    want = [((3, 11), r["pass"].removesuffix(common.GRAPH_SUFFIX),
             r["note"].split()[0] if r["pass"].startswith("fwd ") else None) for r in graphed]
    assert seen[-4:] == want
