"""The Triton kernels of ``fx_passes::qkvz_lora_train`` (forward shrink and expand-add) and
``fx_passes::qkvz_lora_train_backward`` (dS, dB, dA, x's LoRA gradient) against the ops' plain-torch
implementations.

Runs on the CPU through the Triton interpreter (fp16 base: the interpreter has no bf16), called directly on
CPU tensors with small column chunks and token splits, so dS sums several chunks per group and dB several
token splits, with tails in T, in the columns and in the rank.
"""
import dataclasses
import importlib
import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops import tuning  # noqa: E402
from fx_passes.ops.kernels import gemm_lora_train, lora_train  # noqa: E402
from fx_passes.ops.kernels.lora_train import Slices  # noqa: E402
from fx_passes.ops.qkvz_lora_train import (forward_reference, group_columns, lora_grads_reference,  # noqa: E402
                                           slice_owners)

train = importlib.import_module("fx_passes.ops.qkvz_lora_train")   # the module (fx_passes.ops exports the op)

# (slice widths, slice_a, slice_start, ranks per group, projection widths): q | k | v | z of one adapter
# (+ b, a without LoRA); two adapters on the same columns (overlapping slices: two expand waves); a group of
# one slice between another group's slices, one projection
LAYOUTS = {
    "qkvz": ([24, 24, 40, 40], [0, 0, 0, 1], [0, 24, 48, 88], [8, 8], [88, 40, 4, 4]),
    "two_adapters": ([88, 40, 88, 40], [0, 1, 2, 3], [0, 88, 0, 88], [8, 8, 16, 5], [88, 40]),
    "interleaved": ([30, 20, 30], [0, 1, 0], [0, 30, 50], [12, 4], [80]),
}


def _case(T, layout, adapter_dtype, seed=0):
    """(per-projection tensors (outputs or their gradients), s [T, R], lora_b, slice_a, scales, owners, ranks,
    the kernels' Slices, each slice's projection)"""
    widths, slice_a, slice_start, ranks, proj = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, sum(ranks), generator=g).to(adapter_dtype)
    lora_b = [torch.randn(n, ranks[a], generator=g).to(adapter_dtype) for n, a in zip(widths, slice_a)]
    scales = [0.5 + i for i in range(len(widths))]
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in proj]
    owners = slice_owners(proj, slice_start, widths)
    offs = group_columns(ranks)
    sl = Slices(tuple(widths), tuple(c for _, c in owners), tuple(offs[a] for a in slice_a),
                tuple(ranks[a] for a in slice_a), tuple(scales))
    return dys, s, lora_b, slice_a, scales, owners, ranks, sl, [p for p, _ in owners]


def _expand_reference(outs, s, lora_b, slice_a, owners, scales, offs) -> None:
    """ExpandAdd's semantics, in place: each slice's sum in promote(out, adapters) dtype, rounded to the
    output's dtype in slice order (two slices over the same columns: once each)."""
    acc = torch.promote_types(outs[0].dtype, lora_b[0].dtype)
    for i, b in enumerate(lora_b):
        p, start = owners[i]
        cols = outs[p][:, start:start + b.shape[0]]
        sg = s[:, offs[slice_a[i]]:offs[slice_a[i]] + b.shape[1]]
        cols.copy_(torch.addmm(cols.to(acc), sg.to(acc), b.t().to(acc), alpha=scales[i]))


def _close(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_expand_add_matches_reference(layout, T, adapter_dtype):
    outs, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(T, layout, adapter_dtype)
    want = [o.clone() for o in outs]
    _expand_reference(want, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    got = [o.clone() for o in outs]
    lora_train.expand_add_([got[p] for p in out_of], s, lora_b, sl)
    assert not torch.equal(got[0], outs[0])
    for p in range(len(outs)):
        _close(got[p], want[p], torch.float16)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expand_slices_of_other_tensors_share_a_launch(layout):
    """``tensor_of`` (the forward op passes each slice's projection): slices at the same columns of two
    outputs (q | k | v's and z's both start at column 0) run in one launch; two adapters over the same
    columns of one output still run one after the other (without ``tensor_of``: every slice at column 0 in
    a launch of its own); the sums equal the reference."""
    outs, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(70, layout, torch.float32)
    want = [o.clone() for o in outs]
    _expand_reference(want, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    got = [o.clone() for o in outs]
    lora_train.expand_add_([got[p] for p in out_of], s, lora_b, sl, tensor_of=out_of)
    for p in range(len(outs)):
        _close(got[p], want[p], torch.float16)
    launches = len(lora_train.ExpandAdd(sl, 70, torch.float32, tensor_of=out_of).waves)
    assert launches == {"qkvz": 1, "two_adapters": 2, "interleaved": 1}[layout]
    assert len(lora_train.ExpandAdd(sl, 70, torch.float32).waves) == {"qkvz": 2, "two_adapters": 4,
                                                                      "interleaved": 1}[layout]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [1, 70, 200])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_grads_match_reference(layout, T, adapter_dtype):
    dys, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(T, layout, adapter_dtype, seed=1)
    want_s, want_b = lora_grads_reference(dys, s, lora_b, slice_a, owners, scales, ranks, True)
    dy_of = [dys[p] for p in out_of]
    got_s = lora_train.lora_ds(dy_of, lora_b, sl, s.shape[1], chunk=32)
    assert got_s.shape == want_s.shape and got_s.dtype == torch.float32
    _close(got_s, want_s, adapter_dtype)
    d_b = lora_train.lora_db(dy_of, s, sl, sms=4)
    row = 0
    for b, want in zip(lora_b, want_b):
        _close(d_b[row:row + b.shape[0], :b.shape[1]], want, adapter_dtype)
        row += b.shape[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [0, 1, 70, 1200])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_ds_and_db_from_one_read_of_dy(layout, T, adapter_dtype):
    """``lora_dsdb`` (the backward op's kernel when dB is asked for) against the torch implementation: 16-column
    tiles (dS summed over several tiles per A group, an A group's tiles apart in the slice order for
    "interleaved") and, at T 1200, several token splits (dB summed over them), tails in T, columns, rank."""
    dys, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(T, layout, adapter_dtype, seed=3)
    want_s, want_b = lora_grads_reference(dys, s, lora_b, slice_a, owners, scales, ranks, True)
    plan = lora_train.LoraDsDb(sl, T, s.shape[1], torch.float16, adapter_dtype, 64,
                               launch=lora_train.TrainLaunch(32, 16), splits=3 if T == 1200 else None)
    d_s, d_b = plan([dys[p] for p in out_of], lora_b, s)
    assert d_s.shape == want_s.shape and d_s.dtype == torch.float32
    assert d_b.shape == (sum(sl.width), max(ranks)) and d_b.dtype == torch.float32
    assert plan.db_shape[0] == (3 if T == 1200 else plan.grid[1])
    if T:
        _close(d_s, want_s, adapter_dtype)
    row = 0
    for b, want in zip(lora_b, want_b):
        _close(d_b[row:row + b.shape[0], :b.shape[1]], want, adapter_dtype)
        row += b.shape[0]


@pytest.mark.parametrize("rank", [12, 24, 48])
def test_dsdb_default_launch_of_each_rank_block(rank):
    """``lora_dsdb`` at the launch it picks itself for rank blocks 16 / 32 / 64 (256-column tiles;
    ``DSDB_RANK32_LAUNCH``; ``DSDB_RANK64_LAUNCH``) against the torch implementation: two slices of one A
    group each, column tails in both."""
    g = torch.Generator().manual_seed(rank)
    widths, T = (300, 140), 70
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in widths]
    s = torch.randn(T, 2 * rank, generator=g)
    lora_b = [torch.randn(n, rank, generator=g) for n in widths]
    sl = Slices(widths, (0, 0), (0, rank), (rank, rank), (2.0, 0.5))
    owners = [(0, 0), (1, 0)]
    want_s, want_b = lora_grads_reference(dys, s, lora_b, [0, 1], owners, [2.0, 0.5], [rank, rank], True)
    d_s, d_b = lora_train.lora_dsdb(dys, lora_b, s, sl, sms=4)
    _close(d_s, want_s, torch.float32)
    for b, want, row in zip(lora_b, want_b, (0, widths[0])):
        _close(d_b[row:row + b.shape[0], :rank], want, torch.float32)


def test_dsdb_makespan_model():
    """The model's arithmetic: a lone program runs one step per unit (plus its fixed cost), two on one SM
    each ``DSDB_SHARED_STEP`` per step, a third program waits for a free slot."""
    cost, shared = lora_train.DSDB_PROGRAM_COST, lora_train.DSDB_SHARED_STEP
    assert lora_train.dsdb_makespan(1, 4, 4, 1, 1) == pytest.approx(4 + cost)
    assert lora_train.dsdb_makespan(2, 4, 4, 1, 2) == pytest.approx((4 + cost) * shared)
    assert lora_train.dsdb_makespan(2, 4, 4, 2, 2) == pytest.approx(4 + cost)   # one program on each SM
    # 3 tiles on 1 SM of 2 slots: two together, then the third alone
    assert lora_train.dsdb_makespan(3, 4, 4, 1, 2) == pytest.approx((4 + cost) * (shared + 1))
    # splits of 3, 3 and 2 token tiles: the short last splits launch last
    assert lora_train.dsdb_makespan(1, 8, 3, 3, 1) == pytest.approx(3 + cost)


@pytest.mark.parametrize("n_tiles,T,want", [(48, 2048, 6), (64, 2048, 4), (64, 6144, 4), (48, 4096, 11)])
def test_dsdb_splits_rule(n_tiles, T, want):
    """dS + dB's token splits on an H200 (132 SMs, 2 programs each) at 35B-A3B's (48 tiles of 256 columns)
    and 27B's (64) widths: the split count of least modelled time, every token in one split, at most
    ``DSDB_MAX_WAVES`` waves, by the model no slower than the previous rule's (>= 4 programs an SM, splits of
    >= 8 token tiles; on the GPU 0.78-1.00x its time, benchmarks/RESULTS.md v31)."""
    splits, t_per = lora_train.dsdb_splits(T, n_tiles, 64, 132, 2)
    assert splits == want and t_per % 64 == 0
    assert (splits - 1) * t_per < T <= splits * t_per
    assert n_tiles * splits <= lora_train.DSDB_MAX_WAVES * 2 * 132
    m_tiles = T // 64
    old = lora_train.token_splits(T, n_tiles, 64, 132, 4)[1] // 64
    assert (lora_train.dsdb_makespan(n_tiles, m_tiles, t_per // 64, 132, 2)
            <= lora_train.dsdb_makespan(n_tiles, m_tiles, old, 132, 2))
    assert lora_train.dsdb_splits(0, n_tiles, 64, 132, 2) == (1, 64)


def test_ds_columns_of_s_that_no_slice_reads_are_zero():
    dys, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(70, "qkvz", torch.float32, seed=4)
    wide = torch.cat([s, torch.randn(70, 3)], 1)   # a group of rank 3 without a slice
    d_s, _ = lora_train.lora_dsdb([dys[p] for p in out_of], lora_b, wide, sl, sms=4,
                                  launch=lora_train.TrainLaunch(32, 16))
    want_s, _ = lora_grads_reference(dys, s, lora_b, slice_a, owners, scales, ranks, False)
    assert d_s.shape == (70, 19) and not d_s[:, 16:].any()
    _close(d_s[:, :16], want_s, torch.float32)


def test_dsdb_tiles_narrow_for_large_ranks():
    """B's tile of the dS + dB kernel stays within ``DSDB_MAX_B_TILE`` elements: the default 256-column tiles
    at ranks 65 - 128 needed more shared memory than a GPU has (the interpreter has no limit to show it);
    ranks 17 - 32 and 33 - 64 take ``DSDB_RANK32_LAUNCH``'s and ``DSDB_RANK64_LAUNCH``'s 128-column tiles."""
    sl = Slices((300, 300), (0, 300), (0, 0), (80, 80), (1.0, 1.0))
    for ranks, block_n in [((16, 16), 256), ((32, 32), 128), ((64, 64), 128), ((80, 80), 128), ((128, 128), 128)]:
        plan = lora_train.LoraDsDb(sl.__class__(sl.width, sl.col, sl.scol, ranks, sl.scale), 64, ranks[0],
                                   torch.bfloat16, torch.float32, sms=132)
        assert (plan.meta["BLOCK_N"], plan.meta["BLOCK_N"] * plan.meta["BLOCK_R"]) == (block_n, min(
            lora_train.DSDB_MAX_B_TILE, block_n * plan.meta["BLOCK_R"]))
        # the split model's slots: the capped tiles (rank block 128) fill an SM's shared memory alone
        assert plan.launch.resident == (2 if max(ranks) <= 32 else 1)


def test_a_slice_across_two_projections_is_refused():
    with pytest.raises(RuntimeError, match="crosses the projections"):
        slice_owners([88, 40], [80], [16])


def test_overlap_waves_keep_slice_order():
    # slices 0 and 2 share columns, 1 and 3 too: two launches, each slice after the earlier one on its columns
    assert lora_train.overlap_waves([0, 88, 0, 88], [88, 40, 88, 40]) == [[0, 1], [2, 3]]
    assert lora_train.overlap_waves([0, 24, 48, 88], [24, 24, 40, 40]) == [[0, 1, 2, 3]]
    assert lora_train.overlap_waves([0, 0, 0], [8, 8, 4]) == [[0], [1], [2]]


def test_db_token_splits_cover_every_token():
    # 1200 tokens: 3 splits of 8 x 64 tokens (the last one short) with many SMs, one with a single SM; no
    # tokens: one split of zeros
    dys, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(1200, "qkvz", torch.float32, seed=2)
    empty = lora_train.lora_db([dys[p][:0] for p in out_of], s[:0], sl, sms=64)
    assert empty.shape == (sum(sl.width), 8) and not empty.any()
    _, want_b = lora_grads_reference(dys, s, lora_b, slice_a, owners, scales, ranks, True)
    for sms in (1, 64):
        plan = lora_train.LoraDb(sl, 1200, s.shape[1], torch.float32, torch.float32, sms,
                                 launch=lora_train.TrainLaunch(64, 64), programs_per_sm=2)
        assert plan.shape[0] == (1 if sms == 1 else 3)
        d_b = plan([dys[p] for p in out_of], s)
        row = 0
        for b, want in zip(lora_b, want_b):
            _close(d_b[row:row + b.shape[0]], want, torch.float32)
            row += b.shape[0]


@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("one_slice", [True, False])
def test_x_side_shrink_da_and_dx(T, one_slice):
    """fp16 x under fp32 adapters, two A groups over x's columns, B = A^T read as a strided view: as one
    slice of rank 8 + 5 over cat(A) (one read of x) or one slice per group; s = x @ A^T, dA = dS^T @ x,
    d_x + sum dS @ A, x cast in registers (H 80: a tail in every column tile; T 70: in every token tile)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, 80, generator=g).to(torch.float16)
    lora_a = [torch.randn(8, 80, generator=g), torch.randn(5, 80, generator=g)]
    if one_slice:
        sl, bs = Slices((80,), (0,), (0,), (13,), (1.0,)), [torch.cat(lora_a).t()]
    else:
        sl, bs = Slices((80, 80), (0, 0), (0, 8), (8, 5), (1.0, 1.0)), [a.t() for a in lora_a]
    s = lora_train.lora_ds([x] * len(sl), bs, sl, 13, chunk=32)
    _close(s, torch.cat([x.float() @ a.t() for a in lora_a], 1), torch.float32)
    ds = torch.randn(T, 13, generator=g)
    d_a = lora_train.lora_db([x] * len(sl), ds, sl, sms=4, transposed=True)
    assert d_a.shape == (13, 80)
    _close(d_a[:8], ds[:, :8].t() @ x.float(), torch.float32)
    _close(d_a[8:], ds[:, 8:].t() @ x.float(), torch.float32)
    d_x = torch.randn(T, 80, generator=g).to(torch.float16)
    want = d_x.float() + ds[:, :8] @ lora_a[0] + ds[:, 8:] @ lora_a[1]
    if one_slice:
        new = torch.empty_like(d_x)
        lora_train.expand_add_([new], ds, bs, sl, srcs=[d_x])
    else:
        new = d_x.clone()
        lora_train.expand_add_([new, new], ds, bs, sl)
    _close(new, want, torch.float16)


def _in_row_order(rows):
    """The sum of ``rows`` added one after another in fp32: what :class:`PartSums` computes, to the bit."""
    total = torch.zeros_like(rows[0])
    for r in rows:
        total = total + r
    return total


def test_part_sums_regions_in_one_launch():
    """Two partial-sum tensors into two outputs, one launch: two regions of [rows, lines, width] blocks of one
    tensor into strided columns of one output (rows 6 and 3: tails in the 4-row steps; lines 70: a tail in the
    line tiles; widths 5 and 8 under a 16-wide block), one flat region of the other (its numel 3 x 60: lines
    of 4); equal to the rows added in order, to the bit; the columns no region writes stay as they were."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(9, 70, 16, generator=g)
    b = torch.randn(5, 3, 60, generator=g)
    plane = 70 * 16
    regions = [lora_train.SumRegion(0, 0, 0, 6, plane, 70, 16, 0, 20, 5),
               lora_train.SumRegion(0, 0, 6 * plane, 3, plane, 70, 16, 9, 20, 8),
               lora_train.flat_region(1, 1, 5, 180, 16)]
    assert regions[2].width == 4 and regions[2].lines == 45
    sums = lora_train.PartSums(regions, 16, sms=4)
    assert sums.grid[0] > 3   # several programs per region
    out_a = torch.full((70, 20), 7.0)
    out_b = torch.empty(3, 60)
    sums([a, b], [out_a, out_b])
    assert torch.equal(out_a[:, :5], _in_row_order(a[:6, :, :5]))
    assert torch.equal(out_a[:, 9:17], _in_row_order(a[6:, :, :8]))
    assert (out_a[:, 5:9] == 7).all() and (out_a[:, 17:] == 7).all()
    assert torch.equal(out_b, _in_row_order(b))


def test_stacked_regions_are_flat_only_where_every_element_is_written():
    """dB of slices of one rank covering every row: one flat region; ranks below the largest (or rows of no
    slice): one region per slice, reading only what the kernel wrote."""
    assert lora_train.stacked_regions(0, 0, 3, 10, 16, [(4, 6, 16), (0, 4, 16)], 16) == [
        lora_train.flat_region(0, 0, 3, 160, 16)]
    per = lora_train.stacked_regions(1, 0, 3, 10, 16, [(0, 4, 16), (4, 6, 5)], 16)
    assert [(r.src, r.in_off, r.row_stride, r.lines, r.in_line, r.out_off, r.width) for r in per] == [
        (1, 0, 160, 4, 16, 0, 16), (1, 64, 160, 6, 16, 64, 5)]
    assert len(lora_train.stacked_regions(0, 0, 3, 10, 16, [(0, 4, 16), (5, 5, 16)], 16)) == 2


def test_part_sums_tiles_shrink_to_fill_the_sms():
    """Elements per program: ``PART_SUMS_TILE``, halved (down to 256) while there are fewer than
    ``PART_SUMS_PROGRAMS_PER_SM`` programs per SM."""
    def tile(numel, sms):
        sums = lora_train.PartSums([lora_train.flat_region(0, 0, 4, numel, 16)], 16, sms)
        return sums.meta["BLOCK_L"] * sums.meta["BLOCK_W"]
    per_sm = lora_train.PART_SUMS_PROGRAMS_PER_SM
    assert tile(lora_train.PART_SUMS_TILE * per_sm * 132, 132) == lora_train.PART_SUMS_TILE
    assert tile(lora_train.PART_SUMS_TILE * per_sm * 132 // 2, 132) == lora_train.PART_SUMS_TILE // 2
    assert tile(16, 132) == 256


def test_ds_chunk_fills_the_sms():
    """LoraDs's columns per program: 2048 where the grid already has 2 programs per SM, halved (to 256 at
    least) where T x the columns leave fewer; with SMs given, the planned launch takes it."""
    assert lora_train.ds_chunk(8192, [5120], 64, 132) == 2048          # 128 token tiles x 3 chunks
    assert lora_train.ds_chunk(2048, [5120], 64, 132) == 512           # 32 x 10
    assert lora_train.ds_chunk(2048, [2048], 64, 132) == 256           # 32 x 8: the least chunk
    assert lora_train.ds_chunk(2048, [10240, 6144], 64, 132) == 1024   # 32 x (10 + 6)
    assert lora_train.ds_chunk(64, [80], 64, 132) == 256
    sl = Slices((2048,), (0,), (0,), (32,), (1.0,))
    assert lora_train.LoraDs(sl, 2048, 32, torch.float16, torch.float32, sms=132).chunk == 256
    assert lora_train.LoraDs(sl, 2048, 32, torch.float16, torch.float32).chunk == lora_train.DS_CHUNK
    # the op's forward plan: the shrink over x (H 2048, two groups as one slice) at T 2048 on the device's SMs
    _, weights, lora_a, lora_b, _, _ = _layer(3, H=2048)
    x = torch.empty(2048, 2048, dtype=torch.float16)   # (the plan reads its shape and dtype only)
    owners = slice_owners([w.shape[0] for w in weights], [0, 88], [b.shape[0] for b in lora_b])
    fwd = train._plan(2048, torch.float16, x, lora_a, lora_b, [0, 1], [2.0, 0.5], owners, False)
    assert fwd.shrink.chunk == lora_train.ds_chunk(2048, [2048], lora_train.DS_LAUNCH.block_m,
                                                   tuning.device_info(x.device).sms) < lora_train.DS_CHUNK


def _layer(seed, H=48, ranks=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    T, widths = 70, [88, 40, 4, 4]
    x = torch.randn(T, H, generator=g).to(torch.float16)
    weights = [(torch.randn(n, H, generator=g) * 0.2).to(torch.float16) for n in widths]
    lora_a = [torch.randn(r, H, generator=g) * 0.3 for r in ranks]
    lora_b = [torch.randn(n, r, generator=g) * 0.3 for n, r in zip((88, 40), ranks)]
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in widths]
    return x, weights, lora_a, lora_b, dys, g


@pytest.mark.parametrize("inputs,ranks", [("x itself", (8, 8)), ("x itself", (80, 64)), ("dropout outputs", (8, 8))])
def test_the_ops_cuda_glue_matches_their_torch_implementations(inputs, ranks):
    """The ops' CUDA implementations (called directly on CPU tensors: the interpreter runs their kernels)
    against the same ops' torch implementations: a GDN-like layer with q | k | v | z LoRA, b / a without;
    x itself as the LoRA input (fp16 under fp32 adapters: the x-side kernels, the A groups as one slice
    of rank 16 or, at 80 + 64 > the kernels' 128, one slice each), or one fp32 tensor per group (library
    GEMMs); every gradient asked for, then only some."""
    x, weights, lora_a, lora_b, dys, g = _layer(7, ranks=ranks)
    xs = [x, x] if inputs == "x itself" else [torch.randn(70, 48, generator=g) for _ in range(2)]
    args = (x, xs, weights, lora_a, lora_b, [0, 1], [0, 88], [2.0, 0.5])
    for _ in range(2):   # the second call runs the memoized plan
        got_outs, got_s = train._train_cuda(*args)
    if inputs == "x itself":
        plan = train._FORWARD_PLANS.get(train._signature(*args, (0, 0), 0), lambda: None)   # (the calls' plan)
        assert plan.x_side.cat == (sum(ranks) <= 128) and len(plan.x_side.slices) == (1 if plan.x_side.cat else 2)
    want_outs, want_s = torch.ops.fx_passes.qkvz_lora_train(*args)
    for got, want in zip(got_outs + [got_s], want_outs + [want_s]):
        assert got.dtype == want.dtype and got.shape == want.shape
        _close(got, want, got.dtype if got.dtype == torch.float16 else torch.float32)
    distinct, xs_of, x_input = ([x], [0, 0], 0) if inputs == "x itself" else (xs, [0, 1], -1)
    for flags in [(True, True, True), (True, False, True), (False, True, False)]:
        back = (dys, distinct, weights, lora_a, lora_b, want_s, None, [0, 1], [0, 88], [2.0, 0.5], xs_of, x_input,
                *flags)
        got = train._backward_cuda(*back)
        want = torch.ops.fx_passes.qkvz_lora_train_backward(*back)
        assert [len(t) for t in got[2:]] == [len(t) for t in want[2:]]
        for got_t, want_t in zip([got[0], got[1]] + got[2] + got[3], [want[0], want[1]] + want[2] + want[3]):
            assert got_t.dtype == want_t.dtype and got_t.shape == want_t.shape
            if got_t.numel():   # (what was not asked for: empty)
                _close(got_t, want_t, got_t.dtype if got_t.dtype == torch.float16 else torch.float32)


def test_a_column_strided_x_takes_the_library_path():
    """The kernels read rows of unit stride: a column-strided x (a view) goes through the library GEMMs,
    with the same result as the op's torch implementation."""
    x, weights, lora_a, lora_b, dys, g = _layer(8, H=96)
    x = x[:, ::2]
    weights, lora_a = [w[:, :48] for w in weights], [a[:, :48].contiguous() for a in lora_a]
    args = (x, [x, x], weights, lora_a, lora_b, [0, 1], [0, 88], [2.0, 0.5])
    got_outs, got_s = train._train_cuda(*args)
    want_outs, want_s = torch.ops.fx_passes.qkvz_lora_train(*args)
    _close(got_s, want_s, torch.float32)
    for got, want in zip(got_outs, want_outs):
        _close(got, want, torch.float16)


class _StubKernel:
    """Stands in for a Triton JITFunction: ``kernel[grid](*args, **meta)`` records a launch through Triton's
    path and returns the compiled kernel, whose ``[grid](*args, *constexprs)`` records a direct launch."""
    arg_names = ["t", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.jit, self.direct = [], []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit.append((grid, args, meta))
            return _StubCompiled(self)
        return run


class _StubCompiled:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel.direct.append((grid, args))


def test_compiled_launches_go_to_the_compiled_kernel_once_seen_aligned(monkeypatch):
    """What :class:`CompiledLaunches` does on a GPU (the interpreter always takes Triton's path): the first
    launch of a slot through ``kernel[grid]``, later ones through the compiled kernel's launcher with the
    constexprs appended in the kernel's argument order and the grid padded to 3-D; a tensor that is not
    16-byte aligned goes through ``kernel[grid]`` again (Triton specializes on alignment)."""
    from fx_passes.ops.kernels import jit_helpers

    monkeypatch.setattr(jit_helpers, "interpreting", lambda: False)
    stub = _StubKernel()
    launches = jit_helpers.CompiledLaunches(stub)
    t = torch.zeros(64, dtype=torch.float16)
    meta = dict(FLAG=True, BLOCK=64, num_warps=4)
    for _ in range(3):
        launches.launch(0, (2, 5), (t, 7), meta, (t,))
    assert len(stub.jit) == 1 and stub.direct == [((2, 5, 1), (t, 7, 64, True))] * 2
    launches.launch(1, (3,), (t, 8), meta, (t,))            # another slot: its own first launch
    assert len(stub.jit) == 2
    odd = t[1:]                                             # 2 bytes past an aligned address
    launches.launch(0, (2, 5), (odd, 7), meta, (odd,))
    assert len(stub.jit) == 3 and len(stub.direct) == 2
    launches.launch(0, (2, 5), (t, 7), meta, (t,))          # the aligned runner is still there
    assert len(stub.direct) == 3


def test_dot_precision_splits_fp32_factors_into_bf16_parts_only_for_bf16_data(monkeypatch):
    """The kernels' dots with fp32 adapters (their bf16x3 path runs on GPUs only: the interpreter has no bf16;
    ``python -m benchmarks.sweep_train_kernels --precisions bf16x3,tf32x3`` measures its error against fp64
    there): bf16 data -> three bf16 parts of the fp32 factor; fp16 data -> tf32x3 (the parts would fall into
    fp16's subnormals); TF32 allowed -> tf32 for every data dtype; 16-bit adapters -> plain 16-bit dots."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert lora_train.dot_precision(torch.bfloat16, torch.float32) == "bf16x3"
    assert lora_train.dot_precision(torch.float16, torch.float32) == "tf32x3"
    assert lora_train.dot_precision(torch.float32, torch.float32) == "tf32x3"
    assert lora_train.dot_precision(torch.bfloat16, torch.bfloat16) == "tf32"   # (ignored by 16-bit dots)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert lora_train.dot_precision(torch.bfloat16, torch.float32) == "tf32"
    assert lora_train.dot_precision(torch.float16, torch.float32) == "tf32"


def test_bf16_parts_hold_an_fp32_value_to_its_last_bit():
    """What the bf16x3 dots rest on, in torch arithmetic: hi + mid + lo (each the bf16 rounding of what the
    parts before it leave) is the fp32 value itself, for the magnitudes LoRA factors take."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4096, generator=g) * torch.logspace(-6, 2, 4096)
    hi = v.to(torch.bfloat16)
    rest = v - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    assert torch.equal(hi.double() + mid.double() + lo.double(), v.double())


def test_the_ops_plans_pick_bf16_parts_for_bf16_x_under_fp32_adapters(monkeypatch):
    """The forward / backward plans of a bf16 layer with fp32 adapters (x itself as the LoRA input): every
    kernel that multiplies a bf16 tensor with an fp32 factor (the shrink over x, dS and dS + dB over dy, dA over x)
    takes ``bf16x3``, dS + dB at rank block 16 with the parts side by side (``bf16x3_cat``); x's LoRA gradient
    (two fp32 factors) keeps ``tf32x3``; an fp16 layer keeps ``tf32x3`` everywhere. (Plans only: the interpreter
    cannot run bf16 kernels.)"""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for dtype, data_precision, ranks, dsdb_precision in ((torch.bfloat16, "bf16x3", (8, 8), "bf16x3_cat"),
                                                         (torch.bfloat16, "bf16x3", (8, 24), "bf16x3"),
                                                         (torch.float16, "tf32x3", (8, 8), "tf32x3")):
        x, weights, lora_a, lora_b, dys, _ = _layer(3, ranks=ranks)
        x = x.to(dtype)
        owners = slice_owners([w.shape[0] for w in weights], [0, 88], [b.shape[0] for b in lora_b])
        fwd = train._plan(70, dtype, x, lora_a, lora_b, [0, 1], [2.0, 0.5], owners, False)
        bwd = train._plan(70, dtype, x, lora_a, lora_b, [0, 1], [2.0, 0.5], owners, True)
        assert fwd.shrink.meta["DOT_PRECISION"] == data_precision
        assert all(meta["DOT_PRECISION"] == "tf32x3" for *_, meta in bwd.dx.waves)
        for kernel in (bwd.ds, bwd.da):
            assert kernel.meta["DOT_PRECISION"] == data_precision
        assert bwd.dsdb.meta["DOT_PRECISION"] == dsdb_precision


@triton.jit
def _side_by_side_kernel(a_ptr, parts_ptr, p_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, R: tl.constexpr):
    """out[0] = the sum of a @ each of the three [K, R] parts through one dot over them side by side;
    out[1] = :func:`_sum_side_by_side` of a given [M, 4R] product."""
    rows, ks, rs, ps = tl.arange(0, M), tl.arange(0, K), tl.arange(0, R), tl.arange(0, 4 * R)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    part = parts_ptr + ks[:, None] * R + rs[None, :]
    cat = lora_train._parts_side_by_side(tl.load(part), tl.load(part + K * R), tl.load(part + 2 * K * R))
    out = out_ptr + rows[:, None] * R + rs[None, :]
    tl.store(out, lora_train._sum_side_by_side(tl.dot(a, cat, input_precision="ieee")))
    tl.store(out + M * R, lora_train._sum_side_by_side(tl.load(p_ptr + rows[:, None] * 4 * R + ps[None, :])))


def test_parts_side_by_side_multiply_each_part_once():
    """``bf16x3_cat``'s plumbing (its bf16 parts run on GPUs only; here fp32 stand-ins): one dot over hi | mid |
    lo | 0 gives a @ (hi + mid + lo), each part once, parts of different magnitudes; summing a product takes its
    first three blocks, never the fourth (here huge)."""
    g = torch.Generator().manual_seed(0)
    M, K, R = 16, 32, 16
    a = torch.randn(M, K, generator=g)
    parts = torch.randn(3, K, R, generator=g) * torch.tensor([1.0, 1e-3, 1e-6]).view(3, 1, 1)
    p = torch.randn(M, 4 * R, generator=g)
    p[:, 3 * R:] = 1e6
    out = torch.empty(2, M, R)
    _side_by_side_kernel[(1,)](a, parts, p, out, M, K, R)
    torch.testing.assert_close(out[0].double(), a.double() @ parts.double().sum(0), rtol=1e-5, atol=1e-5)
    want = p[:, R:2 * R] + p[:, 2 * R:3 * R] + p[:, :R]
    torch.testing.assert_close(out[1], want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# forward at large T: the base GEMMs with the expand in their epilogue (gemm_lora_train)
# --------------------------------------------------------------------------------------------
SMALL_GEMM = tuning.PrefillLaunch(16, 16, 16, 2, 4, num_programs=3)


def _gemm_case(T, layout, adapter_dtype, seed=0):
    """x, the projections' weights (TMA rows: b / a 8 wide, not 4) and :func:`_case`'s LoRA."""
    _, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _case(T, layout, adapter_dtype, seed=seed)
    proj = [max(8, n) for n in LAYOUTS[layout][4]]
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(T, 40, generator=g).to(torch.float16)   # K 40: a K tail at 16-wide K tiles
    weights = [(torch.randn(n, 40, generator=g) * 0.2).to(torch.float16) for n in proj]
    return x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [5, 37])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_gemm_expand_matches_reference(layout, T, adapter_dtype):
    """The persistent GEMM + LoRA (3 programs over 16 x 16 tiles: several tiles each, tiles across slice
    bounds, a K tail, T tails; every projection wide, so the LoRA as K steps) against the op's torch
    implementation: base + LoRA in fp32, rounded once (two adapters over the same columns summed)."""
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(T, layout, adapter_dtype)
    want = forward_reference(x, weights, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    got = gemm_lora_train.gemm_expand(x, weights, s, lora_b, sl, out_of, config=SMALL_GEMM)
    assert [g.shape for g in got] == [w.shape for w in want] and all(g.dtype == torch.float16 for g in got)
    for p in range(len(want)):
        _close(got[p], want[p], torch.float16)
    # the LoRA is there: without it the outputs of the projections with slices differ
    bare = [x @ w.t() for w in weights]
    assert all(not torch.allclose(got[p].float(), bare[p].float(), atol=1e-2) for p in set(out_of))


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_gemm_expand_narrow_projection_tiles(adapter_dtype):
    """32-wide column tiles: b and a (8 columns) take 16-wide tiles of their own (fewer tiles, other offsets
    and descriptors than the wide projections'), qkv and z 32-wide tiles across slice bounds; the outputs as
    the reference's."""
    config = tuning.PrefillLaunch(16, 32, 16, 2, 4, num_programs=3)
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(37, "qkvz", adapter_dtype)
    assert gemm_lora_train.tile_widths([w.shape[0] for w in weights], 32) == (32, 32, 16, 16)
    assert gemm_lora_train.tile_widths([10240, 6144, 48, 48], 256) == (256, 256, 64, 64)
    want = forward_reference(x, weights, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    got = gemm_lora_train.gemm_expand(x, weights, s, lora_b, sl, out_of, config=config)
    for p in range(len(want)):
        _close(got[p], want[p], torch.float16)


@pytest.mark.parametrize("narrow_slice", [False, True])
def test_gemm_expand_lora_as_k_steps_or_epilogue(narrow_slice):
    """Slices on the wide projections only (qkv, z: a PEFT model's layout) run as the first K steps of their
    tiles (``KstepLayout``: s's and B's two-part splits, two adapters over the same columns summed, K steps
    of 16 with a zero-padded tail); a slice on a narrow projection (b) keeps every slice in the epilogue.
    Both equal the op's torch implementation (one rounding of base + LoRA)."""
    config = tuning.PrefillLaunch(16, 32, 16, 2, 4, num_programs=3)
    layout = "qkvz" if narrow_slice else "two_adapters"
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(37, layout, torch.float32)
    if narrow_slice:   # one more slice: b's 8 columns, A group 0
        g = torch.Generator().manual_seed(9)
        lora_b = [*lora_b, torch.randn(8, ranks[0], generator=g)]
        slice_a, scales, owners = [*slice_a, 0], [*scales, 1.5], [*owners, (2, 0)]
        sl = Slices(sl.width + (8,), sl.col + (0,), sl.scol + (0,), sl.rank + (ranks[0],), sl.scale + (1.5,))
        out_of = [*out_of, 2]
    plan = gemm_lora_train.GemmExpand(sl, out_of, [w.shape[0] for w in weights], 37, 40, x.dtype, s.dtype,
                                      x.device, config)
    assert (plan.kstep is None) == narrow_slice and plan.meta["KSTEP"] == (not narrow_slice)
    if not narrow_slice:   # qkv (wide 0): groups 0 and 1, 3 x (ranks) parts in K steps of 16
        assert plan.kstep.groups[0] == tuple(sorted({(sl.scol[i], sl.rank[i]) for i in range(len(sl))
                                                      if out_of[i] == 0}))
        assert plan.kstep.steps[0] == -(-3 * sum(r for _, r in plan.kstep.groups[0]) // 16)
    want = forward_reference(x, weights, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    got = plan(x, weights, s, lora_b)
    for p in range(len(want)):
        _close(got[p], want[p], torch.float16)
    if narrow_slice:   # b's LoRA is there
        assert not torch.allclose(got[2].float(), (x @ weights[2].t()).float(), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kstep_parts_are_exact_splits_under_inductor(dtype):
    """The K steps' operands (``kstep_parts``: s's and B's two-part splits) as torch ops compiled by Inductor
    equal them run eagerly, bit for bit: a split as ``v.to(dtype)`` and back is kept by Inductor as the fp32
    value inside one kernel, which would make every lo part 0 (the LoRA term then at 16-bit precision).
    ``SP_j @ C_j^T`` is the slices' scaled LoRA to ~2^-15, two adapters over the same columns summed."""
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(37, "two_adapters",
                                                                                   torch.float32)
    ks = gemm_lora_train.kstep_layout(sl, out_of, [0, 1], [w.shape[0] for w in weights], 16)
    eager = gemm_lora_train.kstep_parts(ks, s, lora_b, dtype)
    compiled = torch.compile(lambda s, *b: gemm_lora_train.kstep_parts(ks, s, b, dtype), fullgraph=True)(s, *lora_b)
    assert torch.equal(eager[0], compiled[0]) and all(torch.equal(a, b) for a, b in zip(eager[1], compiled[1]))
    sp, cs = eager
    offs = group_columns(ranks)
    for j, c in enumerate(cs):
        want = torch.zeros(weights[j].shape[0], 37, dtype=torch.float64)
        for i in ks.slices[j]:
            g = slice_a[i]
            want[owners[i][1]:owners[i][1] + lora_b[i].shape[0]] += scales[i] * (
                lora_b[i].double() @ s[:, offs[g]:offs[g] + ranks[g]].double().t())
        cols = slice(ks.sp_col[j], ks.sp_col[j] + ks.steps[j] * 16)
        got = c.double() @ sp[:, cols].double().t()
        assert ((got - want).norm() / want.norm()).item() < 2 ** -15


def _narrow_tiles_of(sched, program: int, narrow: int) -> list[int]:
    """The narrow tiles phase (3) of ``_gemm_expand_kernel`` gives a program (its two loops, in Python)."""
    first = (program - sched.heavy) * sched.fill if program >= sched.heavy else sched.fill_cap
    return [*range(first, min(first + sched.fill, sched.fill_cap)), *range(sched.fill_cap + program, narrow,
                                                                          sched.programs)]


def test_forward_gemm_schedule_rule():
    """The forward GEMM's phases (``schedule``): b / a tiles first onto the programs left lighter. 35B-A3B at T
    2048 (768 wide tiles, 32 narrow, 132 SMs): 108 programs hold 6 wide tiles, the other 24 take 2 narrow
    each (round robin over one order gave 8 programs 6 wide + 1 narrow); at T 6144 (2304 wide: 17 waves +
    60) the 72 lighter programs take the 96 narrow tiles. Every narrow tile goes to one program, and by the
    rule's own cost model no program holds more than with round robin."""
    cost = gemm_lora_train.narrow_tile_cost(128, 256, 32)
    assert cost == pytest.approx(160 / 384)
    assert gemm_lora_train.schedule(768, 32, 132, cost) == gemm_lora_train.Schedule(132, 108, 2, 32)
    assert gemm_lora_train.schedule(2304, 96, 132, cost) == gemm_lora_train.Schedule(132, 60, 2, 96)
    # 27B at T 2048 (64-wide b / a tiles: cost 0.5): 32 narrow tiles spread one each over the 32 lighter programs
    assert gemm_lora_train.schedule(1024, 32, 132, 0.5) == gemm_lora_train.Schedule(132, 100, 1, 32)
    assert gemm_lora_train.schedule(2376, 96, 132, cost).fill_cap == 0       # whole waves: round robin
    assert gemm_lora_train.schedule(2304, 0, 132, cost).fill_cap == 0        # no narrow projections
    assert gemm_lora_train.schedule(0, 10, 132, cost) == gemm_lora_train.Schedule(10, 0, 0, 0)
    for wide, narrow, most, c in itertools.product((0, 5, 131, 200, 768, 2304), (0, 1, 32, 96, 400), (4, 132),
                                                   (0.25, cost, 0.5)):
        sched = gemm_lora_train.schedule(wide, narrow, most, c)
        got = sorted(j for p in range(sched.programs) for j in _narrow_tiles_of(sched, p, narrow))
        assert got == list(range(narrow)), (wide, narrow, most, c)
        P = sched.programs
        load = [wide // P + (p < wide % P) + c * len(_narrow_tiles_of(sched, p, narrow)) for p in range(P)]
        robin = [wide // P + (p < wide % P) + c * sum((wide + j) % P == p for j in range(narrow)) for p in range(P)]
        assert max(load) <= max(robin) + 1e-9, (wide, narrow, most, c)


@pytest.mark.parametrize("T, programs, phases", [
    (200, 8, (8, 5, 2, 6)),     # 2 narrow tiles each on the 3 lighter programs, the rest round robin
    (130, 7, (7, 1, 2, 10)),    # every narrow tile on the lighter programs
    (20, 8, (5, 3, 1, 2)),      # one row tile: fewer tiles than programs (one narrow tile each on 2)
    (130, 5, (5, 0, 0, 0)),     # whole waves of wide tiles: narrow ones round robin
])
def test_gemm_expand_phases(T, programs, phases, monkeypatch):
    """The forward GEMM's two phases (``schedule``) under the interpreter: wide tiles, then narrow tiles
    filling the lighter programs and round robin; with the outputs allocated as NaN, every element is
    written, and equals the reference."""
    config = tuning.PrefillLaunch(32, 64, 16, 2, 4, num_programs=programs)
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(T, "qkvz", torch.float32)
    plan = gemm_lora_train.GemmExpand(sl, out_of, [w.shape[0] for w in weights], T, 40, x.dtype, s.dtype, x.device,
                                      config)
    sched = plan.schedule
    assert (sched.programs, sched.heavy, sched.fill, sched.fill_cap) == phases
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: new_empty(t, *a, **k).fill_(float("nan")))
    got = plan(x, weights, s, lora_b)
    want = forward_reference(x, weights, s, lora_b, slice_a, owners, scales, group_columns(ranks))
    for p in range(len(want)):
        assert not got[p].isnan().any()
        _close(got[p], want[p], torch.float16)


def test_fused_gemms_prefetch_rule():
    """Each projection's first slice has its factors loaded before the K loop up to a rank block of 32
    (``prefetch_slices``; the layouts above take it, with slices missing tiles and second adapters loading
    after the loop); over that both GEMMs load every slice after the loop, and still equal the reference."""
    assert gemm_lora_train.prefetch_slices((0, 0, 1, 0), 4, 16) == (0, 2, -1, -1)
    assert gemm_lora_train.prefetch_slices((1, 0), 2, 32) == (1, 0)
    assert gemm_lora_train.prefetch_slices((0, 1), 4, 64) == (-1, -1, -1, -1)
    T, r = 37, 40
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, 40, generator=g).to(torch.float16)
    weights = [(torch.randn(n, 40, generator=g) * 0.2).to(torch.float16) for n in (48, 8)]
    s = torch.randn(T, r, generator=g)
    lora_b = [torch.randn(32, r, generator=g) * 0.3]
    sl = Slices((32,), (8,), (0,), (r,), (0.5,))
    plan = gemm_lora_train.GemmExpand(sl, [0], [48, 8], T, 40, torch.float16, torch.float32, x.device, SMALL_GEMM)
    assert plan.meta["PREFETCH"] == (-1,) * gemm_lora_train.MAX_PROJ
    want = forward_reference(x, weights, s, lora_b, [0], [(0, 8)], [0.5], [0])
    got = plan(x, weights, s, lora_b)
    for p in range(2):
        _close(got[p], want[p], torch.float16)
    dys, weights, ds, lora_a = _gemm_dx_args(T, ranks=(r,))
    dx = gemm_lora_train.GemmDx([r], [w.shape[0] for w in weights], T, 40, torch.float16, ds.dtype, ds.device,
                                SMALL_GEMM)
    assert dx.meta["PREFETCH"] == -1
    _close(dx(dys, weights, ds, lora_a), _dx_reference(dys, weights, ds, lora_a), torch.float16)


def test_gemm_expand_conditions(monkeypatch):
    """Where the op's forward takes the fused GEMM: 16-bit x and weights of one dtype, TMA's rows (16-byte
    strides, unit last stride), at most MAX_PROJ projections, T from the device's ``train_fused_min_t``."""
    T = tuning.tuning_for(tuning.OFF_GPU_DEVICE).train_fused_min_t
    x = torch.zeros(T, 64, dtype=torch.float16)
    w = [torch.zeros(32, 64, dtype=torch.float16), torch.zeros(16, 64, dtype=torch.float16)]
    assert gemm_lora_train.fusable(x, w, 4)
    assert not gemm_lora_train.fusable(x[:T - 1], w, 4)                    # below the device's T
    assert not gemm_lora_train.fusable(x.float(), [t.float() for t in w], 4)
    assert not gemm_lora_train.fusable(x, [w[0].bfloat16(), w[1]], 4)      # weights of another dtype
    assert not gemm_lora_train.fusable(torch.zeros(T, 128, dtype=torch.float16)[:, ::2], w, 4)
    assert not gemm_lora_train.fusable(x, [w[0], torch.zeros(4, 64, dtype=torch.float16)], 4)   # 8-byte rows
    assert not gemm_lora_train.fusable(x, w * 3, 4)                        # 6 projections
    assert not gemm_lora_train.fusable(x, w, lora_train.MAX_SLICES + 1)


def test_the_forward_op_takes_the_fused_gemm_from_the_devices_t(monkeypatch):
    """The forward op's CUDA implementation (the interpreter on CPU tensors) at T below and at the device's
    ``train_fused_min_t`` (lowered here to 64, so the interpreter runs it): its plan takes library GEMMs +
    ExpandAdd below and the fused GEMM from there; both equal the op's torch implementation."""
    low = dataclasses.replace(tuning.tuning_for(tuning.OFF_GPU_DEVICE), train_fused_min_t=64)
    monkeypatch.setattr(gemm_lora_train, "tuning_for", lambda info: low)
    g = torch.Generator().manual_seed(11)
    H, widths = 64, [96, 32, 8, 8]
    weights = [(torch.randn(n, H, generator=g) * 0.2).to(torch.float16) for n in widths]
    lora_a = [torch.randn(r, H, generator=g) * 0.3 for r in (8, 8)]
    lora_b = [torch.randn(n, 8, generator=g) * 0.3 for n in (96, 32)]
    for T, fused in ((63, False), (66, True)):
        x = torch.randn(T, H, generator=g).to(torch.float16)
        args = (x, [x, x], weights, lora_a, lora_b, [0, 1], [0, 96], [2.0, 0.5])
        got_outs, got_s = train._train_cuda(*args)
        plan = train._FORWARD_PLANS.get(train._signature(*args, (0, 0), 0), lambda: None)
        assert (plan.gemm is not None) == fused
        want_outs, want_s = torch.ops.fx_passes.qkvz_lora_train(*args)
        _close(got_s, want_s, torch.float32)
        for got, want in zip(got_outs, want_outs):
            assert got.shape == want.shape and got.dtype == want.dtype
            _close(got, want, torch.float16)


# --------------------------------------------------------------------------------------------
# backward at large T: dx's GEMMs with x's LoRA gradient in their epilogue (gemm_lora_train.GemmDx)
# --------------------------------------------------------------------------------------------
def _gemm_dx_args(T, ranks=(8, 5), widths=(56, 24, 8, 8), adapter_dtype=torch.float32, H=40, seed=21):
    """dys, weights [n_p, H] (K tails at 16-wide K tiles: 56, 24, 8; an H tail at 16-wide column tiles: 40),
    dS [T, sum(ranks)] and the A groups."""
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in widths]
    weights = [(torch.randn(n, H, generator=g) * 0.2).to(torch.float16) for n in widths]
    ds = torch.randn(T, sum(ranks), generator=g).to(adapter_dtype)
    lora_a = [(torch.randn(r, H, generator=g) * 0.3).to(adapter_dtype) for r in ranks]
    return dys, weights, ds, lora_a


def _dx_reference(dys, weights, ds, lora_a):
    """GemmDx's semantics in torch: library GEMMs accumulating into one 16-bit buffer, then x's LoRA gradient of
    every group summed in fp32 and added, rounded once."""
    d_x = train._sum_of_products(dys, weights)
    offs = group_columns([a.shape[0] for a in lora_a])
    lora = sum(ds[:, o:o + a.shape[0]].float() @ a.float() for o, a in zip(offs, lora_a))
    return (d_x.float() + lora).to(d_x.dtype)


@pytest.mark.parametrize("T", [5, 37])
@pytest.mark.parametrize("ranks,widths", [((8, 5), (56, 24, 8, 8)), ((16,), (40,))])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_gemm_dx_matches_reference(T, ranks, widths, adapter_dtype):
    """The persistent dx GEMM (3 programs over 16 x 16 tiles, K tails in every projection, T and H tails)
    against library GEMMs accumulating into one buffer, then x's LoRA gradient of every group added in fp32
    and rounded once; without the LoRA it is the GEMMs alone."""
    dys, weights, ds, lora_a = _gemm_dx_args(T, ranks, widths, adapter_dtype)
    want = _dx_reference(dys, weights, ds, lora_a)
    got = gemm_lora_train.gemm_dx(dys, weights, ds, lora_a, config=SMALL_GEMM)
    assert got.shape == want.shape == (T, 40) and got.dtype == torch.float16
    _close(got, want, torch.float16)
    base = train._sum_of_products(dys, weights)
    assert not torch.allclose(got.float(), base.float(), atol=1e-2)   # the LoRA part is there
    bare = gemm_lora_train.GemmDx([], widths, T, 40, torch.float16, adapter_dtype, ds.device, SMALL_GEMM)
    _close(bare(dys, weights, ds, []), base, torch.float16)


def test_gemm_dx_last_wave_in_half_tiles():
    """A last wave of tiles filling at most half the programs runs as half-height tiles (``tail_tiles``: the
    rule's values), and the dx GEMM with half tiles (one past T in the last row tile, a tail of every tile
    where they fill under half the programs) equals the reference and the same kernel without them."""
    assert gemm_lora_train.tail_tiles(320, 132, 128) == (132, 56)    # 27B at T 2048: 2 waves + 56 tiles
    assert gemm_lora_train.tail_tiles(640, 132, 128) == (132, 0)     # 4 waves + 112: over half, whole tiles
    assert gemm_lora_train.tail_tiles(264, 132, 128) == (132, 0)     # whole waves
    assert gemm_lora_train.tail_tiles(28, 132, 128) == (56, 28)      # under half the SMs: every tile halved
    assert gemm_lora_train.tail_tiles(128, 132, 128) == (128, 0)
    assert gemm_lora_train.tail_tiles(200, 132, 16) == (132, 0)      # 8-row halves: under a dot's 16
    for T, programs, tail in ((70, 4, 1), (37, 4, 2), (20, 8, 3)):
        config = tuning.PrefillLaunch(32, 16, 16, 2, 4, num_programs=programs)
        dys, weights, ds, lora_a = _gemm_dx_args(T)
        args = ([a.shape[0] for a in lora_a], [w.shape[0] for w in weights], T, 40, torch.float16, ds.dtype,
                ds.device, config)
        halves, whole = gemm_lora_train.GemmDx(*args), gemm_lora_train.GemmDx(*args, split_tail=False)
        assert (halves.tail, whole.tail) == (tail, 0)
        got = halves(dys, weights, ds, lora_a)
        _close(got, _dx_reference(dys, weights, ds, lora_a), torch.float16)
        _close(got, whole(dys, weights, ds, lora_a), torch.float16)


def test_dx_schedule_rule():
    """dA's tiles go to the dx GEMM's lighter programs only where all of them fit there by the cost model
    (``dx_schedule``, ``da_tile_cost``), spread evenly; else None (the dA kernel runs). 35B-A3B at T 2048 (128 dx
    tiles on 132 SMs, LoRA on qkv and z at rank 16): the 4 idle programs take 4 of the 16 dA tiles each; 27B at T
    2048 (2 waves + 56 tiles as 112 halves): 20 programs without a half take 2 each; whole waves, or tiles that
    cost too much (35B-A3B T 6144), leave dA to its own kernel."""
    cfg = tuning.PrefillLaunch()
    widths_35b, widths_27b = (8192, 4096, 32, 32), (10240, 6144, 48, 48)
    cost = gemm_lora_train.da_tile_cost(2048, widths_35b, 32, torch.bfloat16, torch.float32, cfg)
    assert cost == pytest.approx(2.6 * 2048 * (128 * 2 + 32 * 4) / (194 * 384 * 64 * 2))
    assert gemm_lora_train.dx_schedule(128, 0, 132, 16, cost) == gemm_lora_train.Schedule(132, 128, 4, 16)
    cost = gemm_lora_train.da_tile_cost(2048, widths_27b, 32, torch.bfloat16, torch.float32, cfg)
    assert gemm_lora_train.dx_schedule(320, 56, 132, 40, cost) == gemm_lora_train.Schedule(132, 112, 2, 40)
    assert gemm_lora_train.dx_schedule(264, 0, 132, 16, 0.1) is None      # whole waves: no program lighter
    cost = gemm_lora_train.da_tile_cost(6144, widths_35b, 32, torch.bfloat16, torch.float32, cfg)
    assert gemm_lora_train.dx_schedule(384, 0, 132, 16, cost) is None      # 12 lighter programs, 1 tile each
    assert gemm_lora_train.dx_schedule(128, 0, 132, 0, cost) is None       # no dA asked for
    assert gemm_lora_train.dx_schedule(28, 28, 132, 3, 0.2) == gemm_lora_train.Schedule(132, 56, 1, 3)
    for tiles, most, da, c in itertools.product((1, 5, 28, 128, 131, 200, 320, 384, 1000), (4, 132), (1, 16, 40),
                                                (0.05, 0.2, 0.45, 0.9)):
        programs, tail = gemm_lora_train.tail_tiles(tiles, most, 128)
        sched = gemm_lora_train.dx_schedule(tiles, tail, most, da, c)
        if sched is None:
            continue
        placed = [_narrow_tiles_of(sched, p, da) for p in range(sched.programs)]   # (no round robin: cap == da)
        assert sorted(j for p in placed for j in p) == list(range(da)), (tiles, most, da, c)
        full = tiles - tail   # each program's dx load (whole tiles, then halves from program 0), then its dA tiles
        load = [full // sched.programs + (p < full % sched.programs) + 0.5 * (p < 2 * tail)
                for p in range(sched.programs)]
        assert max(l + c * len(placed[p]) for p, l in enumerate(load)) <= max(load) + 1e-9, (tiles, most, da, c)


@pytest.mark.parametrize("widths,T,H,programs,tail", [
    ((120, 56, 8, 8), 20, 72, 3, 0),     # whole tiles: the program left one lighter takes all 5 dA tiles
    ((120, 56, 8, 8), 70, 40, 8, 1),     # the last wave in halves: the programs without one take 1 each
    ((56, 24, 8, 8), 20, 40, 8, 3),      # every tile halved: programs added for dA
    ((120, 56, 8, 8), 37, 72, 8, 2),     # 5 dA tiles over 4 lighter programs, 2 each
])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_gemm_dx_with_da(widths, T, H, programs, tail, adapter_dtype, monkeypatch):
    """The dx GEMM computing dA = dS^T x on its lighter programs (``GemmDx.with_da``; 16-token steps over 16
    columns of x here, T and H tails in the dA tiles): with both outputs allocated NaN, every element is written;
    dx equals the same GEMM without dA to the bit, dA equals dS^T x (fp32) and the dA kernel's result."""
    monkeypatch.setattr(gemm_lora_train, "DA_BLOCK_T", 16)
    monkeypatch.setattr(gemm_lora_train, "DA_BLOCK_N", 16)
    monkeypatch.setattr(gemm_lora_train, "DA_LOOP_SLOWDOWN", 1.0)
    config = tuning.PrefillLaunch(32, 16, 16, 2, 4, num_programs=programs)
    dys, weights, ds, lora_a = _gemm_dx_args(T, (8, 8), widths, adapter_dtype, H=H)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    args = ([8, 8], list(widths), T, H, torch.float16, adapter_dtype, ds.device, config)
    plan = gemm_lora_train.GemmDx(*args, with_da=True)
    assert plan.tail == tail and plan.da_schedule is not None and plan.da_schedule.fill_cap == triton.cdiv(H, 16)
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: new_empty(t, *a, **k).fill_(float("nan")))
    dx, da = plan.with_da(dys, weights, ds, lora_a, x)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    assert da.shape == (16, H) and da.dtype == torch.float32 and not dx.isnan().any() and not da.isnan().any()
    assert torch.equal(dx, gemm_lora_train.GemmDx(*args)(dys, weights, ds, lora_a))
    _close(dx, _dx_reference(dys, weights, ds, lora_a), torch.float16)
    _close(da, ds.float().t() @ x.float(), adapter_dtype)
    side = Slices((H,), (0,), (0,), (16,), (1.0,))
    _close(da, lora_train.lora_db([x], ds, side, sms=4, transposed=True), adapter_dtype)


def test_gemm_dx_with_da_needs_a_schedule():
    """A plan without dA (not asked for, or no room for its tiles) refuses ``with_da`` with a clear error."""
    dys, weights, ds, lora_a = _gemm_dx_args(20)
    args = ([8, 5], [w.shape[0] for w in weights], 20, 40, torch.float16, ds.dtype, ds.device, SMALL_GEMM)
    for plan in (gemm_lora_train.GemmDx(*args), gemm_lora_train.GemmDx([], *args[1:], with_da=True)):
        assert plan.da_schedule is None
        with pytest.raises(ValueError, match="runs no dA"):
            plan.with_da(dys, weights, ds, lora_a, torch.zeros(20, 40, dtype=torch.float16))


def test_gemm_dx_descriptors_made_on_host_or_device_agree():
    """The dx GEMM takes dy's and W's TMA descriptors made on the host (its default) or makes them on the
    device with the same result to the bit, with and without half tiles (their own dy descriptors) and with
    fewer than MAX_PROJ projections."""
    for T, programs, widths in ((70, 4, (56, 24, 8, 8)), (37, 4, (56, 24)), (48, 3, (56, 24, 8))):
        config = tuning.PrefillLaunch(32, 16, 16, 2, 4, num_programs=programs)
        dys, weights, ds, lora_a = _gemm_dx_args(T, widths=widths)
        args = ([a.shape[0] for a in lora_a], list(widths), T, 40, torch.float16, ds.dtype, ds.device, config)
        host, device = gemm_lora_train.GemmDx(*args), gemm_lora_train.GemmDx(*args, host_descriptors=False)
        assert host.host_descriptors and host.meta["HOST_DESC"] and not device.meta["HOST_DESC"]
        assert torch.equal(host(dys, weights, ds, lora_a), device(dys, weights, ds, lora_a)), (T, host.tail)


def test_gemm_dx_conditions():
    """Where the backward takes the dx GEMM: :func:`gemm_lora_train.fusable`'s rules on the weights, T and
    the dtype, and TMA rows in every dy."""
    T = tuning.tuning_for(tuning.OFF_GPU_DEVICE).train_fused_min_t
    dys, weights, _, _ = _gemm_dx_args(T, H=64)
    assert gemm_lora_train.dx_fusable(dys, weights, 2)
    assert not gemm_lora_train.dx_fusable([d[:T - 1] for d in dys], weights, 2)            # below the device's T
    assert not gemm_lora_train.dx_fusable(dys[:3], weights, 2)                             # a weight without dy
    assert not gemm_lora_train.dx_fusable([dys[0].float()] + dys[1:], weights, 2)          # dys of two dtypes
    strided = torch.zeros(T, 112, dtype=torch.float16)[:, ::2]
    assert not gemm_lora_train.dx_fusable([strided] + dys[1:], weights, 2)                # no TMA rows
    assert not gemm_lora_train.dx_fusable(dys, weights, lora_train.MAX_SLICES + 1)


def test_the_backward_op_takes_the_dx_gemm_from_the_devices_t(monkeypatch):
    """The backward op's CUDA implementation (the interpreter on CPU tensors), x itself the LoRA input: below
    the device's ``train_fused_min_t`` (lowered to 64) dx comes from library GEMMs + the expand kernel, from
    there from the dx GEMM; both equal the op's torch implementation, and a backward without dx takes neither."""
    low = dataclasses.replace(tuning.tuning_for(tuning.OFF_GPU_DEVICE), train_fused_min_t=64)
    monkeypatch.setattr(gemm_lora_train, "tuning_for", lambda info: low)
    g = torch.Generator().manual_seed(13)
    H, widths = 48, [96, 32, 8, 8]
    weights = [(torch.randn(n, H, generator=g) * 0.2).to(torch.float16) for n in widths]
    lora_a = [torch.randn(r, H, generator=g) * 0.3 for r in (8, 8)]
    lora_b = [torch.randn(n, 8, generator=g) * 0.3 for n in (96, 32)]
    for T, fused in ((63, False), (66, True)):
        x = torch.randn(T, H, generator=g).to(torch.float16)
        dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in widths]
        s = torch.randn(T, 16, generator=g)
        for need_dx in (True, False):
            back = (dys, [x], weights if need_dx else [], lora_a, lora_b, s, None, [0, 1], [0, 96], [2.0, 0.5],
                    [0, 0], 0, need_dx, True, True)
            got = train._backward_cuda(*back)
            plan = train._BACKWARD_PLANS.get(train._signature(*back), lambda: None)
            assert (plan.gemm_dx is not None, plan.dx is None) == (fused and need_dx, fused and need_dx)
            # the dx GEMM's lighter programs run dA too (one dx tile of 128 x 256 as two halves on 4 programs)
            assert (plan.da is None) == (fused and need_dx)
            want = torch.ops.fx_passes.qkvz_lora_train_backward(*back)
            for got_t, want_t in zip([got[0], got[1]] + got[2] + got[3], [want[0], want[1]] + want[2] + want[3]):
                assert got_t.dtype == want_t.dtype and got_t.shape == want_t.shape
                if got_t.numel():
                    _close(got_t, want_t, got_t.dtype if got_t.dtype == torch.float16 else torch.float32)


def test_the_fused_gemms_launch_with_a_scratch_allocator_of_their_own(monkeypatch):
    """A fused GEMM making TMA descriptors on the device (the forward's all; dx's own, and dy's and W's with
    ``host_descriptors=False``) asks Triton for scratch memory at launch: our launches bring torch's allocator
    (a caller without one gets no "no allocator was set" error) in a copy of the caller's context, so the
    allocator the caller set (or none) is still the one in force after."""
    from triton.runtime import _allocation

    from fx_passes.ops.kernels import jit_helpers

    seen = []
    monkeypatch.setattr(jit_helpers.CompiledLaunches, "_launch",
                        lambda self, *a: seen.append(_allocation._allocator.get()))
    before = _allocation._allocator.get()
    dys, weights, ds, lora_a = _gemm_dx_args(20)
    args = ([a.shape[0] for a in lora_a], [w.shape[0] for w in weights], 20, 40, torch.float16, ds.dtype,
            ds.device, SMALL_GEMM)
    gemm_lora_train.GemmDx(*args, host_descriptors=False)(dys, weights, ds, lora_a)
    gemm_lora_train.GemmDx(*args)(dys, weights, ds, lora_a)
    x, weights, s, lora_b, slice_a, scales, owners, ranks, sl, out_of = _gemm_case(20, "qkvz", torch.float32)
    gemm_lora_train.gemm_expand(x, weights, s, lora_b, sl, out_of, config=SMALL_GEMM)
    assert seen == [jit_helpers._scratch] * 3 and _allocation._allocator.get() is before
