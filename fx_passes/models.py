"""Tiny random Qwen3.5 (dense and MoE) models with PEFT LoRA, built locally (no downloads).

Shared by the demo, the tests and the benchmarks so that all three exercise the same graphs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

GDN_TARGETS = ("in_proj_qkv", "in_proj_z")


@dataclasses.dataclass(frozen=True)
class TinyQwen35Spec:
    hidden_size: int = 64
    num_layers: int = 4                 # alternates linear_attention / full_attention
    linear_num_key_heads: int = 2
    linear_key_head_dim: int = 16
    linear_num_value_heads: int = 4
    linear_value_head_dim: int = 16
    vocab_size: int = 128
    moe: bool = False

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def num_gdn_layers(self) -> int:
        return sum(1 for t in self.layer_types() if t == "linear_attention")

    def layer_types(self) -> list[str]:
        return ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers)]


def build_tiny_qwen35(spec: TinyQwen35Spec = TinyQwen35Spec(), dtype: torch.dtype = torch.float32,
                      device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random Qwen3.5 (or Qwen3.5-MoE) causal LM, eval mode, no KV cache."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=spec.linear_num_key_heads, linear_key_head_dim=spec.linear_key_head_dim,
        linear_num_value_heads=spec.linear_num_value_heads, linear_value_head_dim=spec.linear_value_head_dim,
        linear_conv_kernel_dim=4, layer_types=spec.layer_types(), use_cache=False,
    )
    if spec.moe:
        from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

        config = Qwen3_5MoeTextConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2)
        model = Qwen3_5MoeForCausalLM(config)
    else:
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**common, intermediate_size=128))
    return model.to(device=device, dtype=dtype).eval()


def add_lora(model: torch.nn.Module, r: int = 8, alpha: int = 16, targets: Sequence[str] = GDN_TARGETS,
             adapters: Sequence[str] = ("default",), dropout: float = 0.0, use_dora: bool = False,
             autocast_adapter_dtype: bool = True, seed: int = 1) -> torch.nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters with non-zero B (so LoRA changes the output)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        use_dora=use_dora, init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name=adapters[0],
                                autocast_adapter_dtype=autocast_adapter_dtype)
    for name in adapters[1:]:
        peft_model.add_adapter(name, config)
    if len(adapters) > 1:
        peft_model.base_model.set_adapter(list(adapters))
    return peft_model.eval()


def example_inputs(spec: TinyQwen35Spec = TinyQwen35Spec(), batch: int = 2, seq: int = 8,
                   device: str = "cpu", seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch, seq), generator=generator).to(device)


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=input_ids, **kwargs).logits
