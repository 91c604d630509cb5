"""The LoRA half of ``fx_passes::qkvz_lora_train`` and its backward ops on a GPU (semantics:
:mod:`fx_passes.ops.qkvz_lora_train`): kernels around the library GEMMs, each reading the [T, N] (or [T, H])
tensor it works on once, in its own 16-bit dtype, where the unfused graph makes fp32 copies of it and reads
them two or three times.

Forward, after the base GEMMs wrote ``outs`` (one per projection, x's dtype) and the shrink ``s[g]``::

    _expand_add_kernel   outs[p][:, slice i] = round(outs[p][:, slice i] + scales[i] * s[slice_a[i]] @ B_i^T)

grid ``(cdiv(T, BLOCK_M), column tiles of all slices)``: the sum in fp32, rounded once per slice, as
PEFT's ``result + lora_B(lora_A(x)) * scaling`` then ``.to(x.dtype)``. Slices over the same columns (two
adapters on one projection) go to successive launches, in slice order (:func:`overlap_waves`).

Backward, given ``dy_p`` = the outputs' gradients (x's dtype)::

    _ds_kernel   part[c] = scales[i] * dy[:, chunk c of slice i] @ B_i[chunk c]     dS[g] = sum of g's chunks
    _db_kernel   part[p, rows of i] = scales[i] * dy[T-split p, slice i]^T @ s[g]   dB_i = sum over p

Both split their reduction (the columns of a group, the tokens) into fixed chunks written to an fp32
buffer and summed by torch afterwards: deterministic (no atomics), and enough programs to fill the GPU at
T 2048 where one program per token tile (dS) or per column tile (dB) would not. dy is multiplied in the
adapters' dtype (fp32 adapters: an exact upcast).

The same two kernels serve the LoRA input's side when it is x itself (no dropout; :func:`shrink`,
:func:`input_grads`): ``x @ A^T`` is the dS kernel over x's H columns with B = A^T, ``dA^T = x^T @ dS`` the
dB kernel, and x's LoRA gradient ``dS @ A`` the expand kernel adding into x's gradient: x is cast to the
adapters' dtype in registers, never written as an fp32 [T, H] copy.

fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32`` (:func:`fp32_dot_precision`): fp32-level
accuracy (``tf32x3``) by default, like the ``torch.mm`` calls of the unfused graph; TF32 where the user
allowed it for every matmul.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fx_passes.ops.kernels.jit_helpers import on_device, tile_owner

@dataclasses.dataclass(frozen=True)
class TrainLaunch:
    """One kernel's tiles: ``block_m`` tokens x ``block_n`` columns, its warps and pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


EXPAND_LAUNCH = TrainLaunch(64, 128)
DS_LAUNCH = TrainLaunch(64, 64)
DB_LAUNCH = TrainLaunch(64, 64)

# One program of _ds_kernel walks this many columns of one slice: 8 chunks for a 27B layer's 16384
# columns, so with 64-token tiles T 2048 still starts 32 x 8 programs.
DS_CHUNK = 2048
# _db_kernel splits the tokens so that there are at least this many programs per SM.
DB_PROGRAMS_PER_SM = 2


def fp32_dot_precision() -> str:
    """``tl.dot``'s precision for fp32 operands, after this process's setting for ``torch.mm``: TF32 where
    allowed, else three TF32 products per product (``tf32x3``: fp32-level error, ~2^-22 relative, on the
    tensor cores; exact fp32 FMA dots made these kernels 2-3x slower than their memory traffic)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def rank_block(ranks: Sequence[int]) -> int:
    return max(16, triton.next_power_of_2(max(ranks)))


def overlap_waves(slice_start: Sequence[int], widths: Sequence[int]) -> list[list[int]]:
    """Slices grouped into launches that write disjoint columns, each slice after every earlier one over
    the same columns (so each column sees its slices' sums in slice order)."""
    wave_of: list[int] = []
    for i, (start, n) in enumerate(zip(slice_start, widths)):
        w = 0
        for j in range(i):
            if slice_start[j] < start + n and start < slice_start[j] + widths[j]:
                w = max(w, wave_of[j] + 1)
        wave_of.append(w)
    return [[i for i, w in enumerate(wave_of) if w == wave] for wave in range(max(wave_of) + 1)]


# --------------------------------------------------------------------------------------------
# forward: out += scale * s @ B^T
# --------------------------------------------------------------------------------------------
@triton.jit
def _expand_add_tile(out_ptr, src_ptr, stride_src, s_ptr, stride_st, b_ptr, stride_bn, n, col_start, rank, scale,
                     tile_n, pid_m, T, stride_ot, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = offs_m.to(tl.int64)
    m_mask = offs_m < T
    n_mask = offs_n < n
    r_mask = offs_r < rank
    s = tl.load(s_ptr + rows64[:, None] * stride_st + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                other=0.0)
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None],
                 other=0.0)   # [BLOCK_R, BLOCK_N] = B^T
    delta = tl.dot(s, bt, input_precision=DOT_PRECISION) * scale
    cols = (col_start + offs_n)[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    o = tl.load(src_ptr + rows64[:, None] * stride_src + cols, mask=o_mask, other=0.0)
    tl.store(out_ptr + rows64[:, None] * stride_ot + cols, (o.to(tl.float32) + delta.to(tl.float32))
             .to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _expand_add_kernel(out_ptrs, out_strides, src_ptrs, src_strides, s_ptrs, s_strides, b_ptrs, b_strides, b_n, b_start, b_rank, scales,
                       tile_off, T, NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sl = tile_owner(pid_n, tile_off, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):   # separate tensors per slice: a branch each, unrolled
        if sl == i:
            _expand_add_tile(out_ptrs[i], src_ptrs[i], src_strides[i], s_ptrs[i], s_strides[i], b_ptrs[i], b_strides[i], b_n[i], b_start[i],
                             b_rank[i], scales[i], pid_n - tile_off[i], pid_m, T, out_strides[i],
                             DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def _tiles(widths: Sequence[int], block: int) -> tuple[tuple[int, ...], int]:
    off, total = [], 0
    for n in widths:
        off.append(total)
        total += triton.cdiv(n, block)
    return tuple(off), total


def _precision(dtype: torch.dtype) -> str:
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"   # ignored for 16-bit operands


def expand_add_(outs: Sequence[torch.Tensor], s: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                slice_a: Sequence[int], owners: Sequence[tuple[int, int]], slice_start: Sequence[int],
                scales: Sequence[float], *, srcs: Optional[Sequence[torch.Tensor]] = None,
                launch: Optional[TrainLaunch] = None) -> None:
    """``outs[p][:, slice i] = round(srcs[p][:, slice i] + scales[i] * s[slice_a[i]] @ lora_b[i]^T)`` for every
    slice (``srcs``: default ``outs``, in place; else the slices' columns read from there, written to
    ``outs``); ``owners[i] = (p, first column of slice i in outs[p])``, ``slice_start``: the slices' columns
    over all outputs (which overlap). Arguments checked by the op."""
    srcs = outs if srcs is None else srcs
    T = outs[0].shape[0]
    if T == 0:
        return
    cfg = launch or EXPAND_LAUNCH
    block_m, block_n = cfg.block_m, cfg.block_n
    block_r = rank_block([b.shape[1] for b in lora_b])
    with on_device(outs[0]):
        for wave in overlap_waves(slice_start, [b.shape[0] for b in lora_b]):
            bs = [lora_b[i] for i in wave]
            ss = [s[slice_a[i]] for i in wave]
            os_ = [outs[owners[i][0]] for i in wave]
            src = [srcs[owners[i][0]] for i in wave]
            tile_off, n_tiles = _tiles([b.shape[0] for b in bs], block_n)
            _expand_add_kernel[(triton.cdiv(T, block_m), n_tiles)](
                tuple(os_), tuple(o.stride(0) for o in os_), tuple(src), tuple(t.stride(0) for t in src), tuple(ss), tuple(t.stride(0) for t in ss), tuple(bs),
                tuple(b.stride(0) for b in bs), tuple(b.shape[0] for b in bs), tuple(owners[i][1] for i in wave),
                tuple(b.shape[1] for b in bs), tuple(float(scales[i]) for i in wave), tile_off, T,
                NUM_SLICES=len(wave), DOT_PRECISION=_precision(bs[0].dtype),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )


# --------------------------------------------------------------------------------------------
# backward: dS per A group
# --------------------------------------------------------------------------------------------
@triton.jit
def _ds_chunk(dy_ptr, part_ptr, b_ptr, stride_bn, n, col_start, rank, scale, chunk, pid_m, pid_c,
              T, stride_dt, stride_pc, stride_pt, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = offs_m.to(tl.int64)
    m_mask = offs_m < T
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    c_lo = chunk * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, n)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < c_hi
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dt + (col_start + offs_n)[None, :],
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0)
        acc = tl.dot(dy.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    tl.store(part_ptr + pid_c * stride_pc + rows64[:, None] * stride_pt + offs_r[None, :], acc * scale,
             mask=m_mask[:, None])


@triton.jit
def _ds_kernel(dy_ptrs, dy_strides, part_ptr, b_ptrs, b_strides, b_n, b_start, b_rank, scales, chunk_off,
               T, stride_pc, stride_pt, NUM_SLICES: tl.constexpr, CHUNK: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    sl = tile_owner(pid_c, chunk_off, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _ds_chunk(dy_ptrs[i], part_ptr, b_ptrs[i], b_strides[i], b_n[i], b_start[i], b_rank[i], scales[i],
                      pid_c - chunk_off[i], pid_m, pid_c, T, dy_strides[i], stride_pc, stride_pt,
                      CHUNK, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def lora_ds(dys: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slice_a: Sequence[int],
            owners: Sequence[tuple[int, int]], scales: Sequence[float], ranks: Sequence[int], *,
            chunk: int = DS_CHUNK, launch: Optional[TrainLaunch] = None) -> list[torch.Tensor]:
    """``dS[g] = sum over the slices i of group g of scales[i] * dy_i @ lora_b[i]`` ([T, r_g], the adapters'
    dtype; ``dy_i``: the columns of slice i in ``dys[owners[i][0]]`` from ``owners[i][1]``); ``ranks[g]``:
    group g's rank; ``chunk``: columns per program (tests force small)."""
    T = dys[0].shape[0]
    dy_s = [dys[p] for p, _ in owners]
    ad = lora_b[0].dtype
    cfg = launch or DS_LAUNCH
    block_m, block_n = cfg.block_m, cfg.block_n
    block_r = rank_block(ranks)
    chunk_off, n_chunks = _tiles([b.shape[0] for b in lora_b], chunk)
    part = torch.empty((n_chunks, T, block_r), dtype=torch.float32, device=dys[0].device)
    if T > 0:
        with on_device(dys[0]):
            _ds_kernel[(triton.cdiv(T, block_m), n_chunks)](
                tuple(dy_s), tuple(d.stride(0) for d in dy_s), part, tuple(lora_b), tuple(b.stride(0) for b in lora_b),
                tuple(b.shape[0] for b in lora_b), tuple(c for _, c in owners), tuple(b.shape[1] for b in lora_b),
                tuple(float(c) for c in scales), chunk_off, T, part.stride(0), part.stride(1),
                NUM_SLICES=len(lora_b), CHUNK=chunk, DOT_PRECISION=_precision(ad),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
    ends = list(chunk_off[1:]) + [n_chunks]
    out = []
    for g, r in enumerate(ranks):
        mine = [c for i in range(len(lora_b)) if slice_a[i] == g for c in range(chunk_off[i], ends[i])]
        if not mine:
            out.append(torch.zeros((T, r), dtype=ad, device=part.device))
        elif len(mine) == 1:   # its own tensor: the op's outputs may not alias each other
            out.append(part[mine[0], :, :r].to(ad, copy=True))
        else:   # a group's slices are usually adjacent (q | k | v): its chunks one range, summed without a gather
            rows = part[mine[0]:mine[-1] + 1] if mine == list(range(mine[0], mine[-1] + 1)) else part[mine]
            out.append(rows.sum(0)[:, :r].to(ad))
    return out


# --------------------------------------------------------------------------------------------
# backward: dB per slice
# --------------------------------------------------------------------------------------------
@triton.jit
def _db_tile(dy_ptr, s_ptr, stride_st, part_ptr, n, col_start, row0, rank, scale, tile_n, pid_s,
             T, t_per_split, stride_dt, stride_ps, stride_pn, DOT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    t_lo = pid_s * t_per_split
    t_hi = tl.minimum(t_lo + t_per_split, T)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        offs_m = t0 + tl.arange(0, BLOCK_M)
        rows64 = offs_m.to(tl.int64)
        m_mask = offs_m < t_hi
        dyt = tl.load(dy_ptr + rows64[None, :] * stride_dt + (col_start + offs_n)[:, None],
                      mask=n_mask[:, None] & m_mask[None, :], other=0.0)   # [BLOCK_N, BLOCK_M] = dy^T
        s = tl.load(s_ptr + rows64[:, None] * stride_st + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0)
        acc = tl.dot(dyt.to(s.dtype), s, acc, input_precision=DOT_PRECISION)
    tl.store(part_ptr + pid_s * stride_ps + (row0 + offs_n)[:, None].to(tl.int64) * stride_pn + offs_r[None, :],
             acc * scale, mask=n_mask[:, None])


@triton.jit
def _db_kernel(dy_ptrs, dy_strides, part_ptr, s_ptrs, s_strides, b_n, b_start, b_row, b_rank, scales, tile_off,
               T, t_per_split, stride_ps, stride_pn, NUM_SLICES: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    sl = tile_owner(pid_n, tile_off, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _db_tile(dy_ptrs[i], s_ptrs[i], s_strides[i], part_ptr, b_n[i], b_start[i], b_row[i], b_rank[i],
                     scales[i], pid_n - tile_off[i], pid_s, T, t_per_split, dy_strides[i], stride_ps, stride_pn,
                     DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def lora_db(dys: Sequence[torch.Tensor], s: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
            slice_a: Sequence[int], owners: Sequence[tuple[int, int]], scales: Sequence[float],
            sms: int, *, launch: Optional[TrainLaunch] = None,
            programs_per_sm: int = DB_PROGRAMS_PER_SM) -> list[torch.Tensor]:
    """``dB_i = scales[i] * dy_i^T @ s[slice_a[i]]`` ([n_i, r], the adapters' dtype; ``dy_i`` as in
    :func:`lora_ds`); ``sms``: the device's SM count (how far the tokens are split)."""
    T = dys[0].shape[0]
    dy_s = [dys[p] for p, _ in owners]
    ad = lora_b[0].dtype
    cfg = launch or DB_LAUNCH
    block_m, block_n = cfg.block_m, cfg.block_n
    block_r = rank_block([b.shape[1] for b in lora_b])
    tile_off, n_tiles = _tiles([b.shape[0] for b in lora_b], block_n)
    splits = max(1, min(triton.cdiv(programs_per_sm * sms, n_tiles), triton.cdiv(T, 8 * block_m)))
    t_per_split = triton.cdiv(triton.cdiv(T, splits), block_m) * block_m
    splits = max(1, triton.cdiv(T, t_per_split))
    rows = [0]
    for b in lora_b:
        rows.append(rows[-1] + b.shape[0])
    # every split writes every row of its tiles (no T: no split runs, and dB is 0)
    part = (torch.empty if T > 0 else torch.zeros)((splits, rows[-1], block_r), dtype=torch.float32,
                                                   device=dys[0].device)
    if T > 0:
        ss = [s[g] for g in slice_a]
        with on_device(dys[0]):
            _db_kernel[(n_tiles, splits)](
                tuple(dy_s), tuple(d.stride(0) for d in dy_s), part, tuple(ss), tuple(t.stride(0) for t in ss),
                tuple(b.shape[0] for b in lora_b), tuple(c for _, c in owners), tuple(rows[:-1]),
                tuple(b.shape[1] for b in lora_b), tuple(float(c) for c in scales), tile_off, T, t_per_split,
                part.stride(0), part.stride(1), NUM_SLICES=len(lora_b), DOT_PRECISION=_precision(ad),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
    return [part[:, rows[i]:rows[i + 1], :b.shape[1]].sum(0).to(ad) for i, b in enumerate(lora_b)]


# --------------------------------------------------------------------------------------------
# the LoRA input's side, when it is x itself in 16 bits (no dropout) under fp32 adapters
# --------------------------------------------------------------------------------------------
def _as_slices(lora_a: Sequence[torch.Tensor]):
    """The A groups as the kernels' slices over the H columns of one input: B_g = A_g^T ([H, r], contiguous)."""
    n = len(lora_a)
    return [a.t().contiguous() for a in lora_a], list(range(n)), [(0, 0)] * n, [1.0] * n


def shrink(xs: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``s[g] = xs[g] @ lora_a[g]^T`` in the adapters' dtype, xs cast in registers (the ``dS`` kernel over
    the H columns: ``x @ A^T`` is ``dy @ B`` with B = A^T); one launch per distinct input tensor."""
    out: list = [None] * len(xs)
    for g0, xg in enumerate(xs):
        if out[g0] is not None:
            continue
        groups = [g for g in range(len(xs)) if xs[g] is xg]
        a_t, slice_a, owners, ones = _as_slices([lora_a[g] for g in groups])
        for g, sg in zip(groups, lora_ds([xg], a_t, slice_a, owners, ones, [lora_a[g].shape[0] for g in groups])):
            out[g] = sg
    return out


def input_grads(x: torch.Tensor, ds: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor],
                d_x: Optional[torch.Tensor], sms: int) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """For A groups whose LoRA input is ``x``: ``dA_g = ds_g^T @ x`` (the dB kernel over x's H columns,
    as ``(x^T @ ds_g)^T``) and, given ``d_x``, ``round(d_x + sum_g ds_g @ A_g)`` as a new tensor (the expand
    kernel over x's columns: every group side by side as one slice of rank sum r_g, one launch)."""
    a_t, slice_a, owners, ones = _as_slices(lora_a)
    d_a = [t.t().contiguous() for t in lora_db([x], ds, a_t, slice_a, owners, ones, sms)]
    if d_x is None:
        return d_a, None
    new = torch.empty_like(d_x)
    ds_all = ds[0] if len(ds) == 1 else torch.cat(list(ds), 1)
    a_all = a_t[0] if len(a_t) == 1 else torch.cat(a_t, 1)
    expand_add_([new], [ds_all], [a_all], [0], [(0, 0)], [0], [1.0], srcs=[d_x])
    return d_a, new
