"""Batched multi-slice LoRA, added in place: the q | k | v | z LoRA of one GDN layer in one op.

Semantics (``fx_passes::qkvz_lora_``), for every token ``t`` with adapter ``l = token_lora_ids[t]``
(an id outside ``0..L-1``, ``-1`` among them, means no adapter; ``token_lora_ids=None`` = every token
uses adapter 0) and every slice ``i``::

    s_i   = x[t] @ lora_a[slice_a[i]][l].T                  # shrink, fp32 accumulation
    out[t, slice_start[i] : slice_start[i] + n_i] += scale * lora_scales[l] * (s_i @ lora_b[i][l].T)

* ``out`` ``[T, N]``: last dim contiguous; any row stride (a column block of a wider buffer is fine).
* ``x`` ``[T, H]``; fp16 / bf16 / fp32. It may differ in dtype from the adapters (PEFT keeps fp32
  adapters on a bf16 base): the shrink then runs in the adapters' dtype with fp32 accumulation.
* ``lora_a[g]`` ``[r_g, H]`` or stacked ``[L, r_g, H]``: one A per *group*. Slices that share an A
  (PEFT's in_proj_qkv: q, k and v) name the same group in ``slice_a``, so its shrink runs once.
* ``lora_b[i]`` ``[n_i, r]`` or ``[L, n_i, r]``: one B per output slice (views of a bigger B are fine).
* Any rank, any strides of A and B. (The CUDA kernels take ranks up to ``KERNEL_MAX_RANK`` and a
  contiguous last dim: :func:`kernel_calls` splits a bigger rank into chunks whose LoRA terms add up,
  and copies a strided adapter first -- same result, slower.)
* ``token_lora_ids`` int32 or int64, compared at their own width (no id is truncated); out-of-range
  ids are not an error anywhere (no host sync to check them): they select no adapter.
* The shrink result is rounded to B's dtype before the expand when B is 16-bit (what PEFT and vLLM
  compute), the expand accumulates in fp32, and ``out`` is rounded once.
* ``lora_scales`` ``[L]`` (or 0-d / ``[1]``, broadcast): per-adapter scale; ``None`` = 1.

The CPU implementation is plain torch; the CUDA one is a Triton kernel
(:mod:`fx_passes.ops.qkvz_lora_kernels`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_SLICES = 4
MAX_GROUPS = 4
KERNEL_MAX_RANK = 128   # the Triton kernels hold a whole rank in one register tile


def _num_adapters(t: torch.Tensor) -> int:
    return 1 if t.dim() == 2 else t.shape[0]


def check_qkvz_lora_args(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor],
    lora_scales: Optional[torch.Tensor],
) -> int:
    """Validate every shape/dtype/device rule of the op; returns the number of adapters L.

    Used by the fake impl and by both real impls, so a bad call fails the same way at trace
    time and at run time.
    """
    name = "qkvz_lora_"
    torch._check(out.dim() == 2 and x.dim() == 2,
                 lambda: f"{name}: out and x must be 2-D, got {tuple(out.shape)} and {tuple(x.shape)}")
    torch._check(out.shape[0] == x.shape[0],
                 lambda: f"{name}: out has {out.shape[0]} rows but x has {x.shape[0]} tokens")
    torch._check(out.dtype in _FLOAT_DTYPES and x.dtype in _FLOAT_DTYPES,
                 lambda: f"{name}: unsupported dtypes out={out.dtype} x={x.dtype}")
    torch._check(out.stride(1) == 1 and x.stride(1) == 1,
                 lambda: f"{name}: out and x need a contiguous last dim, strides {out.stride()} {x.stride()}")
    n_groups, n_slices = len(lora_a), len(lora_b)
    torch._check(1 <= n_groups <= MAX_GROUPS, lambda: f"{name}: need 1..{MAX_GROUPS} lora_a tensors, got {n_groups}")
    torch._check(1 <= n_slices <= MAX_SLICES, lambda: f"{name}: need 1..{MAX_SLICES} lora_b tensors, got {n_slices}")
    torch._check(len(slice_a) == n_slices and len(slice_start) == n_slices,
                 lambda: f"{name}: slice_a ({len(slice_a)}) and slice_start ({len(slice_start)}) "
                         f"need one entry per lora_b tensor ({n_slices})")
    adapters = _num_adapters(lora_a[0])
    ab_dtype = lora_a[0].dtype
    hidden = x.shape[1]
    for g, a in enumerate(lora_a):
        torch._check(a.dim() in (2, 3), lambda: f"{name}: lora_a[{g}] must be [r, H] or [L, r, H], got {tuple(a.shape)}")
        torch._check(a.shape[-1] == hidden, lambda: f"{name}: lora_a[{g}] has H={a.shape[-1]}, x has H={hidden}")
        torch._check(a.shape[-2] >= 1, lambda: f"{name}: lora_a[{g}] has rank 0")
        torch._check(_num_adapters(a) == adapters, lambda: f"{name}: lora_a[{g}] has {_num_adapters(a)} adapters, expected {adapters}")
        torch._check(a.dtype in _FLOAT_DTYPES,
                     lambda: f"{name}: lora_a[{g}] dtype {a.dtype} is not fp16 / bf16 / fp32")
        torch._check(a.dtype == ab_dtype, lambda: f"{name}: lora_a[{g}] dtype {a.dtype}, lora_a[0] {ab_dtype}")
        torch._check(a.device == x.device, lambda: f"{name}: lora_a[{g}] on {a.device}, x on {x.device}")
    spans = []
    for i, b in enumerate(lora_b):
        g = slice_a[i]
        torch._check(0 <= g < n_groups, lambda: f"{name}: slice_a[{i}]={g} names no lora_a tensor")
        torch._check(b.dim() in (2, 3), lambda: f"{name}: lora_b[{i}] must be [n, r] or [L, n, r], got {tuple(b.shape)}")
        torch._check(b.shape[-1] == lora_a[g].shape[-2],
                     lambda: f"{name}: lora_b[{i}] rank {b.shape[-1]} != lora_a[{g}] rank {lora_a[g].shape[-2]}")
        torch._check(_num_adapters(b) == adapters, lambda: f"{name}: lora_b[{i}] has {_num_adapters(b)} adapters, expected {adapters}")
        torch._check(b.dtype == ab_dtype, lambda: f"{name}: lora_b[{i}] dtype {b.dtype}, lora_a {ab_dtype}")
        torch._check(b.device == x.device, lambda: f"{name}: lora_b[{i}] on {b.device}, x on {x.device}")
        start = slice_start[i]
        torch._check(0 <= start and start + b.shape[-2] <= out.shape[1],
                     lambda: f"{name}: slice {i} [{start}, {start + b.shape[-2]}) outside out's {out.shape[1]} columns")
        spans.append((start, start + b.shape[-2]))
    spans.sort()
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        torch._check(e0 <= s1, lambda: f"{name}: output slices [{s0},{e0}) and [{s1},{e1}) overlap")
    if token_lora_ids is not None:
        torch._check(token_lora_ids.dim() == 1 and token_lora_ids.shape[0] == x.shape[0],
                     lambda: f"{name}: token_lora_ids must be [T={x.shape[0]}], got {tuple(token_lora_ids.shape)}")
        torch._check(token_lora_ids.dtype in _INDEX_DTYPES,
                     lambda: f"{name}: token_lora_ids dtype {token_lora_ids.dtype} is not int32/int64")
        torch._check(token_lora_ids.device == x.device,
                     lambda: f"{name}: token_lora_ids on {token_lora_ids.device}, x on {x.device}")
    if lora_scales is not None:
        torch._check(lora_scales.numel() in (1, adapters) and lora_scales.dim() <= 1,
                     lambda: f"{name}: lora_scales must be 0-d, [1] or [L={adapters}], got {tuple(lora_scales.shape)}")
        torch._check(lora_scales.is_floating_point(), lambda: f"{name}: lora_scales must be floating point")
    return adapters


def kernel_calls(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slice_a: Sequence[int],
                 slice_start: Sequence[int], max_rank: int = KERNEL_MAX_RANK) -> list[tuple[list, list, list, list]]:
    """The op's LoRA as calls the Triton kernels take: ``(lora_a, lora_b, slice_a, slice_start)`` each
    with ranks <= ``max_rank`` and contiguous last dims. ``s @ B.T`` over a rank is the sum of the same
    over rank chunks (rows of A, columns of B), and the shrink's rounding to B's dtype is per element,
    so the calls add up to the op's result. One call, the arguments themselves, in the common case."""
    lora_a = [a if a.stride(-1) == 1 else a.contiguous() for a in lora_a]
    lora_b = [b if b.stride(-1) == 1 else b.contiguous() for b in lora_b]
    top = max(a.shape[-2] for a in lora_a)
    if top <= max_rank:
        return [(lora_a, lora_b, list(slice_a), list(slice_start))]
    calls = []
    for lo in range(0, top, max_rank):
        hi = lo + max_rank
        groups: dict[int, int] = {}
        a_c, b_c, sa_c, ss_c = [], [], [], []
        for b, g, start in zip(lora_b, slice_a, slice_start):
            if lora_a[g].shape[-2] <= lo:
                continue
            if g not in groups:
                groups[g] = len(a_c)
                a_c.append(lora_a[g][..., lo:hi, :])
            b_c.append(b[..., lo:hi])
            sa_c.append(groups[g])
            ss_c.append(int(start))
        calls.append((a_c, b_c, sa_c, ss_c))
    return calls


def _as_stacked(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def qkvz_lora_reference(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> None:
    """Plain-torch implementation (the CPU kernel and the tests' reference)."""
    adapters = check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    ab_dtype = lora_a[0].dtype
    xa = x.to(ab_dtype)
    scales = torch.ones(adapters, dtype=torch.float32, device=x.device)
    if lora_scales is not None:
        scales = scales * lora_scales.to(device=x.device, dtype=torch.float32).reshape(-1)
    scales = scales * scale
    for adapter in range(adapters):
        if token_lora_ids is None:
            rows = None
        else:
            rows = (token_lora_ids == adapter).nonzero().flatten()
            if rows.numel() == 0:
                continue
        xs = xa if rows is None else xa.index_select(0, rows)
        shrinks = {}
        for g in sorted(set(slice_a)):
            shrinks[g] = torch.mm(xs.float(), _as_stacked(lora_a[g])[adapter].float().t())
        for i, b in enumerate(lora_b):
            b_l = _as_stacked(b)[adapter]
            s = shrinks[slice_a[i]].to(b_l.dtype).float()  # PEFT/vLLM round the shrink to B's dtype
            delta = torch.mm(s, b_l.float().t()) * scales[adapter]
            cols = slice(slice_start[i], slice_start[i] + b_l.shape[0])
            if rows is None:
                out[:, cols] = (out[:, cols].float() + delta).to(out.dtype)
            else:
                block = out[:, cols]
                block.index_copy_(0, rows, (block.index_select(0, rows).float() + delta).to(out.dtype))


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_", mutates_args={"out"})
def qkvz_lora_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    token_lora_ids: Optional[torch.Tensor] = None,
    lora_scales: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> None:
    """Adds the multi-slice LoRA of ``x`` into ``out`` in place (see module docstring)."""
    qkvz_lora_reference(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales, scale)


@qkvz_lora_.register_fake
def _qkvz_lora_fake(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None, lora_scales=None, scale=1.0):
    check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)


@qkvz_lora_.register_kernel("cuda")
def _qkvz_lora_cuda(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None, lora_scales=None, scale=1.0):
    from fx_passes.ops.qkvz_lora_kernels import qkvz_lora_triton_

    check_qkvz_lora_args(out, x, lora_a, lora_b, slice_a, slice_start, token_lora_ids, lora_scales)
    for a, b, sa, ss in kernel_calls(lora_a, lora_b, slice_a, slice_start):
        qkvz_lora_triton_(out, x, a, b, sa, ss, token_lora_ids, lora_scales, scale)
