"""Test harness: kernels run on the GPU when there is one, else on the CPU under Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, so it is set here, at
collection time, before a test module imports fused_s2s kernels.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

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
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in pytest-xdist's workers (make test: -n 2)


def _xdist_controller(config) -> bool:
    """This process hands the tests to pytest-xdist workers (-n N)."""
    return XDIST_WORKER is None and config.getoption("dist", "no") != "no"


def pytest_configure(config):
    # pytest-xdist's controller: fix the run's id (its --testrunuid) before the workers start, so
    # that they (PYTEST_XDIST_TESTRUNUID) and this process name the same AOT directory (_aot_dir)
    if _xdist_controller(config) and config.getoption("testrunuid", "") is None:
        config.option.testrunuid = uuid.uuid4().hex


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only a selected AOT test starts it
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # The ahead-of-time compile of every kernel config (minutes of compiler time on its worker
    # processes) starts now, in the background, while the other tests run; its test goes last and
    # collects the result (tests/test_aot.py). Under pytest-xdist every worker collects every test:
    # the first to get here starts the one compile of the run, in a directory they all know.
    aot = [it for it in items if it.nodeid.endswith(AOT_TEST)]
    if aot:
        items[:] = [it for it in items if it not in aot] + aot
        if XDIST_WORKER is None:
            config._aot_background = AotRun()
        else:
            config._aot_background = AotRun(_aot_dir(os.environ["PYTEST_XDIST_TESTRUNUID"]), shared=True)


def _aot_dir(testrunuid: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"fused_s2s_aot_{testrunuid}")


# runs ARGV[2:] and writes its exit status to ARGV[1] (atomically): what AotRun.wait polls for
_RECORD_STATUS = ("import os, subprocess, sys; r = subprocess.call(sys.argv[2:]); "
                  "open(sys.argv[1] + '.tmp', 'w').write(str(r)); os.replace(sys.argv[1] + '.tmp', sys.argv[1])")


class AotRun:
    """``python -m fused_s2s.aot --json DIR/aot.json --archs A`` in the background, in its own process
    group, its exit status written to DIR/rc (None: a fresh temporary DIR). ``shared``: the
    directory may be another process's (xdist workers): start the compile only if no one has
    (DIR/started, created exclusively)."""

    def __init__(self, dir: str | None = None, shared: bool = False):
        dir = dir or tempfile.mkdtemp(prefix="fused_s2s_aot_")
        self.archs = os.environ.get("FUSED_S2S_AOT_ARCHS", "80,90")  # CI's triton 3.6 run: "90"
        self.dir, self.out, self.log, self.rc = dir, *(os.path.join(dir, f) for f in ("aot.json", "aot.log", "rc"))
        if shared:
            os.makedirs(dir, exist_ok=True)
            try:
                os.close(os.open(os.path.join(dir, "started"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return  # another worker started it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(self.log, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", _RECORD_STATUS, self.rc, sys.executable, "-m",
                                     "fused_s2s.aot", "--json", self.out, "--archs", self.archs],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with open(os.path.join(dir, "pid"), "w") as f:
            f.write(str(proc.pid))

    def wait(self, timeout: float) -> int:
        """The compile's exit status, once it has ended (TimeoutError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.rc):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the AOT compile in {self.dir} ran past {timeout} s")
            time.sleep(0.5)
        with open(self.rc) as f:
            return int(f.read())

    def log_text(self) -> str:
        with open(self.log) as f:
            return f.read()


def _kill_aot(dir: str) -> None:
    """Stop the compile started in ``dir`` if it still runs (the run ended before its test took it)."""
    pid = os.path.join(dir, "pid")
    if os.path.exists(pid) and not os.path.exists(os.path.join(dir, "rc")):
        with open(pid) as f:
            try:
                os.killpg(int(f.read()), signal.SIGKILL)  # its compile workers too
            except ProcessLookupError:
                pass


def pytest_sessionfinish(session):
    if XDIST_WORKER is not None:
        return  # the controller stops it: another worker may still be waiting for it
    bg = getattr(session.config, "_aot_background", None)
    if bg is not None:
        _kill_aot(bg.dir)
    elif _xdist_controller(session.config) and session.config.getoption("testrunuid", ""):
        _kill_aot(_aot_dir(session.config.option.testrunuid))


@pytest.fixture
def aot_run(request):
    """The background AOT compile started at collection (or a fresh one): an AotRun."""
    return getattr(request.config, "_aot_background", None) or AotRun()


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when present, else CPU (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
