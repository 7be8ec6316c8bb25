"""Numerical criterion of SPEC section 5, shared by every test.

A result passes when its error against a float64 oracle is no larger than the error of eager
PyTorch in the same dtype, times a small factor, plus a tiny atol:

    max|actual - oracle| <= factor * max|eager - oracle| + atol

``atol`` defaults to a few units of the dtype's epsilon times the oracle's scale, for the case where
eager happens to be exact. NaN/inf in ``actual`` where the oracle is finite always fails.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_atol(dtype: torch.dtype, oracle: torch.Tensor) -> float:
    scale = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
    return 2.0 * torch.finfo(dtype).eps * max(1.0, scale)


def oracle_errors(actual, eager, oracle):
    o = oracle.detach().to(torch.float64)
    ea = (actual.detach().to(torch.float64) - o).abs()
    ee = (eager.detach().to(torch.float64) - o).abs()
    return ea, ee


def oracle_check(actual, eager, oracle, *, factor: float = 4.0, atol: float | None = None, name: str = "result"):
    """The SPEC section 5 criterion without raising: (err, bound, message), message None when
    err <= bound. err is inf for a shape mismatch or a non-finite value where the oracle is finite.
    The one implementation: assert_oracle_close raises its message, the benchmarks' correctness
    checks (benchmarks/common.py) record err / bound."""
    inf = float("inf")
    if actual.shape != oracle.shape:
        return inf, 0.0, f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}"
    if eager.shape != oracle.shape:
        return inf, 0.0, f"{name}: eager shape {tuple(eager.shape)} != oracle {tuple(oracle.shape)}"
    dtype = actual.dtype if actual.dtype.is_floating_point else torch.float32
    if atol is None:
        atol = default_atol(dtype, oracle)
    finite = torch.isfinite(oracle.to(torch.float64))
    bad = finite & ~torch.isfinite(actual.detach().to(torch.float64))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return inf, atol, f"{name}: non-finite value {actual[idx].item()} at {idx} where oracle is {oracle[idx].item()}"
    if actual.numel() == 0:
        return 0.0, atol, None
    ea, ee = oracle_errors(actual, eager, oracle)
    ea = torch.where(finite, ea, torch.zeros_like(ea))
    ee = torch.where(finite, ee, torch.zeros_like(ee))
    err, ref_err = float(ea.max()), float(ee.max())
    bound = factor * ref_err + atol
    if not err <= bound:
        flat = int(ea.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ea.shape))
        return err, bound, (
            f"{name} ({dtype}): max error vs float64 oracle {err:.3e} > {factor} x eager error {ref_err:.3e} "
            f"+ atol {atol:.1e} = {bound:.3e}; worst at index {idx}: actual={actual[idx].item():.6g} "
            f"eager={eager[idx].item():.6g} oracle={oracle[idx].item():.6g}"
        )
    return err, bound, None


def assert_oracle_close(actual, eager, oracle, *, factor: float = 4.0, atol: float | None = None, name: str = "result"):
    """Assert the SPEC section 5 criterion; the message says where and by how much it fails."""
    message = oracle_check(actual, eager, oracle, factor=factor, atol=atol, name=name)[2]
    if message is not None:
        raise AssertionError(message)


@contextlib.contextmanager
def no_host_sync():
    """CUDA: any call inside that synchronises with the host raises
    (``torch.cuda.set_sync_debug_mode("error")``); the default mode comes back on exit."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
