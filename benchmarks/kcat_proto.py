"""Prototype for the K-concatenation design measured by :mod:`benchmarks.sweep_paths` (``kcat_fused``):
ONE Triton launch writes ``xs = [x | s]`` (``x`` copied, ``s = x @ A_all^T`` with every A group of every
adapter, each token keeping only its own adapter's block, scaled), then one cuBLAS GEMM
``xs @ [W | B_blockdiag]^T``. Two launches per layer, no read-modify-write of ``out``.

Benchmark code, not the package: it exists to measure whether the design is worth building (the shrink
launch's cost next to the extra K the GEMM pays), see benchmarks/RESULTS.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_pack_kernel(x_ptr, a_ptr, xs_ptr, ids_ptr, scales_ptr, T, K, R, block, scale,
                        stride_x, stride_xs, HAS_IDS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        tl.store(xs_ptr + rows[:, None] * stride_xs + ks[None, :], xt, mask=row_ok[:, None] & k_ok[None, :])
        at = tl.load(a_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(at.to(xt.dtype)), acc)
    if HAS_IDS:
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
        sc = tl.load(scales_ptr + tl.maximum(ids, 0), mask=row_ok & (ids >= 0), other=0.0)
        keep = (cols[None, :] // block) == ids[:, None]
        acc = tl.where(keep, acc * sc[:, None], 0.0)
    else:
        acc = acc * scale
    tl.store(xs_ptr + rows[:, None] * stride_xs + K + cols[None, :], acc.to(xs_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def shrink_pack(x: torch.Tensor, a_all: torch.Tensor, block: int, ids: Optional[torch.Tensor] = None,
                scales: Optional[torch.Tensor] = None, scale: float = 1.0,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[x | s]`` with ``s[t, j] = scale_(ids[t]) * x[t] . a_all[j]`` where ``j // block == ids[t]`` (else
    0); without ids every column is kept and scaled by ``scale``."""
    T, K = x.shape
    R = a_all.shape[0]
    xs = out if out is not None else x.new_empty((T, K + R))
    block_t = 16 if T <= 256 else 32
    grid = (triton.cdiv(T, block_t),)
    _shrink_pack_kernel[grid](x, a_all, xs, ids if ids is not None else x, scales if scales is not None else x,
                              T, K, R, block, scale, x.stride(0), xs.stride(0), HAS_IDS=ids is not None,
                              BLOCK_T=block_t, BLOCK_K=128, BLOCK_R=max(16, triton.next_power_of_2(R)),
                              num_warps=4, num_stages=3)
    return xs
