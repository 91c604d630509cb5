"""Every kernel path of ``fx_passes::qkvz_gemm_lora`` forced, per (shape, T, adapter mix): the data the
dispatch rules of :mod:`fx_passes.ops.tuning` are derived from (issue 16: rules, not per-shape tables).

Per GDN layer (the four weights packed, LoRA on all four, as :mod:`benchmarks.sweep_t`), CUDA-graph
replay medians with weight sets rotated past the L2, every variant checked against an fp32 reference:

* ``base``      one cuBLAS GEMM over the packed weights, no LoRA;
* ``ours``      the op as dispatched now;
* ``d<bt>...``  the decode kernel (swap-AB GEMM, expand in its epilogue) forced, token tile ``bt``;
* ``p<m>x<n>``  the persistent TMA kernel (expand in its epilogue) forced, ``m x n`` output tiles;
* ``acc``       LoRA delta written first, cuBLAS accumulates the base (``beta = 1``);
* ``gtl``       cuBLAS, then the two-launch LoRA added in place;
* ``kcat``      a candidate design, torch ops: the LoRA as extra K columns of ONE cuBLAS GEMM,
                ``out = [x | s] @ [W | B]^T`` with ``s = x @ A_all^T`` (every group of every adapter; with
                several adapters each token keeps its own adapter's block, the others zeroed; the scale
                folded into ``s``) and ``B`` laid out block-diagonally beside W (``L * G * r`` more K);
                3-4 launches here (shrink GEMM, mask / scale, cat, GEMM), where a real version would
                write ``s`` and ``x`` into the GEMM's input in one kernel;
* ``kcat_gemm`` its final GEMM alone over a prepared ``[x | s]``: what the extra K costs cuBLAS;
* ``kcat_fused`` the design in two launches: :func:`benchmarks.kcat_proto.shrink_pack` writes ``[x | s]``,
                then the GEMM;
* ``base1``     ``base`` plus one trivial dependent launch: the floor any design of two launches pays.

    python -m benchmarks.sweep_paths --shapes 27B,35B,397B --T 65,128,256,512 --adapters 1,4
"""
from __future__ import annotations

import argparse
import time

import torch

import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)
from benchmarks.common import SHAPES, csv_list, environment, json_path, rel_err, result_row, \
    select_shapes, write_rows
from benchmarks.kcat_proto import shrink_pack
from benchmarks.sweep_t import HELD_OUT, SCALES, Layer, batch, layer_sets
from fx_passes.ops.kernels.gemm_lora_decode import gemm_lora_decode, plan_decode
from fx_passes.ops.kernels.gemm_lora_prefill import gemm_lora_prefill, prefill_fusable
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_
from fx_passes.ops.lora_args import LoraSlices
from fx_passes.ops.qkvz_gemm import qkvz_gemm_accumulate_, total_rows
from fx_passes.ops.tuning import PrefillLaunch

DECODE = {   # name -> decode_launch overrides
    "d64": dict(block_t=64),
    "d64n128": dict(block_t=64, block_n=128, block_k=64, num_stages=4, num_warps=4),
    "d128": dict(block_t=128, block_n=64, block_k=64, num_stages=4, num_warps=4),
    "d128n128": dict(block_t=128, block_n=128, block_k=64, num_stages=3, num_warps=8),
}
# the decode kernel's column-tile widths (block_n, block_k, num_stages, num_warps) per token-tile bucket
WIDTHS = {"dn32": {16: (32, 256, 3, 4), 64: (32, 128, 4, 4)},
          "dn64": {16: (64, 128, 3, 4), 64: (64, 128, 3, 4)},
          "dn128": {16: (128, 128, 4, 8), 64: (128, 64, 4, 4)}}
for _name, _by_bucket in WIDTHS.items():
    DECODE[_name] = {b: dict(zip(("block_n", "block_k", "num_stages", "num_warps"), c)) for b, c in _by_bucket.items()}
PREFILL = {
    "p128x256": PrefillLaunch(),
    "p128x128": PrefillLaunch(block_m=128, block_n=128, block_k=64, num_stages=4, num_warps=8),
    "p64x256": PrefillLaunch(block_m=64, block_n=256, block_k=64, num_stages=4, num_warps=4),
    "p64x128": PrefillLaunch(block_m=64, block_n=128, block_k=64, num_stages=5, num_warps=4),
}


class Paths:
    def __init__(self, layer: Layer, x: torch.Tensor, ids: torch.Tensor):
        one = layer.L == 1
        self.layer, self.x = layer, x
        self.lora = LoraSlices.of([a[0] if one else a for a in layer.A],
                                  [b[0] if one else b for b in layer.lora_b], layer.slice_a, layer.starts,
                                  None if one else ids, None if one else layer.scales, SCALES[0] if one else 1.0)
        self.weights = tuple(layer.weights)
        self.ids = ids
        self._kcat = None
        self.kcat_block = len(layer.A) * layer.rank   # the s columns of one adapter: every A group's rank
        self._tiny = torch.zeros(1, device=x.device)

    def kcat_parts(self):
        """``(A_all, W_cat, token weights or None, xs)`` of the K-concatenated design (built once)."""
        if self._kcat is None:
            lay, x = self.layer, self.x
            H, L, r, G = lay.H, lay.L, lay.rank, len(lay.A)
            extra = L * G * r
            w_cat = torch.zeros(lay.N, H + extra, dtype=x.dtype, device=x.device)
            w_cat[:, :H] = lay.W
            for l in range(L):
                for i, (start, g) in enumerate(zip(lay.starts, lay.slice_a)):
                    c = H + (l * G + g) * r
                    w_cat[start:start + lay.slice_rows[i], c:c + r] = lay.lora_b[i][l]
            a_all = torch.cat([lay.A[g][l] for l in range(L) for g in range(G)], 0)     # [L * G * r, H]
            if L == 1:
                weights = None
            else:   # per token: scale_l in adapter l's block, 0 elsewhere (vLLM-style per-batch metadata)
                onehot = (self.ids[:, None] == torch.arange(L, device=x.device)[None, :]).float()
                weights = (onehot * lay.scales[None, :].float())[:, :, None]               # [T, L, 1]
            s = self.kcat_s(x, a_all, weights, L, self.kcat_block)
            self._kcat = (a_all, w_cat, weights, torch.cat([x, s], 1).contiguous())
        return self._kcat

    @staticmethod
    def kcat_s(x, a_all, weights, L, block):
        s = torch.mm(x, a_all.t())
        if weights is None:
            return (s * SCALES[0]).to(x.dtype)
        return (s.float().view(-1, L, block) * weights).view(x.shape[0], -1).to(x.dtype)

    def run(self, name: str):
        x, w, lora = self.x, self.weights, self.lora
        if name == "base":
            return torch.mm(x, self.layer.W.t())
        if name == "ours":
            return torch.ops.fx_passes.qkvz_gemm_lora(x, list(w), list(lora.lora_a), list(lora.lora_b),
                                                      list(lora.slice_a), list(lora.slice_start),
                                                      lora.token_lora_ids, lora.lora_scales, lora.scale)
        if name in DECODE:
            force = DECODE[name]
            if name in WIDTHS:
                force = force[16 if x.shape[0] <= 16 else 64]
            return gemm_lora_decode(x, w, lora, config=plan_decode(x, w, lora, **force))
        if name in PREFILL:
            return gemm_lora_prefill(x, w, lora, config=PREFILL[name])
        if name == "kcat":
            a_all, w_cat, weights, _ = self.kcat_parts()
            s = self.kcat_s(x, a_all, weights, self.layer.L, self.kcat_block)
            return torch.mm(torch.cat([x, s], 1), w_cat.t())
        if name == "kcat_fused":
            a_all, w_cat, _, _ = self.kcat_parts()
            if self.layer.L == 1:
                xs = shrink_pack(x, a_all, self.kcat_block, scale=SCALES[0])
            else:
                xs = shrink_pack(x, a_all, self.kcat_block, self.ids, self.layer.scales)
            return torch.mm(xs, w_cat.t())
        if name == "base1":
            out = torch.mm(x, self.layer.W.t())
            self._tiny.add_(1)
            return out
        if name == "kcat_gemm":
            _, w_cat, _, xs = self.kcat_parts()
            return torch.mm(xs, w_cat.t())
        out = x.new_empty((x.shape[0], total_rows(w)))
        if name == "acc":
            lora_shrink_expand_(out, x, lora, accumulate=False)
            qkvz_gemm_accumulate_(out, x, w)
            return out
        if name == "gtl":
            out = torch.ops.fx_passes.qkvz_gemm(x, list(w))
            lora_shrink_expand_(out, x, lora)
            return out
        raise KeyError(name)


def main(argv=None):
    from triton.testing import do_bench_cudagraph

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="27B,35B,397B")
    p.add_argument("--T", default="65,96,128,192,256,384,512,777,1024,2048")
    p.add_argument("--adapters", default="1,4")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--variants", default=",".join(["base", "ours", *DECODE, *PREFILL, "acc", "gtl"]))
    p.add_argument("--rep", type=float, default=10.0)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    env = environment("cuda")
    path = json_path("sweep_paths", args.json)
    variants = csv_list(args.variants)
    rows, start = [], time.perf_counter()
    for name, spec in select_shapes(args.shapes, {**SHAPES, **HELD_OUT}).items():
        for adapters in csv_list(args.adapters, int):
            sets = layer_sets(spec, args.rank, adapters, dtype)
            first = sets[0]
            for T in csv_list(args.T, int):
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    print(f"--budget-s spent: stopping before {name} L={adapters} T={T}")
                    return rows
                xs, ids = batch(spec.hidden_size, T, adapters, len(sets), dtype)
                runs = [Paths(layer, x, ids) for layer, x in zip(sets, xs)]
                ref = first.reference(xs[0], ids)
                us, errs = {}, {}
                if any(v.startswith("kcat") for v in variants):
                    for r in runs:   # built before any timing (and outside CUDA-graph capture)
                        r.kcat_parts()
                for v in variants:
                    if v in PREFILL and not prefill_fusable(xs[0], runs[0].weights, runs[0].lora):
                        continue
                    errs[v] = None if v in ("base", "base1") else rel_err(runs[0].run(v), ref)
                    us[v] = 1e3 * do_bench_cudagraph(lambda v=v: [r.run(v) for r in runs], rep=args.rep,
                                                     return_mode="median") / len(runs)
                rows.append(result_row(env, shape=name, adapters=adapters, T=T, rank=args.rank, dtype=args.dtype,
                                       us=us, rel_err=errs))
                write_rows(path, rows)
                best = min((k for k in us if k not in ("base", "base1")), key=us.get)
                print(f"{name:10} L={adapters} T={T:5d} base {us['base']:7.1f}  "
                      + " ".join(f"{k} {us[k] / us['base']:.2f}" for k in us if k != "base")
                      + f"  best {best}  maxerr {max(e for e in errs.values() if e is not None):.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
