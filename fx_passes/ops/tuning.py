"""Launch choices of the Triton kernels: rules for any device, measured data per device.

A device is a :class:`DeviceInfo` (name, SM count, shared memory per block, compute capability).
Launch configurations come from rules on shapes and device properties, never from a per-shape table
(a table fits the shapes it was measured on; a rule is checked on shapes it was not fitted on:
``benchmarks/sweep_t.py``). The few per-device scalars (the T thresholds between kernel paths) live in
``fx_passes/ops/configs/<device name>.json``, written from ``benchmarks/sweep_paths.py`` (the file says
which sweep, versions and date); a file applies only to a device whose name, SM count and shared memory
all match it. Any other device gets the defaults of :class:`Tuning`. Every launch configuration is
checked against the device's shared memory before it is used (:func:`decode_launch` shrinks one that does
not fit; :func:`prefill_launch` returns ``None`` and the op takes another path), so a card with less shared
memory never fails to launch.

Everything here is host arithmetic on shapes and device properties: no device work, no sync, so a CUDA
graph captured at one T replays the same launches.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import torch
import triton

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the launch choices depend on."""
    name: str
    sms: int
    shared_memory: int            # bytes per block (opt-in maximum)
    capability: tuple[int, int]

    @property
    def has_tma(self) -> bool:
        return self.capability[0] >= 9


# Off the GPU (the Triton interpreter runs the kernels on CPU tensors) the kernels are planned as for
# the card the data was measured on, so CPU tests walk the launch paths the GPU takes.
OFF_GPU_DEVICE = DeviceInfo("NVIDIA H200", sms=132, shared_memory=232448, capability=(9, 0))


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(props.name, props.multi_processor_count,
                      int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block),
                      (props.major, props.minor))


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda" and not interpreting():
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    return OFF_GPU_DEVICE


# --------------------------------------------------------------------------------------------
# Per-device data
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tuning:
    """The launch choices for one device: measured (``source`` names the JSON file) or the rules."""
    device: DeviceInfo
    source: str = "rules"
    # The fused decode kernel beats cuBLAS + the two-launch LoRA up to this many tokens; above, its
    # swap-AB tiles (one token tile of <= 64 tokens per W tile) lose to cuBLAS: 1.5-2.3x the base GEMM
    # with 64- or 128-token tiles at T 65-2048 on the Qwen3.5 widths.
    fused_max_t: int = 64
    # From here the LoRA delta is written first and cuBLAS accumulates the base into it (beta = 1): its
    # epilogue reads `out` once, where a LoRA added after the GEMM reads and re-writes it (and the expand
    # then waits for the whole GEMM).
    accumulate_min_t: int = 65
    # From here the persistent TMA GEMM with the expand in its epilogue (Hopper+): below, its 128 x 256
    # tiles fill under ~3 waves of the SMs and cuBLAS's tiles win by more than the LoRA launches cost
    # (Qwen3.5 widths: the delta-first path wins at T 777, this kernel at T 1000-1024).
    prefill_fused_min_t: int = 896
    # The training op's forward runs its base GEMMs with the expand in their epilogue from here (Hopper+;
    # :mod:`fx_passes.ops.kernels.gemm_lora_train`): the same 128 x 256 tiles as the prefill kernel.
    train_fused_min_t: int = 1024
    # Programmatic dependent launch of the two-launch LoRA helps up to here and costs a few % above.
    pdl_max_t: int = 256


def _read_tuning(path: str, device: DeviceInfo) -> Optional[Tuning]:
    with open(path) as f:
        data = json.load(f)
    want = data["device"]
    if (want["name"], want["sms"], want["shared_memory"]) != (device.name, device.sms, device.shared_memory):
        return None
    return Tuning(device=device, source=os.path.relpath(path, os.path.dirname(CONFIG_DIR)),
                  **data.get("dispatch", {}))


def config_path(device: DeviceInfo) -> str:
    return os.path.join(CONFIG_DIR, device.name.replace(" ", "_").replace("/", "_") + ".json")


@functools.lru_cache(maxsize=None)
def tuning_for(device: DeviceInfo) -> Tuning:
    """The device's measured data when a file matches it, else the rules."""
    path = config_path(device)
    if os.path.exists(path):
        found = _read_tuning(path, device)
        if found is not None:
            return found
    return Tuning(device=device)


def block(n: int, lo: int, hi: int) -> int:
    """``n`` rounded up to a power of two, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# --------------------------------------------------------------------------------------------
# Two-launch LoRA (shrink, then expand): fx_passes::qkvz_lora_ and the non-fused paths
# --------------------------------------------------------------------------------------------
# Split-K of the shrink is limited so that the partial shrinks every expand program sums stay small:
# KSPLIT * min(T, BLOCK_M) <= this many rows of BLOCK_R fp32 values.
LORA_MAX_PARTIAL_ROWS = 256
LORA_MAX_KSPLIT = 16


@dataclasses.dataclass(frozen=True)
class LoraLaunch:
    """Launch configuration of the shrink and expand kernels."""
    block_m: int          # expand token tile
    block_n: int          # expand column tile
    block_k: int          # shrink K tile
    block_r: int          # rank tile (the whole rank)
    shrink_block_m: int   # shrink token tile
    l_grid: int           # adapters in the shrink grid (L with token ids, else 1)
    ksplit: int           # shrink split-K chunks of H
    k_per_split: int
    pdl: bool             # programmatic dependent launch
    num_warps: Optional[int] = None


def lora_launch(T: int, H: int, n_groups: int, max_rank: int, max_n: int, device: torch.device, *,
                adapters: int = 1, has_ids: bool = False, block_m: Optional[int] = None,
                block_n: Optional[int] = None, block_k: Optional[int] = None,
                shrink_block_m: Optional[int] = None, ksplit: Optional[int] = None, pdl: Optional[bool] = None,
                num_warps: Optional[int] = None) -> LoraLaunch:
    """The rules, with explicit arguments winning (benchmarks and tests force a choice this way)."""
    info = device_info(device)
    block_r = block(max_rank, 16, 128)
    shrink_block_m = shrink_block_m or block_m or (16 if T <= 64 else 64)   # a forced block_m sets both
    block_m = block_m or block(T, 16, 64)
    block_n = block_n or block(max_n, 16, 128 if T >= 64 else 64)
    block_k = block_k or block(H, 16, 128 if block_r <= 64 else 64)
    for b in (block_m, block_n, block_k, shrink_block_m):
        torch._check(b >= 16 and b & (b - 1) == 0, lambda: f"qkvz_lora_: block {b} is not a power of 2 >= 16")
    if pdl is None:
        pdl = T <= tuning_for(info).pdl_max_t
    pdl = bool(pdl) and device.type == "cuda" and not interpreting()
    l_grid = adapters if has_ids else 1
    k_chunks = triton.cdiv(H, block_k)
    if ksplit is None:
        # programs that have work: token tiles x groups x adapters present (at most one per token)
        programs = triton.cdiv(T, shrink_block_m) * n_groups * min(l_grid, T)
        ksplit = 1
        if 2 * programs <= info.sms:  # under half the SMs busy: split H
            cap = max(1, LORA_MAX_PARTIAL_ROWS // min(T, block_m))
            # at least 2 K chunks per split: more splits cost more partial-sum loads in the expand
            ksplit = max(1, min(triton.cdiv(info.sms, programs), cap, LORA_MAX_KSPLIT, k_chunks // 2))
    ksplit = max(1, min(int(ksplit), k_chunks))
    k_per_split = triton.cdiv(k_chunks, ksplit) * block_k
    ksplit = triton.cdiv(H, k_per_split)  # no empty splits
    return LoraLaunch(block_m, block_n, block_k, block_r, shrink_block_m, l_grid, ksplit, k_per_split, pdl,
                      num_warps)


# --------------------------------------------------------------------------------------------
# Fused decode kernel (GEMM with the expand in its epilogue, T <= fused_max_t)
# --------------------------------------------------------------------------------------------
# Rules (any device). Per token-tile bucket, (BLOCK_N, BLOCK_K, num_stages, num_warps) in order of
# preference; the first whose column tiles all fit in one residency wave of the device (SMs x the
# programs one SM holds by shared memory) is taken, else the last: a second, partial wave of a
# memory-bound stream leaves most SMs idle at its end (Qwen3.5-397B widths, <= 16 tokens: 161 tiles of
# 128 columns on 132 SMs, one per SM; 64-column tiles, two per SM, all resident). The preferred entry was
# the best, or within ~3 %, on most measured shapes.
DECODE_BLOCKS = {16: ((128, 128, 4, 8), (64, 128, 3, 4)), 64: ((64, 128, 3, 4), (128, 64, 4, 4))}
# Several adapters mixed per token: 64-column tiles at every decode T. After the shrink a tile's epilogue
# chains one dot per adapter present; 64-column tiles halve each chain and spread the chains over more
# programs, which pays more than the wave rule's wider tiles save (H200, 4 adapters, T 1-64: as fast or
# faster on the 7 shapes measured, H 1536-6144; T 32: 1.16-1.48x the base GEMM vs 1.22-1.81x).
# 32-column tiles won on the narrow shapes (H <= 3072) but lost up to 1.58x vs 1.11x on wide ones.
DECODE_BLOCKS_MIXED = (64, 128, 3, 4)
# The GEMM's epilogue re-reads the shrink's split-K partials once per column tile, and the shrink
# overlaps the GEMM (PDL), so a slower shrink with fewer partials is free while it ends before the
# epilogues: with 16-bit adapters KSPLIT * T is capped at this many rows. Several adapters mixed per
# token: each adapter's programs shrink only its rows of a tile, so the cap is twice as high (Qwen3.5-27B
# widths, 4 adapters: split 8 at T 16 and 2 at T 64 beat the one-adapter cap). fp32 adapters shrink on the
# CUDA cores (an exact fp32 dot), slow enough that the cap would make the shrink outlast the GEMM:
# they keep the split-K of the two-launch rule.
DECODE_SHRINK_PARTIAL_ROWS = 32
DECODE_SHRINK_PARTIAL_ROWS_MIXED = 128


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """Launch configuration of the fused decode kernel and the shrink beside it."""
    block_n: int
    block_t: int
    block_k: int
    num_stages: int
    num_warps: int
    # B tiles of how many adapters a mixed-adapter epilogue loads together: 4 (issued before the
    # shrink wait) with <= 16-token tiles, else 2 (4 tiles next to a [BLOCK_N, 64] accumulator cost
    # more than the latency they hide).
    adapter_tiles: int
    shrink: Optional[LoraLaunch] = None   # None: no LoRA (the GEMM alone)


def decode_smem(block_n: int, block_t: int, block_k: int, stages: int, elt: int) -> int:
    """Shared memory of the decode kernel's pipelined W and x tiles."""
    return stages * (block_n * block_k + block_k * block_t) * elt


def decode_launch(T: int, K: int, N: int, device: torch.device, dtype: torch.dtype, lora=None, *,
                  block_n: Optional[int] = None, block_t: Optional[int] = None, block_k: Optional[int] = None,
                  num_stages: Optional[int] = None, num_warps: Optional[int] = None,
                  adapter_tiles: Optional[int] = None, shrink_ksplit: Optional[int] = None,
                  widths: Optional[Sequence[int]] = None) -> DecodeLaunch:
    """Measured blocks for (K, N) on this device, else the rule; then fitted to its shared memory.
    ``lora`` (a :class:`~fx_passes.ops.lora_args.LoraSlices` or ``None``) sizes the shrink beside it;
    ``widths``: the column segments the GEMM's tiles cover (default one of N columns).
    Explicit arguments win."""
    info = device_info(device)
    bt = block_t or block(T, 16, 64)
    elt = dtype.itemsize
    if lora is not None and lora.mixed_adapters:
        bn, bk, stages, warps = DECODE_BLOCKS_MIXED
    else:
        bn, bk, stages, warps = _decode_blocks(16 if bt <= 16 else 64, bt, widths or [N], elt, info)
    bn, bk, stages, warps = block_n or bn, block_k or bk, num_stages or stages, num_warps or warps
    while decode_smem(bn, bt, bk, stages, elt) > info.shared_memory and (stages > 2 or bk > 32):
        if stages > 2:
            stages -= 1
        else:
            bk //= 2
    tiles = adapter_tiles or (4 if bt <= 16 else 2)
    torch._check(tiles in (2, 4), lambda: f"qkvz_gemm_lora: adapter_tiles must be 2 or 4, got {tiles}")
    shrink = None
    if lora is not None:
        groups, _ = lora.shrink_groups()
        # Above 32 tokens with one adapter, one 64-token shrink tile: four 16-token tiles read every A four
        # times, in programs that hold SMs through the GEMM's second wave (27B-wide, b / a folded in, r64
        # T 64: 60.6 -> 47.0 us; qkv / z alone r16 T 48: 48.4 -> 45.8 us; the other shapes within noise).
        # Several adapters mixed per token: no consistent winner measured (+-10 % either way), 16 stays.
        shrink_m = 64 if T > 32 and not lora.mixed_adapters else None
        shrink = lora_launch(T, K, len(groups), lora.max_rank(), 64, device, adapters=lora.adapters,
                             has_ids=lora.has_ids, shrink_block_m=shrink_m)
        cap = shrink_ksplit or _decode_ksplit_cap(T, lora)
        if cap is not None and shrink.ksplit > cap:
            capped = lora_launch(T, K, len(groups), lora.max_rank(), 64, device, adapters=lora.adapters,
                                 has_ids=lora.has_ids, ksplit=cap, shrink_block_m=shrink_m)
            gemm_programs = sum(triton.cdiv(w, bn) for w in (widths or [N])) * triton.cdiv(T, bt)
            if shrink_ksplit is not None or capped.l_grid > 1 \
                    or not _cap_spills_a_wave(gemm_programs, capped, len(groups), T, info):
                shrink = capped
    return DecodeLaunch(bn, bt, bk, stages, warps, tiles, shrink)


def _cap_spills_a_wave(gemm_programs: int, shrink: LoraLaunch, n_groups: int, T: int, info: DeviceInfo) -> bool:
    """The GEMM's tiles fit in one wave of the SMs but not beside the capped shrink's programs (launched
    first): then GEMM tiles wait for shrink programs to end, and the shortest ones (the uncapped split)
    delay them least. 27B-wide with b / a folded in, T 8: 130 tiles + 4 groups x split 2 on 132 SMs, 47.8
    us at the cap vs 44.1 us uncapped (qkv / z alone, 128 + 2 x 2 fits: 42.9 us at the cap). Measured with
    one adapter; with token ids (a program per adapter, most exiting at once) the measured caps stay."""
    shrink_programs = triton.cdiv(T, shrink.shrink_block_m) * n_groups * shrink.l_grid * shrink.ksplit
    return gemm_programs <= info.sms < gemm_programs + shrink_programs


def _decode_blocks(bucket: int, block_t: int, widths: Sequence[int], elt: int, info: DeviceInfo) -> tuple:
    """The first of :data:`DECODE_BLOCKS` ``[bucket]`` whose column tiles fit in one residency wave."""
    choices = DECODE_BLOCKS[bucket]
    for bn, bk, stages, warps in choices:
        per_sm = info.shared_memory // decode_smem(bn, block_t, bk, stages, elt)
        if sum(triton.cdiv(w, bn) for w in widths) <= per_sm * info.sms:
            return bn, bk, stages, warps
    return choices[-1]


def _decode_ksplit_cap(T: int, lora) -> Optional[int]:
    if lora.lora_a[0].dtype == torch.float32:
        return None
    rows = DECODE_SHRINK_PARTIAL_ROWS_MIXED if lora.mixed_adapters else DECODE_SHRINK_PARTIAL_ROWS
    return max(1, rows // max(T, 1))


# --------------------------------------------------------------------------------------------
# Fused prefill kernel (persistent TMA GEMM with the expand in its epilogue, Hopper+)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrefillLaunch:
    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    group_m: int = 8                    # row tiles that sweep the column tiles together (W reuse in L2)
    num_programs: Optional[int] = None  # None: one per SM


def prefill_smem(cfg: PrefillLaunch, elt: int) -> int:
    """Shared memory of the pipelined x / W tiles plus the output tile of the TMA store."""
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * elt + cfg.block_m * cfg.block_n * elt


def prefill_launch(device: torch.device, dtype: torch.dtype,
                   override: Optional[PrefillLaunch] = None) -> Optional[PrefillLaunch]:
    """128 x 256 x 64 tiles, 3 stages, 8 warps (the GEMM alone within a few % of cuBLAS on the Qwen3.5
    shapes; smaller tiles and 4 stages were slower), or ``override``; ``None`` where the device
    has no TMA or too little shared memory for them."""
    info = device_info(device)
    cfg = override or PrefillLaunch()
    elt = dtype.itemsize
    if not info.has_tma or prefill_smem(cfg, elt) > info.shared_memory:
        return None
    return cfg
