"""Every registered kernel compiles ahead of time for sm_80 and sm_90 on this (CPU) machine,
with zero spills in the configurations its launcher can pick (SPEC section 5)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernels


def test_aot_compile_all_registered(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fused_s2s.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:])
    rows = json.loads(out.read_text())
    fams = {r["kernel"] for r in rows}
    assert {"attention", "gumbel"} <= fams, f"kernel families registered: {sorted(fams)}"
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = [r for r in rows if r["error"] or (r["expect_no_spill"] and (r["spill_stores"] or r["spill_loads"]))]
    assert not bad, "\n".join(f"{r['kernel']} {r['config']} {r['arch']}: {r['error'] or 'spills'}" for r in bad)
    assert proc.returncode == 0
