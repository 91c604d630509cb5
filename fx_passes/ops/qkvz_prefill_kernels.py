"""Large-T qkvz GEMM with the LoRA expand in its epilogue (Triton, Hopper TMA), the prefill path of
``fx_passes::qkvz_gemm_lora`` (semantics: :mod:`fx_passes.ops.qkvz_gemm_lora`).

Why: from ~1024 tokens the GEMM is compute-bound and a LoRA kernel beside it has a floor of 1.05-1.10x of
the GEMM (the delta is written, 2 T N bytes, and read back by the GEMM's beta = 1 epilogue; the shrink
reads x again). Only an expand inside a GEMM running at cuBLAS's rate avoids that (benchmarks/RESULTS.md,
session 4: this GEMM alone 0.98-1.06x cuBLAS on the Qwen3.5 shapes at T = 4096, H200).

1. ``_qkvz_lora_shrink_kernel`` (:mod:`fx_passes.ops.qkvz_lora_kernels`, one K chunk: s in B's dtype)
   lets the GEMM launch at once (programmatic dependent launch).
2. ``_qkvz_prefill_kernel``: persistent (one program per SM), grouped tile order, TMA loads of x and
   the packed W and a TMA store of out, fp32 accumulator. After a tile's K loop it waits for the
   shrink (``griddepcontrol.wait``, a no-op after the first tile) and chains ``s_slice @ B_slice^T``
   into the same accumulator for every LoRA slice the column tile overlaps, one dot per adapter
   present in the tile's rows. The scale multiplies s before its 16-bit rounding (PEFT rounds s, then
   scales the product: one bf16 rounding of s either way): a second ``[128, 256]`` fp32 accumulator
   (``acc += dot(s, B) * scale``) spilled registers and cost 1.30-1.56x base (session 4, run 1).

Conditions (:func:`prefill_fusable`): CUDA with TMA (sm90+), packed weights (one descriptor),
16-bit x / W / adapters of one dtype, 16-byte aligned rows. Otherwise the op keeps its other paths.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from fx_passes.ops.qkvz_gemm import _packed_view, weights_are_packed
from fx_passes.ops.qkvz_lora_kernels import (
    _adapter_scale, _adapter_stride, _adapter_tile, _interpreting, _num_sms, _present, _token_adapters,
    alloc_shrink_buffer, check_adapter_tiles, launch_shrink, plan, scale_args, shrink_groups,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the best of benchmarks/sweep_prefill_gemm.py on an
# H200 (session 4, runs 1-3, T = 1024 / 4096, the three Qwen3.5 shapes): the GEMM alone 0.96-1.06x
# cuBLAS; 128 x 128 (1.06-1.22x) and 256 x 128 (1.04-1.14x) slower, 4 stages over the shared memory,
# Hopper warp specialization and loop flattening slower with the LoRA.
PREFILL_BLOCKS = (128, 256, 64, 3, 8)
GROUP_M = 8   # row tiles that sweep the column tiles together (their W tiles are reused from L2)
_16BIT = (torch.float16, torch.bfloat16)


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
    if _present(ids, l, L):
        s_l = tl.where((ids == l)[:, None], s * _adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                       0.0)
        acc = tl.dot(s_l.to(bt.dtype), bt, acc)
    return acc


@triton.jit
def _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                    b_ptr, stride_bl, stride_bn, n, start, g, rank,
                    L, stride_sg, stride_st, stride_scales, scale,
                    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    ADAPTER_TILES: tl.constexpr):
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
            # ADAPTER_TILES adapters at a time: their B tiles are loaded together (one L2 latency, not
            # one per adapter; a tile of an adapter absent from the rows costs no traffic), then chained.
            for l0 in range(0, L, ADAPTER_TILES):
                bt_0 = _adapter_tile(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                if ADAPTER_TILES > 1:
                    bt_1 = _adapter_tile(b_ptr, l0 + 1, L, stride_bl, b_tile, b_mask, ids)
                if ADAPTER_TILES > 2:
                    bt_2 = _adapter_tile(b_ptr, l0 + 2, L, stride_bl, b_tile, b_mask, ids)
                    bt_3 = _adapter_tile(b_ptr, l0 + 3, L, stride_bl, b_tile, b_mask, ids)
                acc = _chain_adapter(acc, s, bt_0, ids, l0, L, scales_ptr, stride_scales, scale, HAS_SCALES)
                if ADAPTER_TILES > 1:
                    acc = _chain_adapter(acc, s, bt_1, ids, l0 + 1, L, scales_ptr, stride_scales, scale, HAS_SCALES)
                if ADAPTER_TILES > 2:
                    acc = _chain_adapter(acc, s, bt_2, ids, l0 + 2, L, scales_ptr, stride_scales, scale, HAS_SCALES)
                    acc = _chain_adapter(acc, s, bt_3, ids, l0 + 3, L, scales_ptr, stride_scales, scale, HAS_SCALES)
        else:
            bt = tl.load(b_ptr + b_tile, mask=b_mask, other=0.0)
            s_0 = s * _adapter_scale(scales_ptr, 0, L, stride_scales, scale, HAS_SCALES)
            acc = tl.dot(s_0.to(bt.dtype), bt, acc)
    return acc


@triton.jit
def _qkvz_prefill_kernel(
    x_desc, w_desc, o_desc, s_ptr, ids_ptr, scales_ptr,
    b0_ptr, b0_stride_l, b0_stride_n, n0, start0, g0, r0,
    b1_ptr, b1_stride_l, b1_stride_n, n1, start1, g1, r1,
    b2_ptr, b2_stride_l, b2_stride_n, n2, start2, g2, r2,
    b3_ptr, b3_stride_l, b3_stride_n, n3, start3, g3, r3,
    T, N, K, L, stride_sg, stride_st, stride_scales, scale,
    NUM_SLICES: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, ADAPTER_TILES: tl.constexpr,
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
            ids = _token_adapters(ids_ptr, rows, T, L, HAS_IDS)
            row_ok = (ids >= 0) & (ids < L)   # rows without a valid adapter were never written by the shrink
            # one call per slice (separate pointers); each returns acc unchanged when the tile misses it
            acc = _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                                  b0_ptr, b0_stride_l, b0_stride_n, n0, start0, g0, r0,
                                  L, stride_sg, stride_st, stride_scales, scale, HAS_IDS, HAS_SCALES, BLOCK_N, BLOCK_R,
                                  ADAPTER_TILES)
            if NUM_SLICES > 1:
                acc = _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                                      b1_ptr, b1_stride_l, b1_stride_n, n1, start1, g1, r1,
                                      L, stride_sg, stride_st, stride_scales, scale, HAS_IDS, HAS_SCALES, BLOCK_N,
                                      BLOCK_R, ADAPTER_TILES)
            if NUM_SLICES > 2:
                acc = _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                                      b2_ptr, b2_stride_l, b2_stride_n, n2, start2, g2, r2,
                                      L, stride_sg, stride_st, stride_scales, scale, HAS_IDS, HAS_SCALES, BLOCK_N,
                                      BLOCK_R, ADAPTER_TILES)
            if NUM_SLICES > 3:
                acc = _slice_epilogue(acc, s_ptr, ids, rows, row_ok, off_n, scales_ptr,
                                      b3_ptr, b3_stride_l, b3_stride_n, n3, start3, g3, r3,
                                      L, stride_sg, stride_st, stride_scales, scale, HAS_IDS, HAS_SCALES, BLOCK_N,
                                      BLOCK_R, ADAPTER_TILES)
        o_desc.store([off_m, off_n], acc.to(o_desc.dtype))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# B tiles a mixed-adapter epilogue loads together. H200, session 5 call D (4 random adapters, T 1024 / 4096,
# 3 rounds, ratio to cuBLAS base): 2 at a time best or within 2 % in 11 / 12 rows (35B-A3B r16 T 1024:
# 1.33x one at a time, 1.28x two, 1.26x four; 27B r16 T 1024: 1.10 / 1.05 / 1.08; r64 35B-A3B T 1024:
# 1.64 / 1.54 / 1.57); 4 tiles of [BLOCK_R, 256] next to the [128, 256] fp32 accumulator gain nothing more.
MIXED_ADAPTER_TILES = 2


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor's rules: 16-byte aligned base and row stride, unit last stride."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


def prefill_fusable(x: torch.Tensor, w_qkv: torch.Tensor, w_z: torch.Tensor,
                    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> bool:
    """Whether ``qkvz_prefill_triton`` can run these arguments (already checked by the op): host-side
    facts only (no device sync), so a CUDA graph captured at one T always replays the same kernels."""
    if x.dtype not in _16BIT or any(t.dtype != x.dtype for t in (*lora_a, *lora_b)):
        return False   # fp32 adapters (PEFT's default on a bf16 base): the exact fp32 LoRA path
    if not weights_are_packed(w_qkv, w_z):
        return False
    if x.device.type == "cuda" and not (_interpreting() or _has_tma(x.device.index or 0)):
        return False
    return _tma_ok(x) and _tma_ok(_packed_view(w_qkv, w_z))


def qkvz_prefill_triton(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_z: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    *,
    adapters: int = 1,
    blocks: Optional[tuple[int, int, int, int, int]] = None,
    num_programs: Optional[int] = None,
    pdl: bool = True,
    with_lora: bool = True,
    adapter_tiles: Optional[int] = None,
) -> torch.Tensor:
    """``out = x @ [w_qkv; w_z]^T + LoRA`` in two launches (shrink, then the persistent GEMM + expand).

    Arguments are assumed checked (``fx_passes.ops.qkvz_gemm_lora``) and :func:`prefill_fusable`.
    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); ``num_programs`` overrides the
    persistent grid (one program per SM); ``with_lora=False`` runs the GEMM alone (benchmarks);
    ``adapter_tiles`` (1, 2 or 4): how many adapters' B tiles a mixed-adapter epilogue loads together
    (default :data:`MIXED_ADAPTER_TILES`).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, K = x.shape
    w = _packed_view(w_qkv, w_z)
    N = w.shape[0]
    out = x.new_empty((T, N))
    if T == 0:
        return out
    bm, bn, bk, stages, warps = blocks or PREFILL_BLOCKS
    adapter_tiles = check_adapter_tiles(adapter_tiles or MIXED_ADAPTER_TILES, "qkvz_prefill_triton")
    has_ids = token_lora_ids is not None
    groups, compact = shrink_groups(lora_a, slice_a)
    ranks = [a.shape[-2] for a in groups]
    shrink_cfg = plan(T, K, len(groups), max(ranks), 64, x.device, adapters=adapters, has_ids=has_ids, ksplit=1)
    on_gpu = x.device.type == "cuda" and not _interpreting()
    pdl = bool(pdl) and with_lora and on_gpu
    scale, scales_arg, stride_scales, has_scales = scale_args(lora_scales, scale, x)
    ids_arg = token_lora_ids if has_ids else x

    slice_args = []
    for i in range(4):
        j = min(i, len(lora_b) - 1)
        b = lora_b[j]
        slice_args += [b, _adapter_stride(b), b.stride(-2), b.shape[-2], int(slice_start[j]),
                       compact[int(slice_a[j])], b.shape[-1]]
    tiles = triton.cdiv(T, bm) * triton.cdiv(N, bn)
    if num_programs is None:   # the interpreter runs programs one after another: any count is correct
        num_programs = _num_sms(x.device.type, x.device.index) if on_gpu else 4
    programs = min(tiles, num_programs)
    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        if with_lora:
            s_buf = alloc_shrink_buffer(T, len(groups), shrink_cfg, lora_b[0].dtype, x.device)
            # Not a PDL dependent itself (x comes from the kernel before it); USE_PDL makes it let the
            # GEMM launch at once.
            launch_shrink(x, ids_arg, s_buf, groups, shrink_cfg, has_ids=has_ids, dot_precision="tf32",
                          use_pdl=pdl)
            s_strides = (s_buf.stride(1), s_buf.stride(2))
        else:
            s_buf, s_strides = x, (0, 0)
        _qkvz_prefill_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn]), s_buf, ids_arg, scales_arg, *slice_args,
            T, N, K, adapters, *s_strides, stride_scales, float(scale),
            NUM_SLICES=len(lora_b) if with_lora else 0, HAS_IDS=has_ids, HAS_SCALES=has_scales, USE_PDL=pdl,
            NUM_PROGRAMS=programs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=shrink_cfg["BLOCK_R"],
            GROUP_M=GROUP_M, ADAPTER_TILES=adapter_tiles,
            num_stages=stages, num_warps=warps, **({"launch_pdl": True} if pdl else {}),
        )
    return out
