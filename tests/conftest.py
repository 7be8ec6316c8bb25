"""Test harness: kernels run on the GPU when there is one, else on the CPU under Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, so it is set here, at
collection time, before a test module imports fused_s2s kernels.
"""
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # cuDNN's fp32 RNNs may run in TF32 (torch.backends.cudnn.allow_tf32 defaults to True: cuDNN's
    # default math mode), lstm_cell / cuBLAS do not (matmul TF32 is off by default): the tests that
    # compare the fused step loop's cells with the reference's per-step cuDNN RNN in fp32 mean fp32
    torch.backends.cudnn.allow_tf32 = False

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


AOT_TEST = "test_aot.py::test_aot_compile_all_registered"


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only a selected AOT test starts it
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # The ahead-of-time compile of every kernel config (minutes of compiler time on its worker
    # processes) starts now, in the background, while the other tests run in this process; its
    # test goes last and collects the result (tests/test_aot.py).
    aot = [it for it in items if it.nodeid.endswith(AOT_TEST)]
    # pytest-xdist workers each collect every test: there the test starts its own compile when it runs
    if aot and "PYTEST_XDIST_WORKER" not in os.environ:
        items[:] = [it for it in items if it not in aot] + aot
        config._aot_background = start_aot()


def start_aot():
    """``python -m fused_s2s.aot --json F --archs A`` as a background process: (process, F, log)."""
    archs = os.environ.get("FUSED_S2S_AOT_ARCHS", "80,90")  # CI's triton 3.6 run: "90"
    tmp = tempfile.mkdtemp(prefix="fused_s2s_aot_")
    out, log = os.path.join(tmp, "aot.json"), open(os.path.join(tmp, "aot.log"), "w+")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "fused_s2s.aot", "--json", out, "--archs", archs],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out, log, archs


def pytest_sessionfinish(session):
    bg = getattr(session.config, "_aot_background", None)
    if bg is not None and bg[0].poll() is None:  # the run ended before the AOT test collected it
        os.killpg(bg[0].pid, signal.SIGKILL)  # its compile workers too


@pytest.fixture
def aot_run(request):
    """The background AOT compile started at collection (or a fresh one): (process, json, log, archs)."""
    return getattr(request.config, "_aot_background", None) or start_aot()


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when present, else CPU (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
