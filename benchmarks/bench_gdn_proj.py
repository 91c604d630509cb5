"""The whole GDN input projection (issue 15): in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, each with its
PEFT LoRA, per layer at the real widths -- separate vs folded into one op.

Variants (each maps x to the layer's four projection outputs; one adapter, rank ``--rank``):

* ``base4``    one cuBLAS GEMM over the packed [W_qkv; W_z; W_b; W_a], no LoRA (the floor);
* ``separate`` the four projections as PEFT computes them and Inductor leaves them without the pass:
               per projection ``x @ W.T + (x @ A.T) @ B.T * s`` (4 GEMMs, 4 shrinks, 4 expands, 4 adds);
* ``qkvz_op``  what the pass did before b / a were folded: ``fx_passes.qkvz_gemm_lora`` over [W_qkv, W_z]
               (4 slices) plus b and a as in ``separate``;
* ``folded``   ``fx_passes.qkvz_gemm_lora`` over [W_qkv, W_z, W_b, W_a], six slices q | k | v | z | b | a in
               four A groups (what the pass emits now).

And, to price b / a inside each GEMM: ``base2`` (cuBLAS over [W_qkv; W_z]) and ``qkvz_only`` (our op over
[W_qkv, W_z] with the 4 slices, no b / a): ``folded - qkvz_only`` is what b / a cost in our kernels,
``base4 - base2`` what they cost cuBLAS.

Timing: CUDA-graph replays of one call per weight set, the sets rotated so that W never comes from L2
(``common.rotation_sets``); rounds interleave the variants; the median round is kept. Every variant is
checked against an fp32 reference of the block before it is timed.

    python -m benchmarks.bench_gdn_proj --T 1,8,32,64,512,2048,4096 --rank 16
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)
from benchmarks.common import (
    SHAPES, csv_list, environment, json_path, result_row, rotation_sets, select_shapes, time_graph, write_rows,
)

SCALE = 2.0
VARIANTS = ("base4", "separate", "qkvz_op", "folded", "base2", "qkvz_only")
CHECKED = ("separate", "qkvz_op", "folded")   # the variants that compute the whole block


class Layer:
    """One GDN layer's four projections (packed, as the fx_passes backend leaves them) and a LoRA on each."""

    def __init__(self, spec, rank: int, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device="cuda")

        H, k, v, nv = spec.hidden_size, spec.key_dim, spec.value_dim, spec.linear_num_value_heads
        self.rows = [2 * k + v, v, nv, nv]
        self.W = rnd(sum(self.rows), H, std=H ** -0.5)
        self.weights, row = [], 0
        for n in self.rows:
            self.weights.append(self.W[row:row + n])
            row += n
        self.A = [rnd(rank, H, std=H ** -0.5) for _ in self.rows]
        self.B = [rnd(n, rank, std=rank ** -0.5) for n in self.rows]
        b_qkv = self.B[0]
        self.lora_b = [b_qkv[:k], b_qkv[k:2 * k], b_qkv[2 * k:], *self.B[1:]]
        self.slice_a = [0, 0, 0, 1, 2, 3]
        self.slice_start = [0, k, 2 * k, 2 * k + v, 2 * k + 2 * v, 2 * k + 2 * v + nv]

    def reference(self, x):
        xf = x.float()
        return torch.cat([xf @ w.float().t() + (xf @ a.float().t()) @ b.float().t() * SCALE
                          for w, a, b in zip(self.weights, self.A, self.B)], 1)

    def base4(self, x):
        return torch.mm(x, self.W.t())

    def base2(self, x):
        return torch.mm(x, self.W[:self.rows[0] + self.rows[1]].t())

    def qkvz_only(self, x):
        return torch.ops.fx_passes.qkvz_gemm_lora(x, self.weights[:2], self.A[:2], self.lora_b[:4], self.slice_a[:4],
                                                  self.slice_start[:4], None, None, SCALE)

    def _peft(self, x, i):
        return x @ self.weights[i].t() + (x @ self.A[i].t()) @ self.B[i].t() * SCALE

    def separate(self, x):
        return [self._peft(x, i) for i in range(4)]

    def qkvz_op(self, x):
        qkvz = torch.ops.fx_passes.qkvz_gemm_lora(x, self.weights[:2], self.A[:2], self.lora_b[:4], self.slice_a[:4],
                                                  self.slice_start[:4], None, None, SCALE)
        return [qkvz, self._peft(x, 2), self._peft(x, 3)]

    def folded(self, x):
        return torch.ops.fx_passes.qkvz_gemm_lora(x, self.weights, self.A, self.lora_b, self.slice_a,
                                                  self.slice_start, None, None, SCALE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="comma-separated prefixes of benchmarks.common.SHAPES")
    p.add_argument("--T", default="1,8,16,32,64,512,1024,2048,4096")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="JSON path (default $OUT/bench_gdn_proj.json)")
    return p.parse_args(argv)


def main(argv=None):
    from fx_passes.ops import dispatch
    from fx_passes.ops.lora_args import LoraSlices

    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    env = environment("cuda")
    path = json_path("bench_gdn_proj", args.json)
    rows = []
    print(f"{'shape':10} {'T':>5} {'path':>14} " + " ".join(f"{v:>9}" for v in VARIANTS)
          + "   folded/base4  separate/folded  qkvz_op/folded  b/a us: ours cuBLAS")
    for name, spec in select_shapes(args.shapes).items():
        first = Layer(spec, args.rank, dtype, 0)
        sets = [first] + [Layer(spec, args.rank, dtype, s) for s in
                          range(1, rotation_sets(first.W.numel() * first.W.element_size(), "cuda"))]
        for T in csv_list(args.T, int):
            xs = [torch.randn(T, spec.hidden_size, dtype=dtype, device="cuda") for _ in sets]
            ref = torch.cat([layer.reference(x) for layer, x in zip(sets, xs)], 1)
            path_name = dispatch.gemm_lora_path(xs[0], tuple(first.weights), LoraSlices.of(
                first.A, first.lora_b, first.slice_a, first.slice_start, None, None, SCALE))
            times = {v: [] for v in VARIANTS}
            errs = {}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    def call(v=v):
                        outs = []
                        for layer, x in zip(sets, xs):
                            out = getattr(layer, v)(x)
                            outs.append(torch.cat(out, 1) if isinstance(out, list) else out)
                        return torch.cat(outs, 1)
                    ms, err = time_graph(call, call())
                    times[v].append(ms / len(sets))
                    # the variants that compute the whole block against its fp32 reference
                    errs[v] = None if v not in CHECKED else (torch.cat(
                        [torch.cat(o, 1) if isinstance(o, list) else o for o in
                         (getattr(layer, v)(x) for layer, x in zip(sets, xs))], 1).float() - ref).norm().item() \
                        / ref.norm().item()
            med = {v: statistics.median(t) for v, t in times.items()}
            row = result_row(env, shape=name, T=T, rank=args.rank, dtype=args.dtype, path=path_name,
                             sets=len(sets), ms=med, rel_err=errs,
                             folded_over_base4=med["folded"] / med["base4"],
                             separate_over_folded=med["separate"] / med["folded"],
                             qkvz_op_over_folded=med["qkvz_op"] / med["folded"],
                             ba_us_ours=(med["folded"] - med["qkvz_only"]) * 1e3,
                             ba_us_cublas=(med["base4"] - med["base2"]) * 1e3)
            rows.append(row)
            write_rows(path, rows)
            print(f"{name:10} {T:5d} {path_name:>14} " + " ".join(f"{med[v] * 1e3:8.1f}u" for v in VARIANTS)
                  + f"   {row['folded_over_base4']:12.3f}  {row['separate_over_folded']:15.2f}"
                  f"  {row['qkvz_op_over_folded']:14.2f}  {row['ba_us_ours']:8.1f} {row['ba_us_cublas']:6.1f}"
                  f"   err {max(e for e in errs.values() if e is not None):.1e}",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
