"""vLLM's GDN projection LoRA (punica lora_shrink / lora_expand) -> one fx_passes op per layer.

Split form (vLLM 0.19-0.20: in_proj_qkv + in_proj_z) and fused form (vLLM >= 0.21: in_proj_qkvz, 4
slices) -> one qkvz_gemm_lora (GEMM and LoRA, the default); with ``gemm_lora_op=False`` the GEMM (our
qkvz_gemm, or vLLM's own mm) plus one qkvz_lora_ adding into it.

Builds vLLM's real MergedColumnParallelLinear / ColumnParallelLinear + LoRA wrappers with
PunicaWrapperGPU (vLLM's Triton LoRA ops via TRITON_INTERPRET=1, fp16) on CPU and compiles them
through Inductor with vLLM's PostGradPassManager; see tests/vllm_notes.md. Dynamic token counts:
tests/test_vllm_dynamic.py; compile cache: tests/test_vllm_cache.py.
"""
import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

import vllm_helpers as vh  # noqa: E402

vh.install_triton_cpu_hack()   # before any other vllm import
pytest.importorskip("vllm")

import torch  # noqa: E402

from fx_passes import QkvzFusionConfig  # noqa: E402
from fx_passes.fusion.matcher import module_path  # noqa: E402
from fx_passes.vllm_pass import QkvzLoraFusionVllmPass  # noqa: E402

TOKENS = [0, 0, -1, 1, 1, 0, -1]           # slot per token, -1 = no LoRA
AF_SHRINK, AF_EXPAND, AF_OURS = vh.AF_SHRINK, vh.AF_EXPAND, vh.AF_OURS
_close = vh.close


def _match_eager(runs, what):
    """Every compiled output of every run equals vLLM eager's."""
    for eager, out, _ in runs:
        for i, (e, o) in enumerate(zip(eager, out)):
            _close(o, e, f"{what} output {i} vs vLLM eager")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """One compile for the module: eager vLLM outputs, compiled outputs, the pass (dumping)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block, pw = vh.build_split_block()
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    vh.set_tokens(pw, TOKENS)
    eager = [t.clone() for t in block(x)]
    base = [x.float() @ m.base_layer.weight.float().T
            for m in (block.layer.in_proj_qkv, block.layer.in_proj_z, block.layer.in_proj_ba)]
    dump_dir = str(tmp_path_factory.mktemp("vllm_dump"))
    fusion = QkvzLoraFusionVllmPass(QkvzFusionConfig(dump_dir=dump_dir))
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
                base=base, fusion=fusion, dump_dir=dump_dir)


def test_split_form_rewritten(split_run):
    fusion = split_run["fusion"]
    assert len(fusion.reports) == 1
    report = fusion.reports[0]
    assert fusion.matched_count == 1, report.to_text()
    (layer,) = report.rewritten
    assert layer.layer == "layer" and layer.identified_by == "module_path+vllm_lora"
    assert layer.slice_sizes == [vh.KEY, vh.KEY, vh.VAL, vh.VAL, vh.NV, vh.NV]
    assert layer.folded == ["in_proj_qkv", "in_proj_z", "in_proj_ba"] and layer.ba_reason is None
    assert layer.lora_slices == [["q", "k", "v", "z", "b", "a"]]
    assert layer.shared_a is False          # distinct stacked A per slice: 6 A groups
    before, after = report.ops_before, report.ops_after
    assert before[AF_SHRINK] == 3 and before[AF_EXPAND] == 3
    assert AF_SHRINK not in after and AF_EXPAND not in after
    assert after.get("aten.mm.default", 0) == before["aten.mm.default"] - 3   # qkv, z and ba mm gone ...
    assert after[vh.OURS] == 1                                            # ... one GEMM + LoRA op
    assert AF_OURS not in after and "fx_passes.qkvz_gemm.default" not in after
    assert not report.skipped, report.to_text()


def test_vllm_dump_holds_the_graph_vllm_handed_over(split_run):
    """The dump's before graph is vLLM's (punica ops in place), the after graph ours; report.txt /
    report.json list the vLLM layer (the pass's one lifecycle: match, then log and dump)."""
    dump_dir = split_run["dump_dir"]
    before = open(os.path.join(dump_dir, "graph_000_before.py")).read()
    after = open(os.path.join(dump_dir, "graph_000_after.py")).read()
    assert before.count("torch.ops.vllm.lora_expand.default") == 3 and "fx_passes.qkvz_gemm_lora" not in before
    assert "torch.ops.vllm.lora_expand.default" not in after and after.count("fx_passes.qkvz_gemm_lora.default") == 1
    data = json.load(open(os.path.join(dump_dir, "report.json")))
    assert data["totals"]["layers"] == 1 and data["totals"]["rewritten"] == 1, data["totals"]
    (layer,) = data["graphs"][0]["report"]["layers"]
    assert layer["layer"] == "layer" and layer["identified_by"] == "module_path+vllm_lora"
    text = open(os.path.join(dump_dir, "report.txt")).read()
    assert "1 GDN layer(s) found, 1 rewritten" in text and "REWRITTEN layer:" in text


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
    _close(r["out3"][1], r["base"][2], "all -1 ids: ba == base")
    ba_delta = r["eager"][1].float() - r["base"][2]          # in_proj_ba's LoRA is real too
    assert ba_delta[0].abs().max() > 1e-2 and ba_delta[2].abs().max() < 2e-3


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
    """Gives the base GEMM of ``proj`` a user outside the pattern before the fusion runs."""

    def __init__(self, proj="in_proj_qkv"):
        super().__init__()
        self.proj = proj

    def __call__(self, graph):
        mm = next(n for n in graph.nodes if n.target is torch.ops.aten.mm.default
                  and (module_path(n) or "").split(".")[-1] == self.proj)
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


# ---------------------------------------------------------------- fused form (vLLM >= 0.21)

FUSED_MAPPINGS = [
    TOKENS,
    [1, -1, 0, 0, 1, -1, -1],
    [-1] * len(TOKENS),          # vLLM only sets no_lora_flag_cpu: token_lora_mapping keeps stale ids
    [1] * len(TOKENS),           # flag cleared again
]


@pytest.fixture(scope="module")
def fused_run():
    """One static-shape compile of vLLM's fused in_proj_qkvz block, run under several mappings."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block, pw = vh.build_fused_block()
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    fusion, log = vh.make_recording_pass(), []
    compiled = vh.compile_with_pass(block, fusion, log=log)
    runs = vh.run_mappings(block, pw, compiled, x, FUSED_MAPPINGS)
    base = x.float() @ block.layer.in_proj_qkvz.base_layer.weight.float().T
    base_ba = x.float() @ block.layer.in_proj_ba.base_layer.weight.float().T
    torch._dynamo.reset()
    return dict(block=block, pw=pw, x=x, fusion=fusion, runs=runs, base=base, base_ba=base_ba, log=log)


def test_fused_form_rewritten(fused_run):
    fusion = fused_run["fusion"]
    assert len(fused_run["log"]) == 1 and len(fusion.reports) == 1   # one compile for all mappings
    report = fusion.reports[0]
    assert fusion.matched_count == 1, report.to_text()
    (layer,) = report.rewritten
    assert not report.skipped, report.to_text()
    assert layer.layer == "layer" and layer.identified_by == "module_path+vllm_lora_fused"
    assert layer.kernel == "fx_passes.qkvz_gemm_lora"
    assert layer.slice_sizes == [vh.KEY, vh.KEY, vh.VAL, vh.VAL, vh.NV, vh.NV]
    assert layer.folded == ["in_proj_qkvz", "in_proj_ba"] and layer.ba_reason is None
    assert layer.qkv_node == layer.z_node and layer.qkv_node.startswith("mm")
    assert layer.shared_a is False          # 6 stacked A tensors (slot 1 differs per slice): 6 groups
    before, after = report.ops_before, report.ops_after
    assert before[AF_SHRINK] == 2 and before[AF_EXPAND] == 2           # in_proj_qkvz and in_proj_ba
    assert AF_SHRINK not in after and AF_EXPAND not in after
    assert before["aten.mm.default"] == 2 and "aten.mm.default" not in after   # qkvz and ba mm -> our op
    assert "fx_passes.qkvz_gemm.default" not in after and AF_OURS not in after
    assert after[vh.OURS] == 1
    assert "aten.empty.memory_format" not in after                     # the shrink buffers are gone
    (call,) = fusion.calls[0]
    assert call["op"] == "gemm_lora" and len(call["weights"]) == 2     # W_qkvz, W_ba: the graph's inputs
    assert call["slice_start"] == [0, vh.KEY, 2 * vh.KEY, 2 * vh.KEY + vh.VAL, 2 * (vh.KEY + vh.VAL),
                                   2 * (vh.KEY + vh.VAL) + vh.NV]
    assert call["slice_a"] == [0, 1, 2, 3, 4, 5] and call["n_lora_a"] == 6 and call["scale"] == 1.0


def test_fused_form_matches_vllm_eager(fused_run):
    runs, base = fused_run["runs"], fused_run["base"]
    for m, (eager, out, _) in enumerate(runs):
        for i, (e, o) in enumerate(zip(eager, out)):
            _close(o, e, f"mapping {m} output {i} vs vLLM eager")
    # the LoRA delta is real for mapped tokens, zero for -1 tokens, and zero everywhere when all are -1
    delta = runs[0][0][0].float() - base
    assert delta[0].abs().max() > 1e-2 and delta[3].abs().max() > 1e-2
    assert delta[2].abs().max() < 2e-3 and delta[6].abs().max() < 2e-3
    _close(runs[2][1][0], base, "all -1 ids: qkvz == base")
    _close(runs[2][1][1], fused_run["base_ba"], "all -1 ids: ba == base")
    assert (runs[3][1][0].float() - base).abs().max() > 1e-2          # flag cleared: LoRA back on
    assert (runs[3][1][1].float() - fused_run["base_ba"]).abs().max() > 1e-2   # on in_proj_ba's slices too


def test_fused_outside_user_leaves_graph_unchanged(fused_run):
    torch._dynamo.reset()
    block, pw, x = fused_run["block"], fused_run["pw"], fused_run["x"]
    fusion = _ExtraUserPass("in_proj_qkvz")
    compiled = vh.compile_with_pass(block, fusion)
    ((eager, out, _),) = vh.run_mappings(block, pw, compiled, x, [TOKENS])
    (report,) = fusion.reports
    assert fusion.matched_count == 0
    (layer,) = report.skipped
    assert layer.identified_by == "module_path+vllm_lora_fused"
    assert "base GEMM used outside the pattern" in layer.reason, layer.reason
    assert {k: v for k, v in report.ops_after.items() if k != "aten.sum.default"} == \
        {k: v for k, v in report.ops_before.items() if k != "aten.sum.default"}
    for i, (e, o) in enumerate(zip(eager, out)):
        _close(o, e, f"unfused[{i}] vs vLLM eager")
    torch._dynamo.reset()


def test_fused_form_two_op_config():
    """QkvzFusionConfig(gemm_lora_op=False): vLLM's qkvz mm stays, one qkvz_lora_ adds into it."""
    from fx_passes import QkvzFusionConfig

    torch._dynamo.reset()
    torch.manual_seed(1)
    block, pw = vh.build_fused_block()
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    fusion = vh.make_recording_pass(QkvzFusionConfig(gemm_lora_op=False))
    runs = vh.run_mappings(block, pw, vh.compile_with_pass(block, fusion), x, FUSED_MAPPINGS[:1])
    (report,) = fusion.reports
    (layer,) = report.rewritten
    assert layer.kernel == "vllm mm + fx_passes.qkvz_lora_"
    assert layer.folded == ["in_proj_qkvz"] and "gemm_lora_op is off" in layer.ba_reason
    before, after = report.ops_before, report.ops_after
    assert after["aten.mm.default"] == before["aten.mm.default"] == 2 and after[AF_OURS] == 1
    assert vh.OURS not in after and after[AF_SHRINK] == after[AF_EXPAND] == 1   # in_proj_ba's LoRA stays
    (call,) = fusion.calls[0]
    assert call["op"] == "lora_" and call["out_target"] == "aten.mm.default"
    _match_eager(runs, "two-op form")
    torch._dynamo.reset()


# ---------------------------------------------------------------- in_proj_ba: folded or kept, with the reason

@pytest.mark.parametrize("form", ["split", "fused"])
def test_plain_in_proj_ba_is_folded_as_a_weight(form):
    """in_proj_ba without a LoRA wrapper (a plain GEMM of the same x): one more weight in the op, no slices."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    block, pw = (vh.build_split_block if form == "split" else vh.build_fused_block)(ba_lora=False)
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    fusion = vh.make_recording_pass()
    runs = vh.run_mappings(block, pw, vh.compile_with_pass(block, fusion), x, FUSED_MAPPINGS[:2])
    (report,) = fusion.reports
    (layer,) = report.rewritten
    assert layer.folded[-1] == "in_proj_ba" and layer.ba_reason is None
    assert layer.slice_sizes == [vh.KEY, vh.KEY, vh.VAL, vh.VAL, 2 * vh.NV]
    assert layer.lora_slices == [["q", "k", "v", "z"]]
    assert "aten.mm.default" not in report.ops_after and report.ops_after[vh.OURS] == 1
    (call,) = fusion.calls[0]
    assert len(call["weights"]) == (3 if form == "split" else 2) and len(call["slice_start"]) == 4
    _match_eager(runs, f"{form} plain in_proj_ba")
    torch._dynamo.reset()


def test_in_proj_ba_of_another_input_is_kept_with_the_reason():
    torch._dynamo.reset()
    torch.manual_seed(3)
    block, pw = vh.build_split_block(ba_input_offset=1.0)
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)
    fusion = vh.make_recording_pass()
    runs = vh.run_mappings(block, pw, vh.compile_with_pass(block, fusion), x, FUSED_MAPPINGS[:1])
    (report,) = fusion.reports
    (layer,) = report.rewritten                      # qkv / z still one op ...
    assert layer.folded == ["in_proj_qkv", "in_proj_z"] and layer.slice_sizes == [vh.KEY, vh.KEY, vh.VAL, vh.VAL]
    assert "in_proj_ba reads another tensor" in layer.ba_reason, layer.ba_reason   # ... ba kept, and why
    assert "b/a not folded" in layer.line()
    assert report.ops_after[AF_SHRINK] == report.ops_after[AF_EXPAND] == 1
    _match_eager(runs, "ba of another input,")
    torch._dynamo.reset()
