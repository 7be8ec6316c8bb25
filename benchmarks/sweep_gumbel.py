"""Block-config sweep of the Gumbel-softmax kernels on a GPU: (BLOCK_V, num_warps) and the loop's
software-pipelining depth (num_stages) of the looped (multi-block) rows against the launcher's choice. A tuning tool, not a benchmark of record
(benchmarks/bench_gumbel.py is); one line per configuration.

    python benchmarks/sweep_gumbel.py [--seconds 60] [--sizes large,mid] [--dtypes float32,bfloat16]
                                      [--stages-only]   # the launcher's config at num_stages 1-4
                                                        # and with KEEP flipped or other splits, only

For each size, dtype and hard / soft it times (triton.testing.do_bench, median ms) the forward
(gumbel_fwd, in-kernel noise) and the backward (gumbel_bwd from its saved (m, s)) at the
launcher's config, at other split-row counts ("split=" lines: chunks of a row in programs of
their own, two launches; split=1 is one program per row), with the loop path's KEEP flipped
("keep=" lines: whether the second passes read back what pass 1 kept or draw the noise again),
at the launcher's block config with each other
num_stages (1: not pipelined, the kernels before session 10), and at each (BLOCK_V, num_warps) below; it stops starting
configurations after --seconds (each new one compiles). Two diagnostics per case: the launcher's kernels reading an
explicit noise tensor (no RNG), and the same elements as R*k rows of V/k (split rows).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

# (B, V) as bench_gumbel; "tiny": the CPU smoke run's (--device cpu; two loop blocks a row)
SIZES = {"large": (256, 128000), "mid": (256, 32000), "notes": (32, 10000), "tiny": (2, 20000)}
GRID = ((1024, 4), (2048, 8), (4096, 8), (8192, 16), (8192, 32))  # (BLOCK_V, num_warps)
STAGES = (1, 2, 3, 4)  # the loop's num_stages (tl.range): 1 = no software pipelining
SPLITS = (1, 2, 4, 8, 16)  # chunks per row (split_plan; 1 = one program per row, the kernels before session 12)


def main(argv=None) -> int:
    a = common.sweep_args("sweep_gumbel", __doc__, argv, seconds=60.0, sizes="large,mid", dtypes="float32,bfloat16")
    if a is None:
        return 0
    from fused_s2s.kernels import gumbel as G

    t_end = time.time() + a.seconds
    dev = torch.device(a.device)
    bench = lambda fn: common.kernel_ms(fn, dev)  # noqa: E731
    print(f"[sweep] {common.device_name() if dev.type == 'cuda' else 'cpu (interpreter)'}, torch {torch.__version__}")
    for size in a.sizes.split(","):
        R, V = SIZES[size]
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            torch.manual_seed(0)
            x = torch.randn(R, V, device=dev, dtype=dtype)
            dy = torch.randn(R, V, device=dev, dtype=dtype)
            seed = torch.randint(0, 2**31 - 1, (), device=dev, dtype=torch.int64)
            noise = -torch.empty_like(x).exponential_().log()  # explicit Gumbel noise, for the diagnostic
            es = x.element_size()
            for hard in (True, False):
                def run(**kw):
                    fwd = lambda: G.gumbel_fwd(x, 1.0, hard, None, seed, **kw)  # noqa: E731
                    _, idx, m, s = fwd()
                    bwd = lambda: G.gumbel_bwd(dy, x, m, s, 1.0, None, seed, idx=idx, **kw)  # noqa: E731
                    return bench(fwd), bench(bwd)

                br, bv, nw, single = G.pick_config(V, dtype)
                ns = G.loop_stages(single, False, dtype)
                nsplit = G.split_plan(R, V, bv, single, dev)[0]
                base_f, base_b = run()
                gb_f, gb_b = 2 * R * V * es / 1e9, 3 * R * V * es / 1e9  # x -> y; x, dy -> dx
                tag = f"{size:6} {dname:9} {'hard' if hard else 'soft'}"
                print(f"[sweep] {tag} launcher BV={bv} nw={nw} stages={ns} split={nsplit} single={single}: fwd "
                      f"{base_f:.4f} ms {gb_f / base_f * 1e3:7.1f} GB/s | bwd {base_b:.4f} ms "
                      f"{gb_b / base_b * 1e3:7.1f} GB/s", flush=True)
                # split rows (chunks of a row in programs of their own, two launches; kernels/gumbel.py
                # split_plan) at each other count, the launcher's blocks and stages: first, as session
                # 12's change, never measured
                for sp in SPLITS:
                    if single or sp == nsplit or sp > -(-V // bv) or time.time() > t_end:
                        continue
                    f, b = run(split=sp)
                    print(f"[sweep] {tag} launcher BV={bv} nw={nw} stages={ns} split={sp}: fwd {f:.4f} ms "
                          f"({base_f / f:4.2f}x launcher split={nsplit}, {gb_f / f * 1e3:7.1f} GB/s) | bwd {b:.4f} ms "
                          f"({base_b / b:4.2f}x, {gb_b / b * 1e3:7.1f} GB/s)", flush=True)
                # the loop path's KEEP flipped (second passes: read back what pass 1 kept, or draw the
                # noise again; kernels/gumbel.py _KEEP), at the launcher's blocks and stages: first,
                # as the smallest question with the largest expected difference
                if not single:
                    k = not G._KEEP
                    f, b = run(keep=k)
                    print(f"[sweep] {tag} launcher BV={bv} nw={nw} stages={ns} keep={int(k)}: fwd {f:.4f} ms "
                          f"({base_f / f:4.2f}x launcher keep={int(G._KEEP)}) | bwd {b:.4f} ms ({base_b / b:4.2f}x)",
                          flush=True)
                # the loop's pipelining depth at the launcher's blocks (first: it is what session 10 changed)
                for ns_ in STAGES:
                    if single or ns_ == ns or time.time() > t_end:
                        continue
                    try:
                        f, b = run(num_stages=ns_)
                    except Exception as e:  # noqa: BLE001
                        print(f"[sweep] {tag} stages={ns_}: failed {type(e).__name__}: {str(e)[:100]}")
                        continue
                    print(f"[sweep] {tag} launcher BV={bv} nw={nw} stages={ns_}: fwd {f:.4f} ms ({base_f / f:4.2f}x "
                          f"launcher, {gb_f / f * 1e3:7.1f} GB/s) | bwd {b:.4f} ms ({base_b / b:4.2f}x, "
                          f"{gb_b / b * 1e3:7.1f} GB/s)", flush=True)
                if a.stages_only:
                    continue
                # diagnostic: the same kernels reading an explicit noise tensor (one more (R, V) read, no
                # Philox / log; the launcher's stages, which it does not pick for given noise): much faster per
                # element means the in-kernel noise is the bottleneck
                f = bench(lambda: G.gumbel_fwd(x, 1.0, hard, noise, None, num_stages=ns))
                print(f"[sweep] {tag} launcher, explicit noise (no RNG): fwd {f:.4f} ms ({base_f / f:4.2f}x in-kernel "
                      f"noise, {1.5 * gb_f / f * 1e3:7.1f} GB/s)", flush=True)
                # diagnostic: the same elements as R*k rows of V/k (launcher configs): what splitting a
                # row over k programs (flash-decoding style, before combining) could reach
                for k in (4, 8, 16):
                    if V % k:
                        continue
                    xk, dyk = x.view(R * k, V // k), dy.view(R * k, V // k)
                    fk = bench(lambda: G.gumbel_fwd(xk, 1.0, hard, None, seed))
                    _, ik, mk, sk = G.gumbel_fwd(xk, 1.0, hard, None, seed)
                    bk = bench(lambda: G.gumbel_bwd(dyk, xk, mk, sk, 1.0, None, seed, idx=ik))
                    print(f"[sweep] {tag} as {R * k} rows of {V // k}: fwd {fk:.4f} ms ({base_f / fk:4.2f}x) | "
                          f"bwd {bk:.4f} ms ({base_b / bk:4.2f}x)", flush=True)
                for bv_, nw_ in GRID:
                    if time.time() > t_end:
                        print("[sweep] time budget spent", flush=True)
                        return 0
                    try:
                        f, b = run(block_r=1, block_v=bv_, num_warps=nw_)
                    except Exception as e:  # noqa: BLE001
                        print(f"[sweep] {tag} BV={bv_} nw={nw_}: failed {type(e).__name__}: {str(e)[:100]}")
                        continue
                    print(f"[sweep] {tag} BV={bv_} nw={nw_}: fwd {f:.4f} ms ({base_f / f:4.2f}x launcher, "
                          f"{gb_f / f * 1e3:7.1f} GB/s) | bwd {b:.4f} ms ({base_b / b:4.2f}x, {gb_b / b * 1e3:7.1f} GB/s)",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
