"""Triton kernels of fused_s2s (installed as ``fused_s2s.kernels``).

Only ``@triton.jit`` functions and their plain launchers live here: no nn.Module, no autograd.
Each kernel module registers its ahead-of-time compile configurations with
:mod:`fused_s2s.kernels.aot` so the AOT tool can compile it for sm_80 / sm_90 on a CPU machine.
"""
