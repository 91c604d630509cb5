"""The CUDA code of the training ops compiled for the GPU (CI runs it only through the Triton interpreter,
which has no bf16): ``_train_cuda`` and ``_backward_cuda`` of ``fx_passes::qkvz_lora_train`` / ``_backward`` on
layouts with tails (tokens, columns, ranks), against the ops' torch implementations in fp64 on the CPU:
bf16 and fp16 layers with fp32 adapters (the bf16x3 and tf32x3 dots), a bf16 layer with bf16 adapters;
x itself as every group's LoRA input (the x-side kernels) or one tensor per group (dropout outputs); every
gradient asked for, then only some.

    python -m benchmarks.gpu_train_check             # one line per case, exit 1 on a miss
    python -m benchmarks.gpu_train_check --compiled  # the ops under torch.compile (their CUDA bodies traced
                                                     # into Inductor's graph), T 1200 and 17920 cases
    python -m benchmarks.gpu_train_check --cpu       # fp16 cases at small T through the Triton interpreter
    ... --layouts big-rank                           # some of the layouts

``--compiled`` also asserts that Inductor's code launches the training kernels itself and calls neither
op (from ``train_fused_min_t`` that includes the fused GEMMs of :mod:`fx_passes.ops.kernels.gemm_lora_train`),
and that the forward's outputs equal the eager call's to the bit (the same kernels on the same operands: an
operand Inductor computed otherwise, as a 16-bit rounding it elided, shows there and may pass the bounds).

Bounds (relative Frobenius error against fp64): fp32 results (s, dS, dA, dB) 1e-5; 16-bit results (the
outputs, dx) three times what rounding the fp64 result to their dtype costs, plus 1e-4 (the outputs round
base + LoRA once; dx rounds its GEMMs' sum, then its sum with x's LoRA part).
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys

if "--cpu" in sys.argv:   # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401  (registers torch.ops.fx_passes.*)

DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"
train = importlib.import_module("fx_passes.ops.qkvz_lora_train")   # the module (fx_passes.ops exports the op)

# (projection widths, LoRA slice widths per projection, ranks of the two A groups)
LAYOUTS = {
    "qkvz+ba": ([200, 72, 4, 4], [200, 72], (8, 8)),
    "odd": ([333, 130, 3, 3], [333, 130], (5, 13)),
    "big-rank": ([520, 264, 4, 4], [520, 264], (64, 80)),
    "rank-64": ([520, 264, 4, 4], [520, 264], (48, 64)),   # rank block 64: dS + dB's own launch
    # TMA rows (16-byte strides) in every projection: from train_fused_min_t the forward's fused GEMM
    "tma": ([264, 136, 16, 16], [264, 136], (16, 16)),
    # dx's K long against T: at T 1200 the dx GEMM's lighter programs run dA (gemm_lora_train.dx_schedule)
    "da-fold": ([2048, 1024, 16, 16], [2048, 1024], (16, 16)),
}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def _bound(want: torch.Tensor, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-5
    return 3 * _rel(want.to(dtype), want) + 1e-4


def _case(layout: str, T: int, dtype, adapter_dtype, x_itself: bool, seed: int = 0):
    widths, lora_widths, ranks = LAYOUTS[layout]
    H = 96
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    weights = [torch.randn(n, H, generator=g) * H ** -0.5 for n in widths]
    lora_a = [torch.randn(r, H, generator=g) * H ** -0.5 for r in ranks]
    lora_b = [torch.randn(n, r, generator=g) * r ** -0.5 for n, r in zip(lora_widths, ranks)]
    xs = [x, x] if x_itself else [torch.randn(T, H, generator=g) for _ in ranks]
    dys = [torch.randn(T, n, generator=g) for n in widths]
    slice_a, slice_start, scales = [0, 1], [0, widths[0]], [2.0, 0.5]

    def on_gpu():
        xg = x.to(DEVICE, dtype)
        xsg = [xg, xg] if x_itself else [t.to(DEVICE, adapter_dtype) for t in xs]
        return (xg, xsg, [w.to(DEVICE, dtype) for w in weights], [a.to(DEVICE, adapter_dtype) for a in lora_a],
                [b.to(DEVICE, adapter_dtype) for b in lora_b], [d.to(DEVICE, dtype) for d in dys])

    def in_fp64(gpu):   # the GPU's inputs exactly, in fp64 on the CPU
        xg, xsg, wg, ag, bg, dg = gpu
        x64 = xg.double().cpu()
        xs64 = [x64, x64] if x_itself else [t.double().cpu() for t in xsg]
        return (x64, xs64, [w.double().cpu() for w in wg], [a.double().cpu() for a in ag],
                [b.double().cpu() for b in bg], [d.double().cpu() for d in dg])

    gpu = on_gpu()
    return gpu, in_fp64(gpu), (slice_a, slice_start, scales)


def _compiled(op):
    """``op`` under ``torch.compile`` (static shapes, a fresh compile): the call's result and Inductor's code,
    which must launch our kernels and not call the op."""
    from torch._inductor.utils import run_and_get_code

    def call(*args):
        fn = torch.compile(lambda *a: op(*a), dynamic=False, fullgraph=True)
        result, codes = run_and_get_code(fn, *args)
        code = "\n".join(codes)
        assert "torch.ops.fx_passes.qkvz_lora_train" not in code and "_kernel" in code, code[-3000:]
        return result
    return call


def check(layout: str, T: int, dtype, adapter_dtype, x_itself: bool, compiled: bool = False) -> tuple[float, str]:
    """The worst error / bound of one case (<= 1: within bounds) and what it was measured on."""
    (x, xs, w, a, b, dys), (x64, xs64, w64, a64, b64, dys64), (slice_a, slice_start, scales) = _case(
        layout, T, dtype, adapter_dtype, x_itself)
    worst, worst_name = 0.0, [""]

    def compare(name, got, want, out_dtype):
        nonlocal worst
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if want.numel() == 0 or want.norm() == 0:
            return
        err, bound = _rel(got, want), _bound(want, out_dtype)
        if err / bound > worst:
            worst, worst_name[0] = err / bound, name
        if err > bound:
            print(f"    {name}: error {err:.2e} > bound {bound:.1e}", flush=True)

    forward, backward = train._train_cuda, train._backward_cuda
    if compiled:
        torch._dynamo.reset()
        forward = _compiled(torch.ops.fx_passes.qkvz_lora_train)
        backward = _compiled(torch.ops.fx_passes.qkvz_lora_train_backward)
    outs, s = forward(x, xs, w, a, b, slice_a, slice_start, scales)
    if compiled:   # the traced graph runs the eager call's kernels on the same operands: equal to the bit
        eager_outs, eager_s = train._train_cuda(x, xs, w, a, b, slice_a, slice_start, scales)
        for p, (o, e) in enumerate(zip([*outs, s], [*eager_outs, eager_s])):
            if not torch.equal(o, e):
                worst, worst_name[0] = max(worst, 2.0), f"compiled != eager ({p})"
                print(f"    output {p}: compiled differs from eager by {(o.float() - e.float()).abs().max():.2e}")
    # the ops' torch implementations (their argument checks take no fp64: called past them)
    owners = train.slice_owners([t.shape[0] for t in w64], slice_start, [t.shape[0] for t in b64])
    s64 = train._shrink_reference(xs64, a64)
    outs64 = train.forward_reference(x64, w64, s64, b64, slice_a, owners, scales,
                                     train.group_columns([t.shape[0] for t in a64]))
    for p, (o, o64) in enumerate(zip(outs, outs64)):
        compare(f"out {p}", o, o64, dtype)
    compare("s", s, s64, adapter_dtype)
    distinct, xs_of, x_input = ([x], [0, 0], 0) if x_itself else (xs, [0, 1], -1)
    distinct64 = [x64] if x_itself else xs64
    for flags in [(True, True, True), (True, False, True), (False, True, False)]:
        got = backward(dys, distinct, w, a, b, s, None, slice_a, slice_start, scales, xs_of, x_input, *flags)
        want = train._backward_reference(dys64, distinct64, w64, a64, b64, s.double().cpu(), None, slice_a, scales,
                                         xs_of, x_input, *flags, owners)
        compare(f"dx {flags}", got[0], want[0], dtype)
        compare(f"dS {flags}", got[1], want[1], adapter_dtype)
        for k, (g1, g2) in enumerate(zip(got[2], want[2])):
            compare(f"dA{k} {flags}", g1, g2, adapter_dtype)
        for k, (g1, g2) in enumerate(zip(got[3], want[3])):
            compare(f"dB{k} {flags}", g1, g2, adapter_dtype)
        assert [len(t) for t in got[2:]] == [len(t) for t in want[2:]], flags
    return worst, worst_name[0]


def paths(layout: str, T: int, dtype, adapter_dtype, x_itself: bool) -> str:
    """Which forward and which dx the ops' plans for the case run: ``gemm`` (the fused GEMM, the LoRA in its K
    loop or epilogue) or ``split`` (library GEMMs, then the expand kernel where the LoRA is added); dx ``gemm``
    (dx's GEMMs with x's LoRA gradient in their epilogue; ``gemm+dA``: dA on its lighter programs too) or
    ``split``."""
    widths, lora_widths, ranks = LAYOUTS[layout]
    H = 96

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device=DEVICE, dtype=dt)
    x, weights, dys = empty(T, H), [empty(n, H) for n in widths], [empty(T, n) for n in widths]
    lora_a = [empty(r, H, dt=adapter_dtype) for r in ranks]
    lora_b = [empty(n, r, dt=adapter_dtype) for n, r in zip(lora_widths, ranks)]
    owners = train.slice_owners(widths, [0, widths[0]], lora_widths)
    plan_args = (T, dtype, x if x_itself else None, lora_a, lora_b, [0, 1], [2.0, 0.5], owners)
    fwd = train._plan(*plan_args, False, (x, weights))
    bwd = train._plan(*plan_args, True, (dys, weights), True)
    dx = "split" if bwd.gemm_dx is None else "gemm" if bwd.da is not None else "gemm+dA"
    return f"{'split' if fwd.gemm is None else 'gemm'}/{dx}"


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    # the dx GEMM at H 96 on 132 SMs: T 1200 / 5000 run half tiles only (gemm_lora_train.tail_tiles), T 17920
    # 132 whole tiles, then 8 in halves
    tokens = [1, 70, 1200, 5000, 17920]
    compiled = "--compiled" in sys.argv
    if compiled:
        dtypes, tokens = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)], [1200, 17920]
    if DEVICE == "cpu":   # the interpreter: no bf16, slow
        dtypes, tokens = [(torch.float16, torch.float32)], [1, 70]
    worst_all, misses = 0.0, 0
    layouts = sys.argv[sys.argv.index("--layouts") + 1].split(",") if "--layouts" in sys.argv else LAYOUTS
    for layout, T, (dtype, ad), x_itself in itertools.product(layouts, tokens, dtypes, [True, False]):
        worst, name = check(layout, T, dtype, ad, x_itself, compiled)
        worst_all = max(worst_all, worst)
        misses += worst > 1
        print(f"{layout:9s} T{T:<5d} {str(dtype)[6:]:8s} adapters {str(ad)[6:]:8s} "
              f"{'x itself' if x_itself else 'per group':9s} {paths(layout, T, dtype, ad, x_itself):10s} "
              f"worst error / bound {worst:.3f} ({name})", flush=True)
    print(f"worst error / bound {worst_all:.3f}, {misses} case(s) over", flush=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
