"""The two-launch LoRA of ``fx_passes::qkvz_lora_`` (semantics: :mod:`fx_passes.ops.qkvz_lora`): the
shrink (:mod:`.lora_shrink`), then the expand here.

``_lora_expand_kernel``: grid ``(cdiv(T, block_m), sum_i cdiv(n_i, block_n))`` over token tiles x the
output-column tiles of all slices; each column tile belongs to exactly one slice, whose B pointer is
picked by branching on the slice index. A program sums the split-K partial shrinks, rounds the tile to
B's dtype, does one ``tl.dot`` over the rank per adapter present (straight-line code without token ids),
scales per token and adds into ``out`` (fp32 sum, rounded once). Rows with no adapter (an id outside
``0..L-1``) are never written.

``accumulate=False`` *writes* the delta instead (0 for rows without an adapter) and never reads
``out``, for a caller that lets the base GEMM accumulate into it afterwards.

``pdl``: both kernels are launched with programmatic dependent launch: the shrink (which needs only
``x``) and the expand's B loads overlap the kernels before them; each waits in-kernel
(``griddepcontrol.wait``) before touching what its predecessor writes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from fx_passes.ops.kernels.jit_helpers import (
    ADAPTER_BATCH, adapter_scale, adapter_stride, adapter_tiles4, on_device, present, scale_args,
    tile_owner, token_adapters,
)
from fx_passes.ops.kernels.lora_shrink import alloc_shrink_buffer, dot_precision, launch_shrink
from fx_passes.ops.lora_args import LoraSlices
from fx_passes.ops.tuning import LoraLaunch, lora_launch


@triton.jit
def _expand_adapter(delta, s, bt, ids, l, L, scales_ptr, stride_scales, scale,
                    HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``delta`` with the rows of adapter ``l`` set to ``scale_l * (s @ bt)`` ([BLOCK_M, BLOCK_N])."""
    if present(ids, l, L):
        d = tl.dot(s, bt, input_precision=DOT_PRECISION)
        delta = tl.where((ids == l)[:, None], d * adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                         delta)
    return delta


@triton.jit
def _expand_slice_tile(
    out_ptr, s_ptr, ids_ptr, scales_ptr,
    b_ptr, stride_bl, stride_bn, n, col_start, g, rank, tile_n,
    T, L, KSPLIT,
    stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
    pid_m,
    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n
    r_mask = offs_r < rank
    rows64 = offs_m.to(tl.int64)
    ids = token_adapters(ids_ptr, offs_m, T, L, HAS_IDS)
    b_tile = offs_n[None, :] * stride_bn + offs_r[:, None]  # [BLOCK_R, BLOCK_N] = B^T
    b_mask = n_mask[None, :] & r_mask[:, None]

    # Work that needs nothing from the kernels before this one (so, with PDL, overlaps them).
    if HAS_IDS:
        bt0 = tl.zeros((BLOCK_R, BLOCK_N), dtype=b_ptr.dtype.element_ty)  # unused
    else:  # every row uses adapter 0: straight-line code, B prefetched
        bt0 = tl.load(b_ptr + b_tile, mask=b_mask, other=0.0)
    if USE_PDL:
        gdc_wait()  # the shrink (and, through it, the GEMM writing out) has completed

    # ids == -1 or >= L: the row belongs to no adapter: left untouched (ACCUMULATE) or set to 0
    row_ok = (ids >= 0) & (ids < L)
    o_ptrs = out_ptr + rows64[:, None] * stride_ot + (col_start + offs_n)[None, :]
    if ACCUMULATE:
        o_mask = row_ok[:, None] & n_mask[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    else:
        o_mask = (offs_m < T)[:, None] & n_mask[None, :]
    # sum the split-K partials written by the shrink kernel
    s_ptrs = s_ptr + g * stride_sg + rows64[:, None] * stride_st + offs_r[None, :]
    s_mask = row_ok[:, None] & r_mask[None, :]  # rows without a valid adapter were never written
    s = tl.load(s_ptrs, mask=s_mask, other=0.0)
    for ks in range(1, KSPLIT):
        s += tl.load(s_ptrs + ks * stride_sk, mask=s_mask, other=0.0)
    s = s.to(b_ptr.dtype.element_ty)  # PEFT/vLLM round the shrink to B's dtype

    if HAS_IDS:
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for l0 in range(0, L, ADAPTER_BATCH):
            bt_0, bt_1, bt_2, bt_3 = adapter_tiles4(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
            delta = _expand_adapter(delta, s, bt_0, ids, l0, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_1, ids, l0 + 1, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_2, ids, l0 + 2, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_3, ids, l0 + 3, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
    else:
        scale_0 = adapter_scale(scales_ptr, 0, L, stride_scales, scale, HAS_SCALES)
        delta = tl.dot(s, bt0, input_precision=DOT_PRECISION) * scale_0

    if ACCUMULATE:
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, delta.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _lora_expand_kernel(
    out_ptr, s_ptr, ids_ptr, scales_ptr,
    b_ptrs, b_stride_l, b_stride_n, b_n, b_start, b_group, b_rank, tile_off,   # tuples: one entry per slice
    T, L, KSPLIT,
    stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
    NUM_SLICES: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sl = tile_owner(pid_n, tile_off, NUM_SLICES)
    # The B tensors are separate pointers: a branch per slice, unrolled at compile time.
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr,
                               b_ptrs[i], b_stride_l[i], b_stride_n[i], b_n[i], b_start[i], b_group[i], b_rank[i],
                               pid_n - tile_off[i],
                               T, L, KSPLIT, stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
                               pid_m, HAS_IDS, HAS_SCALES, DOT_PRECISION, USE_PDL, ACCUMULATE,
                               BLOCK_M, BLOCK_N, BLOCK_R)


def plan_lora(x: torch.Tensor, lora: LoraSlices, **force) -> LoraLaunch:
    """The launch of :func:`lora_shrink_expand_` for these arguments (``force``: see
    :func:`fx_passes.ops.tuning.lora_launch`)."""
    groups, _ = lora.shrink_groups()
    return lora_launch(x.shape[0], x.shape[1], len(groups), lora.max_rank(), max(b.shape[-2] for b in lora.lora_b),
                       x.device, adapters=lora.adapters, has_ids=lora.has_ids, **force)


def lora_shrink_expand_(out: torch.Tensor, x: torch.Tensor, lora: LoraSlices, *, accumulate: bool = True,
                        config: Optional[LoraLaunch] = None, checked: bool = False) -> None:
    """Adds (``accumulate=False``: writes) the multi-slice LoRA of ``x`` into ``out``: two launches.

    Ranks up to :data:`~fx_passes.ops.lora_args.KERNEL_MAX_RANK`, contiguous last dims of A and B
    (:meth:`LoraSlices.kernel_calls` makes any call so). ``config``: the launch (default
    :func:`plan_lora`); benchmarks and tests force one through it. ``checked``: the caller has already
    checked these arguments' rules (:mod:`fx_passes.ops.dispatch` does once per call signature).
    """
    adapters = lora.adapters if checked else lora.check(out, x)
    T = x.shape[0]
    if T == 0:
        return
    cfg = config or plan_lora(x, lora)
    _, compact = lora.shrink_groups()
    launch_opts = {} if cfg.num_warps is None else {"num_warps": int(cfg.num_warps)}
    if cfg.pdl:
        launch_opts["launch_pdl"] = True
    scale, scales_arg, stride_scales, has_scales = scale_args(lora.lora_scales, lora.scale, x)
    ids_arg = lora.token_lora_ids if lora.has_ids else x
    s_buf = alloc_shrink_buffer(T, len(compact), cfg, lora.b_dtype, x.device)

    bs = lora.lora_b
    tile_off, n_tiles = [], 0
    for b in bs:
        tile_off.append(n_tiles)
        n_tiles += triton.cdiv(b.shape[-2], cfg.block_n)
    if n_tiles == 0:
        return
    b_args = (tuple(bs), tuple(adapter_stride(b) for b in bs), tuple(b.stride(-2) for b in bs),
              tuple(b.shape[-2] for b in bs), lora.slice_start, tuple(compact[g] for g in lora.slice_a),
              tuple(b.shape[-1] for b in bs), tuple(tile_off))

    shrink_opts = dict(launch_opts)
    if not accumulate:
        # the shrink may be the first kernel after x's producer: it must not start early
        shrink_opts.pop("launch_pdl", None)
    with on_device(x):
        launch_shrink(x, lora, s_buf, cfg, use_pdl=cfg.pdl, **shrink_opts)
        _lora_expand_kernel[(triton.cdiv(T, cfg.block_m), n_tiles)](
            out, s_buf, ids_arg, scales_arg, *b_args,
            T, adapters, cfg.ksplit,
            out.stride(0), s_buf.stride(0), s_buf.stride(1), s_buf.stride(2), stride_scales, float(scale),
            NUM_SLICES=len(lora.lora_b), HAS_IDS=lora.has_ids, HAS_SCALES=has_scales,
            DOT_PRECISION=dot_precision(lora.lora_a[0].dtype), USE_PDL=cfg.pdl, ACCUMULATE=bool(accumulate),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, **launch_opts,
        )
