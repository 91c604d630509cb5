"""``fx_passes::qkvz_lora_train`` at large T: the forward's base GEMMs with the LoRA in their K loop (or epilogue),
and the backward's dx GEMMs with x's LoRA gradient in theirs (Triton, Hopper TMA; semantics:
:mod:`fx_passes.ops.qkvz_lora_train`).

Why: from ~1024 tokens the projections' GEMMs are compute-bound, and the expand after them
(:class:`~.lora_train.ExpandAdd`) reads and re-writes their whole [T, N] output: T N 4 bytes, 0.23-0.38 ms
per layer at T 16384 on the Qwen3.5 widths on an H200, a third of what LoRA costs a training step there.
Inside a GEMM that runs at the library's rate it costs a [BLOCK_R, BLOCK_N] load of B and one small dot
per tile.

``_gemm_expand_kernel``: persistent (one program per SM), the column tiles of every projection side by side
(each projection its own W and output descriptor: a training step's frozen weights are separate tensors, not
packed; b and a in tiles of their own width, :func:`tile_widths`), TMA loads of x and W, fp32 accumulator, TMA
store, base + LoRA rounded once at the store (the op's semantics). Tiles in two phases (:func:`schedule`): the
wide projections' tiles in grouped order, then b's and a's narrow tiles onto the programs left lighter.

Where every slice lies on a wide projection (qkv, z), the LoRA runs as the first K steps of their tiles
(:class:`KstepLayout`, :func:`_kstep_tiles`)::

    out_p = [SP | x] @ [C_p | W_p]^T      SP: s's parts [s_hi | s_lo | s_hi] per A group,
                                          C_p: the parts [b_hi | b_hi | b_lo] of scale_i * B_i

one K step more (rank 16 in 64 columns) in the same pipelined loop, flattened over the tiles so that a tile's store
overlaps the next tile's first loads: the kernel at 0.94 / 0.96 / 0.91x the epilogue form's time at 35B-A3B T 2048 /
4096 / 6144 on an H200, 0.90x at rank 64 (T 4096). Elsewhere each LoRA slice over a tile's columns is added after
its K loop (the epilogue: ~2 us a tile that nothing overlaps, Triton 3.6 not warp-specializing on Hopper)::

    acc = acc + (scale_i * s[:, scols i]) @ B_i^T[:, tile]     per slice over the tile, in slice order

The scale multiplies s before the dot (16-bit adapters: one rounding of the scaled s); fp32 adapters multiply
as bf16 hi + lo parts on a GPU (:meth:`GemmExpand.epilogue_dot`: ~2^-16 relative in the LoRA term, where the
op's other kernels are fp32-level), at :func:`~.lora_train.dot_precision` under the Triton interpreter. The K
steps take the same three products in x's dtype (fp16: a factor's lo part below 2^-14 loses bits to fp16's
subnormals, 2^-24 apart: still far below the output's rounding).

Conditions (:func:`fusable`): a GPU with TMA (sm90+) and shared memory for the tiles
(:func:`~fx_passes.ops.tuning.prefill_launch`, the tiles of the inference prefill kernel), 16-bit x and
weights of one dtype, TMA's 16-byte rules, at most :data:`MAX_PROJ` projections and
:data:`~.lora_train.MAX_SLICES` slices, T from :attr:`~fx_passes.ops.tuning.Tuning.train_fused_min_t`.
Elsewhere the op runs the library GEMMs (fp32 outputs where a slice lies) and then :class:`~.lora_train.ExpandAdd`.

``_gemm_dx_kernel`` (:class:`GemmDx`): the same tiles over x's gradient [T, H], each tile's K loop running
through every projection's gradient and weight in turn (dy_p [T, n_p] and W_p [n_p, H] descriptors: K is the
projections' widths), the sum rounded between projections as library GEMMs accumulating into one 16-bit
buffer round it; then x's LoRA gradient of every A group chained into the rounded base and rounded once.
Below :attr:`~fx_passes.ops.tuning.Tuning.train_fused_min_t`, or when the LoRA does not read x itself
(dropout), the op runs library GEMMs (then :class:`~.lora_train.ExpandAdd` for x's LoRA part). A last wave
of tiles that would fill at most half the SMs runs as tiles of half the rows (:func:`tail_tiles`). Where the
last wave leaves programs a tile (or half a tile) lighter and x's gradient of A is asked for, those programs
compute it too (:meth:`GemmDx.with_da`, :func:`dx_schedule`): ``dA = dS^T x`` [sum of ranks, H] in fp32,
one program per 128 columns of x over all T (each element written once: no partial sums, no atomics), in the
time the other programs run their last tile; the dA kernel of its own and the sum of its token splits (7.7 +
1.4 us per 35B-A3B layer at T 2048 on an H200) then do not run.

In both kernels a tile loads its projection's first slice's s and B (x's first A group in dx) before its K
loop (:func:`prefetch_slices`), so that their latency hides under the loop rather than after it.

Descriptors: both kernels make their outputs' TMA descriptors on the device (:func:`_desc`, once per program, in
global scratch that :class:`~.jit_helpers.CompiledLaunches` or Inductor's launcher allocates) from plain pointers,
so that each output is one written argument of the kernel: dx's whole and half tiles through two host
descriptors would be two written arguments of one tensor, which a traced graph's functional form clones apart
(each write to its own copy, an extra [T, H] buffer, and only one copy returned). The dx kernel takes its inputs'
descriptors (dy_p, W_p) made on the host (``HOST_DESC``; traced, the graph records each one's tensor and block
shape and Inductor's code makes it, :class:`~.jit_helpers.CompiledLaunches`): its K loop cycles through 8 of
them, and with host-made ones it ran 1-6 % faster on an H200; the forward makes x's and W's on the device too
(0.97-1.01x with host-made ones, which cost host time: Triton's launcher encodes one at every launch). A kernel
uses a host descriptor argument as it is, never as a function's result: a traced graph's mutation analysis
(torch reading the kernel's TTIR) follows an argument into a function and finds nothing through one returned
from it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fx_passes.ops.kernels.gemm_lora_prefill import _tile_pids
from fx_passes.ops.kernels.jit_helpers import CompiledLaunches, tile_owner
from fx_passes.ops.kernels.lora_train import (MAX_SLICES, Slices, _b_slots, _db_tile, _offsets, _strides,
                                              dot_precision, rank_block)
from fx_passes.ops.tuning import PrefillLaunch, device_info, interpreting, prefill_launch, tuning_for

# One W and one output (or dy) pointer argument per projection, up to 4 (a GDN layer's qkv, z, b, a), unused ones None.
MAX_PROJ = 4
_16BIT = (torch.float16, torch.bfloat16)
_OFF_GPU_PROGRAMS = 4   # the interpreter runs programs one after another: any count is correct


@triton.jit
def _round(acc, dtype: tl.constexpr):
    return acc.to(dtype).to(tl.float32)


@triton.jit
def _slice_operands(s_ptr, b_ptr, off_m, off_n, T, i: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr,
                    SCOLS: tl.constexpr, RANKS: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
                    STRIDE_ST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Slice ``i``'s factors over a tile: s [BLOCK_M, BLOCK_R] and B^T [BLOCK_R, BLOCK_N] (zeros past T, past
    the rank, outside the slice's columns; nothing read where the slice misses the tile)."""
    rows = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    overlap = (off_n < COLS[i] + WIDTHS[i]) & (off_n + BLOCK_N > COLS[i])
    r_mask = offs_r < tl.where(overlap, RANKS[i], 0)
    s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * STRIDE_ST + (SCOLS[i] + offs_r)[None, :],
                mask=(rows < T)[:, None] & r_mask[None, :], other=0.0)
    local = off_n - COLS[i] + tl.arange(0, BLOCK_N)
    bt = tl.load(b_ptr + local[None, :].to(tl.int64) * B_STRIDES_N[i] + offs_r[:, None] * B_STRIDES_R[i],
                 mask=r_mask[:, None] & ((local >= 0) & (local < WIDTHS[i]))[None, :], other=0.0)
    return s, bt


@triton.jit
def _add_slices(acc, s_ptr, bs, off_m, off_n, T, P: tl.constexpr, SLICE_PROJ: tl.constexpr, WIDTHS: tl.constexpr,
                COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr, SCALES: tl.constexpr,
                B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr, STRIDE_ST: tl.constexpr,
                NUM_SLICES: tl.constexpr, EPILOGUE_DOT: tl.constexpr, OUT_DTYPE: tl.constexpr,
                ROUND_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                PRE: tl.constexpr, s_pre, bt_pre):
    """``acc`` (a tile's fp32 GEMM sum) with the LoRA of projection ``P``'s slices over the tile's columns
    chained in slice order, rounded once at the store; ``ROUND_BASE``: the base rounded to ``OUT_DTYPE`` first
    (dx, as its library GEMMs round). Slice ``PRE`` (-1: none) comes with its factors loaded already
    (``s_pre``, ``bt_pre``: :func:`_prefetch`)."""
    if ROUND_BASE:
        acc = _round(acc, OUT_DTYPE)
    for i in tl.static_range(NUM_SLICES):
        if SLICE_PROJ[i] == P:   # (compile time: this projection's slices only)
            if (off_n < COLS[i] + WIDTHS[i]) & (off_n + BLOCK_N > COLS[i]):
                if i == PRE:
                    s, bt = s_pre, bt_pre
                else:   # columns outside the slice add 0
                    s, bt = _slice_operands(s_ptr, bs[i], off_m, off_n, T, i, WIDTHS, COLS, SCOLS, RANKS,
                                            B_STRIDES_N, B_STRIDES_R, STRIDE_ST, BLOCK_M, BLOCK_N, BLOCK_R)
                s = s.to(tl.float32) * SCALES[i]
                if EPILOGUE_DOT == "bf16x3":   # fp32 factors as bf16 hi + lo: hi hi + hi lo + lo hi
                    s_hi = s.to(tl.bfloat16)
                    s_lo = (s - s_hi.to(tl.float32)).to(tl.bfloat16)
                    b_hi = bt.to(tl.bfloat16)
                    b_lo = (bt - b_hi.to(tl.float32)).to(tl.bfloat16)
                    acc = tl.dot(s_hi, b_hi, tl.dot(s_lo, b_hi, tl.dot(s_hi, b_lo, acc)))
                else:
                    acc = tl.dot(s.to(bt.dtype), bt, acc, input_precision=EPILOGUE_DOT)
    return acc


@triton.jit
def _prefetch(s_ptr, bs, off_m, off_n, T, PRE: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr,
              SCOLS: tl.constexpr, RANKS: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
              STRIDE_ST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Slice ``PRE``'s factors, loaded before a tile's K loop so that their latency hides under it (loaded
    after a short K loop, 32 steps in 35B-A3B's forward, they cost that GEMM 2 % of its time at T 2048);
    ``PRE`` -1: placeholders."""
    if PRE >= 0:
        s, bt = _slice_operands(s_ptr, bs[PRE], off_m, off_n, T, PRE, WIDTHS, COLS, SCOLS, RANKS, B_STRIDES_N,
                                B_STRIDES_R, STRIDE_ST, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        s, bt = 0.0, 0.0
    return s, bt


@triton.jit
def _desc(ptr, rows, COLS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """A TMA descriptor of a row-major [rows, COLS] tensor, made on the device from a plain pointer."""
    return tl.make_tensor_descriptor(ptr, shape=[rows, COLS], strides=[STRIDE, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_COLS])


@triton.jit
def _proj_tile(x_desc, w_desc, o_desc, s_ptr, bs, off_m, off_n, T, K, P: tl.constexpr, SLICE_PROJ: tl.constexpr,
               WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr,
               SCALES: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr, STRIDE_ST: tl.constexpr,
               NUM_SLICES: tl.constexpr, EPILOGUE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRE: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of projection ``P``'s output: its GEMM, then its slices' LoRA (slice ``PRE``'s
    factors loaded before the K loop)."""
    s_pre, bt_pre = _prefetch(s_ptr, bs, off_m, off_n, T, PRE, WIDTHS, COLS, SCOLS, RANKS, B_STRIDES_N, B_STRIDES_R,
                              STRIDE_ST, BLOCK_M, BLOCK_N, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
    acc = _add_slices(acc, s_ptr, bs, off_m, off_n, T, P, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS, SCALES, B_STRIDES_N,
                      B_STRIDES_R, STRIDE_ST, NUM_SLICES, EPILOGUE_DOT, o_desc.dtype, False, BLOCK_M, BLOCK_N, BLOCK_R,
                      PRE, s_pre, bt_pre)
    o_desc.store([off_m, off_n], acc.to(o_desc.dtype))


@triton.jit
def _tile_of(x_desc, ws, os_, s_ptr, bs, pid_m, pid_n, T, K, FIRST: tl.constexpr, LAST: tl.constexpr,
             PROJ_ORDER: tl.constexpr, PROJ_TILE_OFF: tl.constexpr, NUM_PROJ: tl.constexpr, SLICE_PROJ: tl.constexpr,
             WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr, SCALES: tl.constexpr,
             B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr, STRIDE_ST: tl.constexpr, NUM_SLICES: tl.constexpr,
             EPILOGUE_DOT: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NS: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Tile (``pid_m``, ``pid_n``) of the column tiles in :func:`schedule` order (wide projections' first), a
    [BLOCK_M, *] tile at row ``pid_m * BLOCK_M``; only projections ``FIRST .. LAST - 1`` of that order are
    compiled in (separate descriptors per projection: a branch each, unrolled)."""
    c = tile_owner(pid_n, PROJ_TILE_OFF, NUM_PROJ)
    for i in tl.static_range(FIRST, LAST):
        if c == i:
            q: tl.constexpr = PROJ_ORDER[i]
            _proj_tile(x_desc, ws[q], os_[q], s_ptr, bs, pid_m * BLOCK_M, (pid_n - PROJ_TILE_OFF[i]) * BLOCK_NS[q],
                       T, K, q, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS, SCALES, B_STRIDES_N, B_STRIDES_R, STRIDE_ST,
                       NUM_SLICES, EPILOGUE_DOT, BLOCK_M, BLOCK_NS[q], BLOCK_K, BLOCK_R, PREFETCH[q])


@triton.jit
def _c_desc(c_ptr, w_desc, rows, STEPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A wide projection's ``C`` descriptor [rows, STEPS x BLOCK_K]; with no LoRA steps its W's (never read)."""
    if STEPS > 0:
        return _desc(c_ptr, rows, STEPS * BLOCK_K, STEPS * BLOCK_K, BLOCK_N, BLOCK_K)
    return w_desc


@triton.jit
def _kstep_tiles(x_desc, ws, os_, sp_ptr, c0, c1, c2, c3, pid, num_m, T, K: tl.constexpr, NS: tl.constexpr,
                 PROJ_ORDER: tl.constexpr, PROJ_TILE_OFF: tl.constexpr, NUM_WIDE_PROJ: tl.constexpr,
                 NUM_WIDE_TILES: tl.constexpr, NL: tl.constexpr, SPCOL: tl.constexpr, SP_COLS: tl.constexpr,
                 NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """The wide projections' tiles with their LoRA as the first K steps, ``[SP | x] @ [C_p | W_p]^T``
    (:class:`KstepLayout`): one flattened loop over tiles and K steps, descriptors picked per tile and per step,
    base + LoRA rounded once at the store."""
    sp_desc = _desc(sp_ptr, T, SP_COLS, SP_COLS, BLOCK_M, BLOCK_K)
    cd0 = _c_desc(c0, ws[PROJ_ORDER[0]], NS[PROJ_ORDER[0]], NL[0], BLOCK_N, BLOCK_K)
    cd1, cd2, cd3 = cd0, cd0, cd0
    if NUM_WIDE_PROJ > 1:
        cd1 = _c_desc(c1, ws[PROJ_ORDER[1]], NS[PROJ_ORDER[1]], NL[1], BLOCK_N, BLOCK_K)
    if NUM_WIDE_PROJ > 2:
        cd2 = _c_desc(c2, ws[PROJ_ORDER[2]], NS[PROJ_ORDER[2]], NL[2], BLOCK_N, BLOCK_K)
    if NUM_WIDE_PROJ > 3:
        cd3 = _c_desc(c3, ws[PROJ_ORDER[3]], NS[PROJ_ORDER[3]], NL[3], BLOCK_N, BLOCK_K)
    cds = (cd0, cd1, cd2, cd3)
    k_steps: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K   # (TMA zero-fills a K tail)
    for tile in tl.range(pid, num_m * NUM_WIDE_TILES, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_pids(tile, num_m, NUM_WIDE_TILES, GROUP_M)
        c = tile_owner(pid_n, PROJ_TILE_OFF, NUM_WIDE_PROJ)
        wd = ws[PROJ_ORDER[0]]
        od = os_[PROJ_ORDER[0]]
        cd = cds[0]
        nl = NL[0]
        spc = SPCOL[0]
        first = PROJ_TILE_OFF[0]
        for i in tl.static_range(1, NUM_WIDE_PROJ):
            if c == i:
                wd = ws[PROJ_ORDER[i]]
                od = os_[PROJ_ORDER[i]]
                cd = cds[i]
                nl = NL[i]
                spc = SPCOL[i]
                first = PROJ_TILE_OFF[i]
        off_m = pid_m * BLOCK_M
        off_n = (pid_n - first) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(0, nl + k_steps):
            if ki < nl:
                a_d = sp_desc
                b_d = cd
                ka = spc + ki * BLOCK_K
                kb = ki * BLOCK_K
            else:
                a_d = x_desc
                b_d = wd
                ka = (ki - nl) * BLOCK_K
                kb = ka
            acc = tl.dot(a_d.load([off_m, ka]), b_d.load([off_n, kb]).T, acc)
        od.store([off_m, off_n], acc.to(od.dtype))


@triton.jit
def _filled(pid, HEAVY: tl.constexpr, FILL: tl.constexpr, CAP: tl.constexpr):
    """``(first, last)``: the narrow tiles a :class:`Schedule` fills program ``pid`` with (``FILL`` each on
    programs ``HEAVY ..``, the first ``CAP`` tiles); none on the heavier programs."""
    first = tl.where(pid >= HEAVY, (pid - HEAVY) * FILL, CAP)
    return first, tl.minimum(first + FILL, CAP)


@triton.jit
def _gemm_expand_kernel(x_ptr, w0, w1, w2, w3, o0, o1, o2, o3, s_ptr, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10,
                        b11, b12, b13, b14, b15, sp_ptr, c0, c1, c2, c3, T, K: tl.constexpr, X_STRIDE: tl.constexpr,
                        NS: tl.constexpr, W_STRIDES: tl.constexpr, PROJ_ORDER: tl.constexpr,
                        PROJ_TILE_OFF: tl.constexpr, NUM_PROJ: tl.constexpr, NUM_WIDE_PROJ: tl.constexpr,
                        NUM_WIDE_TILES: tl.constexpr, NUM_N_TILES: tl.constexpr, SLICE_PROJ: tl.constexpr,
                        WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr,
                        SCALES: tl.constexpr,
                        B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr, STRIDE_ST: tl.constexpr,
                        NUM_SLICES: tl.constexpr, EPILOGUE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
                        NUM_PROGRAMS: tl.constexpr, HEAVY: tl.constexpr,
                        FILL: tl.constexpr, FILL_CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NS: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                        KSTEP: tl.constexpr, NL: tl.constexpr, SPCOL: tl.constexpr, SP_COLS: tl.constexpr):
    # made once per program (projections past NUM_PROJ: the first one's, never read)
    x_desc = _desc(x_ptr, T, K, X_STRIDE, BLOCK_M, BLOCK_K)
    wd0 = _desc(w0, NS[0], K, W_STRIDES[0], BLOCK_NS[0], BLOCK_K)
    od0 = _desc(o0, T, NS[0], NS[0], BLOCK_M, BLOCK_NS[0])
    wd1, od1, wd2, od2, wd3, od3 = wd0, od0, wd0, od0, wd0, od0
    if NUM_PROJ > 1:
        wd1 = _desc(w1, NS[1], K, W_STRIDES[1], BLOCK_NS[1], BLOCK_K)
        od1 = _desc(o1, T, NS[1], NS[1], BLOCK_M, BLOCK_NS[1])
    if NUM_PROJ > 2:
        wd2 = _desc(w2, NS[2], K, W_STRIDES[2], BLOCK_NS[2], BLOCK_K)
        od2 = _desc(o2, T, NS[2], NS[2], BLOCK_M, BLOCK_NS[2])
    if NUM_PROJ > 3:
        wd3 = _desc(w3, NS[3], K, W_STRIDES[3], BLOCK_NS[3], BLOCK_K)
        od3 = _desc(o3, T, NS[3], NS[3], BLOCK_M, BLOCK_NS[3])
    ws = (wd0, wd1, wd2, wd3)
    os_ = (od0, od1, od2, od3)
    bs = (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    # (1) the wide projections' tiles, grouped order, round robin (:func:`schedule`): the LoRA as their first K
    if KSTEP:   # steps (:class:`KstepLayout`), or in their epilogue
        _kstep_tiles(x_desc, ws, os_, sp_ptr, c0, c1, c2, c3, pid, num_m, T, K, NS, PROJ_ORDER, PROJ_TILE_OFF,
                     NUM_WIDE_PROJ, NUM_WIDE_TILES, NL, SPCOL, SP_COLS, NUM_PROGRAMS, BLOCK_M, BLOCK_NS[PROJ_ORDER[0]],
                     BLOCK_K, GROUP_M)
    else:
        for tile in tl.range(pid, num_m * NUM_WIDE_TILES, NUM_PROGRAMS):
            pid_m, pid_n = _tile_pids(tile, num_m, NUM_WIDE_TILES, GROUP_M)
            _tile_of(x_desc, ws, os_, s_ptr, bs, pid_m, pid_n, T, K, 0, NUM_WIDE_PROJ, PROJ_ORDER, PROJ_TILE_OFF,
                     NUM_PROJ, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS, SCALES, B_STRIDES_N, B_STRIDES_R, STRIDE_ST,
                     NUM_SLICES, EPILOGUE_DOT, PREFETCH, BLOCK_M, BLOCK_NS, BLOCK_K, BLOCK_R)
    if NUM_N_TILES > NUM_WIDE_TILES:   # (2) the narrow projections' tiles: FILL each on the lighter programs, then
        narrow = num_m * (NUM_N_TILES - NUM_WIDE_TILES)   # round robin over all
        if FILL > 0:   # programs HEAVY .. take FILL each of the first FILL_CAP
            first, last = _filled(pid, HEAVY, FILL, FILL_CAP)
            for j in tl.range(first, last):
                _tile_of(x_desc, ws, os_, s_ptr, bs, j % num_m, NUM_WIDE_TILES + j // num_m, T, K, NUM_WIDE_PROJ,
                         NUM_PROJ, PROJ_ORDER, PROJ_TILE_OFF, NUM_PROJ, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS,
                         SCALES, B_STRIDES_N, B_STRIDES_R, STRIDE_ST, NUM_SLICES, EPILOGUE_DOT, PREFETCH, BLOCK_M,
                         BLOCK_NS, BLOCK_K, BLOCK_R)
        for j in tl.range(FILL_CAP + pid, narrow, NUM_PROGRAMS):
            _tile_of(x_desc, ws, os_, s_ptr, bs, j % num_m, NUM_WIDE_TILES + j // num_m, T, K, NUM_WIDE_PROJ,
                     NUM_PROJ, PROJ_ORDER, PROJ_TILE_OFF, NUM_PROJ, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS, SCALES,
                     B_STRIDES_N, B_STRIDES_R, STRIDE_ST, NUM_SLICES, EPILOGUE_DOT, PREFETCH, BLOCK_M, BLOCK_NS,
                     BLOCK_K, BLOCK_R)


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor's rules: 16-byte aligned base and row stride, unit last stride (the base by the
    storage offset: a traced tensor has no address; allocations are 16-byte aligned)."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(-1) == 1 and (t.storage_offset() * size) % 16 == 0
            and (t.stride(0) * size) % 16 == 0)


def _host_desc(t: torch.Tensor, block: tuple):
    """A TMA descriptor of ``t`` made on the host (the dx kernel's ``HOST_DESC``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block))


def fusable(x: torch.Tensor, weights: Sequence[torch.Tensor], num_slices: int) -> bool:
    """Whether :class:`GemmExpand` runs this forward (host-side facts only: shapes, strides, dtypes, the
    device; T from the device's :attr:`~fx_passes.ops.tuning.Tuning.train_fused_min_t`)."""
    return _tma_ok(x) and _fits(x.device, x.dtype, x.shape[0], weights, num_slices)


def _fits(device: torch.device, dtype: torch.dtype, T: int, weights: Sequence[torch.Tensor], num_slices: int) -> bool:
    """The rules both fused GEMMs share: a GPU with TMA, 16-bit data and weights of one dtype, the launch's
    projection and slice counts, T, and TMA's 16-byte rules on every weight and on [T, n_p] rows."""
    if device.type != "cuda" and not interpreting():
        return False
    if dtype not in _16BIT or any(w.dtype != dtype for w in weights):
        return False
    if not (1 <= len(weights) <= MAX_PROJ and 1 <= num_slices <= MAX_SLICES):
        return False
    if prefill_launch(device, dtype) is None or T < tuning_for(device_info(device)).train_fused_min_t:
        return False
    return all(_tma_ok(w) and (w.shape[0] * w.element_size()) % 16 == 0 for w in weights)


def tile_widths(widths: Sequence[int], block_n: int) -> tuple[int, ...]:
    """Each projection's column tile: ``block_n``, or the power of two (16 at least, a dot's least N) that
    covers a narrower projection: b and a (32-64 columns at Qwen3.5's widths) would otherwise each take a
    full-width tile per row block, 2 of 50-82 tiles of the GEMM's work (tile cost grows with its width)."""
    return tuple(min(block_n, max(16, triton.next_power_of_2(n))) for n in widths)


# Slice factors loaded before the K loop are held in registers through it, beside the [128, 256] fp32 accumulator
# (128 registers a thread over 8 warps): s [128, 32] and B^T [32, 256] in fp32 take 48 more, a rank block of 64
# would take 96.
PREFETCH_MAX_RANK_BLOCK = 32


def prefetch_slices(slice_proj: Sequence[int], num_proj: int, block_r: int) -> tuple[int, ...]:
    """Per projection, the slice whose factors a tile loads before its K loop (:func:`_prefetch`): its first
    slice; -1 where it has none or the rank block is over :data:`PREFETCH_MAX_RANK_BLOCK` (a second adapter
    on the projection loads its factors after the loop)."""
    if block_r > PREFETCH_MAX_RANK_BLOCK:
        return (-1,) * num_proj
    return tuple(next((i for i, p in enumerate(slice_proj) if p == q), -1) for q in range(num_proj))


def _max_programs(device: torch.device, cfg: PrefillLaunch) -> tuple[bool, int]:
    """``(on a GPU, the most persistent programs)``: one per SM, or ``cfg.num_programs``."""
    on_gpu = device.type == "cuda" and not interpreting()
    return on_gpu, cfg.num_programs or (device_info(device).sms if on_gpu else _OFF_GPU_PROGRAMS)


def tail_tiles(n_tiles: int, max_programs: int, block_m: int) -> tuple[int, int]:
    """``(programs, tail)``: the persistent GEMM's programs and how many of its last tiles run as two halves of
    ``block_m // 2`` rows. A last wave of tiles filling at most half the programs would leave the others idle
    for a whole tile's time: 27B's dx at T 2048 is 320 tiles of 128 x 256 on 132 SMs, 2 full waves and 56
    tiles (the GEMM 0.81x as fast as full waves); as 112 halves the last wave takes about half a tile's time.
    Halves need 16 rows at least (a dot's least M)."""
    full_wave = min(n_tiles, max_programs)
    rem = n_tiles % max_programs if n_tiles >= max_programs else n_tiles
    if block_m // 2 < 16 or rem == 0 or 2 * rem > max_programs:
        return max(1, full_wave), 0
    return min(max_programs, n_tiles + rem), rem


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a persistent GEMM's programs share its tiles (:func:`schedule`, :func:`dx_schedule`): ``programs``;
    the narrow tiles (b / a in the forward, dA in dx): ``fill`` each on programs ``heavy ..`` (the first
    ``fill_cap`` of them), the rest round robin over all."""
    programs: int
    heavy: int
    fill: int
    fill_cap: int


def _fill(programs: int, heavy: int, narrow_tiles: int, narrow_cost: float, spare: float) -> tuple[int, int]:
    """``(fill, fill_cap)``: narrow tiles per program on the programs ``heavy ..`` that run ``spare`` of a wide
    tile less than the rest, as many as fit in that time and no more than spreading them evenly takes."""
    light = programs - heavy
    if not (heavy and light and narrow_tiles):
        return 0, 0
    fill = min(int(spare / narrow_cost), triton.cdiv(narrow_tiles, light))
    return fill, min(narrow_tiles, light * fill)


def schedule(wide_tiles: int, narrow_tiles: int, max_programs: int, narrow_cost: float) -> Schedule:
    """The forward GEMM's tiles in two phases. (1) The wide projections' tiles (``block_n`` columns: qkv, z)
    round robin: programs ``0 .. heavy - 1`` run one more than the rest; (2) the narrow projections' tiles
    (b, a: 16-64 columns), which cost ``narrow_cost`` of a wide tile each, first ``fill`` to each of the
    lighter programs (as many as fit in one wide tile's time, spread evenly), then round robin over all.
    Round robin over every tile in one order gave b / a tiles to programs already holding one wide tile more:
    at 35B-A3B T 2048 (768 wide and 32 narrow tiles on 132 SMs) the heaviest held 6 wide tiles and a narrow
    one, where 6 suffice. (The last partial wave of wide tiles as halves, as :func:`tail_tiles` does for dx,
    made this GEMM 0.5-1.5 % slower where it applied: its tiles are short, K = H.)"""
    programs = max(1, min(max_programs, wide_tiles + narrow_tiles))
    heavy = wide_tiles % programs
    return Schedule(programs, heavy, *_fill(programs, heavy, narrow_tiles, narrow_cost, 1.0))


def dx_schedule(tiles: int, tail: int, max_programs: int, da_tiles: int, da_cost: float) -> Optional[Schedule]:
    """dA's tiles (``da_tiles``, each ``da_cost`` of a dx tile) on the dx GEMM's lighter programs, or None
    where they do not all fit there (then dA runs as a kernel of its own). dx's ``tiles`` run round robin
    (``tail``: the last ``tail`` of them as halves, one per program from program 0, :func:`tail_tiles`):
    programs ``heavy ..`` run one tile (a half) less than the rest, and each takes up to as many dA tiles as
    that time holds. A dx GEMM filling its last wave (35B-A3B at T 2048: 128 tiles on 132 SMs) leaves SMs
    idle for a whole tile; the dA kernel and the sums of its token splits cost 7.7 + 1.4 us a layer there."""
    if not da_tiles:
        return None
    if tail:   # whole waves, then 2 tail halves (tail_tiles keeps them within one wave)
        programs, heavy, spare = max_programs, 2 * tail, 0.5
    else:
        programs = max(1, min(max_programs, tiles + da_tiles))
        heavy, spare = tiles % programs, 1.0
    fill, cap = _fill(programs, heavy, da_tiles, da_cost, spare)
    return Schedule(programs, heavy, fill, cap) if cap == da_tiles else None


def narrow_tile_cost(block_m: int, block_n: int, narrow_n: int) -> float:
    """A narrow tile's time as a share of a wide tile's: what a K step loads (x's [block_m, K step] and W's
    [n, K step] tiles), the bound where the narrow tile's small dot hides under its loads: 0.42 for b / a's
    32-wide tiles beside 128 x 256 (its dot is an eighth of the wide tile's)."""
    return (block_m + narrow_n) / (block_m + block_n)


class GemmExpand:
    """``outs[p] = x @ W_p^T`` with the slices' LoRA (module docstring) for one call signature: the tiles,
    tile order and every per-slice number planned once. ``slice_proj``: each slice's projection;
    ``sl.col``: each slice's first column within its projection."""

    def __init__(self, sl: Slices, slice_proj: Sequence[int], widths: Sequence[int], T: int, K: int,
                 data_dtype: torch.dtype, adapter_dtype: torch.dtype, device: torch.device,
                 config: Optional[PrefillLaunch] = None, epilogue_dot: Optional[str] = None):
        cfg = config or prefill_launch(device, data_dtype) or PrefillLaunch()
        self.cfg, self.T, self.widths, self.slices = cfg, T, tuple(widths), sl
        block_ns = tile_widths(widths, cfg.block_n)
        # the projections in schedule order: wide (block_n columns) first, then narrow
        order = tuple(sorted(range(len(widths)), key=lambda q: block_ns[q] < cfg.block_n))
        num_wide = sum(bn == cfg.block_n for bn in block_ns)
        tile_off, n_tiles = _offsets([triton.cdiv(widths[q], block_ns[q]) for q in order])
        wide = tile_off[num_wide] if num_wide < len(widths) else n_tiles
        num_m = triton.cdiv(T, cfg.block_m)
        on_gpu, most = _max_programs(device, cfg)
        narrow_n = max((block_ns[q] for q in order[num_wide:]), default=0)
        self.schedule = schedule(num_m * wide, num_m * (n_tiles - wide), most,
                                 narrow_tile_cost(cfg.block_m, cfg.block_n, narrow_n))
        self.programs = self.schedule.programs
        self.meta = dict(K=K, NS=tuple(widths), PROJ_ORDER=order, PROJ_TILE_OFF=tile_off, NUM_PROJ=len(widths),
                         NUM_WIDE_PROJ=num_wide, NUM_WIDE_TILES=wide, NUM_N_TILES=n_tiles,
                         HEAVY=self.schedule.heavy, FILL=self.schedule.fill,
                         FILL_CAP=self.schedule.fill_cap,
                         SLICE_PROJ=tuple(slice_proj), WIDTHS=sl.width, COLS=sl.col, SCOLS=sl.scol, RANKS=sl.rank,
                         SCALES=sl.scale, NUM_SLICES=len(sl),
                         EPILOGUE_DOT=epilogue_dot or self.epilogue_dot(adapter_dtype, on_gpu),
                         PREFETCH=prefetch_slices(slice_proj, MAX_PROJ, rank_block(sl.rank) if len(sl) else 16),
                         NUM_PROGRAMS=self.programs, BLOCK_M=cfg.block_m,
                         BLOCK_NS=block_ns + (cfg.block_n,) * (MAX_PROJ - len(widths)), BLOCK_K=cfg.block_k,
                         BLOCK_R=rank_block(sl.rank) if len(sl) else 16, GROUP_M=cfg.group_m,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ks = self.kstep = kstep_layout(sl, slice_proj, order[:num_wide], widths, cfg.block_k) if len(sl) else None
        self.meta.update(KSTEP=ks is not None, NL=ks.steps if ks else (0,), SPCOL=ks.sp_col if ks else (0,),
                         SP_COLS=ks.sp_cols if ks else cfg.block_k)
        self.launches = CompiledLaunches(_gemm_expand_kernel, device_descriptors=True)

    @staticmethod
    def epilogue_dot(adapter_dtype: torch.dtype, on_gpu: bool) -> str:
        """How the epilogue multiplies s with B: 16-bit adapters in their dtype; fp32 adapters on a GPU as
        bf16 hi + lo parts of both factors in three bf16 dots (a relative error of ~2^-16 in the LoRA term,
        far below the 16-bit output's rounding): ``tf32x3`` there (fp32-level) made the kernel 6-7x the
        GEMM's time at every Qwen3.5 width. The interpreter (no bf16) takes :func:`~.lora_train.dot_precision`."""
        if adapter_dtype != torch.float32:
            return "tf32"   # ignored: 16-bit dots
        if on_gpu and dot_precision(torch.bfloat16, adapter_dtype) != "tf32":
            return "bf16x3"
        return dot_precision(adapter_dtype, adapter_dtype)

    def __call__(self, x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor,
                 bs: Sequence[torch.Tensor], *, traced: bool = False) -> list[torch.Tensor]:
        """``traced``: see :meth:`~.jit_helpers.CompiledLaunches.launch`."""
        outs = [x.new_empty((x.shape[0], n)) for n in self.widths]
        if self.T == 0:
            return outs
        pad = (None,) * (MAX_PROJ - len(weights))
        sp, cs = (None, []) if self.kstep is None else kstep_parts(self.kstep, s, bs, x.dtype)
        cs = cs + [None] * (MAX_PROJ - len(cs))
        parts = [t for t in (sp, *cs) if t is not None]
        args = (x, *weights, *pad, *outs, *pad, s, *_b_slots(bs), sp, *cs, self.T)
        key = (x.stride(0), _strides(weights), _strides(bs), _strides(bs, 1), s.stride(0))
        self.launches.launch(key, (self.programs,), args,
                             dict(self.meta, X_STRIDE=key[0], W_STRIDES=key[1], B_STRIDES_N=key[2],
                                  B_STRIDES_R=key[3], STRIDE_ST=key[4]),
                             (x, *weights, *outs, s, *bs, *parts), traced)
        return outs


@dataclasses.dataclass(frozen=True)
class KstepLayout:
    """The LoRA as the first K steps of the wide projections' tiles (:func:`_kstep_tiles`): per wide projection
    ``j`` (schedule order) its A groups ``groups[j]`` ((first column in s, rank) each), s's parts
    ``[s_hi | s_lo | s_hi]`` of each group side by side in SP's columns ``sp_col[j] ..``, and in ``C_j``
    [n_j, steps[j] x block_k] the parts ``[b_hi | b_hi | b_lo]`` of ``scale_i * B_i`` summed over the
    projection's slices on that group (zero elsewhere): ``SP_j @ C_j^T = sum_i scale_i * s_i @ B_i^T``
    to ~2^-16 relative (the three products of two-part splits). ``steps[j]`` K steps of ``block_k``
    (zero-padded), 0 where the projection has no slice."""
    groups: tuple
    slices: tuple        # per j: the slices on that projection
    rows: tuple          # per j: the projection's width, C_j's rows
    steps: tuple
    sp_col: tuple
    sp_cols: int
    block_k: int
    sl: Slices


def kstep_layout(sl: Slices, slice_proj: Sequence[int], wide: Sequence[int], widths: Sequence[int],
                 block_k: int) -> Optional[KstepLayout]:
    """:class:`KstepLayout` of the wide projections ``wide`` (schedule order), or None where a slice lies on a
    narrow projection (b / a: their tiles keep the LoRA in the epilogue)."""
    if any(p not in wide for p in slice_proj):
        return None
    groups, slices, steps, sp_col, col = [], [], [], [], 0
    for p in wide:
        mine = tuple(i for i, q in enumerate(slice_proj) if q == p)
        gs = tuple(sorted({(sl.scol[i], sl.rank[i]) for i in mine}))
        n = triton.cdiv(3 * sum(r for _, r in gs), block_k)
        groups.append(gs)
        slices.append(mine)
        steps.append(n)
        sp_col.append(col)
        col += n * block_k
    return KstepLayout(tuple(groups), tuple(slices), tuple(widths[p] for p in wide), tuple(steps), tuple(sp_col),
                       max(col, block_k), block_k, sl)


def _two_parts(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``v`` as ``hi + lo`` in the 16-bit ``dtype``: ``hi`` v rounded (to nearest even) to dtype's
    significand by integer ops on v's bits, ``lo = v - hi`` rounded. Not ``v.to(dtype)`` and back: Inductor
    keeps such a round trip inside one kernel as the fp32 value (``emulate_precision_casts`` is off by
    default), which made every ``lo`` 0 in the traced graph."""
    drop = 16 if dtype == torch.bfloat16 else 13   # significand bits fp32 has beyond bf16 / fp16
    bits = v.view(torch.int32)
    hi = ((bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)).view(torch.float32)
    return hi.to(dtype), (v - hi).to(dtype)


def kstep_parts(ks: KstepLayout, s: torch.Tensor, bs: Sequence[torch.Tensor], dtype: torch.dtype
                ) -> tuple[torch.Tensor, list]:
    """``(SP [T, sp_cols], [C_j or None per wide projection])`` of :class:`KstepLayout`, in ``dtype`` (x's),
    by functional torch ops (traced: a few small Inductor kernels, ~5 us at 35B-A3B T 4096 on an H200)."""
    sf = s.float()
    sp, cs = [], []
    for gs, mine, rows, steps in zip(ks.groups, ks.slices, ks.rows, ks.steps):
        if not steps:
            cs.append(None)
            continue
        c_parts = []
        for scol, r in gs:   # (a gather, not a slice: a CPU build of torch cannot trace views of fake CUDA tensors)
            cols = torch.arange(scol, scol + r, device=s.device)
            s_hi, s_lo = _two_parts(sf.index_select(1, cols), dtype)
            # scale_i * B_i of the group's slices, each at its columns of the projection (zero elsewhere)
            b = sum(torch.nn.functional.pad(bs[i].float() * ks.sl.scale[i],
                                            (0, 0, ks.sl.col[i], rows - ks.sl.col[i] - ks.sl.width[i]))
                    for i in mine if (ks.sl.scol[i], ks.sl.rank[i]) == (scol, r))
            b_hi, b_lo = _two_parts(b, dtype)
            sp += [s_hi, s_lo, s_hi]
            c_parts += [b_hi, b_hi, b_lo]
        pad = steps * ks.block_k - 3 * sum(r for _, r in gs)
        if pad:
            sp.append(s.new_zeros((s.shape[0], pad), dtype=dtype))
            c_parts.append(s.new_zeros((rows, pad), dtype=dtype))
        cs.append(torch.cat(c_parts, 1))
    return torch.cat(sp, 1), cs


def gemm_expand(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, bs: Sequence[torch.Tensor],
                sl: Slices, slice_proj: Sequence[int], *, config: Optional[PrefillLaunch] = None) -> list[torch.Tensor]:
    """:class:`GemmExpand` planned and launched once (tests, benchmarks)."""
    return GemmExpand(sl, slice_proj, [w.shape[0] for w in weights], x.shape[0], x.shape[1], x.dtype, s.dtype,
                      x.device, config)(x, weights, s, bs)


# --------------------------------------------------------------------------------------------
# backward: dx = sum_p dy_p @ W_p with x's LoRA gradient in the epilogue
# --------------------------------------------------------------------------------------------
@triton.jit
def _dx_tile(dys, ws, o_desc, s_ptr, bs, off_m, off_n, T, KS: tl.constexpr, NUM_PROJ: tl.constexpr,
             SLICE_PROJ: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr,
             RANKS: tl.constexpr, SCALES: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
             STRIDE_ST: tl.constexpr, NUM_SLICES: tl.constexpr, EPILOGUE_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRE: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of dx (descriptors of that block shape): every projection's K, then the LoRA
    (group ``PRE``'s factors loaded before the K loop)."""
    s_pre, bt_pre = _prefetch(s_ptr, bs, off_m, off_n, T, PRE, WIDTHS, COLS, SCOLS, RANKS, B_STRIDES_N, B_STRIDES_R,
                              STRIDE_ST, BLOCK_M, BLOCK_N, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q in tl.static_range(NUM_PROJ):   # each projection's K (its columns of dy, its rows of W) in turn,
        if q > 0:                          # added to the rounded sum before it, as GEMMs accumulating into
            acc = _round(acc, o_desc.dtype)   # one 16-bit buffer (beta = 1) round it
        for k0 in range(0, KS[q], BLOCK_K):   # (TMA zero-fills both operands past a projection's width)
            acc = tl.dot(dys[q].load([off_m, k0]), ws[q].load([k0, off_n]), acc)
    acc = _add_slices(acc, s_ptr, bs, off_m, off_n, T, 0, SLICE_PROJ, WIDTHS, COLS, SCOLS, RANKS, SCALES,
                      B_STRIDES_N, B_STRIDES_R, STRIDE_ST, NUM_SLICES, EPILOGUE_DOT, o_desc.dtype, True, BLOCK_M,
                      BLOCK_N, BLOCK_R, PRE, s_pre, bt_pre)
    o_desc.store([off_m, off_n], acc.to(o_desc.dtype))


@triton.jit
def _dy_descs(d0, d1, d2, d3, T, KS: tl.constexpr, D_STRIDES: tl.constexpr, NUM_PROJ: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each projection's dy descriptor, [BLOCK_M, BLOCK_K] blocks (past NUM_PROJ: the first one's, never read)."""
    dd0 = _desc(d0, T, KS[0], D_STRIDES[0], BLOCK_M, BLOCK_K)
    dd1, dd2, dd3 = dd0, dd0, dd0
    if NUM_PROJ > 1:
        dd1 = _desc(d1, T, KS[1], D_STRIDES[1], BLOCK_M, BLOCK_K)
    if NUM_PROJ > 2:
        dd2 = _desc(d2, T, KS[2], D_STRIDES[2], BLOCK_M, BLOCK_K)
    if NUM_PROJ > 3:
        dd3 = _desc(d3, T, KS[3], D_STRIDES[3], BLOCK_M, BLOCK_K)
    return dd0, dd1, dd2, dd3


@triton.jit
def _gemm_dx_kernel(d0, d1, d2, d3, w0, w1, w2, w3, o_ptr, h0, h1, h2, h3, s_ptr, b0, b1, b2, b3, b4, b5,
                    b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, x_ptr, da_ptr, T, H: tl.constexpr, KS: tl.constexpr,
                    D_STRIDES: tl.constexpr, W_STRIDES: tl.constexpr, NUM_PROJ: tl.constexpr, NUM_N_TILES: tl.constexpr,
                    SLICE_PROJ: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr,
                    RANKS: tl.constexpr, SCALES: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
                    STRIDE_ST: tl.constexpr, NUM_SLICES: tl.constexpr, EPILOGUE_DOT: tl.constexpr,
                    PREFETCH: tl.constexpr, NUM_PROGRAMS: tl.constexpr, TAIL_TILES: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                    HOST_DESC: tl.constexpr, X_STRIDE: tl.constexpr, DA_TILES: tl.constexpr, HEAVY: tl.constexpr,
                    FILL: tl.constexpr, DA_RANK: tl.constexpr, DA_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_NA: tl.constexpr, BLOCK_RA: tl.constexpr):
    # dx's descriptors made on the device from the pointer, whole and half tiles alike: dx is then the kernel's
    # one written argument (two host descriptors of dx would be two written arguments of one tensor, which a
    # traced graph's functional form clones apart; module docstring)
    o_desc = _desc(o_ptr, T, H, H, BLOCK_M, BLOCK_N)
    if HOST_DESC:   # dy's and W's made on the host (h0 .. h3: the half tiles' dy, None without TAIL_TILES)
        dys = (d0, d1, d2, d3)
        ws = (w0, w1, w2, w3)
    else:   # made once per program (projections past NUM_PROJ: the first one's, never read)
        dys = _dy_descs(d0, d1, d2, d3, T, KS, D_STRIDES, NUM_PROJ, BLOCK_M, BLOCK_K)
        wd0 = _desc(w0, KS[0], H, W_STRIDES[0], BLOCK_K, BLOCK_N)
        wd1, wd2, wd3 = wd0, wd0, wd0
        if NUM_PROJ > 1:
            wd1 = _desc(w1, KS[1], H, W_STRIDES[1], BLOCK_K, BLOCK_N)
        if NUM_PROJ > 2:
            wd2 = _desc(w2, KS[2], H, W_STRIDES[2], BLOCK_K, BLOCK_N)
        if NUM_PROJ > 3:
            wd3 = _desc(w3, KS[3], H, W_STRIDES[3], BLOCK_K, BLOCK_N)
        ws = (wd0, wd1, wd2, wd3)
    bs = (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    num_m = tl.cdiv(T, BLOCK_M)
    full = num_m * NUM_N_TILES - TAIL_TILES
    for tile in tl.range(tl.program_id(0), full, NUM_PROGRAMS):
        pid_m, pid_n = _tile_pids(tile, num_m, NUM_N_TILES, GROUP_M)
        _dx_tile(dys, ws, o_desc, s_ptr, bs, pid_m * BLOCK_M, pid_n * BLOCK_N, T, KS, NUM_PROJ, SLICE_PROJ, WIDTHS,
                 COLS, SCOLS, RANKS, SCALES, B_STRIDES_N, B_STRIDES_R, STRIDE_ST, NUM_SLICES, EPILOGUE_DOT, BLOCK_M,
                 BLOCK_N, BLOCK_K, BLOCK_R, PREFETCH)
    if TAIL_TILES > 0:   # the last, partial wave's tiles in halves of BLOCK_M // 2 rows (:func:`tail_tiles`)
        HALF_M: tl.constexpr = BLOCK_M // 2
        half_o = _desc(o_ptr, T, H, H, HALF_M, BLOCK_N)
        if HOST_DESC:
            half_dys = (h0, h1, h2, h3)
        else:
            half_dys = _dy_descs(d0, d1, d2, d3, T, KS, D_STRIDES, NUM_PROJ, HALF_M, BLOCK_K)
        for unit in tl.range(tl.program_id(0), 2 * TAIL_TILES, NUM_PROGRAMS):
            pid_m, pid_n = _tile_pids(full + unit // 2, num_m, NUM_N_TILES, GROUP_M)
            off_m = pid_m * BLOCK_M + (unit % 2) * HALF_M
            if off_m < T:   # (the last row tile's second half may lie past T)
                _dx_tile(half_dys, ws, half_o, s_ptr, bs, off_m, pid_n * BLOCK_N, T, KS, NUM_PROJ, SLICE_PROJ,
                         WIDTHS, COLS, SCOLS, RANKS, SCALES, B_STRIDES_N, B_STRIDES_R, STRIDE_ST, NUM_SLICES,
                         EPILOGUE_DOT, HALF_M, BLOCK_N, BLOCK_K, BLOCK_R, PREFETCH)
    if DA_TILES > 0:   # dA = dS^T x [DA_RANK, H], BLOCK_NA columns a tile, FILL tiles each on programs HEAVY ..
        first, last = _filled(tl.program_id(0), HEAVY, FILL, DA_TILES)   # (dx_schedule), every one over all T:
        for j in tl.range(first, last):                                   # each element written once, no sums
            _db_tile(x_ptr, X_STRIDE, s_ptr, STRIDE_ST, 0, da_ptr, 0, 1, H, H, 0, 0, 0, DA_RANK, 1.0, j, 0, T, T,
                     DA_PRECISION, BLOCK_T, BLOCK_NA, BLOCK_RA)


def dx_fusable(dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], num_groups: int) -> bool:
    """Whether :class:`GemmDx` runs x's gradient (host-side facts only; T from the device's
    :attr:`~fx_passes.ops.tuning.Tuning.train_fused_min_t`, as :func:`fusable`)."""
    if not dys or len(dys) != len(weights) or any(d.dtype != dys[0].dtype for d in dys):
        return False
    return (all(_tma_ok(d) for d in dys) and all(w.dim() == 2 and w.shape[1] == weights[0].shape[1] for w in weights)
            and _fits(dys[0].device, dys[0].dtype, dys[0].shape[0], weights, num_groups))


class GemmDx:
    """x's gradient through the frozen weights with x's LoRA gradient added in the epilogue, for one call
    signature (``ranks``: each A group's, side by side in ``ds``)::

        dx = dys[0] @ weights[0];  dx = round(dx + dys[p] @ weights[p]) for p = 1, 2, ..   (x's dtype)
        dx = round(dx + sum_g ds[:, group g] @ lora_a[g])                                  (the sum in fp32)

    the roundings of library GEMMs accumulating into one buffer, then of the expand kernel adding the LoRA
    part (what runs below ``train_fused_min_t``), with [T, H] written once where those re-read and re-wrote it
    once per projection after the first and once more for the LoRA part. fp32 adapters: the epilogue's
    bf16 hi + lo dots (:meth:`GemmExpand.epilogue_dot`). ``with_da``: plan dA = ds^T x on the lighter
    programs (:attr:`da_schedule`, None where :func:`dx_schedule` finds no room or the ranks' block is over
    :data:`DA_MAX_RANK_BLOCK`), run by :meth:`with_da`, with the dA kernel's semantics (fp32, the dots of
    :func:`~.lora_train.dot_precision`; :class:`~.lora_train.LoraDb` sums token splits, this one token tile
    after another)."""

    def __init__(self, ranks: Sequence[int], widths: Sequence[int], T: int, H: int, data_dtype: torch.dtype,
                 adapter_dtype: torch.dtype, device: torch.device, config: Optional[PrefillLaunch] = None,
                 epilogue_dot: Optional[str] = None, split_tail: bool = True, host_descriptors: bool = True,
                 with_da: bool = False):
        cfg = config or prefill_launch(device, data_dtype) or PrefillLaunch()
        self.cfg, self.T, self.H, self.widths = cfg, T, H, tuple(widths)
        self.host_descriptors = host_descriptors
        offs, R = _offsets(ranks)
        n_tiles = triton.cdiv(H, cfg.block_n)
        tiles = triton.cdiv(T, cfg.block_m) * n_tiles
        on_gpu, most = _max_programs(device, cfg)
        if split_tail:
            self.programs, self.tail = tail_tiles(tiles, most, cfg.block_m)
        else:   # whole tiles only (benchmarks)
            self.programs, self.tail = max(1, min(tiles, most)), 0
        # dA in the lighter programs' time (dx_schedule), where asked for, up to DA_MAX_RANK_BLOCK
        block_ra = rank_block([R]) if ranks else 0
        da = dx_schedule(tiles, self.tail, most, triton.cdiv(H, DA_BLOCK_N),
                         da_tile_cost(T, widths, block_ra, data_dtype, adapter_dtype, cfg)) \
            if with_da and ranks and block_ra <= DA_MAX_RANK_BLOCK and T else None
        self.da_schedule = da
        if da is not None:
            self.programs = da.programs
        g = len(ranks)
        self.meta = dict(H=H, KS=tuple(widths), NUM_PROJ=len(widths), NUM_N_TILES=n_tiles, SLICE_PROJ=(0,) * g,
                         WIDTHS=(H,) * g, COLS=(0,) * g, SCOLS=offs, RANKS=tuple(ranks), SCALES=(1.0,) * g,
                         NUM_SLICES=g, EPILOGUE_DOT=epilogue_dot or GemmExpand.epilogue_dot(adapter_dtype, on_gpu),
                         PREFETCH=prefetch_slices((0,) * g, 1, rank_block(ranks) if g else 16)[0],
                         NUM_PROGRAMS=self.programs, TAIL_TILES=self.tail, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=rank_block(ranks) if g else 16,
                         GROUP_M=cfg.group_m, HOST_DESC=host_descriptors, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, DA_TILES=da.fill_cap if da else 0,
                         HEAVY=da.heavy if da else 0, FILL=da.fill if da else 0, DA_RANK=R,
                         DA_PRECISION=dot_precision(data_dtype, adapter_dtype), BLOCK_T=DA_BLOCK_T,
                         BLOCK_NA=DA_BLOCK_N, BLOCK_RA=max(16, block_ra))
        self.launches = CompiledLaunches(_gemm_dx_kernel, device_descriptors=True)

    def __call__(self, dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], ds: torch.Tensor,
                 lora_a: Sequence[torch.Tensor], *, traced: bool = False) -> torch.Tensor:
        """``traced``: see :meth:`~.jit_helpers.CompiledLaunches.launch`; the kernel takes dy's and W's TMA
        descriptors made on the host (``host_descriptors=False``, benchmarks: made on the device)."""
        return self._run(dys, weights, ds, lora_a, None, traced)[0]

    def with_da(self, dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], ds: torch.Tensor,
                lora_a: Sequence[torch.Tensor], x: torch.Tensor, *, traced: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dx, dA)``: dx as the call, and ``dA = ds^T @ x`` [sum of ranks, H] in fp32 by the same launch (planned
        ``with_da`` and :attr:`da_schedule` not None)."""
        if self.da_schedule is None:
            raise ValueError("GemmDx.with_da: this plan runs no dA (planned without with_da, or dx_schedule "
                             "found no room for its tiles)")
        return self._run(dys, weights, ds, lora_a, x, traced)

    def _run(self, dys, weights, ds, lora_a, x, traced):
        dx = dys[0].new_empty((self.T, self.H))
        da = None if x is None else x.new_empty((ds.shape[1], self.H), dtype=torch.float32)
        if self.T == 0:
            return dx, (None if da is None else da.zero_())
        pad = (None,) * (MAX_PROJ - len(weights))
        bs = [a.t() for a in lora_a]   # B_g = A_g^T as a view: the epilogue reads [rank, BLOCK_N] of A_g's rows
        if self.host_descriptors:
            cfg = self.cfg
            half = (None,) * MAX_PROJ   # h0 .. h3
            if self.tail:
                half = (*[_host_desc(d, (cfg.block_m // 2, cfg.block_k)) for d in dys], *pad)
            args = (*[_host_desc(d, (cfg.block_m, cfg.block_k)) for d in dys], *pad,
                    *[_host_desc(w, (cfg.block_k, cfg.block_n)) for w in weights], *pad,
                    dx, *half, ds, *_b_slots(bs), x, da, self.T)
        else:
            args = (*dys, *pad, *weights, *pad, dx, *(None,) * MAX_PROJ, ds, *_b_slots(bs), x, da, self.T)
        key = (_strides(dys), _strides(weights), _strides(bs), _strides(bs, 1), ds.stride(0),
               None if x is None else x.stride(0))
        meta = dict(self.meta, D_STRIDES=key[0], W_STRIDES=key[1], B_STRIDES_N=key[2], B_STRIDES_R=key[3],
                    STRIDE_ST=key[4], X_STRIDE=key[5] or 0)
        if x is None:
            meta["DA_TILES"] = 0
        self.launches.launch(key, (self.programs,), args, meta,
                             (*dys, *weights, dx, ds, *lora_a, *(() if x is None else (x, da))), traced)
        return dx, da


# dA's tiles in the dx GEMM (dx_schedule): DA_BLOCK_T tokens a step, DA_BLOCK_N columns of x, the x side's ranks
# (every A group side by side) in one rank block of at most DA_MAX_RANK_BLOCK: the [128, 64] fp32 accumulator is 32
# registers a thread over the GEMM's 8 warps. At a rank block of 128 (two groups of rank 64) the dA tiles took 27B's
# dx GEMM at T 3072 to 1.06-1.08x its time where the dA kernel beside it cost 1.07x (two runs): no gain to take there.
DA_BLOCK_T = 64
DA_BLOCK_N = 128
DA_MAX_RANK_BLOCK = 64
# A dA tile's loop moves its bytes at 1 / DA_LOOP_SLOWDOWN the rate of the GEMM's K loop on one SM (plain loads of x
# and dS, dS split into bf16 parts and three dots a step, against TMA loads and one dot): 24 vs 61 GB/s per SM on an
# H200, from the dx GEMM's time with dA tiles on its lighter programs at 35B-A3B T 6144 / 12288, beside the GEMM's
# last wave (benchmarks/RESULTS.md v30). By loads alone (1.0) 2 dA tiles a program at T 6144 took the dx GEMM to
# 1.07-1.10x its time, where the dA kernel beside it cost 1.03x. (Loading each step's tiles one step ahead, or x's
# by TMA, was slower still.)
DA_LOOP_SLOWDOWN = 2.6


def da_tile_cost(T: int, widths: Sequence[int], block_ra: int, data_dtype: torch.dtype, ds_dtype: torch.dtype,
                 cfg: PrefillLaunch) -> float:
    """A dA tile's time as a share of a dx tile's: what their loops load (as :func:`narrow_tile_cost`), x's
    [DA_BLOCK_T, DA_BLOCK_N] and dS's [DA_BLOCK_T, block_ra] tiles over T against dy's and W's tiles over every
    projection's K, times :data:`DA_LOOP_SLOWDOWN`. 0.21 at 35B-A3B's widths, T 2048 and two A groups of rank
    16 (16 tiles of 128 columns beside 128 dx tiles)."""
    elt = data_dtype.itemsize
    da = triton.cdiv(T, DA_BLOCK_T) * DA_BLOCK_T * (DA_BLOCK_N * elt + block_ra * ds_dtype.itemsize)
    dx = sum(triton.cdiv(k, cfg.block_k) for k in widths) * (cfg.block_m + cfg.block_n) * cfg.block_k * elt
    return DA_LOOP_SLOWDOWN * da / max(1, dx)


def gemm_dx(dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], ds: torch.Tensor,
            lora_a: Sequence[torch.Tensor], *, config: Optional[PrefillLaunch] = None) -> torch.Tensor:
    """:class:`GemmDx` planned and launched once (tests, benchmarks)."""
    return GemmDx([a.shape[0] for a in lora_a], [w.shape[0] for w in weights], dys[0].shape[0], weights[0].shape[1],
                  dys[0].dtype, ds.dtype, dys[0].device, config)(dys, weights, ds, lora_a)
