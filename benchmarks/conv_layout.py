"""The GDN causal conv (``F.conv1d(groups=C, kernel 4, padding 3)``) at decode, per input layout.

At decode each sequence has one token: the conv input is ``[B, C, 1]``, and the layout it arrives in
depends on who produced ``mixed_qkv``: eager / Inductor without LoRA hand it ``(C, 1, C)``, Inductor with
PEFT's LoRA add ``(C, 1, 0)`` (a fresh pointwise output), fx_passes a column slice of the fused projection
``(N_all, 1, ...)``. cuDNN (and ATen's depthwise path) pick kernels by layout, so the same conv can cost
very different times. This script times each layout and lists the kernels it launches.

    python -m benchmarks.conv_layout --C 8192,10240,12288 --B 32,128,256
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import csv_list, environment, json_path, result_row, write_rows


def layouts(B: int, C: int, n_all: int, dtype, device) -> dict[str, torch.Tensor]:
    """The same [B, C, 1] values in each layout a compiled model can hand the conv."""
    base = torch.randn(B, C, dtype=dtype, device=device)
    fused = torch.zeros(B, n_all, dtype=dtype, device=device)
    fused[:, :C] = base
    return {
        "(C,1,0) lora-add": base.as_strided((B, C, 1), (C, 1, 0)),
        "(C,1,C) eager": base.as_strided((B, C, 1), (C, 1, C)),
        "(C,1,1)": base.as_strided((B, C, 1), (C, 1, 1)),
        "(N,1,C) fused slice": fused.as_strided((B, C, 1), (n_all, 1, C)),
        "(N,1,N) fused slice": fused.as_strided((B, C, 1), (n_all, 1, n_all)),
        "(N,1,0) fused slice": fused.as_strided((B, C, 1), (n_all, 1, 0)),
    }


def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x, w, None, padding=w.shape[-1] - 1, groups=x.shape[1])[:, :, : x.shape[-1]]


def time_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key[:70] for e in prof.key_averages() if e.device_type.name == "CUDA"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--C", default="8192,10240,12288", help="conv channels (2 key_dim + value_dim)")
    ap.add_argument("--B", default="32,128,256", help="decode batch (sequences of one token)")
    ap.add_argument("--extra", type=int, default=4160, help="N_all - C: z + b + a columns of the fused output")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    env = environment(dev)
    rows = []
    for C in csv_list(args.C, int):
        w = torch.randn(C, 1, 4, dtype=dtype, device=dev)
        for B in csv_list(args.B, int):
            xs = layouts(B, C, C + args.extra, dtype, dev)
            ref = conv(xs["(C,1,C) eager"].contiguous(), w)
            for name, x in xs.items():
                out = conv(x, w)
                err = (out.float() - ref.float()).abs().max().item()
                us = time_us(lambda: conv(x, w))
                ks = kernels(lambda: conv(x, w))
                print(f"C={C:6d} B={B:4d} {name:22s} {us:9.1f} us  err={err:.1e}  {ks}", flush=True)
                rows.append(result_row(env, C=C, B=B, layout=name, us=us, err=err, kernels=ks))
    write_rows(json_path("conv_layout", args.json), rows)


if __name__ == "__main__":
    main()
