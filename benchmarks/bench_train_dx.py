"""x's gradient in the training op's backward at real widths (issue 17): ``dx = sum_p dy_p @ W_p`` plus x's
LoRA gradient ``dS @ A``, as one GEMM with the LoRA in its epilogue (``gemm_lora_train.GemmDx``) against what
runs below ``train_fused_min_t`` (library GEMMs accumulating into dx, then the expand kernel adding the LoRA
part: ``split``) and against the frozen block's dx (the library GEMMs alone). bf16 dy and weights, fp32
adapters (PEFT's default), LoRA on qkv and z (one A group each: dS has 2 r columns), the 4 projections of a
GDN layer (qkv, z, b, a). GPU time: CUDA-graph replays.

    python -m benchmarks.bench_train_dx --shapes 35B-A3B,27B,397B-A17B --T 2048,8192 --rank 16,64

Columns: ``gemm_only`` is the fused kernel with no LoRA (its GEMM against the library's), ``expand`` the
expand kernel alone (its share of ``split``), ``--configs`` more tile choices of the fused kernel
(``BMxBNxBKsSTAGESwWARPS``), ``whole`` the fused kernel without the last wave's half tiles where it has them
(``gemm_lora_train.tail_tiles``), ``device_desc`` the fused kernel making its TMA descriptors on the device
(it takes host-made ones). dA (``dS^T x``, the op's next gradient over x): ``da_kernel`` is the dA kernel of its
own with the sums of its token splits (``lora_train.LoraDb``), ``fused_da`` the fused kernel computing dA on its
lighter programs (``GemmDx.with_da``, where ``gemm_lora_train.dx_schedule`` finds room; ``-`` elsewhere), and
``(fused + da_kernel) / fused_da`` what that saves. Errors: against an fp32 product of the same inputs (relative
Frobenius).
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from benchmarks.common import (csv_list, environment, json_path, projection_weights, projection_widths, result_row,
                               select_shapes, write_rows)
from fx_passes.ops.kernels import gemm_lora_train as glt
from fx_passes.ops.kernels import lora_train as lt
from fx_passes.ops.tuning import PrefillLaunch, device_info


def gpu_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def parse_config(text: str) -> PrefillLaunch:
    """``128x256x64s3w8`` -> PrefillLaunch(128, 256, 64, 3, 8)."""
    tiles, rest = text.split("s")
    stages, warps = rest.split("w")
    bm, bn, bk = (int(v) for v in tiles.split("x"))
    return PrefillLaunch(bm, bn, bk, int(stages), int(warps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="35B-A3B,27B,397B-A17B")
    ap.add_argument("--T", default="2048,8192")
    ap.add_argument("--rank", default="16,64")
    ap.add_argument("--configs", default="", help="more tile choices of the fused kernel, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment("cuda")
    sms = device_info(torch.device("cuda")).sms
    configs = [parse_config(c) for c in csv_list(args.configs, str)] if args.configs else []
    rows = []
    for name, spec in select_shapes(args.shapes).items():
        H = spec.hidden_size
        widths = projection_widths(spec)
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = projection_weights(spec, g)
        for r in csv_list(args.rank, int):
            lora_a = [torch.randn(r, H, device="cuda", generator=g) * H ** -0.5 for _ in range(2)]
            a_cat = torch.cat(lora_a)
            side = lt.Slices((H,), (0,), (0,), (2 * r,), (1.0,))
            for T in csv_list(args.T, int):
                dys = [torch.randn(T, n, device="cuda", generator=g).to(torch.bfloat16) for n in widths]
                ds = torch.randn(T, 2 * r, device="cuda", generator=g)
                fused = glt.GemmDx([r, r], widths, T, H, torch.bfloat16, ds.dtype, ds.device)
                bare = glt.GemmDx([], widths, T, H, torch.bfloat16, ds.dtype, ds.device)
                expand = lt.ExpandAdd(side, T, ds.dtype)

                def frozen():
                    dx = dys[0] @ weights[0]
                    for d, w in zip(dys[1:], weights[1:]):
                        dx.addmm_(d, w)
                    return dx

                dx0 = frozen()

                def split():
                    new = torch.empty_like(dx0)
                    expand([new], ds, [a_cat.t()], srcs=[frozen()])
                    return new

                def expand_only():
                    expand([dx0], ds, [a_cat.t()], srcs=[dx0])

                ref = sum(d.float() @ w.float() for d, w in zip(dys, weights)) + ds @ a_cat
                got_f, got_s = fused(dys, weights, ds, lora_a), split()
                t = {"frozen": gpu_ms(frozen), "gemm_only": gpu_ms(lambda: bare(dys, weights, ds, [])),
                     "split": gpu_ms(split), "expand": gpu_ms(expand_only),
                     "fused": gpu_ms(lambda: fused(dys, weights, ds, lora_a))}
                # the same kernel making its TMA descriptors on the device (it takes host ones)
                device_desc = glt.GemmDx([r, r], widths, T, H, torch.bfloat16, ds.dtype, ds.device,
                                         host_descriptors=False)
                t["fused_device_desc"] = gpu_ms(lambda: device_desc(dys, weights, ds, lora_a))
                if fused.tail:   # the same kernel without the last wave's half tiles (gemm_lora_train.tail_tiles)
                    whole = glt.GemmDx([r, r], widths, T, H, torch.bfloat16, ds.dtype, ds.device, split_tail=False)
                    t["fused_whole"] = gpu_ms(lambda: whole(dys, weights, ds, lora_a))
                for c in configs:
                    k = glt.GemmDx([r, r], widths, T, H, torch.bfloat16, ds.dtype, ds.device, config=c)
                    t[f"fused_{c.block_m}x{c.block_n}x{c.block_k}s{c.num_stages}w{c.num_warps}"] = gpu_ms(
                        lambda: k(dys, weights, ds, lora_a))
                x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
                da_kernel = lt.LoraDb(side, T, 2 * r, torch.bfloat16, ds.dtype, sms, transposed=True)
                t["da_kernel"] = gpu_ms(lambda: da_kernel([x], ds))
                with_da = glt.GemmDx([r, r], widths, T, H, torch.bfloat16, ds.dtype, ds.device, with_da=True)
                err = {"fused": _rel(got_f, ref), "split": _rel(got_s, ref)}
                da_note = "fused_da -"
                if with_da.da_schedule is not None:
                    t["with_da"] = gpu_ms(lambda: with_da.with_da(dys, weights, ds, lora_a, x))
                    dx_da, da = with_da.with_da(dys, weights, ds, lora_a, x)
                    da_ref = ds.t() @ x.float()
                    err["da"] = _rel(da, da_ref)
                    err["da_kernel"] = _rel(da_kernel([x], ds), da_ref)
                    assert torch.equal(dx_da, got_f), "the fused kernel's dx changed with dA beside it"
                    s_ = with_da.da_schedule
                    da_note = (f"fused_da {t['with_da'] / t['frozen']:.3f}x  (fused + da_kernel) / fused_da "
                               f"{(t['fused'] + t['da_kernel']) / t['with_da']:.3f}  (da_kernel "
                               f"{t['da_kernel'] * 1e3:.1f} us; {s_.fill_cap} dA tiles, {s_.fill} each on programs "
                               f"{s_.heavy}..{s_.programs - 1}; err dA {err['da']:.1e} vs kernel "
                               f"{err['da_kernel']:.1e})")
                extra = "  ".join(f"{k[6:]} {v / t['frozen']:.3f}x" for k, v in t.items() if k.startswith("fused_"))
                extra += f"  (tail {fused.tail} of {fused.programs} programs)" if fused.tail else ""
                expand_gbs = 2 * T * H * 2 / (t["expand"] * 1e-3) / 1e9
                print(f"{name:10s} r{r:<3d} T{T:<6d} frozen {t['frozen'] * 1e3:8.1f} us  gemm_only "
                      f"{t['gemm_only'] / t['frozen']:.3f}x  split {t['split'] / t['frozen']:.3f}x  (expand "
                      f"{t['expand'] * 1e3:.1f} us, {expand_gbs:.0f} GB/s)  fused {t['fused'] / t['frozen']:.3f}x  "
                      f"split/fused {t['split'] / t['fused']:.3f}  err fused {err['fused']:.2e} split "
                      f"{err['split']:.2e}  {extra}  {da_note}", flush=True)
                rows.append(result_row(env, shape=name, r=r, T=T, epilogue_dot=fused.meta["EPILOGUE_DOT"],
                                       **{f"{k}_us": v * 1e3 for k, v in t.items()}, err_fused=err["fused"],
                                       err_split=err["split"]))
                write_rows(json_path("bench_train_dx", args.json), rows)


if __name__ == "__main__":
    main()
