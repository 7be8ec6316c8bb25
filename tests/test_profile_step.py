"""benchmarks/profile_step.py: GPU-busy time as the union of kernel intervals, and a profiled case
end to end on the host (no CUDA here: wall time only)."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("profile_step", os.path.join(HERE, "..", "benchmarks", "profile_step.py"))
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def test_busy_time_is_the_union_of_kernel_intervals():
    # overlapping (0-10, 5-12), nested (20-30 in 20-40), disjoint (50-51): 12 + 20 + 1 us
    assert profile_step._busy_ms([(5, 12), (0, 10), (20, 40), (22, 30), (50, 51)]) == 33 / 1e3
    assert profile_step._busy_ms([]) == 0.0


def test_line_reads_busy_fraction_and_kernels():
    r = {"impl": "fused", "size": "notes", "mode": "ss_gumbel_hard", "dtype": "float32", "wall_ms": 4.0,
         "busy_ms": 1.0, "kernels": 412.0, "top": [("triton_gumbel_fwd", 0.25)]}
    text = profile_step.line(r)
    assert "GPU busy    1.000 ms ( 25%)" in text and "412 kernels/step" in text and "triton_gumbel_fwd 0.250" in text


def test_profiles_a_tiny_case_on_the_host():
    r = profile_step.profile_case("reference", ("tiny", 2, 3, 3, 11, 8), "ss_gumbel_hard", profile_step.torch.float32,
                                  steps=1)
    assert r["wall_ms"] > 0 and r["mode"] == "ss_gumbel_hard"
    if not profile_step.common.HAS_CUDA:
        assert r["busy_ms"] is None and "host only" in profile_step.line(r)
