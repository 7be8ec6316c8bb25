"""Triton kernels of fused_s2s (installed as ``fused_s2s.kernels``).

Only ``@triton.jit`` functions and their plain launchers live here: no nn.Module, no autograd.
Each kernel module registers its ahead-of-time compile configurations with
:mod:`fused_s2s.aot` so the AOT tool can compile it for sm_80 / sm_90 on a CPU machine.

Every launch passes ``enable_fp_fusion=True`` (a * b + c as one FMA): the default of triton 3.6 to
3.9, which triton 3.10 turns off; passing it keeps the numerics and the instruction counts the
same across the versions we support.

Loops over a runtime bound are ``for`` loops, which Triton software-pipelines (``num_stages``
copies of the loop's loads in flight, through shared memory); it never pipelines ``while``
loops. Under the interpreter, :func:`_launch.interpreter_range_fix` lets triton 3.6 run them.
"""
from fused_s2s.backend import interpret_mode as _interpret_mode

if _interpret_mode():
    from fused_s2s.kernels._launch import interpreter_range_fix as _fix

    _fix()
