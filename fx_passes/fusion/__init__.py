"""Graph passes of fx_passes (one pass per file)."""
from fx_passes.fusion.qkvz_lora_fusion import QkvzLoraFusionPass

__all__ = ["QkvzLoraFusionPass"]
