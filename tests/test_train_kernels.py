"""The Triton kernels of ``fx_passes::qkvz_lora_train`` (forward expand-add) and
``fx_passes::qkvz_lora_train_grad`` (dS, dB) against the ops' plain-torch implementations.

Runs on the CPU through the Triton interpreter (fp16 base: the interpreter has no bf16), called directly on
CPU tensors with small column chunks and token splits, so dS sums several chunks per group and dB several
token splits, with tails in T, in the columns and in the rank.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops.kernels import lora_train  # noqa: E402
from fx_passes.ops.qkvz_lora_train import _add_lora_reference, lora_grads_reference, slice_owners  # noqa: E402

# (slice widths, slice_a, slice_start, ranks per group, projection widths): q | k | v | z of one adapter
# (+ b, a without LoRA); two adapters on the same columns (overlapping slices: two expand waves); a group of
# one slice between another group's slices, one projection
LAYOUTS = {
    "qkvz": ([24, 24, 40, 40], [0, 0, 0, 1], [0, 24, 48, 88], [8, 8], [88, 40, 4, 4]),
    "two_adapters": ([88, 40, 88, 40], [0, 1, 2, 3], [0, 88, 0, 88], [8, 8, 16, 5], [88, 40]),
    "interleaved": ([30, 20, 30], [0, 1, 0], [0, 30, 50], [12, 4], [80]),
}


def _case(T, layout, adapter_dtype, seed=0):
    """(per-projection tensors (outputs or their gradients), s, lora_b, slice_a, slice_start, scales, owners)"""
    widths, slice_a, slice_start, ranks, proj = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(T, r, generator=g).to(adapter_dtype) for r in ranks]
    lora_b = [torch.randn(n, ranks[a], generator=g).to(adapter_dtype) for n, a in zip(widths, slice_a)]
    scales = [0.5 + i for i in range(len(widths))]
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in proj]
    return dys, s, lora_b, slice_a, slice_start, scales, slice_owners(proj, slice_start, widths)


def _close(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_expand_add_matches_reference(layout, T, adapter_dtype):
    outs, s, lora_b, slice_a, slice_start, scales, owners = _case(T, layout, adapter_dtype)
    want = [o.clone() for o in outs]
    _add_lora_reference(want, s, lora_b, slice_a, owners, scales)
    got = [o.clone() for o in outs]
    lora_train.expand_add_(got, s, lora_b, slice_a, owners, slice_start, scales)
    assert not torch.equal(got[0], outs[0])
    for p in range(len(outs)):
        _close(got[p], want[p], torch.float16)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("T", [1, 70, 200])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_grads_match_reference(layout, T, adapter_dtype):
    dys, s, lora_b, slice_a, slice_start, scales, owners = _case(T, layout, adapter_dtype, seed=1)
    want_s, want_b = lora_grads_reference(dys, s, lora_b, slice_a, slice_start, scales, True)
    got_s = lora_train.lora_ds(dys, lora_b, slice_a, owners, scales, [t.shape[1] for t in s], chunk=32)
    got_b = lora_train.lora_db(dys, s, lora_b, slice_a, owners, scales, sms=4)
    assert [t.shape for t in got_s] == [t.shape for t in want_s]
    assert [t.shape for t in got_b] == [t.shape for t in want_b]
    for got, want in zip(got_s + got_b, want_s + want_b):
        assert got.dtype == adapter_dtype
        _close(got, want, adapter_dtype)


def test_a_slice_across_two_projections_is_refused():
    with pytest.raises(RuntimeError, match="crosses the projections"):
        slice_owners([88, 40], [80], [16])


def test_overlap_waves_keep_slice_order():
    # slices 0 and 2 share columns, 1 and 3 too: two launches, each slice after the earlier one on its columns
    assert lora_train.overlap_waves([0, 88, 0, 88], [88, 40, 88, 40]) == [[0, 1], [2, 3]]
    assert lora_train.overlap_waves([0, 24, 48, 88], [24, 24, 40, 40]) == [[0, 1, 2, 3]]
    assert lora_train.overlap_waves([0, 0, 0], [8, 8, 4]) == [[0], [1], [2]]


def test_db_token_splits_cover_every_token():
    # 1200 tokens: 3 splits of 8 x 64 tokens (the last one short) with many SMs, one with a single SM
    dys, s, lora_b, slice_a, slice_start, scales, owners = _case(1200, "qkvz", torch.float32, seed=2)
    _, want_b = lora_grads_reference(dys, s, lora_b, slice_a, slice_start, scales, True)
    for sms in (1, 64):
        got_b = lora_train.lora_db(dys, s, lora_b, slice_a, owners, scales, sms=sms)
        for got, want in zip(got_b, want_b):
            _close(got, want, torch.float32)


@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("shared", [True, False])
def test_shrink_and_input_grads_of_x_itself(T, shared):
    """fp16 x under fp32 adapters: s = x @ A^T, dA = ds^T @ x, d_x + sum ds @ A, x cast in registers
    (H 80: a tail in every column tile; T 70: in every token tile)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, 80, generator=g).to(torch.float16)
    lora_a = [torch.randn(8, 80, generator=g), torch.randn(5, 80, generator=g)]
    xs = [x, x] if shared else [x, torch.randn(T, 80, generator=g).to(torch.float16)]
    for got, xg, a in zip(lora_train.shrink(xs, lora_a), xs, lora_a):
        _close(got, xg.float() @ a.t(), torch.float32)
    ds = [torch.randn(T, 8, generator=g), torch.randn(T, 5, generator=g)]
    d_x = torch.randn(T, 80, generator=g).to(torch.float16)
    d_a, new = lora_train.input_grads(x, ds, lora_a, d_x, sms=4)
    for got, d in zip(d_a, ds):
        _close(got, d.t() @ x.float(), torch.float32)
    _close(new, d_x.float() + ds[0] @ lora_a[0] + ds[1] @ lora_a[1], torch.float16)
    assert lora_train.input_grads(x, ds, lora_a, None, sms=4)[1] is None


def test_the_ops_cuda_glue_matches_their_torch_implementations():
    """The ops' CUDA implementations (called directly on CPU tensors: the interpreter runs their kernels)
    against the same ops' torch implementations: a GDN-like layer with q | k | v | z LoRA, b / a without,
    x itself as the LoRA input (fp16 under fp32 adapters), then the three backward ops."""
    import importlib

    train = importlib.import_module("fx_passes.ops.qkvz_lora_train")
    g = torch.Generator().manual_seed(7)
    T, H = 70, 48
    widths = [88, 40, 4, 4]
    x = torch.randn(T, H, generator=g).to(torch.float16)
    weights = [(torch.randn(n, H, generator=g) * 0.2).to(torch.float16) for n in widths]
    lora_a = [torch.randn(8, H, generator=g) * 0.3, torch.randn(8, H, generator=g) * 0.3]
    lora_b = [torch.randn(88, 8, generator=g) * 0.3, torch.randn(40, 8, generator=g) * 0.3]
    args = (x, [x, x], weights, lora_a, lora_b, [0, 1], [0, 88], [2.0, 0.5])
    got_outs, got_s = train._train_cuda(*args)
    want_outs, want_s = torch.ops.fx_passes.qkvz_lora_train(*args)
    for got, want in zip(got_outs + got_s, want_outs + want_s):
        assert got.dtype == want.dtype and got.shape == want.shape
        _close(got, want, got.dtype if got.dtype == torch.float16 else torch.float32)
    dys = [torch.randn(T, n, generator=g).to(torch.float16) for n in widths]
    grad_args = (dys, want_s, lora_b, [0, 1], [0, 88], [2.0, 0.5], True)
    for got, want in zip(sum(train._grad_cuda(*grad_args), []), sum(torch.ops.fx_passes.qkvz_lora_train_grad(*grad_args), [])):
        _close(got, want, torch.float32)
    d_x = torch.ops.fx_passes.qkvz_grad_input(dys, weights)
    _close(train._grad_input(dys, weights), d_x, torch.float16)
    ds = [torch.randn(T, 8, generator=g), torch.randn(T, 8, generator=g)]
    got_a, got_dx = train._input_grad_cuda(x, ds, lora_a, d_x)
    want_a, want_dx = torch.ops.fx_passes.qkvz_lora_input_grad(x, ds, lora_a, d_x)
    for got, want in zip(got_a, want_a):
        _close(got, want, torch.float32)
    _close(got_dx, want_dx, torch.float16)


def test_shrink_of_a_column_strided_input_takes_the_library_path():
    """The kernels read rows of unit stride: a column-strided x (a view) goes through the library GEMM, with
    the same result as the op's torch implementation."""
    import importlib

    train = importlib.import_module("fx_passes.ops.qkvz_lora_train")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 96, generator=g).to(torch.float16)[:, ::2]
    lora_a = [torch.randn(8, 48, generator=g)]
    got, = train._shrink_cuda([x], lora_a)
    _close(got, x.float() @ lora_a[0].t(), torch.float32)
