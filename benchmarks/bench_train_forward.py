"""The training op's forward at real widths (issue 17): the base GEMMs with the expand in their epilogue
(``gemm_lora_train.GemmExpand``) against what runs below ``train_fused_min_t`` (library GEMMs, then the
expand kernel) and against the frozen block (the library GEMMs alone). bf16 x and weights, fp32 adapters
(PEFT's default), LoRA on qkv and z (one A group each), b / a without LoRA. GPU time: CUDA-graph replays.

    python -m benchmarks.bench_train_forward --shapes 35B-A3B,27B,397B-A17B --T 1024,2048,4096,16384 --rank 16,64

Columns: ``gemm_only`` is the fused kernel with no slices (its GEMM against the library's); ``split`` and
``fused`` include the expand (the shrink runs before either and is not timed: the same kernel in both).
Errors: each output against an fp32 product of the same bf16 / fp32 inputs (relative Frobenius; a bf16
output's own rounding is ~2e-3), and the share of elements where ``fused`` and ``split`` differ.
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from benchmarks.common import (csv_list, environment, json_path, projection_weights, projection_widths, result_row,
                               select_shapes, write_rows)
from fx_passes.ops.kernels import gemm_lora_train as glt
from fx_passes.ops.kernels import lora_train as lt


def gpu_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="35B-A3B,27B,397B-A17B")
    ap.add_argument("--T", default="1024,2048,4096,16384")
    ap.add_argument("--rank", default="16,64")
    ap.add_argument("--epilogue-dot", default=None, help="force the fused kernel's epilogue dot (bf16x3, tf32x3, tf32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment("cuda")
    rows = []
    for name, spec in select_shapes(args.shapes).items():
        H = spec.hidden_size
        widths = projection_widths(spec)
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = projection_weights(spec, g)
        for r in csv_list(args.rank, int):
            lora_b = [torch.randn(n, r, device="cuda", generator=g) * r ** -0.5 for n in widths[:2]]
            sl = lt.Slices((widths[0], widths[1]), (0, 0), (0, r), (r, r), (2.0, 2.0))
            for T in csv_list(args.T, int):
                x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
                s = torch.randn(T, 2 * r, device="cuda", generator=g)
                fused = glt.GemmExpand(sl, (0, 1), widths, T, H, x.dtype, s.dtype, x.device,
                                       epilogue_dot=args.epilogue_dot)
                bare = glt.GemmExpand(lt.Slices((), (), (), (), ()), (), widths, T, H, x.dtype, s.dtype, x.device)
                expand = lt.ExpandAdd(sl, T, s.dtype, tensor_of=(0, 1))

                def split():
                    outs = [x @ w.t() for w in weights]
                    expand(outs[:2], s, lora_b)
                    return outs

                frozen = lambda: [x @ w.t() for w in weights]   # noqa: E731
                got_f, got_s = fused(x, weights, s, lora_b), split()
                ref = [x.float() @ w.float().t() for w in weights]
                for p in range(2):
                    ref[p] += 2.0 * s[:, p * r:(p + 1) * r] @ lora_b[p].t()
                differ = sum((a != b).sum().item() for a, b in zip(got_f, got_s)) / sum(o.numel() for o in got_s)
                t = {k: gpu_ms(fn) for k, fn in (("frozen", frozen), ("gemm_only", lambda: bare(x, weights, s, [])),
                                                  ("split", split), ("fused", lambda: fused(x, weights, s, lora_b)))}
                err = {k: max(_rel(o, want) for o, want in zip(outs, ref)) for k, outs in
                       (("fused", got_f), ("split", got_s))}
                print(f"{name:10s} r{r:<3d} T{T:<6d} frozen {t['frozen'] * 1e3:8.1f} us  gemm_only "
                      f"{t['gemm_only'] / t['frozen']:.3f}x  split {t['split'] / t['frozen']:.3f}x  fused "
                      f"{t['fused'] / t['frozen']:.3f}x  split/fused {t['split'] / t['fused']:.3f}  err fused "
                      f"{err['fused']:.2e} split {err['split']:.2e}  differ {differ:.4f}", flush=True)
                rows.append(result_row(env, shape=name, r=r, T=T, epilogue_dot=fused.meta["EPILOGUE_DOT"], **{f"{k}_us": v * 1e3 for k, v in t.items()},
                                       err_fused=err["fused"], err_split=err["split"], differ=differ))
                write_rows(json_path("bench_train_forward", args.json), rows)


if __name__ == "__main__":
    main()
