"""The CUDA paths of ``fx_passes::qkvz_gemm_lora`` compiled for the GPU (CI runs them only through the
Triton interpreter): every dispatch path (decode kernel, two-launch LoRA, delta-then-accumulate, prefill
kernel) on several slice layouts, up to four weights and 6 slices in 4 A groups (a GDN layer with its
b / a projections folded in: q | k | v | z | b | a), weights packed into one buffer or not, with one and
several adapters, against an fp32 reference.

    python -m benchmarks.gpu_kernel_check                    # prints one line per case and the worst error
    python -m benchmarks.gpu_kernel_check --layouts qkvzba   # some layouts only
    python -m benchmarks.gpu_kernel_check --cpu              # the same through the Triton interpreter (slow)
"""
from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:   # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401  (registers torch.ops.fx_passes.*)
from fx_passes.ops import dispatch  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402
from fx_passes.ops.qkvz_lora import qkvz_lora_reference  # noqa: E402

KEY, VALUE, HIDDEN, NV = 128, 256, 512, 32
N_QKV = 2 * KEY + VALUE
N_Z = N_QKV + VALUE
# name: (weight rows, slice column spans as (first, end), slice -> A group, packed)
LAYOUTS = {
    "qkvz": ([N_QKV, VALUE], [(0, KEY), (KEY, 2 * KEY), (2 * KEY, N_QKV), (N_QKV, N_Z)], [0, 0, 0, 1], True),
    "qkv_only": ([N_QKV, VALUE], [(0, KEY), (KEY, 2 * KEY), (2 * KEY, N_QKV)], [0, 0, 0], True),
    "qkvzba": ([N_QKV, VALUE, NV, NV], [(0, KEY), (KEY, 2 * KEY), (2 * KEY, N_QKV), (N_QKV, N_Z), (N_Z, N_Z + NV),
                                       (N_Z + NV, N_Z + 2 * NV)], [0, 0, 0, 1, 2, 3], True),
    "qkvzba_unpacked": ([N_QKV, VALUE, NV, NV], [(0, KEY), (KEY, 2 * KEY), (2 * KEY, N_QKV), (N_QKV, N_Z),
                                                (N_Z, N_Z + NV), (N_Z + NV, N_Z + 2 * NV)], [0, 0, 0, 1, 2, 3], False),
}
TOL = 5e-3   # fp16 output (one rounding ~5e-4), relative to max |reference|; a wrong slice is O(1)


def case(T, layout, adapters, rank=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, spans, slice_a, _ = LAYOUTS[layout]
    lead = (adapters,)
    w = torch.randn(sum(rows), HIDDEN, generator=g) * HIDDEN ** -0.5
    x = torch.randn(T, HIDDEN, generator=g)
    lora_a = [torch.randn(*lead, rank, HIDDEN, generator=g) * HIDDEN ** -0.5 for _ in range(max(slice_a) + 1)]
    lora_b = [torch.randn(*lead, e - s, rank, generator=g) * rank ** -0.5 for s, e in spans]
    ids = torch.randint(-1, adapters, (T,), generator=g)
    scales = torch.rand(adapters, generator=g) + 0.5
    return x, w, lora_a, lora_b, slice_a, [s for s, _ in spans], ids, scales


def _weights(w: torch.Tensor, rows: list, packed: bool) -> tuple:
    """Row blocks of ``w``: views of the one buffer (packed) or a copy each (one GEMM per weight)."""
    out, row = [], 0
    for n in rows:
        out.append(w[row:row + n] if packed else w[row:row + n].clone())
        row += n
    return tuple(out)


def main() -> int:
    device = "cpu" if "--cpu" in sys.argv else "cuda"
    chosen = sys.argv[sys.argv.index("--layouts") + 1].split(",") if "--layouts" in sys.argv else list(LAYOUTS)
    worst = 0.0
    for layout in chosen:
        for adapters in (1, 3):
            for T, ab_dtype in [(1, torch.float16), (16, torch.float16), (64, torch.float16),
                                (200, torch.float16), (600, torch.float16), (16, torch.float32),
                                (600, torch.float32)]:
                x, w, a, b, slice_a, starts, ids, scales = case(T, layout, adapters)
                want = x @ w.t()
                qkvz_lora_reference(want, x, a, b, slice_a, starts, ids, scales, 0.5)
                dev = lambda t, dt=torch.float16: t.to(device, dt)   # noqa: E731
                rows, _, _, packed = LAYOUTS[layout]
                weights = _weights(dev(w), rows, packed)
                lora = LoraSlices.of([dev(t, ab_dtype) for t in a], [dev(t, ab_dtype) for t in b], slice_a,
                                     starts, ids.to(device), scales.to(device), 0.5)
                xc = dev(x)
                path = dispatch.gemm_lora_path(xc, weights, lora)
                got = dispatch.gemm_lora(xc, weights, lora).float().cpu()
                err = ((got - want).abs().max() / want.abs().max()).item()
                worst = max(worst, err)
                print(f"{layout:15s} L={adapters} T={T:4d} adapters {str(ab_dtype)[6:]:8s} {path:15s} "
                      f"err {err:.1e}", flush=True)
    print(f"worst {worst:.1e} (limit {TOL})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
