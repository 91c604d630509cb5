"""The one torch.library namespace every fx_passes op lives in, and how the CUDA kernels are registered."""
from __future__ import annotations

import contextlib

import torch

LIB_NAMESPACE = "fx_passes"

# The dispatcher registrations of :func:`cuda_impl`; torch.library drops a registration when its Library
# object is collected, so this handle lives as long as the module (it is written only at import).
_CUDA_IMPLS = torch.library.Library(LIB_NAMESPACE, "IMPL")


def cuda_impl(op_name: str):
    """Registers the decorated function as the CUDA kernel of ``fx_passes::<op_name>`` (an op defined with
    ``torch.library.custom_op``, whose fake and autograd stay as registered there), straight with the
    dispatcher.

    ``custom_op(...).register_kernel("cuda")`` wraps every call in a Python checker that cost 120-540 us
    per call on the H200 machine's host (the dispatcher's own cost: ~5 us), more than a small-T GEMM.
    The rule it checks (no output aliases an input or another output) is ours to keep: every op's tests
    run ``torch.library.opcheck`` on its CPU implementation, which has the same outputs."""
    def register(fn):
        _CUDA_IMPLS.impl(op_name, fn, "CUDA")
        return fn
    return register


def no_autograd_on_cuda(op_name: str) -> None:
    """Lets CUDA calls of ``fx_passes::<op_name>`` skip ``custom_op``'s Python autograd layer (a fallthrough
    for the AutogradCUDA key): for an op that only ever runs inside a backward (a backward of a backward is
    not supported), where that layer's only work is to check that no gradient is wanted and redispatch
    (~30-80 us per call on the H200 machine's host). Other devices keep the layer (and its error if a
    gradient is wanted)."""
    _CUDA_IMPLS.impl(op_name, torch.library.fallthrough_kernel, "AutogradCUDA")


def exact_dtypes(t: torch.Tensor):
    """The context every op body runs in: autocast off on ``t``'s device. A caller's autocast region would
    otherwise cast the torch ops inside the body again (an fp32 product of 16-bit inputs rounded to 16 bits,
    a 16-bit GEMM in the other 16-bit dtype), so the CPU body and the CUDA paths (whose Triton kernels no
    autocast reaches) would part. Each op computes in the dtypes it is given, in an autocast region or not
    (Inductor's compiled code runs with autocast off; the training rewrite casts the op's inputs to
    autocast's dtype itself)."""
    return torch.autocast(t.device.type, enabled=False) if torch.is_autocast_enabled(t.device.type) \
        else contextlib.nullcontext()
