"""Launch-configuration sweep of the small-T fused qkvz GEMM + LoRA kernel (issue #3).

For the Qwen3.5 shapes and small T, one run times (CUDA-graph replay medians, bf16, fresh random data):

* base        ONE cuBLAS GEMM over the packed [W_qkv; W_z] (no LoRA);
* gemm_<cfg>  our Triton GEMM alone (``lora=None``) for each launch configuration;
* fused_<cfg> shrink + our GEMM with the LoRA expand in its epilogue (PDL), for the best GEMM configs;

and checks every fused result against the fp32 reference. It picks, per (shape, T bucket), the
configuration to record in ``fx_passes/ops/configs/<device>.json`` (``decode.blocks``).

    python -m benchmarks.sweep_fused_decode [--shapes 35B] [--T 1,64] [--budget-s 420]

Shapes: ``benchmarks.common.SHAPES``. With $OUT set, one data row per (shape, T) goes to
$OUT/sweep_fused_decode.json (a JSON list, each row stamped by ``benchmarks.common.environment``).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_qkvz_lora import Problem
from benchmarks.common import (SHAPES, Timer, environment, gdn_dims, json_path, rel_err, result_row,
                               select_shapes, write_rows)

# (block_n, block_k, num_stages, num_warps); configs over the H200's 227 KB of shared memory were dropped
# after the first sweep (n128k256, n64k256s5, n128k128s5, n64k128s8, n64k256s4w8)
GEMM_CONFIGS = [dict(block_n=bn, block_k=bk, num_stages=st, num_warps=w) for bn, bk, st, w in (
    (32, 128, 3, 4), (32, 128, 5, 4), (32, 256, 3, 4), (32, 256, 5, 4), (64, 128, 3, 4), (64, 128, 5, 4),
    (64, 256, 3, 4), (128, 128, 3, 4), (128, 128, 4, 8),
    # second sweep, for T = 64: shallower K tiles, deeper pipelines, 8 warps
    (64, 64, 6, 4), (64, 64, 8, 4), (128, 64, 4, 4), (128, 64, 6, 8), (64, 128, 4, 4), (64, 128, 4, 8),
    (32, 128, 4, 4),
)]
# --large: is our Triton GEMM (swap-AB tiles, LoRA in the epilogue) a match for cuBLAS at prefill?
LARGE_CONFIGS = [dict(block_n=bn, block_t=bt, block_k=bk, num_stages=st, num_warps=w) for bn, bt, bk, st, w in (
    (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (256, 64, 64, 3, 8),
    (128, 64, 128, 3, 8),
)]


def cfg_name(c):
    t = f"t{c['block_t']}" if "block_t" in c else ""
    return f"n{c['block_n']}{t}k{c['block_k']}s{c['num_stages']}w{c['num_warps']}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--T", default="1,64")
    p.add_argument("--top", type=int, default=3, help="GEMM configs per (shape, T) tried with LoRA (0: none)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting new work after this")
    p.add_argument("--rep", type=float, default=20.0)
    p.add_argument("--large", action="store_true", help="prefill-size configs (LARGE_CONFIGS), e.g. --T 4096")
    p.add_argument("--ksplit", default=None, help="comma list of shrink split-K caps timed with the default blocks")
    p.add_argument("--adapter-fp32", action="store_true", help="fp32 A/B on the bf16 base (PEFT's default)")
    p.add_argument("--lora", default="16x1,64x1,16x4,64x4", help="rank x adapters combos tried with LoRA")
    args = p.parse_args()
    from fx_passes.ops.kernels.gemm_lora_decode import gemm_lora_decode, plan_decode

    def decode(x, pr, ids, *, with_lora=True, **force):
        """The decode kernel with a forced launch (``force``: fx_passes.ops.tuning.decode_launch's)."""
        lora = pr.lora(ids) if with_lora else None
        return gemm_lora_decode(x, [pr.Wqkv, pr.Wz], lora, config=plan_decode(x, [pr.Wqkv, pr.Wz], lora, **force))

    t_start = time.time()
    timer = Timer("cuda", args.rep)
    env = environment("cuda")
    print(f"torch {env['torch']} triton {env['triton']} device {env['gpu']} commit {env['commit']}", flush=True)
    results = []
    path = json_path("sweep_fused_decode")

    def dump():
        write_rows(path, [result_row(env, **r) for r in results])

    seed = 100
    for name, spec in select_shapes(args.shapes).items():
        H, Dk, Dv = gdn_dims(spec)
        for T in [int(t) for t in args.T.split(",")]:
            if time.time() - t_start > args.budget_s:
                print("budget reached", flush=True)
                break
            seed += 1
            prob = Problem(H, Dk, Dv, 16, 1, torch.bfloat16, "cuda", seed)
            x, _, _ = prob.inputs(T, seed)
            row = dict(shape=name, T=T, base=timer(lambda: prob.base(x, None, None)))
            ref_gemm = (x.float() @ prob.Wcat.float().t())
            gemm = {}
            for c in (LARGE_CONFIGS if args.large else GEMM_CONFIGS) if args.top else []:   # --top 0: no GEMM sweep
                if time.time() - t_start > args.budget_s:
                    break
                fn = lambda c=c: decode(x, prob, None, with_lora=False, **c)  # noqa: E731
                try:
                    y = fn()
                    err = ((y.float() - ref_gemm).norm() / ref_gemm.norm()).item()
                    gemm[cfg_name(c)] = (timer(fn), err, c)
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    print(f"  {cfg_name(c)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            ranked = sorted(gemm.items(), key=lambda kv: kv[1][0])
            row["gemm"] = {k: dict(ms=v[0], err=v[1], x=v[0] / row["base"]) for k, v in ranked}
            print(f"{name} T={T} base={row['base']:.4f} ms  GEMM alone: " + "  ".join(
                f"{k}={v[0] / row['base']:.3f}x" for k, v in ranked[:6]), flush=True)
            row["fused"] = {}
            for r, L in [tuple(int(v) for v in c.split("x")) for c in args.lora.split(",")]:
                if time.time() - t_start > args.budget_s:
                    break
                seed += 1
                prob_l = Problem(H, Dk, Dv, r, L, torch.bfloat16, "cuda", seed)
                if args.adapter_fp32:
                    for name_ in ("Aqkv", "Az", "Bqkv", "Bz", "Acat"):
                        setattr(prob_l, name_, getattr(prob_l, name_).float())
                    d = prob_l.Dk
                    prob_l.lora_a = [prob_l.Aqkv, prob_l.Az]
                    prob_l.lora_b = [prob_l.Bqkv[..., :d, :], prob_l.Bqkv[..., d:2 * d, :], prob_l.Bqkv[..., 2 * d:, :],
                                     prob_l.Bz]
                x_l, ids, _ = prob_l.inputs(T, seed)
                ref = prob_l.reference(x_l, ids)
                base_l = timer(lambda: prob_l.base(x_l, None, None))
                ours_op = timer(lambda: prob_l.ours(x_l, ids, None))   # the registered op, default dispatch
                cells = {"base": base_l, "ours_op": ours_op,
                         "ours_2op": timer(lambda: prob_l.ours_2op(x_l, ids, None))}
                for ks in ([int(v) for v in args.ksplit.split(",")] if args.ksplit else []):
                    fn = lambda ks=ks: decode(x_l, prob_l, ids, shrink_ksplit=ks)  # noqa: E731
                    cells[f"err_ks{ks}"] = rel_err(fn(), ref)
                    cells[f"ks{ks}"] = timer(fn)
                for k, (_, _, c) in ranked[: args.top]:
                    fn = lambda c=c: decode(x_l, prob_l, ids, **c)  # noqa: E731
                    y = fn()
                    err = rel_err(y, ref)
                    cells[k] = timer(fn)
                    cells[f"err_{k}"] = err
                row["fused"][f"r{r}_L{L}"] = cells
                print(f"   r={r} L={L} base={base_l:.4f} op={ours_op / base_l:.3f}x 2op={cells['ours_2op'] / base_l:.3f}x  " + "  ".join(
                    f"{k}={v / base_l:.3f}x" for k, v in cells.items()
                    if not k.startswith("err_") and k not in ("base", "ours_op", "ours_2op")) + "  err " + " ".join(
                    f"{v:.1e}" for k, v in cells.items() if k.startswith("err_")), flush=True)
                del prob_l
            results.append(row)
            dump()
            del prob
            torch.cuda.empty_cache()
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
