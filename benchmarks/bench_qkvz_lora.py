"""Benchmark of the fused qkvz GEMM + 4-slice LoRA block against its baselines (issue #3).

One run prints, for the Qwen3.5 GDN in_proj_qkv / in_proj_z shapes, every T and rank, with one adapter
and with 4 adapters mixed in the batch:

* floor        max(bytes / measured copy bandwidth, flops / measured bf16 mm peak) of the whole block;
* base         ONE cuBLAS GEMM over the pre-packed [W_qkv; W_z], no LoRA (what LoRA should cost above);
* unfused      the graph PEFT gives (2 GEMMs + 2 shrinks + 2 expands; with 4 adapters PEFT's mixed-batch
               form: per adapter an index_select, shrink, expand and index_put), compiled by Inductor;
* torch_fused  a torch-level fusion: 1 GEMM over packed W + 1 shrink over [A_qkv; A_z] + 2 addmm expands
               (4 adapters: per adapter gather, shrink, 2 expands, index_add);
* ours         torch.ops.fx_passes.qkvz_gemm_lora, what the pass emits for a layer with one LoRA op
               (lora_a = [A_qkv, A_z], lora_b = 4 row-slice views, slice_a = [0, 0, 0, 1]): at T <= 64 a
               shrink + our Triton GEMM with the LoRA expand in its epilogue (PDL-overlapped), above
               that the two-op path below;
* base_unpacked / ours_unpacked  base (torch.ops.fx_passes.qkvz_gemm) and ours with W_qkv and W_z in two
               separate allocations (what a model gets without packing: two cuBLAS GEMMs for the base,
               the decode kernel's two weight segments, no prefill kernel), to price the packing;
* ours_2op     torch.ops.fx_passes.qkvz_gemm over the packed weights (one cuBLAS GEMM) +
               torch.ops.fx_passes.qkvz_lora_ in place (what the pass emits with several LoRA ops);
* ours_nopdl   ours_2op without programmatic dependent launch (the default uses it up to T = 256);
* ours_v0      the same kernels forced to the first version's launch configuration (no split-K, one token
               tile for shrink and expand, BLOCK_K = BLOCK_N = 64), for before/after in the same run;
* ours_prefill the op's prefill kernel (persistent TMA GEMM, LoRA in its epilogue) forced at any T
               (the op dispatches it from PREFILL_FUSED_MIN_T tokens), to place that threshold;

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph, median, ms), bf16, fresh random
(non-zero) data per row. Each replay calls the variant once per weight set, rotating over enough sets
to cover twice the L2 cache (W never served from L2), and the variants are timed interleaved in
``--rounds`` rounds (median; the spread is recorded). Every row is checked against an fp32 reference
(relative Frobenius error).
``--sweep`` also times launch-configuration alternatives of our kernel on a subset of rows.

    python -m benchmarks.bench_qkvz_lora                  # everything (~6 min on an H100/H200)
    python -m benchmarks.bench_qkvz_lora --quick          # a subset (~3-4 min)
    python -m benchmarks.bench_qkvz_lora --shapes 27B --T 1,64 --rank 16 --adapters 1
    python -m benchmarks.bench_qkvz_lora --cpu-check      # logic check on the CPU (tiny shapes)

Shapes: ``benchmarks.common.SHAPES``. With $OUT set (or --json), the rows go to $OUT/bench_qkvz_lora.json
(rewritten after every row): a JSON list of data rows, each stamped by ``benchmarks.common.environment``
(GPU, versions, commit, UTC date, command, measured ceilings) with ``kind`` "main" (one shape / rank /
adapters / T: times in ms, ``<variant>_x`` = ratio to base, errors, spreads) or "sweep".
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import os
import sys
import time
import traceback

if "--cpu-check" in sys.argv:  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

import fx_passes.ops  # noqa: E402,F401  (registers torch.ops.fx_passes.*)
from fx_passes.ops.kernels.gemm_lora_decode import gemm_lora_decode  # noqa: E402
from fx_passes.ops.kernels.gemm_lora_prefill import gemm_lora_prefill  # noqa: E402
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_, plan_lora  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402
from fx_passes.ops.qkvz_gemm import weights_are_packed  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CPU_SHAPES, SHAPES, Timer, csv_list, environment, gdn_dims, json_path, l2_cache_bytes, measure_ceilings,
    rel_err, result_row, rotation_sets, select_shapes, write_rows)

ALL_T = (1, 16, 64, 256, 1024, 4096)
CPU_T = (1, 5, 33)
QUICK_T = (1, 64, 4096)
RANKS = (16, 64)
ADAPTER_MODES = (1, 4)
N_ADAPTERS_MIXED = 4
SCALE_1 = 2.0                                  # lora_alpha / r of the single adapter
SCALES_4 = (1.0, 0.5, 2.0, 1.5)                # per-adapter scales of the mixed batch
ERR_LIMIT = 1e-2                               # bf16 output: expect ~2e-3
MAIN_VARIANTS = ("base", "base_unpacked", "ours_unpacked", "unfused", "torch_fused", "ours", "ours_2op", "ours_nopdl", "ours_v0", "ours_prefill")
DEFAULT_VARIANTS = ("base", "unfused", "torch_fused", "ours", "ours_2op")


def v0_config(T):
    """The first kernel version's launch configuration: no split-K, one token tile for shrink and expand,
    BLOCK_K = BLOCK_N = 64, two launches."""
    bm = max(16, min(64, triton.next_power_of_2(T)))
    return dict(ksplit=1, pdl=False, block_k=64, block_n=64, block_m=bm, shrink_block_m=bm)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"T in {QUICK_T} only")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (case-insensitive prefix match)")
    p.add_argument("--T", default=None, help="comma list of token counts")
    p.add_argument("--rank", default=None, help="comma list of ranks")
    p.add_argument("--adapters", default=None, help="comma list of adapter modes: 1 and/or 4")
    p.add_argument("--variants", default=None, help=f"comma list of {list(MAIN_VARIANTS)}")
    p.add_argument("--no-inductor", action="store_true", help="skip the Inductor-compiled unfused graph")
    p.add_argument("--ids", default="random", choices=["random", "runs"],
                   help="4-adapter token ids: random per token (default) or sorted into one run per adapter")
    p.add_argument("--sweep", action="store_true", help="also time launch-config alternatives of our kernel")
    p.add_argument("--rep", type=float, default=20.0, help="do_bench_cudagraph rep (ms)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds, variants interleaved; median")
    p.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU (Triton interpreter, fp32)")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/bench_qkvz_lora.json)")
    return p.parse_args(argv)


_csv = csv_list


# ------------------------------------------------------------------------------------------------
# One (shape, rank, adapters) problem and its variants
# ------------------------------------------------------------------------------------------------
class Problem:
    def __init__(self, H, Dk, Dv, r, L, dtype, device, seed):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*shape, std):
            return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

        self.H, self.Dk, self.Dv, self.r, self.L = H, Dk, Dv, r, L
        self.nqkv, self.nz = 2 * Dk + Dv, Dv
        self.N = self.nqkv + self.nz
        self.dtype, self.device = dtype, device
        # packed weights: W_qkv and W_z are adjacent row blocks of one buffer (fx_passes.pack_qkvz_weights)
        self.Wcat = rnd(self.N, H, std=H ** -0.5)
        self.Wqkv, self.Wz = self.Wcat[: self.nqkv], self.Wcat[self.nqkv:]
        assert weights_are_packed([self.Wqkv, self.Wz])
        self.Wqkv_u, self.Wz_u = None, None   # separate allocations, made on first use (unpacked variants)
        lead = () if L == 1 else (L,)
        self.Aqkv, self.Az = rnd(*lead, r, H, std=H ** -0.5), rnd(*lead, r, H, std=H ** -0.5)
        self.Bqkv, self.Bz = rnd(*lead, self.nqkv, r, std=r ** -0.5), rnd(*lead, self.nz, r, std=r ** -0.5)
        self.Acat = torch.cat([self.Aqkv, self.Az], dim=-2)  # [.., 2r, H]
        self.scales = [SCALE_1] if L == 1 else list(SCALES_4[:L])
        self.scales_t = None if L == 1 else torch.tensor(self.scales, dtype=torch.float32, device=device)
        # ours: 4 row-slice views of the two B tensors; q, k, v share A group 0
        Dk_, nqkv = Dk, self.nqkv
        self.lora_a = [self.Aqkv, self.Az]
        self.lora_b = [self.Bqkv[..., 0:Dk_, :], self.Bqkv[..., Dk_:2 * Dk_, :], self.Bqkv[..., 2 * Dk_:, :], self.Bz]
        self.slice_a = [0, 0, 0, 1]
        self.slice_start = [0, Dk_, 2 * Dk_, nqkv]

    # ---- inputs of one row ----
    def inputs(self, T, seed, ids_layout="random"):
        """x and, with several adapters, the token -> adapter ids: ``random`` per token (the worst case:
        every tile holds every adapter) or ``runs`` (the same ids sorted: contiguous runs per adapter,
        as when a batch holds each request's tokens together)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(T, self.H, generator=g).to(dtype=self.dtype, device=self.device)
        if self.L == 1:
            return x, None, None
        ids = torch.randint(0, self.L, (T,), generator=g)
        ids[torch.rand(T, generator=g) < 0.1] = -1  # some tokens without adapter
        if T == 1:
            ids[0] = 1
        if ids_layout == "runs":
            ids = ids.sort().values
        idxs = [(ids == l).nonzero().flatten().to(self.device) for l in range(self.L)]  # PEFT's sub-batches
        return x, ids.to(device=self.device, dtype=torch.int32), idxs

    def reference(self, x, ids):
        """fp32 reference of the whole block."""
        xf = x.float()
        ref = xf @ self.Wcat.float().t()
        for l in range(self.L):
            A = self.Acat if self.L == 1 else self.Acat[l]
            Bq = self.Bqkv if self.L == 1 else self.Bqkv[l]
            Bz = self.Bz if self.L == 1 else self.Bz[l]
            s = xf @ A.float().t()
            d = torch.cat([s[:, : self.r] @ Bq.float().t(), s[:, self.r:] @ Bz.float().t()], 1) * self.scales[l]
            if ids is None:
                ref += d
            else:
                ref += torch.where((ids == l)[:, None], d, torch.zeros((), device=d.device))
        return ref

    def bytes_flops(self, T):
        el = torch.finfo(self.dtype).bits // 8
        lora_w = self.L * (2 * self.r * self.H + self.r * self.N)
        byts = el * (self.H * self.N + lora_w + T * self.H + T * self.N)
        flops = 2 * T * self.H * self.N + 2 * T * self.r * (2 * self.H + self.N)
        return byts, flops

    # ---- variants: each maps x (and the row's ids / index lists) to the [T, N] block output ----
    def base(self, x, ids, idxs):
        return torch.mm(x, self.Wcat.t())

    def unfused_eager(self, x, ids, idxs):
        if self.L == 1:  # PEFT: base layer + lora_B(lora_A(x)) * scaling, per projection
            qkv = x @ self.Wqkv.t() + (x @ self.Aqkv.t()) @ self.Bqkv.t() * self.scales[0]
            z = x @ self.Wz.t() + (x @ self.Az.t()) @ self.Bz.t() * self.scales[0]
            return qkv, z
        qkv, z = x @ self.Wqkv.t(), x @ self.Wz.t()  # PEFT _mixed_batch_forward
        for l in range(self.L):
            idx = idxs[l]
            sub = x[idx]
            qkv[idx] += (sub @ self.Aqkv[l].t()) @ self.Bqkv[l].t() * self.scales[l]
            z[idx] += (sub @ self.Az[l].t()) @ self.Bz[l].t() * self.scales[l]
        return qkv, z

    def torch_fused(self, x, ids, idxs):
        r = self.r
        y = torch.mm(x, self.Wcat.t())
        if self.L == 1:
            sh = x @ self.Acat.t()  # [T, 2r]
            y[:, : self.nqkv].addmm_(sh[:, :r], self.Bqkv.t(), alpha=self.scales[0])
            y[:, self.nqkv:].addmm_(sh[:, r:], self.Bz.t(), alpha=self.scales[0])
            return y
        for l in range(self.L):
            idx = idxs[l]
            sh = x.index_select(0, idx) @ self.Acat[l].t()
            d = torch.cat([sh[:, :r] @ self.Bqkv[l].t(), sh[:, r:] @ self.Bz[l].t()], 1)
            y.index_add_(0, idx, d, alpha=self.scales[l])
        return y

    def ours(self, x, ids, idxs):
        return torch.ops.fx_passes.qkvz_gemm_lora(x, [self.Wqkv, self.Wz], self.lora_a, self.lora_b, self.slice_a,
                                                  self.slice_start, ids, self.scales_t,
                                                  SCALE_1 if self.L == 1 else 1.0)

    def _unpacked(self):
        if self.Wqkv_u is None:
            self.Wqkv_u, self.Wz_u = self.Wqkv.clone(), self.Wz.clone()
            assert not weights_are_packed([self.Wqkv_u, self.Wz_u])
        return self.Wqkv_u, self.Wz_u

    def base_unpacked(self, x, ids, idxs):
        return torch.ops.fx_passes.qkvz_gemm(x, list(self._unpacked()))

    def ours_unpacked(self, x, ids, idxs):
        return torch.ops.fx_passes.qkvz_gemm_lora(x, list(self._unpacked()), self.lora_a, self.lora_b, self.slice_a,
                                                  self.slice_start, ids, self.scales_t,
                                                  SCALE_1 if self.L == 1 else 1.0)

    def ours_2op(self, x, ids, idxs):
        out = torch.ops.fx_passes.qkvz_gemm(x, [self.Wqkv, self.Wz])
        torch.ops.fx_passes.qkvz_lora_(out, x, self.lora_a, self.lora_b, self.slice_a, self.slice_start,
                                       ids, self.scales_t, SCALE_1 if self.L == 1 else 1.0)
        return out

    def lora(self, ids):
        """The block's LoRA as the kernels take it."""
        return LoraSlices.of(self.lora_a, self.lora_b, self.slice_a, self.slice_start, ids, self.scales_t,
                             SCALE_1 if self.L == 1 else 1.0)

    def ours_fused_triton(self, x, ids, idxs):
        """The CUDA decode kernel of qkvz_gemm_lora, called directly (for --cpu-check)."""
        return gemm_lora_decode(x, [self.Wqkv, self.Wz], self.lora(ids))

    def ours_prefill(self, x, ids, idxs):
        """The prefill kernel of qkvz_gemm_lora (persistent TMA GEMM + LoRA epilogue) at any T."""
        return gemm_lora_prefill(x, [self.Wqkv, self.Wz], self.lora(ids))

    def ours_cfg(self, force):
        """Our block as GEMM, then the two-launch LoRA with a forced launch configuration (``force``:
        ``fx_passes.ops.tuning.lora_launch``'s arguments)."""
        def fn(x, ids, idxs):
            out = torch.ops.fx_passes.qkvz_gemm(x, [self.Wqkv, self.Wz])
            lora = self.lora(ids)
            lora_shrink_expand_(out, x, lora, config=plan_lora(x, lora, **force))
            return out
        return fn


def _set_dynamo_limits():
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


# ------------------------------------------------------------------------------------------------
# Sweep: launch-configuration alternatives of our kernel, on a subset of rows
# ------------------------------------------------------------------------------------------------
def sweep_configs(T, L=1):
    cfgs = {"auto": {}, "pdl": dict(pdl=True)}
    if T <= 256:
        cfgs["ks4_pdl"] = dict(ksplit=4, pdl=True)
        cfgs["ks16_pdl"] = dict(ksplit=16, pdl=True)
    if 64 <= T <= 256:
        cfgs["sbm64_pdl"] = dict(shrink_block_m=64, pdl=True)
        cfgs["bn64_pdl"] = dict(block_n=64, pdl=True)
    if T >= 1024:
        cfgs["bn64"] = dict(block_n=64)
        cfgs["bm128_bn128_w8"] = dict(block_m=128, block_n=128, num_warps=8)
        cfgs["bm32_pdl"] = dict(block_m=32, pdl=True)
    return cfgs


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    cpu = args.cpu_check
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16  # the Triton interpreter has no bf16
    shapes = select_shapes(args.shapes, CPU_SHAPES if cpu else SHAPES)
    Ts = _csv(args.T, int) or (CPU_T if cpu else (QUICK_T if args.quick else ALL_T))
    ranks = _csv(args.rank, int) or list(RANKS)
    modes = _csv(args.adapters, int) or list(ADAPTER_MODES)
    variants = _csv(args.variants) or list(DEFAULT_VARIANTS)
    if args.no_inductor and "unfused" in variants:
        variants.remove("unfused")
    timer = Timer(device, args.rep)
    path = json_path("bench_qkvz_lora", args.json)

    meta = environment(device)   # the stamp of every row
    if cpu:
        meta["gpu"] = "cpu (Triton interpreter)"
    print(f"torch {meta['torch']}  triton {meta['triton']}  device {meta['gpu']}  commit {meta['commit']}", flush=True)
    bw, peak = measure_ceilings(device)
    meta.update(copy_bw_Bps=bw, mm_peak_flops=peak)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s   bf16 mm {peak / 1e12:.0f} TFLOP/s", flush=True)
    _set_dynamo_limits()
    meta.update(l2_bytes=l2_cache_bytes(device))

    rows, sweep_rows = [], []

    def dump():
        write_rows(path, [result_row(meta, kind="main", **r) for r in rows]
                   + [result_row(meta, kind="sweep", **s) for s in sweep_rows])

    seed = 0
    for name, spec in shapes.items():
        H, Dk, Dv = gdn_dims(spec)
        for r in ranks:
            for L in modes:
                seed += 1
                # Weight sets timed in rotation so that W never sits in L2 between two calls (in a model,
                # other layers' weights evict it): as many sets as it takes to cover 2x the L2 cache.
                # (35B-A3B's packed W is 50 MB, under the H200's 60 MB L2: without rotation its base GEMM
                # partly ran from L2, 0.0117-0.0150 ms across calls, below the DRAM floor on one row.)
                probe = Problem(H, Dk, Dv, r, L, dtype, device, seed)
                n_sets = rotation_sets(probe.Wcat.numel() * probe.Wcat.element_size(), device)
                probs = [probe] + [Problem(H, Dk, Dv, r, L, dtype, device, seed + 7919 * i) for i in range(1, n_sets)]
                prob = probe
                all_fns = []
                for pr in probs:
                    compiled = None
                    if "unfused" in variants:
                        compiled = torch.compile(pr.unfused_eager, dynamic=True)
                    fns = {"base": pr.base, "base_unpacked": pr.base_unpacked, "ours_unpacked": pr.ours_unpacked,
                           "unfused": compiled, "torch_fused": pr.torch_fused,
                           "ours": pr.ours, "ours_2op": pr.ours_2op, "ours_nopdl": pr.ours_cfg(dict(pdl=False)),
                           "ours_v0": None, "ours_prefill": pr.ours_prefill}
                    if cpu:  # torch.ops on CPU runs the plain-torch reference: run the Triton kernels instead
                        fns["ours"] = pr.ours_fused_triton
                        fns["ours_2op"] = pr.ours_cfg({})
                    all_fns.append(fns)
                fns = all_fns[0]
                for T in Ts:
                    seed += 1
                    x, ids, idxs = prob.inputs(T, seed, args.ids)
                    ref = prob.reference(x, ids)
                    byts, flops = prob.bytes_flops(T)
                    floor = max(byts / bw, flops / peak) * 1e3
                    row = dict(shape=name, H=H, key_dim=Dk, value_dim=Dv, r=r, adapters=L, T=T, floor_ms=floor,
                               bytes=byts, flops=flops)
                    row["weight_sets"] = n_sets
                    for pr, f in zip(probs, all_fns):
                        f["ours_v0"] = pr.ours_cfg(v0_config(T))
                    times = {v: [] for v in variants}
                    for round_ in range(args.rounds):   # variants interleaved, median over rounds
                        for v in variants:
                            if round_ and not times[v]:
                                continue   # failed in round 0
                            fn = fns[v]
                            try:
                                if round_ == 0:
                                    t0 = time.perf_counter()
                                    y = fn(x, ids, idxs)  # first call: compiles (Inductor / Triton)
                                    if not v.startswith("base"):   # the base variants have no LoRA
                                        row[f"err_{v}"] = rel_err(y, ref)
                                    row[f"first_call_s_{v}"] = time.perf_counter() - t0
                                    for f in all_fns[1:]:
                                        f[v](x, ids, idxs)
                                rotation = [f[v] for f in all_fns]
                                times[v].append(timer(lambda: [g(x, ids, idxs) for g in rotation]) / n_sets)
                            except Exception as e:  # keep going; the row says what broke
                                row[f"error_{v}"] = f"{type(e).__name__}: {e}"[:300]
                                traceback.print_exc()
                    for v in variants:
                        row[v] = statistics.median(times[v]) if times[v] else None
                        if len(times[v]) > 1:
                            row[f"spread_{v}"] = (max(times[v]) - min(times[v])) / statistics.median(times[v])
                    for v in variants:
                        if v != "base" and row.get(v) and row.get("base"):
                            row[f"{v}_x"] = row[v] / row["base"]
                    rows.append(row)
                    print(fmt_row(row), flush=True)
                    dump()

                    if args.sweep and (cpu or (name in ("35B-A3B", "27B") and T in (1, 16, 64, 256, 4096))):
                        srow = dict(shape=name, r=r, adapters=L, T=T, base=row.get("base"))
                        for cname, cfg in sweep_configs(T, L).items():
                            fn = prob.ours_cfg(cfg)
                            try:
                                y = fn(x, ids, idxs)
                                err = rel_err(y, ref)
                                t = timer(lambda: fn(x, ids, idxs))
                                srow[cname] = t
                                srow[f"err_{cname}"] = err
                                srow[f"plan_{cname}"] = dataclasses.asdict(plan_lora(x, prob.lora(ids), **cfg))
                            except Exception as e:
                                srow[cname] = None
                                srow[f"error_{cname}"] = f"{type(e).__name__}: {e}"[:300]
                                traceback.print_exc()
                        sweep_rows.append(srow)
                        print("  sweep " + "  ".join(
                            f"{k}={srow[k] / srow['base']:.3f}x" if srow.get(k) and srow.get("base") else f"{k}=ERR"
                            for k in sweep_configs(T, L)), flush=True)
                        dump()
                del prob, probe, probs, fns, all_fns, compiled
                if not cpu:
                    torch.cuda.empty_cache()

    if sweep_rows:
        print_sweep(sweep_rows)
    print_table(rows, variants, meta)
    summarize_targets(rows)
    dump()
    bad = [r for r in rows if any(k.startswith("err_") and (v is None or not v < ERR_LIMIT) for k, v in r.items())]
    return 1 if bad else 0


def _f(v, w=8, p=4):
    return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else " " * (w - 3) + "ERR"


def fmt_row(row):
    parts = [f"{row['shape']:9s} r={row['r']:<3d} L={row['adapters']} T={row['T']:<5d} floor={row['floor_ms']:.4f}"]
    for v in MAIN_VARIANTS:
        if v in row:
            parts.append(f"{v}={_f(row[v], 1)}")
    errs = [f"{k[4:]}={v:.1e}" for k, v in row.items() if k.startswith("err_")]
    return " ".join(parts) + "  err " + " ".join(errs)


def print_sweep(sweep_rows):
    print("\n== sweep: our kernel's launch configurations, time / base (same run) ==")
    for s in sweep_rows:
        cells = []
        for k, v in s.items():
            if k in ("shape", "r", "adapters", "T", "base") or k.startswith(("err_", "plan_", "error_")):
                continue
            cells.append(f"{k}={v / s['base']:.3f}" if v and s.get("base") else f"{k}=ERR")
        print(f"{s['shape']:9s} r={s['r']:<3d} T={s['T']:<5d} base={_f(s.get('base'), 1)} " + " ".join(cells))


def print_table(rows, variants, meta):
    print(f"\n== {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date_utc']} | "
          f"commit {meta['commit']} | "
          f"copy {meta['copy_bw_Bps'] / 1e12:.2f} TB/s, mm {meta['mm_peak_flops'] / 1e12:.0f} TFLOP/s ==")
    print("times: CUDA-graph replay medians (ms); ratios to base; err = max rel. error vs fp32 over variants")
    ratio_cols = [v for v in variants if v != "base"]
    head = f"{'shape':9s} {'r':>3s} {'L':>1s} {'T':>5s} {'floor':>8s} {'base':>8s} {'ours':>8s} | floor " \
           + " ".join(f"{v[:7]:>7s}" for v in ratio_cols) + " | err"
    print(head)
    for r in rows:
        b = r.get("base")
        cells = [f"{r['shape']:9s} {r['r']:3d} {r['adapters']:1d} {r['T']:5d} {_f(r['floor_ms'])} {_f(b)} "
                 f"{_f(r.get('ours'))} | {r['floor_ms'] / b if b else float('nan'):5.2f}"]
        for v in ratio_cols:
            cells.append(f"{r[v] / b:7.3f}" if r.get(v) and b else f"{'ERR':>7s}")
        errs = [v for k, v in r.items() if k.startswith("err_")]
        worst = max(errs) if errs else float("nan")
        flag = "" if worst < ERR_LIMIT else " FAIL"
        print(" ".join(cells) + f" | {worst:.1e}{flag}")


def summarize_targets(rows):
    """The issue's targets, row by row: ours/base <= 1.15 at T <= 64 and <= 1.05 at T = 4096 (one adapter),
    <= 1.25 with 4 mixed adapters, and ours faster than torch_fused everywhere."""
    checks = {"T<=64 (L=1): ours <= 1.15x base": [], "T=4096 (L=1): ours <= 1.05x base": [],
              "4 adapters: ours <= 1.25x base": [], "ours < torch_fused": []}
    for r in rows:
        o, b, tf = r.get("ours"), r.get("base"), r.get("torch_fused")
        if not (o and b):
            continue
        x = o / b
        tag = f"{r['shape']}/r{r['r']}/L{r['adapters']}/T{r['T']}={x:.2f}x"
        if r["adapters"] == 1 and r["T"] <= 64:
            checks["T<=64 (L=1): ours <= 1.15x base"].append((x <= 1.15, tag))
        if r["adapters"] == 1 and r["T"] == 4096:
            checks["T=4096 (L=1): ours <= 1.05x base"].append((x <= 1.05, tag))
        if r["adapters"] > 1:
            checks["4 adapters: ours <= 1.25x base"].append((x <= 1.25, tag))
        if tf:
            checks["ours < torch_fused"].append((o < tf, f"{r['shape']}/r{r['r']}/L{r['adapters']}/T{r['T']}="
                                                          f"{o / tf:.2f}x of torch_fused"))
    print("\n== targets ==")
    for name, res in checks.items():
        if not res:
            continue
        met = sum(ok for ok, _ in res)
        missed = [tag for ok, tag in res if not ok]
        print(f"{name}: {met}/{len(res)} rows met" + (f"; missed: {', '.join(missed[:8])}"
                                                     + (" ..." if len(missed) > 8 else "") if missed else ""))


if __name__ == "__main__":
    sys.exit(main())
