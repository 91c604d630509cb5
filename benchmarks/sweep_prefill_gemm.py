"""Experiment for issue #3's prefill target (T = 4096 <= 1.05x base): a Hopper GEMM with the LoRA in its epilogue.

Why (benchmarks/results/HISTORY.md, session 3): with the LoRA as kernels beside cuBLAS, the delta must be written
(2 T N bytes) and read back by the GEMM (beta = 1), a floor of 1.05-1.10x of the GEMM on the Qwen3.5
shapes. Only an expand inside the GEMM's epilogue avoids both, and that needs a GEMM at cuBLAS's rate:
the op's swap-AB decode kernel runs at 1.52-1.66x of cuBLAS at T = 4096.

This script is where the op's prefill kernel (the persistent TMA GEMM with the LoRA in its epilogue) was
found (session 4, logs in ``benchmarks/results/session4/``); it keeps the variants that lost:

* ``_prefill_gemm_lora_kernel``: persistent grid (one program per SM), grouped tile order (GROUP_M),
  TMA loads through device-side tensor descriptors (``tl.make_tensor_descriptor``; needs
  ``triton.set_allocator``), optional warp specialization / loop flattening of the tile loop (Hopper
  autoWS in triton >= 3.6), fp32 accumulator; epilogue: ``griddepcontrol.wait`` (the shrink, launched
  just before with ``launch_dependents``), then the LoRA of the tile's A group (q, k, v: group 0; z:
  group 1) chained into the accumulator, one TMA store. ``LORA_MODE`` 0: s and B by pointer loads (the
  winner); 1: by TMA (B pre-scaled); 2: TMA, before the K loop on a program's later tiles; 3: pointer
  loads issued before the K loop on later tiles (prefetch).
* the shrink is the op's own (``launch_shrink``), one K chunk (KSPLIT = 1).
* ``--decompose``: the winner's cost split (GEMM alone, + LoRA with s precomputed, + the shrink).

Printed per (shape, T, r): cuBLAS ``base`` (packed W, no LoRA), ``ours`` (the op's default dispatch), and
per launch configuration the TMA GEMM alone and with the LoRA, as ratios to base (CUDA-graph replay
medians, weights rotated over 2x the L2), plus the error of every LoRA result against fp32.

    python -m benchmarks.sweep_prefill_gemm [--shapes 35B-A3B] [--T 4096] [--rank 16,64] [--budget-s 400]
    python -m benchmarks.sweep_prefill_gemm --cpu-check     # tiny shapes, Triton interpreter, fp32

Shapes: ``benchmarks.common.SHAPES``. With $OUT set, one data row per (shape, r, T) goes to
$OUT/sweep_prefill_gemm.json (a JSON list, each row stamped by ``benchmarks.common.environment``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "--cpu-check" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_wait  # noqa: E402

from benchmarks.bench_qkvz_lora import SCALE_1, Problem  # noqa: E402
from benchmarks.common import (  # noqa: E402
    SHAPES, TINY, Timer, environment, gdn_dims, json_path, packed_weight_bytes, rel_err, result_row,
    rotation_sets, select_shapes, write_rows)

# The op's kernel helpers (_tile_pids is a global of the @triton.jit kernel below).
from fx_passes.ops.kernels.gemm_lora_prefill import _tile_pids  # noqa: E402
from fx_passes.ops.kernels.lora_shrink import alloc_shrink_buffer, launch_shrink  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402
from fx_passes.ops.tuning import lora_launch  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, warp_specialize, flatten): the persistent TMA
# configurations reported closest to cuBLAS on Hopper (triton tutorial 09, Inductor's persistent TMA
# template, LoRAFusion's fused x@W^T + s@B^T kernel: 128 x 256 x 64, 3 stages, 8 warps, no flatten).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, warp_specialize, flatten, lora_mode). Session 4 runs 1-2:
# k128 s2 and s4 exceed the shared memory at 128 x 256; flatten ran 6.7x with the LoRA; 128 x 128 and
# 256 x 128 stayed >= 1.06x of cuBLAS for the GEMM alone, 128 x 256 x 64 s3 w8 0.96-1.06x.
CONFIGS = [
    (128, 256, 64, 3, 8, False, False, 0),
    (128, 256, 64, 3, 8, False, False, 1),
    (128, 256, 64, 3, 8, False, False, 2),
    (128, 256, 64, 3, 8, True, False, 1),
    (256, 128, 64, 3, 8, False, False, 1),
    (128, 256, 64, 3, 8, False, False, 3),
]
CPU_CONFIGS = [(16, 16, 32, 2, 4, False, False, 0), (32, 16, 16, 2, 4, False, True, 1),
               (16, 16, 16, 2, 4, False, False, 2), (16, 16, 32, 2, 4, False, False, 3)]


@triton.jit
def _prefill_gemm_lora_kernel(
    x_ptr, w_ptr, out_ptr, s_ptr, b_ptr,
    T, N, K, N_QKV, rank, stride_sg, stride_st, stride_bn, scale,
    WITH_LORA: tl.constexpr, USE_PDL: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, LORA_MODE: tl.constexpr,
):
    """LORA_MODE 0: s and B through pointer loads after the K loop, scale applied to s in registers.
    1: s and B through TMA after the K loop (B pre-scaled by the caller). 2: as 1, but every tile after
    a program's first does the LoRA dot before its K loop (the first tile waits for the shrink). 3: as 0,
    but tiles after a program's first issue the s and B loads before the K loop (a load stalls only at its
    first use)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[T, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    # s: [G * T, BLOCK_R] rows (group 0's rows past T read group 1's: they land in rows the store clips)
    s_desc = tl.make_tensor_descriptor(s_ptr, shape=[2 * T, rank], strides=[stride_st, 1],
                                       block_shape=[BLOCK_M, BLOCK_R])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, rank], strides=[stride_bn, 1],
                                       block_shape=[BLOCK_N, BLOCK_R])
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_pids(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        g = (off_n >= N_QKV).to(tl.int32)   # column tiles never straddle N_QKV (checked by the launcher)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lora_first = WITH_LORA and LORA_MODE == 2 and tile >= NUM_SMS
        if lora_first:
            acc = tl.dot(s_desc.load([g * T + off_m, 0]), b_desc.load([off_n, 0]).T, acc)
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        s_ptrs = s_ptr + g * stride_sg + rows[:, None].to(tl.int64) * stride_st + offs_r[None, :]
        s_mask = (rows < T)[:, None] & r_mask[None, :]
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_r[:, None]
        b_mask = r_mask[:, None] & (cols < N)[None, :]
        if WITH_LORA and LORA_MODE == 3:
            # prefetch: the loads are issued here and only waited for after the K loop (a program's first
            # tile may not read s before the shrink is done: masked off here, loaded after the wait)
            prefetch = tile >= NUM_SMS
            sv = tl.load(s_ptrs, mask=s_mask & prefetch, other=0.0)
            bt = tl.load(b_ptrs, mask=b_mask & prefetch, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
        if WITH_LORA and not lora_first:
            if LORA_MODE == 3:
                if tile < NUM_SMS:
                    if USE_PDL:
                        gdc_wait()
                    sv = tl.load(s_ptrs, mask=s_mask, other=0.0)
                    bt = tl.load(b_ptrs, mask=b_mask, other=0.0)
                acc = tl.dot((sv * scale).to(bt.dtype), bt, acc)
            elif LORA_MODE == 0:   # one accumulator: a 2nd 128 x 256 fp32 tile spilled (1.30-1.56x, run 1)
                if USE_PDL:
                    gdc_wait()   # the shrink has written s (a no-op after the first tile)
                sv = tl.load(s_ptrs, mask=s_mask, other=0.0)
                bt = tl.load(b_ptrs, mask=b_mask, other=0.0)            # [BLOCK_R, BLOCK_N]
                acc = tl.dot((sv * scale).to(bt.dtype), bt, acc)
            else:
                if USE_PDL:
                    gdc_wait()
                acc = tl.dot(s_desc.load([g * T + off_m, 0]), b_desc.load([off_n, 0]).T, acc)
        o_desc.store([off_m, off_n], acc.to(out_ptr.dtype.element_ty))


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def prefill_gemm_lora(x, w, lora_a, b_cat, n_qkv, scale, cfg, *, with_lora=True, pdl=True, num_sms=None,
                      s_given=None, shrink_only=False):
    """``x @ w^T + scale * [s_0 | s_1] @ b_cat^T`` (s_g = x @ lora_a[g]^T; columns < n_qkv use group 0).
    LoRA modes 1 and 2 (``cfg[7]``) expect ``b_cat`` already multiplied by ``scale``."""
    bm, bn, bk, stages, warps, ws, flatten, lora_mode = cfg
    T, K = x.shape
    N = w.shape[0]
    assert n_qkv % bn == 0, "a column tile must not straddle the q|k|v / z boundary"
    triton.set_allocator(_alloc)   # scratch for the device-side TMA descriptors
    num_sms = num_sms or torch.cuda.get_device_properties(x.device).multi_processor_count
    out = x.new_empty((T, N))
    rank = lora_a[0].shape[-2]
    on_gpu = x.device.type == "cuda"
    use_pdl = bool(pdl and with_lora and on_gpu)
    if with_lora:
        scfg = lora_launch(T, K, len(lora_a), rank, 64, x.device, ksplit=1)
        if s_given is None:   # s_given: s of an earlier call (the decomposition: epilogue cost without the shrink)
            s_buf = alloc_shrink_buffer(T, len(lora_a), scfg, b_cat.dtype, x.device)
            groups = LoraSlices.of(lora_a, [b_cat] * len(lora_a), list(range(len(lora_a))), [0] * len(lora_a))
            launch_shrink(x, groups, s_buf, scfg, use_pdl=use_pdl)
            if shrink_only:
                return s_buf
        else:
            s_buf, use_pdl = s_given, False
        block_r, sg, st = scfg.block_r, s_buf.stride(1), s_buf.stride(2)
    else:
        s_buf, block_r, sg, st = x, 16, 0, K
    tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
    grid = (min(num_sms, tiles),)
    _prefill_gemm_lora_kernel[grid](
        x, w, out, s_buf, b_cat, T, N, K, n_qkv, rank, sg, st, b_cat.stride(0), float(scale),
        WITH_LORA=with_lora, USE_PDL=use_pdl, NUM_SMS=grid[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=block_r, GROUP_M=8, WARP_SPECIALIZE=ws, FLATTEN=flatten, LORA_MODE=lora_mode,
        num_stages=stages, num_warps=warps, **({"launch_pdl": True} if use_pdl else {}),
    )
    return out


def cfg_name(c):
    bm, bn, bk, st, w, ws, fl, mode = c
    return f"m{bm}n{bn}k{bk}s{st}w{w}" + ("_ws" if ws else "") + ("_flat" if fl else "") + f"_L{mode}"


def _lora_args(prob, cfg):
    """(lora_a groups, B of all N columns; times the scale for LoRA modes 1, 2) of a one-adapter Problem."""
    b_cat = torch.cat([prob.Bqkv, prob.Bz])
    return [prob.Aqkv, prob.Az], (b_cat * SCALE_1 if cfg[7] in (1, 2) else b_cat)


def cpu_check() -> list[tuple[str, float]]:
    """Tiny shapes under the Triton interpreter (fp32): every CPU config, with and without LoRA."""
    results = []
    for i, cfg in enumerate(CPU_CONFIGS):
        # fx_passes' tiny spec with one key and one value head: N_qkv 48, N_z 16
        H, Dk, Dv = gdn_dims(dataclasses.replace(TINY, linear_num_key_heads=1, linear_num_value_heads=1))
        prob = Problem(H, Dk, Dv, 8, 1, torch.float32, "cpu", seed=11 + i)
        x, _, _ = prob.inputs(37, seed=5)
        lora_a, b_cat = _lora_args(prob, cfg)
        got = prefill_gemm_lora(x, prob.Wcat, lora_a, b_cat, prob.nqkv, SCALE_1, cfg, num_sms=3)
        results.append((cfg_name(cfg), rel_err(got, prob.reference(x, None))))
        base = prefill_gemm_lora(x, prob.Wcat, lora_a, b_cat, prob.nqkv, SCALE_1, cfg, with_lora=False, num_sms=3)
        results.append((cfg_name(cfg) + "_nolora", rel_err(base, x @ prob.Wcat.t())))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--T", default="4096")
    p.add_argument("--rank", default="16,64")
    p.add_argument("--rep", type=float, default=20.0)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this")
    p.add_argument("--cpu-check", action="store_true")
    p.add_argument("--decompose", action="store_true",
                   help="CONFIGS[0] only, 3 interleaved rounds: GEMM, GEMM+LoRA, GEMM+LoRA with s given, shrink")
    args = p.parse_args()
    if args.cpu_check:
        for name, err in cpu_check():
            print(f"{name}: rel err {err:.1e}")
        return
    t0 = time.time()
    timer = Timer("cuda", args.rep)
    env = environment("cuda")
    print(f"torch {env['torch']} triton {env['triton']} device {env['gpu']} commit {env['commit']}", flush=True)
    rows, path, seed = [], json_path("sweep_prefill_gemm"), 200
    for name, spec in select_shapes(args.shapes).items():
        H, Dk, Dv = gdn_dims(spec)
        for r in (int(v) for v in args.rank.split(",")):
            seed += 1
            probs = [Problem(H, Dk, Dv, r, 1, torch.bfloat16, "cuda", seed + i)   # W never served from L2
                     for i in range(rotation_sets(packed_weight_bytes(spec), "cuda"))]
            for T in (int(v) for v in args.T.split(",")):
                if time.time() - t0 > args.budget_s:
                    print("budget reached", flush=True)
                    break
                x, _, _ = probs[0].inputs(T, seed)
                ref = probs[0].reference(x, None)
                row = dict(shape=name, r=r, T=T,
                           base=timer(lambda: [pr.base(x, None, None) for pr in probs]),
                           ours=timer(lambda: [pr.ours(x, None, None) for pr in probs]))
                if args.decompose:
                    fns = dict(base=lambda: [pr.base(x, None, None) for pr in probs],
                               ours=lambda: [pr.ours(x, None, None) for pr in probs])
                    for cfg in (CONFIGS[0], CONFIGS[-1]):
                        lora = [_lora_args(pr, cfg) for pr in probs]
                        s_bufs = [prefill_gemm_lora(x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg, shrink_only=True)
                                  for pr, la in zip(probs, lora)]
                        tag = f"L{cfg[7]}"
                        if cfg is CONFIGS[0]:
                            fns["gemm"] = lambda cfg=cfg, lora=lora: [prefill_gemm_lora(
                                x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg, with_lora=False) for pr, la in zip(probs, lora)]
                            fns["shrink"] = lambda cfg=cfg, lora=lora: [prefill_gemm_lora(
                                x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg, shrink_only=True) for pr, la in zip(probs, lora)]
                        fns["lora_" + tag] = lambda cfg=cfg, lora=lora: [prefill_gemm_lora(
                            x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg) for pr, la in zip(probs, lora)]
                        fns["s_given_" + tag] = lambda cfg=cfg, lora=lora, s_bufs=s_bufs: [prefill_gemm_lora(
                            x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg, s_given=sb) for pr, la, sb in zip(probs, lora, s_bufs)]
                        y = prefill_gemm_lora(x, probs[0].Wcat, *lora[0], probs[0].nqkv, SCALE_1, cfg)
                        print(f"  {tag} err {rel_err(y, ref):.1e}", flush=True)
                    times = {k: [] for k in fns}
                    for _ in range(3):
                        for k, fn in fns.items():
                            times[k].append(timer(fn))
                    med = {k: sorted(v)[1] for k, v in times.items()}
                    print(f"{name} r={r} T={T} base={med['base']:.4f} ms (rounds " +
                          "/".join(f"{v:.4f}" for v in times["base"]) + ") | " + "  ".join(
                              f"{k} {v / med['base']:.3f}x" for k, v in med.items() if k != "base"), flush=True)
                    rows.append(result_row(env, shape=name, r=r, T=T, decompose=True, **times))
                    write_rows(path, rows)
                    continue
                for cfg in CONFIGS:
                    if time.time() - t0 > args.budget_s:
                        break
                    lora = [_lora_args(pr, cfg) for pr in probs]
                    try:
                        y = prefill_gemm_lora(x, probs[0].Wcat, *lora[0], probs[0].nqkv, SCALE_1, cfg)
                        row[f"err_{cfg_name(cfg)}"] = rel_err(y, ref)
                        row[f"gemm_{cfg_name(cfg)}"] = timer(lambda cfg=cfg: [
                            prefill_gemm_lora(x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg, with_lora=False)
                            for pr, la in zip(probs, lora)])
                        row[f"lora_{cfg_name(cfg)}"] = timer(lambda cfg=cfg: [
                            prefill_gemm_lora(x, pr.Wcat, *la, pr.nqkv, SCALE_1, cfg) for pr, la in zip(probs, lora)])
                    except Exception as e:   # e.g. over the shared-memory limit, or autoWS not applicable
                        print(f"  {cfg_name(cfg)}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                rows.append(result_row(env, **row))
                base = row["base"]
                print(f"{name} r={r} T={T} base={base:.4f} ms ours={row['ours'] / base:.3f}x | " + "  ".join(
                    f"{k[5:]}: gemm {row[k] / base:.3f}x lora {row['lora_' + k[5:]] / base:.3f}x "
                    f"err {row['err_' + k[5:]]:.1e}" for k in row if k.startswith("gemm_")), flush=True)
                write_rows(path, rows)
            del probs
            torch.cuda.empty_cache()
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
