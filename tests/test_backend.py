"""The fx_passes backend in-process: registration, modes / options through torch's Inductor wrapper, a
user's post-grad pass composed with ours, zero-configuration weight packing and its safety rule, and the
op-call count behind warm-cache reports. (As a user meets it, in fresh interpreters with cold and warm
caches: tests/test_front_door.py.)"""
from __future__ import annotations

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import fx_passes
from fx_passes import FxPassesBackend, QkvzFusionConfig
from fx_passes.backend import BACKEND_NAME, ComposedPostGradPass, register
from fx_passes.ops.qkvz_gemm import weights_are_packed
from fx_passes.packing import pack_qkvz_weights, why_not_packable
from fx_passes.report import count_op_calls
from fusion_helpers import gdn_projections


class SeesOurOps(CustomGraphPass):
    def __init__(self, uuid="sees-our-ops"):
        self.seen, self._uuid = [], uuid

    def __call__(self, graph):
        self.seen.append(sorted(str(n.target) for n in graph.nodes if str(n.target).startswith("fx_passes.")))

    def uuid(self):
        return self._uuid


def _weights(model):
    return model.linear_attn.in_proj_qkv.base_layer.weight, model.linear_attn.in_proj_z.base_layer.weight


def _compile(backend, model, x):
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend=backend)(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_register_is_idempotent_and_never_duplicates_the_name():
    from torch._dynamo.backends.registry import _COMPILER_FNS

    register()
    register()
    assert BACKEND_NAME in torch._dynamo.list_backends()
    fn = torch._dynamo.lookup_backend(BACKEND_NAME)   # the entry point's function, loaded once
    assert fn is fx_passes.fx_passes_backend and _COMPILER_FNS[BACKEND_NAME] is fn


def test_modes_and_options_go_through_torchs_inductor_wrapper():
    assert FxPassesBackend(mode="reduce-overhead").inductor.config == {"triton.cudagraphs": True}
    assert FxPassesBackend(mode="max-autotune-no-cudagraphs").inductor.config["max_autotune"] is True
    assert FxPassesBackend(options={"epilogue_fusion": False}).inductor.config == {"epilogue_fusion": False}
    with pytest.raises(RuntimeError, match="Unexpected optimization option"):
        FxPassesBackend(options={"no_such_option": 1})
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        FxPassesBackend(mode="no-such-mode")


def test_users_post_grad_pass_runs_after_ours():
    theirs = SeesOurOps()
    backend = FxPassesBackend(options={"post_grad_custom_post_pass": theirs})
    _compile(backend, gdn_projections(), torch.randn(6, 64))
    assert backend.fusion_pass.matched_count == 1
    assert theirs.seen == [["fx_passes.qkvz_gemm_lora.default"]]   # it saw our rewrite: it ran second


def test_composed_pass_uuid_joins_both_or_none():
    ours = fx_passes.QkvzLoraFusionPass()
    assert ComposedPostGradPass([ours, SeesOurOps("x")]).uuid() == (ours.uuid(), "x")
    assert ComposedPostGradPass([ours, SeesOurOps(None)]).uuid() is None   # Inductor then bypasses its cache
    assert ComposedPostGradPass([ours, lambda graph: None]).uuid() is None


def test_backend_packs_weights_after_compiling_and_reports_it():
    model = gdn_projections()
    w_qkv, w_z = _weights(model)
    assert not weights_are_packed([w_qkv, w_z])
    before = (w_qkv.detach().clone(), w_z.detach().clone())
    backend = FxPassesBackend()
    _compile(backend, model, torch.randn(6, 64))
    assert weights_are_packed([w_qkv, w_z]) and backend.packed_layers == ["linear_attn"]
    assert torch.equal(w_qkv, before[0]) and torch.equal(w_z, before[1])
    (layer,) = backend.fusion_pass.reports[0].layers
    # the graph calls in_proj_qkv / in_proj_z only: those two are packed, b / a are not in the op
    assert layer.weights_packed is True and layer.packing == "in_proj_qkv/in_proj_z packed by the fx_passes backend"
    assert "weights packed (in_proj_qkv/in_proj_z packed by the fx_passes backend)" in layer.line()
    assert layer.folded == ["in_proj_qkv", "in_proj_z"] and "found 0 and 0" in layer.ba_reason


def test_backend_leaves_weights_alone_when_told():
    model = gdn_projections()
    backend = FxPassesBackend(QkvzFusionConfig(pack_weights=False))
    _compile(backend, model, torch.randn(6, 64))
    assert not weights_are_packed(_weights(model)) and backend.packed_layers == []
    (layer,) = backend.fusion_pass.reports[0].layers
    assert layer.rewritten and layer.weights_packed is False and "NOT packed" in layer.line()


def test_backend_does_not_pack_a_shared_weight_and_says_why():
    model = gdn_projections()
    w_qkv, w_z = _weights(model)
    alias = w_z.view(-1)   # another tensor on W_z's storage (a tied weight, an optimizer's view, ...)  # noqa: F841
    backend = FxPassesBackend()
    _compile(backend, model, torch.randn(6, 64))
    assert not weights_are_packed([w_qkv, w_z])
    (layer,) = backend.fusion_pass.reports[0].layers
    assert layer.rewritten and layer.weights_packed is False
    assert layer.packing.startswith("left unpacked: in_proj_z weight's storage is shared")


@pytest.mark.parametrize("case", ["view", "subclass", "misaligned", "dtype", "shared"])
def test_why_not_packable(case):
    w_qkv, w_z = torch.randn(12, 8), torch.randn(4, 8)
    keep = None
    if case == "view":
        w_qkv = torch.randn(13, 8)[1:]
    elif case == "subclass":
        class Marked(torch.Tensor):
            pass
        w_z = w_z.as_subclass(Marked)
    elif case == "misaligned":
        w_qkv = torch.randn(3, 1)   # 12 bytes: W_z would start unaligned
        w_z = torch.randn(4, 1)
    elif case == "dtype":
        w_z = w_z.double()
    elif case == "shared":
        keep = w_qkv.view(-1)   # noqa: F841
    reason = why_not_packable([w_qkv, w_z])
    assert reason is not None, case
    assert why_not_packable([torch.randn(12, 8), torch.randn(4, 8)]) is None


def test_pack_qkvz_weights_counts_only_what_is_packed():
    model = gdn_projections().linear_attn
    assert pack_qkvz_weights(model) == 1 and pack_qkvz_weights(model) == 1   # packed once, counted again
    shared = torch.nn.Module()
    shared.a, shared.b = torch.nn.Module(), torch.nn.Module()
    w_qkv = torch.nn.Linear(8, 12, bias=False)
    shared.a.in_proj_qkv, shared.a.in_proj_z = w_qkv, torch.nn.Linear(8, 4, bias=False)
    shared.b.in_proj_qkv, shared.b.in_proj_z = w_qkv, torch.nn.Linear(8, 4, bias=False)
    assert pack_qkvz_weights(shared) == 1   # the second layer's W_qkv is now a view of the first's buffer
    assert weights_are_packed([shared.a.in_proj_qkv.weight, shared.a.in_proj_z.weight])


def test_count_op_calls_reads_calls_not_comments():
    code = "\n".join([
        "# Topologically Sorted Source Nodes: [qkvz_gemm_lora], Original ATen: [fx_passes.qkvz_gemm_lora]",
        "    buf0 = torch.ops.fx_passes.qkvz_gemm_lora.default(arg0_1, arg1_1, arg2_1, [a], [b], [0], [0])",
        "    buf5 = torch.ops.fx_passes.qkvz_gemm_lora.default(arg9_1, arg1_1, arg2_1, [a], [b], [0], [0])",
        "    buf7 = torch.ops.fx_passes.qkvz_gemm.default(arg0_1, arg1_1, arg2_1)",
        '    aoti_torch_proxy_executor_call_function(proxy, 3, "fx_passes::qkvz_lora_", args);',
        "    // fx_passes::qkvz_gemm in a C++ comment",
    ])
    assert count_op_calls(code) == {"qkvz_gemm": 1, "qkvz_gemm_lora": 2, "qkvz_lora_": 1}


def test_packed_weights_save_once_and_deepcopy_repacks_on_compile(tmp_path):
    """What packing means for saving and copying (README "Design"): a state dict holds the packed buffer
    once (no byte more than the unpacked model); a single packed tensor is saved with its whole buffer
    unless cloned; copy.deepcopy gives unpacked copies, which the backend packs again when compiling."""
    import copy

    model = gdn_projections()
    unpacked = tmp_path / "unpacked.pt"
    torch.save(model.state_dict(), unpacked)
    assert pack_qkvz_weights(model.linear_attn) == 1
    packed = tmp_path / "packed.pt"
    torch.save(model.state_dict(), packed)
    assert abs(packed.stat().st_size - unpacked.stat().st_size) < 4096      # pickling overhead only
    w_qkv, w_z = _weights(model)
    whole, own = tmp_path / "whole.pt", tmp_path / "own.pt"
    torch.save(w_z, whole)
    torch.save(w_z.clone(), own)
    assert whole.stat().st_size - own.stat().st_size >= w_qkv.numel() * w_qkv.element_size()

    clone = copy.deepcopy(model)
    assert not weights_are_packed(_weights(clone))
    backend = FxPassesBackend()
    _compile(backend, clone, torch.randn(6, 64))
    assert weights_are_packed(_weights(clone)) and backend.fusion_pass.matched_count == 1
