"""benchmarks/host_overhead.py: every kernel is stubbed, and the tables have a figure per op and
per training mode (no speed is asserted: figures are for reading)."""
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "benchmarks", "host_overhead.py")


def test_stubs_every_kernel_and_times_each_op():
    out = subprocess.run([sys.executable, SCRIPT, "--n", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n = int(re.search(r"kernels stubbed: (\d+)", out.stdout)[1])
    # every @triton.jit kernel of the four kernel modules (a kernel left real would be interpreted
    # and timed as host overhead)
    src = "".join(open(os.path.join(HERE, "..", "kernels", f)).read()
                  for f in ("attention.py", "attention_tiled.py", "attention_tiled_wide.py", "gumbel.py"))
    assert n == len(re.findall(r"@triton\.jit\s+def _\w+_kernel\(", src)) and n >= 10
    rows = re.findall(r"^(gumbel_softmax|gumbel_sample|attention_step) .+?\s+([\d.]+) us\s+([\d.]+) us$",
                      out.stdout, re.M)
    assert len(rows) == 9 and all(float(f) > 0 and float(e) > 0 for _, f, e in rows)
    steps = re.findall(r"^(argmax|gumbel_hard|gumbel) ratio [\d.]+\s+([\d.]+) ms\s+(-?\d+) us$", out.stdout, re.M)
    assert [name for name, _, _ in steps] == ["argmax", "gumbel_hard", "gumbel"]
