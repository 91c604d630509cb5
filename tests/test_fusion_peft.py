"""The qkvz + LoRA fusion on real transformers Qwen3.5 / Qwen3.5-MoE models with real PEFT adapters."""
from __future__ import annotations

import pytest
import torch

from fx_passes.config import QkvzFusionConfig
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs
from fusion_helpers import RecordingPass, assert_fused, assert_unchanged, compile_with_pass, gdn_projections

# one GDN layer (2 decoder layers; a compile's time grows with the layers), and two GDN layers in one graph for
# the fp32 form (as in tests/test_front_door.py, the demo and the training tests)
SPEC = TinyQwen35Spec(num_layers=2)
GDN = SPEC.num_gdn_layers
TWO_GDN_LAYERS = {"fp32"}


ALL_FOUR = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
# form -> (model kwargs, lora kwargs, lora ops per layer, LoRA terms per layer, compare with unfused compile)
# every form is compared with eager; the unfused compile (a second compile, as long as the first) for one fp32
# and one bf16 form
FORMS = {
    "fp32": (dict(), dict(), 1, 2, True),
    "bf16_base_fp32_adapters": (dict(dtype=torch.bfloat16), dict(), 1, 2, True),
    "bf16_adapters_bf16": (dict(dtype=torch.bfloat16), dict(autocast_adapter_dtype=False), 1, 2, False),
    "two_active_adapters": (dict(), dict(adapters=("default", "second")), 2, 4, False),
    "lora_on_qkv_only": (dict(), dict(targets=("in_proj_qkv",)), 1, 1, False),
    "lora_on_z_only": (dict(), dict(targets=("in_proj_z",)), 1, 1, False),
    "moe": (dict(moe=True), dict(), 1, 2, False),
    # b / a with their own LoRA: six slices q | k | v | z | b | a in four A groups
    "lora_on_all_four": (dict(), dict(targets=ALL_FOUR), 1, 4, False),
    "lora_on_all_four_bf16": (dict(dtype=torch.bfloat16), dict(targets=ALL_FOUR), 1, 4, False),
    "lora_on_all_four_moe_two_adapters": (dict(moe=True), dict(targets=ALL_FOUR, adapters=("default", "second")),
                                          2, 8, False),
    "lora_on_b_and_a_only": (dict(), dict(targets=("in_proj_b", "in_proj_a")), 1, 2, False),
    "lora_on_z_and_a": (dict(), dict(targets=("in_proj_z", "in_proj_a")), 1, 2, False),
    "all_linear": (dict(), dict(targets="all-linear"), 1, 4, False),
}

SLICES = {"in_proj_qkv": ["q", "k", "v"], "in_proj_z": ["z"], "in_proj_b": ["b"], "in_proj_a": ["a"]}


@pytest.mark.parametrize("form", list(FORMS))
def test_peft_forms_fuse_every_gdn_layer(form):
    model_kwargs, lora_kwargs, lora_ops, lora_terms, compare_unfused = FORMS[form]
    model_kwargs = dict(model_kwargs)
    spec = TinyQwen35Spec(num_layers=4 if form in TWO_GDN_LAYERS else SPEC.num_layers,
                          moe=model_kwargs.pop("moe", False))
    gdn = spec.num_gdn_layers
    model = add_lora(build_tiny_qwen35(spec, **model_kwargs), **lora_kwargs)
    run = compile_with_pass(model, input_ids=example_inputs(spec), compare_unfused=compare_unfused)
    assert_fused(run, layers=gdn, lora_ops_per_layer=lora_ops, mm_removed=gdn * (4 + 2 * lora_terms),
                 dtype=model_kwargs.get("dtype", torch.float32))
    for layer in run.layers:
        assert layer.identified_by == "module_path" and ".linear_attn" in layer.layer
        assert layer.slice_sizes == [SPEC.key_dim, SPEC.key_dim, SPEC.value_dim, SPEC.value_dim,
                                     SPEC.linear_num_value_heads, SPEC.linear_num_value_heads]
        targets = lora_kwargs.get("targets", ("in_proj_qkv", "in_proj_z"))
        targets = ALL_FOUR if targets == "all-linear" else targets
        assert layer.shared_a == ("in_proj_qkv" in targets)
        if lora_ops == 1:   # the slices of every targeted projection, in column order
            assert layer.lora_slices == [[s for name in ALL_FOUR if name in targets for s in SLICES[name]]]


def test_no_lora_still_fuses_the_base_pair():
    model = build_tiny_qwen35(SPEC)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_fused(run, layers=GDN, lora_ops_per_layer=0, mm_removed=4 * GDN)


def test_dynamic_shapes_with_tensor_scale():
    """dynamic=True: symbolic token count; PEFT's scaling becomes a 0-d graph input."""
    model = add_lora(build_tiny_qwen35(SPEC))
    run = compile_with_pass(model, input_ids=example_inputs(SPEC, seq=7), dynamic=True, compare_unfused=True)
    # qkv and z scales are two graph inputs the pass cannot prove equal: one LoRA op each
    assert_fused(run, layers=GDN, lora_ops_per_layer=2, mm_removed=GDN * 8)
    assert all(layer.lora_slices == [["q", "k", "v"], ["z"]] for layer in run.layers)


def test_packed_weights_are_seen_at_compile_time():
    from fx_passes import pack_qkvz_weights

    model = add_lora(build_tiny_qwen35(SPEC))
    assert pack_qkvz_weights(model) == GDN
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_fused(run, layers=GDN, lora_ops_per_layer=1, mm_removed=GDN * 8)
    assert all(layer.weights_packed for layer in run.layers)


def test_structural_fallback_without_module_paths():
    """Graphs with no nn_module_stack: found by shape + the [k, k, v] split downstream."""
    def strip_module_paths(graph):
        for node in graph.nodes:
            node.meta.pop("nn_module_stack", None)

    model = add_lora(build_tiny_qwen35(SPEC))
    run = compile_with_pass(model, input_ids=example_inputs(SPEC),
                            fusion_pass=RecordingPass(before_hook=strip_module_paths))
    assert_fused(run, layers=GDN, lora_ops_per_layer=1, mm_removed=GDN * 8)
    assert all(layer.identified_by == "structure" for layer in run.layers)


def test_llama_lora_on_qkv_is_left_alone():
    """Sibling q/k/v linears with LoRA that are not a GDN layer: same graph with and without the pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = add_lora(LlamaForCausalLM(config).eval(), targets=("q_proj", "k_proj", "v_proj"))
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_unchanged(run)
    assert run.layers == []

    def strip_module_paths(graph):  # the structural fallback must not grab q/k/v either
        for node in graph.nodes:
            node.meta.pop("nn_module_stack", None)

    run = compile_with_pass(model, input_ids=example_inputs(SPEC),
                            fusion_pass=RecordingPass(before_hook=strip_module_paths))
    assert_unchanged(run)


# ------------------------------------------------------------------ 2-D projections: the addmm form

def test_inductor_addmm_form():
    run = compile_with_pass(gdn_projections(), torch.randn(8, SPEC.hidden_size))
    assert run.op_count("aten.addmm.default", "before") == 2   # Inductor folded each base GEMM + LoRA add
    # this graph calls in_proj_qkv / in_proj_z only: the two are the op
    assert_fused(run, layers=1, lora_ops_per_layer=1, mm_removed=4, folded=["in_proj_qkv", "in_proj_z"])
    assert run.op_count("aten.addmm.default") == 0


# ------------------------------------------------------------------ bail-outs: graph unchanged + reason

# Training graphs with the training rewrite off (FX_PASSES_FUSE_TRAINING=0): the post-grad pass meets them
# as AOTAutograd partitioned them, and must leave them alone.
NO_TRAINING_REWRITE = QkvzFusionConfig(fuse_training=False)


def test_training_with_dropout_is_not_rewritten():
    model = add_lora(build_tiny_qwen35(SPEC), dropout=0.1).train()
    torch.manual_seed(0)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC), grad=True,
                            fusion_pass=RecordingPass(NO_TRAINING_REWRITE))
    assert run.fusion_pass.graphs_before == run.fusion_pass.graphs_after
    skipped = [layer for layer in run.layers if not layer.rewritten]
    assert len(skipped) == GDN and run.fusion_pass.matched_count == 0
    assert all("dropout" in layer.reason and layer.node for layer in skipped), [l.line() for l in skipped]


def test_training_saved_for_backward_is_not_rewritten():
    model = add_lora(build_tiny_qwen35(SPEC)).train()
    run = compile_with_pass(model, input_ids=example_inputs(SPEC), grad=True,
                            fusion_pass=RecordingPass(NO_TRAINING_REWRITE))
    assert run.fusion_pass.graphs_before == run.fusion_pass.graphs_after
    skipped = [layer for layer in run.layers if not layer.rewritten]
    assert len(skipped) == GDN and run.fusion_pass.matched_count == 0
    assert all("used outside the pattern" in layer.reason for layer in skipped), [l.line() for l in skipped]
    for got, want in zip(run.fused, run.eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mixed_batch_adapter_names_is_not_rewritten():
    model = add_lora(build_tiny_qwen35(SPEC), adapters=("default", "second"))
    model.base_model.set_adapter("default")
    run = compile_with_pass(model, input_ids=example_inputs(SPEC), adapter_names=["default", "second"])
    assert_unchanged(run)
    skipped = [layer for layer in run.layers if not layer.rewritten]
    assert len(skipped) == GDN
    assert all("not part of a recognized LoRA add" in layer.reason for layer in skipped), [l.line() for l in skipped]


def test_dora_never_reaches_the_pass():
    """PEFT 0.21's DoRA forward graph-breaks: its projections run eagerly, outside any graph."""
    model = add_lora(build_tiny_qwen35(TinyQwen35Spec(num_layers=2)), use_dora=True)
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_unchanged(run)
    assert run.layers == []
    assert not any("in_proj_qkv" in code and "lora_magnitude" in code for code in run.fusion_pass.graphs_before)


def test_float64_is_not_rewritten():
    model = add_lora(build_tiny_qwen35(TinyQwen35Spec(num_layers=2), dtype=torch.float64))
    run = compile_with_pass(model, input_ids=example_inputs(SPEC))
    assert_unchanged(run)
    (layer,) = run.layers
    assert not layer.rewritten and "float64" in layer.reason and layer.node == layer.qkv_node


def test_different_inputs_are_not_rewritten():
    run = compile_with_pass(gdn_projections(z_input_offset=1.0), torch.randn(8, SPEC.hidden_size))
    assert_unchanged(run)
    (layer,) = run.layers
    assert not layer.rewritten and "different inputs" in layer.reason


# ------------------------------------------------------------------ b / a: folded, or kept with the reason

ALL_FOUR_2D = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def test_gates_on_another_input_keep_the_qkvz_rewrite():
    """in_proj_b / in_proj_a fed another tensor: qkv / z still become one op, b / a stay two GEMMs with
    their LoRA, and the report says why."""
    run = compile_with_pass(gdn_projections(gates=True, gate_input_offset=1.0, targets=ALL_FOUR_2D),
                            torch.randn(8, SPEC.hidden_size))
    # the qkv / z base GEMMs and LoRA adds are addmm in this 2-D graph; b / a keep their 2 addmm + 4 mm
    assert_fused(run, layers=1, lora_ops_per_layer=1, mm_removed=4, folded=["in_proj_qkv", "in_proj_z"])
    (layer,) = run.layers
    assert "in_proj_b reads another input" in layer.ba_reason, layer.ba_reason
    assert "b/a not folded: " in layer.line() and layer.lora_slices == [["q", "k", "v", "z"]]
    assert run.op_count("aten.addmm.default", "before") - run.op_count("aten.addmm.default") == 2


@pytest.mark.parametrize("fold_ba", [True, False])
def test_fold_ba_config(fold_ba):
    from fx_passes import QkvzFusionConfig

    run = compile_with_pass(gdn_projections(gates=True, targets=ALL_FOUR_2D), torch.randn(8, SPEC.hidden_size),
                            fusion_pass=RecordingPass(QkvzFusionConfig(fold_ba=fold_ba)))
    if fold_ba:   # per projection 2 mm + 1 addmm (Inductor's LoRA add) -> one op with six slices
        assert_fused(run, layers=1, lora_ops_per_layer=1, mm_removed=8)
        assert run.op_count("aten.addmm.default") == 0
        assert run.layers[0].lora_slices == [["q", "k", "v", "z", "b", "a"]]
    else:
        assert_fused(run, layers=1, lora_ops_per_layer=1, mm_removed=4, folded=["in_proj_qkv", "in_proj_z"])
        assert run.layers[0].ba_reason == "fold_ba is off"


def test_inductor_code_runs_four_fewer_gemms_per_layer():
    """The compiled code itself, against Inductor without the pass: per GDN layer 4 base GEMMs and the LoRA's
    2 per projection leave Inductor's output; one fx_passes op per layer takes their place."""
    from torch._inductor.utils import run_and_get_code

    from fx_passes import FxPassesBackend

    model = add_lora(build_tiny_qwen35(SPEC), targets=ALL_FOUR)
    ids = example_inputs(SPEC)

    def gemm_calls(backend):
        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            out, codes = run_and_get_code(torch.compile(model, backend=backend), input_ids=ids)
        code = "\n".join(codes)
        return out.logits, sum(code.count(f"extern_kernels.{k}(") for k in ("mm", "addmm", "bmm")), \
            code.count("torch.ops.fx_passes.qkvz_gemm_lora.default(")

    plain, plain_gemms, plain_ops = gemm_calls("inductor")
    fused, fused_gemms, fused_ops = gemm_calls(FxPassesBackend())
    assert plain_ops == 0 and fused_ops == GDN
    assert plain_gemms - fused_gemms == GDN * (4 + 2 * 4), (plain_gemms, fused_gemms)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_modules_named_like_the_gates_alone_are_no_layer():
    """A model with ``in_proj_b`` / ``in_proj_a`` linears but no in_proj_qkv / in_proj_z: nothing to match,
    no report entry, the graph as it was."""
    class Gates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj_b, self.in_proj_a = torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(16, 4, bias=False)

        def forward(self, x):
            return self.in_proj_b(x).sigmoid() * self.in_proj_a(x)

    class Model(torch.nn.Module):   # module paths "layer.in_proj_b" / "layer.in_proj_a"
        def __init__(self):
            super().__init__()
            self.layer = Gates()

        def forward(self, x):
            return self.layer(x)

    run = compile_with_pass(Model(), torch.randn(8, 16))
    assert_unchanged(run)
    assert run.layers == []
