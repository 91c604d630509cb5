"""The pass as vLLM expects it: ``compilation_config={"inductor_compile_config":
{"post_grad_custom_post_pass": QkvzLoraFusionVllmPass()}}``.

When vLLM is installed the class is a ``vllm.compilation.passes.inductor_pass.InductorPass``
(vLLM's pass manager and compile cache accept it); without vLLM it is a plain torch
``CustomGraphPass`` and everything else works the same. Importing this module imports vLLM;
``import fx_passes`` alone never does.

``uuid()`` is the fusion pass's: a hash of every source file of the package, the config fields
that shape the rewrite and the torch version -- not vLLM's default, which hashes only the class
source, so a changed helper could otherwise hit a stale cache entry.
"""
from __future__ import annotations

from typing import Optional

from torch._inductor.custom_graph_pass import CustomGraphPass

from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.qkvz_lora_fusion import QkvzLoraFusionPass
from fx_passes.fusion.vllm_lora_fusion import VllmLoraFusion, feeds_vllm_lora
from fx_passes.report import GraphReport

try:  # vLLM >= 0.21 keeps passes in vllm.compilation.passes
    from vllm.compilation.passes.inductor_pass import InductorPass as _InductorPassBase
    VLLM_AVAILABLE = True
except ImportError:  # older layout, or no vLLM at all
    try:
        from vllm.compilation.inductor_pass import InductorPass as _InductorPassBase
        VLLM_AVAILABLE = True
    except ImportError:
        _InductorPassBase = CustomGraphPass
        VLLM_AVAILABLE = False


class QkvzLoraFusionVllmPass(QkvzLoraFusionPass, _InductorPassBase):
    """:class:`~fx_passes.QkvzLoraFusionPass` as a vLLM ``InductorPass`` (deep-copyable, picklable)."""

    def __init__(self, config: Optional[QkvzFusionConfig] = None):
        QkvzLoraFusionPass.__init__(self, config)

    def uuid(self) -> str:
        return QkvzLoraFusionPass.uuid(self)

    def _find_candidates(self, graph, report):
        # a layer the vLLM matcher skipped still has vllm::lora_expand writing into its base GEMMs:
        # fusing those GEMMs would hand lora_expand a strided view (it asserts contiguity)
        return [c for c in QkvzLoraFusionPass._find_candidates(self, graph, report)
                if not (feeds_vllm_lora(c.qkv) or feeds_vllm_lora(c.z))]

    def match_and_rewrite(self, graph, report) -> None:
        """vLLM's punica LoRA forms first (split in_proj_qkv / in_proj_z, or fused in_proj_qkvz, each with
        in_proj_ba folded in, with vllm::lora_shrink / lora_expand, see
        :mod:`fx_passes.fusion.vllm_lora_fusion`), then the
        HF/PEFT form on what is left. The base pass's lifecycle does the rest (one report, log, dump:
        the dump's before graph is the graph vLLM handed over)."""
        cfg = self.config
        vllm_layers = VllmLoraFusion(cfg.qkv_name, cfg.z_name, cfg.qkvz_name, cfg.gemm_lora_op, cfg.ba_name,
                                     cfg.fold_ba)(graph)
        report.layers.extend(vllm_layers)
        seen = {layer.layer for layer in vllm_layers}
        hf = GraphReport(report.pass_name, report.graph_index)
        QkvzLoraFusionPass.match_and_rewrite(self, graph, hf)
        report.layers.extend(layer for layer in hf.layers if layer.layer not in seen)


__all__ = ["QkvzLoraFusionVllmPass", "VLLM_AVAILABLE"]
