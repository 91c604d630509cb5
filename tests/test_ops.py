"""The custom ops: opcheck, clear errors on bad input, the packed-weight GEMM, weight packing."""
from __future__ import annotations

import pytest
import torch

import fx_passes.ops  # noqa: F401
from fx_passes import pack_qkvz_weights
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs
from fx_passes.ops import qkvz_lora_reference, weights_are_packed

KEY, VALUE, HIDDEN, RANK = 8, 12, 16, 4
N_QKV = 2 * KEY + VALUE


def _lora_args(tokens=5, adapters=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lead = () if adapters is None else (adapters,)
    x = torch.randn(tokens, HIDDEN, generator=g, dtype=dtype)
    a_qkv = torch.randn(*lead, RANK, HIDDEN, generator=g, dtype=dtype)
    a_z = torch.randn(*lead, RANK, HIDDEN, generator=g, dtype=dtype)
    b_qkv = torch.randn(*lead, N_QKV, RANK, generator=g, dtype=dtype)
    b_z = torch.randn(*lead, VALUE, RANK, generator=g, dtype=dtype)
    b = [b_qkv[..., :KEY, :], b_qkv[..., KEY:2 * KEY, :], b_qkv[..., 2 * KEY:, :], b_z]
    out = torch.randn(tokens, N_QKV + VALUE, generator=g, dtype=dtype)
    return out, x, [a_qkv, a_z], b, [0, 0, 0, 1], [0, KEY, 2 * KEY, N_QKV]


def test_qkvz_lora_matches_two_unfused_loras():
    out, x, a, b, slice_a, starts = _lora_args()
    want = out.clone()
    b_qkv = torch.cat(b[:3])
    want[:, :N_QKV] += 0.5 * (x @ a[0].t()) @ b_qkv.t()
    want[:, N_QKV:] += 0.5 * (x @ a[1].t()) @ b[3].t()
    torch.ops.fx_passes.qkvz_lora_(out, x, a, b, slice_a, starts, None, None, 0.5)
    torch.testing.assert_close(out, want)


def test_qkvz_lora_token_mapping_and_scales():
    out, x, a, b, slice_a, starts = _lora_args(tokens=6, adapters=3)
    ids = torch.tensor([0, -1, 2, 1, 2, -1])
    scales = torch.tensor([1.0, 2.0, 0.5])
    got = out.clone()
    torch.ops.fx_passes.qkvz_lora_(got, x, a, b, slice_a, starts, ids, scales, 3.0)
    for t, adapter in enumerate(ids.tolist()):
        want = out[t].clone()
        if adapter >= 0:
            s = 3.0 * scales[adapter]
            want[:N_QKV] += s * (x[t] @ a[0][adapter].t()) @ torch.cat([bb[adapter] for bb in b[:3]]).t()
            want[N_QKV:] += s * (x[t] @ a[1][adapter].t()) @ b[3][adapter].t()
        torch.testing.assert_close(got[t], want)


@pytest.mark.parametrize("adapters", [None, 2])
def test_opcheck_qkvz_lora(adapters):
    out, x, a, b, slice_a, starts = _lora_args(adapters=adapters)
    ids = None if adapters is None else torch.tensor([0, 1, -1, 1, 0])
    scales = None if adapters is None else torch.tensor([0.5, 2.0])
    torch.library.opcheck(torch.ops.fx_passes.qkvz_lora_.default, (out, x, a, b, slice_a, starts, ids, scales, 2.0))


@pytest.mark.parametrize("count", [1, 2, 4])
def test_opcheck_qkvz_gemm(count):
    x = torch.randn(5, HIDDEN)
    weights = [torch.randn(n, HIDDEN) for n in (N_QKV, VALUE, 3, 3)[:count]]
    torch.library.opcheck(torch.ops.fx_passes.qkvz_gemm.default, (x, weights))


@pytest.mark.parametrize("bad, message", [
    (lambda o, x, a, b, sa, st: (o, x[:, :-1], a, b, sa, st), "H="),
    (lambda o, x, a, b, sa, st: (o[:-1], x, a, b, sa, st), "rows"),
    (lambda o, x, a, b, sa, st: (o, x, a, b, [0, 0, 0, 2], st), "names no lora_a"),
    (lambda o, x, a, b, sa, st: (o, x, a, b, sa, [0, KEY, 2 * KEY, N_QKV + 1]), "outside"),
    (lambda o, x, a, b, sa, st: (o, x, a, b, sa, [0, 1, 2 * KEY, N_QKV]), "overlap"),
    (lambda o, x, a, b, sa, st: (o, x, [a[0].half(), a[1]], b, sa, st), "dtype"),
    (lambda o, x, a, b, sa, st: (o, x, a, [b[0][:, :2], *b[1:]], sa, st), "rank"),
])
def test_qkvz_lora_bad_input_raises_clear_error(bad, message):
    args = bad(*_lora_args())
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fx_passes.qkvz_lora_(*args, None, None, 1.0)


def test_qkvz_lora_out_of_range_adapter_ids_select_no_adapter():
    """No error, no host sync: an id outside 0..L-1 is no adapter (as in every implementation,
    tests/test_op_semantics.py)."""
    out, x, a, b, slice_a, starts = _lora_args(adapters=2)
    got, want = out.clone(), out.clone()
    qkvz_lora_reference(got, x, a, b, slice_a, starts, torch.tensor([0, 1, 2, -7, 2 ** 33]))
    qkvz_lora_reference(want, x, a, b, slice_a, starts, torch.tensor([0, 1, -1, -1, -1]))
    torch.testing.assert_close(got, want)
    assert torch.equal(got[2:], out[2:])


def test_qkvz_gemm_packed_and_unpacked_agree():
    from fx_passes.ops.qkvz_gemm import packed_runs

    x = torch.randn(7, HIDDEN)
    packed = torch.randn(N_QKV + VALUE + 6, HIDDEN)
    w_qkv, w_z, w_b, w_a = packed[:N_QKV], packed[N_QKV:-6], packed[-6:-3], packed[-3:]
    assert weights_are_packed([w_qkv, w_z]) and weights_are_packed([w_qkv, w_z, w_b, w_a])
    assert not weights_are_packed([w_qkv.clone(), w_z.clone()])
    assert not weights_are_packed([w_z, w_qkv])
    assert not weights_are_packed([w_qkv, w_z, w_a, w_b])
    assert packed_runs([w_qkv, w_z, w_b.clone(), w_a.clone()]) == [(0, 2), (2, 1), (3, 1)]
    assert packed_runs([w_qkv.clone(), w_z, w_b, w_a]) == [(0, 1), (1, 3)]
    want = x @ packed.t()
    weights = [w_qkv, w_z, w_b, w_a]
    for layout in (weights, [w.clone() for w in weights], [w_qkv, w_z, w_b.clone(), w_a],
                   [w_qkv.clone(), w_z, w_b, w_a]):
        torch.testing.assert_close(torch.ops.fx_passes.qkvz_gemm(x, layout), want)
    torch.testing.assert_close(torch.ops.fx_passes.qkvz_gemm(x, [w_qkv, w_z]), want[:, :N_QKV + VALUE])
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.fx_passes.qkvz_gemm(x, [w_qkv.double(), w_z])
    with pytest.raises(RuntimeError, match="need 1..8 weights"):
        torch.ops.fx_passes.qkvz_gemm(x, [w_a] * 9)


def test_pack_qkvz_weights_is_memory_neutral_and_keeps_the_model():
    spec = TinyQwen35Spec(num_layers=2)
    model = add_lora(build_tiny_qwen35(spec))
    ids = example_inputs(spec)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    bytes_before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    params_before = [id(p) for p in model.parameters()]
    assert pack_qkvz_weights(model) == spec.num_gdn_layers
    gdn = model.base_model.model.model.layers[0].linear_attn
    weights = [gdn.in_proj_qkv.base_layer.weight, gdn.in_proj_z.base_layer.weight, gdn.in_proj_b.weight,
               gdn.in_proj_a.weight]
    assert weights_are_packed(weights)   # all four: the op's one GEMM over [W_qkv; W_z; W_b; W_a]
    assert [id(p) for p in model.parameters()] == params_before          # same Parameter objects
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(unique.values()) == bytes_before                            # no second copy of any weight
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
