"""The whole GDN projection block in one op: ``out = x @ [w_qkv; w_z]^T`` plus the multi-slice LoRA.

``fx_passes::qkvz_gemm_lora(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None,
lora_scales=None, scale=1.0) -> Tensor`` is ``qkvz_gemm(x, w_qkv, w_z)`` followed by
``qkvz_lora_(out, x, ...)`` (same arguments, same semantics: :mod:`fx_passes.ops.qkvz_lora`), as one
functional op, so the implementation may compute the base product and the LoRA together:

* CUDA, ``T <= FUSED_MAX_T`` (decode): a shrink launch plus our Triton GEMM with the LoRA expand in its
  epilogue, overlapped by programmatic dependent launch (:mod:`fx_passes.ops.qkvz_gemm_lora_kernels`).
  The base product and the LoRA delta are summed in fp32 and rounded once.
* CUDA, ``T >= PREFILL_FUSED_MIN_T`` (prefill), Hopper+, packed weights, 16-bit x / W / adapters of one
  dtype: a shrink launch plus a persistent TMA GEMM with the LoRA expand in its epilogue
  (:mod:`fx_passes.ops.qkvz_prefill_kernels`); like the decode kernel, one fp32 sum rounded once.
* else CUDA, ``T >= ACCUMULATE_MIN_T``, when the LoRA slices cover every output column (q, k, v
  and z all carry LoRA): the LoRA delta is *written* into the fresh output first (shrink + expand, 0 for
  rows without an adapter), then the library GEMM accumulates the base product into it (``addmm_``,
  beta = 1). The GEMM is compute-bound there, so reading ``out`` in its epilogue costs little (+13 us
  on Qwen3.5-35B-A3B at T = 4096, H200), while a LoRA added afterwards must read and re-write all of
  ``out`` (that expand: 54 us; writing the delta: 27 us; the GEMM: 264 us).
* otherwise (CPU, T between the two, partial column coverage, more than 4 column segments at small T):
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
from fx_passes.ops.lora_args import check_qkvz_lora_args, kernel_calls, num_adapters
from fx_passes.ops.qkvz_lora import qkvz_lora_reference

# Measured on an H200 (benchmarks/RESULTS.md): the fused kernel beats cuBLAS + the two-launch LoRA up
# to T = 64; above, the two-launch path's cuBLAS GEMM wins.
FUSED_MAX_T = 64
# Writing the LoRA delta first and letting cuBLAS accumulate (beta = 1) pays once the GEMM is
# compute-bound: H200, same run (session 3 call 4), T = 1024: 1.05-1.10x base vs 1.09-1.17x for
# GEMM-then-add on 27B / 397B-A17B (equal on 35B-A3B); T = 4096, 35B-A3B: 1.09x vs 1.13-1.18x. At
# T = 256 the GEMM still streams W and reading `out` in its epilogue costs more than it saves
# (35B-A3B 1.34x vs 1.31x, 397B r 64 1.27x vs 1.20x), so below this many tokens the LoRA is added after.
ACCUMULATE_MIN_T = 512
# The persistent TMA GEMM with the expand in its epilogue, H200 (session 4). T >= 1024 (call 7, full
# table): better than the write-then-accumulate form in 22 / 24 rows of call 6 vs session 3's call 4.
# Threshold (call 9, `bench_qkvz_lora.py --variants base,ours,ours_prefill`, same run): T = 512 fused
# better or equal in 10 / 12 rows (4 adapters 6 / 6: e.g. 397B-A17B r16 1.17x vs 1.36x; misses 27B r64
# 1.25x vs 1.18x); T = 256 mixed (397B-A17B 1.50x vs 1.18x: 128-row tiles leave SMs idle, 2 x 80 tiles
# for 132 SMs), so from 512 tokens.
PREFILL_FUSED_MIN_T = 512


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
    """The path above ``FUSED_MAX_T`` (arguments checked by the caller): from ``PREFILL_FUSED_MIN_T``
    tokens the fused prefill kernel when ``prefill_fusable``; else from ``ACCUMULATE_MIN_T`` tokens the
    LoRA delta is written first and the library GEMM accumulates into it; below that, or when some
    column has no LoRA slice (the delta kernel only writes the slices' columns), the two-op form (GEMM,
    then the LoRA added in place)."""
    from fx_passes.ops.qkvz_lora_kernels import qkvz_lora_triton_
    from fx_passes.ops.qkvz_prefill_kernels import prefill_fusable, qkvz_prefill_triton

    if x.shape[0] >= PREFILL_FUSED_MIN_T and prefill_fusable(x, w_qkv, w_z, lora_a, lora_b):
        return qkvz_prefill_triton(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                   lora_scales, scale, adapters=num_adapters(lora_a[0]))
    n = w_qkv.shape[0] + w_z.shape[0]
    if x.shape[0] < ACCUMULATE_MIN_T or not lora_covers_all_columns(lora_b, n):
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
    from fx_passes.ops.qkvz_lora_kernels import qkvz_lora_triton_

    adapters = _check(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    calls = kernel_calls(lora_a, lora_b, slice_a, slice_start)
    if len(calls) > 1:   # a rank above the kernels' limit: the GEMM, then the LoRA in rank chunks
        out = torch.ops.fx_passes.qkvz_gemm(x, w_qkv, w_z)
        for a, b, sa, ss in calls:
            qkvz_lora_triton_(out, x, a, b, sa, ss, token_lora_ids, lora_scales, scale)
        return out
    lora_a, lora_b, slice_a, slice_start = calls[0]   # strided adapters made contiguous
    if x.shape[0] <= FUSED_MAX_T:
        segments = plan_segments(w_qkv, w_z, lora_b, slice_start)
        if segments is not None:
            return qkvz_gemm_lora_triton(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                         lora_scales, scale, adapters=adapters, segments=segments)
    return qkvz_gemm_lora_prefill(x, w_qkv, w_z, lora_a, lora_b, slice_a, slice_start, token_lora_ids,
                                  lora_scales, scale)
