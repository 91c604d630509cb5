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


__all__ = ["QkvzLoraFusionVllmPass", "VLLM_AVAILABLE"]
