"""What the user scripts (``user_compile_script.py``, ``user_train_script.py``) share: the tiny Qwen3.5 + PEFT
model a user builds, and a logging handler that receives the reports the ``fx_passes`` logger carries. Imports
nothing of fx_passes (the scripts check that torch finds the backend by its name alone)."""
import logging

import torch


class Collect(logging.Handler):
    """Keeps ``record.fx_passes_report`` of every record that carries one (each graph's summary line)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []

    def emit(self, record):
        report = getattr(record, "fx_passes_report", None)
        if report is not None:
            self.reports.append(report)

    @classmethod
    def on_fx_passes_logger(cls) -> "Collect":
        collect = cls()
        logger = logging.getLogger("fx_passes")
        logger.setLevel(logging.INFO)
        logger.addHandler(collect)
        return collect


def tiny_peft_qwen35(device: str = "cpu", dtype: torch.dtype = torch.float32, lora_dropout: float = 0.0):
    """A random 4-layer Qwen3.5 (2 GDN layers) with PEFT LoRA r8 on in_proj_qkv / in_proj_z, in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_num_value_heads=4, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"] * 2, use_cache=False)
    model = Qwen3_5ForCausalLM(config).to(device=device, dtype=dtype).eval()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=["in_proj_qkv", "in_proj_z"],
                      init_lora_weights=False)
    return get_peft_model(model, lora).eval()
