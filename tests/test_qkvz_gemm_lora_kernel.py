"""``fx_passes::qkvz_gemm_lora``: the op (opcheck, errors, agreement with qkvz_gemm + qkvz_lora_) and its
small-T Triton kernel (GEMM with the LoRA expand in the epilogue) against the plain-torch reference.

The kernel runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported; fp32 and fp16 -- the interpreter has no bf16), called directly on CPU tensors with small
blocks so that every case has several column tiles per segment, several token tiles and K chunks.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops import dispatch, tuning  # noqa: E402
from fx_passes.ops.kernels.gemm_lora_decode import MAX_SEGMENTS, gemm_lora_decode, plan_decode, plan_segments  # noqa: E402
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402
from fx_passes.ops.qkvz_gemm import qkvz_gemm_accumulate_, weights_are_packed  # noqa: E402
from fx_passes.ops.qkvz_lora import qkvz_lora_reference  # noqa: E402

# relative to max |ref|: a wrong slice, segment, adapter, scale or dropped K chunk is O(1) off
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
KEY, VALUE, HIDDEN = 16, 24, 40            # H = 40: K chunks of 16 leave a masked tail
N_QKV = 2 * KEY + VALUE
NV = 8                                     # b / a: num_v_heads outputs each (far below one column tile)
N_ALL = N_QKV + VALUE + 2 * NV
SMALL = dict(block_n=16, block_k=16, block_t=16, num_stages=2, num_warps=4)
# the interpreter plans as for the device the tuning data was measured on (tuning.OFF_GPU_DEVICE)
ACCUMULATE_MIN_T = tuning.tuning_for(tuning.OFF_GPU_DEVICE).accumulate_min_t

# which projections carry LoRA -> (lora_b row ranges of B_qkv / B_z / B_b / B_a, slice_a, slice_start, weights:
# 2 = [W_qkv, W_z], 4 = [W_qkv, W_z, W_b, W_a])
LAYOUTS = {
    "qkvz": ([("qkv", 0, KEY), ("qkv", KEY, 2 * KEY), ("qkv", 2 * KEY, N_QKV), ("z", 0, VALUE)],
             [0, 0, 0, 1], [0, KEY, 2 * KEY, N_QKV], 2),
    "qkv_only": ([("qkv", 0, KEY), ("qkv", KEY, 2 * KEY), ("qkv", 2 * KEY, N_QKV)], [0, 0, 0], [0, KEY, 2 * KEY], 2),
    "z_only": ([("z", 0, VALUE)], [1], [N_QKV], 2),
    "four_groups": ([("qkv", 0, KEY), ("qkv", KEY, 2 * KEY), ("qkv", 2 * KEY, N_QKV), ("z", 0, VALUE)],
                    [0, 1, 2, 3], [0, KEY, 2 * KEY, N_QKV], 2),   # vLLM: a distinct A per slice
    # a GDN layer with b / a folded in: four weights, six slices q | k | v | z | b | a in four A groups
    "qkvzba": ([("qkv", 0, KEY), ("qkv", KEY, 2 * KEY), ("qkv", 2 * KEY, N_QKV), ("z", 0, VALUE), ("b", 0, NV),
                ("a", 0, NV)], [0, 0, 0, 1, 2, 3], [0, KEY, 2 * KEY, N_QKV, N_QKV + VALUE, N_QKV + VALUE + NV], 4),
    # four weights, LoRA on b / a only (the qkv / z columns are the GEMM alone)
    "ba_only": ([("b", 0, NV), ("a", 0, NV)], [2, 3], [N_QKV + VALUE, N_QKV + VALUE + NV], 4),
}
ROWS = {"qkv": N_QKV, "z": VALUE, "b": NV, "a": NV}


def _case(T, layout, dtype, *, adapters=None, rank=8, ab_dtype=None, seed=0):
    """``(x, weights, lora_a, lora_b, slice_a, slice_start, ids, scales)``."""
    g = torch.Generator().manual_seed(seed)
    ab_dtype = ab_dtype or dtype
    lead = () if adapters is None else (adapters,)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    x = rnd(T, HIDDEN)
    spans, slice_a, slice_start, n_weights = LAYOUTS[layout]
    names = ["qkv", "z", "b", "a"][:n_weights]
    weights = [rnd(ROWS[name], HIDDEN, scale=HIDDEN ** -0.5) for name in names]
    n_groups = max(slice_a) + 1
    lora_a = [rnd(*lead, rank, HIDDEN, scale=HIDDEN ** -0.5, dt=ab_dtype) for _ in range(n_groups)]
    full_b = {name: rnd(*lead, ROWS[name], rank, scale=rank ** -0.5 if name == "qkv" else 1.0, dt=ab_dtype)
              for name in names}
    lora_b = [full_b[which][..., lo:hi, :] for which, lo, hi in spans]
    ids = scales = None
    if adapters is not None:
        ids = torch.randint(-1, adapters, (T,), generator=g)
        ids[0] = adapters - 1        # at least one token with the last adapter ...
        if T > 1:
            ids[-1] = -1             # ... and one without any
        scales = torch.rand(adapters, generator=g) + 0.5
    return x, weights, lora_a, lora_b, slice_a, slice_start, ids, scales


def _decode(x, weights, lora_a, lora_b, slice_a, slice_start, ids, scales, scale, **force):
    """The decode kernel with a forced launch (``force``: tuning.decode_launch's arguments)."""
    lora = LoraSlices.of(lora_a, lora_b, slice_a, slice_start, ids, scales, scale)
    return gemm_lora_decode(x, weights, lora, config=plan_decode(x, weights, lora, **force))


def _base(x, weights):
    return torch.cat([x.float() @ w.float().t() for w in weights], 1)


def _reference(x, weights, lora_a, lora_b, slice_a, slice_start, ids, scales, scale):
    """fp32 base product + the LoRA reference, rounded once (what the fused kernel computes)."""
    out = _base(x, weights)
    qkvz_lora_reference(out, x, lora_a, lora_b, slice_a, slice_start, ids, scales, scale)
    return out


def _assert_close(got, want, dtype):
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"max error {err:.2e} (relative to max |ref|)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_kernel_matches_reference(T, layout, dtype):
    args = _case(T, layout, dtype)
    got = _decode(*args, 0.75, **SMALL)
    assert got.shape == (T, sum(w.shape[0] for w in args[1])) and got.dtype == dtype
    _assert_close(got, _reference(*args, 0.75), dtype)


# epilogue: the B tiles of 4 adapters loaded before the shrink wait (the default at <= 16 tokens), or of
# 2 at a time (the default above)
@pytest.mark.parametrize("block_t, adapter_tiles", [(16, 4), (32, 2), (16, 2)])
@pytest.mark.parametrize("adapters", [1, 3, 6])   # 1 / 3 / 6: the last batch of B loads partly past L
@pytest.mark.parametrize("T", [1, 20])
@pytest.mark.parametrize("rank", [8, 64])
def test_fused_kernel_mixed_adapters(T, rank, adapters, block_t, adapter_tiles):
    args = _case(T, "qkvz", torch.float16, adapters=adapters, rank=rank, seed=T)
    ids = args[6]
    if T > 2:
        ids[1] = adapters + 1    # an id >= L: no adapter, nothing read out of bounds
    got = _decode(*args, 1.5, **dict(SMALL, block_t=block_t, adapter_tiles=adapter_tiles))
    ref_args = list(args)
    ref_args[6] = torch.where(ids >= adapters, -1, ids)   # the same: no adapter
    _assert_close(got, _reference(*ref_args, 1.5), torch.float16)
    if T == 1:   # the one token has the last adapter
        return
    no_adapter = ((ids < 0) | (ids >= adapters)).nonzero().flatten()   # exactly the base product
    assert no_adapter.numel() > 0   # _case gives the last token no adapter
    _assert_close(got[no_adapter], _base(args[0], args[1])[no_adapter], torch.float16)


def test_fused_kernel_fp32_adapters_on_fp16_base():
    """PEFT's default on a 16-bit base: fp32 A/B, fp16 x and W; the output stays fp16."""
    args = _case(5, "qkvz", torch.float16, ab_dtype=torch.float32)
    got = _decode(*args, 2.0, **SMALL)
    assert got.dtype == torch.float16
    _assert_close(got, _reference(*args, 2.0), torch.float16)


def test_fused_kernel_default_launch_config():
    args = _case(3, "qkvz", torch.float32)
    _assert_close(_decode(*args, 1.0), _reference(*args, 1.0), torch.float32)


def test_plan_segments_cuts_at_weight_and_slice_boundaries():
    x, weights, _, lora_b, _, starts, _, _ = _case(1, "z_only", torch.float32)
    w_qkv, w_z = weights
    segments = plan_segments(weights, lora_b, starts)
    assert [(s.start, s.n, s.lora_slice) for s in segments] == [(0, N_QKV, None), (N_QKV, VALUE, 0)]
    # a slice straddling the W_qkv / W_z boundary is split in two segments with matching B rows
    b = torch.randn(2 * VALUE, 4)
    segments = plan_segments(weights, [b], [N_QKV - VALUE])
    assert [(s.start, s.n, s.lora_slice) for s in segments] == [
        (0, N_QKV - VALUE, None), (N_QKV - VALUE, VALUE, 0), (N_QKV, VALUE, 0)]
    assert segments[2].b.data_ptr() == b[VALUE:].data_ptr()
    # four weights, b / a with LoRA: every weight and slice boundary, each segment's rows of its weight
    _, weights4, _, lora_b4, _, starts4, _, _ = _case(1, "qkvzba", torch.float32)
    segments = plan_segments(weights4, lora_b4, starts4)
    assert [(s.start, s.n, s.lora_slice) for s in segments] == [
        (0, KEY, 0), (KEY, KEY, 1), (2 * KEY, VALUE, 2), (N_QKV, VALUE, 3), (N_QKV + VALUE, NV, 4),
        (N_QKV + VALUE + NV, NV, 5)]
    assert segments[5].w.data_ptr() == weights4[3].data_ptr() and segments[1].w.data_ptr() == weights4[0][KEY:].data_ptr()
    # more than MAX_SEGMENTS segments (here 10: 4 gaps, 4 slices, 2 weight tails) do not fit the kernel:
    # the op falls back to GEMM + qkvz_lora_
    small = [torch.randn(4, 4)] * 4
    assert MAX_SEGMENTS < 10 and plan_segments(weights, small, [2, 10, 20, 30]) is None
    assert len(plan_segments(weights, small[:2], [2, 10])) == 6
    # nor does a weight whose K dim is strided (the kernel assumes unit stride along K)
    w_t = torch.randn(HIDDEN, N_QKV).t()
    assert w_t.shape == w_qkv.shape and w_t.stride(1) != 1
    assert plan_segments([w_t, w_z], lora_b, starts) is None


# ----------------------------------------------------------------------------- large-T (prefill) path
def _packed(weights):
    buf, row, views = torch.cat(weights), 0, []
    for w in weights:
        views.append(buf[row:row + w.shape[0]])
        row += w.shape[0]
    return views


@pytest.mark.parametrize("T", [70, ACCUMULATE_MIN_T + 3])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("layout, adapters", [("qkvz", None), ("qkvz", 3), ("four_groups", 2), ("qkv_only", 2),
                                              ("qkvzba", 2), ("ba_only", None)])
def test_prefill_path_matches_reference(layout, adapters, packed, T, monkeypatch):
    """From ACCUMULATE_MIN_T tokens with full column coverage: LoRA delta written first, then the GEMM
    accumulates (beta = 1). Fewer tokens, or qkv_only (z columns without LoRA): GEMM, then the LoRA
    added. Same result either way."""
    accumulated = []
    monkeypatch.setattr(dispatch, "qkvz_gemm_accumulate_", lambda *a: accumulated.append(1) or qkvz_gemm_accumulate_(*a))
    x, weights, *rest = _case(T, layout, torch.float32, adapters=adapters, seed=3)
    if packed:
        weights = _packed(weights)
        assert weights_are_packed(weights)
    args = (x, weights, *rest)
    lora = LoraSlices.of(*rest, 1.25)
    path = dispatch.gemm_lora_path(x, weights, lora)
    got = dispatch.gemm_lora(x, weights, lora)
    full = T >= ACCUMULATE_MIN_T and layout not in ("qkv_only", "ba_only")
    assert bool(accumulated) == full and path == ("accumulate" if full else "gemm_then_lora")
    _assert_close(got, _reference(*args, 1.25), torch.float32)
    if adapters is not None:   # tokens with id -1 get exactly the base product (their delta rows are 0)
        rows = (rest[-2] == -1).nonzero().flatten()
        _assert_close(got[rows], _base(x, weights)[rows], torch.float32)


@pytest.mark.parametrize("adapters", [None, 3])
def test_lora_kernel_write_mode_stores_delta_without_reading_out(adapters):
    """``accumulate=False``: every row of the slices' columns is written (0 without an adapter); the
    NaNs the output held are never read."""
    x, weights, a, b, slice_a, starts, ids, scales = _case(37, "qkvz", torch.float32, adapters=adapters)
    out = torch.full((37, N_QKV + VALUE), float("nan"))
    lora_shrink_expand_(out, x, LoraSlices.of(a, b, slice_a, starts, ids, scales, 0.5), accumulate=False)
    want = torch.zeros_like(out)
    qkvz_lora_reference(want, x, a, b, slice_a, starts, ids, scales, 0.5)
    assert not out.isnan().any()
    _assert_close(out, want, torch.float32)


def test_shrink_split_k_choice():
    """The decode shrink's split-K cap: a rule on T (partial rows), twice as many rows with several
    adapters mixed per token, none for fp32 adapters (their shrink is the slow part). No per-shape entry:
    the same shape and T give the same cap on any K / N."""
    bf16 = torch.bfloat16

    def shrink_ksplit(T, K, N, rank, adapters, dtype, ids=True):
        a = torch.empty(adapters, rank, K, dtype=dtype, device="meta")
        token_ids = torch.zeros(T, dtype=torch.int32, device="meta") if ids and adapters > 1 else None
        lora = LoraSlices.of([a], [torch.empty(adapters, N, rank, dtype=dtype, device="meta")], [0], [0], token_ids)
        return tuning._decode_ksplit_cap(T, lora)

    rows, mixed = tuning.DECODE_SHRINK_PARTIAL_ROWS, tuning.DECODE_SHRINK_PARTIAL_ROWS_MIXED
    for K, N in ((5120, 16384), (2048, 12288), (1536, 6000)):
        assert shrink_ksplit(16, K, N, 16, 1, bf16) == rows // 16
        assert shrink_ksplit(64, K, N, 64, 1, bf16) == max(1, rows // 64)
        assert shrink_ksplit(16, K, N, 16, 4, bf16) == mixed // 16
        assert shrink_ksplit(64, K, N, 16, 4, bf16) == mixed // 64
        assert shrink_ksplit(16, K, N, 16, 4, bf16, ids=False) == rows // 16   # stacked, no ids: one adapter
        assert shrink_ksplit(64, K, N, 16, 1, torch.float32) is None
    assert mixed > rows


@pytest.mark.parametrize("folded", [False, True])
def test_shrink_split_cap_yields_when_it_would_spill_the_gemm_wave(folded):
    """27B widths at T = 16 (cap: split-K 2; 128-column tiles; 132 SMs planned): q | k | v | z is 128 GEMM
    tiles + 2 groups x 2 shrink programs = 132, the cap stays. With b / a folded in, 130 tiles + 4 groups
    x 2 = 138: GEMM tiles would wait for shrink programs, so the uncapped split (short programs)."""
    meta = dict(dtype=torch.bfloat16, device="meta")
    rows = [10240, 6144] + ([48, 48] if folded else [])
    slices = [2048, 2048, 6144, 6144] + ([48, 48] if folded else [])
    starts = [sum(slices[:i]) for i in range(len(slices))]
    slice_a = [0, 0, 0, 1, 2, 3][:len(slices)]
    lora = LoraSlices.of([torch.empty(16, 5120, **meta) for _ in range(max(slice_a) + 1)],
                         [torch.empty(n, 16, **meta) for n in slices], slice_a, starts)
    cfg = plan_decode(torch.empty(16, 5120, **meta), [torch.empty(n, 5120, **meta) for n in rows], lora)
    assert cfg.block_n == 128 and tuning._decode_ksplit_cap(16, lora) == 2
    assert (cfg.shrink.ksplit > 2) if folded else (cfg.shrink.ksplit == 2)


@pytest.mark.parametrize("T, K, widths, want", [
    # <= 16 tokens: 128-column tiles (one per SM) while they fit one wave of 132 SMs
    (4, 5120, [2048, 2048, 6144, 6144, 48, 48], 0),        # 27B, b / a folded: 130 tiles
    (4, 2048, [2048, 2048, 4096, 4096, 32, 32], 0),        # 35B-A3B: 98
    (4, 4096, [2048, 2048, 8192, 8192, 64, 64], 1),        # 397B-A17B: 162 > 132 -> 64 columns, 3 per SM
    (4, 3072, [20000], 1),                                  # any shape past one wave (157 tiles)
    (4, 3072, [10000], 0),                                  # 79 tiles
    # 17-64 tokens: 64-column tiles, two per SM at 64-token tiles (264 programs), else 128 x 64
    (48, 5120, [2048, 2048, 6144, 6144, 48, 48], 0),       # 258 tiles
    (48, 4096, [2048, 2048, 8192, 8192, 64, 64], 1),       # 322
    (24, 4096, [2048, 2048, 8192, 8192, 64, 64], 0),       # 32-token tiles: three per SM, 396
])
def test_decode_blocks_rule(T, K, widths, want):
    """The decode tiles come from the residency-wave rule (no per-shape table): the preferred blocks
    while all column tiles are resident at once on the planned device, else the narrower ones."""
    cfg = tuning.decode_launch(T, K, sum(widths), torch.device("cpu"), torch.bfloat16, widths=widths)
    bucket = 16 if T <= 16 else 64
    assert (cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps) == tuning.DECODE_BLOCKS[bucket][want]


@pytest.mark.parametrize("T", [1, 8, 24, 64])
@pytest.mark.parametrize("adapters, ids, mixed", [(4, True, True), (4, False, False), (1, True, False)])
def test_decode_blocks_with_mixed_adapters(T, adapters, ids, mixed):
    """Several adapters mixed per token (token ids): 64-column tiles at every decode T, also where the
    wave rule picks 128 columns (397B widths); stacked adapters without ids and one adapter keep the rule."""
    meta = dict(dtype=torch.bfloat16, device="meta")
    widths = [2048, 2048, 8192, 8192, 64, 64]
    starts = [sum(widths[:i]) for i in range(6)]
    lora = LoraSlices.of([torch.empty(adapters, 16, 4096, **meta) for _ in range(4)],
                         [torch.empty(adapters, n, 16, **meta) for n in widths], [0, 0, 0, 1, 2, 3], starts,
                         torch.zeros(T, dtype=torch.int32, device="meta") if ids else None)
    cfg = tuning.decode_launch(T, 4096, sum(widths), torch.device("cpu"), torch.bfloat16, lora, widths=widths)
    rule = tuning.decode_launch(T, 4096, sum(widths), torch.device("cpu"), torch.bfloat16, widths=widths)
    got = (cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps)
    assert got == (tuning.DECODE_BLOCKS_MIXED if mixed else (rule.block_n, rule.block_k, rule.num_stages,
                                                             rule.num_warps))
    if T > 32:   # 397B widths at 64-token tiles: the wave rule's choice is 128 columns
        assert rule.block_n == 128


# ------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("layout", ["qkvz", "qkvzba"])
def test_op_equals_qkvz_gemm_then_qkvz_lora(layout):
    x, weights, a, b, slice_a, starts, ids, scales = _case(6, layout, torch.float32, adapters=2)
    got = torch.ops.fx_passes.qkvz_gemm_lora(x, weights, a, b, slice_a, starts, ids, scales, 0.5)
    want = torch.ops.fx_passes.qkvz_gemm(x, weights)
    torch.ops.fx_passes.qkvz_lora_(want, x, a, b, slice_a, starts, ids, scales, 0.5)
    torch.testing.assert_close(got, want)
    delta = got - torch.ops.fx_passes.qkvz_gemm(x, weights)
    for start, lora_b in zip(starts, b):   # the LoRA reaches every slice (b / a too)
        assert delta[:, start:start + lora_b.shape[-2]].abs().max() > 1e-2


@pytest.mark.parametrize("layout, adapters", [("qkvz", None), ("qkvz", 2), ("qkvzba", 2)])
def test_opcheck_qkvz_gemm_lora(layout, adapters):
    x, weights, a, b, slice_a, starts, ids, scales = _case(5, layout, torch.float32, adapters=adapters)
    torch.library.opcheck(torch.ops.fx_passes.qkvz_gemm_lora.default,
                          (x, weights, a, b, slice_a, starts, ids, scales, 2.0))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.__setitem__(1, [a[1][0].double(), a[1][1]]), "dtypes differ"),
    (lambda a: a.__setitem__(0, a[0][:, :-1]), "hidden size mismatch"),
    (lambda a: a.__setitem__(5, [0, KEY, 2 * KEY, N_QKV + 1]), "outside out's"),
    (lambda a: a.__setitem__(4, [0, 0, 0, 2]), "names no lora_a"),
    (lambda a: a.__setitem__(1, []), "need 1..8 weights"),
])
def test_op_bad_input_raises_clear_error(mutate, message):
    args = list(_case(4, "qkvz", torch.float32))
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fx_passes.qkvz_gemm_lora(*args, 1.0)


# ------------------------------------------------------------------------------------------------
# The plan cache: checks and launch planning once per call signature
# ------------------------------------------------------------------------------------------------
def _walk_tensors(obj, seen=None):
    """Every tensor reachable through dataclass fields / tuples of ``obj``."""
    import dataclasses as dc
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dc.is_dataclass(obj):
        for f in dc.fields(obj):
            yield from _walk_tensors(getattr(obj, f.name))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _walk_tensors(item)


@pytest.mark.parametrize("T", [5, ACCUMULATE_MIN_T + 3])
def test_plan_cache_checks_once_per_signature_and_keeps_no_tensors(T):
    """The first call of a signature runs the op's checks and plans; a second call with other tensors of
    the same signature (new values, new storage) reuses the plan, checks nothing and computes ITS result;
    a call that changes metadata (T, strides of an adapter, weights no longer adjacent) plans anew.
    A plan holds no tensor (it would keep weights alive)."""
    cache = dispatch.PlanCache()
    checks = []
    x, weights, *rest = _case(T, "qkvzba", torch.float32, adapters=2, seed=11)
    weights = _packed(weights)
    lora = LoraSlices.of(*rest, 0.5)
    plan = cache.get(x, tuple(weights), lora, lambda: checks.append(1))
    assert checks == [1] and plan.path == ("decode" if T <= 64 else "accumulate")
    assert not list(_walk_tensors(plan))

    x2, weights2, *rest2 = _case(T, "qkvzba", torch.float32, adapters=2, seed=12)
    weights2 = _packed(weights2)
    assert cache.get(x2, tuple(weights2), LoraSlices.of(*rest2, 0.5), lambda: checks.append(1)) is plan
    assert checks == [1]

    x3 = torch.cat([x2, x2[:1]])                                    # T + 1
    cache.get(x3, tuple(weights2), LoraSlices.of(*rest2, 0.5), lambda: checks.append(1))
    unpacked = [w.clone() for w in weights2]                        # same shapes, not adjacent any more
    cache.get(x2, tuple(unpacked), LoraSlices.of(*rest2, 0.5), lambda: checks.append(1))
    a, b, *tail = rest2
    b_strided = [b[0].transpose(-1, -2).contiguous().transpose(-1, -2)] + list(b[1:])   # same values
    cache.get(x2, tuple(weights2), LoraSlices.of(a, b_strided, *tail, 0.5), lambda: checks.append(1))
    assert checks == [1, 1, 1, 1]
    assert len(cache._plans) == 4


def test_gemm_lora_with_a_cached_plan_matches_the_reference_and_still_rejects_bad_input(monkeypatch):
    """Through dispatch.gemm_lora (what the op's CUDA kernel calls): repeated calls hit the plan and give
    each call's own result; a bad call (overlapping slices) is a new signature and fails the op's check."""
    monkeypatch.setattr(dispatch, "PLANS", dispatch.PlanCache())
    for seed in (1, 2):
        x, weights, *rest = _case(9, "qkvz", torch.float32, adapters=3, seed=seed)
        checks = []
        got = dispatch.gemm_lora(x, tuple(weights), LoraSlices.of(*rest, 1.5), check=lambda: checks.append(1))
        _assert_close(got, _reference(x, weights, *rest, 1.5), torch.float32)
        assert checks == ([1] if seed == 1 else [])
    a, b, slice_a, starts, ids, scales = rest
    bad_starts = list(starts)
    bad_starts[1] = starts[0] + 1       # slice 1 overlaps slice 0

    def check():
        from fx_passes.ops.qkvz_gemm_lora import _check
        _check(x, weights, a, b, slice_a, bad_starts, ids, scales)
    with pytest.raises(RuntimeError, match="overlap"):
        dispatch.gemm_lora(x, tuple(weights), LoraSlices.of(a, b, slice_a, bad_starts, ids, scales, 1.5), check=check)
