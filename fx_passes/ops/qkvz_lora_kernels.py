"""Triton kernels of ``fx_passes::qkvz_lora_`` (semantics: :mod:`fx_passes.ops.qkvz_lora`).

Launch structure (two launches, no host sync, CUDA-graph capturable):

1. ``_qkvz_lora_shrink_kernel`` -- grid ``(cdiv(T, BLOCK_M), G)`` over token tiles x the *used*
   A groups. Each program computes ``s[g, tile] = x[tile] @ A_g[l].T`` for every adapter ``l``
   present in the tile (rows whose id != l are masked; absent adapters are skipped), looping over
   H in BLOCK_K chunks with fp32 accumulation, and writes it to an fp32 buffer ``[G, T, BLOCK_R]``
   (padded rank columns and no-adapter rows hold 0). A shared group (q, k, v) is shrunk ONCE.
2. ``_qkvz_lora_expand_kernel`` -- grid ``(cdiv(T, BLOCK_M), sum_i cdiv(n_i, BLOCK_N))`` over token
   tiles x the output-column tiles of all slices; each column tile belongs to exactly one slice,
   whose B pointer is picked by branching on the slice index. It rounds the shrink tile to B's
   dtype, does one ``tl.dot`` over the rank per adapter present, scales per token and adds into
   ``out`` (fp32 sum, rounded once). Rows with no adapter (-1, or an id >= L) are never written.

Block sizes below are plain defaults chosen for correctness; tuning (autotune, split-K, fusing the
two launches for small T) is issue #3's job.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fx_passes.ops.qkvz_lora import check_qkvz_lora_args

_NO_TILE = 2**30  # tile offset of an absent slice: no program id reaches it


# --------------------------------------------------------------------------------------------
# Shrink: s[g] = x @ A_g[l].T
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_adapters(ids_ptr, offs_m, T, HAS_IDS: tl.constexpr):
    """Adapter id of each row of the tile; -1 for rows >= T (and for -1 ids)."""
    m_mask = offs_m < T
    if HAS_IDS:
        ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1).to(tl.int32)
    else:
        ids = tl.where(m_mask, 0, -1)
    return ids


@triton.jit
def _shrink_group(
    x_ptr, ids_ptr, s_ptr,
    a_ptr, stride_al, stride_ar, rank, g,
    T, H, L,
    stride_xt, stride_sg, stride_st,
    pid_m,
    HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < T
    r_mask = offs_r < rank
    rows64 = offs_m.to(tl.int64)
    ids = _token_adapters(ids_ptr, offs_m, T, HAS_IDS)

    result = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for l in range(0, L):
        in_l = ids == l
        if tl.max(in_l.to(tl.int32), axis=0) > 0:  # skip adapters absent from this tile
            a_base = a_ptr + tl.cast(l, tl.int64) * stride_al
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + offs_k
                k_mask = k < H
                xt = tl.load(x_ptr + rows64[:, None] * stride_xt + k[None, :],
                             mask=in_l[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None],  # [BLOCK_K, BLOCK_R] = A^T
                             mask=r_mask[None, :] & k_mask[:, None], other=0.0)
                # the shrink runs in the adapters' dtype (x may be bf16 over fp32 adapters)
                acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=DOT_PRECISION)
            result = tl.where(in_l[:, None], acc, result)

    s_ptrs = s_ptr + g * stride_sg + rows64[:, None] * stride_st + offs_r[None, :]
    tl.store(s_ptrs, result, mask=m_mask[:, None])


@triton.jit
def _qkvz_lora_shrink_kernel(
    x_ptr, ids_ptr, s_ptr,
    a0_ptr, a0_stride_l, a0_stride_r, a0_rank,
    a1_ptr, a1_stride_l, a1_stride_r, a1_rank,
    a2_ptr, a2_stride_l, a2_stride_r, a2_rank,
    a3_ptr, a3_stride_l, a3_stride_r, a3_rank,
    T, H, L,
    stride_xt, stride_sg, stride_st,
    NUM_GROUPS: tl.constexpr, HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    # The A tensors are separate pointers: branch on the group, one helper call per branch.
    if g == 0:
        _shrink_group(x_ptr, ids_ptr, s_ptr, a0_ptr, a0_stride_l, a0_stride_r, a0_rank, 0,
                      T, H, L, stride_xt, stride_sg, stride_st, pid_m,
                      HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 1:
        if g == 1:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a1_ptr, a1_stride_l, a1_stride_r, a1_rank, 1,
                          T, H, L, stride_xt, stride_sg, stride_st, pid_m,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 2:
        if g == 2:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a2_ptr, a2_stride_l, a2_stride_r, a2_rank, 2,
                          T, H, L, stride_xt, stride_sg, stride_st, pid_m,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 3:
        if g == 3:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a3_ptr, a3_stride_l, a3_stride_r, a3_rank, 3,
                          T, H, L, stride_xt, stride_sg, stride_st, pid_m,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)


# --------------------------------------------------------------------------------------------
# Expand: out[:, start_i : start_i + n_i] += scale_l * (s[g_i].to(B.dtype) @ B_i[l].T)
# --------------------------------------------------------------------------------------------
@triton.jit
def _expand_slice_tile(
    out_ptr, s_ptr, ids_ptr, scales_ptr,
    b_ptr, stride_bl, stride_bn, n, col_start, g, rank, tile_n,
    T, L,
    stride_ot, stride_sg, stride_st, stride_scales, scale,
    pid_m,
    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < T
    n_mask = offs_n < n
    r_mask = offs_r < rank
    rows64 = offs_m.to(tl.int64)
    ids = _token_adapters(ids_ptr, offs_m, T, HAS_IDS)

    s = tl.load(s_ptr + g * stride_sg + rows64[:, None] * stride_st + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    s = s.to(b_ptr.dtype.element_ty)  # PEFT/vLLM round the shrink to B's dtype

    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for l in range(0, L):
        in_l = ids == l
        if tl.max(in_l.to(tl.int32), axis=0) > 0:  # skip adapters absent from this tile
            bt = tl.load(b_ptr + tl.cast(l, tl.int64) * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None],
                         mask=n_mask[None, :] & r_mask[:, None], other=0.0)  # [BLOCK_R, BLOCK_N] = B^T
            d = tl.dot(s, bt, input_precision=DOT_PRECISION)
            if HAS_SCALES:
                scale_l = tl.load(scales_ptr + l * stride_scales).to(tl.float32) * scale
            else:
                scale_l = scale
            delta = tl.where(in_l[:, None], d * scale_l, delta)

    # ids == -1 or >= L: the row belongs to no adapter and is left untouched
    row_ok = (ids >= 0) & (ids < L)
    o_mask = row_ok[:, None] & n_mask[None, :]
    o_ptrs = out_ptr + rows64[:, None] * stride_ot + (col_start + offs_n)[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _qkvz_lora_expand_kernel(
    out_ptr, s_ptr, ids_ptr, scales_ptr,
    b0_ptr, b0_stride_l, b0_stride_n, b0_n, b0_start, b0_group, b0_rank,
    b1_ptr, b1_stride_l, b1_stride_n, b1_n, b1_start, b1_group, b1_rank,
    b2_ptr, b2_stride_l, b2_stride_n, b2_n, b2_start, b2_group, b2_rank,
    b3_ptr, b3_stride_l, b3_stride_n, b3_n, b3_start, b3_group, b3_rank,
    tile_off1, tile_off2, tile_off3,
    T, L,
    stride_ot, stride_sg, stride_st, stride_scales, scale,
    NUM_SLICES: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Column tiles of slice i are [tile_off_i, tile_off_{i+1}); absent slices start at _NO_TILE.
    sl = (pid_n >= tile_off1).to(tl.int32) + (pid_n >= tile_off2).to(tl.int32) \
        + (pid_n >= tile_off3).to(tl.int32)
    if sl == 0:
        _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr,
                           b0_ptr, b0_stride_l, b0_stride_n, b0_n, b0_start, b0_group, b0_rank, pid_n,
                           T, L, stride_ot, stride_sg, stride_st, stride_scales, scale, pid_m,
                           HAS_IDS, HAS_SCALES, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    if NUM_SLICES > 1:
        if sl == 1:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr,
                               b1_ptr, b1_stride_l, b1_stride_n, b1_n, b1_start, b1_group, b1_rank,
                               pid_n - tile_off1,
                               T, L, stride_ot, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    if NUM_SLICES > 2:
        if sl == 2:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr,
                               b2_ptr, b2_stride_l, b2_stride_n, b2_n, b2_start, b2_group, b2_rank,
                               pid_n - tile_off2,
                               T, L, stride_ot, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    if NUM_SLICES > 3:
        if sl == 3:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr,
                               b3_ptr, b3_stride_l, b3_stride_n, b3_n, b3_start, b3_group, b3_rank,
                               pid_n - tile_off3,
                               T, L, stride_ot, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _adapter_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.dim() == 3 else 0


def qkvz_lora_triton_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> None:
    """Adds the multi-slice LoRA of ``x`` into ``out`` in place (two Triton launches).

    ``block_m`` / ``block_n`` / ``block_k`` override the default tile sizes (powers of two >= 16).
    """
    adapters = check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    T, H = x.shape
    if T == 0:
        return

    # Only the groups some slice uses are shrunk; each exactly once.
    used_groups = sorted(set(int(g) for g in slice_a))
    compact = {g: i for i, g in enumerate(used_groups)}
    groups = [lora_a[g] for g in used_groups]
    ranks = [a.shape[-2] for a in groups]

    BLOCK_M = block_m or _block(T, 16, 64)
    BLOCK_K = block_k or _block(H, 16, 64)
    BLOCK_N = block_n or _block(max(b.shape[-2] for b in lora_b), 16, 64)
    BLOCK_R = _block(max(ranks), 16, 128)
    for blk in (BLOCK_M, BLOCK_N, BLOCK_K):
        torch._check(blk >= 16 and blk & (blk - 1) == 0, lambda: f"qkvz_lora_: block {blk} is not a power of 2 >= 16")
    dot_precision = "ieee" if lora_a[0].dtype == torch.float32 else "tf32"  # ignored for 16-bit dots

    # Per-token scale = scale * lora_scales[l]; a one-element CPU tensor is read on the host
    # (no device sync), anything else is read by the kernel.
    has_scales = False
    scales_arg, stride_scales = x, 0
    if lora_scales is not None:
        if lora_scales.numel() == 1 and lora_scales.device.type == "cpu":
            scale = float(torch.tensor(scale, dtype=torch.float32) * lora_scales.reshape(()).float())
        else:
            scales_arg = lora_scales.reshape(-1)
            if scales_arg.device != x.device:
                scales_arg = scales_arg.to(x.device)  # [L] on the host: an H2D copy, not graph-capturable
            stride_scales = 0 if scales_arg.numel() == 1 else scales_arg.stride(0)
            has_scales = True

    has_ids = token_lora_ids is not None
    ids_arg = token_lora_ids if has_ids else x

    s_buf = torch.empty((len(groups), T, BLOCK_R), dtype=torch.float32, device=x.device)

    a_args = []
    for i in range(4):
        a = groups[min(i, len(groups) - 1)]
        a_args += [a, _adapter_stride(a), a.stride(-2), a.shape[-2]]

    b_args, tile_offs, n_tiles = [], [], 0
    for i in range(4):
        j = min(i, len(lora_b) - 1)
        b = lora_b[j]
        b_args += [b, _adapter_stride(b), b.stride(-2), b.shape[-2], int(slice_start[j]),
                   compact[int(slice_a[j])], b.shape[-1]]
        if i < len(lora_b):
            tile_offs.append(n_tiles)
            n_tiles += triton.cdiv(b.shape[-2], BLOCK_N)
        else:
            tile_offs.append(_NO_TILE)
    if n_tiles == 0:
        return

    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        grid_m = triton.cdiv(T, BLOCK_M)
        _qkvz_lora_shrink_kernel[(grid_m, len(groups))](
            x, ids_arg, s_buf, *a_args,
            T, H, adapters,
            x.stride(0), s_buf.stride(0), s_buf.stride(1),
            NUM_GROUPS=len(groups), HAS_IDS=has_ids, DOT_PRECISION=dot_precision,
            BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        )
        _qkvz_lora_expand_kernel[(grid_m, n_tiles)](
            out, s_buf, ids_arg, scales_arg, *b_args,
            tile_offs[1], tile_offs[2], tile_offs[3],
            T, adapters,
            out.stride(0), s_buf.stride(0), s_buf.stride(1), stride_scales, float(scale),
            NUM_SLICES=len(lora_b), HAS_IDS=has_ids, HAS_SCALES=has_scales, DOT_PRECISION=dot_precision,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        )
