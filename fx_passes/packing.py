"""One-time, memory-neutral packing of each GDN layer's projection weights into one buffer.

After packing, ``in_proj_qkv.weight``, ``in_proj_z.weight`` and (where the layer has them)
``in_proj_b.weight`` / ``in_proj_a.weight`` are still separate parameters with their own names and
shapes (state dicts, PEFT and checkpoints see no change), but they are adjacent row blocks of one
``[N_qkv + N_z (+ N_b + N_a), H]`` storage, in that order, so ``fx_passes.qkvz_gemm`` runs ONE GEMM
over them. Peak extra memory is one layer's weights, during their copy.

Two ways in: :func:`pack_qkvz_weights` (explicit, over a whole model) and the ``fx_passes``
backend, which packs the weights of the graph it compiles (:func:`pack_weights` after
:func:`why_not_packable` said yes). Both share the safety rule below and the same choice: all four
when b and a are safe to pack too, else W_qkv and W_z alone (the pass folds b / a either way; they
then run as their own GEMM launch inside the op).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from fx_passes.ops.qkvz_gemm import weights_are_packed

logger = logging.getLogger("fx_passes")

# Inductor assumes 16-byte aligned inputs; every weight after the first starts inside the buffer.
_ALIGN_BYTES = 16
PROJECTION_NAMES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")   # packing order = the op's order


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # PEFT wraps the nn.Linear as base_layer


def _storage_users(t: torch.Tensor) -> Optional[int]:
    """How many tensors share ``t``'s storage (None where torch cannot tell)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    storage = t.untyped_storage()
    return use_count(storage._cdata) - 1   # minus the `storage` object made here


def why_not_packable(weights: Sequence[torch.Tensor], names: Sequence[str] = PROJECTION_NAMES) -> Optional[str]:
    """None when packing ``weights`` (in order) is safe and memory-neutral, else the reason it is not.

    Safe means: plain dense tensors (no subclass: FSDP flat parameters, DTensors, quantized or fake
    tensors keep their own layout), 2-D, contiguous, same dtype / device / width, each the only
    tensor on its whole storage (a tied or shared weight, or a view of a bigger buffer, would
    either keep its old storage alive or be unpacked again by its other owner), and every weight's
    start in the packed buffer 16-byte aligned.
    """
    for name, w in zip(names, weights):
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
    first = weights[0]
    for name, w in zip(names[1:], weights[1:]):
        if w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]:
            return (f"weights differ: {names[0]} {tuple(first.shape)} {first.dtype} {first.device} vs "
                    f"{name} {tuple(w.shape)} {w.dtype} {w.device}")
    offset = 0
    for name, w in zip(names, weights):
        if offset % _ALIGN_BYTES:
            return f"{name} would start {offset} bytes in: not 16-byte aligned"
        offset += w.numel() * w.element_size()
    return None


@torch.no_grad()
def pack_weights(weights: Sequence[torch.Tensor]) -> None:
    """Re-home the tensors' data into one ``[sum N_i, H]`` buffer, in order (``.data`` swap: the same
    Parameter objects, values, shapes and strides; the old storages are freed)."""
    first = weights[0]
    buffer = torch.empty((sum(w.shape[0] for w in weights), first.shape[1]), dtype=first.dtype,
                         device=first.device)
    row = 0
    for w in weights:
        buffer[row:row + w.shape[0]].copy_(w)
        w.data = buffer[row:row + w.shape[0]]
        row += w.shape[0]


def packing_choice(weights: Sequence[torch.Tensor], names: Sequence[str] = PROJECTION_NAMES
                   ) -> tuple[Optional[list], str]:
    """Which prefix of a layer's ``[W_qkv, W_z(, W_b, W_a)]`` to pack: ``(weights to pack, note)``;
    ``None`` when nothing is packed (already packed, or not safe: the note says why)."""
    names = list(names)[:len(weights)]
    for count in sorted({len(weights), 2}, reverse=True):
        head = list(weights[:count])
        if weights_are_packed(head):
            return None, f"{'/'.join(names[:count])} already packed"
        reason = why_not_packable(head, names[:count])
        if reason is None:
            return head, f"{'/'.join(names[:count])} packed"
        if count == 2:
            return None, f"left unpacked: {reason}"
    return None, "nothing to pack"


@torch.no_grad()
def pack_qkvz_weights(model: torch.nn.Module, names: Sequence[str] = PROJECTION_NAMES) -> int:
    """Pack each GDN layer's projection weights (``names``: qkv, z, then the optional b and a) of
    ``model``; returns how many layers are packed (layers already packed count too). Layers whose
    weights are not safe to pack are left as they are, with the reason logged (INFO); b / a that are
    not safe to pack leave W_qkv / W_z packed alone."""
    packed = 0
    for name, parent in model.named_modules():
        modules = [getattr(parent, n, None) for n in names]
        if not all(isinstance(m, torch.nn.Module) for m in modules[:2]):
            continue
        if not all(isinstance(m, torch.nn.Module) for m in modules[2:]):
            modules = modules[:2]
        weights = [_base_linear(m).weight for m in modules]
        todo, note = packing_choice(weights, names)
        if todo is None and not weights_are_packed(weights[:2]):
            logger.info("pack_qkvz_weights: %s %s", name, note)
            continue
        if todo is not None:
            pack_weights(todo)
        packed += 1
    logger.info("pack_qkvz_weights: %d layer(s) packed", packed)
    return packed
