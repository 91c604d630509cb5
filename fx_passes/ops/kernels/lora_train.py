"""The LoRA half of ``fx_passes::qkvz_lora_train`` and its backward op on a GPU (semantics:
:mod:`fx_passes.ops.qkvz_lora_train`): kernels around the library GEMMs, each reading the [T, N] (or [T, H])
tensor it works on once, in its own 16-bit dtype, where the unfused graph makes fp32 copies of it and reads
them two or three times.

Every kernel takes the LoRA as :class:`Slices`: slice ``i`` covers columns ``[col_i, col_i + width_i)`` of
its own [T, *] tensor (an output, an output's gradient, x), its B is ``[width_i, rank_i]`` (any strides:
``A^T`` is read as a view, never copied) and its rank-``rank_i`` factor is columns ``[scol_i, scol_i +
rank_i)`` of ONE [T, R] tensor ``s`` holding every A group side by side. Forward, after the base GEMMs wrote
``outs`` and the shrink wrote ``s``::

    _expand_add_kernel   out_i[:, slice i] = round(src_i[:, slice i] + scale_i * s[:, scols i] @ B_i^T)

grid ``(cdiv(T, BLOCK_M), column tiles of all slices)``: the sum in fp32, rounded once per slice, as
PEFT's ``result + lora_B(lora_A(x)) * scaling`` then ``.to(x.dtype)``. Slices over the same columns of one
tensor (two adapters on one projection) go to successive launches, in slice order (:func:`overlap_waves`).

Backward, given ``dy`` = the outputs' gradients (x's dtype)::

    _dsdb_kernel       dspart[t, :, :r_i] = scale_i * dy[:, tile t of slice i] @ B_i[tile t]
                       dbpart[p, rows i]  = scale_i * dy[T-split p, slice i's tile]^T @ s[:, scols i]
    _part_sums_kernel  dS[:, group g] = sum of the rows of g's tiles      dB_i = dbpart[:, rows i].sum(0)

one program per (column tile of a slice, token split), each [block_m, block_n] tile of dy loaded once for
both products: the two kernels it replaces, ``_ds_kernel`` (dS over column chunks) and ``_db_kernel`` (dB
over token splits), each reading dy once, took 1.04-1.48x its time. Every reduction is split (the columns
of a group, the tokens) into fixed parts written to an fp32 buffer and summed after the kernel, all of them
by one launch (:class:`PartSums`): deterministic (no atomics), and enough programs to fill the GPU at T 2048
where one program per token tile (dS) or per column tile (dB) would not. dy is multiplied with fp32
adapters' factors at fp32-level precision (:func:`dot_precision`). ``_ds_kernel`` still runs where no dB is
asked for.

The same kernels serve the LoRA input's side when it is x itself (no dropout): the shrink ``x @ A^T`` is
the dS kernel over x's H columns with B = A^T, ``dA = dS^T x`` the dB kernel with its partial sums
transposed, and x's LoRA gradient ``dS @ A`` the expand kernel adding into x's gradient: x is read in its
own dtype, never written as an fp32 [T, H] copy.

fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32``: fp32-level accuracy by default, like the
``torch.mm`` calls of the unfused graph (``bf16x3`` for a bf16 tensor times an fp32 factor, ``tf32x3``
otherwise: :func:`dot_precision`); TF32 where the user allowed it for every matmul.

Host cost: at T <= 4096 a training step's time is the host's (a 35B-A3B layer's GPU work is ~1.3 ms at T
4096), so each kernel has a class (:class:`ExpandAdd`, :class:`LoraDs`, :class:`LoraDb`, :class:`LoraDsDb`)
that plans its launches for one call signature (waves, tile and chunk offsets, splits) and launches
through :class:`~.jit_helpers.CompiledLaunches`; the ops keep them in their per-signature plans. The
functions (:func:`expand_add_`, :func:`lora_ds`, :func:`lora_db`, :func:`lora_dsdb`) plan and launch once.
With ``traced=True`` a class records its launches through ``torch.library.wrap_triton`` instead (the ops'
bodies traced for Inductor): hence the flat pointer arguments (:data:`MAX_TENSORS`, :data:`MAX_SLICES`).
Launches run on the current CUDA device (the ops make the tensors' device current).
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fx_passes.ops.kernels.jit_helpers import CompiledLaunches, tile_owner


@dataclasses.dataclass(frozen=True)
class TrainLaunch:
    """One kernel's tiles: ``block_m`` tokens x ``block_n`` columns, its warps and pipeline stages;
    ``resident``: how many of its programs an SM holds at once (by its shared memory and registers, compiled
    for an H200), the slots of :func:`dsdb_splits`' model."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    resident: int = 1


EXPAND_LAUNCH = TrainLaunch(64, 128)
# The op runs LoraDs for the shrink over x (and for dS alone where no dB is asked for), LoraDb for dA over x,
# LoraDsDb for dS + dB over dy. Tiles: of a sweep's candidates, the one whose time is closest to each
# cell's best in the worst cell (benchmarks/sweep_train_kernels.py; RESULTS.md has the cells).
DS_LAUNCH = TrainLaunch(64, 64, 4, 4)
DB_LAUNCH = TrainLaunch(32, 128)
# dS + dB: 256-column tiles halve dS's partial sums (one [T, rank] fp32 row per tile) against 128.
DSDB_LAUNCH = TrainLaunch(64, 256, 4, 2, resident=2)   # 110.6 KB of shared memory of 227, 255 registers
# ... up to this many tile elements of B (block_n x rank block): B's three bf16 parts stay in shared memory
# beside the pipelined dy and s tiles, 96 KB of them (256-column tiles at a rank block of 128 asked for 336 KB,
# an H200 has 227 KB per block).
DSDB_MAX_B_TILE = 256 * 64
# Ranks 33 - 64 (rank block 64): 128-column tiles over 8 warps, 3 stages. The 256 x 64 tile fits, but B's three
# parts (96 KB) and the [256, 64] fp32 dB accumulator leave 4 warps spilling registers: 0.73-0.91x its time
# at 35B-A3B / 27B widths, T 2048 - 8192, one cell 1.00x (benchmarks/RESULTS.md: "dS + dB tiles per rank").
# (Rank block 128 keeps the capped default: 3 stages there exceed shared memory.)
DSDB_RANK64_LAUNCH = TrainLaunch(64, 128, 8, 3, resident=1)   # 155.6 KB
# Ranks 17 - 32 (rank block 32): 128-column tiles over 4 warps, 3 stages: 0.79-0.97x the default's time at
# 35B-A3B / 27B widths, T 2048 / 8192, and the best launch of the sweep in every held-out cell (397B-A17B / 27B,
# T 1024 / 3072 / 6144: 0.73-0.86x). With rank 16's 256 x 16 and rank 64's 128 x 64 over 8 warps, B's tile
# stays at 4096 elements per 4 warps.
DSDB_RANK32_LAUNCH = TrainLaunch(64, 128, 4, 3, resident=2)   # 102.4 KB

# One program of _ds_kernel walks this many columns of one slice: 8 chunks for a 27B layer's 16384
# columns, so with 64-token tiles T 2048 still starts 32 x 8 programs.
DS_CHUNK = 2048
# ... halved (down to DS_MIN_CHUNK) while the grid has fewer than DS_PROGRAMS_PER_SM programs per SM: the
# shrink over x walks only H columns (2048-5120 at Qwen3.5's widths), 32-96 programs at T 2048 in 2048-column
# chunks, which left most of an H200's 132 SMs idle (:func:`ds_chunk`).
DS_MIN_CHUNK = 256
DS_PROGRAMS_PER_SM = 2
# _db_kernel splits the tokens so that there are at least this many programs per SM (each walks its split
# one token tile after another): by the same sweep, dA over x within 6 % of each cell's best with 8 (2: up to
# 1.3x slower).
DB_PROGRAMS_PER_SM = 8
# _dsdb_kernel's token splits come from a model of its programs on the SMs (:func:`dsdb_splits`), in units of
# one token tile's step of a program alone on its SM: with two programs on an SM each step takes
# DSDB_SHARED_STEP of that (the loop waits on every tile it loads: a second program hides part of the wait),
# and every program pays DSDB_PROGRAM_COST steps once (B's parts, its first loads, dB's store). Fitted to the
# 64 x 256 tiles at T 2048 (2.4 / 3.3 / 1.0 us on an H200: 35B-A3B, 27B and 397B-A17B widths, 2 - 16
# splits; benchmarks/RESULTS.md v31), where "at least 4 programs per SM, 8 token tiles each" took 1.19x /
# 1.00x / 1.21x the best split's time; held out (T 1024 - 12288, ranks 16 - 64) 0.78-1.00x that rule's.
DSDB_SHARED_STEP = 1.375
DSDB_PROGRAM_COST = 0.42
# ... over split counts up to this many waves of programs (each split adds a [sum of widths, rank] fp32
# plane of dB's partial sums).
DSDB_MAX_WAVES = 4
# PartSums: elements per program, halved (down to 256) while the grid has fewer programs per SM than this. Each
# program walks its rows 4 loads at a time (dS: 32-96 rows, one per column tile), so the programs in flight set
# the bandwidth: at rank 32 (128-column tiles, more rows) 4 per SM of 1024 elements took up to 1.6x the time of 8
# (benchmarks/RESULTS.md: "PartSums").
PART_SUMS_TILE = 1024
PART_SUMS_PROGRAMS_PER_SM = 8
# bf16x3's parts side by side in one dot (:func:`parts_side_by_side`) up to this many columns: _dsdb_kernel at rank
# 16 (64 columns) took 0.78-0.83x the time of three dots (27B, 35B-A3B, 397B-A17B widths, T 2048 / 6144), at
# rank 32 (128 columns) 0.98-1.04x, and two dots (hi | mid, then lo) 1.07-1.18x at ranks 16-64; held out, T 3072 /
# 12288: 0.78-0.82x (benchmarks/RESULTS.md v28: "dS + dB multiply bf16x3's three parts in one dot").
PARTS_SIDE_BY_SIDE_MAX = 64


@dataclasses.dataclass(frozen=True)
class Slices:
    """The LoRA slices one launch works on, without tensors. Slice ``i``: columns ``[col[i], col[i] +
    width[i])`` of its [T, *] tensor, rank ``rank[i]`` read from columns ``[scol[i], scol[i] + rank[i])`` of
    ``s``, scale ``scale[i]``."""
    width: tuple[int, ...]
    col: tuple[int, ...]
    scol: tuple[int, ...]
    rank: tuple[int, ...]
    scale: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.width)

    def pick(self, idx: Sequence[int]) -> "Slices":
        return Slices(*(tuple(getattr(self, f.name)[i] for i in idx) for f in dataclasses.fields(self)))


def fp32_dot_precision() -> str:
    """``tl.dot``'s precision for fp32 operands, after this process's setting for ``torch.mm``: TF32 where
    allowed, else three TF32 products per product (``tf32x3``: fp32-level error, ~2^-22 relative, on the
    tensor cores; exact fp32 FMA dots made these kernels 2-3x slower than their memory traffic)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def dot_precision(data_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """How a kernel multiplies its [T, *] tensor (``data_dtype``: an output, its gradient, x) with the
    adapters' factors. 16-bit adapters: plain 16-bit dots. fp32 adapters: :func:`fp32_dot_precision`, except
    ``"bf16x3"`` for bf16 data at fp32-level precision: the fp32 factor as three bf16 parts (hi + mid + lo:
    24 bits, its full mantissa) in three bf16 dots whose products are exact in the fp32 accumulator, the
    bf16 tensor never converted. ``tf32x3`` on the same tiles converts and splits every element of the
    [T, *] tile and issues three TF32 products of half the bf16 rate: the kernels ran at 35-60 % of
    memory bandwidth with it. (fp16 data keeps ``tf32x3``: the mid / lo parts of a small fp32 factor
    fall into fp16's subnormals.)"""
    if adapter_dtype != torch.float32:
        return "tf32"   # ignored: both operands 16-bit
    precision = fp32_dot_precision()
    return "bf16x3" if precision == "tf32x3" and data_dtype == torch.bfloat16 else precision


def parts_side_by_side(precision: str, block_r: int) -> str:
    """``"bf16x3_cat"`` for ``"bf16x3"`` where the three parts of a rank block side by side (and a zero
    block: 4 x ``block_r`` columns) fit :data:`PARTS_SIDE_BY_SIDE_MAX`: one dot per product then reads the
    [T, *] tile from shared memory once, where three dots of ``block_r`` columns read it three times. Else
    ``precision``."""
    return "bf16x3_cat" if precision == "bf16x3" and 4 * block_r <= PARTS_SIDE_BY_SIDE_MAX else precision


@triton.jit
def _bf16_parts(v):
    """fp32 ``v`` as hi + mid + lo in bf16 (each part the rounding of what the others leave)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _parts_side_by_side(hi, mid, lo):
    """[rows, 4 r]: ``hi | mid | lo | 0`` (``"bf16x3_cat"``: one dot multiplies all three parts)."""
    rows: tl.constexpr = hi.shape[0]
    r: tl.constexpr = hi.shape[1]
    both = tl.join(tl.join(hi, mid), tl.join(lo, tl.zeros_like(lo)))   # [rows, r, part in pair, pair]
    return tl.reshape(tl.permute(both, (0, 3, 2, 1)), (rows, 4 * r))


@triton.jit
def _sum_side_by_side(p):
    """A product with :func:`_parts_side_by_side`'s factor, [rows, 4 r] -> (mid + lo) + hi, [rows, r]."""
    rows: tl.constexpr = p.shape[0]
    r: tl.constexpr = p.shape[1] // 4
    pair0, pair1 = tl.split(tl.permute(tl.reshape(p, (rows, 2, 2, r)), (0, 3, 2, 1)))
    hi, mid = tl.split(pair0)
    lo, _ = tl.split(pair1)
    return (mid + lo) + hi


@triton.jit
def _factor_parts(b, DOT_PRECISION: tl.constexpr):
    """An adapters' factor as :func:`_dot_parts` takes it (hoisted out of a loop where the factor is
    fixed): its three bf16 parts for ``"bf16x3"``, the three side by side (three times) for
    ``"bf16x3_cat"``, else the factor itself three times."""
    if DOT_PRECISION == "bf16x3":
        hi, mid, lo = _bf16_parts(b)
    elif DOT_PRECISION == "bf16x3_cat":
        hi, mid, lo = _bf16_parts(b)
        hi = _parts_side_by_side(hi, mid, lo)
        mid = hi
        lo = hi
    else:
        hi = b
        mid = b
        lo = b
    return hi, mid, lo


@triton.jit
def _dot_parts(a, hi, mid, lo, acc, DOT_PRECISION: tl.constexpr):
    """:func:`_dot_data` over a factor already split by :func:`_factor_parts`."""
    if DOT_PRECISION == "bf16x3":
        acc += tl.dot(a, hi, tl.dot(a, lo, tl.dot(a, mid)))
    elif DOT_PRECISION == "bf16x3_cat":
        acc += _sum_side_by_side(tl.dot(a, hi))
    else:
        acc = tl.dot(a.to(hi.dtype), hi, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_data(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b``: ``a`` a tile of the [T, *] tensor (its own dtype), ``b`` one of the adapters'
    factors (:func:`dot_precision`). For ``"bf16x3"`` the tile's products go into a chain of their own
    (the small parts first), then into ``acc`` by an fp32 add: the tensor cores' fp32 sums drop bits
    (truncation) of the terms they align to a much larger total, so the three parts chained straight
    into ``acc`` over a 2048 - 16384-long reduction lost 7e-6 .. 5e-5 (relative, on an H200) where an fp32
    add per tile keeps the sum at fp32 level. ``"bf16x3_cat"`` (:func:`parts_side_by_side`): the same three
    products, from one dot over the parts side by side, each part's accumulated apart and the three added in
    fp32."""
    hi, mid, lo = _factor_parts(b, DOT_PRECISION)
    return _dot_parts(a, hi, mid, lo, acc, DOT_PRECISION)


@triton.jit
def _token_tile(t0, t_hi, BLOCK_M: tl.constexpr):
    """Rows ``t0 ..`` of a token tile inside a split ending at ``t_hi``: their offsets, as int64 (for
    pointer offsets past 2^31 elements) and their mask."""
    offs_m = t0 + tl.arange(0, BLOCK_M)
    return offs_m, offs_m.to(tl.int64), offs_m < t_hi


def ds_chunk(T: int, widths: Sequence[int], block_m: int, sms: int) -> int:
    """Columns per program of :class:`LoraDs` (module constants ``DS_*``): each halving doubles the programs
    and the rows of [T, R] fp32 partial sums summed after the kernel. A row of one chunk per token tile is
    ``block_m`` x R per program, and halving stops under 2 x ``DS_PROGRAMS_PER_SM`` x ``sms`` programs: the
    sums stay under 4 x sms x block_m x R x 4 bytes (4.3 MB at R 32 on 132 SMs)."""
    m_tiles = triton.cdiv(T, block_m)
    chunk = DS_CHUNK
    while chunk > DS_MIN_CHUNK and m_tiles * sum(triton.cdiv(n, chunk) for n in widths) < DS_PROGRAMS_PER_SM * sms:
        chunk //= 2
    return chunk


def token_splits(T: int, n_tiles: int, block_m: int, sms: int, programs_per_sm: int) -> tuple[int, int]:
    """``(splits, tokens per split)`` of a kernel whose programs are ``n_tiles`` column tiles x token splits:
    at least ``programs_per_sm`` programs per SM where T allows, each split at least 8 token tiles and a
    whole number of them (T 0: one split)."""
    return split_tokens(T, max(1, min(triton.cdiv(programs_per_sm * sms, n_tiles), triton.cdiv(T, 8 * block_m))),
                        block_m)


def split_tokens(T: int, splits: int, block_m: int) -> tuple[int, int]:
    """``(splits, tokens per split)``: T in about ``splits`` parts, each a whole number of ``block_m`` token
    tiles (fewer parts where rounding up leaves the last ones empty; T 0: one)."""
    t_per_split = max(1, triton.cdiv(triton.cdiv(T, splits), block_m)) * block_m
    return max(1, triton.cdiv(T, t_per_split)), t_per_split


def dsdb_makespan(n_tiles: int, m_tiles: int, t_per_split: int, sms: int, resident: int) -> float:
    """Modelled time of :class:`LoraDsDb`'s grid (module constants ``DSDB_*``), in steps: ``n_tiles`` column
    tiles x splits of ``t_per_split`` token tiles (of ``m_tiles``; the last split shorter), launched in
    program-id order (every tile's first split, then the second, ...) onto ``sms`` SMs of ``resident``
    slots, round robin, each later program into the first slot to free; a program alone on its SM runs one
    step per unit of time, each of c programs on one SM ``1 + (c - 1) * (DSDB_SHARED_STEP - 1)``."""
    splits = triton.cdiv(m_tiles, t_per_split)
    last = m_tiles - (splits - 1) * t_per_split
    work = [t_per_split + DSDB_PROGRAM_COST] * (n_tiles * (splits - 1)) + [last + DSDB_PROGRAM_COST] * n_tiles
    step = [1.0 + (c - 1) * (DSDB_SHARED_STEP - 1) for c in range(resident + 1)]   # step time with c on an SM
    running: list[list[float]] = [[] for _ in range(sms)]
    nxt = 0
    for _ in range(resident):
        for sm in range(sms):
            if nxt < len(work):
                running[sm].append(work[nxt])
                nxt += 1
    clock = [0.0] * sms
    events = [(min(r) * step[len(r)], sm) for sm, r in enumerate(running) if r]
    heapq.heapify(events)
    end = 0.0
    while events:
        t, sm = heapq.heappop(events)
        done = (t - clock[sm]) / step[len(running[sm])]
        clock[sm], end = t, t
        left = [w - done for w in running[sm] if w - done > 1e-9]
        while len(left) < resident and nxt < len(work):
            left.append(work[nxt])
            nxt += 1
        running[sm] = left
        if left:
            heapq.heappush(events, (t + min(left) * step[len(left)], sm))
    return end


def dsdb_splits(T: int, n_tiles: int, block_m: int, sms: int, resident: int) -> tuple[int, int]:
    """``(splits, tokens per split)`` of :class:`LoraDsDb`: of the split counts up to ``DSDB_MAX_WAVES``
    waves of programs, the one of least :func:`dsdb_makespan` (fewer splits on a tie). T 0: one split."""
    splits, t_per = _dsdb_splits(triton.cdiv(T, block_m), n_tiles, sms, resident)
    return splits, t_per * block_m


@functools.lru_cache(maxsize=512)
def _dsdb_splits(m_tiles: int, n_tiles: int, sms: int, resident: int) -> tuple[int, int]:
    """:func:`dsdb_splits` in token tiles, once per count of them (a new T is a new plan: ~5 ms of model
    runs at Qwen3.5's widths, paid once per count)."""
    if m_tiles <= 1:
        return 1, 1
    most = max(1, min(m_tiles, DSDB_MAX_WAVES * resident * sms // n_tiles))
    best = None
    for t_per in sorted({triton.cdiv(m_tiles, k) for k in range(1, most + 1)}, reverse=True):
        cost = dsdb_makespan(n_tiles, m_tiles, t_per, sms, resident)
        if best is None or cost < best[0] * (1 - 1e-6):
            best = (cost, t_per)
    return triton.cdiv(m_tiles, best[1]), best[1]


def rank_block(ranks: Sequence[int]) -> int:
    return max(16, triton.next_power_of_2(max(ranks)))


def overlap_waves(slice_start: Sequence[int], widths: Sequence[int],
                  tensor_of: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Slices grouped into launches that write disjoint columns, each slice after every earlier one over
    the same columns (so each column sees its slices' sums in slice order). ``tensor_of``: each slice's
    tensor (slices of different tensors never overlap); None: one tensor."""
    tensor_of = tensor_of or (0,) * len(widths)
    wave_of: list[int] = []
    for i, (start, n) in enumerate(zip(slice_start, widths)):
        w = 0
        for j in range(i):
            if tensor_of[j] == tensor_of[i] and slice_start[j] < start + n and start < slice_start[j] + widths[j]:
                w = max(w, wave_of[j] + 1)
        wave_of.append(w)
    return [[i for i, w in enumerate(wave_of) if w == wave] for wave in range(max(wave_of) + 1)]


def _offsets(counts: Sequence[int]) -> tuple[tuple[int, ...], int]:
    off, total = [], 0
    for n in counts:
        off.append(total)
        total += n
    return tuple(off), total


def _strides(ts: Sequence[torch.Tensor], dim: int = 0) -> tuple[int, ...]:
    return tuple(t.stride(dim) for t in ts)


# Every kernel takes its tensors as flat pointer arguments, never as tuples (Inductor launches a traced
# kernel only with flat tensor arguments): up to MAX_TENSORS distinct [T, *] tensors (a layer's projections,
# their gradients, x) in slots t0 .. t7, each slice's own B in slots b0 .. b15, unused slots None. Where a
# slice's tensor sits, every stride and every per-slice number are constexpr tuples: fixed per call
# signature, so each signature compiles its own kernel, specialized on them.
MAX_TENSORS = 8
MAX_SLICES = 16


def fits(num_tensors: int, num_slices: int) -> bool:
    """Whether one launch takes this many distinct [T, *] tensors and slices."""
    return num_tensors <= MAX_TENSORS and num_slices <= MAX_SLICES


def _slots(ts: Sequence[torch.Tensor]) -> tuple[tuple, tuple[int, ...]]:
    """The distinct tensors of ``ts`` (by identity) in slots ``t0 ..`` (padded with None) and each item's
    slot."""
    distinct: list = []
    slot = []
    for t in ts:
        k = next((j for j, d in enumerate(distinct) if d is t), -1)
        if k < 0:
            distinct.append(t)
            k = len(distinct) - 1
        slot.append(k)
    if len(distinct) > MAX_TENSORS:
        raise ValueError(f"a launch takes at most {MAX_TENSORS} distinct [T, *] tensors, got {len(distinct)}")
    return (*distinct, *(None,) * (MAX_TENSORS - len(distinct))), tuple(slot)


def _b_slots(bs: Sequence[torch.Tensor]) -> tuple:
    if len(bs) > MAX_SLICES:
        raise ValueError(f"a launch takes at most {MAX_SLICES} slices, got {len(bs)}")
    return (*bs, *(None,) * (MAX_SLICES - len(bs)))


def _slot_strides(slots: tuple, dim: int = 0) -> tuple[int, ...]:
    return tuple(0 if t is None else t.stride(dim) for t in slots)


# --------------------------------------------------------------------------------------------
# the partial sums' sums
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SumRegion:
    """One region of :class:`PartSums`: ``out[out_off + l * out_line + w] = sum over k < rows of
    in[in_off + k * row_stride + l * in_line + w]`` for lines ``l < lines``, ``w < width`` (element offsets;
    ``src`` / ``dst``: which input / output tensor of the launch)."""
    src: int
    dst: int
    in_off: int
    rows: int
    row_stride: int
    lines: int
    in_line: int
    out_off: int
    out_line: int
    width: int


def flat_region(src: int, dst: int, rows: int, numel: int, width: int) -> SumRegion:
    """A region summing ``rows`` contiguous ``[numel]`` rows into a contiguous ``[numel]`` output, as lines of
    ``width`` elements (the largest power of 2 up to ``width`` that divides ``numel``)."""
    w = width
    while numel % w:
        w //= 2
    return SumRegion(src, dst, 0, rows, numel, numel // w, w, 0, w, w)


def stacked_regions(src: int, dst: int, rows: int, lines: int, line: int, blocks: Sequence[tuple[int, int, int]],
                    width: int) -> list[SumRegion]:
    """The regions summing ``rows`` contiguous ``[lines, line]`` partial sums where only ``blocks`` were
    written, each ``(first line, lines, elements per line)`` (a slice's dB: its rows, its rank): one flat region
    where they cover every element, else one per distinct block (the rest of the output is not written)."""
    blocks = list(dict.fromkeys(blocks))
    spans = sorted((f, n) for f, n, _ in blocks)
    ends = [f + n for f, n in spans]
    if [f for f, _ in spans] == [0, *ends[:-1]] and ends[-1] == lines and all(w == line for *_, w in blocks):
        return [flat_region(src, dst, rows, lines * line, width)]
    plane = lines * line
    return [SumRegion(src, dst, f * line, rows, plane, n, line, f * line, line, w) for f, n, w in blocks]


@triton.jit
def _part_sums_tile(in_ptr, out_ptr, in_off, rows, row_stride, lines, in_line, out_off, out_line, width, tile,
                    BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_l = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_W)
    mask = (offs_l < lines)[:, None] & (offs_w < width)[None, :]
    src = in_ptr + in_off + offs_l[:, None] * in_line + offs_w[None, :]
    acc = tl.zeros((BLOCK_L, BLOCK_W), dtype=tl.float32)
    # four rows' loads issued before their adds (in row order: the sum is the same on every run)
    for k0 in range(0, rows, 4):
        at = src + k0 * tl.full((), row_stride, tl.int64)
        v0 = tl.load(at, mask=mask, other=0.0)
        v1 = tl.load(at + row_stride, mask=tl.where(k0 + 1 < rows, mask, False), other=0.0)
        v2 = tl.load(at + 2 * row_stride, mask=tl.where(k0 + 2 < rows, mask, False), other=0.0)
        v3 = tl.load(at + 3 * row_stride, mask=tl.where(k0 + 3 < rows, mask, False), other=0.0)
        acc = (((acc + v0) + v1) + v2) + v3
    tl.store(out_ptr + out_off + offs_l[:, None] * out_line + offs_w[None, :], acc, mask=mask)


@triton.jit
def _part_sums_kernel(in0, in1, out0, out1, SRC: tl.constexpr, DST: tl.constexpr, IN_OFF: tl.constexpr,
                      ROWS: tl.constexpr, ROW_STRIDE: tl.constexpr, LINES: tl.constexpr, IN_LINE: tl.constexpr,
                      OUT_OFF: tl.constexpr, OUT_LINE: tl.constexpr, WIDTH: tl.constexpr, TILE_OFF: tl.constexpr,
                      NUM_REGIONS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr):
    ins = (in0, in1)
    outs = (out0, out1)
    pid = tl.program_id(0)
    region = tile_owner(pid, TILE_OFF, NUM_REGIONS)
    for i in tl.static_range(NUM_REGIONS):
        if region == i:
            _part_sums_tile(ins[SRC[i]], outs[DST[i]], IN_OFF[i], ROWS[i], ROW_STRIDE[i], LINES[i], IN_LINE[i],
                            OUT_OFF[i], OUT_LINE[i], WIDTH[i], pid - TILE_OFF[i], BLOCK_L, BLOCK_W)


class PartSums:
    """Finishes the kernels' split reductions: the fp32 partial sums of several regions (:class:`SumRegion`,
    of up to two partial-sum tensors into up to two outputs) summed over their rows in ONE launch, each
    output element by one program in row order (deterministic). Inductor compiled one reduction per region
    from ``torch.sum``: a 35B-A3B layer's dS groups and dB at T 6144 (28 MB of partial sums) took 25 us on an
    H200 in three launches, 4.8 us in this one. Programs: ``PART_SUMS_TILE`` elements of one region each
    (``block_w``-wide lines: the regions' widest, a power of 2), halved down to 256 while fewer than
    ``PART_SUMS_PROGRAMS_PER_SM`` per SM."""

    def __init__(self, regions: Sequence[SumRegion], block_w: int, sms: int):
        tile = PART_SUMS_TILE
        while tile > max(256, block_w) and sum(r.lines * block_w for r in regions) < (
                PART_SUMS_PROGRAMS_PER_SM * sms * tile):
            tile //= 2
        block_l = max(1, tile // block_w)
        tile_off, n_tiles = _offsets([triton.cdiv(r.lines, block_l) for r in regions])
        self.grid = (n_tiles,)
        self.meta = dict(**{name: tuple(getattr(r, field) for r in regions) for name, field in (
            ("SRC", "src"), ("DST", "dst"), ("IN_OFF", "in_off"), ("ROWS", "rows"), ("ROW_STRIDE", "row_stride"),
            ("LINES", "lines"), ("IN_LINE", "in_line"), ("OUT_OFF", "out_off"), ("OUT_LINE", "out_line"),
            ("WIDTH", "width"))}, TILE_OFF=tile_off, NUM_REGIONS=len(regions), BLOCK_L=block_l, BLOCK_W=block_w,
                         num_warps=4)
        self.empty = n_tiles == 0
        self.launches = CompiledLaunches(_part_sums_kernel)

    def __call__(self, ins: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *, traced: bool = False) -> None:
        """Writes ``outs`` (each contiguous, fp32, as the regions were planned)."""
        if self.empty:
            return
        ins, outs = (*ins, *(None,) * (2 - len(ins))), (*outs, *(None,) * (2 - len(outs)))
        self.launches.launch(0, self.grid, (*ins, *outs), self.meta, [t for t in (*ins, *outs) if t is not None],
                             traced)


# --------------------------------------------------------------------------------------------
# forward: out += scale * s @ B^T
# --------------------------------------------------------------------------------------------
@triton.jit
def _expand_add_tile(out_ptr, stride_ot, src_ptr, stride_src, s_ptr, stride_st, s_col, b_ptr, stride_bn, stride_br,
                     n, col_start, rank, scale, tile_n, pid_m, T, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = offs_m.to(tl.int64)
    m_mask = offs_m < T
    n_mask = offs_n < n
    r_mask = offs_r < rank
    s = tl.load(s_ptr + rows64[:, None] * stride_st + (s_col + offs_r)[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    bt = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br,
                 mask=n_mask[None, :] & r_mask[:, None], other=0.0)   # [BLOCK_R, BLOCK_N] = B^T
    delta = tl.dot(s, bt, input_precision=DOT_PRECISION) * scale
    cols = (col_start + offs_n)[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    o = tl.load(src_ptr + rows64[:, None] * stride_src + cols, mask=o_mask, other=0.0)
    tl.store(out_ptr + rows64[:, None] * stride_ot + cols, (o.to(tl.float32) + delta.to(tl.float32))
             .to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _expand_add_kernel(t0, t1, t2, t3, t4, t5, t6, t7, s_ptr, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12,
                       b13, b14, b15, T, OUT_SLOT: tl.constexpr, SRC_SLOT: tl.constexpr, T_STRIDES: tl.constexpr,
                       STRIDE_ST: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
                       WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr,
                       SCALES: tl.constexpr, TILE_OFF: tl.constexpr, NUM_SLICES: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    bs = (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sl = tile_owner(pid_n, TILE_OFF, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):   # separate tensors per slice: a branch each, unrolled
        if sl == i:
            _expand_add_tile(ts[OUT_SLOT[i]], T_STRIDES[OUT_SLOT[i]], ts[SRC_SLOT[i]], T_STRIDES[SRC_SLOT[i]], s_ptr,
                             STRIDE_ST, SCOLS[i], bs[i], B_STRIDES_N[i], B_STRIDES_R[i], WIDTHS[i], COLS[i], RANKS[i],
                             SCALES[i], pid_n - TILE_OFF[i], pid_m, T, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


class ExpandAdd:
    """:func:`expand_add_` for one call signature (``sl``, T, the tiles and the dot precision fixed; the
    tensors' strides and dtypes the same on every call): its launches planned once. ``waves``: per
    launch, the slices it runs (and its grid, arguments, meta)."""

    def __init__(self, sl: Slices, T: int, adapter_dtype: torch.dtype, launch: Optional[TrainLaunch] = None, *,
                 tensor_of: Optional[Sequence[int]] = None):
        cfg = launch or EXPAND_LAUNCH
        self.T = T
        self.waves = []
        for wave in overlap_waves(sl.col, sl.width, tensor_of):
            part = sl.pick(wave)
            tile_off, n_tiles = _offsets([triton.cdiv(n, cfg.block_n) for n in part.width])
            # s @ B^T: both factors the adapters' (bf16 parts measured no faster here: the kernel is bound
            # by its [T, n] read and write)
            meta = dict(WIDTHS=part.width, COLS=part.col, SCOLS=part.scol, RANKS=part.rank, SCALES=part.scale,
                        TILE_OFF=tile_off, NUM_SLICES=len(wave),
                        DOT_PRECISION=dot_precision(adapter_dtype, adapter_dtype), BLOCK_M=cfg.block_m,
                        BLOCK_N=cfg.block_n, BLOCK_R=rank_block(sl.rank), num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)
            self.waves.append((tuple(wave), (triton.cdiv(T, cfg.block_m), n_tiles), meta))
        self.launches = CompiledLaunches(_expand_add_kernel)

    def __call__(self, outs: Sequence[torch.Tensor], s: torch.Tensor, bs: Sequence[torch.Tensor],
                 srcs: Optional[Sequence[torch.Tensor]] = None, *, traced: bool = False) -> None:
        """``traced``: see :meth:`~.jit_helpers.CompiledLaunches.launch`."""
        if self.T == 0:
            return
        srcs = outs if srcs is None else srcs
        for k, (wave, grid, meta) in enumerate(self.waves):
            ts, slot = _slots([outs[i] for i in wave] + [srcs[i] for i in wave])
            b = tuple(bs[i] for i in wave)
            key = (slot, _slot_strides(ts), s.stride(0), _strides(b), _strides(b, 1))
            self.launches.launch((k, key), grid, (*ts, s, *_b_slots(b), self.T),
                                 dict(meta, OUT_SLOT=slot[:len(wave)], SRC_SLOT=slot[len(wave):], T_STRIDES=key[1],
                                      STRIDE_ST=key[2], B_STRIDES_N=key[3], B_STRIDES_R=key[4]),
                                 (*(t for t in ts if t is not None), s, *b), traced)


def expand_add_(outs: Sequence[torch.Tensor], s: torch.Tensor, bs: Sequence[torch.Tensor], sl: Slices, *,
                srcs: Optional[Sequence[torch.Tensor]] = None, launch: Optional[TrainLaunch] = None,
                tensor_of: Optional[Sequence[int]] = None) -> None:
    """``outs[i][:, slice i] = round(srcs[i][:, slice i] + scale_i * s[:, scols i] @ bs[i]^T)`` for every slice
    ``i`` of ``sl`` (``outs[i]``: slice i's tensor, the same tensor for slices of one output; ``srcs``: default
    ``outs``, in place). Slices over the same columns of one tensor run in slice order (``tensor_of``: each
    slice's tensor, see :func:`overlap_waves`). Arguments checked by the caller; launched on the current
    CUDA device."""
    ExpandAdd(sl, s.shape[0], bs[0].dtype, launch, tensor_of=tensor_of)(outs, s, bs, srcs)


# --------------------------------------------------------------------------------------------
# backward: dS (and the shrink x @ A^T)
# --------------------------------------------------------------------------------------------
@triton.jit
def _ds_chunk(dy_ptr, stride_dt, part_ptr, stride_pc, stride_pt, b_ptr, stride_bn, stride_br, n, col_start, s_col,
              rank, scale, chunk, part_chunk, pid_m, T, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _dot_data(dy, b, acc, DOT_PRECISION)
    tl.store(part_ptr + part_chunk * stride_pc + rows64[:, None] * stride_pt + (s_col + offs_r)[None, :],
             acc * scale, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _ds_kernel(t0, t1, t2, t3, t4, t5, t6, t7, part_ptr, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13,
               b14, b15, T, DY_SLOT: tl.constexpr, T_STRIDES: tl.constexpr, STRIDE_PC: tl.constexpr,
               STRIDE_PT: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr, WIDTHS: tl.constexpr,
               COLS: tl.constexpr, SCOLS: tl.constexpr, RANKS: tl.constexpr, SCALES: tl.constexpr,
               CHUNK_OFF: tl.constexpr, CHUNK_BASE: tl.constexpr, NUM_SLICES: tl.constexpr, CHUNK: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    bs = (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    sl = tile_owner(pid_c, CHUNK_OFF, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _ds_chunk(ts[DY_SLOT[i]], T_STRIDES[DY_SLOT[i]], part_ptr, STRIDE_PC, STRIDE_PT, bs[i], B_STRIDES_N[i],
                      B_STRIDES_R[i], WIDTHS[i], COLS[i], SCOLS[i], RANKS[i], SCALES[i], pid_c - CHUNK_OFF[i],
                      CHUNK_BASE[i] + pid_c - CHUNK_OFF[i], pid_m, T, CHUNK, DOT_PRECISION, BLOCK_M, BLOCK_N,
                      BLOCK_R)


class LoraDs:
    """:func:`lora_ds` for one call signature: its launch planned once. The chunks of each slice: program
    offsets, and where they start in the partial sums (chunks of slices over the same ``s`` columns, i.e.
    one A group, take successive rows of ``part``; other groups reuse the same rows in other columns; a
    group with fewer chunks than the most leaves rows unwritten: then ``part`` starts zeroed)."""

    def __init__(self, sl: Slices, T: int, R: int, data_dtype: torch.dtype, adapter_dtype: torch.dtype, *,
                 chunk: Optional[int] = None, sms: Optional[int] = None, launch: Optional[TrainLaunch] = None):
        """``chunk``: columns per program (tests force small); by default :func:`ds_chunk` for ``sms`` SMs,
        or ``DS_CHUNK`` where ``sms`` is not given."""
        cfg = launch or DS_LAUNCH
        if chunk is None:
            chunk = DS_CHUNK if sms is None else ds_chunk(T, sl.width, cfg.block_m, sms)
        self.chunk = chunk
        counts = [triton.cdiv(n, chunk) for n in sl.width]
        chunk_off, n_programs = _offsets(counts)
        used: dict = {}
        base = []
        for i, c in enumerate(counts):
            key = (sl.scol[i], sl.rank[i])
            base.append(used.get(key, 0))
            used[key] = base[-1] + c
        self.rows = max(used.values())
        self.zero = T == 0 or any(v != self.rows for v in used.values())
        self.T, self.R = T, R
        self.grid = (triton.cdiv(T, cfg.block_m), n_programs)
        self.meta = dict(WIDTHS=sl.width, COLS=sl.col, SCOLS=sl.scol, RANKS=sl.rank, SCALES=sl.scale,
                         CHUNK_OFF=chunk_off, CHUNK_BASE=tuple(base), NUM_SLICES=len(sl), CHUNK=chunk,
                         DOT_PRECISION=dot_precision(data_dtype, adapter_dtype), BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_R=rank_block(sl.rank), num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
        self.launches = CompiledLaunches(_ds_kernel)
        self.sums = PartSums([flat_region(0, 0, self.rows, T * R, 16)], 16, sms or 1) if self.rows > 1 else None

    def __call__(self, dys: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], *,
                 traced: bool = False) -> torch.Tensor:
        T, R, rows = self.T, self.R, self.rows
        shape = (rows, T, R) if rows > 1 else (T, R)   # one row of chunks (one slice): dS itself, no sum
        part = (torch.zeros if self.zero else torch.empty)(shape, dtype=torch.float32, device=dys[0].device)
        if T > 0:
            ts, slot = _slots(dys)
            key = (slot, _slot_strides(ts), part.stride(0) if rows > 1 else 0, part.stride(-2), _strides(bs),
                   _strides(bs, 1))
            self.launches.launch(key, self.grid, (*ts, part, *_b_slots(bs), T),
                                 dict(self.meta, DY_SLOT=slot, T_STRIDES=key[1], STRIDE_PC=key[2], STRIDE_PT=key[3],
                                      B_STRIDES_N=key[4], B_STRIDES_R=key[5]),
                                 (*(t for t in ts if t is not None), part, *bs), traced)
        if rows == 1:
            return part
        d_s = torch.empty((T, R), dtype=torch.float32, device=part.device)
        self.sums([part], [d_s], traced=traced)
        return d_s


def lora_ds(dys: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], sl: Slices, R: int, *,
            chunk: int = DS_CHUNK, launch: Optional[TrainLaunch] = None) -> torch.Tensor:
    """``dS[:, scols of group g] = sum over the slices i of group g of scale_i * dys[i][:, slice i] @ bs[i]``:
    [T, R] fp32 (the slices of one group share their ``scol`` / ``rank``; ``R``: the width of ``s``);
    ``chunk``: columns per program (tests force small). Launched on the current CUDA device."""
    return LoraDs(sl, dys[0].shape[0], R, dys[0].dtype, bs[0].dtype, chunk=chunk, launch=launch)(dys, bs)


# --------------------------------------------------------------------------------------------
# backward: dB per slice (and dA^T)
# --------------------------------------------------------------------------------------------
@triton.jit
def _db_tile(dy_ptr, stride_dt, s_ptr, stride_st, s_col, part_ptr, stride_ps, stride_pn, stride_pr, n, col_start,
             row0, rcol0, rank, scale, tile_n, pid_s, T, t_per_split, DOT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    t_lo = pid_s * t_per_split
    t_hi = tl.minimum(t_lo + t_per_split, T)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        offs_m, rows64, m_mask = _token_tile(t0, t_hi, BLOCK_M)
        dyt = tl.load(dy_ptr + rows64[None, :] * stride_dt + (col_start + offs_n)[:, None],
                      mask=n_mask[:, None] & m_mask[None, :], other=0.0)   # [BLOCK_N, BLOCK_M] = dy^T
        s = tl.load(s_ptr + rows64[:, None] * stride_st + (s_col + offs_r)[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _dot_data(dyt, s, acc, DOT_PRECISION)
    tl.store(part_ptr + pid_s * stride_ps + (row0 + offs_n)[:, None].to(tl.int64) * stride_pn
             + (rcol0 + offs_r)[None, :].to(tl.int64) * stride_pr, acc * scale, mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _db_kernel(t0, t1, t2, t3, t4, t5, t6, t7, s_ptr, part_ptr, T, t_per_split, DY_SLOT: tl.constexpr,
               T_STRIDES: tl.constexpr, STRIDE_ST: tl.constexpr, STRIDE_PS: tl.constexpr, STRIDE_PN: tl.constexpr,
               STRIDE_PR: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr,
               ROWS: tl.constexpr, RCOLS: tl.constexpr, RANKS: tl.constexpr, SCALES: tl.constexpr,
               TILE_OFF: tl.constexpr, NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    sl = tile_owner(pid_n, TILE_OFF, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _db_tile(ts[DY_SLOT[i]], T_STRIDES[DY_SLOT[i]], s_ptr, STRIDE_ST, SCOLS[i], part_ptr, STRIDE_PS,
                     STRIDE_PN, STRIDE_PR, WIDTHS[i], COLS[i], ROWS[i], RCOLS[i], RANKS[i], SCALES[i],
                     pid_n - TILE_OFF[i], pid_s, T, t_per_split, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


class LoraDb:
    """:func:`lora_db` for one call signature: its launch planned once."""

    def __init__(self, sl: Slices, T: int, R: int, data_dtype: torch.dtype, s_dtype: torch.dtype, sms: int, *,
                 transposed: bool = False, launch: Optional[TrainLaunch] = None,
                 programs_per_sm: int = DB_PROGRAMS_PER_SM):
        cfg = launch or DB_LAUNCH
        tile_off, n_tiles = _offsets([triton.cdiv(n, cfg.block_n) for n in sl.width])
        splits, t_per_split = token_splits(T, n_tiles, cfg.block_m, sms, programs_per_sm)
        self.T, self.transposed = T, transposed
        if transposed:   # element (n, r) of slice i at part[:, scol_i + r, n]
            self.shape = (splits, R, sl.width[0])
            rows, rcols = (0,) * len(sl), sl.scol
        else:            # element (n, r) of slice i at part[:, row_i + n, r]
            rows, total = _offsets(sl.width)
            self.shape = (splits, total, max(sl.rank))
            rcols = (0,) * len(sl)
        self.grid = (n_tiles, splits)
        self.t_per_split = t_per_split
        if transposed:   # slice i: rows scol_i .. + rank_i, width_i each
            blocks = [(c, r, n) for c, r, n in zip(sl.scol, sl.rank, sl.width)]
        else:            # slice i: rows row_i .. + width_i, rank_i each
            blocks = [(f, n, r) for f, n, r in zip(rows, sl.width, sl.rank)]
        self.sums = PartSums(stacked_regions(0, 0, splits, self.shape[1], self.shape[2], blocks, 16), 16, sms)
        self.meta = dict(WIDTHS=sl.width, COLS=sl.col, SCOLS=sl.scol, ROWS=rows, RCOLS=rcols, RANKS=sl.rank,
                         SCALES=sl.scale, TILE_OFF=tile_off, NUM_SLICES=len(sl),
                         DOT_PRECISION=dot_precision(data_dtype, s_dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                         BLOCK_R=rank_block(sl.rank), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.launches = CompiledLaunches(_db_kernel)

    def __call__(self, dys: Sequence[torch.Tensor], s: torch.Tensor, *, traced: bool = False) -> torch.Tensor:
        total = torch.empty(self.shape[1:], dtype=torch.float32, device=s.device)
        if self.T == 0:
            return total.zero_()   # no split runs: the sums are 0
        part = torch.empty(self.shape, dtype=torch.float32, device=s.device)
        stride_pn, stride_pr = (part.stride(2), part.stride(1)) if self.transposed else (part.stride(1), part.stride(2))
        ts, slot = _slots(dys)
        key = (slot, _slot_strides(ts), s.stride(0), part.stride(0), stride_pn, stride_pr)
        self.launches.launch(key, self.grid, (*ts, s, part, self.T, self.t_per_split),
                             dict(self.meta, DY_SLOT=slot, T_STRIDES=key[1], STRIDE_ST=key[2], STRIDE_PS=key[3],
                                  STRIDE_PN=key[4], STRIDE_PR=key[5]),
                             (*(t for t in ts if t is not None), s, part), traced)
        self.sums([part], [total], traced=traced)
        return total


def lora_db(dys: Sequence[torch.Tensor], s: torch.Tensor, sl: Slices, sms: int, *, transposed: bool = False,
            launch: Optional[TrainLaunch] = None, programs_per_sm: int = DB_PROGRAMS_PER_SM) -> torch.Tensor:
    """``scale_i * dys[i][:, slice i]^T @ s[:, scols i]`` (fp32, summed over token splits): ``[sum of widths,
    max rank]`` with slice i in rows ``sum(width[:i]) ..`` (dB_i), or ``transposed``: ``[s columns, width]``
    with slice i in rows ``scols i`` (dA of A groups over the same columns of x); what lies outside every
    slice's block (a rank below the largest) is not written. ``sms``: the device's SM count (how far the
    tokens are split). Launched on the current CUDA device."""
    return LoraDb(sl, dys[0].shape[0], s.shape[1], dys[0].dtype, s.dtype, sms, transposed=transposed, launch=launch,
                  programs_per_sm=programs_per_sm)(dys, s)


# --------------------------------------------------------------------------------------------
# backward: dS and dB from one read of dy
# --------------------------------------------------------------------------------------------
@triton.jit
def _dsdb_tile(dy_ptr, stride_dt, s_ptr, stride_st, s_col, b_ptr, stride_bn, stride_br, dsp_ptr, stride_dsc,
               stride_dst, ds_row, dbp_ptr, stride_dbs, stride_dbn, db_row0, n, col_start, rank, scale, tile_n, pid_s,
               T, t_per_split, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr):
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < n
    r_mask = offs_r < rank
    b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0)   # [BLOCK_N, BLOCK_R], fixed over the tokens
    b_hi, b_mid, b_lo = _factor_parts(b, DOT_PRECISION)
    acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dsp_ptr += ds_row.to(tl.int64) * stride_dsc
    t_lo = pid_s * t_per_split
    t_hi = tl.minimum(t_lo + t_per_split, T)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        offs_m, rows64, m_mask = _token_tile(t0, t_hi, BLOCK_M)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dt + (col_start + offs_n)[None, :],
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)   # [BLOCK_M, BLOCK_N], read once
        s = tl.load(s_ptr + rows64[:, None] * stride_st + (s_col + offs_r)[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc_db = _dot_data(tl.trans(dy), s, acc_db, DOT_PRECISION)
        ds = _dot_parts(dy, b_hi, b_mid, b_lo, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), DOT_PRECISION)
        tl.store(dsp_ptr + rows64[:, None] * stride_dst + offs_r[None, :], ds * scale,
                 mask=m_mask[:, None] & r_mask[None, :])
    tl.store(dbp_ptr + pid_s * stride_dbs + (db_row0 + offs_n)[:, None].to(tl.int64) * stride_dbn + offs_r[None, :],
             acc_db * scale, mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _dsdb_kernel(t0, t1, t2, t3, t4, t5, t6, t7, s_ptr, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13,
                 b14, b15, dsp_ptr, dbp_ptr, T, t_per_split, DY_SLOT: tl.constexpr, T_STRIDES: tl.constexpr,
                 STRIDE_ST: tl.constexpr, B_STRIDES_N: tl.constexpr, B_STRIDES_R: tl.constexpr,
                 STRIDE_DSC: tl.constexpr, STRIDE_DST: tl.constexpr, STRIDE_DBS: tl.constexpr,
                 STRIDE_DBN: tl.constexpr, WIDTHS: tl.constexpr, COLS: tl.constexpr, SCOLS: tl.constexpr,
                 RANKS: tl.constexpr, SCALES: tl.constexpr, TILE_OFF: tl.constexpr, DS_BASE: tl.constexpr,
                 DB_ROWS: tl.constexpr, NUM_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    ts = (t0, t1, t2, t3, t4, t5, t6, t7)
    bs = (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    sl = tile_owner(pid_n, TILE_OFF, NUM_SLICES)
    for i in tl.static_range(NUM_SLICES):
        if sl == i:
            _dsdb_tile(ts[DY_SLOT[i]], T_STRIDES[DY_SLOT[i]], s_ptr, STRIDE_ST, SCOLS[i], bs[i], B_STRIDES_N[i],
                       B_STRIDES_R[i], dsp_ptr, STRIDE_DSC, STRIDE_DST, DS_BASE[i] + pid_n - TILE_OFF[i], dbp_ptr,
                       STRIDE_DBS, STRIDE_DBN, DB_ROWS[i], WIDTHS[i], COLS[i], RANKS[i], SCALES[i],
                       pid_n - TILE_OFF[i], pid_s, T, t_per_split, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


class LoraDsDb:
    """dS and every slice's dB from ONE read of dy (:func:`lora_ds` and :func:`lora_db` read it once each:
    at 35B-A3B widths, T 16384, that is 400 MB twice). Programs: a ``block_n``-column tile of one slice x a
    token split; each loads a [block_m, block_n] tile of dy once per step and multiplies it with B (dS) and,
    transposed, with s (dB). Both reductions are split and summed afterwards, deterministically: dS over the
    column tiles (partial sums ``[tiles, T, max rank]`` fp32, each A group's tiles in successive rows), dB
    over the token splits (as :class:`LoraDb`; how many: :func:`dsdb_splits`, or ``splits`` where given), both
    finished by one :class:`PartSums` launch. Call: ``(dS [T, R], dB [sum of widths, max rank])``, fp32. bf16
    dy with fp32 adapters at rank block 16 multiplies the factors' bf16 parts side by side
    (:func:`parts_side_by_side`)."""

    def __init__(self, sl: Slices, T: int, R: int, data_dtype: torch.dtype, adapter_dtype: torch.dtype, sms: int, *,
                 launch: Optional[TrainLaunch] = None, splits: Optional[int] = None):
        block_r = rank_block(sl.rank)
        cfg = launch or {32: DSDB_RANK32_LAUNCH, 64: DSDB_RANK64_LAUNCH}.get(block_r, DSDB_LAUNCH)
        if cfg.block_n * block_r > DSDB_MAX_B_TILE:   # (rank block 128: 213 KB of shared memory, 1 an SM)
            cfg = dataclasses.replace(cfg, block_n=max(16, DSDB_MAX_B_TILE // block_r), resident=1)
        counts = [triton.cdiv(n, cfg.block_n) for n in sl.width]
        tile_off, n_tiles = _offsets(counts)
        # each A group's tiles in successive rows of the dS partial sums (groups in order of first slice)
        groups: dict = {}
        for i, c in enumerate(counts):
            groups.setdefault((sl.scol[i], sl.rank[i]), []).append(i)
        ds_base, row = [0] * len(sl), 0
        self.ds_groups = []   # (first row, rows, first column of s, rank)
        for (scol, rank), members in groups.items():
            first = row
            for i in members:
                ds_base[i] = row
                row += counts[i]
            self.ds_groups.append((first, row - first, scol, rank))
        if splits is None:
            splits, t_per_split = dsdb_splits(T, n_tiles, cfg.block_m, sms, cfg.resident)
        else:   # as asked (sweeps)
            splits, t_per_split = split_tokens(T, splits, cfg.block_m)
        db_rows, total = _offsets(sl.width)
        self.T, self.R, self.rank = T, R, max(sl.rank)
        # columns of s no group covers: dS 0 there
        self.ds_gaps = sum(rank for *_, rank in self.ds_groups) != R
        self.ds_shape = (n_tiles, T, self.rank)
        self.db_shape = (splits, total, self.rank)
        plane = T * self.rank
        self.sums = PartSums([SumRegion(0, 0, first * plane, rows, plane, T, self.rank, scol, R, rank)
                              for first, rows, scol, rank in self.ds_groups]
                             + stacked_regions(1, 1, splits, total, self.rank, list(zip(db_rows, sl.width, sl.rank)),
                                               block_r), block_r, sms)
        self.launch = cfg
        self.grid = (n_tiles, splits)
        self.t_per_split = t_per_split
        self.meta = dict(WIDTHS=sl.width, COLS=sl.col, SCOLS=sl.scol, RANKS=sl.rank, SCALES=sl.scale,
                         TILE_OFF=tile_off, DS_BASE=tuple(ds_base), DB_ROWS=db_rows, NUM_SLICES=len(sl),
                         DOT_PRECISION=parts_side_by_side(dot_precision(data_dtype, adapter_dtype), block_r),
                         BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
        self.launches = CompiledLaunches(_dsdb_kernel)

    def __call__(self, dys: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], s: torch.Tensor, *,
                 traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        dev = s.device
        if self.T == 0:
            return (torch.zeros((0, self.R), dtype=torch.float32, device=dev),
                    torch.zeros(self.db_shape[1:], dtype=torch.float32, device=dev))
        ds_part = torch.empty(self.ds_shape, dtype=torch.float32, device=dev)
        db_part = torch.empty(self.db_shape, dtype=torch.float32, device=dev)
        ts, slot = _slots(dys)
        key = (slot, _slot_strides(ts), s.stride(0), _strides(bs), _strides(bs, 1), ds_part.stride(0),
               ds_part.stride(1), db_part.stride(0), db_part.stride(1))
        self.launches.launch(key, self.grid, (*ts, s, *_b_slots(bs), ds_part, db_part, self.T, self.t_per_split),
                             dict(self.meta, DY_SLOT=slot, T_STRIDES=key[1], STRIDE_ST=key[2], B_STRIDES_N=key[3],
                                  B_STRIDES_R=key[4], STRIDE_DSC=key[5], STRIDE_DST=key[6], STRIDE_DBS=key[7],
                                  STRIDE_DBN=key[8]),
                             (*(t for t in ts if t is not None), s, *bs, ds_part, db_part), traced)
        d_s = (torch.zeros if self.ds_gaps else torch.empty)((self.T, self.R), dtype=torch.float32, device=dev)
        d_b = torch.empty(self.db_shape[1:], dtype=torch.float32, device=dev)
        self.sums([ds_part, db_part], [d_s, d_b], traced=traced)
        return d_s, d_b


def lora_dsdb(dys: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], s: torch.Tensor, sl: Slices, sms: int, *,
              launch: Optional[TrainLaunch] = None, splits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS, dB)``: :func:`lora_ds`'s dS [T, R] and :func:`lora_db`'s dB [sum of widths, max rank], fp32, from
    one read of ``dys``. Launched on the current CUDA device."""
    return LoraDsDb(sl, s.shape[0], s.shape[1], dys[0].dtype, bs[0].dtype, sms, launch=launch,
                    splits=splits)(dys, bs, s)
