"""Host-side integer arithmetic for the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in the triton versions we
support: called from host code each costs 2-3.5 microseconds (argument unwrapping), several per
launch, which at the notes' sizes is a noticeable part of a call (benchmarks/host_overhead.py).
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
