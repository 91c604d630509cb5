"""The fused qkvz GEMM: ``y = x @ [w_qkv; w_z]^T`` over two weight tensors.

How one GEMM reads two weight tensors
-------------------------------------
Model code keeps ``in_proj_qkv.weight`` and ``in_proj_z.weight`` as separate parameters and
checkpoints must keep them that way. :func:`fx_passes.pack_qkvz_weights` re-homes the two
parameters *once* into one ``[N_qkv + N_z, H]`` buffer (each parameter becomes a view of its
rows; the old storages are freed, so memory stays the same). This op detects that layout at
run time with pointer arithmetic only (no device sync, CUDA-graph safe) and then runs ONE
library GEMM over the packed view: the same kernel as the ``base`` anchor.

When the weights are not packed, the op still returns the same ``[T, N_qkv + N_z]`` output,
computed by two GEMMs that write straight into its two column blocks (no weight copy, no
output copy). The pass reports which of the two layouts it saw at compile time
(``LayerMatch.weights_packed``) so the slower path is never silent.
"""
from __future__ import annotations

import torch

from fx_passes.ops.library import LIB_NAMESPACE

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def weights_are_packed(w_qkv: torch.Tensor, w_z: torch.Tensor) -> bool:
    """True when ``w_z`` starts right after ``w_qkv`` in one storage, both row-major.

    Works on real and fake tensors (fake tensors of views share their fake storage).
    """
    if w_qkv.dim() != 2 or w_z.dim() != 2 or w_qkv.dtype != w_z.dtype:
        return False
    if w_qkv.device != w_z.device or w_qkv.shape[1] != w_z.shape[1]:
        return False
    if not (w_qkv.is_contiguous() and w_z.is_contiguous()):
        return False
    try:
        same_storage = w_qkv.untyped_storage()._cdata == w_z.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError):
        return False
    return bool(same_storage and w_z.storage_offset() == w_qkv.storage_offset() + w_qkv.numel())


def packed_view(w_qkv: torch.Tensor, w_z: torch.Tensor) -> torch.Tensor:
    n = w_qkv.shape[0] + w_z.shape[0]
    return w_qkv.as_strided((n, w_qkv.shape[1]), (w_qkv.shape[1], 1), w_qkv.storage_offset())


def check_gemm_args(x: torch.Tensor, w_qkv: torch.Tensor, w_z: torch.Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"qkvz_gemm: x must be 2-D [T, H], got {tuple(x.shape)}")
    torch._check(w_qkv.dim() == 2 and w_z.dim() == 2,
                 lambda: f"qkvz_gemm: weights must be 2-D, got {tuple(w_qkv.shape)} and {tuple(w_z.shape)}")
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"qkvz_gemm: unsupported dtype {x.dtype}")
    torch._check(w_qkv.dtype == x.dtype and w_z.dtype == x.dtype,
                 lambda: f"qkvz_gemm: dtypes differ: x {x.dtype}, w_qkv {w_qkv.dtype}, w_z {w_z.dtype}")
    torch._check(w_qkv.shape[1] == x.shape[1] and w_z.shape[1] == x.shape[1],
                 lambda: f"qkvz_gemm: hidden size mismatch: x {tuple(x.shape)}, "
                         f"w_qkv {tuple(w_qkv.shape)}, w_z {tuple(w_z.shape)}")
    torch._check(w_qkv.device == x.device and w_z.device == x.device,
                 lambda: f"qkvz_gemm: devices differ: {x.device}, {w_qkv.device}, {w_z.device}")


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_gemm", mutates_args=())
def qkvz_gemm(x: torch.Tensor, w_qkv: torch.Tensor, w_z: torch.Tensor) -> torch.Tensor:
    """``torch.cat([x @ w_qkv.T, x @ w_z.T], -1)`` without concatenating anything."""
    check_gemm_args(x, w_qkv, w_z)
    if weights_are_packed(w_qkv, w_z):
        return torch.mm(x, packed_view(w_qkv, w_z).t())
    n_qkv = w_qkv.shape[0]
    out = x.new_empty((x.shape[0], n_qkv + w_z.shape[0]))
    torch.mm(x, w_qkv.t(), out=out[:, :n_qkv])
    torch.mm(x, w_z.t(), out=out[:, n_qkv:])
    return out


def qkvz_gemm_accumulate_(out: torch.Tensor, x: torch.Tensor, w_qkv: torch.Tensor, w_z: torch.Tensor) -> None:
    """``out += x @ [w_qkv; w_z]^T`` by the library GEMM itself (beta = 1: it reads ``out`` in its
    epilogue): one GEMM over packed weights, else one per weight into ``out``'s column blocks."""
    if weights_are_packed(w_qkv, w_z):
        out.addmm_(x, packed_view(w_qkv, w_z).t())
        return
    n_qkv = w_qkv.shape[0]
    out[:, :n_qkv].addmm_(x, w_qkv.t())
    out[:, n_qkv:].addmm_(x, w_z.t())


@qkvz_gemm.register_fake
def _qkvz_gemm_fake(x: torch.Tensor, w_qkv: torch.Tensor, w_z: torch.Tensor) -> torch.Tensor:
    check_gemm_args(x, w_qkv, w_z)
    return x.new_empty((x.shape[0], w_qkv.shape[0] + w_z.shape[0]))


def _qkvz_gemm_setup_context(ctx, inputs, output):
    x, w_qkv, w_z = inputs
    ctx.save_for_backward(x, w_qkv, w_z)


def _qkvz_gemm_backward(ctx, grad):
    x, w_qkv, w_z = ctx.saved_tensors
    n_qkv = w_qkv.shape[0]
    g_qkv, g_z = grad[:, :n_qkv], grad[:, n_qkv:]
    gx = g_qkv @ w_qkv + g_z @ w_z
    return gx, g_qkv.t() @ x, g_z.t() @ x


qkvz_gemm.register_autograd(_qkvz_gemm_backward, setup_context=_qkvz_gemm_setup_context)
