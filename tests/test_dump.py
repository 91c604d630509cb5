"""Graph dumps: ``dump_compile`` / ``python -m fx_passes dump`` / the FX_PASSES_DUMP_DIR switch, on the real
tiny Qwen3.5 with real PEFT LoRA through real Inductor (CPU)."""
from __future__ import annotations

import glob
import inspect
import json
import os
import re
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from fx_passes import FxPassesBackend
from fx_passes.config import DUMP_ENV
from fx_passes.dump import depyf_dump, dump_compile
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs
from fx_passes.packing import pack_qkvz_weights
from fusion_helpers import gdn_projections

SPEC = TinyQwen35Spec(num_layers=2)          # one GDN layer: base_model.model.model.layers.0.linear_attn
LAYER = "layers.0.linear_attn"

try:
    import depyf  # noqa: F401
    HAVE_DEPYF = True
except ImportError:
    HAVE_DEPYF = False


def _patched_objects():
    """What depyf patches; the dump must put back these exact objects."""
    import torch._dynamo.utils as dynamo_utils
    import torch.fx.graph_module as fx_graph_module
    from torch._inductor.codecache import PyCodeCache

    return (PyCodeCache.__dict__["load_by_key_path"], fx_graph_module._exec_with_source,
            dynamo_utils.lazy_format_graph_code.__code__)


def _mm_call(name: str, code: str) -> bool:
    pattern = rf"^\s*{re.escape(name)}: [^\n=]*= torch\.ops\.aten\.(mm|addmm)\.default\("
    return re.search(pattern, code, re.M) is not None


@pytest.fixture(scope="module")
def main_dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    model = add_lora(build_tiny_qwen35(SPEC))
    assert pack_qkvz_weights(model) == SPEC.num_gdn_layers
    ids = example_inputs(SPEC)
    before = _patched_objects()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        result = dump_compile(model, {"input_ids": ids}, str(out))
    return result, eager, before, _patched_objects()


def test_dump_writes_graphs_and_report(main_dump):
    result, eager, _, _ = main_dump
    torch.testing.assert_close(result.output.logits, eager, rtol=1e-4, atol=1e-5)
    out = result.out_dir
    assert len(result.graphs) == 1 and len(result.rewritten) == SPEC.num_gdn_layers and not result.skipped

    text = open(os.path.join(out, "report.txt")).read()
    assert LAYER in text and "REWRITTEN" in text and "fx_passes.qkvz_gemm_lora" in text
    assert "weights packed" in text and "aten.mm.default:" in text          # kernel variant, op counts
    assert "graph_000_before.py -> graph_000_after.py" in text

    data = json.load(open(os.path.join(out, "report.json")))
    assert data["totals"] == {"graphs": 1, "layers": 1, "rewritten": 1, "skipped": 0, "graphs_from_cache": 0,
                              "fused_layers": 1}
    report = data["graphs"][0]["report"]
    layer, = report["layers"]
    assert layer["layer"].endswith(LAYER) and layer["rewritten"] and layer["weights_packed"] is True
    assert layer["kernel"] == "fx_passes.qkvz_gemm_lora"
    assert report["ops_after"]["fx_passes.qkvz_gemm_lora.default"] == 1
    # 4 base GEMMs (qkv, z, b, a) + the qkv / z LoRA's 2 shrinks and 2 expands
    assert report["ops_before"]["aten.mm.default"] - report["ops_after"]["aten.mm.default"] == 8

    before = open(os.path.join(out, "graph_000_before.py")).read()
    after = open(os.path.join(out, "graph_000_after.py")).read()
    assert "torch.ops.fx_passes.qkvz_gemm_lora" in after
    assert "fx_passes.qkvz" not in before
    for name in (layer["qkv_node"], layer["z_node"]):
        assert _mm_call(name, before), name
        assert not _mm_call(name, after), name


@pytest.mark.skipif(not HAVE_DEPYF, reason="depyf not installed")
def test_dump_has_depyf_code_and_restores_patches(main_dump):
    result, _, patched_before, patched_after = main_dump
    assert result.depyf_available and result.depyf_dir == os.path.join(result.out_dir, "depyf")
    depyf_dir = result.depyf_dir
    assert glob.glob(os.path.join(depyf_dir, "full_code_for_*.py"))
    assert glob.glob(os.path.join(depyf_dir, "__transformed_code_*.py"))
    post_grad = glob.glob(os.path.join(depyf_dir, "__compiled_fn_*AFTER_POST_GRAD*.py"))
    assert post_grad and "fx_passes.qkvz_gemm" in open(post_grad[0]).read()
    assert glob.glob(os.path.join(depyf_dir, "__compiled_fn_*.kernel_*.py"))      # Inductor output code
    assert re.search(r"^depyf \S+: decompiled Dynamo code and graphs in depyf/", open(result.report_txt).read(), re.M)
    assert all(a is b for a, b in zip(patched_before, patched_after))


@pytest.mark.skipif(not HAVE_DEPYF, reason="depyf not installed")
def test_depyf_shim_takes_newer_keywords_and_restores(tmp_path):
    """torch 2.13's PyCodeCache.load passes set_sys_modules= (the Triton path); depyf 0.20 alone raises."""
    from torch._inductor.codecache import PyCodeCache

    before = _patched_objects()
    with depyf_dump(str(tmp_path)) as active:
        assert active
        assert PyCodeCache.load("def kernel():\n    return 41\n").kernel() == 41
        if "set_sys_modules" in inspect.signature(PyCodeCache.load).parameters:   # torch >= 2.13
            assert PyCodeCache.load("def kernel():\n    return 42\n", set_sys_modules=False).kernel() == 42
    assert all(a is b for a, b in zip(before, _patched_objects()))
    with pytest.raises(RuntimeError, match="boom"), depyf_dump(str(tmp_path)):
        raise RuntimeError("boom")
    assert all(a is b for a, b in zip(before, _patched_objects()))


def test_cli_dump_reports_skip_reason_without_depyf(tmp_path, monkeypatch, capsys):
    """`python -m fx_passes dump` in train mode with LoRA dropout: the layer is skipped, with the reason;
    depyf made unimportable: our files and the report are still written and say so."""
    from fx_passes.__main__ import main

    monkeypatch.setitem(sys.modules, "depyf", None)
    out = tmp_path / "dump"
    assert main(["dump", "--layers", "1", "--dropout", "0.1", "--out", str(out)]) == 0   # 1 layer: GDN only
    assert "0 rewritten, 1 skipped" in capsys.readouterr().out

    text = (out / "report.txt").read_text()
    assert "depyf unavailable" in text and not (out / "depyf").exists()
    skipped = [line for line in text.splitlines() if "SKIPPED" in line]
    assert len(skipped) == 1 and LAYER in skipped[0] and "dropout" in skipped[0] and "at node " in skipped[0]
    data = json.loads((out / "report.json").read_text())
    assert data["depyf"]["available"] is False and data["totals"]["skipped"] == 1
    layer, = data["graphs"][0]["report"]["layers"]
    assert not layer["rewritten"] and "dropout" in layer["reason"] and layer["node"]
    assert (out / "graph_000_before.py").read_text().split("\n", 1)[1] == \
        (out / "graph_000_after.py").read_text().split("\n", 1)[1]          # unchanged graph


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_cli_dump_of_a_training_step_shows_the_training_rewrite(tmp_path, monkeypatch, capsys, autocast):
    """`python -m fx_passes dump --train`: the training rewrite's Dynamo graph before / after (PEFT's LoRA
    linears -> one fx_passes.qkvz_lora_train), then Inductor's forward and backward graphs, which name the
    op and its backward op as what fused their GDN layer. ``--autocast bfloat16``: the same, the report
    saying autocast's dtype, the graph after the rewrite casting the op's fp32 inputs to it (autocast's
    casts are not in the Dynamo graph before)."""
    from fx_passes.__main__ import main

    monkeypatch.setitem(sys.modules, "depyf", None)
    out = tmp_path / "dump"
    flags = ["--autocast", autocast] if autocast else []
    assert main(["dump", "--layers", "1", "--train", "--out", str(out), *flags]) == 0
    assert "1 rewritten, 0 skipped" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    passes = [g["report"]["pass_name"] for g in data["graphs"]]
    assert passes == ["qkvz_lora_train_fusion", "qkvz_lora_fusion", "qkvz_lora_fusion"], passes
    before, after = (out / "graph_000_before.py").read_text(), (out / "graph_000_after.py").read_text()
    assert "Dynamo graph" in before.splitlines()[0] and "fx_passes.qkvz_lora_train" not in before
    assert after.count("fx_passes.qkvz_lora_train") == 1
    assert before.count("lora_A") > after.count("lora_A")      # the LoRA linears left; their weights stay inputs
    text = (out / "report.txt").read_text()
    assert "REWRITTEN" in text and LAYER in text
    assert "fused by the training rewrite (1 fx_passes.qkvz_lora_train)" in text
    assert "fused by the training rewrite (1 fx_passes.qkvz_lora_train_backward)" in text
    assert "qkvz_lora_train_backward" in (out / "graph_002_after.py").read_text()
    casts = [len(re.findall(r"\.to\(torch\.bfloat16\)", g)) for g in (before, after)]
    if autocast:   # in: x, W_qkv, W_z, W_b, W_a, A_qkv, A_z, B_qkv, B_z; out: PEFT's result casts of qkv, z
        assert "under autocast: inputs cast to torch.bfloat16" in text and casts[1] - casts[0] == 9 - 2, casts
    else:
        assert "under autocast" not in text and casts == [0, 0], casts


def test_env_switch_dumps_every_graph_of_every_pass_instance(tmp_path, monkeypatch):
    """FX_PASSES_DUMP_DIR alone (read when the pass is made): two backends = two pass instances, both
    numbering their graph 0, write into one folder without colliding; report.json holds both. Caches are
    ON for the user's compile: the second compile of the same graph would be an AOTAutograd / FX graph
    cache hit that skips the pass, but a dumping backend compiles with caches off, so both graphs run it."""
    out = tmp_path / "switch"
    monkeypatch.setenv(DUMP_ENV, str(out))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, x = gdn_projections(), torch.randn(6, SPEC.hidden_size)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            backend = FxPassesBackend()                       # made after the env var is set
            assert backend.fusion_pass.config.dump_dir == str(out)
            torch.compile(model, backend=backend)(x)
            assert backend.fusion_pass.matched_count == 1
            assert not counters["inductor"]["fxgraph_cache_hit"] and not counters["aot_autograd"]["autograd_cache_hit"]

    names = sorted(os.listdir(out))
    for i in range(2):
        assert {f"graph_00{i}_before.py", f"graph_00{i}_after.py", f"graph_00{i}.json"} <= set(names)
        assert "torch.ops.fx_passes.qkvz_gemm" in (out / f"graph_00{i}_after.py").read_text()
    data = json.loads((out / "report.json").read_text())
    assert [g["dump_index"] for g in data["graphs"]] == [0, 1]
    assert [g["report"]["graph_index"] for g in data["graphs"]] == [0, 0]
    assert data["totals"]["rewritten"] == 2 and data["depyf"]["ran"] is False
    text = (out / "report.txt").read_text()
    assert text.count("REWRITTEN") == 2 and "linear_attn" in text and DUMP_ENV in text
    assert not (out / "depyf").exists()


def _write_reports(args):
    dump_dir, tag, count = args
    from fx_passes.dump import write_pass_dump
    from fx_passes.report import GraphReport, LayerMatch

    for i in range(count):
        report = GraphReport("qkvz_lora_fusion", i, [LayerMatch(f"{tag}.layers.{i}.linear_attn", False,
                                                                reason="test", node="mm")])
        write_pass_dump(dump_dir, report, f"# {tag} {i} before\n", f"# {tag} {i} after\n")


def test_concurrent_writers_never_collide(tmp_path):
    """Several processes (vLLM workers) and threads writing into one folder: unique indices, one report."""
    import concurrent.futures
    import multiprocessing

    jobs = [(str(tmp_path), f"p{k}", 6) for k in range(3)]
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_write_reports, jobs))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(_write_reports, [(str(tmp_path), "t0", 3), (str(tmp_path), "t1", 3)]))
    data = json.loads((tmp_path / "report.json").read_text())
    assert [g["dump_index"] for g in data["graphs"]] == list(range(24))
    layers = sorted(g["report"]["layers"][0]["layer"] for g in data["graphs"])
    assert len(set(layers)) == 24 and data["totals"]["skipped"] == 24
    for g in data["graphs"]:
        tag_i = g["report"]["layers"][0]["layer"].split(".")
        assert (tmp_path / g["after_file"]).read_text().endswith(f"# {tag_i[0]} {tag_i[2]} after\n")
    assert (tmp_path / "report.txt").read_text().count("SKIPPED") == 24
