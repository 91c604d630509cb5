"""Compile-cache safety: a changed pass is never skipped by a stale Inductor FX graph cache entry.

Inductor keys its FX graph cache (and AOTAutograd's) on ``post_grad_custom_post_pass.uuid()``;
through vLLM that is ``PostGradPassManager.uuid()``, a hash of the pass config, the compile range
and every pass's uuid -- ours included. A cache hit skips the post-grad passes entirely, so the
only protection against running stale rewritten code is our ``uuid()``: the pass config's
``cache_key()``, the torch version and every source file of the package.
"""
import importlib.util
import shutil

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

import vllm_helpers as vh  # noqa: E402

vh.install_triton_cpu_hack()   # before any other vllm import
pytest.importorskip("vllm")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fx_passes.fusion.qkvz_lora_fusion as qkvz_lora_fusion  # noqa: E402
from fx_passes.config import QkvzFusionConfig  # noqa: E402
from fx_passes.vllm_pass import QkvzLoraFusionVllmPass  # noqa: E402

TOKENS = [0, 0, -1, 1, 1, 0, -1]


def _compile_and_run(block, pw, x, fusion):
    """A fresh Dynamo compile with Inductor's caches on; returns (outputs, eager, pm uuid, counters)."""
    torch._dynamo.reset()
    counters.clear()
    log = []
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        compiled = vh.compile_with_pass(block, fusion, caches=True, log=log)
        ((eager, out, _),) = vh.run_mappings(block, pw, compiled, x, [TOKENS])
    (entry,) = log
    stats = dict(counters["inductor"])
    torch._dynamo.reset()
    return out, eager, entry["pm_uuid"], stats


def _check(out, eager, what):
    for i, (e, o) in enumerate(zip(eager, out)):
        vh.close(o, e, f"{what}: output {i} vs vLLM eager")


def test_cache_hit_skips_pass_changed_uuid_reruns_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    block, pw = vh.build_fused_block()
    x = torch.randn(len(TOKENS), vh.H, dtype=torch.float16)

    # 1. empty cache: miss, the pass runs and rewrites
    first = QkvzLoraFusionVllmPass()
    out, eager, pm_uuid, stats = _compile_and_run(block, pw, x, first)
    assert stats.get("fxgraph_cache_miss") == 1 and not stats.get("fxgraph_cache_hit"), stats
    assert first.matched_count == 1 and len(first.reports) == 1
    _check(out, eager, "first compile")

    # 2. same pass uuid: hit, the pass is not called at all; the cached (rewritten) code still runs right
    again = QkvzLoraFusionVllmPass()
    out, eager, pm_uuid2, stats = _compile_and_run(block, pw, x, again)
    assert pm_uuid2 == pm_uuid
    assert stats.get("fxgraph_cache_hit") == 1 and not stats.get("fxgraph_cache_miss"), stats
    assert again.reports == [] and again.matched_count == 0
    _check(out, eager, "cache hit")

    # 3. a config field that shapes the rewrite changes cache_key() -> new uuid -> miss, pass runs
    config = QkvzFusionConfig(structural_fallback=False)
    assert config.cache_key() != QkvzFusionConfig().cache_key()
    other_config = QkvzLoraFusionVllmPass(config)
    out, eager, pm_uuid3, stats = _compile_and_run(block, pw, x, other_config)
    assert pm_uuid3 != pm_uuid
    assert stats.get("fxgraph_cache_miss") == 1 and not stats.get("fxgraph_cache_hit"), stats
    assert other_config.matched_count == 1 and len(other_config.reports) == 1
    _check(out, eager, "changed config")

    # 4. a changed helper file (same class, same config) -> new uuid -> miss, pass runs.
    # uuid() hashes every *.py under the package dir; point it at a copy of the package
    copy = tmp_path / "fx_passes"
    shutil.copytree(qkvz_lora_fusion._PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    baseline = QkvzLoraFusionVllmPass().uuid()
    monkeypatch.setattr(qkvz_lora_fusion, "_PACKAGE_DIR", str(copy))
    assert QkvzLoraFusionVllmPass().uuid() == baseline      # the unedited copy hashes the same
    with open(copy / "fusion" / "matcher.py", "a") as f:
        f.write("\n# a changed helper: its pass must not hit the old cache entry\n")
    edited = QkvzLoraFusionVllmPass()
    assert edited.uuid() != baseline
    out, eager, pm_uuid4, stats = _compile_and_run(block, pw, x, edited)
    assert pm_uuid4 not in (pm_uuid, pm_uuid3)
    assert stats.get("fxgraph_cache_miss") == 1 and not stats.get("fxgraph_cache_hit"), stats
    assert edited.matched_count == 1 and len(edited.reports) == 1
    assert vh.OURS in edited.reports[0].ops_after
    _check(out, eager, "changed source")
