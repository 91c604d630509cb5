"""Triton kernels of ``fx_passes::qkvz_lora_`` (semantics: :mod:`fx_passes.ops.qkvz_lora`).

Launch structure (no host sync, CUDA-graph capturable), one of two forms:

Two launches (the default):

1. ``_qkvz_lora_shrink_kernel`` -- grid ``(cdiv(T, SHRINK_BM), G * L_GRID, KSPLIT)`` over token tiles x
   (the *used* A groups x the adapters, L_GRID = L with token ids, else 1) x split-K chunks of H. A
   program computes the partial shrink ``x[rows of adapter l, k-chunk] @ A_g[l, :, k-chunk].T`` with fp32
   accumulation (nothing when adapter l is absent from its tile) and writes those rows of a buffer
   ``[KSPLIT, G, T, BLOCK_R]`` (fp32 partials; with KSPLIT = 1 already rounded to B's 16-bit dtype) (padded rank columns hold 0; rows without a valid adapter are
   never written nor used). A shared group (q, k, v) is shrunk ONCE. Split-K and the small shrink
   token tile keep enough programs in flight at small T (at T = 1 the first version had 2 programs,
   each walking all of H: the main cost at decode).
2. ``_qkvz_lora_expand_kernel`` -- grid ``(cdiv(T, BLOCK_M), sum_i cdiv(n_i, BLOCK_N))`` over token
   tiles x the output-column tiles of all slices; each column tile belongs to exactly one slice,
   whose B pointer is picked by branching on the slice index. It sums the KSPLIT partial shrinks,
   rounds the tile to B's dtype, does one ``tl.dot`` over the rank per adapter present (straight-line
   code without token ids), scales per token and adds into ``out`` (fp32 sum, rounded once). Rows
   with no adapter (-1, or an id >= L) are never written.

One launch (``fuse=True``): the expand kernel alone, each program recomputing the shrink of its token
tile for its slice's group over all of H (no shrink buffer). Measured slower than two launches on
every benchmarked shape (benchmarks/RESULTS.md), so it is opt-in.

``pdl=True`` launches both kernels with programmatic dependent launch: the shrink (which needs only
``x``) and the expand's B loads may overlap the kernels before them; each kernel waits in-kernel
(``griddepcontrol.wait``) before touching what its predecessor writes, and the shrink waits before it
exits so that its completion implies the GEMM's.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fx_passes.ops.lora_args import check_qkvz_lora_args

_NO_TILE = 2**30  # tile offset of an absent slice: no program id reaches it


# --------------------------------------------------------------------------------------------
# Shrink: s[g] = x @ A_g[l].T
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_adapters(ids_ptr, offs_m, T, L, HAS_IDS: tl.constexpr):
    """Adapter id of each row of the tile; -1 (no adapter) for rows >= T and for every id outside
    0..L-1, compared at the ids' own width (int64 ids are never truncated: 2**32 is not adapter 0)."""
    m_mask = offs_m < T
    if HAS_IDS:
        raw = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
        ids = tl.where((raw >= 0) & (raw < L), raw, -1).to(tl.int32)
    else:
        ids = tl.where(m_mask, 0, -1)
    return ids


# Mixed-adapter tiles: the B tiles of up to ADAPTER_BATCH adapters are loaded together before their
# dots, so a tile holding 4 adapters waits for one memory latency, not 4 in a row (the loop before
# loaded, multiplied and accumulated one adapter at a time).
# A tl.constexpr object: the compiler rejects a global annotated `: tl.constexpr` (the interpreter accepts it).
ADAPTER_BATCH = tl.constexpr(4)


@triton.jit
def _valid_adapter(l, L):
    """``l < L`` as a tensor (``l`` may be a Python int: the interpreter needs a tensor mask)."""
    return (tl.zeros((), tl.int32) + l) < L


@triton.jit
def _present(ids, l, L):
    """Whether some row of the tile uses adapter ``l`` (a valid one: ``l < L``)."""
    return (tl.max((ids == l).to(tl.int32), axis=0) > 0) & _valid_adapter(l, L)


@triton.jit
def _adapter_tile(ptr, l, L, stride_l, tile, mask, ids):
    """Adapter ``l``'s tile of B (``ptr + l * stride_l + tile``); zeros, with no memory traffic, when
    no row of the tile uses ``l``."""
    # tl.where, not `mask & present`: the Triton interpreter turns a 2-D & 0-d bool into int32
    return tl.load(ptr + tl.cast(l, tl.int64) * stride_l + tile, mask=tl.where(_present(ids, l, L), mask, False),
                   other=0.0)


@triton.jit
def _adapter_tiles(ptr, l0, L, stride_l, tile, mask, ids):
    """The tiles of adapters ``l0 .. l0 + 3`` (ADAPTER_BATCH), loads issued together."""
    return (_adapter_tile(ptr, l0, L, stride_l, tile, mask, ids),
            _adapter_tile(ptr, l0 + 1, L, stride_l, tile, mask, ids),
            _adapter_tile(ptr, l0 + 2, L, stride_l, tile, mask, ids),
            _adapter_tile(ptr, l0 + 3, L, stride_l, tile, mask, ids))


@triton.jit
def _adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES: tl.constexpr):
    """``scale * lora_scales[l]`` (fp32)."""
    if HAS_SCALES:
        return tl.load(scales_ptr + l * stride_scales, mask=_valid_adapter(l, L), other=0.0).to(tl.float32) * scale
    else:
        return scale


@triton.jit
def _expand_adapter(delta, s, bt, ids, l, L, scales_ptr, stride_scales, scale,
                    HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``delta`` with the rows of adapter ``l`` set to ``scale_l * (s @ bt)`` ([BLOCK_M, BLOCK_N])."""
    if _present(ids, l, L):
        d = tl.dot(s, bt, input_precision=DOT_PRECISION)
        delta = tl.where((ids == l)[:, None], d * _adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                         delta)
    return delta


@triton.jit
def _shrink_acc(
    x_ptr, in_l, rows64, a_base, stride_ar, rank, k_lo, k_hi, stride_xt,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``x[rows in_l, k_lo:k_hi] @ A[:, k_lo:k_hi].T`` for one adapter's A (``a_base``), fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_hi
        xt = tl.load(x_ptr + rows64[:, None] * stride_xt + k[None, :],
                     mask=in_l[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None],  # [BLOCK_K, BLOCK_R] = A^T
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        # the shrink runs in the adapters' dtype (x may be bf16 over fp32 adapters)
        acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _shrink_tile(
    x_ptr, ids, rows64,
    a_ptr, stride_al, stride_ar, rank,
    k_lo, k_hi, L, stride_xt,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``x[tile, k_lo:k_hi] @ A[l_row, :, k_lo:k_hi].T`` per row (its own adapter), fp32; 0 for rows
    without a valid adapter. Used by the one-launch (fused) form."""
    result = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for l in range(0, L):
        in_l = ids == l
        if tl.max(in_l.to(tl.int32), axis=0) > 0:  # skip adapters absent from this tile
            acc = _shrink_acc(x_ptr, in_l, rows64, a_ptr + tl.cast(l, tl.int64) * stride_al, stride_ar, rank,
                              k_lo, k_hi, stride_xt, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
            result = tl.where(in_l[:, None], acc, result)
    return result


@triton.jit
def _shrink_group(
    x_ptr, ids_ptr, s_ptr,
    a_ptr, stride_al, stride_ar, rank, g, l, L,
    T, H, k_per_split,
    stride_xt, stride_sk, stride_sg, stride_st,
    pid_m, pid_k,
    HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: the rows of adapter ``l`` in token tile ``pid_m``, group ``g``, K chunk ``pid_k``.

    Only those rows of the partial-shrink buffer are written; rows of other adapters belong to other
    programs and rows without a valid adapter are never written (the expand never stores them).
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = offs_m.to(tl.int64)
    ids = _token_adapters(ids_ptr, offs_m, T, L, HAS_IDS)
    in_l = ids == l
    if tl.max(in_l.to(tl.int32), axis=0) > 0:  # adapter absent from this tile: nothing to do
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, H)
        acc = _shrink_acc(x_ptr, in_l, rows64, a_ptr + tl.cast(l, tl.int64) * stride_al, stride_ar, rank,
                          k_lo, k_hi, stride_xt, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
        s_ptrs = s_ptr + pid_k.to(tl.int64) * stride_sk + g * stride_sg + rows64[:, None] * stride_st \
            + offs_r[None, :]
        tl.store(s_ptrs, acc, mask=in_l[:, None])


@triton.jit
def _qkvz_lora_shrink_kernel(
    x_ptr, ids_ptr, s_ptr,
    a0_ptr, a0_stride_l, a0_stride_r, a0_rank,
    a1_ptr, a1_stride_l, a1_stride_r, a1_rank,
    a2_ptr, a2_stride_l, a2_stride_r, a2_rank,
    a3_ptr, a3_stride_l, a3_stride_r, a3_rank,
    T, H, L_GRID, k_per_split,
    stride_xt, stride_sk, stride_sg, stride_st,
    NUM_GROUPS: tl.constexpr, HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (token tiles, groups x adapters, K chunks)
    pid_m = tl.program_id(0)
    pid_gl = tl.program_id(1)
    pid_k = tl.program_id(2)
    g = pid_gl // L_GRID
    l = pid_gl % L_GRID
    if USE_PDL:
        gdc_launch_dependents()  # let the expand get scheduled (it waits for us before reading s)
    # The A tensors are separate pointers: branch on the group, one helper call per branch.
    if g == 0:
        _shrink_group(x_ptr, ids_ptr, s_ptr, a0_ptr, a0_stride_l, a0_stride_r, a0_rank, 0, l, L_GRID,
                      T, H, k_per_split, stride_xt, stride_sk, stride_sg, stride_st, pid_m, pid_k,
                      HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 1:
        if g == 1:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a1_ptr, a1_stride_l, a1_stride_r, a1_rank, 1, l, L_GRID,
                          T, H, k_per_split, stride_xt, stride_sk, stride_sg, stride_st, pid_m, pid_k,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 2:
        if g == 2:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a2_ptr, a2_stride_l, a2_stride_r, a2_rank, 2, l, L_GRID,
                          T, H, k_per_split, stride_xt, stride_sk, stride_sg, stride_st, pid_m, pid_k,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if NUM_GROUPS > 3:
        if g == 3:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a3_ptr, a3_stride_l, a3_stride_r, a3_rank, 3, l, L_GRID,
                          T, H, k_per_split, stride_xt, stride_sk, stride_sg, stride_st, pid_m, pid_k,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if USE_PDL:
        # The shrink did not need the GEMM before it, but the expand only waits for THIS grid: make its
        # completion imply the GEMM's (every program reaches this line).
        gdc_wait()


# --------------------------------------------------------------------------------------------
# Expand: out[:, start_i : start_i + n_i] += scale_l * (s[g_i].to(B.dtype) @ B_i[l].T)
# --------------------------------------------------------------------------------------------
@triton.jit
def _expand_slice_tile(
    out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
    b_ptr, stride_bl, stride_bn, n, col_start, g, rank, tile_n,
    a_ptr, stride_al, stride_ar,
    T, H, L, KSPLIT,
    stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale,
    pid_m,
    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    USE_PDL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n
    r_mask = offs_r < rank
    rows64 = offs_m.to(tl.int64)
    ids = _token_adapters(ids_ptr, offs_m, T, L, HAS_IDS)
    b_tile = offs_n[None, :] * stride_bn + offs_r[:, None]  # [BLOCK_R, BLOCK_N] = B^T
    b_mask = n_mask[None, :] & r_mask[:, None]

    # Work that needs nothing from the kernels before this one (so, with PDL, overlaps them).
    if FUSE_SHRINK:  # one launch: recompute this tile's shrink over all of H
        s = _shrink_tile(x_ptr, ids, rows64, a_ptr, stride_al, stride_ar, rank, 0, H, L, stride_xt,
                         DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
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
    if not FUSE_SHRINK:  # sum the split-K partials written by the shrink kernel
        s_ptrs = s_ptr + g * stride_sg + rows64[:, None] * stride_st + offs_r[None, :]
        s_mask = row_ok[:, None] & r_mask[None, :]  # rows without a valid adapter were never written
        s = tl.load(s_ptrs, mask=s_mask, other=0.0)
        for ks in range(1, KSPLIT):
            s += tl.load(s_ptrs + ks * stride_sk, mask=s_mask, other=0.0)
    s = s.to(b_ptr.dtype.element_ty)  # PEFT/vLLM round the shrink to B's dtype

    if HAS_IDS:
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for l0 in range(0, L, ADAPTER_BATCH):
            bt_0, bt_1, bt_2, bt_3 = _adapter_tiles(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
            delta = _expand_adapter(delta, s, bt_0, ids, l0, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_1, ids, l0 + 1, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_2, ids, l0 + 2, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
            delta = _expand_adapter(delta, s, bt_3, ids, l0 + 3, L, scales_ptr, stride_scales, scale,
                                    HAS_SCALES, DOT_PRECISION)
    else:
        if HAS_SCALES:
            scale_0 = tl.load(scales_ptr).to(tl.float32) * scale
        else:
            scale_0 = scale
        delta = tl.dot(s, bt0, input_precision=DOT_PRECISION) * scale_0

    if ACCUMULATE:
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, delta.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _qkvz_lora_expand_kernel(
    out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
    b0_ptr, b0_stride_l, b0_stride_n, b0_n, b0_start, b0_group, b0_rank, a0_ptr, a0_stride_l, a0_stride_r,
    b1_ptr, b1_stride_l, b1_stride_n, b1_n, b1_start, b1_group, b1_rank, a1_ptr, a1_stride_l, a1_stride_r,
    b2_ptr, b2_stride_l, b2_stride_n, b2_n, b2_start, b2_group, b2_rank, a2_ptr, a2_stride_l, a2_stride_r,
    b3_ptr, b3_stride_l, b3_stride_n, b3_n, b3_start, b3_group, b3_rank, a3_ptr, a3_stride_l, a3_stride_r,
    tile_off1, tile_off2, tile_off3,
    T, H, L, KSPLIT,
    stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale,
    NUM_SLICES: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSE_SHRINK: tl.constexpr, USE_PDL: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Column tiles of slice i are [tile_off_i, tile_off_{i+1}); absent slices start at _NO_TILE.
    sl = (pid_n >= tile_off1).to(tl.int32) + (pid_n >= tile_off2).to(tl.int32) \
        + (pid_n >= tile_off3).to(tl.int32)
    if sl == 0:
        _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
                           b0_ptr, b0_stride_l, b0_stride_n, b0_n, b0_start, b0_group, b0_rank, pid_n,
                           a0_ptr, a0_stride_l, a0_stride_r, T, H, L, KSPLIT,
                           stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale, pid_m,
                           HAS_IDS, HAS_SCALES, DOT_PRECISION, FUSE_SHRINK, USE_PDL, ACCUMULATE,
                           BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K)
    if NUM_SLICES > 1:
        if sl == 1:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
                               b1_ptr, b1_stride_l, b1_stride_n, b1_n, b1_start, b1_group, b1_rank,
                               pid_n - tile_off1,
                               a1_ptr, a1_stride_l, a1_stride_r, T, H, L, KSPLIT,
                               stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, FUSE_SHRINK, USE_PDL, ACCUMULATE,
                           BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K)
    if NUM_SLICES > 2:
        if sl == 2:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
                               b2_ptr, b2_stride_l, b2_stride_n, b2_n, b2_start, b2_group, b2_rank,
                               pid_n - tile_off2,
                               a2_ptr, a2_stride_l, a2_stride_r, T, H, L, KSPLIT,
                               stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, FUSE_SHRINK, USE_PDL, ACCUMULATE,
                           BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K)
    if NUM_SLICES > 3:
        if sl == 3:
            _expand_slice_tile(out_ptr, s_ptr, ids_ptr, scales_ptr, x_ptr,
                               b3_ptr, b3_stride_l, b3_stride_n, b3_n, b3_start, b3_group, b3_rank,
                               pid_n - tile_off3,
                               a3_ptr, a3_stride_l, a3_stride_r, T, H, L, KSPLIT,
                               stride_ot, stride_xt, stride_sk, stride_sg, stride_st, stride_scales, scale, pid_m,
                               HAS_IDS, HAS_SCALES, DOT_PRECISION, FUSE_SHRINK, USE_PDL, ACCUMULATE,
                           BLOCK_M, BLOCK_N, BLOCK_R, BLOCK_K)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _adapter_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.dim() == 3 else 0


@functools.lru_cache(maxsize=None)
def _num_sms(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
            .multi_processor_count
    return 132  # CPU (Triton interpreter): plan as for an H100


# Split-K of the shrink is limited so that the partial shrinks every expand program sums stay small:
# KSPLIT * min(T, BLOCK_M) <= this many rows of BLOCK_R fp32 values.
_MAX_PARTIAL_ROWS = 256
_MAX_KSPLIT = 16
_PDL_MAX_T = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def shrink_groups(lora_a: Sequence[torch.Tensor], slice_a: Sequence[int]):
    """The A groups some slice uses, each shrunk exactly once: (groups, {index in lora_a: index in groups})."""
    used = sorted(set(int(g) for g in slice_a))
    return [lora_a[g] for g in used], {g: i for i, g in enumerate(used)}


def alloc_shrink_buffer(T: int, n_groups: int, cfg: dict, b_dtype: torch.dtype, device) -> torch.Tensor:
    """``[KSPLIT, G, T, BLOCK_R]``. With one K chunk the shrink stores s already rounded to B's 16-bit
    dtype (what the expand does anyway), halving the re-reads of s; split-K partials stay fp32."""
    s_dtype = b_dtype if cfg["KSPLIT"] == 1 and b_dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.empty((cfg["KSPLIT"], n_groups, T, cfg["BLOCK_R"]), dtype=s_dtype, device=device)


def launch_shrink(x: torch.Tensor, ids_arg: torch.Tensor, s_buf: torch.Tensor, groups: Sequence[torch.Tensor],
                  cfg: dict, *, has_ids: bool, dot_precision: str, use_pdl: bool, **launch_opts) -> None:
    """``_qkvz_lora_shrink_kernel`` over the (token tile, group x adapter, K chunk) grid of ``cfg``."""
    a_args = []
    for i in range(4):
        a = groups[min(i, len(groups) - 1)]
        a_args += [a, _adapter_stride(a), a.stride(-2), a.shape[-2]]
    T, H = x.shape
    l_grid = cfg["L_GRID"]
    _qkvz_lora_shrink_kernel[(triton.cdiv(T, cfg["SHRINK_BM"]), len(groups) * l_grid, cfg["KSPLIT"])](
        x, ids_arg, s_buf, *a_args, T, H, l_grid, cfg["K_PER_SPLIT"],
        x.stride(0), s_buf.stride(0), s_buf.stride(1), s_buf.stride(2),
        NUM_GROUPS=len(groups), HAS_IDS=has_ids, DOT_PRECISION=dot_precision, USE_PDL=use_pdl,
        BLOCK_M=cfg["SHRINK_BM"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], **launch_opts,
    )


def check_adapter_tiles(adapter_tiles: int, where: str) -> int:
    """A fused kernel's ``adapter_tiles``: how many adapters' B tiles a mixed-adapter epilogue loads together."""
    if adapter_tiles not in (1, 2, 4):
        raise ValueError(f"{where}: adapter_tiles must be 1, 2 or 4, got {adapter_tiles}")
    return adapter_tiles


def scale_args(lora_scales: Optional[torch.Tensor], scale: float, x: torch.Tensor):
    """Kernel arguments of the per-token scale ``scale * lora_scales[l]``: (scale, scales tensor,
    its stride, HAS_SCALES). A one-element CPU tensor is read on the host (no device sync) and folded
    into ``scale``; anything else is read by the kernel (``x`` stands in when there is none)."""
    if lora_scales is None:
        return scale, x, 0, False
    if lora_scales.numel() == 1 and lora_scales.device.type == "cpu":
        return float(torch.tensor(scale, dtype=torch.float32) * lora_scales.reshape(()).float()), x, 0, False
    scales = lora_scales.reshape(-1)
    if scales.device != x.device:
        scales = scales.to(x.device)  # [L] on the host: an H2D copy, not graph-capturable
    return scale, scales, 0 if scales.numel() == 1 else scales.stride(0), True


def plan(T: int, H: int, n_groups: int, max_rank: int, max_n: int, device: torch.device, *,
         adapters: int = 1, has_ids: bool = False,
         block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
         shrink_block_m: Optional[int] = None, ksplit: Optional[int] = None, fuse: Optional[bool] = None,
         pdl: Optional[bool] = None) -> dict:
    """Launch configuration: block sizes, split-K factor, one or two launches, PDL.

    Host-only arithmetic on shapes (no device work). Explicit arguments win over the defaults.
    """
    BLOCK_R = _block(max_rank, 16, 128)
    BLOCK_M = block_m or _block(T, 16, 64)                        # expand token tile
    BLOCK_N = block_n or _block(max_n, 16, 128 if T >= 64 else 64)
    BLOCK_K = block_k or _block(H, 16, 128 if BLOCK_R <= 64 else 64)
    SHRINK_BM = shrink_block_m or block_m or (16 if T <= 64 else 64)
    fuse = bool(fuse) if fuse is not None else False  # measured slower than split-K everywhere (RESULTS.md)
    if pdl is None:  # measured: helps up to T = 256, costs a few % at T >= 1024 (RESULTS.md)
        pdl = T <= _PDL_MAX_T
    pdl = bool(pdl) and device.type == "cuda" and not _interpreting()
    l_grid = adapters if has_ids else 1
    k_chunks = triton.cdiv(H, BLOCK_K)
    if fuse:
        ksplit = 1
    elif ksplit is None:
        # programs that have work: token tiles x groups x adapters present (at most one per token)
        programs = triton.cdiv(T, SHRINK_BM) * n_groups * min(l_grid, T)
        sms = _num_sms(device.type, device.index)
        ksplit = 1
        if 2 * programs <= sms:  # under half the SMs busy: split H
            cap = max(1, _MAX_PARTIAL_ROWS // min(T, BLOCK_M))
            # at least 2 K chunks per split: more splits cost more partial-sum loads in the expand
            ksplit = max(1, min(triton.cdiv(sms, programs), cap, _MAX_KSPLIT, k_chunks // 2))
    ksplit = max(1, min(int(ksplit), k_chunks))
    k_per_split = triton.cdiv(k_chunks, ksplit) * BLOCK_K
    ksplit = triton.cdiv(H, k_per_split)  # no empty splits
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, SHRINK_BM=SHRINK_BM,
                L_GRID=l_grid, KSPLIT=ksplit, K_PER_SPLIT=k_per_split, FUSE=bool(fuse), PDL=pdl)


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
    shrink_block_m: Optional[int] = None,
    ksplit: Optional[int] = None,
    fuse: Optional[bool] = None,
    pdl: Optional[bool] = None,
    num_warps: Optional[int] = None,
    accumulate: bool = True,
) -> None:
    """Adds the multi-slice LoRA of ``x`` into ``out`` in place (one or two Triton launches).

    ``accumulate=False`` (two launches only) *writes* the LoRA delta instead: every row of the slices'
    columns is stored (0 for rows without an adapter) and ``out`` is never read, for a caller that lets
    the base GEMM accumulate into it afterwards. The shrink is then a plain launch (it may be the first
    kernel after ``x``'s producer, so it must not start early under PDL).

    Tuning knobs (all optional; defaults come from :func:`plan`): ``block_m`` / ``block_n`` /
    ``block_k`` tile sizes (powers of two >= 16; ``block_m`` also sets the shrink's token tile unless
    ``shrink_block_m`` does), ``ksplit`` split-K factor of the shrink, ``fuse`` one launch (shrink
    recomputed per column tile) instead of two, ``pdl`` programmatic dependent launch (Hopper+; each
    kernel waits on its predecessor in-kernel, so the shrink and the expand's B loads can overlap the
    kernels before them), ``num_warps`` of both kernels.
    """
    adapters = check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    T, H = x.shape
    if T == 0:
        return

    groups, compact = shrink_groups(lora_a, slice_a)
    ranks = [a.shape[-2] for a in groups]

    has_ids = token_lora_ids is not None
    cfg = plan(T, H, len(groups), max(ranks), max(b.shape[-2] for b in lora_b), x.device,
               adapters=adapters, has_ids=has_ids, block_m=block_m, block_n=block_n, block_k=block_k,
               shrink_block_m=shrink_block_m, ksplit=ksplit, fuse=fuse, pdl=pdl)
    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_R"]
    KSPLIT, FUSE, PDL, SHRINK_BM = cfg["KSPLIT"], cfg["FUSE"], cfg["PDL"], cfg["SHRINK_BM"]
    torch._check(accumulate or not FUSE, lambda: "qkvz_lora_: accumulate=False needs the two-launch form")
    for blk in (BLOCK_M, BLOCK_N, BLOCK_K, SHRINK_BM):
        torch._check(blk >= 16 and blk & (blk - 1) == 0, lambda: f"qkvz_lora_: block {blk} is not a power of 2 >= 16")
    dot_precision = "ieee" if lora_a[0].dtype == torch.float32 else "tf32"  # ignored for 16-bit dots
    launch_opts = {} if num_warps is None else {"num_warps": int(num_warps)}
    if PDL:
        launch_opts["launch_pdl"] = True

    scale, scales_arg, stride_scales, has_scales = scale_args(lora_scales, scale, x)
    ids_arg = token_lora_ids if has_ids else x

    if FUSE:
        s_buf, s_strides = x, (0, 0, 0)  # no shrink buffer; s_ptr is never read
    else:
        s_buf = alloc_shrink_buffer(T, len(groups), cfg, lora_b[0].dtype, x.device)
        s_strides = (s_buf.stride(0), s_buf.stride(1), s_buf.stride(2))

    b_args, tile_offs, n_tiles = [], [], 0
    for i in range(4):
        j = min(i, len(lora_b) - 1)
        b = lora_b[j]
        a = lora_a[int(slice_a[j])]
        b_args += [b, _adapter_stride(b), b.stride(-2), b.shape[-2], int(slice_start[j]),
                   compact[int(slice_a[j])], b.shape[-1], a, _adapter_stride(a), a.stride(-2)]
        if i < len(lora_b):
            tile_offs.append(n_tiles)
            n_tiles += triton.cdiv(b.shape[-2], BLOCK_N)
        else:
            tile_offs.append(_NO_TILE)
    if n_tiles == 0:
        return

    shrink_opts = dict(launch_opts)
    if not accumulate:
        shrink_opts.pop("launch_pdl", None)
    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        if not FUSE:
            launch_shrink(x, ids_arg, s_buf, groups, cfg, has_ids=has_ids, dot_precision=dot_precision,
                          use_pdl=PDL, **shrink_opts)
        _qkvz_lora_expand_kernel[(triton.cdiv(T, BLOCK_M), n_tiles)](
            out, s_buf, ids_arg, scales_arg, x, *b_args,
            tile_offs[1], tile_offs[2], tile_offs[3],
            T, H, adapters, KSPLIT,
            out.stride(0), x.stride(0), *s_strides, stride_scales, float(scale),
            NUM_SLICES=len(lora_b), HAS_IDS=has_ids, HAS_SCALES=has_scales, DOT_PRECISION=dot_precision,
            FUSE_SHRINK=FUSE, USE_PDL=PDL, ACCUMULATE=bool(accumulate),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, **launch_opts,
        )
