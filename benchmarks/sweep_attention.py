"""Block-config sweep of the per-row attention kernels on a GPU: which (BLOCK_L, num_warps, splits,
num_stages) is fastest per size and dtype, against the launcher's own choice. A tuning tool, not a benchmark
of record (benchmarks/bench_attention.py is); it prints one line per configuration.

    python benchmarks/sweep_attention.py [--seconds 90] [--sizes large,long] [--dtypes bfloat16,float32]
                                         [--stages-only]   # the launcher's config at num_stages 1-3 only

Sizes are bench_attention's (values = keys, lengths mask), and two that are not 16-aligned
(``large_odd``, ``long_odd``: D 1000 / 500, L 500 / 4000), where the launcher takes its unaligned tiles. For each size and dtype it times
(triton.testing.do_bench: L2 flushed, median ms) the forward (attention_forward) and the backward
(attention_backward from the forward's saved tensors) at the launcher's config, then with the
loops software-pipelined at num_stages 2 and 3 (the launcher's is 1; session 10), then at each
(BLOCK_L, num_warps) of the grid below with the heuristic split and, for T == 1, at forced split
counts. For T > 1 in fp16 / bf16 (sizes "tf", "tf128", "tf256") it also times the tiled kernels
(attention_tiled, what the launcher picks there) at num_stages 1, 2 and 3, and at BLOCK_D 128 / 256
the tiles of TILED_TILES (the ones before session 18 beside the launcher's). It stops starting
configurations after --seconds (each new one compiles: ~1 s).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

SIZES = {  # (B, T, L, D) as bench_attention; "tiny": the CPU smoke run's (--device cpu)
    "tiny": (2, 20, 40, 16),
    "tiny128": (1, 17, 9, 72),  # BLOCK_D 128: the CPU smoke run of the TILED_TILES rows
    "notes": (32, 1, 10, 256),
    "large": (256, 1, 512, 1024),
    "long": (8, 1, 4096, 512),
    "tf": (128, 50, 50, 512),
    # not 16-aligned (D, L): the launcher takes _UNALIGNED_CONFIGS (session 16, chosen by the AOT
    # check alone); the grid's rows time the aligned shapes' measured tiles on the same inputs
    "large_odd": (256, 1, 500, 1000),
    "long_odd": (8, 1, 4000, 500),
    # teacher forcing at the tiled kernels' own tiles (tf's D 512 takes the chunked kernels)
    "tf128": (128, 50, 50, 128),
    "tf256": (128, 50, 50, 256),
}
# BLOCK_D -> (forward, backward) (BLOCK_T, BLOCK_L, num_warps) tiles of the tiled kernels to time besides
# the launcher's (_TILED_CONFIGS): the ones in use until session 18, which spilled 8-16 bytes outside
# their loops in some mask forms under some triton 3.6-3.8 (docs/attention.md), never timed either
TILED_TILES = {128: (((16, 32, 4), (16, 16, 4)),), 256: (((16, 32, 8), (16, 16, 8)),)}
GRID = ((2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8))  # (BLOCK_L, num_warps)


def main(argv=None) -> int:
    a = common.sweep_args("sweep_attention", __doc__, argv, seconds=90.0, sizes="large,long", dtypes="bfloat16,float32")
    if a is None:
        return 0
    from fused_s2s.kernels import attention as A
    from fused_s2s.kernels import attention_tiled as AT
    from fused_s2s.kernels._launch import num_sms

    real_cfg = A.block_config
    t_end = time.time() + a.seconds
    dev = torch.device(a.device)
    bench = lambda fn: common.kernel_ms(fn, dev)  # noqa: E731
    sms = num_sms(dev)
    name = common.device_name() if dev.type == "cuda" else "cpu (interpreter)"
    print(f"[sweep] {name} ({sms} SMs), torch {torch.__version__}")
    for size in a.sizes.split(","):
        B, T, L, D = SIZES[size]
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            torch.manual_seed(0)
            q = torch.randn(B, T, D, device=dev, dtype=dtype)
            H = torch.randn(B, L, D, device=dev, dtype=dtype) * D ** -0.5
            lengths = torch.randint(max(1, L // 2), L + 1, (B,), device=dev)
            dc = torch.randn(B, T, D, device=dev, dtype=dtype)
            dw = torch.randn(B, T, L, device=dev, dtype=dtype)
            es = q.element_size()
            gb = (B * L * D * es + 2 * B * T * (D + L) * es) / 1e9  # H once, q / ctx / weights
            # the tiled forward's feature tile, by the launcher's own rule (values = keys); None where
            # the tiled kernels do not serve (fp32) or the chunked ones do (BLOCK_D > 256)
            tiled_cfg = AT.tiled_config(D, D, dtype, "fwd")
            block_d = tiled_cfg[2] if tiled_cfg else None

            def run(kind_cfg, splits, num_stages=None, tiled=False, tile=None):
                def cfg(D_, Dv_, kind="fwd", dt=torch.float32, aligned=True):
                    bd, bl, nw = real_cfg(D_, Dv_, kind, dt, aligned)
                    if kind in kind_cfg:
                        bl, nw = kind_cfg[kind]
                    return bd, bl, nw
                A.block_config = cfg
                tiles = AT._TILED_CONFIGS
                if tile is not None:  # (forward, backward) tiles at this D's BLOCK_D
                    AT._TILED_CONFIGS = {"fwd": {**tiles["fwd"], block_d: tile[0]},
                                         "bwd": {**tiles["bwd"], block_d: tile[1]}}
                try:
                    kw = dict(splits=splits, tiled=tiled, num_stages=num_stages)
                    fwd = lambda: A.attention_forward(q, H, None, lengths, **kw)  # noqa: E731
                    saved = A.attention_forward(q, H, None, lengths, for_backward=True, **kw)
                    ctx, w, lse, ctx_acc, s_acc = saved
                    bwd = lambda: A.attention_backward(q, H, None, lengths, ctx_acc, s_acc, lse, dc, dw, **kw)  # noqa: E731
                    return bench(fwd), bench(bwd)
                finally:
                    A.block_config = real_cfg
                    AT._TILED_CONFIGS = tiles

            base_f, base_b = run({}, None)
            # the launcher's choice for these operands (the unaligned tiles at large_odd / long_odd)
            bd, bl, nw = A.launch_config(D, D, L, "fwd", dtype, q, H, None, None)
            _, blb, nwb = A.launch_config(D, D, L, "bwd_row", dtype, q, H, None, dc, dw)
            ns, _ = A.split_plan(B * T, L, bl, dev)
            tag = f"{size:6} {dname:9}"
            print(f"[sweep] {tag} launcher fwd BL={bl} nw={nw} splits={ns}: {base_f:.4f} ms {gb / base_f * 1e3:7.1f} GB/s"
                  f" | bwd BL={blb} nw={nwb}: {base_b:.4f} ms", flush=True)
            # (block config, splits, num_stages, tiled, tile): the pipelining depth first (what session 10 opened)
            cands = [({}, None, ns_, False, None) for ns_ in (2, 3)]
            if T > 1 and dtype in (torch.float16, torch.bfloat16):
                cands += [({}, None, ns_, True, None) for ns_ in (1, 2, 3)]
                cands += [] if a.stages_only else [({}, None, None, True, t) for t in TILED_TILES.get(block_d, ())]
            cands += [] if a.stages_only else [({"fwd": g, "bwd_row": g}, None, None, False, None) for g in GRID]
            if T == 1 and not a.stages_only:
                want = -(-2 * sms // (B * T))
                cands += [({}, s, None, False, None) for s in sorted({1, max(1, want // 2), 2 * want, 4 * want, 8 * want})]
            for kind_cfg, splits, ns_, tiled, tile in cands:
                if time.time() > t_end:
                    print("[sweep] time budget spent", flush=True)
                    return 0
                what = f"cfg={kind_cfg.get('fwd', 'launcher')} splits={splits} stages={ns_ or 'launcher'}" + \
                    (" tiled" if tiled else "") + (f" tile fwd={tile[0]} bwd={tile[1]}" if tile else "")
                try:
                    f, b = run(kind_cfg, splits, ns_, tiled, tile)
                except Exception as e:  # noqa: BLE001 (an out-of-resources config: say so, go on)
                    print(f"[sweep] {tag} {what}: failed {type(e).__name__}: {str(e)[:100]}")
                    continue
                print(f"[sweep] {tag} {what}: fwd {f:.4f} ms "
                      f"({base_f / f:4.2f}x launcher, {gb / f * 1e3:7.1f} GB/s) | bwd {b:.4f} ms ({base_b / b:4.2f}x)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
