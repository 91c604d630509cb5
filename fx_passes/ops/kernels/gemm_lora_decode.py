"""Small-T qkvz GEMM with the LoRA expand in its epilogue: the decode path of
``fx_passes::qkvz_gemm_lora`` (semantics: :mod:`fx_passes.ops.qkvz_gemm_lora`).

Why: at decode the base GEMM streams W (50-168 MB on the Qwen3.5 shapes) and a LoRA op after it costs
two more dependent launches (shrink, expand), more than a 1.1x budget allows on the smallest shape. Here
the LoRA costs one tiny launch that runs *concurrently* with the GEMM:

1. the shrink (:mod:`.lora_shrink`, split-K over H) starts after ``x``'s producer like any kernel and
   immediately lets its dependent launch (``griddepcontrol.launch_dependents``);
2. ``_gemm_lora_decode_kernel``, launched with programmatic dependent launch, streams W for its column
   tile (``acc^T = W_tile @ x^T``, swap-AB: the wide W tile is the MMA's M side and a handful of tokens
   its N side), then waits for the shrink (``griddepcontrol.wait``) and adds ``B_tile @ s^T * scale`` to
   the fp32 accumulator before the one store. W is read once, ``out`` is written once, nothing is read
   back.

Output columns are cut into *segments*: runs of columns that come from one weight (rows of ``W_qkv``,
``W_z``, ``W_b`` or ``W_a``) and have at most one LoRA slice; the grid walks the column tiles of all
segments (each tile inside one segment), so the weights need no packing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from fx_passes.ops.kernels.jit_helpers import (
    ADAPTER_BATCH, adapter_scale, adapter_stride, adapter_tile, adapter_tiles4, on_device, present,
    scale_args, tile_owner, token_adapters,
)
from fx_passes.ops.kernels.lora_shrink import alloc_shrink_buffer, dot_precision, launch_shrink
from fx_passes.ops.lora_args import LoraSlices
from fx_passes.ops.tuning import DecodeLaunch, decode_launch

MAX_SEGMENTS = 8   # the weights' boundaries and every slice's: q | k | v | z | b | a fits


@triton.jit
def _epilogue_adapter(acc, b, st, ids, l, L, scales_ptr, stride_scales, scale,
                      HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc`` plus ``scale_l * (b @ st)`` in the token columns of adapter ``l`` ([BLOCK_N, BLOCK_T])."""
    if present(ids, l, L):
        d = tl.dot(b, st, input_precision=DOT_PRECISION)
        acc += tl.where((ids == l)[None, :], d * adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES),
                        0.0)
    return acc


@triton.jit
def _epilogue_adapters(acc, b_0, b_1, b_2, b_3, st, ids, l0, L, scales_ptr, stride_scales, scale,
                       HAS_SCALES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """:func:`_epilogue_adapter` for adapters ``l0 .. l0 + 3`` (tiles from ``adapter_tiles4``)."""
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
            ids = token_adapters(ids_ptr, offs_t, T, L, HAS_IDS)
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

    # Mixed adapters, ADAPTER_TILES = 4 (<= 16-token tiles): the B tiles of the first ADAPTER_BATCH
    # adapters present are issued together, before waiting for the shrink (they do not depend on it).
    # With wider token tiles 4 tiles next to the [BLOCK_N, BLOCK_T] accumulator cost more than the
    # latency they hide: there 2 adapters at a time (ADAPTER_TILES = 2).
    if SEG_LORA:
        if HAS_IDS and ADAPTER_TILES == 4:
            b_0, b_1, b_2, b_3 = adapter_tiles4(b_ptr, 0, L, stride_bl, b_tile, b_mask, ids)
    if USE_PDL:
        # Every program waits (also those without LoRA), so this grid's completion implies the
        # shrink's: the s buffer is freed to the caching allocator right after the launch.
        gdc_wait()
    if SEG_LORA:
        if not HAS_IDS:
            ids = token_adapters(ids_ptr, offs_t, T, L, HAS_IDS)   # rows < T: adapter 0
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
                    b_0, b_1, b_2, b_3 = adapter_tiles4(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                    acc = _epilogue_adapters(acc, b_0, b_1, b_2, b_3, st, ids, l0, L, scales_ptr, stride_scales,
                                             scale, HAS_SCALES, DOT_PRECISION)
            else:   # 2 adapters at a time (a tile of an absent adapter costs no traffic)
                for l0 in range(0, L, 2):
                    b_0 = adapter_tile(b_ptr, l0, L, stride_bl, b_tile, b_mask, ids)
                    b_1 = adapter_tile(b_ptr, l0 + 1, L, stride_bl, b_tile, b_mask, ids)
                    acc = _epilogue_adapter(acc, b_0, st, ids, l0, L, scales_ptr, stride_scales, scale,
                                            HAS_SCALES, DOT_PRECISION)
                    acc = _epilogue_adapter(acc, b_1, st, ids, l0 + 1, L, scales_ptr, stride_scales, scale,
                                            HAS_SCALES, DOT_PRECISION)
        else:
            scale_0 = adapter_scale(scales_ptr, 0, L, stride_scales, scale, HAS_SCALES)
            acc += tl.dot(b0, st, input_precision=DOT_PRECISION) * scale_0

    o_ptrs = out_ptr + t64[None, :] * stride_ot + (col_start + offs_n)[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & t_mask[None, :])


@triton.jit
def _gemm_lora_decode_kernel(
    x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
    # tuples, one entry per segment: its weight rows, its B rows (the weight itself where it has no LoRA)
    w_ptrs, w_stride, b_ptrs, b_stride_l, b_stride_n, seg_n, seg_start, seg_group, seg_rank, tile_off,
    T, K, L, KSPLIT,
    stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales, scale,
    NUM_SEGMENTS: tl.constexpr, LORA_MASK: tl.constexpr,   # bit i: segment i carries a LoRA slice
    HAS_IDS: tl.constexpr, HAS_SCALES: tl.constexpr, USE_PDL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ADAPTER_TILES: tl.constexpr,
):
    # grid: (token tiles, column tiles of all segments). Token tiles vary fastest: the programs that
    # read one W tile run together and all but the first find it in L2 (W is read from DRAM once).
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tile_owner(pid_n, tile_off, NUM_SEGMENTS)
    # The weights and B slices are separate pointers: a branch per segment, unrolled at compile time.
    for i in tl.static_range(NUM_SEGMENTS):
        if seg == i:
            _segment_tile(x_ptr, out_ptr, s_ptr, ids_ptr, scales_ptr,
                          w_ptrs[i], w_stride[i], b_ptrs[i], b_stride_l[i], b_stride_n[i], seg_n[i], seg_start[i],
                          seg_group[i], seg_rank[i], pid_n - tile_off[i], pid_t,
                          T, K, L, KSPLIT, stride_xt, stride_ot, stride_sk, stride_sg, stride_st, stride_scales,
                          scale, (LORA_MASK >> i) & 1, HAS_IDS, HAS_SCALES, USE_PDL, DOT_PRECISION,
                          BLOCK_N, BLOCK_T, BLOCK_K, BLOCK_R, ADAPTER_TILES)


@dataclasses.dataclass
class Segment:
    """Output columns [start, start + n) computed from ``w`` (rows of one weight) plus, when
    ``lora_slice`` is set, that LoRA slice's ``b`` (rows of its B, same columns)."""
    start: int
    n: int
    w: torch.Tensor
    lora_slice: Optional[int] = None
    b: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """A :class:`Segment` without tensors (what a cached plan keeps): columns [start, start + n) are rows
    [weight_row, weight_row + n) of ``weights[weight]``, plus LoRA slice ``lora_slice`` (or ``None``)."""
    start: int
    n: int
    weight: int
    weight_row: int
    lora_slice: Optional[int] = None


def segment_specs(weights: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                  slice_start: Sequence[int]) -> Optional[tuple[SegmentSpec, ...]]:
    """Cut the output columns at every weight boundary and at every LoRA slice boundary.

    Returns None when that takes more than :data:`MAX_SEGMENTS` segments, or when a weight's last dim
    is not contiguous (the kernel walks K with unit stride); the caller then runs the two-op path, whose
    library GEMM takes any strides. Slices are known not to overlap (checked by ``check_qkvz_lora_args``).
    """
    if any(w.stride(1) != 1 for w in weights):
        return None
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    spans = sorted((int(s), int(s) + b.shape[-2], i) for i, (s, b) in enumerate(zip(slice_start, lora_b)))
    cuts = sorted(set(bounds) | {c for s, e, _ in spans for c in (s, e)})
    specs = []
    for c0, c1 in zip(cuts, cuts[1:]):
        if c1 <= c0:
            continue
        j = max(i for i, b in enumerate(bounds[:-1]) if b <= c0)   # the weight holding columns [c0, c1)
        owner = next((i for s, e, i in spans if s <= c0 and c1 <= e), None)
        specs.append(SegmentSpec(c0, c1 - c0, j, c0 - bounds[j], owner))
    return tuple(specs) if len(specs) <= MAX_SEGMENTS else None


def bind_segments(specs: Sequence[SegmentSpec], weights: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                  slice_start: Sequence[int]) -> list[Segment]:
    """The segments of ``specs`` over these tensors (views, no copies)."""
    segments = []
    for sp in specs:
        w = weights[sp.weight][sp.weight_row:sp.weight_row + sp.n]
        b = None
        if sp.lora_slice is not None:
            b = lora_b[sp.lora_slice].narrow(-2, sp.start - int(slice_start[sp.lora_slice]), sp.n)
        segments.append(Segment(sp.start, sp.n, w, sp.lora_slice, b))
    return segments


def plan_segments(weights: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                  slice_start: Sequence[int]) -> Optional[list[Segment]]:
    """:func:`segment_specs` bound to these tensors (None where it is None)."""
    specs = segment_specs(weights, lora_b, slice_start)
    return None if specs is None else bind_segments(specs, weights, lora_b, slice_start)


def plan_decode(x: torch.Tensor, weights: Sequence[torch.Tensor], lora: Optional[LoraSlices],
                segments: Optional[Sequence[Segment]] = None, **force) -> DecodeLaunch:
    """The launch of :func:`gemm_lora_decode` over ``segments`` (default: as planned from ``lora``;
    ``force``: see :func:`fx_passes.ops.tuning.decode_launch`)."""
    if segments is None:
        segments = plan_segments(weights, lora.lora_b if lora else (), lora.slice_start if lora else ()) or []
    return decode_launch(x.shape[0], x.shape[1], sum(w.shape[0] for w in weights), x.device, x.dtype, lora,
                         widths=[seg.n for seg in segments] or None, **force)


def gemm_lora_decode(x: torch.Tensor, weights: Sequence[torch.Tensor], lora: Optional[LoraSlices], *,
                     segments: Optional[list[Segment]] = None,
                     config: Optional[DecodeLaunch] = None) -> torch.Tensor:
    """``out = x @ [W_0; W_1; ...]^T + LoRA`` in two launches (shrink, then the PDL GEMM + expand).

    Arguments are assumed checked (the op does it); ``lora=None`` runs the GEMM alone (what a benchmark
    compares the GEMM part with). ``config``: the launch (default :func:`plan_decode`).
    """
    T, K = x.shape
    out = x.new_empty((T, sum(w.shape[0] for w in weights)))
    if T == 0:
        return out
    if segments is None:
        segments = plan_segments(weights, lora.lora_b if lora else (), lora.slice_start if lora else ())
        if segments is None:
            raise ValueError(f"gemm_lora_decode: more than {MAX_SEGMENTS} column segments")
    if lora is not None and all(seg.lora_slice is None for seg in segments):
        lora = None
    cfg = config or plan_decode(x, weights, lora, segments)
    launch_opts = dict(num_stages=cfg.num_stages, num_warps=cfg.num_warps)
    has_ids = lora is not None and lora.has_ids
    pdl = lora is not None and x.device.type == "cuda"
    if lora is not None:
        _, compact = lora.shrink_groups()
        scale, scales_arg, stride_scales, has_scales = scale_args(lora.lora_scales, lora.scale, x)
        ids_arg, adapters = (lora.token_lora_ids if has_ids else x), lora.adapters
        shrink, precision = cfg.shrink, dot_precision(lora.b_dtype)
    else:
        scale, scales_arg, stride_scales, has_scales, ids_arg, adapters = 1.0, x, 0, False, x, 1
        shrink, precision = None, "tf32"

    with on_device(x):
        if lora is not None:
            s_buf = alloc_shrink_buffer(T, len(compact), shrink, lora.b_dtype, x.device)
            # Not launched as a PDL dependent (x comes from the kernel before it), but it lets the
            # GEMM launch at once (USE_PDL: launch_dependents at entry; its final wait is a no-op).
            launch_shrink(x, lora, s_buf, shrink, use_pdl=pdl)
            s_strides = (s_buf.stride(0), s_buf.stride(1), s_buf.stride(2))
        else:
            s_buf, s_strides = x, (0, 0, 0)

        cols = []   # per segment: w, its row stride, B (w where no LoRA), B's adapter / row strides, n, start, g, rank
        lora_mask, tile_off, n_tiles = 0, [], 0
        for i, seg in enumerate(segments):
            has_lora = lora is not None and seg.lora_slice is not None
            b = seg.b if has_lora else seg.w
            cols.append((seg.w, seg.w.stride(0), b, adapter_stride(b) if has_lora else 0, b.stride(-2), seg.n,
                         seg.start, compact[lora.slice_a[seg.lora_slice]] if has_lora else 0,
                         b.shape[-1] if has_lora else 0))
            lora_mask |= int(has_lora) << i
            tile_off.append(n_tiles)
            n_tiles += triton.cdiv(seg.n, cfg.block_n)
        seg_args = [tuple(column) for column in zip(*cols)] + [tuple(tile_off)]
        if pdl:
            launch_opts["launch_pdl"] = True
        _gemm_lora_decode_kernel[(triton.cdiv(T, cfg.block_t), n_tiles)](
            x, out, s_buf, ids_arg, scales_arg, *seg_args,
            T, K, adapters, shrink.ksplit if shrink else 1,
            x.stride(0), out.stride(0), *s_strides, stride_scales, float(scale),
            NUM_SEGMENTS=len(segments), LORA_MASK=lora_mask, HAS_IDS=has_ids, HAS_SCALES=has_scales, USE_PDL=pdl,
            DOT_PRECISION=precision, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k,
            BLOCK_R=shrink.block_r if shrink else 16, ADAPTER_TILES=cfg.adapter_tiles, **launch_opts,
        )
    return out
