"""Dense T sweep of the whole GDN input projection (issue 16: "no cliffs"): ours / base per shape and adapter
mix, next to vLLM's own punica kernels and the torch-level fusion, drawn as a PNG.

Per layer (W_qkv | W_z | W_b | W_a packed, as the fx_passes backend leaves them; LoRA on all four):

* ``base``   one cuBLAS GEMM over the packed four weights, no LoRA;
* ``ours``   ``fx_passes.qkvz_gemm_lora`` over the four weights, six slices (q | k | v | z | b | a);
* ``vllm``   vLLM 0.32's >= 0.21 form: cuBLAS over W_qkvz + ``lora_shrink`` / ``lora_expand`` over its 4
             slices, and cuBLAS over W_ba + the same over its 2 slices (the punica Triton kernels, run
             without vLLM through the import shim of ``../shared/bench/vllm_shim``: copy it to ``.vllm_shim``
             and carry it; absent -> the column is skipped);
* ``torch``  the torch-level fusion: one GEMM, one shrink over the concatenated A's, one ``addmm_`` per
             projection (several adapters: per adapter over its tokens, ``index_add_``).

Adapters: ``1`` (every token adapter 0) and ``4`` (random ids per token, ~10 % -1). Timing: CUDA-graph replays
(``do_bench_cudagraph``), weight sets rotated past the L2, every variant checked against an fp32 reference.
vLLM's metadata (sorted tokens, active ids) is prepared outside the timed call, as vLLM does per batch.

    python -m benchmarks.sweep_t --shapes 27B,35B,397B,held --T dense --adapters 1,4 --png $OUT/sweep_t.png
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional

import torch

import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)
from benchmarks.common import (
    SHAPES, csv_list, environment, json_path, rel_err, result_row, rotation_sets, select_shapes, write_rows,
)

# Shapes no launch rule or table was fitted on (issue 16: "held-out shapes decide"): Qwen3.5-like, hidden
# 1536-6144, key / value heads of 128 (value heads = num_v_heads: b / a widths 12-40).
HELD_OUT = {
    "held-1536": dataclasses.replace(SHAPES["35B-A3B"], hidden_size=1536, linear_num_key_heads=8,
                                     linear_num_value_heads=12, note="held out"),
    "held-3072": dataclasses.replace(SHAPES["35B-A3B"], hidden_size=3072, linear_num_key_heads=16,
                                     linear_num_value_heads=24, note="held out"),
    "held-6144": dataclasses.replace(SHAPES["27B"], hidden_size=6144, linear_num_key_heads=16,
                                     linear_num_value_heads=40, note="held out"),
}
DENSE_T = list(range(1, 65)) + [65, 96, 100, 129, 192, 255, 300, 384, 511, 513, 777, 1000, 1536, 2048, 3000,
                                4097, 8192]
SCALES = (2.0, 0.5, 1.0, 1.5)


class Layer:
    """One GDN layer's packed weights and L adapters on all four projections."""

    def __init__(self, spec, rank: int, adapters: int, dtype: torch.dtype, seed: int, device: str = "cuda",
                 adapter_dtype: Optional[torch.dtype] = None):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, std, dt=dtype):
            return (torch.randn(*shape, generator=g) * std).to(dtype=dt, device=device)

        H, k, v, nv = spec.hidden_size, spec.key_dim, spec.value_dim, spec.linear_num_value_heads
        self.H, self.L, self.rank = H, adapters, rank
        self.rows = [2 * k + v, v, nv, nv]
        self.N = sum(self.rows)
        self.W = rnd(self.N, H, std=H ** -0.5)
        self.weights, row = [], 0
        for n in self.rows:
            self.weights.append(self.W[row:row + n])
            row += n
        ad = adapter_dtype or dtype   # fp32 adapters on a 16-bit base: PEFT's default
        self.A = [rnd(adapters, rank, H, std=H ** -0.5, dt=ad) for _ in self.rows]     # [L, r, H] per projection
        self.B = [rnd(adapters, n, rank, std=rank ** -0.5, dt=ad) for n in self.rows]  # [L, n, r]
        self.slice_rows = [k, k, v, v, nv, nv]
        self.starts = [sum(self.slice_rows[:i]) for i in range(6)]
        b_qkv = self.B[0]
        self.lora_b = [b_qkv[:, :k], b_qkv[:, k:2 * k], b_qkv[:, 2 * k:], *self.B[1:]]
        self.slice_a = [0, 0, 0, 1, 2, 3]
        self.scales = torch.tensor(SCALES[:adapters], device=device)
        self.scale_list = list(SCALES[:adapters])   # host floats: no sync inside a captured call
        # vLLM: one A per slice (q, k, v each a copy of A_qkv, as expand_packed_lora makes them), the scale
        # folded into B; contiguous [L, n, r] slices
        sc = self.scales.view(-1, 1, 1).to(dtype)
        self.v_a = [self.A[0]] * 3 + self.A[1:]
        self.v_b = [(b * sc).contiguous() for b in self.lora_b]
        self.A_cat = torch.cat(self.A, 1)                                                # [L, 4r, H]

    def reference(self, x, ids):
        xf, out = x.float(), x.float() @ self.W.float().t()
        for l in range(self.L):
            rows = (ids == l)
            for i, (start, n) in enumerate(zip(self.starts, self.slice_rows)):
                a = self.A[self.slice_a[i]][l].float()
                d = (xf @ a.t()) @ self.lora_b[i][l].float().t() * self.scales[l]
                out[:, start:start + n] += d * rows[:, None]
        return out


def layer_sets(spec, rank: int, adapters: int, dtype: torch.dtype, adapter_dtype=None) -> list:
    """The layer and enough copies (other seeds) to rotate the weights past the L2 between calls."""
    first = Layer(spec, rank, adapters, dtype, 0, adapter_dtype=adapter_dtype)
    return [first] + [Layer(spec, rank, adapters, dtype, seed, adapter_dtype=adapter_dtype) for seed in
                      range(1, rotation_sets(first.W.numel() * first.W.element_size(), "cuda"))]


def batch(hidden: int, T: int, adapters: int, copies: int, dtype: torch.dtype) -> tuple:
    """``copies`` inputs [T, hidden] and the token ids: all adapter 0, or random over ``adapters`` with
    ~10 % -1 (no adapter)."""
    g = torch.Generator().manual_seed(T)
    xs = [torch.randn(T, hidden, generator=g).to("cuda", dtype) for _ in range(copies)]
    ids = torch.zeros(T, dtype=torch.int32)
    if adapters > 1:
        ids = torch.randint(0, adapters, (T,), generator=g, dtype=torch.int32)
        ids[torch.rand(T, generator=g) < 0.1] = -1
    return xs, ids.cuda()


class Runner:
    """The variants for one (layer, x, ids)."""

    def __init__(self, layer: Layer, x: torch.Tensor, ids: torch.Tensor, vllm):
        self.layer, self.x, self.ids = layer, x, ids
        self.one = layer.L == 1
        self.idxs = [(ids == l).nonzero().flatten() for l in range(layer.L)]
        self.vllm = vllm
        if vllm is not None:
            T = x.shape[0]
            self.meta = vllm.LoRAKernelMeta.make(layer.L, T, "cuda")
            self.meta.prepare_tensors(ids)
            self.s_qkvz = torch.empty(4, T, layer.rank, dtype=torch.float32, device="cuda")
            self.s_ba = torch.empty(2, T, layer.rank, dtype=torch.float32, device="cuda")

    def base(self):
        return torch.mm(self.x, self.layer.W.t())

    def ours(self):
        lay = self.layer
        return torch.ops.fx_passes.qkvz_gemm_lora(
            self.x, lay.weights, [a if not self.one else a[0] for a in lay.A],
            [b if not self.one else b[0] for b in lay.lora_b], lay.slice_a, lay.starts,
            None if self.one else self.ids, None if self.one else lay.scales, SCALES[0] if self.one else 1.0)

    def vllm_punica(self):
        lay, v, x = self.layer, self.vllm, self.x
        n_qkvz = sum(lay.rows[:2])
        args = self.meta.meta_args(x.shape[0], False)
        outs = []
        for cols, a, b, s in (((0, n_qkvz), lay.v_a[:4], lay.v_b[:4], self.s_qkvz),
                              ((n_qkvz, lay.N), lay.v_a[4:], lay.v_b[4:], self.s_ba)):
            y = torch.mm(x, lay.W[cols[0]:cols[1]].t())   # in_proj_qkvz / in_proj_ba: their own outputs
            v.lora_shrink(x, a, s, *args, 1.0)
            v.lora_expand(s, b, y, *args, offset_start=0, add_inputs=True)
            outs.append(y)
        return outs

    def torch_fused(self):
        lay, x, r = self.layer, self.x, self.layer.rank
        y = torch.mm(x, lay.W.t())
        for l in range(lay.L):
            idx = self.idxs[l]
            xs = x if self.one else x.index_select(0, idx)
            s = xs.to(lay.A_cat.dtype) @ lay.A_cat[l].t()             # [T_l, 4r]
            d = torch.cat([s[:, g * r:(g + 1) * r] @ lay.lora_b[i][l].t()
                           for i, g in enumerate(lay.slice_a)], 1).to(y.dtype)
            if self.one:
                y.add_(d, alpha=SCALES[0])
            else:
                y.index_add_(0, idx, d, alpha=lay.scale_list[l])
        return y


def _load_vllm():
    shim = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".vllm_shim")
    if not os.path.isdir(shim):
        return None
    sys.path.insert(0, shim)
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception as error:  # noqa: BLE001  (a benchmark column, not a dependency)
        print(f"vLLM kernels not loadable ({type(error).__name__}: {error}); the vllm column is skipped")
        return None
    import types

    return types.SimpleNamespace(LoRAKernelMeta=LoRAKernelMeta, lora_shrink=lora_shrink, lora_expand=lora_expand)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="27B,35B,397B,held")
    p.add_argument("--T", default="dense", help="'dense' (1-64, then 65..8192 odd values) or a comma list")
    p.add_argument("--adapters", default="1,4")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--adapter-dtype", default=None, choices=["float32"],
                   help="adapters in fp32 on the 16-bit base (PEFT's default); vLLM's column is skipped (its "
                        "kernels take adapters in the base dtype)")
    p.add_argument("--rep", type=float, default=10.0, help="do_bench_cudagraph rep (ms)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds (then plot)")
    p.add_argument("--png", default=None, help="plot path (default $OUT/sweep_t.png)")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/sweep_t.json)")
    return p.parse_args(argv)


VARIANTS = {"base": "base", "ours": "ours", "vllm": "vllm_punica", "torch": "torch_fused"}


def main(argv=None):
    from triton.testing import do_bench_cudagraph

    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    vllm = _load_vllm()
    env = environment("cuda")
    path = json_path("sweep_t", args.json)
    T_list = DENSE_T if args.T == "dense" else csv_list(args.T, int)
    shapes = select_shapes(args.shapes, {**SHAPES, **HELD_OUT})
    rows = []
    start = time.perf_counter()
    for name, spec in shapes.items():
        for adapters in csv_list(args.adapters, int):
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                break
            adapter_dtype = getattr(torch, args.adapter_dtype) if args.adapter_dtype else None
            sets = layer_sets(spec, args.rank, adapters, dtype, adapter_dtype)
            first = sets[0]
            for T in T_list:
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    print(f"--budget-s {args.budget_s} spent: stopping before {name} L={adapters} T={T}")
                    break
                xs, ids = batch(spec.hidden_size, T, adapters, len(sets), dtype)
                runners = [Runner(layer, x, ids, vllm) for layer, x in zip(sets, xs)]
                ref = first.reference(xs[0], ids)
                ms, errs = {}, {}
                for key, method in VARIANTS.items():
                    if key == "vllm" and (vllm is None or args.adapter_dtype):
                        continue
                    errs[key] = None if key == "base" else rel_err(getattr(runners[0], method)(), ref)
                    ms[key] = do_bench_cudagraph(lambda m=method: [getattr(r, m)() for r in runners], rep=args.rep,
                                                 return_mode="median") / len(sets)
                row = result_row(env, shape=name, held_out=name in HELD_OUT, adapters=adapters, T=T,
                                 rank=args.rank, dtype=args.dtype, adapter_dtype=args.adapter_dtype or args.dtype,
                                 ms=ms, rel_err=errs,
                                 ratio={k: v / ms["base"] for k, v in ms.items() if k != "base"})
                rows.append(row)
                write_rows(path, rows)
                print(f"{name:10} L={adapters} T={T:5d} base {ms['base'] * 1e3:8.1f} us  "
                      + "  ".join(f"{k}/base {v:.3f}" for k, v in row["ratio"].items())
                      + f"  err {max(e for e in errs.values() if e is not None):.1e}", flush=True)
    plot(rows, args.png or (os.path.join(os.environ["OUT"], "sweep_t.png") if os.environ.get("OUT") else None))
    return rows


def plot(rows: list, png) -> None:
    """ours / base (solid) and vllm / base (dashed) against T, one panel per adapter count, one colour per
    shape; the issue's targets as horizontal lines."""
    if not png or not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = sorted({r["adapters"] for r in rows})
    fig, axes = plt.subplots(1, len(mixes), figsize=(8 * len(mixes), 5), squeeze=False)
    for ax, L in zip(axes[0], mixes):
        for i, shape in enumerate(dict.fromkeys(r["shape"] for r in rows)):
            sel = sorted((r for r in rows if r["shape"] == shape and r["adapters"] == L), key=lambda r: r["T"])
            if not sel:
                continue
            color = f"C{i}"
            T = [r["T"] for r in sel]
            ax.plot(T, [r["ratio"]["ours"] for r in sel], "-", color=color, label=f"{shape} ours")
            if "vllm" in sel[0]["ratio"]:
                ax.plot(T, [r["ratio"]["vllm"] for r in sel], "--", color=color, alpha=0.6, label=f"{shape} vLLM")
        targets = [(1.25, "4-adapter target")] if L > 1 else [(1.10, "T <= 512 target"), (1.06, "T >= 2048 target")]
        for y, label in targets:
            ax.axhline(y, color="grey", linestyle=":", linewidth=1)
            ax.text(1, y, label, fontsize=7, va="bottom", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / one cuBLAS GEMM over the packed weights (no LoRA)")
        adapters_dt = rows[0].get("adapter_dtype", rows[0]["dtype"])
        dtypes = rows[0]["dtype"] + ("" if adapters_dt == rows[0]["dtype"] else f", {adapters_dt} adapters")
        ax.set_title(f"{L} adapter{'s mixed per token' if L > 1 else ''}, r{rows[0]['rank']}, {dtypes}")
        ax.set_ylim(0.9, 3.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
