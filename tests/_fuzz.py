"""The driver shared by tests/fuzz_*.py: random cases for a fixed time, every failure printed.

``main(doc, argv, draw)`` parses --seconds, --seed and --device, sets TRITON_INTERPRET=1 on the CPU
(before triton is imported: ``draw`` imports the kernels itself), then calls
``draw(rng, torch, device) -> (description, check)`` until the time is up. ``check()`` returns None
or a failure message; an AssertionError or any other exception it raises is a failure too. Prints
each failure and "N cases, M failed"; returns 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import random
import time


def main(doc: str, argv, draw) -> int:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    rng = random.Random(a.seed)
    t_end = time.time() + a.seconds
    n = bad = 0
    while time.time() < t_end:
        desc, check = draw(rng, torch, a.device)
        try:
            msg = check()
        except AssertionError as e:
            msg = str(e)
        except Exception as e:  # a crash is a finding too
            msg = f"{type(e).__name__}: {e}"
        if msg:
            bad += 1
            print(f"FAIL {desc}\n    {msg.splitlines()[0][:300]}", flush=True)
        n += 1
    print(f"{n} cases, {bad} failed", flush=True)
    return 1 if bad else 0
