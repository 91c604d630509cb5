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

Host cost. A decode step's kernels take ~15-50 us on an H200, so the host work around them matters to
every caller without CUDA graphs (eager, Inductor without cudagraphs, vLLM batches above its capture
sizes): checking the ~15 tensor arguments, choosing the path, cutting the column segments and sizing
the launches cost ~0.6 ms per call when done every time. All of it depends only on the arguments'
metadata (shapes, strides, dtypes, devices, weight adjacency, 16-byte alignment), never on values, so
it is done once per :func:`call_key` and kept in a :class:`Plan` (no tensors: a plan never keeps a
weight alive); a call whose key was seen checks nothing again and binds the plan to its tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from fx_passes.ops.kernels.gemm_lora_decode import (SegmentSpec, bind_segments, gemm_lora_decode, plan_decode,
                                                    segment_specs)
from fx_passes.ops.kernels.gemm_lora_prefill import gemm_lora_prefill, prefill_fusable, prefill_shrink_launch
from fx_passes.ops.kernels.lora_expand import lora_shrink_expand_, plan_lora
from fx_passes.ops.lora_args import KERNEL_MAX_RANK, LoraSlices
from fx_passes.ops.memo import LruMemo, tensor_meta
from fx_passes.ops.qkvz_gemm import packed_runs, qkvz_gemm_accumulate_, total_rows
from fx_passes.ops.tuning import DecodeLaunch, LoraLaunch, device_info, interpreting, tuning_for


def lora_(out: torch.Tensor, x: torch.Tensor, lora: LoraSlices) -> None:
    """``qkvz_lora_`` on CUDA: the two-launch LoRA, once per rank chunk (strided adapters copied)."""
    lora.check(out, x)
    for call in lora.kernel_calls():
        lora_shrink_expand_(out, x, call, checked=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call signature runs: the path and its launches, no tensors."""
    path: str                                   # see gemm_lora_path
    segments: tuple[SegmentSpec, ...] = ()      # decode: the GEMM's column segments
    decode: Optional[DecodeLaunch] = None       # decode: the fused kernel and the shrink beside it
    lora: Optional[LoraLaunch] = None           # accumulate / gemm_then_lora: the two-launch LoRA;
                                                # prefill: the shrink beside the GEMM


def call_key(x: torch.Tensor, weights: tuple, lora: LoraSlices) -> tuple:
    """Everything the argument checks and :func:`make_plan` read: shapes, strides, dtypes, devices of
    every tensor, the slice lists, which weights are adjacent in memory (one packed GEMM), the 16-byte
    alignment of x and the first weight (TMA descriptors) and whether the Triton interpreter runs."""
    return (tensor_meta(x), x.data_ptr() % 16, tuple(tensor_meta(w) for w in weights), weights[0].data_ptr() % 16,
            tuple(packed_runs(weights)),
            tuple(tensor_meta(a) for a in lora.lora_a), tuple(tensor_meta(b) for b in lora.lora_b), lora.slice_a,
            lora.slice_start, tensor_meta(lora.token_lora_ids), tensor_meta(lora.lora_scales), interpreting())


def make_plan(x: torch.Tensor, weights: tuple, lora: LoraSlices) -> Plan:
    """The path (see :func:`gemm_lora_path`) and its launches for these (checked) arguments."""
    calls = lora.kernel_calls()   # strided adapters as contiguous copies (one call unless rank chunks)
    if len(calls) != 1 or max(a.shape[-2] for a in lora.lora_a) > KERNEL_MAX_RANK:
        return Plan("rank_chunks")
    lora = calls[0]
    T = x.shape[0]
    tuning = tuning_for(device_info(x.device))
    if T <= tuning.fused_max_t:
        specs = segment_specs(weights, lora.lora_b, lora.slice_start)
        if specs is not None:
            segments = bind_segments(specs, weights, lora.lora_b, lora.slice_start)
            return Plan("decode", specs, decode=plan_decode(x, weights, lora, segments))
    if T >= tuning.prefill_fused_min_t and prefill_fusable(x, weights, lora):
        return Plan("prefill", lora=prefill_shrink_launch(x, lora))
    if T >= tuning.accumulate_min_t and lora.covers_columns(total_rows(weights)):
        return Plan("accumulate", lora=plan_lora(x, lora))
    return Plan("gemm_then_lora", lora=plan_lora(x, lora))


class PlanCache:
    """:func:`make_plan` memoized by :func:`call_key` (bounded LRU)."""

    def __init__(self, size: int = 1024):
        self._plans = LruMemo(size)

    def get(self, x: torch.Tensor, weights: tuple, lora: LoraSlices, check: Optional[Callable[[], None]]) -> Plan:
        """The plan of this call; on a new key, ``check()`` (the op's argument rules) runs first."""
        def make() -> Plan:
            if check is not None:
                check()
            return make_plan(x, weights, lora)
        return self._plans.get(call_key(x, weights, lora), make)


PLANS = PlanCache()


def gemm_lora_path(x: torch.Tensor, weights: tuple, lora: LoraSlices) -> str:
    """The path :func:`gemm_lora` takes: ``decode``, ``prefill``, ``accumulate``, ``gemm_then_lora``
    or ``rank_chunks`` (a rank above the kernels' limit: the GEMM, then the LoRA in rank chunks)."""
    return make_plan(x, tuple(weights), lora).path


def gemm_lora(x: torch.Tensor, weights: tuple, lora: LoraSlices,
              check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """``qkvz_gemm_lora`` on CUDA. ``check``: the op's argument rules, run once per call signature
    (``None``: the caller checked)."""
    weights = tuple(weights)
    plan = PLANS.get(x, weights, lora, check)
    calls = lora.kernel_calls()   # the arguments themselves unless adapters are strided or rank-chunked
    if plan.path == "decode":
        call = calls[0]
        segments = bind_segments(plan.segments, weights, call.lora_b, call.slice_start)
        return gemm_lora_decode(x, weights, call, segments=segments, config=plan.decode)
    if plan.path == "prefill":
        return gemm_lora_prefill(x, weights, calls[0], shrink=plan.lora)
    if plan.path == "accumulate":
        out = x.new_empty((x.shape[0], total_rows(weights)))
        lora_shrink_expand_(out, x, calls[0], accumulate=False, config=plan.lora, checked=True)
        qkvz_gemm_accumulate_(out, x, weights)
        return out
    out = torch.ops.fx_passes.qkvz_gemm(x, list(weights))
    for call in calls:
        lora_shrink_expand_(out, x, call, config=plan.lora if plan.path == "gemm_then_lora" else None,
                            checked=True)
    return out
