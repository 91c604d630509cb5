"""One-time, memory-neutral packing of each GDN layer's W_qkv and W_z into one buffer.

After packing, ``in_proj_qkv.weight`` and ``in_proj_z.weight`` are still two parameters with
their own names and shapes (state dicts, PEFT and checkpoints see no change), but they are
adjacent row blocks of one ``[N_qkv + N_z, H]`` storage, so ``fx_passes.qkvz_gemm`` runs ONE
GEMM over them. Peak extra memory is one layer's pair of weights, during its copy.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("fx_passes")


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # PEFT wraps the nn.Linear as base_layer


@torch.no_grad()
def pack_qkvz_weights(model: torch.nn.Module, qkv_name: str = "in_proj_qkv", z_name: str = "in_proj_z") -> int:
    """Pack every (``qkv_name``, ``z_name``) sibling pair of ``model``; returns how many were packed."""
    packed = 0
    for name, parent in model.named_modules():
        qkv, z = getattr(parent, qkv_name, None), getattr(parent, z_name, None)
        if not isinstance(qkv, torch.nn.Module) or not isinstance(z, torch.nn.Module):
            continue
        w_qkv, w_z = _base_linear(qkv).weight, _base_linear(z).weight
        if w_qkv.dim() != 2 or w_z.shape[1:] != w_qkv.shape[1:] or w_qkv.dtype != w_z.dtype \
                or w_qkv.device != w_z.device:
            logger.info("pack_qkvz_weights: %s left as is (weights %s %s, %s %s)", name,
                        tuple(w_qkv.shape), w_qkv.dtype, tuple(w_z.shape), w_z.dtype)
            continue
        buffer = torch.empty((w_qkv.shape[0] + w_z.shape[0], w_qkv.shape[1]), dtype=w_qkv.dtype,
                             device=w_qkv.device)
        buffer[: w_qkv.shape[0]].copy_(w_qkv)
        buffer[w_qkv.shape[0]:].copy_(w_z)
        w_qkv.data = buffer[: w_qkv.shape[0]]
        w_z.data = buffer[w_qkv.shape[0]:]
        packed += 1
    logger.info("pack_qkvz_weights: packed %d layer(s)", packed)
    return packed
