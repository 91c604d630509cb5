"""The arguments of the multi-slice LoRA (``fx_passes::qkvz_lora_`` and the LoRA half of
``fx_passes::qkvz_gemm_lora``): their rules, checked alike by the fake and every real implementation,
the one object that carries them below the ``torch.library`` boundary (:class:`LoraSlices`), and their
split into the calls the Triton kernels take. Below the ops and their kernels; imports neither.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# q, k, v, z, b, a of a GDN layer: 6 slices, up to 6 A groups (vLLM gives every slice its own A); the
# kernels unroll per slice / group at compile time (only the count a call uses), so the caps only bound
# that unrolling.
MAX_SLICES = 8
MAX_GROUPS = 8
KERNEL_MAX_RANK = 128   # the Triton kernels hold a whole rank in one register tile


def num_adapters(t: torch.Tensor) -> int:
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
    adapters = num_adapters(lora_a[0])
    ab_dtype = lora_a[0].dtype
    hidden = x.shape[1]
    for g, a in enumerate(lora_a):
        torch._check(a.dim() in (2, 3), lambda: f"{name}: lora_a[{g}] must be [r, H] or [L, r, H], got {tuple(a.shape)}")
        torch._check(a.shape[-1] == hidden, lambda: f"{name}: lora_a[{g}] has H={a.shape[-1]}, x has H={hidden}")
        torch._check(a.shape[-2] >= 1, lambda: f"{name}: lora_a[{g}] has rank 0")
        torch._check(num_adapters(a) == adapters, lambda: f"{name}: lora_a[{g}] has {num_adapters(a)} adapters, expected {adapters}")
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
        torch._check(num_adapters(b) == adapters, lambda: f"{name}: lora_b[{i}] has {num_adapters(b)} adapters, expected {adapters}")
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


@dataclasses.dataclass(frozen=True)
class LoraSlices:
    """One call's multi-slice LoRA. The op schemas take these fields flat (``torch.library`` needs
    tensors, lists and scalars); below them, launchers and kernels take this one object, as vLLM's
    kernels take one ``LoRAKernelMeta``.

    ``lora_a[g]``: the A of group ``g`` (``[r_g, H]`` or ``[L, r_g, H]``); ``lora_b[i]``: the B of
    output slice ``i`` (``[n_i, r]`` or ``[L, n_i, r]``), whose shrink is group ``slice_a[i]`` and whose
    columns start at ``slice_start[i]``; ``token_lora_ids`` ``[T]`` (``None``: adapter 0 everywhere);
    ``lora_scales`` ``[L]`` / 0-d / ``None``; ``scale`` multiplies everything. Semantics:
    :mod:`fx_passes.ops.qkvz_lora`."""

    lora_a: tuple
    lora_b: tuple
    slice_a: tuple
    slice_start: tuple
    token_lora_ids: Optional[torch.Tensor] = None
    lora_scales: Optional[torch.Tensor] = None
    scale: float = 1.0

    @classmethod
    def of(cls, lora_a, lora_b, slice_a, slice_start, token_lora_ids=None, lora_scales=None,
           scale=1.0) -> "LoraSlices":
        """From the op schema's flat arguments."""
        return cls(tuple(lora_a), tuple(lora_b), tuple(int(g) for g in slice_a),
                   tuple(int(s) for s in slice_start), token_lora_ids, lora_scales, float(scale))

    def check(self, out: torch.Tensor, x: torch.Tensor) -> int:
        """Every rule of :func:`check_qkvz_lora_args`; returns the number of adapters L."""
        return check_qkvz_lora_args(out, x, self.lora_a, self.lora_b, self.slice_a, self.slice_start,
                                    self.token_lora_ids, self.lora_scales)

    @property
    def adapters(self) -> int:
        return num_adapters(self.lora_a[0])

    @property
    def has_ids(self) -> bool:
        return self.token_lora_ids is not None

    @property
    def mixed_adapters(self) -> bool:
        """Several adapters, chosen per token by ``token_lora_ids``."""
        return self.has_ids and self.adapters > 1

    @property
    def b_dtype(self) -> torch.dtype:
        return self.lora_b[0].dtype

    def shrink_groups(self) -> tuple[list[torch.Tensor], dict[int, int]]:
        """The A groups some slice uses, each shrunk exactly once: ``(groups, {index in lora_a: index
        in groups})``."""
        used = sorted(set(self.slice_a))
        return [self.lora_a[g] for g in used], {g: i for i, g in enumerate(used)}

    def max_rank(self) -> int:
        return max(self.lora_a[g].shape[-2] for g in set(self.slice_a))

    def covers_columns(self, n: int) -> bool:
        """Whether the slices cover all ``n`` output columns (they never overlap: checked)."""
        return sum(b.shape[-2] for b in self.lora_b) == n

    def kernel_calls(self, max_rank: int = KERNEL_MAX_RANK) -> list["LoraSlices"]:
        """:func:`kernel_calls` of these slices, each call with the same ids and scales."""
        return [dataclasses.replace(self, lora_a=tuple(a), lora_b=tuple(b), slice_a=tuple(sa),
                                    slice_start=tuple(ss))
                for a, b, sa, ss in kernel_calls(self.lora_a, self.lora_b, self.slice_a, self.slice_start,
                                                 max_rank)]


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
