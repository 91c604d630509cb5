"""Host cost of the training op's calls (issue 17): at small T the GPU finishes before the host has
launched the next kernel, so a step's time is its Python and launch work. Times (perf_counter, GPU
synchronized at the end, median of --reps) one compiled forward + backward step of the projection block
per variant at T --T, and each piece of the fused op called directly.

    python -m benchmarks.train_host --shape 35B-A3B --T 64
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from benchmarks.bench_train_block import build, step_fn
from benchmarks.common import projection_widths, select_shapes
from fx_passes.backend import FxPassesBackend
from fx_passes.config import QkvzFusionConfig
from fx_passes.ops.kernels import lora_train
from fx_passes.ops.qkvz_lora_train import check_train_args

qlt = importlib.import_module("fx_passes.ops.qkvz_lora_train")   # the module (fx_passes.ops exports the op)


def host_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def profile_calls(name: str, fn, calls: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    print(f"--- cProfile: {name} x {calls}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="35B-A3B")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--cprofile", action="store_true", help="cProfile the op calls (top functions by own time)")
    args = ap.parse_args()
    spec = select_shapes(args.shape)[args.shape]
    frozen = build(spec, args.rank, 0.0, "cuda", lora=False)
    lora = build(spec, args.rank, 0.0, "cuda", lora=True)
    x = torch.randn(args.T, spec.hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_()
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in frozen(x)]
    for variant, model in (("frozen", frozen), ("inductor", lora), ("fx_passes", lora)):
        torch._dynamo.reset()
        backend = FxPassesBackend(QkvzFusionConfig(fuse_training=True)) if variant == "fx_passes" else "inductor"
        step = step_fn(torch.compile(model, backend=backend, dynamic=False), [x], grads)
        print(f"step {variant:9s} {host_us(step, args.reps):8.1f} us host", flush=True)
        if args.cprofile and variant != "frozen":
            profile_calls(f"step {variant}", step, 100)

    # the pieces, on arguments shaped like the rewrite's without dropout (x itself as every group's input)
    g = torch.Generator().manual_seed(0)
    H, T, r = spec.hidden_size, args.T, args.rank
    widths = projection_widths(spec)
    dev = dict(device="cuda")
    xb = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    weights = [torch.randn(n, H, generator=g).to("cuda", torch.bfloat16) for n in widths]
    lora_a = [torch.randn(r, H, **dev), torch.randn(r, H, **dev)]
    lora_b = [torch.randn(widths[0], r, **dev), torch.randn(widths[1], r, **dev)]
    slice_a, slice_start, scales = [0, 1], [0, widths[0]], [2.0, 2.0]
    fwd = (xb, [xb, xb], weights, lora_a, lora_b, slice_a, slice_start, scales)
    outs, s = torch.ops.fx_passes.qkvz_lora_train(*fwd)
    dys = [torch.randn_like(o) for o in outs]
    bwd = (dys, [xb], weights, lora_a, lora_b, s, None, slice_a, slice_start, scales, [0, 0], 0, True, True, True)
    sl = lora_train.Slices((widths[0], widths[1]), (0, 0), (0, r), (r, r), (2.0, 2.0))
    pieces = {
        "op forward (no grad)": lambda: torch.ops.fx_passes.qkvz_lora_train(*fwd),
        "_train_cuda (no dispatcher)": lambda: qlt._train_cuda(*fwd),
        "check_train_args": lambda: check_train_args(*fwd),
        "4 base mm": lambda: [xb @ w.t() for w in weights],
        "expand_add_": lambda: lora_train.expand_add_([outs[0], outs[1]], s, lora_b, sl),
        "backward op": lambda: torch.ops.fx_passes.qkvz_lora_train_backward(*bwd),
        "_backward_cuda (no dispatcher)": lambda: qlt._backward_cuda(*bwd),
        "1 mm": lambda: xb @ weights[0].t(),
        "1 empty op": lambda: torch.empty(1, device="cuda"),
    }
    # the backward op's parts, on its plan for these arguments
    torch.ops.fx_passes.qkvz_lora_train_backward(*bwd)
    plan = qlt._BACKWARD_PLANS.get(qlt._signature(*bwd), lambda: None)
    dy_of = [dys[p] for p in plan.out_of]
    d_s, d_b = plan.dsdb(dy_of, lora_b, s)
    d_a = plan.da([xb], d_s)
    bs = qlt._x_side_bs(plan.x_side, lora_a)
    d_x = qlt._sum_of_products(dys, weights)
    pieces.update({
        "  backward signature": lambda: qlt._signature(*bwd),
        "  dx GEMMs": lambda: qlt._sum_of_products(dys, weights),
        "  dS + dB kernel, sums": lambda: plan.dsdb(dy_of, lora_b, s),
        "  dB pieces": lambda: qlt._pieces(d_b, [(slice(row, row + b.shape[0]), slice(0, b.shape[1])) for row, b in
                                                 zip(plan.db_rows, lora_b)], torch.float32, False),
        "  dA kernel, sums": lambda: plan.da([xb], d_s),
        "  dA pieces": lambda: qlt._pieces(d_a, [(slice(off, off + r),) for off in plan.offs], torch.float32, False),
        "  x-side B (cat of A)": lambda: qlt._x_side_bs(plan.x_side, lora_a),
        "  dx kernel (+ empty)": lambda: plan.dx([torch.empty_like(d_x)], d_s, bs, srcs=[d_x]),
    })
    with torch.no_grad():
        for name, fn in pieces.items():
            print(f"{name:28s} {host_us(fn, args.reps):8.1f} us host", flush=True)
        if args.cprofile:
            for name in ("op forward (no grad)", "backward op"):
                profile_calls(name, pieces[name], 200)


if __name__ == "__main__":
    main()
