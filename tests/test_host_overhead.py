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


def test_cuda_mode_refuses_without_cuda_and_its_parts_run():
    """--cuda: without a GPU a clear usage error; the launch parts it times each run (here under
    the interpreter, on CPU tensors), so a GPU session does not find them broken."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU --cuda runs for real (benchmarks/gpu_session.sh)")
    out = subprocess.run([sys.executable, SCRIPT, "--cuda", "--n", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--cuda needs a CUDA device" in out.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import host_overhead as h\n"
            "parts = h.launch_parts('cpu')\n"
            "for name, fn in parts: fn()\n"
            "print(len(parts), 'parts ran')")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(SCRIPT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "8"
