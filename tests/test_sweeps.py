"""The GPU sweeps (benchmarks/sweep_attention.py, sweep_gumbel.py) run end to end on the CPU
under the interpreter (``--device cpu``, size "tiny"): a broken sweep would cost a GPU session's
minutes. Times are meaningless here; the lines and the configurations they name are checked."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

pytestmark = pytest.mark.kernels


def _run(mod, argv, capsys):
    import importlib

    assert importlib.import_module(mod).main(argv) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep]")]


@pytest.fixture(autouse=True)
def _interpreted():
    from fused_s2s.backend import interpret_mode

    if not interpret_mode():
        pytest.skip("the CPU smoke run needs the interpreter (with a GPU the sweeps run for real)")


@pytest.mark.newest_only  # CI time: the sweep scripts' lines; the kernels they run are tested under 3.6 too
def test_sweep_gumbel_stages_only(capsys):
    lines = _run("sweep_gumbel", ["--device", "cpu", "--sizes", "tiny", "--dtypes", "float32", "--stages-only",
                                  "--seconds", "60"], capsys)
    for kind in ("hard", "soft"):
        ours = [line for line in lines if f" {kind} launcher" in line]
        # the launcher's row (its default depth, 2 on the loop path; one program a row on the CPU), the
        # other split counts up to the row's 5 blocks, KEEP flipped, then every other depth
        assert re.search(r"stages=2 split=1 single=False: fwd [\d.]+ ms", ours[0]), ours
        assert [re.search(r"stages=2 split=(\d+): fwd [\d.]+ ms", line)[1] for line in ours[1:3]] == ["2", "4"], ours
        assert re.search(r"stages=2 keep=0: fwd [\d.]+ ms", ours[3]), ours
        assert sorted(re.search(r"stages=(\d)", line)[1] for line in ours[4:]) == ["1", "3", "4"], ours
    assert not any("rows of" in line or "explicit noise" in line for line in lines)  # --stages-only


@pytest.mark.newest_only  # CI time, as above
def test_sweep_attention_stages_only_with_tiled_rows(capsys):
    lines = _run("sweep_attention", ["--device", "cpu", "--sizes", "tiny", "--dtypes", "bfloat16", "--stages-only",
                                     "--seconds", "60"], capsys)
    assert "launcher fwd" in lines[1]
    per_row = [re.search(r"stages=(\d)", line)[1] for line in lines[2:] if "tiled" not in line]
    tiled = [re.search(r"stages=(\d) tiled", line)[1] for line in lines[2:] if "tiled" in line]
    assert per_row == ["2", "3"] and tiled == ["1", "2", "3"], lines
    assert all("failed" not in line for line in lines)


@pytest.mark.newest_only  # CI time, as above
def test_sweep_attention_times_the_other_tiled_tiles(capsys):
    from fused_s2s.kernels import attention_tiled

    sweep = __import__("sweep_attention")
    before = {k: dict(v) for k, v in attention_tiled._TILED_CONFIGS.items()}
    lines = _run("sweep_attention", ["--device", "cpu", "--sizes", "tiny128", "--dtypes", "bfloat16",
                                     "--seconds", "120"], capsys)
    fwd, bwd = sweep.TILED_TILES[128][0]
    assert (fwd, bwd) != (before["fwd"][128], before["bwd"][128])  # other tiles than the launcher's
    rows = [line for line in lines if "tile fwd=" in line]
    assert len(rows) == 1 and f"tile fwd={fwd} bwd={bwd}: fwd" in rows[0], lines
    assert all("failed" not in line for line in lines), lines
    assert attention_tiled._TILED_CONFIGS == before  # put back
