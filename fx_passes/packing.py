"""One-time, memory-neutral packing of each GDN layer's W_qkv and W_z into one buffer.

After packing, ``in_proj_qkv.weight`` and ``in_proj_z.weight`` are still two parameters with
their own names and shapes (state dicts, PEFT and checkpoints see no change), but they are
adjacent row blocks of one ``[N_qkv + N_z, H]`` storage, so ``fx_passes.qkvz_gemm`` runs ONE
GEMM over them. Peak extra memory is one layer's pair of weights, during its copy.

Two ways in: :func:`pack_qkvz_weights` (explicit, over a whole model) and the ``fx_passes``
backend, which packs the pairs of the graph it compiles (:func:`pack_pair` after
:func:`why_not_packable` said yes). Both share the safety rule below.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fx_passes.ops.qkvz_gemm import weights_are_packed

logger = logging.getLogger("fx_passes")

# Inductor assumes 16-byte aligned inputs; W_z starts N_qkv * H elements into the packed buffer.
_ALIGN_BYTES = 16


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # PEFT wraps the nn.Linear as base_layer


def _storage_users(t: torch.Tensor) -> Optional[int]:
    """How many tensors share ``t``'s storage (None where torch cannot tell)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = t.untyped_storage()
    return use_count(storage._cdata) - 1   # minus the `storage` object made here


def why_not_packable(w_qkv: torch.Tensor, w_z: torch.Tensor) -> Optional[str]:
    """None when packing the pair is safe and memory-neutral, else the reason it is not.

    Safe means: plain dense tensors (no subclass: FSDP flat parameters, DTensors, quantized or fake
    tensors keep their own layout), 2-D, contiguous, same dtype / device / width, each the only
    tensor on its whole storage (a tied or shared weight, or a view of a bigger buffer, would
    either keep its old storage alive or be unpacked again by its other owner), and W_z's start in
    the packed buffer 16-byte aligned.
    """
    for name, w in (("in_proj_qkv", w_qkv), ("in_proj_z", w_z)):
        if type(w) not in (torch.Tensor, torch.nn.Parameter):
            return f"{name} weight is a {type(w).__name__}, not a plain tensor"
        if w.dim() != 2 or not w.is_contiguous() or w.layout != torch.strided:
            return f"{name} weight is not a contiguous 2-D tensor"
        if w.is_meta or w.device.type == "meta":
            return f"{name} weight is on the meta device"
        if w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size():
            return f"{name} weight is a view of a bigger storage"
        users = _storage_users(w)
        if users is None:
            return "this torch cannot tell whether a weight's storage is shared"
        if users != 1:
            return f"{name} weight's storage is shared with {users - 1} other tensor(s)"
    if w_qkv.dtype != w_z.dtype or w_qkv.device != w_z.device or w_qkv.shape[1] != w_z.shape[1]:
        return (f"weights differ: {tuple(w_qkv.shape)} {w_qkv.dtype} {w_qkv.device} vs "
                f"{tuple(w_z.shape)} {w_z.dtype} {w_z.device}")
    if (w_qkv.numel() * w_qkv.element_size()) % _ALIGN_BYTES:
        return f"W_z would start {w_qkv.numel() * w_qkv.element_size()} bytes in: not 16-byte aligned"
    return None


@torch.no_grad()
def pack_pair(w_qkv: torch.Tensor, w_z: torch.Tensor) -> None:
    """Re-home both tensors' data into one ``[N_qkv + N_z, H]`` buffer (``.data`` swap: the same
    Parameter objects, values, shapes and strides; the old storages are freed)."""
    buffer = torch.empty((w_qkv.shape[0] + w_z.shape[0], w_qkv.shape[1]), dtype=w_qkv.dtype,
                         device=w_qkv.device)
    buffer[: w_qkv.shape[0]].copy_(w_qkv)
    buffer[w_qkv.shape[0]:].copy_(w_z)
    w_qkv.data = buffer[: w_qkv.shape[0]]
    w_z.data = buffer[w_qkv.shape[0]:]


@torch.no_grad()
def pack_qkvz_weights(model: torch.nn.Module, qkv_name: str = "in_proj_qkv", z_name: str = "in_proj_z") -> int:
    """Pack every (``qkv_name``, ``z_name``) sibling pair of ``model``; returns how many were packed
    (pairs already packed count too). Pairs that are not safe to pack are left as they are, with the
    reason logged (INFO)."""
    packed = 0
    for name, parent in model.named_modules():
        qkv, z = getattr(parent, qkv_name, None), getattr(parent, z_name, None)
        if not isinstance(qkv, torch.nn.Module) or not isinstance(z, torch.nn.Module):
            continue
        w_qkv, w_z = _base_linear(qkv).weight, _base_linear(z).weight
        if weights_are_packed(w_qkv, w_z):
            packed += 1
            continue
        reason = why_not_packable(w_qkv, w_z)
        if reason is not None:
            logger.info("pack_qkvz_weights: %s left as is: %s", name, reason)
            continue
        pack_pair(w_qkv, w_z)
        packed += 1
    logger.info("pack_qkvz_weights: %d layer(s) packed", packed)
    return packed
