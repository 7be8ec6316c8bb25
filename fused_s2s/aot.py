"""Ahead-of-time compile check for every registered Triton kernel, on a machine without a GPU.

Each kernel module in ``fused_s2s.kernels`` calls :func:`register` with a function that yields the
configurations its launcher can pick (dtype x block sizes x constexpr flags x num_warps). This tool
compiles each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
sm_80 and sm_90, runs the ptxas that ships with triton in verbose mode on the PTX for spill counts,
and ``cuobjdump -res-usage`` on the cubin for registers, local (spill) memory and shared memory.

    python -m fused_s2s.aot            # table of every kernel x config x arch; exit 1 on error/spill
    python -m fused_s2s.aot --json F   # also write the rows as JSON

It must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled): the tool
refuses to start when it is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Callable, Iterable

ARCHS = (80, 90)
# shared memory a block may opt into (CUDA programming guide, compute capabilities table): a kernel
# over it compiles fine here and fails only at launch on the GPU ("out of resource: shared memory")
SMEM_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}


@dataclasses.dataclass(frozen=True)
class AOTConfig:
    """One compilable instance of a kernel.

    signature: argument name -> triton type string ("*fp32", "*bf16", "i32", "i64", "fp32",
    "constexpr"); constexprs: values of the "constexpr" arguments; expect_no_spill: the launcher can
    pick this config for D <= 1024, so spills are an error.
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    expect_no_spill: bool = True


_REGISTRY: dict[str, Callable[[], Iterable[AOTConfig]]] = {}


def register(name: str, configs: Callable[[], Iterable[AOTConfig]]) -> None:
    """Register a kernel family. ``configs`` is called lazily, only by the AOT tool."""
    _REGISTRY[name] = configs


def registered() -> dict[str, Callable[[], Iterable[AOTConfig]]]:
    """Import every module of fused_s2s.kernels (they register on import) and return the registry."""
    import fused_s2s.kernels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    # kernel modules register with the importable fused_s2s.aot; under `python -m fused_s2s.aot` this
    # file runs as __main__, a second module object whose own _REGISTRY stays empty
    return dict(importlib.import_module("fused_s2s.aot")._REGISTRY)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(cc: int) -> str:
    # the ptxas triton itself uses for this arch (triton 3.9 emits PTX for sm_90 that only its
    # newer "ptxas-blackwell" accepts); fall back to the bundled ptxas
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except Exception:
        return _tool("ptxas")


def _ptxas_flags() -> list:
    # the register-allocation flag triton passes to ptxas when it builds the real cubin (3.9:
    # --regAllocOptLevel=2, a ptxas 13 work-around); without it this second ptxas run reports
    # spills that the cubin triton built does not have
    try:
        import inspect

        from triton.backends.nvidia.compiler import CUDABackend

        return ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin) else []
    except Exception:
        return []


def compile_config(cfg: AOTConfig, cc: int) -> dict:
    """Compile one config for sm_<cc>; return registers, spills, shared and local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    row = {"arch": f"sm_{cc}", "shared": int(compiled.metadata.shared)}
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        if m:
            row.update(regs=int(m[1]), stack=int(m[2]), local=int(m[4]))
        # ptxas -v prints "N bytes spill stores, M bytes spill loads" for the entry function.
        v = subprocess.run(
            [_ptxas(cc), *_ptxas_flags(), f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}", "-v", ptx, "-o", os.devnull],
            capture_output=True, text=True,
        )
        s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", v.stderr + v.stdout)
        row["spill_stores"], row["spill_loads"] = (int(s[1]), int(s[2])) if s else (-1, -1)
    return row


def run(names: Iterable[str] | None = None, archs=ARCHS, out=sys.stdout) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("fused_s2s.aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    rows = []
    reg = registered()
    for name in names or sorted(reg):
        for cfg in reg[name]():
            for cc in archs:
                row = {"kernel": name, "fn": getattr(cfg.kernel, "__name__", str(cfg.kernel)),
                       "config": cfg.label, "num_warps": cfg.num_warps, "expect_no_spill": cfg.expect_no_spill}
                try:
                    row.update(compile_config(cfg, cc))
                    row["error"] = ""
                except Exception as e:  # report every failing config, not only the first
                    row.update(arch=f"sm_{cc}", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                rows.append(row)
                print(_fmt(row), file=out, flush=True)
    return rows


def _fmt(r: dict) -> str:
    if r["error"]:
        return f"{r['kernel']:<14} {r['fn']:<28} {r['config']:<44} {r['arch']:<6} ERROR {r['error']}"
    return (f"{r['kernel']:<14} {r['fn']:<28} {r['config']:<44} {r['arch']:<6} "
            f"regs={r.get('regs', '?'):<4} spill={r['spill_stores']}/{r['spill_loads']:<4} "
            f"local={r.get('local', '?'):<5} smem={r['shared']}")


def failures(rows: list[dict]) -> list[dict]:
    """Rows that failed to compile, need more shared memory than the arch has, or spill where the
    launcher can pick them."""
    return [r for r in rows if r["error"] or r.get("shared", 0) > SMEM_LIMIT[r["arch"]]
            or (r["expect_no_spill"] and (r["spill_stores"] != 0 or r["spill_loads"] != 0))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="kernel families to compile (default: all registered)")
    p.add_argument("--json", help="write the rows to this JSON file")
    a = p.parse_args(argv)
    rows = run(a.names or None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = failures(rows)
    print(f"{len(rows)} compiled, {len(bad)} failing (compile error, shared memory over the arch's limit, "
          f"or spills); most shared memory: {max((r.get('shared', 0) for r in rows), default=0)} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
