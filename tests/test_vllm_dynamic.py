"""vLLM compiles with a symbolic token count: one compiled graph, rewritten once, serves every T.

vLLM's ``@support_torch_compile`` marks the token dim of its inputs dynamic (backed SymInt, the
default ``DynamicShapesType.BACKED``); that is what ``mark_dynamic(x, 0)`` reproduces here. Under
``torch.compile(dynamic=True)`` every dim of the stacked LoRA weights (plain tensors, not
parameters) becomes symbolic as well, and the layer is reported as not rewritten (static slice
sizes needed; see fx_passes/fusion/vllm_lora_fusion.py).
"""
import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

import vllm_helpers as vh  # noqa: E402

vh.install_triton_cpu_hack()   # before any other vllm import
pytest.importorskip("vllm")

import torch  # noqa: E402

# three token counts (>= 2: backed SymInts are specialised at 0 and 1), the last with no LoRA at all
MAPPINGS = [[0, 0, -1, 1, 1, 0, -1], [1, -1, 0, 0, 1], [-1, -1, -1]]
BUILDERS = {"split": vh.build_split_block, "fused": vh.build_fused_block}


@pytest.fixture(scope="module", params=["split", "fused"])
def marked_run(request):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block, pw = BUILDERS[request.param]()
    x = torch.randn(len(MAPPINGS[0]), vh.H, dtype=torch.float16)
    fusion, log = vh.make_recording_pass(), []
    compiled = vh.compile_with_pass(block, fusion, log=log)
    runs = vh.run_mappings(block, pw, compiled, x, MAPPINGS, mark_dynamic=True)
    torch._dynamo.reset()
    return dict(form=request.param, fusion=fusion, log=log, runs=runs)


def test_symbolic_tokens_rewritten_once(marked_run):
    fusion, log = marked_run["fusion"], marked_run["log"]
    # one Dynamo compile (one backend call) and one pass run for three token counts: no recompile
    assert len(log) == 1 and len(fusion.reports) == 1
    report = fusion.reports[0]
    assert fusion.matched_count == 1, report.to_text()
    assert not report.skipped, report.to_text()
    (call,) = fusion.calls[0]
    assert isinstance(call["tokens"], torch.SymInt)          # the rewritten op really sees a symbolic T
    assert call["slice_start"] == [0, vh.KEY, 2 * vh.KEY, 2 * vh.KEY + vh.VAL, 2 * (vh.KEY + vh.VAL),
                                   2 * (vh.KEY + vh.VAL) + vh.NV]   # q | k | v | z | b | a
    before, after = report.ops_before, report.ops_after
    assert vh.AF_SHRINK not in after and vh.AF_EXPAND not in after and after[vh.OURS] == 1
    assert "fx_passes.qkvz_gemm.default" not in after and vh.AF_OURS not in after
    # split: the qkv, z and ba mm become our one op; fused: the qkvz and ba mm do
    removed_mm = 3 if marked_run["form"] == "split" else 2
    assert after.get("aten.mm.default", 0) == before["aten.mm.default"] - removed_mm


def test_symbolic_tokens_match_vllm_eager(marked_run):
    for m, (eager, out, x) in enumerate(marked_run["runs"]):
        assert out[0].shape[0] == x.shape[0] == len(MAPPINGS[m])
        for i, (e, o) in enumerate(zip(eager, out)):
            vh.close(o, e, f"{marked_run['form']} T={x.shape[0]} output {i} vs vLLM eager")


def test_dynamic_true_reports_symbolic_slices_and_keeps_graph():
    """dynamic=True: B slice sizes are SymInts; specialising them after Dynamo froze its guards
    would be unsound, so the layer stays as it was, with the reason, and still computes right."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block, pw = vh.build_fused_block()
    x = torch.randn(len(MAPPINGS[0]), vh.H, dtype=torch.float16)
    fusion, log = vh.make_recording_pass(), []
    compiled = vh.compile_with_pass(block, fusion, dynamic=True, log=log)
    runs = vh.run_mappings(block, pw, compiled, x, MAPPINGS[:2])
    assert len(log) == 1 and len(fusion.reports) == 1
    report = fusion.reports[0]
    assert fusion.matched_count == 0
    (layer,) = report.skipped
    assert layer.identified_by == "module_path+vllm_lora_fused"
    assert "is symbolic" in layer.reason, layer.reason
    assert report.ops_before == report.ops_after and report.ops_after[vh.AF_EXPAND] == 2   # qkvz, ba
    for eager, out, xt in runs:
        for i, (e, o) in enumerate(zip(eager, out)):
            vh.close(o, e, f"dynamic=True T={xt.shape[0]} output {i} vs vLLM eager")
    torch._dynamo.reset()
