"""Batched multi-slice LoRA, added in place: the q | k | v | z LoRA of one GDN layer in one op.

Semantics (``fx_passes::qkvz_lora_``), for every token ``t`` with adapter ``l = token_lora_ids[t]``
(an id outside ``0..L-1``, ``-1`` among them, means no adapter; ``token_lora_ids=None`` = every token
uses adapter 0) and every slice ``i``::

    s_i   = x[t] @ lora_a[slice_a[i]][l].T                  # shrink, fp32 accumulation
    out[t, slice_start[i] : slice_start[i] + n_i] += scale * lora_scales[l] * (s_i @ lora_b[i][l].T)

* ``out`` ``[T, N]``: last dim contiguous; any row stride (a column block of a wider buffer is fine).
* ``x`` ``[T, H]``; fp16 / bf16 / fp32. It may differ in dtype from the adapters (PEFT keeps fp32
  adapters on a bf16 base): the shrink then runs in the adapters' dtype with fp32 accumulation.
* ``lora_a[g]`` ``[r_g, H]`` or stacked ``[L, r_g, H]``: one A per *group*. Slices that share an A
  (PEFT's in_proj_qkv: q, k and v) name the same group in ``slice_a``, so its shrink runs once.
* ``lora_b[i]`` ``[n_i, r]`` or ``[L, n_i, r]``: one B per output slice (views of a bigger B are fine).
* Any rank, any strides of A and B. (The CUDA kernels take ranks up to ``KERNEL_MAX_RANK`` and a
  contiguous last dim: :meth:`LoraSlices.kernel_calls` splits a bigger rank into chunks whose LoRA terms add up,
  and copies a strided adapter first -- same result, slower.)
* ``token_lora_ids`` int32 or int64, compared at their own width (no id is truncated); out-of-range
  ids are not an error anywhere (no host sync to check them): they select no adapter.
* The shrink result is rounded to B's dtype before the expand when B is 16-bit (what PEFT and vLLM
  compute), the expand accumulates in fp32, and ``out`` is rounded once.
* ``lora_scales`` ``[L]`` (or 0-d / ``[1]``, broadcast): per-adapter scale; ``None`` = 1.

The CPU implementation is plain torch; the CUDA one runs the Triton shrink and expand
(:mod:`fx_passes.ops.dispatch`, :mod:`fx_passes.ops.kernels.lora_expand`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE, exact_dtypes
from fx_passes.ops.lora_args import LoraSlices, check_qkvz_lora_args

def _as_stacked(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def qkvz_lora_reference(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> None:
    """Plain-torch implementation (the CPU kernel and the tests' reference)."""
    adapters = check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    ab_dtype = lora_a[0].dtype
    xa = x.to(ab_dtype)
    scales = torch.ones(adapters, dtype=torch.float32, device=x.device)
    if lora_scales is not None:
        scales = scales * lora_scales.to(device=x.device, dtype=torch.float32).reshape(-1)
    scales = scales * scale
    for adapter in range(adapters):
        if token_lora_ids is None:
            rows = None
        else:
            rows = (token_lora_ids == adapter).nonzero().flatten()
            if rows.numel() == 0:
                continue
        xs = xa if rows is None else xa.index_select(0, rows)
        shrinks = {}
        for g in sorted(set(slice_a)):
            shrinks[g] = torch.mm(xs.float(), _as_stacked(lora_a[g])[adapter].float().t())
        for i, b in enumerate(lora_b):
            b_l = _as_stacked(b)[adapter]
            s = shrinks[slice_a[i]].to(b_l.dtype).float()  # PEFT/vLLM round the shrink to B's dtype
            delta = torch.mm(s, b_l.float().t()) * scales[adapter]
            cols = slice(slice_start[i], slice_start[i] + b_l.shape[0])
            if rows is None:
                out[:, cols] = (out[:, cols].float() + delta).to(out.dtype)
            else:
                block = out[:, cols]
                block.index_copy_(0, rows, (block.index_select(0, rows).float() + delta).to(out.dtype))


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_", mutates_args={"out"})
def qkvz_lora_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> None:
    """Adds the multi-slice LoRA of ``x`` into ``out`` in place (see module docstring)."""
    with exact_dtypes(x):
        qkvz_lora_reference(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale)


@qkvz_lora_.register_fake
def _qkvz_lora_fake(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None, lora_scales=None, scale=1.0):
    check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)


@qkvz_lora_.register_kernel("cuda")
def _qkvz_lora_cuda(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None, lora_scales=None, scale=1.0):
    from fx_passes.ops.dispatch import lora_   # imports Triton: only when a CUDA call comes

    with exact_dtypes(x):
        lora_(out, x, LoraSlices.of(lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale))
