"""The whole GDN projection block in one op: ``out = x @ [w_qkv; w_z]^T`` plus the multi-slice LoRA.

``fx_passes::qkvz_gemm_lora(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
lora_scales=None, scale=1.0) -> Tensor`` is ``qkvz_gemm(x, w_qkv, w_z)`` followed by
``qkvz_lora_(out, x, ...)`` (same arguments, same semantics: :mod:`fx_passes.ops.qkvz_lora`), as one
functional op, so the implementation may compute the base product and the LoRA together:

* CUDA, ``T <= FUSED_MAX_T`` (decode): a shrink launch plus our Triton GEMM with the LoRA expand in its
  epilogue, overlapped by programmatic dependent launch (:mod:`fx_passes.ops.qkvz_gemm_lora_kernels`).
  The base product and the LoRA delta are summed in fp32 and rounded once.
* CUDA, larger T (prefill), when the LoRA slices cover every output column (q, k, v and z all carry
  LoRA): the LoRA delta is *written* into the fresh output first (shrink + expand, 0 for rows without
  an adapter), then the library GEMM accumulates the base product into it (``addmm_``, beta = 1). The
  GEMM is compute-bound there, so reading ``out`` in its epilogue is nearly free, while a LoRA added
  afterwards must read and re-write all of ``out`` (2 T N bytes: 42 us of a 274 us GEMM on
  Qwen3.5-35B-A3B at T = 4096, H200).
* otherwise (CPU, partial column coverage, column layouts needing more than 4 segments at small T):
  ``qkvz_gemm`` (one cuBLAS GEMM over packed weights) then ``qkvz_lora_`` in place; the base product is
  rounded to the output dtype before the LoRA is added (what PEFT computes).

Both paths agree to the output dtype's rounding; the choice depends only on shapes (host-side, no
device sync), so a CUDA graph captured at one T always replays the same kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE
from fx_passes.ops.qkvz_gemm import _check_inputs as _check_gemm_inputs
from fx_passes.ops.qkvz_gemm import qkvz_gemm_accumulate_
from fx_passes.ops.qkvz_lora import check_qkvz_lora_args, qkvz_lora_reference

# Measured on an H200 (benchmarks/RESULTS.md): the fused kernel beats cuBLAS + the two-launch LoRA up
# to T = 64; above, the two-launch path's cuBLAS GEMM wins.
FUSED_MAX_T = 64


def _check(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales) -> int:
    """Every rule of qkvz_gemm and qkvz_lora_ (out = the [T, N_qkv + N_z] result); returns L."""
    _check_gemm_inputs(x, w_qkv, w_z)
    out = x.new_empty((x.shape[0], w_qkv.shape[0] + w_z.shape[0]), device="meta")
    return check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)


def lora_covers_all_columns(lora_b: Sequence[torch.Tensor], n: int) -> bool:
    """Whether the LoRA slices cover all ``n`` output columns (they never overlap: checked by the op)."""
    return sum(b.shape[-2] for b in lora_b) == n


def qkvz_gemm_lora_prefill(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
                           lora_scales=None, scale=1.0) -> torch.Tensor:
    """The large-T path (arguments checked by the caller): LoRA delta written first, library GEMM
    accumulating into it; the two-op form (GEMM, then the LoRA added in place) when some column has
    no LoRA slice (the delta kernel only writes the slices' columns)."""
    from fx_passes.ops.qkvz_lora_kernels import qkvz_lora_triton_

    n = w_qkv.shape[0] + w_z.shape[0]
    if not lora_covers_all_columns(lora_b, n):
        out = torch.ops.fx_passes.qkvz_gemm(x, w_qkv, w_z)
        qkvz_lora_triton_(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale)
        return out
    out = x.new_empty((x.shape[0], n))
    qkvz_lora_triton_(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale,
                      accumulate=False)
    qkvz_gemm_accumulate_(out, x, w_qkv, w_z)
    return out


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_gemm_lora", mutates_args=())
def qkvz_gemm_lora(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_z: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``qkvz_gemm(x, w_qkv, w_z)`` + the LoRA of ``qkvz_lora_`` (plain torch: the CPU kernel)."""
    _check(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    out = torch.ops.fx_passes.qkvz_gemm(x, w_qkv, w_z)
    qkvz_lora_reference(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale)
    return out


@qkvz_gemm_lora.register_fake
def _qkvz_gemm_lora_fake(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
                         lora_scales=None, scale=1.0):
    _check(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    return x.new_empty((x.shape[0], w_qkv.shape[0] + w_z.shape[0]))


@qkvz_gemm_lora.register_kernel("cuda")
def _qkvz_gemm_lora_cuda(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
                         lora_scales=None, scale=1.0):
    from fx_passes.ops.qkvz_gemm_lora_kernels import plan_segments, qkvz_gemm_lora_triton

    adapters = _check(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    lora_a, lora_b, slice_a, slice_start = list(lora_a), list(lora_b), list(slice_a), list(slice_start)
    if x.shape[0] <= FUSED_MAX_T:
        segments = plan_segments(w_qkv, w_z, lora_b, slice_start)
        if segments is not None:
            return qkvz_gemm_lora_triton(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                         lora_scales, scale, adapters=adapters, segments=segments)
    return qkvz_gemm_lora_prefill(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                  lora_scales, scale)
