"""The whole GDN projection block in one op: ``out = x @ [W_0; W_1; ...]^T`` plus the multi-slice LoRA.

``fx_passes::qkvz_gemm_lora(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
lora_scales=None, scale=1.0) -> Tensor`` is ``qkvz_gemm(x, weights)`` followed by
``qkvz_lora_(out, x, ...)`` (same arguments, same semantics: :mod:`fx_passes.ops.qkvz_lora`), as one
functional op, so the implementation may compute the base product and the LoRA together:

``weights`` is ``[W_qkv, W_z]`` or, with a GDN layer's gate projections folded in,
``[W_qkv, W_z, W_b, W_a]`` (six LoRA slices q | k | v | z | b | a in up to four A groups).

* CUDA: the shrink beside our own GEMM with the expand in its epilogue at decode and (Hopper+, packed
  16-bit weights) at prefill, the library GEMM accumulating into a written LoRA delta in between, or
  the GEMM then the LoRA (:mod:`fx_passes.ops.dispatch` says which, and why).
* CPU: ``qkvz_gemm`` (one GEMM over packed weights) then the LoRA in place; the base product is
  rounded to the output dtype before the LoRA is added (what PEFT computes).

Both paths agree to the output dtype's rounding; the choice depends only on shapes (host-side, no
device sync), so a CUDA graph captured at one T always replays the same kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE, exact_dtypes
from fx_passes.ops.lora_args import LoraSlices, check_qkvz_lora_args
from fx_passes.ops.qkvz_gemm import check_gemm_args, total_rows
from fx_passes.ops.qkvz_lora import qkvz_lora_reference


def _check(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales) -> int:
    """Every rule of qkvz_gemm and qkvz_lora_ (out = the [T, sum N_i] result); returns L."""
    check_gemm_args(x, weights)
    out = x.new_empty((x.shape[0], total_rows(weights)), device="meta")
    return check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_gemm_lora", mutates_args=())
def qkvz_gemm_lora(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``qkvz_gemm(x, weights)`` + the LoRA of ``qkvz_lora_`` (plain torch: the CPU kernel)."""
    _check(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    with exact_dtypes(x):
        out = torch.ops.fx_passes.qkvz_gemm(x, weights)
        qkvz_lora_reference(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale)
    return out


@qkvz_gemm_lora.register_fake
def _qkvz_gemm_lora_fake(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
                         lora_scales=None, scale=1.0):
    _check(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    return x.new_empty((x.shape[0], total_rows(weights)))


@qkvz_gemm_lora.register_kernel("cuda")
def _qkvz_gemm_lora_cuda(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
                         lora_scales=None, scale=1.0):
    from fx_passes.ops.dispatch import gemm_lora   # imports Triton: only when a CUDA call comes

    # the argument rules depend on metadata only: checked once per call signature (dispatch's plan cache)
    with exact_dtypes(x):
        return gemm_lora(x, tuple(weights), LoraSlices.of(lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                                          lora_scales, scale),
                         check=lambda: _check(x, weights, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                              lora_scales))
