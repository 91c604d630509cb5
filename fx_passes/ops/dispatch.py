"""Which kernels run an op call on CUDA. The choice depends only on shapes, dtypes, layouts and the
device (host-side, no device sync), so a CUDA graph captured at one T always replays the same kernels.
Thresholds come from :mod:`fx_passes.ops.tuning` (measured per device, rules elsewhere).

``qkvz_gemm_lora`` (``out = x @ [W_0; W_1; ...]^T + LoRA``), by T:

* ``T <= fused_max_t`` (decode): :func:`~.kernels.gemm_lora_decode.gemm_lora_decode`, the shrink
  beside our GEMM with the expand in its epilogue; the base product and the delta are summed in fp32
  and rounded once.
* ``T >= prefill_fused_min_t`` (prefill), where :func:`~.kernels.gemm_lora_prefill.prefill_fusable`:
  the persistent TMA GEMM with the expand in its epilogue; one fp32 sum rounded once.
* else ``T >= accumulate_min_t`` when the LoRA slices cover every output column: the delta is
  *written* into the fresh output first (shrink + expand, 0 for rows without an adapter), then the
  library GEMM accumulates the base into it (``addmm_``, beta = 1): its epilogue reads ``out`` once,
  where a LoRA after the GEMM reads and re-writes it.
* otherwise (T between, partial column coverage, more than ``MAX_SEGMENTS`` column segments, a rank above the
  kernels' limit): ``qkvz_gemm`` (one library GEMM per run of packed weights) then the LoRA added in place;
  the base is rounded to the output dtype before the LoRA is added (what PEFT computes).
"""
from __future__ import annotations

import torch

from fx_passes.ops.kernels.gemm_lora_decode import gemm_lora_decode, plan_segments
from fx_passes.ops.kernels.gemm_lora_prefill import gemm_lora_prefill, prefill_fusable
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_
from fx_passes.ops.lora_args import KERNEL_MAX_RANK, LoraSlices
from fx_passes.ops.qkvz_gemm import qkvz_gemm_accumulate_, total_rows
from fx_passes.ops.tuning import device_info, tuning_for


def lora_(out: torch.Tensor, x: torch.Tensor, lora: LoraSlices) -> None:
    """``qkvz_lora_`` on CUDA: the two-launch LoRA, once per rank chunk (strided adapters copied)."""
    lora.check(out, x)
    for call in lora.kernel_calls():
        lora_shrink_expand_(out, x, call)


def _choose(x: torch.Tensor, weights: tuple, lora: LoraSlices):
    """(path, the decode kernel's segments when that is the path)."""
    if max(a.shape[-2] for a in lora.lora_a) > KERNEL_MAX_RANK:
        return "rank_chunks", None
    tuning = tuning_for(device_info(x.device))
    T = x.shape[0]
    if T <= tuning.fused_max_t:
        segments = plan_segments(weights, lora.lora_b, lora.slice_start)
        if segments is not None:
            return "decode", segments
    if T >= tuning.prefill_fused_min_t and prefill_fusable(x, weights, lora):
        return "prefill", None
    if T >= tuning.accumulate_min_t and lora.covers_columns(total_rows(weights)):
        return "accumulate", None
    return "gemm_then_lora", None


def gemm_lora_path(x: torch.Tensor, weights: tuple, lora: LoraSlices) -> str:
    """The path :func:`gemm_lora` takes: ``decode``, ``prefill``, ``accumulate``, ``gemm_then_lora``
    or ``rank_chunks`` (a rank above the kernels' limit: the GEMM, then the LoRA in rank chunks)."""
    return _choose(x, tuple(weights), lora)[0]


def gemm_lora(x: torch.Tensor, weights: tuple, lora: LoraSlices) -> torch.Tensor:
    """``qkvz_gemm_lora`` on CUDA (arguments checked by the op)."""
    weights = tuple(weights)
    calls = lora.kernel_calls()   # strided adapters made contiguous (one call unless rank chunks)
    path, segments = _choose(x, weights, calls[0]) if len(calls) == 1 else ("rank_chunks", None)
    if path == "decode":
        return gemm_lora_decode(x, weights, calls[0], segments=segments)
    if path == "prefill":
        return gemm_lora_prefill(x, weights, calls[0])
    if path == "accumulate":
        out = x.new_empty((x.shape[0], total_rows(weights)))
        lora_shrink_expand_(out, x, calls[0], accumulate=False)
        qkvz_gemm_accumulate_(out, x, weights)
        return out
    out = torch.ops.fx_passes.qkvz_gemm(x, list(weights))
    for call in calls:
        lora_shrink_expand_(out, x, call)
    return out
