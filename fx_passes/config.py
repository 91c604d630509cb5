"""Configuration of the qkvz fusion pass: one explicit, immutable object per pass instance."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

DUMP_ENV = "FX_PASSES_DUMP_DIR"
FUSE_TRAINING_ENV = "FX_PASSES_FUSE_TRAINING"


@dataclasses.dataclass(frozen=True)
class QkvzFusionConfig:
    """What the pass fuses and how it reports.

    qkv_name / z_name: the sibling projection module names inside a GDN layer.
    b_name / a_name: its two small gate projections (``num_v_heads`` outputs each).
    qkvz_name / ba_name: vLLM's merged projections (>= 0.21: ``in_proj_qkvz``, 4 LoRA slices;
        ``in_proj_ba``, 2 slices); read only by the vLLM pass (:mod:`fx_passes.vllm_pass`).
    fold_ba: fold the layer's b / a projections (and their LoRA, as two more slices) into its one op
        when they read the same input; a layer whose b / a cannot be folded keeps the qkv / z rewrite,
        with the reason in its report (``LayerMatch.ba_reason``).
    fuse_without_lora: fuse the base GEMM pair of a layer that has no LoRA at all.
    gemm_lora_op: a layer with exactly one LoRA op becomes ONE ``fx_passes.qkvz_gemm_lora`` (GEMM and
        LoRA in one op; on CUDA at decode the LoRA expand runs in the GEMM's epilogue) instead of
        ``qkvz_gemm`` + ``qkvz_lora_``. Layers with several LoRA ops always get the two-op form.
    structural_fallback: where the graph carries no ``nn_module_stack``, find GDN layers by
        structure (shared input, ``N_qkv = 2 * key_dim + N_z``, and a ``[key, key, value]``
        split of the qkv output downstream); never used for nodes that do carry module paths.
    pack_weights: the ``fx_passes`` backend packs each layer's W_qkv / W_z into one buffer
        (memory-neutral, only where safe; :mod:`fx_passes.packing`) so the fused GEMM is one
        launch. Off: the weights stay as they are (two GEMM launches unless packed by the user).
    dump_dir: write before/after graphs and the match report of every graph here
        (``None``: read the ``FX_PASSES_DUMP_DIR`` environment variable when the pass is made).
    fuse_training: the backend rewrites graphs compiled for training (grad enabled, trainable LoRA) into
        ``fx_passes.qkvz_lora_train`` before AOTAutograd (:mod:`fx_passes.fusion.train_lora_fusion`). On by
        default: against Inductor's unfused compile the projection block's step is as fast or faster at
        every measured width from 2048 tokens (1.0-1.6x; ~parity where the host bounds it) with 0.3x its
        peak memory (``benchmarks/bench_train_block.py``); off with ``FX_PASSES_FUSE_TRAINING=0`` or
        ``QkvzFusionConfig(fuse_training=False)`` (then training graphs go to Inductor as they are).
    """

    qkv_name: str = "in_proj_qkv"
    z_name: str = "in_proj_z"
    b_name: str = "in_proj_b"
    a_name: str = "in_proj_a"
    qkvz_name: str = "in_proj_qkvz"
    ba_name: str = "in_proj_ba"
    fold_ba: bool = True
    fuse_without_lora: bool = True
    gemm_lora_op: bool = True
    structural_fallback: bool = True
    pack_weights: bool = True
    dump_dir: Optional[str] = dataclasses.field(default_factory=lambda: os.environ.get(DUMP_ENV) or None)
    fuse_training: bool = dataclasses.field(
        default_factory=lambda: os.environ.get(FUSE_TRAINING_ENV, "1") not in ("", "0"))

    def cache_key(self) -> str:
        """Every field that shapes the rewrite: all of them but those in :data:`NOT_IN_CACHE_KEY`, so a
        new field is in the key unless it is listed there on purpose."""
        return "|".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                        if f.name not in NOT_IN_CACHE_KEY)


# Fields that change what is written or done around the graph, never the rewritten graph itself:
# dump_dir (where the report goes), pack_weights (the backend packs parameters before compiling; the
# pass sees the packed or unpacked layout in the graph's example values either way).
NOT_IN_CACHE_KEY = frozenset({"dump_dir", "pack_weights"})
