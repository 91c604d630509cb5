"""How users reach the pass: the registered backend, Inductor's option, uuid() for cache safety."""
from __future__ import annotations

import copy
import importlib.metadata
import pickle

import torch

import fx_passes
from fx_passes import QkvzFusionConfig, QkvzLoraFusionPass
from fx_passes.fusion import qkvz_lora_fusion
from fusion_helpers import gdn_projections


def test_backend_is_registered_by_name_and_entry_point():
    assert "fx_passes" in torch._dynamo.list_backends()
    points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(p.name == "fx_passes" and p.value == "fx_passes.backend:fx_passes_backend" for p in points)
    model, x = gdn_projections(), torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="fx_passes")(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_pass_object_through_inductor_options():
    fusion_pass = QkvzLoraFusionPass()
    model, x = gdn_projections(), torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, options={"post_grad_custom_post_pass": fusion_pass})(x)
    assert fusion_pass.matched_count == 1
    assert fusion_pass.reports[0].ops_after.get("fx_passes.qkvz_gemm_lora.default") == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_two_op_form_when_gemm_lora_op_is_off():
    """QkvzFusionConfig(gemm_lora_op=False): qkvz_gemm + an in-place qkvz_lora_ instead of one qkvz_gemm_lora."""
    fusion_pass = QkvzLoraFusionPass(QkvzFusionConfig(gemm_lora_op=False))
    model, x = gdn_projections(), torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, options={"post_grad_custom_post_pass": fusion_pass})(x)
    assert fusion_pass.matched_count == 1
    after = fusion_pass.reports[0].ops_after
    assert after.get("fx_passes.qkvz_gemm.default") == 1 and "fx_passes.qkvz_gemm_lora.default" not in after
    assert after.get("auto_functionalized(qkvz_lora_.default)") == 1
    assert fusion_pass.reports[0].layers[0].kernel == "fx_passes.qkvz_gemm + fx_passes.qkvz_lora_"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_uuid_covers_every_source_file_and_the_config(tmp_path, monkeypatch):
    files = qkvz_lora_fusion.rewrite_source_files()
    names = {f.split("fx_passes/")[-1] for f in files}
    assert {"fusion/matcher.py", "fusion/qkvz_lora_fusion.py", "ops/qkvz_lora.py", "ops/qkvz_gemm.py",
            "ops/kernels/lora_expand.py", "ops/qkvz_gemm_lora.py", "ops/kernels/gemm_lora_decode.py",
            "ops/dispatch.py", "ops/tuning.py", "config.py"} <= names
    base = QkvzLoraFusionPass().uuid()
    assert base == QkvzLoraFusionPass().uuid()
    assert base != QkvzLoraFusionPass(QkvzFusionConfig(fuse_without_lora=False)).uuid()
    assert base == QkvzLoraFusionPass(QkvzFusionConfig(dump_dir=str(tmp_path))).uuid()   # dumping shapes nothing
    helper = tmp_path / "helper.py"
    helper.write_text("A = 1\n")
    monkeypatch.setattr(qkvz_lora_fusion, "rewrite_source_files", lambda: (*files, str(helper)))
    first = QkvzLoraFusionPass().uuid()
    helper.write_text("A = 2\n")
    assert QkvzLoraFusionPass().uuid() != first


def test_pass_is_picklable_and_deep_copyable():
    fusion_pass = QkvzLoraFusionPass(QkvzFusionConfig(structural_fallback=False))
    for clone in (pickle.loads(pickle.dumps(fusion_pass)), copy.deepcopy(fusion_pass)):
        assert clone.uuid() == fusion_pass.uuid() and clone.config == fusion_pass.config
    assert fx_passes.__version__
