"""vLLM's split GDN projection LoRA (punica lora_shrink / lora_expand) -> qkvz_gemm + one qkvz_lora_.

Builds vLLM's real MergedColumnParallelLinear / ColumnParallelLinear + LoRA wrappers with
PunicaWrapperGPU (vLLM's Triton LoRA ops via TRITON_INTERPRET=1, fp16) on CPU and compiles them
through Inductor with vLLM's PostGradPassManager; see tests/vllm_notes.md.
"""
import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

import vllm_helpers as vh  # noqa: E402

vh.install_triton_cpu_hack()   # before any other vllm import
pytest.importorskip("vllm")

import torch  # noqa: E402

from fx_passes.vllm_pass import QkvzLoraFusionVllmPass  # noqa: E402

TOKENS = [0, 0, -1, 1, 1, 0, -1]           # slot per token, -1 = no LoRA
AF_SHRINK = "auto_functionalized(lora_shrink.default)"
AF_EXPAND = "auto_functionalized(lora_expand.default)"
AF_OURS = "auto_functionalized(qkvz_lora_.default)"


@pytest.fixture(scope="module")
def split_run():
    """One compile for the module: eager vLLM outputs, compiled outputs, the pass."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block, pw = vh.build_split_block()
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    vh.set_tokens(pw, TOKENS)
    eager = [t.clone() for t in block(x)]
    base = [x.float() @ m.base_layer.weight.float().T for m in (block.layer.in_proj_qkv, block.layer.in_proj_z)]
    fusion = QkvzLoraFusionVllmPass()
    compiled = vh.compile_with_pass(block, fusion)
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(vh.init_vllm_cpu()):
        out = [t.clone() for t in compiled(x)]
    # new token mapping, same compiled graph (the mapping is a graph input)
    tokens2 = [1, -1, 0, 0, 1, -1, -1]
    vh.set_tokens(pw, tokens2)
    eager2 = [t.clone() for t in block(x)]
    with set_current_vllm_config(vh.init_vllm_cpu()):
        out2 = [t.clone() for t in compiled(x)]
    vh.set_tokens(pw, [-1] * len(TOKENS))
    eager3 = [t.clone() for t in block(x)]
    with set_current_vllm_config(vh.init_vllm_cpu()):
        out3 = [t.clone() for t in compiled(x)]
    torch._dynamo.reset()
    return dict(block=block, x=x, eager=eager, out=out, eager2=eager2, out2=out2, eager3=eager3, out3=out3,
                base=base, fusion=fusion)


def test_split_form_rewritten(split_run):
    fusion = split_run["fusion"]
    assert len(fusion.reports) == 1
    report = fusion.reports[0]
    assert fusion.matched_count == 1, report.to_text()
    (layer,) = report.rewritten
    assert layer.layer == "layer" and layer.identified_by == "module_path+vllm_lora"
    assert layer.slice_sizes == [vh.KEY, vh.KEY, vh.VAL, vh.VAL]
    assert layer.shared_a is False          # distinct stacked A per slice: 4 A groups
    before, after = report.ops_before, report.ops_after
    assert before[AF_SHRINK] == 2 and before[AF_EXPAND] == 2
    assert AF_SHRINK not in after and AF_EXPAND not in after
    assert after["aten.mm.default"] == before["aten.mm.default"] - 2   # qkv and z mm gone ...
    assert after["fx_passes.qkvz_gemm.default"] == 1                      # ... replaced by one GEMM
    assert after[AF_OURS] == 1
    assert not report.skipped, report.to_text()


def _close(a, b, what=""):
    # fp16 outputs of magnitude ~4: one ulp is 2e-3; vLLM rounds the shrink result to fp16 like our op
    torch.testing.assert_close(a.float(), b.float(), atol=5e-3, rtol=2e-3, msg=lambda m: f"{what}: {m}")


def test_split_form_matches_vllm_eager(split_run):
    r = split_run
    for key_e, key_o in (("eager", "out"), ("eager2", "out2"), ("eager3", "out3")):
        for i, (e, o) in enumerate(zip(r[key_e], r[key_o])):
            _close(o, e, f"{key_o}[{i}] vs vLLM eager")
    # the LoRA delta is real for mapped tokens and zero for -1 tokens
    qkv_delta = r["eager"][0].float() - r["base"][0]
    assert qkv_delta[0].abs().max() > 1e-2 and qkv_delta[3].abs().max() > 1e-2
    assert qkv_delta[2].abs().max() < 2e-3 and qkv_delta[6].abs().max() < 2e-3
    _close(r["out3"][0], r["base"][0], "all -1 ids: qkv == base")
    _close(r["out3"][2], r["base"][1], "all -1 ids: z == base")


class _NoPattern(torch.nn.Module):
    """vLLM linears, no GDN qkv/z pair and no LoRA (in_proj_ba + a second plain projection)."""

    def __init__(self, layer):
        super().__init__()
        self.in_proj_ba, self.out_proj = layer.in_proj_ba, layer.in_proj_z

    def forward(self, x):
        return self.in_proj_ba(x)[0], self.out_proj(x)[0]


def test_graph_without_pattern_unchanged():
    torch._dynamo.reset()
    block, _ = vh.build_split_block(with_lora=False)
    module = _NoPattern(block.layer)
    x = torch.randn(5, vh.H, dtype=torch.float16)
    fusion = QkvzLoraFusionVllmPass()
    out = vh.compile_with_pass(module, fusion)(x)
    assert fusion.matched_count == 0
    (report,) = fusion.reports
    assert report.ops_before == report.ops_after and report.ops_before["aten.mm.default"] == 2
    assert not report.layers
    for o, e in zip(out, module(x)):
        _close(o, e)
    torch._dynamo.reset()


class _ExtraUserPass(QkvzLoraFusionVllmPass):
    """Gives the qkv base GEMM a user outside the pattern before the fusion runs."""

    def __call__(self, graph):
        mm = next(n for n in graph.nodes if n.target is torch.ops.aten.mm.default
                  and "in_proj_qkv" in str(list(n.meta.get("nn_module_stack", {}).values())[-1][0]))
        with graph.inserting_after(mm):
            graph.call_function(torch.ops.aten.sum.default, (mm,))
        super().__call__(graph)


def test_outside_user_leaves_graph_unchanged(split_run):
    torch._dynamo.reset()
    block, x = split_run["block"], split_run["x"]
    fusion = _ExtraUserPass()
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(vh.init_vllm_cpu()):
        vh.set_tokens(block.layer.in_proj_qkv.punica_wrapper, TOKENS)
        out = [t.clone() for t in vh.compile_with_pass(block, fusion)(x)]
    (report,) = fusion.reports
    assert fusion.matched_count == 0
    (layer,) = report.skipped
    assert "used outside the pattern" in layer.reason, layer.reason
    assert {k: v for k, v in report.ops_after.items() if k != "aten.sum.default"} == \
        {k: v for k, v in report.ops_before.items() if k != "aten.sum.default"}
    for i, (e, o) in enumerate(zip(split_run["eager"], out)):
        _close(o, e, f"unfused[{i}] vs vLLM eager")
    torch._dynamo.reset()
