"""Triton kernels of ``fx_passes::qkvz_lora_`` (shrink + expand) vs. its plain-torch reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), so shapes stay small. The kernel is called directly on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fx_passes.ops.qkvz_lora import qkvz_lora_reference  # noqa: E402
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_, plan_lora  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402

# Tolerances relative to the magnitude of the result (max |ref|): tight enough that a wrong slice,
# scale, adapter or a dropped K chunk fails, loose enough for summation order / one 16-bit rounding.
TOL = {
    torch.float32: 1e-5,
    torch.float16: 4e-3,
}

# GDN-like slices: key_dim=16 (q, k), value_dim=24 (v, z)
GDN_SIZES = [16, 16, 24, 24]
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=16)  # several row/col tiles and K chunks

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skip(reason="bf16 is not supported by the Triton interpreter")),
]


def _randn(*shape, dtype, gen, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    return t.to(dtype)


def _make_case(T, H, sizes, slice_a, ranks, dtype, *, adapters=None, ab_dtype=None, out_dtype=None,
               gen_seed=0, b_views=False):
    """Random non-zero inputs. ``adapters=None``: 2-D A/B; else stacked [L, ...]."""
    gen = torch.Generator().manual_seed(gen_seed)
    ab_dtype = ab_dtype or dtype
    out_dtype = out_dtype or dtype
    n_groups = max(slice_a) + 1
    lead = () if adapters is None else (adapters,)
    x = _randn(T, H, dtype=dtype, gen=gen)
    lora_a = [_randn(*lead, ranks[g], H, dtype=ab_dtype, gen=gen, scale=H ** -0.5) for g in range(n_groups)]
    if b_views:  # one big B, each slice a row-slice view of it (non-trivial strides)
        big = [_randn(*lead, sum(sizes) + 3, ranks[g], dtype=ab_dtype, gen=gen, scale=ranks[g] ** -0.5)
               for g in range(n_groups)]
        lora_b, row = [], 1
        for n, g in zip(sizes, slice_a):
            lora_b.append(big[g][..., row:row + n, :])
            row += n
    else:
        lora_b = [_randn(*lead, n, ranks[g], dtype=ab_dtype, gen=gen, scale=ranks[g] ** -0.5)
                  for n, g in zip(sizes, slice_a)]
    starts, col = [], 0
    for n in sizes:
        starts.append(col)
        col += n
    out = _randn(T, col, dtype=out_dtype, gen=gen)
    return out, x, lora_a, lora_b, list(slice_a), starts


def _check(out, x, lora_a, lora_b, slice_a, slice_start, ids=None, scales=None, scale=1.0, ref_ids="same",
           **blocks):
    """Runs kernel and reference on clones of ``out``; returns (kernel result, reference)."""
    out0 = out.clone()
    ref = out.clone()
    qkvz_lora_reference(ref, x, lora_a, lora_b, slice_a, slice_start,
                        ids if ref_ids == "same" else ref_ids, scales, scale)
    lora = LoraSlices.of(lora_a, lora_b, slice_a, slice_start, ids, scales, scale)
    lora_shrink_expand_(out, x, lora, config=plan_lora(x, lora, **blocks))
    tol = TOL[out.dtype] if out.dtype in TOL else TOL[torch.float16]
    tol = max(tol, TOL.get(x.dtype, tol), TOL.get(lora_a[0].dtype, tol))
    mag = ref.float().abs().max().item()
    # the delta must be visible, or the comparison proves nothing
    assert (ref.float() - out0.float()).abs().max().item() > 0.05 * mag
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * mag, equal_nan=True)
    return out, ref


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("H", [32, 48])
@pytest.mark.parametrize("T", [1, 5, 17, 33])
def test_shapes_shared_a(T, H, rank, dtype):
    """GDN layout: q, k, v share A group 0, z uses group 1."""
    case = _make_case(T, H, GDN_SIZES, [0, 0, 0, 1], [rank, rank], dtype)
    _check(*case)


LAYOUTS = {
    # name: (sizes, slice_a, ranks per group)
    "shared_a": (GDN_SIZES, [0, 0, 0, 1], [16, 8]),
    "distinct_a": (GDN_SIZES, [0, 1, 2, 3], [4, 16, 8, 12]),
    "qkv_only": (GDN_SIZES[:3], [0, 0, 0], [8]),
    "non_pow2": ([12, 12, 20, 20], [0, 0, 0, 1], [5, 3]),
    "z_only": ([24], [0], [16]),
    "six_slices": ([16, 16, 24, 8, 8, 8], [0, 0, 0, 1, 2, 3], [8, 4, 16, 4]),   # q k v z b a
    "eight_groups": ([4] * 8, list(range(8)), [2, 4, 6, 8, 3, 5, 7, 1]),         # the op's limits
}


@pytest.mark.parametrize("blocks", [{}, SMALL_BLOCKS], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(layout, dtype, blocks):
    sizes, slice_a, ranks = LAYOUTS[layout]
    out, x, lora_a, lora_b, slice_a, starts = _make_case(33, 48, sizes, slice_a, ranks, dtype, b_views=True)
    _check(out, x, lora_a, lora_b, slice_a, starts, scale=0.5, **blocks)


def test_z_slice_at_nonzero_start_leaves_other_columns():
    """One z slice written at column 40 of a 64-column out; all other columns stay bit-identical."""
    T, H = 17, 32
    gen = torch.Generator().manual_seed(1)
    x = _randn(T, H, dtype=torch.float32, gen=gen)
    a = _randn(8, H, dtype=torch.float32, gen=gen)
    b = _randn(24, 8, dtype=torch.float32, gen=gen)
    out = _randn(T, 64, dtype=torch.float32, gen=gen)
    out0 = out.clone()
    _check(out, x, [a], [b], [0], [40], **SMALL_BLOCKS)
    assert torch.equal(out[:, :40], out0[:, :40]) and torch.equal(out[:, 64:], out0[:, 64:])
    assert not torch.equal(out[:, 40:], out0[:, 40:])


@pytest.mark.parametrize("blocks", [{}, SMALL_BLOCKS], ids=["default_blocks", "small_blocks"])
@pytest.mark.parametrize("scales_kind", ["none", "0d", "per_adapter"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multi_adapter(dtype, ids_dtype, scales_kind, blocks):
    L, T = 3, 33
    out, x, lora_a, lora_b, slice_a, starts = _make_case(T, 48, GDN_SIZES, [0, 0, 0, 1], [16, 4], dtype,
                                                         adapters=L, b_views=True, gen_seed=2)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, L, (T,), generator=gen)
    ids[:4] = torch.tensor([-1, 0, 1, 2])  # every adapter and "none" present
    ids[20:26] = 1  # a run of one adapter
    ids = ids.to(ids_dtype)
    scales = {"none": None,
              "0d": torch.tensor(0.75),
              "per_adapter": torch.tensor([0.5, -1.25, 2.0])}[scales_kind]
    out0 = out.clone()
    _check(out, x, lora_a, lora_b, slice_a, starts, ids, scales, scale=0.8, **blocks)
    none = ids == -1
    assert torch.equal(out[none], out0[none])  # no-adapter rows are bit-identical


def test_adapter_ids_out_of_range_are_ignored():
    """Ids >= L (and < -1) are treated as no adapter: nothing read out of bounds, rows untouched."""
    L, T = 3, 17
    out, x, lora_a, lora_b, slice_a, starts = _make_case(T, 32, GDN_SIZES, [0, 1, 2, 3], [4, 8, 16, 4],
                                                         torch.float32, adapters=L, gen_seed=4)
    ids = torch.tensor([0, 3, 1, 2, 7, -1, 1000, 0, 2, 1, -5, 2, 0, 1, 3, 2, 1], dtype=torch.int32)
    bad = (ids < 0) | (ids >= L)
    out[bad] = -0.0  # a "+= 0" on these rows would flip the sign bit
    out0 = out.clone()
    _check(out, x, lora_a, lora_b, slice_a, starts, ids, torch.tensor([1.5, 0.5, -1.0]),
           ref_ids=torch.where(bad, -1, ids))
    assert torch.equal(out[bad].view(torch.int32), out0[bad].view(torch.int32))  # bit-identical


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_is_column_block_view(dtype):
    """out is a column block of a wider (NaN-poisoned) buffer: row stride > N, outside untouched."""
    T, H = 17, 48
    _, x, lora_a, lora_b, slice_a, starts = _make_case(T, H, GDN_SIZES, [0, 0, 0, 1], [16, 4], dtype, gen_seed=5)
    N = sum(GDN_SIZES)
    gen = torch.Generator().manual_seed(6)
    wide = torch.full((T, 7 + N + 9), float("nan"), dtype=dtype)
    wide[:, 7:7 + N] = _randn(T, N, dtype=dtype, gen=gen)
    out = wide[:, 7:7 + N]
    assert out.stride(0) > N
    _check(out, x, lora_a, lora_b, slice_a, starts, **SMALL_BLOCKS)
    assert torch.isnan(wide[:, :7]).all() and torch.isnan(wide[:, 7 + N:]).all()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_mixed_dtype_fp16_x_fp32_adapters(out_dtype):
    """PEFT keeps fp32 adapters on a 16-bit base: the shrink runs in fp32 (x is upcast)."""
    L, T = 2, 17
    out, x, lora_a, lora_b, slice_a, starts = _make_case(
        T, 48, GDN_SIZES, [0, 0, 0, 1], [16, 8], torch.float16, ab_dtype=torch.float32, out_dtype=out_dtype,
        adapters=L, gen_seed=7)
    ids = torch.tensor([0, 1, -1] * 5 + [1, 0], dtype=torch.int64)
    _check(out, x, lora_a, lora_b, slice_a, starts, ids, torch.tensor([0.5, 2.0]), **SMALL_BLOCKS)


def test_x_row_stride_and_3d_a_views():
    """x with row stride > H, A given as [L, r, H] views of a wider tensor (adapter stride != r*H)."""
    L, T, H = 2, 5, 32
    gen = torch.Generator().manual_seed(8)
    x = _randn(T, H + 16, dtype=torch.float32, gen=gen)[:, 8:8 + H]
    a_big = _randn(L + 1, 20, H, dtype=torch.float32, gen=gen)
    lora_a = [a_big[1:, 0:8], a_big[:L, 8:20]]
    lora_b = [_randn(L, n, lora_a[g].shape[1], dtype=torch.float32, gen=gen) for n, g in zip(GDN_SIZES, [0, 0, 0, 1])]
    out = _randn(T, sum(GDN_SIZES), dtype=torch.float32, gen=gen)
    ids = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32)
    _check(out, x, lora_a, lora_b, [0, 0, 0, 1], [0, 16, 32, 56], ids)


def test_more_slices_or_groups_than_the_op_takes_is_a_clear_error():
    """MAX_SLICES / MAX_GROUPS (8: a GDN layer's q, k, v, z, b, a need 6): one more is refused with
    the limit in the message, by the CPU op and the CUDA launcher's shared check alike."""
    import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)
    from fx_passes.ops.lora_args import MAX_GROUPS, MAX_SLICES

    n = MAX_SLICES + 1
    out, x, lora_a, lora_b, slice_a, starts = _make_case(3, 16, [2] * n, [0] * n, [4], torch.float32)
    with pytest.raises(RuntimeError, match=f"need 1..{MAX_SLICES} lora_b tensors, got {n}"):
        torch.ops.fx_passes.qkvz_lora_(out, x, lora_a, lora_b, slice_a, starts)
    n = MAX_GROUPS + 1
    out, x, lora_a, lora_b, slice_a, starts = _make_case(3, 16, [2] * n, list(range(n)), [4] * n, torch.float32)
    with pytest.raises(RuntimeError, match=f"need 1..{MAX_GROUPS} lora_a tensors, got {n}"):
        lora_shrink_expand_(out, x, LoraSlices.of(lora_a, lora_b[:MAX_SLICES], slice_a[:MAX_SLICES],
                                                  starts[:MAX_SLICES]))
