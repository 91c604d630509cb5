"""Large-T qkvz GEMM with the LoRA expand in its epilogue (Triton, Hopper TMA): the prefill path of
``fx_passes::qkvz_gemm_lora`` (semantics: :mod:`fx_passes.ops.qkvz_gemm_lora`).

Why: from ~1024 tokens the GEMM is compute-bound and a LoRA kernel beside it has a floor of 1.05-1.10x of
the GEMM (the delta is written, 2 T N bytes, and read back by the GEMM's beta = 1 epilogue; the shrink
reads x again). Only an expand inside a GEMM running at cuBLAS's rate avoids that (this GEMM alone runs
within a few % of cuBLAS on the Qwen3.5 shapes: benchmarks/RESULTS.md).

1. The shrink (:mod:`.lora_shrink`, one K chunk: s in B's dtype) lets the GEMM launch at once
   (programmatic dependent launch).
2. ``_gemm_lora_prefill_kernel``: persistent (one program per SM), grouped tile order, TMA loads of x
   and the packed W and a TMA store of out, fp32 accumulator. After a tile's K loop it waits for the
   shrink (``griddepcontrol.wait``, a no-op after the first tile) and chains ``s_slice @ B_slice^T``
   into the same accumulator for every LoRA slice the column tile overlaps, one dot per adapter
   present in the tile's rows. The scale multiplies s before its 16-bit rounding (PEFT rounds s, then
   scales the product: one bf16 rounding of s either way): a second ``[128, 256]`` fp32 accumulator
   (``acc += dot(s, B) * scale``) spills registers.

Conditions (:func:`prefill_fusable`): CUDA with TMA (sm90+) and shared memory for the tiles, packed
weights (one descriptor), 16-bit x / W / adapters of one dtype, 16-byte aligned rows. Otherwise the op
keeps its other paths.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from fx_passes.ops.kernels.jit_helpers import (
    adapter_scale, adapter_stride, adapter_tile, on_device, present, scale_args, token_adapters,
)
from fx_passes.ops.kernels.lora_shrink import alloc_shrink_buffer, launch_shrink
from fx_passes.ops.lora_args import LoraSlices
from fx_passes.ops.qkvz_gemm import packed_view, weights_are_packed
from fx_passes.ops.tuning import LoraLaunch, PrefillLaunch, device_info, interpreting, lora_launch, prefill_launch

_16BIT = (torch.float16, torch.bfloat16)
_OFF_GPU_PROGRAMS = 4   # the interpreter runs programs one after another: any count is correct


@triton.jit
def _tile_pids(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles sweep the column tiles together (their W tiles stay in L2)."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _chain_adapter(acc, s, bt, ids, l, L, scales_ptr, stride_scales, scale, HAS_SCALES: tl.constexpr):
    """``acc + (scale_l * s in the rows of adapter l) @ bt`` (``acc`` unchanged when no row uses ``l``)."""
    if present(ids, l, L):
        s_l = tl.where((ids == l)[:, None], s * adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                       0.0)
        acc = tl.dot(s_l.to(bt.dtype), bt, acc)
    return acc


@triton.jit
def _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                    b_ptr, stride_bl, stride_bn, n, start, g, rank,
                    L, stride_sg, stride_st, stride_scales, scale,
                    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc`` plus this slice's LoRA in its columns of the tile (B rows outside them load as 0);
    ``acc`` unchanged when the tile's columns miss the slice ``[start, start + n)``."""
    if (off_n < start + n) & (off_n + BLOCK_N > start):
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        s = tl.load(s_ptr + g * stride_sg + rows[:, None].to(tl.int64) * stride_st + offs_r[None, :],
                    mask=row_ok[:, None] & r_mask[None, :], other=0.0).to(tl.float32)   # [BLOCK_M, BLOCK_R]
        local = off_n - start + tl.arange(0, BLOCK_N)
        b_tile = local[None, :].to(tl.int64) * stride_bn + offs_r[:, None]                 # [BLOCK_R, BLOCK_N] = B^T
        b_mask = r_mask[:, None] & ((local >= 0) & (local < n))[None, :]
        if HAS_IDS:
            # 2 adapters at a time: their B tiles are loaded together (one L2 latency, not one per
            # adapter; a tile of an adapter absent from the rows costs no traffic), then chained. 4 tiles
            # of [BLOCK_R, 256] next to the [128, 256] fp32 accumulator gained nothing over 2.
            for l0 in range(0, L, 2):
                bt_0 = adapter_tile(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                bt_1 = adapter_tile(b_ptr, l0 + 1, L, stride_bl, b_tile, b_mask, ids)
                acc = _chain_adapter(acc, s, bt_0, ids, l0, L, scales_ptr, stride_scales, scale, HAS_SCALES)
                acc = _chain_adapter(acc, s, bt_1, ids, l0 + 1, L, scales_ptr, stride_scales, scale, HAS_SCALES)
        else:
            bt = tl.load(b_ptr + b_tile, mask=b_mask, other=0.0)
            s_0 = s * adapter_scale(scales_ptr, 0, L, stride_scales, scale, HAS_SCALES)
            acc = tl.dot(s_0.to(bt.dtype), bt, acc)
    return acc


@triton.jit
def _gemm_lora_prefill_kernel(
    x_desc, w_desc, o_desc, s_ptr, ids_ptr, scales_ptr,
    b_ptrs, b_stride_l, b_stride_n, b_n, b_start, b_group, b_rank,   # tuples: one entry per slice
    T, N, K, L, stride_sg, stride_st, stride_scales, scale,
    NUM_SLICES: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_pids(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
        if NUM_SLICES > 0:
            if USE_PDL:
                # Every program waits, so this grid's completion implies the shrink's (s is freed to
                # the caching allocator right after the launch). A no-op after a program's first tile.
                gdc_wait()
            rows = off_m + tl.arange(0, BLOCK_M)
            ids = token_adapters(ids_ptr, rows, T, L, HAS_IDS)
            row_ok = (ids >= 0) & (ids < L)   # rows without a valid adapter were never written by the shrink
            # one call per slice (separate pointers, unrolled at compile time); each returns acc unchanged
            # when the tile misses the slice
            for i in tl.static_range(NUM_SLICES):
                acc = _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                                      b_ptrs[i], b_stride_l[i], b_stride_n[i], b_n[i], b_start[i], b_group[i],
                                      b_rank[i], L, stride_sg, stride_st, stride_scales, scale, HAS_IDS, HAS_SCALES,
                                      BLOCK_N, BLOCK_R)
        o_desc.store([off_m, off_n], acc.to(o_desc.dtype))


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor's rules: 16-byte aligned base and row stride, unit last stride."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


def prefill_fusable(x: torch.Tensor, weights: Sequence[torch.Tensor], lora: LoraSlices) -> bool:
    """Whether :func:`gemm_lora_prefill` can run these (already checked) arguments on this device:
    host-side facts only (no device sync), so a CUDA graph captured at one T replays the same kernels."""
    if x.dtype not in _16BIT or any(t.dtype != x.dtype for t in (*lora.lora_a, *lora.lora_b)):
        return False   # fp32 adapters (PEFT's default on a bf16 base): the exact fp32 LoRA path
    if not weights_are_packed(weights) or prefill_launch(x.device, x.dtype) is None:
        return False
    out_row_bytes = sum(w.shape[0] for w in weights) * x.element_size()   # the TMA store's row stride
    return _tma_ok(x) and _tma_ok(packed_view(weights)) and out_row_bytes % 16 == 0


def prefill_shrink_launch(x: torch.Tensor, lora: LoraSlices) -> LoraLaunch:
    """The shrink beside the prefill GEMM: one K chunk (its s is read whole by every epilogue)."""
    groups, _ = lora.shrink_groups()
    return lora_launch(x.shape[0], x.shape[1], len(groups), lora.max_rank(), 64, x.device, adapters=lora.adapters,
                       has_ids=lora.has_ids, ksplit=1)


def gemm_lora_prefill(x: torch.Tensor, weights: Sequence[torch.Tensor], lora: Optional[LoraSlices], *,
                      config: Optional[PrefillLaunch] = None, shrink: Optional[LoraLaunch] = None) -> torch.Tensor:
    """``out = x @ [W_0; W_1; ...]^T + LoRA`` in two launches (shrink, then the persistent GEMM + expand).

    Arguments are assumed checked and :func:`prefill_fusable`; ``lora=None`` runs the GEMM alone
    (benchmarks). ``config``: the launch (default :func:`fx_passes.ops.tuning.prefill_launch`);
    ``shrink``: the shrink's (default :func:`prefill_shrink_launch`).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, K = x.shape
    w = packed_view(weights)
    N = w.shape[0]
    out = x.new_empty((T, N))
    if T == 0:
        return out
    cfg = config or prefill_launch(x.device, x.dtype) or PrefillLaunch()
    on_gpu = x.device.type == "cuda" and not interpreting()
    pdl = lora is not None and on_gpu
    has_ids, has_scales, scale, scales_arg, stride_scales, ids_arg = False, False, 1.0, x, 0, x
    adapters, block_r = 1, 16
    if lora is not None:
        groups, compact = lora.shrink_groups()
        shrink = shrink or prefill_shrink_launch(x, lora)
        scale, scales_arg, stride_scales, has_scales = scale_args(lora.lora_scales, lora.scale, x)
        has_ids, adapters, block_r = lora.has_ids, lora.adapters, shrink.block_r
        ids_arg = lora.token_lora_ids if has_ids else x
    if lora is None:   # a placeholder slice, never read (NUM_SLICES = 0)
        slice_args = [(x,), (0,), (0,), (0,), (0,), (0,), (0,)]
    else:
        bs = lora.lora_b
        slice_args = [tuple(bs), tuple(adapter_stride(b) for b in bs), tuple(b.stride(-2) for b in bs),
                      tuple(b.shape[-2] for b in bs), lora.slice_start, tuple(compact[g] for g in lora.slice_a),
                      tuple(b.shape[-1] for b in bs)]
    tiles = triton.cdiv(T, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    num_programs = cfg.num_programs or (device_info(x.device).sms if on_gpu else _OFF_GPU_PROGRAMS)
    programs = min(tiles, num_programs)
    with on_device(x):
        if lora is not None:
            s_buf = alloc_shrink_buffer(T, len(groups), shrink, lora.b_dtype, x.device)
            # Not a PDL dependent itself (x comes from the kernel before it); USE_PDL makes it let the
            # GEMM launch at once.
            launch_shrink(x, lora, s_buf, shrink, use_pdl=pdl)
            s_strides = (s_buf.stride(1), s_buf.stride(2))
        else:
            s_buf, s_strides = x, (0, 0)
        _gemm_lora_prefill_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [cfg.block_m, cfg.block_k]),
            TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]),
            TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n]), s_buf, ids_arg, scales_arg, *slice_args,
            T, N, K, adapters, *s_strides, stride_scales, float(scale),
            NUM_SLICES=len(lora.lora_b) if lora is not None else 0, HAS_IDS=has_ids, HAS_SCALES=has_scales,
            USE_PDL=pdl, NUM_PROGRAMS=programs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_R=block_r, GROUP_M=cfg.group_m, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out
