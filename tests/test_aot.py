"""Every registered kernel compiles ahead of time for sm_80 and sm_90 on this (CPU) machine,
with zero spills in the configurations its launcher can pick (SPEC section 5)."""
import json

import pytest

from fused_s2s import aot

pytestmark = pytest.mark.kernels


def test_aot_compile_all_registered(aot_run):
    # started by conftest at collection time, in the background (this test runs last); the archs
    # come from FUSED_S2S_AOT_ARCHS: CI's second run, under triton 3.6, compiles for sm_90 only (the
    # H100 that runs 3.6), the first, under the newest triton, for sm_80 and sm_90
    returncode = aot_run.wait(timeout=1500)
    archs = aot_run.archs
    print(aot_run.log_text()[-20000:])
    with open(aot_run.out) as f:
        rows = json.load(f)
    fams = {r["kernel"] for r in rows}
    assert {"attention", "gumbel"} <= fams, f"kernel families registered: {sorted(fams)}"
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in archs.split(",")}
    assert {r["variant"] for r in rows} == set(aot.VARIANTS)  # generic and 16-aligned specialisations
    # the loop paths' loads are software-pipelined (cp.async into shared memory, counted in the PTX):
    # aot.failures flags a pipelined config without it; here, that such configs exist at all
    piped = [r for r in rows if r.get("expect_pipelined") and r["variant"] == "aligned" and not r["error"]]
    assert {r["kernel"] for r in piped} >= {"gumbel"}, "no software-pipelined configs registered"
    bad = aot.failures(rows)
    assert not bad, "\n".join(f"{r['kernel']} {r['config']} {r['variant']} {r['arch']}: "
                               f"{r['error'] or 'spills, shared memory or no cp.async'}" for r in bad)
    assert returncode == 0


def test_failures_flags_errors_spills_shared_memory_and_lost_pipelining():
    ok = {"kernel": "k", "config": "c", "arch": "sm_80", "variant": "aligned", "error": "",
          "expect_no_spill": True, "spill_bytes": 0, "shared": 1024, "expect_pipelined": True, "async_copies": 6}
    assert aot.failures([ok]) == []
    for change in ({"error": "CompilationError"}, {"spill_bytes": 8}, {"shared": aot.SMEM_LIMIT["sm_80"] + 1},
                   {"async_copies": 0}):
        assert aot.failures([dict(ok, **change)]) != [], change
    # a config the launcher never picks for D <= 1024 may spill
    assert aot.failures([dict(ok, spill_bytes=8, expect_no_spill=False)]) == []
    # no cp.async is fine for a loop that is not pipelined, and for the generic variant (16-bit
    # scalar loads are too narrow for it)
    assert aot.failures([dict(ok, async_copies=0, expect_pipelined=False)]) == []
    assert aot.failures([dict(ok, async_copies=0, variant="generic")]) == []


def test_other_archs_have_their_own_shared_memory_limit_and_unknown_ones_are_refused(monkeypatch, capsys):
    row = {"kernel": "k", "config": "c", "variant": "aligned", "error": "", "expect_no_spill": True,
           "spill_bytes": 0, "shared": 100 * 1024}  # over the 99 KB of sm_86 / sm_89 / sm_120, under sm_80's 163
    assert [aot.failures([dict(row, arch=a)]) != [] for a in ("sm_80", "sm_90", "sm_100", "sm_120", "sm_89")] == \
        [False, False, False, True, True]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "_configs", lambda name: pytest.fail("compiled before refusing the archs"))
    for archs in ("90,75", "sm_90"):
        with pytest.raises(SystemExit) as e:
            aot.main(["gumbel", "--archs", archs])
        assert e.value.code == 2
        assert "--archs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="archs: no shared-memory limit known for sm_75"):
        aot.run(["gumbel"], archs=(75,))


def test_loop_spills_counts_local_memory_ops_inside_loops_only():
    sass = """
        /*0100*/                   STL [R1], R0 ;
        /*0110*/                   FADD R2, R2, R3 ;
        /*0120*/                   LDL R4, [R1+0x4] ;
        /*0130*/              @!P0 BRA 0x110 ;
        /*0140*/                   LDL.LU R0, [R1] ;
        /*0150*/                   EXIT ;
    """
    assert aot.loop_spills(sass) == 1  # the LDL at 0x120 is in the loop 0x110-0x130; 0x100 and 0x140 are not
    assert aot.loop_spills(sass.replace("@!P0 BRA 0x110", "@!P0 BRA 0x150")) == 0  # a forward branch is no loop


def test_aligned_variant_marks_pointers_and_ints_divisible_by_16():
    cfg = aot.AOTConfig(kernel=None, signature={"x": "*fp32", "n": "i32", "s": "i64", "t": "fp32", "B": "constexpr"},
                        constexprs={"B": 4})
    assert aot._attrs(cfg, "generic") == {}
    assert aot._attrs(cfg, "aligned") == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                                          (2,): [["tt.divisibility", 16]]}
    with pytest.raises(ValueError, match="variant"):
        aot._attrs(cfg, "other")


def test_shared_aot_run_starts_one_compile_and_reports_its_status(tmp_path, monkeypatch):
    # pytest-xdist: every worker collects the AOT test; only the first to claim the directory starts
    # the compile, and every worker's handle waits for the one exit status
    import subprocess
    import sys

    import conftest

    started = []

    class FakePopen:
        def __init__(self, args, **kwargs):
            started.append(args)
            self.pid = 2**22 + 1  # never signalled: the status file is written below, so nothing is killed

    monkeypatch.setattr(conftest.subprocess, "Popen", FakePopen)
    d = str(tmp_path / "run")
    first, second = conftest.AotRun(d, shared=True), conftest.AotRun(d, shared=True)
    assert len(started) == 1 and started[0][-4:] == ["--json", first.out, "--archs", first.archs]
    with pytest.raises(TimeoutError):
        second.wait(timeout=0.2)
    (tmp_path / "run" / "rc").write_text("3")
    assert first.wait(timeout=1) == 3 and second.wait(timeout=1) == 3
    conftest._kill_aot(d)  # the compile has ended (rc written): nothing to stop, no error
    monkeypatch.undo()

    # the wrapper that writes the exit status of the command it runs
    rc = str(tmp_path / "rc2")
    subprocess.run([sys.executable, "-c", conftest._RECORD_STATUS, rc, sys.executable, "-c", "raise SystemExit(5)"],
                   check=True)
    with open(rc) as f:
        assert f.read() == "5"


def test_attention_forms_audit_covers_every_form_and_is_opt_in():
    """The "attention_forms" audit family: registered, never in a default run (CI's compile stays
    the rotated subset), and every attention config in every mask form and V = H or not."""
    import fused_s2s.kernels.attention as A

    assert "attention_forms" in aot.registered() and "attention_forms" not in aot.default_names()
    assert {"attention", "gumbel"} <= set(aot.default_names())
    def rest(c):  # what a config is apart from its form
        cx = tuple((k, repr(v)) for k, v in sorted(c.constexprs.items()) if k not in ("SHARED_KV", "MASK_MODE"))
        sig = tuple(sorted((k, v) for k, v in c.signature.items() if k != "MASK"))
        return c.kernel, c.num_warps, cx, sig, c.variants

    forms = {}
    for f in A._aot_configs_every_form():
        forms.setdefault(rest(f), set()).add((f.constexprs.get("SHARED_KV"), f.constexprs.get("MASK_MODE")))
    base = list(A._aot_configs_all())
    assert set(forms) == {rest(c) for c in base}
    for c in base:
        want = {(s if "SHARED_KV" in c.constexprs else None, m if "MASK_MODE" in c.constexprs else None)
                for s in (False, True) for m in (0, 1, 2)}
        assert want <= forms[rest(c)], c.label
