"""Triton kernels of the fx_passes ops, one file per kernel, with its launcher (check, allocate, launch):

* :mod:`.jit_helpers` -- the JIT helpers and host utilities every kernel shares;
* :mod:`.lora_shrink` -- ``s = x @ A^T`` per A group and adapter (split-K);
* :mod:`.lora_expand` -- ``out[:, slice] += scale * s @ B^T`` (the two-launch LoRA of ``qkvz_lora_``);
* :mod:`.gemm_lora_decode` -- small-T GEMM with the expand in its epilogue;
* :mod:`.gemm_lora_prefill` -- persistent TMA GEMM with the expand in its epilogue (Hopper+);
* :mod:`.lora_train` -- the training op's LoRA: expand-add over every slice, dS / dB, x's side;
* :mod:`.gemm_lora_train` -- training at large T (Hopper+): the forward's GEMMs with the LoRA as their first
  K steps (or in their epilogue), dx's GEMMs with x's LoRA gradient in their epilogue.

:mod:`fx_passes.ops.dispatch` chooses among them; launch choices come from :mod:`fx_passes.ops.tuning`.
"""
