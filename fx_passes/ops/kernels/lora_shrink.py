"""The LoRA shrink: ``s[g] = x @ A_g[l]^T`` for every A group ``g`` some slice uses and every adapter
``l`` present, fp32 accumulation (semantics: :mod:`fx_passes.ops.qkvz_lora`).

Grid ``(cdiv(T, shrink_block_m), G * l_grid, ksplit)``: token tiles x (used A groups x adapters; one
adapter without token ids) x split-K chunks of H. A program writes the rows of adapter ``l`` of its
token tile into ``s[ksplit, G, T, block_r]`` (nothing when ``l`` is absent from the tile; rows without a
valid adapter are never written nor read). A group shared by several slices (q, k, v) is shrunk once.
Split-K and a 16-token tile keep enough programs in flight at small T, where a program per token tile
would walk all of H alone. With one K chunk the buffer holds s already rounded to B's 16-bit dtype
(what the expand does anyway), halving its re-reads; split-K partials stay fp32.

``use_pdl``: the kernel lets its dependent launch at once (``griddepcontrol.launch_dependents``) and
waits for its own predecessor only before it exits, so its completion implies the predecessor's (the
dependent waits on this grid alone).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fx_passes.ops.kernels.jit_helpers import adapter_stride, token_adapters
from fx_passes.ops.tuning import LoraLaunch


@triton.jit
def _shrink_acc(
    x_ptr, in_l, rows64, a_base, stride_ar, rank, k_lo, k_hi, stride_xt,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``x[rows in_l, k_lo:k_hi] @ A[:, k_lo:k_hi].T`` for one adapter's A (``a_base``), fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_hi
        xt = tl.load(x_ptr + rows64[:, None] * stride_xt + k[None, :],
                     mask=in_l[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None],  # [BLOCK_K, BLOCK_R] = A^T
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        # the shrink runs in the adapters' dtype (x may be bf16 over fp32 adapters)
        acc = tl.dot(xt.to(at.dtype), at, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _shrink_group(
    x_ptr, ids_ptr, s_ptr,
    a_ptr, stride_al, stride_ar, rank, g, l, L,
    T, H, k_per_split,
    stride_xt, stride_sk, stride_sg, stride_st,
    pid_m, pid_k,
    HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: the rows of adapter ``l`` in token tile ``pid_m``, group ``g``, K chunk ``pid_k``.

    Only those rows of the partial-shrink buffer are written; rows of other adapters belong to other
    programs and rows without a valid adapter are never written (the expand never stores them).
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows64 = offs_m.to(tl.int64)
    ids = token_adapters(ids_ptr, offs_m, T, L, HAS_IDS)
    in_l = ids == l
    if tl.max(in_l.to(tl.int32), axis=0) > 0:  # adapter absent from this tile: nothing to do
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, H)
        acc = _shrink_acc(x_ptr, in_l, rows64, a_ptr + tl.cast(l, tl.int64) * stride_al, stride_ar, rank,
                          k_lo, k_hi, stride_xt, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
        s_ptrs = s_ptr + pid_k.to(tl.int64) * stride_sk + g * stride_sg + rows64[:, None] * stride_st \
            + offs_r[None, :]
        tl.store(s_ptrs, acc, mask=in_l[:, None])


@triton.jit
def _lora_shrink_kernel(
    x_ptr, ids_ptr, s_ptr,
    a_ptrs, a_stride_l, a_stride_r, a_rank,   # tuples: one entry per used A group
    T, H, L_GRID, k_per_split,
    stride_xt, stride_sk, stride_sg, stride_st,
    NUM_GROUPS: tl.constexpr, HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (token tiles, groups x adapters, K chunks)
    pid_m = tl.program_id(0)
    pid_gl = tl.program_id(1)
    pid_k = tl.program_id(2)
    g = pid_gl // L_GRID
    l = pid_gl % L_GRID
    if USE_PDL:
        gdc_launch_dependents()  # let the expand get scheduled (it waits for us before reading s)
    # The A tensors are separate pointers: a branch per group, unrolled at compile time.
    for i in tl.static_range(NUM_GROUPS):
        if g == i:
            _shrink_group(x_ptr, ids_ptr, s_ptr, a_ptrs[i], a_stride_l[i], a_stride_r[i], a_rank[i], i, l, L_GRID,
                          T, H, k_per_split, stride_xt, stride_sk, stride_sg, stride_st, pid_m, pid_k,
                          HAS_IDS, DOT_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    if USE_PDL:
        # The shrink did not need the GEMM before it, but the expand only waits for THIS grid: make its
        # completion imply the GEMM's (every program reaches this line).
        gdc_wait()


def alloc_shrink_buffer(T: int, n_groups: int, cfg: LoraLaunch, b_dtype: torch.dtype, device) -> torch.Tensor:
    """``[ksplit, G, T, block_r]``: s in B's 16-bit dtype with one K chunk, else fp32 partials."""
    s_dtype = b_dtype if cfg.ksplit == 1 and b_dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.empty((cfg.ksplit, n_groups, T, cfg.block_r), dtype=s_dtype, device=device)


def launch_shrink(x: torch.Tensor, lora, s_buf: torch.Tensor, cfg: LoraLaunch, *, use_pdl: bool,
                  **launch_opts) -> None:
    """``_lora_shrink_kernel`` for ``lora`` (a :class:`~fx_passes.ops.lora_args.LoraSlices`) into ``s_buf``."""
    groups, _ = lora.shrink_groups()
    a_args = (tuple(groups), tuple(adapter_stride(a) for a in groups), tuple(a.stride(-2) for a in groups),
              tuple(a.shape[-2] for a in groups))
    T, H = x.shape
    ids = lora.token_lora_ids if lora.has_ids else x
    _lora_shrink_kernel[(triton.cdiv(T, cfg.shrink_block_m), len(groups) * cfg.l_grid, cfg.ksplit)](
        x, ids, s_buf, *a_args, T, H, cfg.l_grid, cfg.k_per_split,
        x.stride(0), s_buf.stride(0), s_buf.stride(1), s_buf.stride(2),
        NUM_GROUPS=len(groups), HAS_IDS=lora.has_ids, DOT_PRECISION=dot_precision(groups[0].dtype),
        USE_PDL=use_pdl, BLOCK_M=cfg.shrink_block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, **launch_opts,
    )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 adapters get an exact fp32 dot (what PEFT computes); the setting is ignored for 16-bit dots."""
    return "ieee" if dtype == torch.float32 else "tf32"
