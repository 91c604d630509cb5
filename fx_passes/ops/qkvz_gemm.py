"""The fused projection GEMM: ``y = x @ [W_0; W_1; ...]^T`` over a list of weight tensors.

A GDN layer's input projection is ``weights = [W_qkv, W_z]`` or, with the gates folded in,
``[W_qkv, W_z, W_b, W_a]``; the op takes any 1..``MAX_WEIGHTS`` row blocks of one width.

How one GEMM reads several weight tensors
-----------------------------------------
Model code keeps ``in_proj_qkv.weight``, ``in_proj_z.weight``, ... as separate parameters and
checkpoints must keep them that way. :func:`fx_passes.pack_qkvz_weights` re-homes the parameters
*once* into one ``[sum N_i, H]`` buffer (each parameter becomes a view of its rows; the old storages
are freed, so memory stays the same). This op detects that layout at run time with pointer
arithmetic only (no device sync, CUDA-graph safe) and then runs ONE library GEMM over the packed
view: the same kernel as the ``base`` anchor.

When the weights are not all packed, the op still returns the same ``[T, sum N_i]`` output: one
GEMM per run of adjacent weights (:func:`packed_runs`), each writing straight into its column block
(no weight copy, no output copy). The pass reports the layout it saw at compile time
(``LayerMatch.weights_packed``) so the slower path is never silent.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE, exact_dtypes

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WEIGHTS = 8   # W_qkv, W_z, W_b, W_a need 4; the launchers walk the list on the host


def _adjacent(first: torch.Tensor, then: torch.Tensor) -> bool:
    """``then`` starts right after ``first`` in one storage, both row-major of one width and dtype.
    Works on real and fake tensors (fake tensors of views share their fake storage)."""
    if first.dim() != 2 or then.dim() != 2 or first.dtype != then.dtype or first.device != then.device:
        return False
    if first.shape[1] != then.shape[1] or not (first.is_contiguous() and then.is_contiguous()):
        return False
    try:
        same_storage = first.untyped_storage()._cdata == then.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError):
        return False
    return bool(same_storage and then.storage_offset() == first.storage_offset() + first.numel())


def packed_runs(weights: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``weights`` cut into runs of adjacent row blocks: ``[(first index, count), ...]``."""
    runs = [(0, 1)]
    for i in range(1, len(weights)):
        start, count = runs[-1]
        if _adjacent(weights[i - 1], weights[i]):
            runs[-1] = (start, count + 1)
        else:
            runs.append((i, 1))
    return runs


def weights_are_packed(weights: Sequence[torch.Tensor]) -> bool:
    """True when the weights are one row-major ``[sum N_i, H]`` block in list order."""
    return len(weights) >= 1 and len(packed_runs(weights)) == 1 and weights[0].dim() == 2 \
        and weights[0].is_contiguous()


def packed_view(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``[sum N_i, H]`` view over adjacent weights (see :func:`packed_runs`)."""
    first = weights[0]
    n = sum(w.shape[0] for w in weights)
    return first.as_strided((n, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def total_rows(weights: Sequence[torch.Tensor]) -> int:
    return sum(w.shape[0] for w in weights)


def check_gemm_args(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
    torch._check(x.dim() == 2, lambda: f"qkvz_gemm: x must be 2-D [T, H], got {tuple(x.shape)}")
    torch._check(1 <= len(weights) <= MAX_WEIGHTS,
                 lambda: f"qkvz_gemm: need 1..{MAX_WEIGHTS} weights, got {len(weights)}")
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"qkvz_gemm: unsupported dtype {x.dtype}")
    for i, w in enumerate(weights):
        torch._check(w.dim() == 2, lambda: f"qkvz_gemm: weights[{i}] must be 2-D, got {tuple(w.shape)}")
        torch._check(w.dtype == x.dtype, lambda: f"qkvz_gemm: dtypes differ: x {x.dtype}, weights[{i}] {w.dtype}")
        torch._check(w.shape[1] == x.shape[1],
                     lambda: f"qkvz_gemm: hidden size mismatch: x {tuple(x.shape)}, weights[{i}] {tuple(w.shape)}")
        torch._check(w.device == x.device, lambda: f"qkvz_gemm: devices differ: x {x.device}, weights[{i}] {w.device}")


def _run_views(weights: Sequence[torch.Tensor]):
    """(first output column, weight view) per run of adjacent weights."""
    col, views = 0, []
    for start, count in packed_runs(weights):
        run = list(weights[start:start + count])
        view = packed_view(run) if count > 1 else run[0]
        views.append((col, view))
        col += view.shape[0]
    return views


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_gemm", mutates_args=())
def qkvz_gemm(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat([x @ w.T for w in weights], -1)`` without concatenating anything."""
    check_gemm_args(x, weights)
    with exact_dtypes(x):
        if weights_are_packed(weights):
            return torch.mm(x, packed_view(weights).t())
        out = x.new_empty((x.shape[0], total_rows(weights)))
        for col, w in _run_views(weights):
            torch.mm(x, w.t(), out=out[:, col:col + w.shape[0]])
    return out


def qkvz_gemm_accumulate_(out: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> None:
    """``out += x @ [W_0; W_1; ...]^T`` by the library GEMM itself (beta = 1: it reads ``out`` in its
    epilogue): one GEMM per run of adjacent weights (one over packed weights)."""
    for col, w in _run_views(weights):
        out[:, col:col + w.shape[0]].addmm_(x, w.t())


@qkvz_gemm.register_fake
def _qkvz_gemm_fake(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    check_gemm_args(x, weights)
    return x.new_empty((x.shape[0], total_rows(weights)))


def _qkvz_gemm_setup_context(ctx, inputs, output):
    x, weights = inputs
    ctx.save_for_backward(x, *weights)


def _qkvz_gemm_backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    gx, grads, col = None, [], 0
    with exact_dtypes(x):
        for w in weights:
            g = grad[:, col:col + w.shape[0]]
            col += w.shape[0]
            gx = g @ w if gx is None else gx + g @ w
            grads.append(g.t() @ x)
    return gx, grads


qkvz_gemm.register_autograd(_qkvz_gemm_backward, setup_context=_qkvz_gemm_setup_context)
