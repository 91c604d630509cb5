"""JIT helpers and host utilities shared by the kernels of :mod:`fx_passes.ops.kernels`."""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fx_passes.ops.tuning import interpreting

@triton.jit
def token_adapters(ids_ptr, offs_m, T, L, HAS_IDS: tl.constexpr):
    """Adapter id of each row of the tile; -1 (no adapter) for rows >= T and for every id outside
    0..L-1, compared at the ids' own width (int64 ids are never truncated: 2**32 is not adapter 0)."""
    m_mask = offs_m < T
    if HAS_IDS:
        raw = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
        ids = tl.where((raw >= 0) & (raw < L), raw, -1).to(tl.int32)
    else:
        ids = tl.where(m_mask, 0, -1)
    return ids


# Mixed-adapter tiles: the B tiles of up to ADAPTER_BATCH adapters are loaded together before their
# dots, so a tile holding 4 adapters waits for one memory latency, not for 4 in a row.
# A tl.constexpr object: the compiler rejects a global annotated `: tl.constexpr` (the interpreter accepts it).
ADAPTER_BATCH = tl.constexpr(4)


@triton.jit
def valid_adapter(l, L):
    """``l < L`` as a tensor (``l`` may be a Python int: the interpreter needs a tensor mask)."""
    return (tl.zeros((), tl.int32) + l) < L


@triton.jit
def present(ids, l, L):
    """Whether some row of the tile uses adapter ``l`` (a valid one: ``l < L``)."""
    return (tl.max((ids == l).to(tl.int32), axis=0) > 0) & valid_adapter(l, L)


@triton.jit
def adapter_tile(ptr, l, L, stride_l, tile, mask, ids):
    """Adapter ``l``'s tile of B (``ptr + l * stride_l + tile``); zeros, with no memory traffic, when
    no row of the tile uses ``l``."""
    # tl.where, not `mask & present`: the Triton interpreter turns a 2-D & 0-d bool into int32
    return tl.load(ptr + tl.cast(l, tl.int64) * stride_l + tile, mask=tl.where(present(ids, l, L), mask, False),
                   other=0.0)


@triton.jit
def adapter_tiles4(ptr, l0, L, stride_l, tile, mask, ids):
    """The tiles of adapters ``l0 .. l0 + 3`` (ADAPTER_BATCH), loads issued together."""
    return (adapter_tile(ptr, l0, L, stride_l, tile, mask, ids),
            adapter_tile(ptr, l0 + 1, L, stride_l, tile, mask, ids),
            adapter_tile(ptr, l0 + 2, L, stride_l, tile, mask, ids),
            adapter_tile(ptr, l0 + 3, L, stride_l, tile, mask, ids))


@triton.jit
def adapter_scale(scales_ptr, l, L, stride_scales, scale, HAS_SCALES: tl.constexpr):
    """``scale * lora_scales[l]`` (fp32)."""
    if HAS_SCALES:
        return tl.load(scales_ptr + l * stride_scales, mask=valid_adapter(l, L), other=0.0).to(tl.float32) * scale
    else:
        return scale


@triton.jit
def tile_owner(pid, tile_off, NUM: tl.constexpr):
    """Which of ``NUM`` consecutive ranges of column tiles program ``pid`` falls in: range ``i`` is
    ``[tile_off[i], tile_off[i + 1])``, ``tile_off[0] = 0`` (slices, segments)."""
    owner = tl.zeros((), tl.int32)
    for i in tl.static_range(1, NUM):
        owner += (pid >= tile_off[i]).to(tl.int32)
    return owner


def adapter_stride(t: torch.Tensor) -> int:
    """Stride between adapters of a stacked ``[L, ...]`` adapter tensor (0 for one unstacked adapter)."""
    return t.stride(0) if t.dim() == 3 else 0


def scale_args(lora_scales: Optional[torch.Tensor], scale: float, x: torch.Tensor):
    """Kernel arguments of the per-token scale ``scale * lora_scales[l]``: (scale, scales tensor,
    its stride, HAS_SCALES). A one-element CPU tensor is read on the host (no device sync) and folded
    into ``scale``; anything else is read by the kernel (``x`` stands in when there is none)."""
    if lora_scales is None:
        return scale, x, 0, False
    if lora_scales.numel() == 1 and lora_scales.device.type == "cpu":
        return float(torch.tensor(scale, dtype=torch.float32) * lora_scales.reshape(()).float()), x, 0, False
    scales = lora_scales.reshape(-1)
    if scales.device != x.device:
        scales = scales.to(x.device)  # [L] on the host: an H2D copy, not graph-capturable
    return scale, scales, 0 if scales.numel() == 1 else scales.stride(0), True


def on_device(x: torch.Tensor, traced: bool = False):
    """The context a launch for ``x`` runs in (its CUDA device current); none while an op's body is traced
    (``traced``: the compiled code sets the device of what it launches)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" and not traced else contextlib.nullcontext()


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global scratch for a launch (device-side TMA descriptors), from torch's caching allocator on the
    current device (allocations are 256-byte aligned; freed once the launch is queued, in stream order)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


class CompiledLaunches:
    """The launches of one Triton kernel for one call signature of an op: the caller keeps, per ``slot``,
    the same grid, meta and non-tensor arguments on every call (they follow from the signature's shapes,
    strides and dtypes; a slot names them). Once a slot was launched with every tensor 16-byte aligned,
    later aligned launches go straight to the compiled kernel's launcher: Triton's ``JITFunction.run`` binds
    and specializes every argument on every call, 46 vs 19 us per launch of the training kernels on the
    H200 machine's host (a 35B-A3B layer's training step at T 4096 has ~1.3 ms of GPU work for 5 launches).
    An unaligned tensor (a view at an odd offset) takes Triton's path, which specializes on it.

    ``traced``: the op's body is being traced (its CUDA calls decomposed for Inductor): the launch is
    recorded through ``torch.library.wrap_triton`` and Inductor's generated code launches the kernel.

    Host TMA descriptors among ``args`` (``TensorDescriptor``): Triton's launcher encodes them at each launch;
    traced, the graph records each one's tensor and block shape and Inductor's code makes the descriptor
    (:func:`_descriptor_hopifier`: what Dynamo records for a kernel called with host descriptors, which
    ``wrap_triton`` outside Dynamo does not).

    ``device_descriptors``: the kernel makes TMA descriptors on the device (``tl.make_tensor_descriptor``), in
    global scratch memory that Triton asks an allocator for at launch: our launches give it torch's caching
    allocator in a copy of the caller's context (what ``triton.set_allocator`` sets stays the caller's);
    Inductor's generated code sets its own."""

    def __init__(self, kernel, device_descriptors: bool = False):
        self.kernel = kernel
        self._runners: dict = {}
        self.device_descriptors = device_descriptors

    def launch(self, slot, grid: tuple, args: tuple, meta: dict, tensors: Sequence[torch.Tensor],
               traced: bool = False) -> None:
        if traced:
            wrapped = torch.library.wrap_triton(self.kernel)[tuple(grid)]
            if any(_is_host_descriptor(a) for a in args):
                _descriptor_hopifier().call_triton_kernel(wrapped, args, meta, None)
            else:
                wrapped(*args, **meta)
            return
        if self.device_descriptors:
            contextvars.copy_context().run(self._launch_with_scratch, slot, grid, args, meta, tensors)
        else:
            self._launch(slot, grid, args, meta, tensors)

    def _launch_with_scratch(self, slot, grid, args, meta, tensors) -> None:
        triton.set_allocator(_scratch)
        self._launch(slot, grid, args, meta, tensors)

    def _launch(self, slot, grid, args, meta, tensors) -> None:
        runner = self._runners.get(slot)
        aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
        if runner is not None and aligned:
            runner[0](*args, *runner[1])
            return
        compiled = self.kernel[grid](*args, **meta)
        if aligned and not interpreting() and callable(getattr(compiled, "__getitem__", None)):
            constexprs = tuple(meta[name] for name in self.kernel.arg_names[len(args):])
            self._runners[slot] = (compiled[tuple(grid) + (1,) * (3 - len(grid))], constexprs)


def _is_host_descriptor(arg) -> bool:
    from triton.tools.tensor_descriptor import TensorDescriptor

    return isinstance(arg, TensorDescriptor)


@functools.cache
def _descriptor_hopifier():
    """``wrap_triton``'s tracer, recording each host ``TensorDescriptor`` argument as its tensor plus
    ``tma_descriptor_metadata`` (``("stable", (block_shape,))``, the form Dynamo records and Inductor turns
    back into ``TensorDescriptor.from_tensor`` in its generated code). One, stateless, built on first use (its
    torch module is imported then, as torch's own tracer is)."""
    from torch._higher_order_ops.triton_kernel_wrap import TracingTritonHOPifier, triton_kernel_wrapper_mutation

    class DescriptorHOPifier(TracingTritonHOPifier):
        def call_HOP(self, variable, grids, combined_args, tx):
            metadata, args = {}, dict(combined_args)
            for name, value in combined_args.items():
                if _is_host_descriptor(value):
                    if list(value.shape) != list(value.base.shape) or list(value.strides) != list(
                            value.base.stride()):
                        raise ValueError(f"{name}: a traced host descriptor spans its whole tensor")
                    args[name] = value.base
                    metadata[name] = ("stable", (list(value.block_shape),))
            graphable, constant_args_idx = self.store_non_graphable_args(args)
            return triton_kernel_wrapper_mutation(kernel_idx=variable.kernel_idx, constant_args_idx=constant_args_idx,
                                                  grid=grids, tma_descriptor_metadata=metadata, kwargs=graphable)

    return DescriptorHOPifier()
