"""fx_passes: a compiler pass that fuses Qwen3.5 GDN input projections (in_proj_qkv / z / b / a) and their LoRA.

Entry points:
* ``torch.compile(model, backend="fx_passes", mode=..., options=...)`` (or
  ``backend=FxPassesBackend(config, mode=..., options=...)``), no import needed;
* ``torch.compile(model, options={"post_grad_custom_post_pass": QkvzLoraFusionPass()})``;
* vLLM: ``compilation_config={"inductor_compile_config": {"post_grad_custom_post_pass": ...}}``.
"""
from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.qkvz_lora_fusion import QkvzLoraFusionPass
from fx_passes.packing import pack_qkvz_weights
from fx_passes.report import GraphReport, LayerMatch
from fx_passes.backend import FxPassesBackend, fx_passes_backend, register as _register_backend

__version__ = "0.1.0"

_register_backend()   # only where the torch_dynamo_backends entry point is not installed
__all__ = ["QkvzFusionConfig", "QkvzLoraFusionPass", "pack_qkvz_weights", "GraphReport", "LayerMatch",
           "FxPassesBackend", "fx_passes_backend", "__version__"]
