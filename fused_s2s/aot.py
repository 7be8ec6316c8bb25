"""Ahead-of-time compile check for every registered Triton kernel, on a machine without a GPU.

Each kernel module in ``fused_s2s.kernels`` calls :func:`register` with a function that yields the
configurations its launcher can pick (dtype x block sizes x constexpr flags x num_warps). This tool
compiles each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
sm_80 and sm_90 and reads registers, stack frame, local and shared memory of the cubin triton built
with ``cuobjdump -res-usage`` (shipped with triton). A spill shows as a stack frame or local memory
(ptxas keeps spilled registers there; ``ptxas -v`` on the same PTX agreed config for config on
3,000 compiles); where there is one, the SASS tells whether a spill instruction sits in a loop.

    python -m fused_s2s.aot            # table of every kernel x config x arch x variant; exit 1 on error/spill
    python -m fused_s2s.aot --json F   # also write the rows as JSON
    python -m fused_s2s.aot gumbel --jobs 2 --variants aligned --archs 90
    python -m fused_s2s.aot gumbel --loops "fp32 noise=philox 1x4096 loop"   # SASS per loop body
    python -m fused_s2s.aot attention_forms   # audit: every attention config in every mask form, V = H or not

Each config compiles in two variants, because Triton's JIT specialises every launch on the
arguments it sees: "generic" knows nothing of the integer arguments and pointers (e.g. a row
stride of 300 floats: scalar loads), "aligned" marks every pointer and integer argument divisible
by 16, as Triton does for contiguous tensors whose sizes are multiples of 16 (128-bit loads, other
register allocation). Both run on a GPU, so both must compile without spills. Configurations
compile in parallel (``--jobs``, default: all cores), in forked worker processes.

It must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled): the tool
refuses to start when it is set.
"""
from __future__ import annotations

import argparse
import collections
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
VARIANTS = ("generic", "aligned")
# shared memory a block may opt into (CUDA programming guide, compute capabilities table): a kernel
# over it compiles fine here and fails only at launch on the GPU ("out of resource: shared memory")
# sm_80 / sm_90 are the archs the tests compile for; the others can be asked for with --archs
# (sm_86 / sm_89 / sm_120: the 99 KB of consumer cards and RTX Blackwell, sm_100: B200)
SMEM_LIMIT = {"sm_80": 166_912, "sm_86": 101_376, "sm_87": 166_912, "sm_89": 101_376, "sm_90": 232_448,
              "sm_100": 232_448, "sm_120": 101_376}


@dataclasses.dataclass(frozen=True)
class AOTConfig:
    """One compilable instance of a kernel.

    signature: argument name -> triton type string ("*fp32", "*bf16", "i32", "i64", "fp32",
    "constexpr"); constexprs: values of the "constexpr" arguments; expect_no_spill: the launcher can
    pick this config for D <= 1024, so spills are an error; pipelined: its loops are software-pipelined
    (``tl.range(num_stages=)`` > 1), so the aligned variant must copy with ``cp.async`` (a loop
    turned back into a ``while``, or a triton that stops pipelining it, is an error); variants: the
    variants (VARIANTS) the launcher runs this config in, where it picks another config for the others.
    """

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    expect_no_spill: bool = True
    pipelined: bool = False
    variants: tuple = VARIANTS


_REGISTRY: dict[str, Callable[[], Iterable[AOTConfig]]] = {}
_AUDITS: set[str] = set()  # families compiled only when named


def register(name: str, configs: Callable[[], Iterable[AOTConfig]], *, default: bool = True) -> None:
    """Register a kernel family. ``configs`` is called lazily, only by the AOT tool. ``default=False``:
    an audit family (e.g. every mask form of every config), compiled only when named on the command
    line, never by a bare ``python -m fused_s2s.aot`` or the test suite's run."""
    _REGISTRY[name] = configs
    (_AUDITS.discard if default else _AUDITS.add)(name)


def default_names() -> list[str]:
    """The families a run without names compiles: every registered one but the audits."""
    audits = importlib.import_module("fused_s2s.aot")._AUDITS  # see registered(): __main__ is another module
    return sorted(n for n in registered() if n not in audits)


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


def _attrs(cfg: AOTConfig, variant: str) -> dict:
    """ASTSource attrs: the divisibility Triton's JIT would infer for the variant's arguments."""
    if variant == "generic":
        return {}
    if variant != "aligned":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    names = list(cfg.signature)
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in cfg.signature.items()
            if t.startswith("*") or t in ("i32", "i64")}


def _compile(cfg: AOTConfig, cc: int, variant: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=_attrs(cfg, variant))
    # enable_fp_fusion as every launcher passes it (triton 3.10 turns the default off)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` on a cubin (it reads files only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), flag, path], capture_output=True, text=True).stdout


def compile_config(cfg: AOTConfig, cc: int, variant: str = "generic") -> dict:
    """Compile one config for sm_<cc>; return registers, spills, shared and local memory."""
    compiled = _compile(cfg, cc, variant)
    row = {"arch": f"sm_{cc}", "shared": int(compiled.metadata.shared), "loop_spills": 0,
           # asynchronous global -> shared copies: what a software-pipelined loop's loads become
           "async_copies": len(re.findall(r"\bcp\.async\.c[ag]\b", compiled.asm["ptx"]))}
    res = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {res[:200]!r}")
    row.update(regs=int(m[1]), stack=int(m[2]), local=int(m[4]))
    row["spill_bytes"] = row["stack"] + row["local"]
    if row["spill_bytes"]:
        # disassembling costs more than compiling a small kernel: only where there is a spill
        row["loop_spills"] = loop_spills(_cuobjdump(compiled.asm["cubin"], "-sass"))
    return row


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(start, end, opcode counts) of each loop body in a SASS listing: a loop is the span from a
    backward branch's target to the branch."""
    ins = [(int(m[1], 16), m[2], m[3]) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t[1], 16) < addr:
            lo = int(t[1], 16)
            loops.append((lo, addr, collections.Counter(o.split(".")[0] for a, o, _ in ins if lo <= a <= addr)))
    return loops


def loop_spills(sass: str) -> int:
    """Local-memory spill instructions (STL / LDL) inside a loop body of the SASS. Spills there cost
    on every iteration; a register saved once before the loops and reloaded after them costs a few
    instructions per program."""
    return sum(c["STL"] + c["LDL"] for _, _, c in sass_loops(sass))


def print_loops(names, match: str, variants=VARIANTS, cc: int = 90, out=sys.stdout) -> int:
    """Instruction counts of each loop body, for the configs whose label contains ``match``: the
    static cost per iteration (divide by the elements a thread handles per iteration)."""
    n = 0
    for name in names or default_names():
        for cfg in _configs(name):
            if match not in cfg.label:
                continue
            for variant in (v for v in variants if v in cfg.variants):
                sass = _cuobjdump(_compile(cfg, cc, variant).asm["cubin"], "-sass")
                print(f"{name} {cfg.label} [{variant}, sm_{cc}, {cfg.num_warps} warps]", file=out)
                for lo, hi, c in sass_loops(sass):
                    top = ", ".join(f"{k} {v}" for k, v in c.most_common(8))
                    print(f"    loop {lo:#06x}-{hi:#06x}: {sum(c.values())} instructions ({top})", file=out)
                n += 1
    return n


_CONFIGS: dict[str, list] = {}  # per process: the registry's configs, listed once


def _configs(name: str) -> list:
    if name not in _CONFIGS:
        _CONFIGS[name] = list(registered()[name]())
    return _CONFIGS[name]


def _compile_task(task) -> dict:
    """One (family, config index, arch, variant): the table row, errors included (worker side)."""
    name, i, cc, variant = task
    cfg = _configs(name)[i]
    row = {"kernel": name, "fn": getattr(cfg.kernel, "__name__", str(cfg.kernel)), "config": cfg.label,
           "variant": variant, "num_warps": cfg.num_warps, "expect_no_spill": cfg.expect_no_spill,
           "expect_pipelined": cfg.pipelined}
    try:
        row.update(compile_config(cfg, cc, variant))
        row["error"] = ""
    except Exception as e:  # report every failing config, not only the first
        row.update(arch=f"sm_{cc}", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return row


def check_archs(archs) -> None:
    """ValueError naming ``archs`` unless each is a compute capability with a known shared-memory
    limit (failures() needs it), raised before anything compiles."""
    unknown = [a for a in archs if f"sm_{a}" not in SMEM_LIMIT]
    if unknown:
        raise ValueError(f"archs: no shared-memory limit known for {', '.join(f'sm_{a}' for a in unknown)}; "
                         f"expected compute capabilities among {', '.join(k[3:] for k in SMEM_LIMIT)}")


def run(names: Iterable[str] | None = None, archs=ARCHS, variants=VARIANTS, jobs: int | None = None,
        out=sys.stdout) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("fused_s2s.aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    check_archs(archs)
    tasks = [(name, i, cc, variant) for name in (names or default_names()) for i, cfg in enumerate(_configs(name))
             for cc in archs for variant in variants if variant in cfg.variants]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    rows = []
    if jobs == 1:
        results = map(_compile_task, tasks)
    else:
        import multiprocessing

        # fork: the workers inherit the imported kernels (JITFunctions do not pickle); nothing has
        # been compiled in this process yet, so no compiler state is shared
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_compile_task, tasks, chunksize=4)
    try:
        for row in results:  # in task order
            rows.append(row)
            print(_fmt(row), file=out, flush=True)
    finally:
        if jobs > 1:
            pool.close()
            pool.join()
    return rows


def _fmt(r: dict) -> str:
    head = f"{r['kernel']:<10} {r['fn']:<28} {r['config']:<44} {r['variant']:<7} {r['arch']:<6}"
    if r["error"]:
        return f"{head} ERROR {r['error']}"
    return (f"{head} "
            f"regs={r.get('regs', '?'):<4} spill_bytes={r['spill_bytes']:<4} in_loops={r['loop_spills']:<3} "
            f"smem={r['shared']} cp.async={r.get('async_copies', '?')}")


def failures(rows: list[dict]) -> list[dict]:
    """Rows that failed to compile, need more shared memory than the arch has, spill where the
    launcher can pick them, or lost the software pipelining of their loops (aligned variant: the
    generic one's 16-bit scalar loads are too narrow for cp.async)."""
    return [r for r in rows if r["error"] or r.get("shared", 0) > SMEM_LIMIT[r["arch"]]
            or (r["expect_no_spill"] and r["spill_bytes"] != 0)
            or (r.get("expect_pipelined") and r["variant"] == "aligned" and r.get("async_copies", 0) == 0)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="kernel families to compile (default: all registered but the audits, "
                   "e.g. attention_forms: every mask form of every attention config)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--archs", default=",".join(str(a) for a in ARCHS), help="comma list of compute capabilities")
    p.add_argument("--loops", metavar="MATCH", help="instead: instruction counts per loop body (sm_90) of the "
                   "configs whose label contains MATCH")
    a = p.parse_args(argv)
    if a.loops is not None:
        return 0 if print_loops(a.names or None, a.loops, tuple(a.variants.split(","))) else 1
    try:
        archs = tuple(int(x) for x in a.archs.split(","))
        check_archs(archs)
    except ValueError as e:
        p.error(f"--archs: expected a comma list of compute capabilities such as 80,90, got {a.archs!r} ({e})")
    rows = run(a.names or None, archs=archs, variants=tuple(a.variants.split(",")), jobs=a.jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = failures(rows)
    print(f"{len(rows)} compiled, {len(bad)} failing (compile error, shared memory over the arch's limit, "
          f"spills, or a pipelined loop without cp.async); most shared memory: {max((r.get('shared', 0) for r in rows), default=0)} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
