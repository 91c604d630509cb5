"""Per-kernel CUDA time of the qkvz block (issue #3): where the time of ``ours`` goes, kernel by kernel.

For each (shape, T, rank, adapters) it runs, under ``torch.profiler``, ``base`` (one cuBLAS GEMM over the
packed weights), ``ours`` (``fx_passes.qkvz_gemm_lora``, default dispatch) and ``ours_2op`` (``qkvz_gemm``
+ ``qkvz_lora_`` in place) ``--iters`` times each, rotating over weight sets that cover 2x the L2, and
prints every kernel's mean CUDA time per call. The kernels are summed back-to-back time, not the
overlapped wall time of a CUDA-graph replay (``bench_qkvz_lora.py`` measures that).

    python -m benchmarks.profile_block --shapes 35B-A3B,27B --T 4096 --rank 16,64 --adapters 1,4

Shapes: ``benchmarks.common.SHAPES``. With $OUT set, one data row per (shape, r, adapters, T, variant)
goes to $OUT/profile_block.json (a JSON list, each row stamped by ``benchmarks.common.environment``).
"""
from __future__ import annotations

import argparse
import collections

import torch

from benchmarks.bench_qkvz_lora import Problem
from benchmarks.common import (SHAPES, environment, gdn_dims, json_path, packed_weight_bytes, result_row,
                               rotation_sets, select_shapes, write_rows)


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Mean CUDA time per call (us) of every kernel ``fn`` launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.name[:60]] += evt.device_time / iters
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def host_us(fn, iters: int, profile_top: int = 0) -> float:
    """Host (CPU) time per call of ``fn`` in us: calls issued back to back without a sync (the GPU queue
    absorbs the kernels), so this is the Python + dispatch + launch cost a caller without CUDA graphs pays.
    ``profile_top``: also print cProfile's costliest functions (cumulative)."""
    import cProfile
    import pstats
    import time

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    us = (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize()
    if profile_top:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iters):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(profile_top)
    return us


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--T", default="4096")
    p.add_argument("--rank", default="16,64")
    p.add_argument("--adapters", default="1,4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variants", default="base,ours,ours_2op",
                   help="comma list of bench_qkvz_lora.Problem methods: base, ours, ours_2op, ours_prefill")
    p.add_argument("--ids", default="random", choices=["random", "runs"], help="token -> adapter layout (L > 1)")
    p.add_argument("--shrink-bm", default=None,
                   help="comma list: also profile the large-T LoRA delta (write mode) with these shrink token tiles")
    p.add_argument("--host", type=int, default=0, metavar="N",
                   help="also each variant's host time per call (no sync between calls) and cProfile's N "
                        "costliest functions")
    args = p.parse_args()
    from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_, plan_lora

    env = environment("cuda")
    print(f"torch {env['torch']} triton {env['triton']} device {env['gpu']} commit {env['commit']}", flush=True)
    rows, path = [], json_path("profile_block")
    seed = 7
    for name, spec in select_shapes(args.shapes).items():
        H, Dk, Dv = gdn_dims(spec)
        for r in (int(v) for v in args.rank.split(",")):
            for L in (int(v) for v in args.adapters.split(",")):
                seed += 1
                n_sets = rotation_sets(packed_weight_bytes(spec), "cuda")   # W never served from L2
                probs = [Problem(H, Dk, Dv, r, L, torch.bfloat16, "cuda", seed + i) for i in range(n_sets)]
                for T in (int(v) for v in args.T.split(",")):
                    x, ids, idxs = probs[0].inputs(T, seed, args.ids)
                    for variant in args.variants.split(","):
                        fns = [getattr(pr, variant) for pr in probs]

                        def run(fns=fns):
                            for fn in fns:
                                fn(x, ids, idxs)
                        times = kernel_times(run, args.iters)
                        total = sum(times.values()) / len(probs)
                        print(f"{name} r={r} L={L} T={T} {variant:9s} total {total:8.1f} us | " + " | ".join(
                            f"{k} {v / len(probs):.1f}" for k, v in times.items()), flush=True)
                        rows.append(result_row(env, shape=name, r=r, adapters=L, T=T, variant=variant,
                                               ids=args.ids, total_us=total,
                                               kernels_us={k: v / len(probs) for k, v in times.items()}))
                        if args.host:
                            rows[-1]["host_us"] = host_us(lambda: fns[0](x, ids, idxs), 200, args.host)
                            print(f"    host {rows[-1]['host_us']:.1f} us per call", flush=True)
                        write_rows(path, rows)
                    for bm in ([int(v) for v in args.shrink_bm.split(",")] if args.shrink_bm else []):
                        pr = probs[0]
                        out = x.new_empty((T, pr.N))

                        def delta(bm=bm, pr=pr, out=out):
                            lora = pr.lora(ids)
                            lora_shrink_expand_(out, x, lora, accumulate=False,
                                                config=plan_lora(x, lora, shrink_block_m=bm))
                        times = kernel_times(delta, args.iters)
                        print(f"{name} r={r} L={L} T={T} delta shrink_bm={bm}: " + " | ".join(
                            f"{k} {v:.1f}" for k, v in times.items()), flush=True)
                        rows.append(result_row(env, shape=name, r=r, adapters=L, T=T, variant=f"delta_shrink_bm{bm}",
                                               ids=args.ids, total_us=sum(times.values()), kernels_us=times))
                        write_rows(path, rows)
                del probs
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
