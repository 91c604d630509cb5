"""Small-T qkvz GEMM with the LoRA expand in its epilogue (Triton), the decode path of
``fx_passes::qkvz_gemm_lora`` (semantics: :mod:`fx_passes.ops.qkvz_gemm_lora`).

Why: at decode the base GEMM streams W (50-168 MB, 12-40 us on an H200) and a LoRA op after it costs
two more dependent launches (shrink, expand: +4.6 to +10.9 us measured, benchmarks/RESULTS.md), which
the 1.15x target cannot absorb on Qwen3.5-35B-A3B (base 14.9 us). Here the LoRA costs one tiny launch
that runs *concurrently* with the GEMM:

1. ``_qkvz_lora_shrink_kernel`` (from :mod:`fx_passes.ops.qkvz_lora_kernels`, split-K over H) starts
   after ``x``'s producer like any kernel and immediately allows its dependent to launch
   (``griddepcontrol.launch_dependents``).
2. ``_qkvz_gemm_lora_kernel``, launched with programmatic dependent launch, streams W for its column
   tile (``acc^T = W_tile @ x^T``, swap-AB so the wide W tile is the MMA's M side and a handful of
   tokens its N side), then waits for the shrink (``griddepcontrol.wait``) and adds
   ``B_tile @ s^T * scale`` to the fp32 accumulator before the one store. W is read once, ``out`` is
   written once, nothing is read back.

Output columns are cut into *segments*: runs of columns that come from one weight (``w_qkv`` rows or
``w_z`` rows) and have at most one LoRA slice; the grid walks the column tiles of all segments
(each tile inside one segment), so the two weights need no packing.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from fx_passes.ops.qkvz_lora_kernels import (
    ADAPTER_BATCH, _adapter_scale, _adapter_stride, _adapter_tile, _adapter_tiles, _present, _token_adapters,
    alloc_shrink_buffer, check_adapter_tiles, launch_shrink, plan, scale_args, shrink_groups,
)

MAX_SEGMENTS = 4
_NO_TILE = 2**30


@triton.jit
def _epilogue_adapter(acc, b, st, ids, l, L, scales_ptr, stride_scales, scale,
                      HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc`` plus ``scale_l * (b @ st)`` in the token columns of adapter ``l`` ([BLOCK_N, BLOCK_T])."""
    if _present(ids, l, L):
        d = tl.dot(b, st, input_precision=DOT_PRECISION)
        acc += tl.where((ids == l)[None, :], d * _adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                        0.0)
    return acc


@triton.jit
def _epilogue_adapters(acc, b_0, b_1, b_2, b_3, st, ids, l0, L, scales_ptr, stride_scales, scale,
                       HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """:func:`_epilogue_adapter` for adapters ``l0 .. l0 + 3`` (tiles from ``_adapter_tiles``)."""
    acc = _epilogue_adapter(acc, b_0, st, ids, l0, L, scales_ptr, stride_scales, scale, HAS_SCALES, DOT_PRECISION)
    acc = _epilogue_adapter(acc, b_1, st, ids, l0 + 1, L, scales_ptr, stride_scales, scale, HAS_SCALES, DOT_PRECISION)
    acc = _epilogue_adapter(acc, b_2, st, ids, l0 + 2, L, scales_ptr, stride_scales, scale, HAS_SCALES, DOT_PRECISION)
    acc = _epilogue_adapter(acc, b_3, st, ids, l0 + 3, L, scales_ptr, stride_scales, scale, HAS_SCALES, DOT_PRECISION)
    return acc


@triton.jit
def _segment_tile(
    x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
    w_ptr, stride_wn, b_ptr, stride_bl, stride_bn, n, col_start, g, rank,
    tile_n, pid_t,
    T, K, L, KSPLIT,
    stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
    SEG_LORA: tl.constexpr, HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, USE_PDL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ADAPTER_TILES: tl.constexpr,
):
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n
    t_mask = offs_t < T
    t64 = offs_t.to(tl.int64)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]     # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + t64[None, :] * stride_xt + offs_k[:, None]                      # [BLOCK_K, BLOCK_T]
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    b_tile = offs_n[:, None] * stride_bn + offs_r[None, :]                              # [BLOCK_N, BLOCK_R]
    b_mask = n_mask[:, None] & r_mask[None, :]
    if SEG_LORA:
        if HAS_IDS:
            ids = _token_adapters(ids_ptr, offs_t, T, L, HAS_IDS)
        else:
            # B does not depend on the shrink: load it before the main loop, so its DRAM latency
            # hides under the W stream instead of adding to the epilogue (one adapter only: with
            # token ids it would take a tile per adapter present, held in registers through the loop)
            b0 = tl.load(b_ptr + b_tile, mask=b_mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_mask[:, None] & t_mask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    # Mixed adapters, ADAPTER_TILES = 4 (default with BLOCK_T <= 16): the B tiles of the first
    # ADAPTER_BATCH adapters present are issued together, before waiting for the shrink (they do not
    # depend on it); measured on an H200 (r 16, 4 adapters): T = 16 1.32x -> 1.24x base on 35B-A3B. With
    # 64-token tiles the 4 tiles held next to the [BLOCK_N, 64] accumulator cost more than the latency
    # they hide (397B-A17B T = 64: 1.14x -> 1.24x): there 1 or 2 adapters at a time (ADAPTER_TILES).
    if SEG_LORA:
        if HAS_IDS and ADAPTER_TILES == 4:
            b_0, b_1, b_2, b_3 = _adapter_tiles(b_ptr, 0, L, stride_bl, b_tile, b_mask, ids)
    if USE_PDL:
        # Every program waits (also those without LoRA), so this grid's completion implies the
        # shrink's: the s buffer is freed to the caching allocator right after the launch.
        gdc_wait()
    if SEG_LORA:
        if not HAS_IDS:
            ids = _token_adapters(ids_ptr, offs_t, T, L, HAS_IDS)   # rows < T: adapter 0
        row_ok = (ids >= 0) & (ids < L)
        s_ptrs = s_ptr + g * stride_sg + t64[None, :] * stride_st + offs_r[:, None]   # [BLOCK_R, BLOCK_T] = s^T
        s_mask = r_mask[:, None] & row_ok[None, :]   # rows without a valid adapter were never written
        st = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        for ks in range(1, KSPLIT):
            st += tl.load(s_ptrs + ks * stride_sk, mask=s_mask, other=0.0).to(tl.float32)
        st = st.to(b_ptr.dtype.element_ty)   # PEFT/vLLM round the shrink to B's dtype
        if HAS_IDS:
            if ADAPTER_TILES == 4:
                acc = _epilogue_adapters(acc, b_0, b_1, b_2, b_3, st, ids, 0, L, scales_ptr, stride_scales, scale,
                                         HAS_SCALES, DOT_PRECISION)
                for l0 in range(ADAPTER_BATCH, L, ADAPTER_BATCH):   # more than 4 adapters
                    b_0, b_1, b_2, b_3 = _adapter_tiles(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                    acc = _epilogue_adapters(acc, b_0, b_1, b_2, b_3, st, ids, l0, L, scales_ptr, stride_scales,
                                             scale, HAS_SCALES, DOT_PRECISION)
            else:   # 1 or 2 adapters at a time (a tile of an absent adapter costs no traffic)
                for l0 in range(0, L, ADAPTER_TILES):
                    b_0 = _adapter_tile(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                    if ADAPTER_TILES == 2:
                        b_1 = _adapter_tile(b_ptr, l0 + 1, L, stride_bl, b_tile, b_mask, ids)
                    acc = _epilogue_adapter(acc, b_0, st, ids, l0, L, scales_ptr, stride_scales, scale,
                                            HAS_SCALES, DOT_PRECISION)
                    if ADAPTER_TILES == 2:
                        acc = _epilogue_adapter(acc, b_1, st, ids, l0 + 1, L, scales_ptr, stride_scales, scale,
                                                HAS_SCALES, DOT_PRECISION)
        else:
            if HAS_SCALES:
                scale_0 = tl.load(scales_ptr).to(tl.float32) * scale
            else:
                scale_0 = scale
            acc += tl.dot(b0, st, input_precision=DOT_PRECISION) * scale_0

    o_ptrs = out_ptr + t64[None, :] * stride_ot + (col_start + offs_n)[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & t_mask[None, :])


@triton.jit
def _qkvz_gemm_lora_kernel(
    x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
    w0_ptr, w0_stride, b0_ptr, b0_stride_l, b0_stride_n, n0, start0, g0, r0,
    w1_ptr, w1_stride, b1_ptr, b1_stride_l, b1_stride_n, n1, start1, g1, r1,
    w2_ptr, w2_stride, b2_ptr, b2_stride_l, b2_stride_n, n2, start2, g2, r2,
    w3_ptr, w3_stride, b3_ptr, b3_stride_l, b3_stride_n, n3, start3, g3, r3,
    tile_off1, tile_off2, tile_off3,
    T, K, L, KSPLIT,
    stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
    NUM_SEGMENTS: tl.constexpr,
    LORA0: tl.constexpr, LORA1: tl.constexpr, LORA2: tl.constexpr, LORA3: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, USE_PDL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ADAPTER_TILES: tl.constexpr,
):
    # grid: (column tiles of all segments, token tiles)
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    seg = (pid_n >= tile_off1).to(tl.int32) + (pid_n >= tile_off2).to(tl.int32) \
        + (pid_n >= tile_off3).to(tl.int32)
    # The weights and B slices are separate pointers: branch on the segment, one call per branch.
    if seg == 0:
        _segment_tile(x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
                      w0_ptr, w0_stride, b0_ptr, b0_stride_l, b0_stride_n, n0, start0, g0, r0, pid_n, pid_t,
                      T, K, L, KSPLIT, stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
                      LORA0, HAS_IDS, HAS_SCALES, USE_PDL, DOT_PRECISION, BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R,
                      ADAPTER_TILES)
    if NUM_SEGMENTS > 1:
        if seg == 1:
            _segment_tile(x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
                          w1_ptr, w1_stride, b1_ptr, b1_stride_l, b1_stride_n, n1, start1, g1, r1,
                          pid_n - tile_off1, pid_t,
                          T, K, L, KSPLIT, stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales,
                          scale, LORA1, HAS_IDS, HAS_SCALES, USE_PDL, DOT_PRECISION,
                          BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R, ADAPTER_TILES)
    if NUM_SEGMENTS > 2:
        if seg == 2:
            _segment_tile(x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
                          w2_ptr, w2_stride, b2_ptr, b2_stride_l, b2_stride_n, n2, start2, g2, r2,
                          pid_n - tile_off2, pid_t,
                          T, K, L, KSPLIT, stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales,
                          scale, LORA2, HAS_IDS, HAS_SCALES, USE_PDL, DOT_PRECISION,
                          BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R, ADAPTER_TILES)
    if NUM_SEGMENTS > 3:
        if seg == 3:
            _segment_tile(x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
                          w3_ptr, w3_stride, b3_ptr, b3_stride_l, b3_stride_n, n3, start3, g3, r3,
                          pid_n - tile_off3, pid_t,
                          T, K, L, KSPLIT, stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales,
                          scale, LORA3, HAS_IDS, HAS_SCALES, USE_PDL, DOT_PRECISION,
                          BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R, ADAPTER_TILES)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Segment:
    """Output columns [start, start + n) computed from ``w`` (rows of one weight) plus, when
    ``lora_slice`` is set, that LoRA slice's ``b`` (rows of its B, same columns)."""
    start: int
    n: int
    w: torch.Tensor
    lora_slice: Optional[int] = None
    b: Optional[torch.Tensor] = None


def plan_segments(w_qkv: torch.Tensor, w_z: torch.Tensor, lora_b: Sequence[torch.Tensor],
                  slice_start: Sequence[int]) -> Optional[list[Segment]]:
    """Cut the output columns at the weight boundary and at every LoRA slice boundary.

    Returns None when that takes more than :data:`MAX_SEGMENTS` segments, or when a weight's last dim
    is not contiguous (the kernel walks K with unit stride); the caller then runs the two-op path, whose
    library GEMM takes any strides. Slices are known not to overlap (checked by ``check_qkvz_lora_args``).
    """
    if w_qkv.stride(1) != 1 or w_z.stride(1) != 1:
        return None
    n_qkv, n = w_qkv.shape[0], w_qkv.shape[0] + w_z.shape[0]
    spans = sorted((int(s), int(s) + b.shape[-2], i) for i, (s, b) in enumerate(zip(slice_start, lora_b)))
    cuts = sorted({0, n_qkv, n} | {c for s, e, _ in spans for c in (s, e)})
    segments = []
    for c0, c1 in zip(cuts, cuts[1:]):
        if c1 <= c0:
            continue
        w = w_qkv[c0:c1] if c1 <= n_qkv else w_z[c0 - n_qkv:c1 - n_qkv]
        owner = next((i for s, e, i in spans if s <= c0 and c1 <= e), None)
        b = None
        if owner is not None:
            s0 = int(slice_start[owner])
            b = lora_b[owner].narrow(-2, c0 - s0, c1 - c0)
        segments.append(Segment(c0, c1 - c0, w, owner, b))
    return segments if len(segments) <= MAX_SEGMENTS else None


# Tuned on an H200 (torch 2.11, triton 3.6) by benchmarks/sweep_fused_decode.py, GEMM + LoRA timed together
# (r 16/64, 1 and 4 adapters): (K, N, BLOCK_T) -> (BLOCK_N, BLOCK_K, num_stages, num_warps) for the three
# Qwen3.5 GDN projection shapes. The best configuration is shape-specific (397B-A17B at T = 64: 128 x 64
# tiles 1.08x base vs 1.20x with 35B-A3B's 64 x 128; 35B-A3B: 1.29x GEMM-alone with 397B's).
_TUNED_BLOCKS = {
    (2048, 12288, 16): (128, 128, 4, 8),    # Qwen3.5-35B-A3B
    (2048, 12288, 64): (64, 128, 3, 4),
    (5120, 16384, 16): (128, 128, 4, 8),    # Qwen3.5-27B
    (5120, 16384, 64): (64, 128, 3, 4),
    (4096, 20480, 16): (64, 128, 3, 4),     # Qwen3.5-397B-A17B
    (4096, 20480, 64): (128, 64, 4, 4),
}
# Shapes not in the table: the configuration that was best or within ~3 % on most measured shapes.
_DEFAULT_BLOCKS = {16: (128, 128, 4, 8), 32: (64, 128, 3, 4), 64: (64, 128, 3, 4)}
# The GEMM's epilogue re-reads the shrink's split-K partials (fp32) once per column tile: at T = 64 with
# KSPLIT = 4 that is 64 KB per program, 12 MB of L2 traffic on 35B-A3B. The shrink overlaps the GEMM
# (PDL), so a slower shrink with fewer partials is free as long as it ends before the GEMM's epilogues.
# With 16-bit adapters the default caps KSPLIT * T at this many rows (H200, T = 64: KSPLIT 1 best on
# 35B-A3B and 397B-A17B, e.g. 35B r64 1.23x vs 1.43x with KSPLIT 4). fp32 adapters (PEFT's default on a
# bf16 base) shrink on the CUDA cores (an exact fp32 dot): there the cap made the shrink outlast the GEMM
# (27B T = 64: 2.9x base with KSPLIT 1, 1.41x with 4-8), so they keep the split-K of ``plan``.
_MAX_PARTIAL_ROWS = 64
# Measured exceptions (H200, bf16 adapters, sweep_fused_decode.py --ksplit 1,2,4,8, session 3), per
# (H, N, T bucket, rank bucket (<= 16 or more), several adapters): the best cap where it beat the
# default by more than the ~2 % noise. Qwen3.5-27B (H = 5120, the longest shrink) at T = 64, r 16:
# 1.37x base with KSPLIT 1, 1.11x with 4; its r 64 wants 1 (1.06x vs 1.19x with 4). Why r 16 and r 64
# differ this much is not understood (same shrink grid and K walk).
_TUNED_KSPLIT = {
    (5120, 16384, 16, 16, False): 2, (5120, 16384, 16, 64, False): 2, (5120, 16384, 16, 16, True): 8,
    (5120, 16384, 64, 16, False): 4, (5120, 16384, 64, 16, True): 2,
    (2048, 12288, 16, 16, False): 2, (2048, 12288, 16, 64, False): 2,
}


def default_blocks(T: int, K: int, N: int) -> dict:
    """Launch shape of the fused kernel (memory-bound at small T: it streams W once)."""
    block_t = max(16, min(64, triton.next_power_of_2(T)))
    tuned_t = 16 if block_t <= 16 else 64   # 17..32 tokens: the 64-token configuration, 32-token tiles
    bn, bk, stages, warps = _TUNED_BLOCKS.get((K, N, tuned_t), _DEFAULT_BLOCKS[block_t])
    return dict(BLOCK_N=bn, BLOCK_T=block_t, BLOCK_K=bk, num_stages=stages, num_warps=warps)


def default_adapter_tiles(block_t: int) -> int:
    """B tiles a mixed-adapter epilogue loads together: 4 before the shrink wait with <= 16-token tiles,
    else 2 at a time. H200, session 5 call H (4 random adapters, 3 rounds): at T = 32 / 64, 2 at a time
    was at or below 1 at a time in 12 / 12 rows, by 0.001-0.05x (e.g. 35B-A3B r16 T 32 1.29x -> 1.24x,
    27B r64 T 64 1.49x -> 1.47x); 4 lost up to 0.1x (397B-A17B T 32 / 64)."""
    return 4 if block_t <= 16 else 2


def shrink_ksplit(T: int, K: int, N: int, rank: int, adapters: int, adapter_dtype: torch.dtype) -> Optional[int]:
    """Cap of the shrink's split-K factor (None: plan's default)."""
    if adapter_dtype == torch.float32:
        return None
    if T >= 8:   # T < 8: a handful of partial rows, the default split is cheap
        tuned = _TUNED_KSPLIT.get((K, N, 16 if T <= 16 else 64, 16 if rank <= 16 else 64, adapters > 1))
        if tuned is not None:
            return tuned
    return max(1, _MAX_PARTIAL_ROWS // max(T, 1))


def qkvz_gemm_lora_triton(
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
    segments: Optional[list[Segment]] = None,
    block_n: Optional[int] = None,
    block_t: Optional[int] = None,
    block_k: Optional[int] = None,
    num_stages: Optional[int] = None,
    num_warps: Optional[int] = None,
    pdl: bool = True,
    with_lora: bool = True,
    shrink_ksplit_max: Optional[int] = None,
    adapter_tiles: Optional[int] = None,
) -> torch.Tensor:
    """``out = x @ [w_qkv; w_z]^T + LoRA`` in two launches (shrink, then the PDL GEMM + expand).

    Arguments are assumed checked (``fx_passes.ops.qkvz_gemm_lora`` does it). ``with_lora=False``
    runs the GEMM alone (the benchmark's measure of the GEMM part). ``adapter_tiles`` (1, 2 or 4): B
    tiles of how many adapters a mixed-adapter epilogue loads together (default
    :func:`default_adapter_tiles`).
    """
    T, K = x.shape
    out = x.new_empty((T, w_qkv.shape[0] + w_z.shape[0]))
    if T == 0:
        return out
    if segments is None:
        segments = plan_segments(w_qkv, w_z, lora_b, slice_start)
        if segments is None:
            raise ValueError("qkvz_gemm_lora_triton: more than 4 column segments")
    cfg = default_blocks(T, K, out.shape[1])
    BLOCK_N = block_n or cfg["BLOCK_N"]
    BLOCK_T = block_t or cfg["BLOCK_T"]
    BLOCK_K = block_k or cfg["BLOCK_K"]
    launch_opts = dict(num_stages=num_stages or cfg["num_stages"], num_warps=num_warps or cfg["num_warps"])
    has_ids = token_lora_ids is not None
    with_lora = with_lora and any(seg.lora_slice is not None for seg in segments)
    adapter_tiles = check_adapter_tiles(adapter_tiles or default_adapter_tiles(BLOCK_T), "qkvz_gemm_lora_triton")

    groups, compact = shrink_groups(lora_a, slice_a)
    ranks = [a.shape[-2] for a in groups]
    shrink_cfg = plan(T, K, len(groups), max(ranks), 64, x.device, adapters=adapters, has_ids=has_ids)
    ksplit_max = shrink_ksplit_max or shrink_ksplit(T, K, out.shape[1], max(ranks), adapters, lora_a[0].dtype)
    if ksplit_max is not None and shrink_cfg["KSPLIT"] > ksplit_max:
        shrink_cfg = plan(T, K, len(groups), max(ranks), 64, x.device, adapters=adapters, has_ids=has_ids,
                          ksplit=ksplit_max)
    BLOCK_R, KSPLIT = shrink_cfg["BLOCK_R"], shrink_cfg["KSPLIT"]
    b_dtype = lora_b[0].dtype
    dot_precision = "ieee" if b_dtype == torch.float32 else "tf32"
    pdl = bool(pdl) and with_lora and x.device.type == "cuda"

    scale, scales_arg, stride_scales, has_scales = scale_args(lora_scales, scale, x)
    ids_arg = token_lora_ids if has_ids else x

    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        if with_lora:
            s_buf = alloc_shrink_buffer(T, len(groups), shrink_cfg, b_dtype, x.device)
            # Not launched as a PDL dependent (x comes from the kernel before it), but it lets the
            # GEMM launch at once (USE_PDL: launch_dependents at entry; its final wait is a no-op).
            launch_shrink(x, ids_arg, s_buf, groups, shrink_cfg, has_ids=has_ids, dot_precision=dot_precision,
                          use_pdl=pdl)
            s_strides = (s_buf.stride(0), s_buf.stride(1), s_buf.stride(2))
        else:
            s_buf, s_strides = x, (0, 0, 0)

        seg_args, tile_offs, lora_flags, n_tiles = [], [], [], 0
        for i in range(4):
            seg = segments[min(i, len(segments) - 1)]
            has_lora = with_lora and seg.lora_slice is not None
            b = seg.b if has_lora else seg.w
            g = compact[int(slice_a[seg.lora_slice])] if has_lora else 0
            rank = b.shape[-1] if has_lora else 0
            seg_args += [seg.w, seg.w.stride(0), b, _adapter_stride(b) if has_lora else 0, b.stride(-2),
                         seg.n, seg.start, g, rank]
            lora_flags.append(has_lora)
            if i < len(segments):
                tile_offs.append(n_tiles)
                n_tiles += triton.cdiv(seg.n, BLOCK_N)
            else:
                tile_offs.append(_NO_TILE)
        if pdl:
            launch_opts["launch_pdl"] = True
        _qkvz_gemm_lora_kernel[(n_tiles, triton.cdiv(T, BLOCK_T))](
            x, out, s_buf, ids_arg, scales_arg, *seg_args,
            tile_offs[1], tile_offs[2], tile_offs[3],
            T, K, adapters, KSPLIT if with_lora else 1,
            x.stride(0), out.stride(0), *s_strides, stride_scales, float(scale),
            NUM_SEGMENTS=len(segments), LORA0=lora_flags[0], LORA1=lora_flags[1], LORA2=lora_flags[2],
            LORA3=lora_flags[3], HAS_IDS=has_ids, HAS_SCALES=has_scales, USE_PDL=pdl,
            DOT_PRECISION=dot_precision, BLOCK_N=BLOCK_N, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
            ADAPTER_TILES=adapter_tiles, **launch_opts,
        )
    return out
