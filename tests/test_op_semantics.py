"""One semantics for every implementation of the ops (the CPU op, and each CUDA path -- the LoRA kernels,
the fused decode kernel, the prefill kernel, the ranks-in-chunks path -- run here through the Triton
interpreter on CPU tensors): token ids outside 0..L-1 select no adapter, int64 ids are never truncated,
any LoRA rank, strided adapters."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops.kernels.gemm_lora_prefill import gemm_lora_prefill  # noqa: E402
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices, kernel_calls  # noqa: E402
from fx_passes.ops.qkvz_gemm_lora import _qkvz_gemm_lora_cuda  # noqa: E402
from fx_passes.ops.qkvz_lora import _qkvz_lora_cuda  # noqa: E402
from fx_passes.ops.tuning import PrefillLaunch  # noqa: E402
from test_qkvz_gemm_lora_kernel import SMALL, _assert_close, _case, _decode, _packed  # noqa: E402
BAD_IDS = [2 ** 32, 2 ** 32 + 1, -5, 3, 1000, -(2 ** 40)]    # with L = 3: none of them is an adapter


def _ids_case(T=11, dtype=torch.float16):
    args = list(_case(T, "qkvzba", dtype, adapters=3, seed=3))
    ids = args[6].to(torch.int64)
    ids[: len(BAD_IDS)] = torch.tensor(BAD_IDS)
    args[6] = ids
    valid = torch.where((ids >= 0) & (ids < 3), ids, -1)
    return args, valid


def _cpu_op(args, scale=1.5):
    return torch.ops.fx_passes.qkvz_gemm_lora(*args, scale)


IMPLEMENTATIONS = {
    "cpu_op": _cpu_op,
    "decode_kernel": lambda args: _decode(*args, 1.5, **SMALL),
    "prefill_kernel": lambda args: _prefill(*_packed_args(args), 1.5),
    "cuda_dispatch": lambda args: _qkvz_gemm_lora_cuda(*args, 1.5),
    "two_op_kernels": lambda args: _two_op(args),
}


def _packed_args(args):
    return (args[0], _packed(args[1]), *args[2:])


def _prefill(x, weights, *lora_args):
    return gemm_lora_prefill(x, weights, LoraSlices.of(*lora_args),
                             config=PrefillLaunch(16, 16, 16, 2, 4, num_programs=2))


def _two_op(args):
    out = torch.ops.fx_passes.qkvz_gemm(args[0], args[1])
    lora_shrink_expand_(out, args[0], LoraSlices.of(*args[2:], 1.5))
    return out


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_out_of_range_and_int64_ids_select_no_adapter(impl):
    """2**32 is not adapter 0, 2**32 + 1 not adapter 1: ids are compared at their own width, and every
    implementation gives rows with an id outside 0..L-1 exactly the base product."""
    args, valid = _ids_case()
    got = IMPLEMENTATIONS[impl](args)
    want_args = list(args)
    want_args[6] = valid

    def fp32(a):
        if isinstance(a, list):
            return [fp32(t) for t in a]
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    want = _cpu_op([fp32(a) for a in want_args])
    _assert_close(got, want, torch.float16)
    base = torch.ops.fx_passes.qkvz_gemm(args[0].float(), fp32(args[1]))
    rows = (valid < 0).nonzero().flatten()
    assert rows.numel() >= len(BAD_IDS)
    _assert_close(got[rows], base[rows], torch.float16)
    lora_rows = (valid >= 0).nonzero().flatten()
    assert (got[lora_rows].float() - base[lora_rows]).abs().max() > 0.05   # the LoRA did something elsewhere


def _lora_into(args, lora_op):
    out = torch.ops.fx_passes.qkvz_gemm(args[0], args[1])
    lora_op(out, args[0], *args[2:], 1.5)
    return out


ENTRY_POINTS = {   # what a caller (or Inductor's code) calls: the ops, on the CPU and on CUDA's paths
    "qkvz_gemm_lora": _cpu_op,
    "qkvz_gemm_lora_cuda": IMPLEMENTATIONS["cuda_dispatch"],
    "qkvz_gemm + qkvz_lora_": lambda args: _lora_into(args, torch.ops.fx_passes.qkvz_lora_),
    "qkvz_gemm + qkvz_lora_cuda": lambda args: _lora_into(args, _qkvz_lora_cuda),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_the_ops_compute_alike_inside_an_autocast_region(entry):
    """Called inside ``torch.autocast(bfloat16)`` each op gives what it gives outside one, to the bit, in its
    inputs' fp16 (autocast would cast the GEMMs of a CPU body to bf16 and leave the Triton kernels be)."""
    args, _ = _ids_case()
    plain = ENTRY_POINTS[entry](args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ENTRY_POINTS[entry](args)
    assert plain.dtype == under_autocast.dtype == torch.float16 and torch.equal(plain, under_autocast)


def _big_rank_case(ranks, T=5, adapters=None, dtype=torch.float32, strided=False, seed=0):
    """q, k, v share an A of rank ranks[0]; z has its own of rank ranks[1]."""
    g = torch.Generator().manual_seed(seed)
    lead = () if adapters is None else (adapters,)
    key, value, hidden = 8, 12, 24
    n_qkv = 2 * key + value

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rnd(T, hidden)
    w_qkv, w_z = rnd(n_qkv, hidden), rnd(value, hidden)
    a = [rnd(*lead, ranks[0], hidden, scale=hidden ** -0.5), rnd(*lead, ranks[1], hidden, scale=hidden ** -0.5)]
    b_qkv, b_z = rnd(*lead, n_qkv, ranks[0], scale=ranks[0] ** -0.5), rnd(*lead, value, ranks[1], scale=ranks[1] ** -0.5)
    if strided:   # what nn.Parameter(B.t().contiguous().t()) gives: the rank dim is not the contiguous one
        a = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in a]
        b_qkv, b_z = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (b_qkv, b_z))
        assert a[0].stride(-1) != 1 and b_z.stride(-1) != 1
    b = [b_qkv[..., :key, :], b_qkv[..., key:2 * key, :], b_qkv[..., 2 * key:, :], b_z]
    ids = scales = None
    if adapters is not None:
        ids = torch.tensor([0, -1, adapters - 1, 1, 0][:T])
        scales = torch.rand(adapters, generator=g) + 0.5
    return [x, [w_qkv, w_z], a, b, [0, 0, 0, 1], [0, key, 2 * key, n_qkv], ids, scales]


def _math(args, scale):
    """The op's definition in plain fp64 math."""
    x, weights, a, b, slice_a, starts, ids, scales = args
    out = torch.cat([x.double() @ w.double().t() for w in weights], 1)
    T = x.shape[0]
    for t in range(T):
        lid = 0 if ids is None else int(ids[t])
        if lid < 0:
            continue
        sc = scale * (1.0 if scales is None else float(scales[lid]))
        for i, (bb, g, start) in enumerate(zip(b, slice_a, starts)):
            aa = a[g] if a[g].dim() == 2 else a[g][lid]
            bl = bb if bb.dim() == 2 else bb[lid]
            out[t, start:start + bl.shape[0]] += sc * (x[t].double() @ aa.double().t()) @ bl.double().t()
    return out


@pytest.mark.parametrize("ranks, adapters, strided", [
    ((130, 160), None, False),      # LoraConfig(r=130); rank_pattern giving z 160
    ((256, 8), 2, False),           # rank 256 on qkv, several adapters
    ((16, 16), 2, True),            # strided A and B
    ((200, 64), None, True),        # both
])
@pytest.mark.parametrize("impl", ["cpu_op", "cuda_dispatch", "lora_op_cuda"])
def test_any_rank_and_strided_adapters(ranks, adapters, strided, impl):
    args = _big_rank_case(ranks, adapters=adapters, strided=strided)
    want = _math(args, 0.5)
    if impl == "cpu_op":
        got = torch.ops.fx_passes.qkvz_gemm_lora(*args, 0.5)
    elif impl == "cuda_dispatch":
        got = _qkvz_gemm_lora_cuda(*args, 0.5)
    else:
        got = torch.ops.fx_passes.qkvz_gemm(*args[:2])
        _qkvz_lora_cuda(got, args[0], *args[2:], 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_kernel_calls_split_ranks_and_copy_strided_adapters():
    args = _big_rank_case((300, 8), strided=True)
    a, b, slice_a, starts = args[2:6]
    calls = kernel_calls(a, b, slice_a, starts)
    assert len(calls) == 3                                      # ranks 128 + 128 + 44 of the shared A
    assert [len(c[1]) for c in calls] == [4, 3, 3]              # z (rank 8) only in the first chunk
    for ca, cb, sa, ss in calls:
        assert all(t.stride(-1) == 1 and t.shape[-2] <= 128 for t in ca)
        assert all(t.stride(-1) == 1 and t.shape[-1] <= 128 for t in cb)
        assert ss == starts[:len(cb)] and max(sa) < len(ca)
    plain = _big_rank_case((16, 16))
    (one,) = kernel_calls(*plain[2:6])
    assert one[0][0] is plain[2][0] and one[1][3] is plain[3][3]   # the common case copies nothing


def test_opcheck_with_big_rank_strided_adapters_and_int64_ids():
    args = _big_rank_case((140, 8), adapters=2, strided=True)
    args[6] = torch.tensor([0, 2 ** 32, -1, 1, 5])
    torch.library.opcheck(torch.ops.fx_passes.qkvz_gemm_lora.default, (*args, 2.0))
