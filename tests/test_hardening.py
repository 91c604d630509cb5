"""The pass never breaks a compile, and takes what the op can take: PEFT ranks above 128 (also per
projection through ``rank_pattern``), a bias on in_proj_qkv / in_proj_z, adapters with a strided last
dim, autocast, fp64 adapters (skipped with a true reason) -- on the real tiny Qwen3.5 with real PEFT
through real Inductor, numerics against eager (and, for the rank-1 forms Inductor rewrites, against
Inductor's compile without the pass)."""
from __future__ import annotations

import pytest
import torch

from fx_passes import FxPassesBackend
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs
from fusion_helpers import RecordingPass, assert_fused, compile_with_pass

SPEC = TinyQwen35Spec(num_layers=2)     # one GDN layer
GDN = SPEC.num_gdn_layers


def _peft(model, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = dict(dict(r=8, lora_alpha=16, target_modules=["in_proj_qkv", "in_proj_z"], init_lora_weights=False),
                  **config)
    return get_peft_model(model, LoraConfig(**config)).eval()


def _with_bias(model):
    """A modified Qwen3.5 whose GDN projections carry a bias (the weights are kept)."""
    for layer in model.model.layers:
        gdn = getattr(layer, "linear_attn", None)
        if gdn is None:
            continue
        for name in ("in_proj_qkv", "in_proj_z"):
            old = getattr(gdn, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.normal_()
            setattr(gdn, name, new)
    return model


def _lora_modules(model, kind):
    return [m for name, m in model.named_modules() if name.endswith(f".{kind}.default")]


@pytest.mark.parametrize("config, lora_ops", [
    (dict(r=130, lora_alpha=32), 1),                                     # every rank above the kernels' 128
    # z alone above it, with its own scale: qkv and z then need one LoRA op each
    (dict(r=8, rank_pattern={"in_proj_z": 160}, alpha_pattern={"in_proj_z": 4}), 2),
    (dict(r=256, use_rslora=True), 1),
])
def test_ranks_above_128_are_rewritten(config, lora_ops):
    model = _peft(build_tiny_qwen35(SPEC), **config)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_fused(run, layers=GDN, lora_ops_per_layer=lora_ops, mm_removed=8 * GDN)


@pytest.mark.parametrize("lora", [True, False])
def test_bias_on_the_projections_is_kept(lora):
    model = _with_bias(build_tiny_qwen35(SPEC))
    if lora:
        model = _peft(model)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    # the base GEMMs with bias are addmm(bias, x, W.T): the LoRA mms and b / a (no bias) count as mm
    assert_fused(run, layers=GDN, lora_ops_per_layer=1 if lora else 0, mm_removed=(6 if lora else 2) * GDN)
    assert run.op_count("aten.addmm.default", "before") - run.op_count("aten.addmm.default", "after") == 2 * GDN


def test_strided_adapter_parameters_are_rewritten():
    model = _peft(build_tiny_qwen35(SPEC))
    for module in _lora_modules(model, "lora_A") + _lora_modules(model, "lora_B"):
        weight = module.weight
        module.weight = torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
        assert module.weight.stride(-1) != 1
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_fused(run, layers=GDN, lora_ops_per_layer=1, mm_removed=8 * GDN)


def test_autocast_is_rewritten():
    model = _peft(build_tiny_qwen35(SPEC))
    ids = example_inputs(SPEC)
    fusion_pass = RecordingPass()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(input_ids=ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend=FxPassesBackend(fusion_pass=fusion_pass))(input_ids=ids).logits
    layers = [layer for report in fusion_pass.reports for layer in report.layers]
    assert len(layers) == GDN and all(layer.rewritten for layer in layers), [l.line() for l in layers]
    torch.testing.assert_close(got.float(), eager.float(), rtol=3e-2, atol=3e-2)


def test_fp64_adapters_are_skipped_with_a_true_reason():
    model = _peft(build_tiny_qwen35(SPEC))
    for module in _lora_modules(model, "lora_A") + _lora_modules(model, "lora_B"):
        module.double()
    ids = example_inputs(SPEC)
    fusion_pass = RecordingPass()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        got = torch.compile(model, backend=FxPassesBackend(fusion_pass=fusion_pass))(input_ids=ids).logits
    (layer,) = [layer for report in fusion_pass.reports for layer in report.layers]
    assert not layer.rewritten
    assert "float64" in layer.reason and "expected torch.float64" not in layer.reason, layer.reason
    torch.testing.assert_close(got, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_1_with_one_token_is_rewritten(dtype):
    """One token and rank 1: Inductor turns the [1, H] x [H, 1] shrink into a dot product (mul + sum),
    a second form of the shrink the matcher reads."""
    model = _peft(build_tiny_qwen35(SPEC, dtype=dtype), r=1)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC, batch=1, seq=1), compare_unfused=True)
    # 4 base GEMMs + 2 expands are mms; the 2 shrinks are the dot form
    assert_fused(run, layers=GDN, lora_ops_per_layer=1, mm_removed=6 * GDN, dtype=dtype)
    assert run.op_count("aten.sum.dim_IntList", "before") - run.op_count("aten.sum.dim_IntList", "after") == 2 * GDN


def test_rank_1_expand_as_outer_product_is_rewritten():
    """Rank 1 on in_proj_z, 8 tokens, z 16 wide (random configuration 286 of tests/property_check.py):
    Inductor makes the [T, 1] x [1, N] expand an outer product, mul(shrink, B^T), the rank-1 form of the
    expand the matcher reads. Before, the layer was skipped ("LoRA term: expected mm(shrink, permute(B))")."""
    import property_check

    cfg = property_check.draw(286)
    assert cfg.z_rank == 1 and cfg.targets == ("in_proj_z",) and cfg.adapters == 2
    run = compile_with_pass(property_check.build(cfg), **property_check.inputs(cfg), compare_unfused=True)
    # mms: 4 base GEMMs + the 2 adapters' shrinks; the 2 expands are muls (2 more muls: the scales)
    assert_fused(run, layers=GDN, lora_ops_per_layer=2, mm_removed=6 * GDN)
    assert run.op_count("aten.mul.Tensor", "before") - run.op_count("aten.mul.Tensor", "after") == 4 * GDN
