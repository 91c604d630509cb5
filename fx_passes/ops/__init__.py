"""Custom ops of fx_passes, all in the ``fx_passes`` torch.library namespace.

Importing this package registers them:

* ``torch.ops.fx_passes.qkvz_gemm(x, weights) -> Tensor`` — one GEMM over a GDN layer's sibling
  projection weights (``[W_qkv, W_z]`` or ``[W_qkv, W_z, W_b, W_a]``; see :mod:`fx_passes.ops.qkvz_gemm`).
* ``torch.ops.fx_passes.qkvz_lora_(out, x, lora_a, lora_b, ...)`` — batched multi-slice
  LoRA (shrink + expand) added in place into ``out`` (see :mod:`fx_passes.ops.qkvz_lora`).
* ``torch.ops.fx_passes.qkvz_gemm_lora(x, weights, lora_a, lora_b, ...) -> Tensor`` — both in
  one functional op; at decode on CUDA the LoRA expand runs in the GEMM's epilogue (see
  :mod:`fx_passes.ops.qkvz_gemm_lora`).
* ``torch.ops.fx_passes.qkvz_lora_train(x, xs, weights, lora_a, lora_b, ...) -> (Tensor[], Tensor)`` — the
  same block with trainable LoRA, one output per projection (per-group LoRA inputs, e.g. dropout masks;
  autograd-aware: its backward is one op, ``qkvz_lora_train_backward`` (dx, the LoRA inputs' gradients, dA and
  dB of every slice, batched); see :mod:`fx_passes.ops.qkvz_lora_train`).
"""
from fx_passes.ops.qkvz_gemm import qkvz_gemm, weights_are_packed
from fx_passes.ops.qkvz_lora import qkvz_lora_, qkvz_lora_reference
from fx_passes.ops.qkvz_gemm_lora import qkvz_gemm_lora
from fx_passes.ops.qkvz_lora_train import qkvz_lora_train

__all__ = ["qkvz_gemm", "qkvz_gemm_lora", "qkvz_lora_", "qkvz_lora_reference", "qkvz_lora_train",
           "weights_are_packed"]
