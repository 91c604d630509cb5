"""The GDN projection block with trainable LoRA, as one autograd-aware op (issue 17).

``fx_passes::qkvz_lora_train(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales) -> (outs, s)``::

    outs[p]   = x @ W_p^T                                   rounded to x's dtype, one tensor per projection
    s[g]      = xs[g].to(adapters) @ lora_a[g]^T            [T, r_g], the adapters' dtype
    delta[i]  = scales[i] * s[slice_a[i]] @ lora_b[i]^T     columns [slice_start[i], + n_i) of cat(outs)
    outs[p][:, slice i] = round(base + delta[i]), summed in promote(x, adapters) dtype and rounded to x's
                dtype once per slice (two slices over the same columns: once each)

which is what PEFT's LoRA ``Linear`` computes for every adapter of every projection (``result =
base_layer(x); result = result + lora_B(lora_A(dropout(x))) * scaling; result.to(x.dtype)``) up to where
it rounds: the expand and its scaling are not rounded apart from the sum. ``slice_start`` counts columns
of the projections side by side; a slice lies inside one projection. ``xs[g]`` is the LoRA input of A
group ``g``: ``x`` itself (in x's dtype: the op casts it, on CUDA in the kernels' registers), or what PEFT
made of it (the cast to the adapters' dtype, its dropout): dropout
stays outside the op, so Inductor's RNG is the one that draws the masks, and q / k / v (one PEFT module,
one A) read one mask, z another. Slices may overlap (two adapters on one projection add up). ``s`` is
returned so that autograd keeps it for the backward (dB needs it) instead of recomputing the shrink.

One output per projection, not one packed [T, N] tensor: the graph reads the projections apart, and the
backward of slicing one output is a zero-filled [T, N] gradient per slice summed up (4 fills, 4 copies
and 3 adds of [T, N]: 1.8 ms of a 7 ms step at 35B-A3B T 16384 on an H200); with one output each, each
gradient arrives as it is.

Backward (:func:`_backward`, traced by AOTAutograd into the joint graph): ``dx = sum_p dout_p @ W_p``
(:func:`qkvz_grad_input`: GEMMs accumulating into one buffer); the LoRA gradients that read ``dout``, :func:`qkvz_lora_train_grad`
(``dS[g] = sum_i scales[i] * dout_i @ B_i``, ``dB_i = scales[i] * dout_i^T @ s[g]``: Triton on CUDA,
:mod:`fx_passes.ops.kernels.lora_train`); then ``dA = dS^T @ xs[g]`` (q, k, v: one dA) and ``dxs[g] = dS @
A``, one GEMM each per distinct LoRA input (A groups reading the same tensor side by side; for x itself
under wider adapters :func:`qkvz_lora_input_grad`, which adds ``dS @ A`` into dx in the kernels); frozen weights
(no ``requires_grad``) get no gradient work.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fx_passes.ops.library import LIB_NAMESPACE, cuda_impl
from fx_passes.ops.lora_args import KERNEL_MAX_RANK
from fx_passes.ops.qkvz_gemm import check_gemm_args, total_rows

_ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_train_args(x: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slice_a: Sequence[int],
                     slice_start: Sequence[int], scales: Sequence[float]) -> list[tuple[int, int]]:
    """Every shape / dtype / device rule of the op (the fake and the real implementation run it); returns
    each slice's ``(projection, first column in it)`` (:func:`slice_owners`)."""
    name = "qkvz_lora_train"
    check_gemm_args(x, weights)
    n_out, T, H = total_rows(weights), x.shape[0], x.shape[1]
    torch._check(len(lora_a) >= 1 and len(xs) == len(lora_a),
                 lambda: f"{name}: need one xs per lora_a (>= 1), got {len(xs)} and {len(lora_a)}")
    torch._check(len(lora_b) >= 1 and len(slice_a) == len(lora_b) == len(slice_start) == len(scales),
                 lambda: f"{name}: lora_b, slice_a, slice_start, scales need one entry per slice, got "
                         f"{len(lora_b)}, {len(slice_a)}, {len(slice_start)}, {len(scales)}")
    ad = lora_a[0].dtype
    torch._check(ad in _ADAPTER_DTYPES, lambda: f"{name}: adapter dtype {ad} is not fp16 / bf16 / fp32")
    for g, (a, xg) in enumerate(zip(lora_a, xs)):
        torch._check(a.dim() == 2 and a.shape[1] == H and a.shape[0] >= 1,
                     lambda: f"{name}: lora_a[{g}] must be [r, H={H}], got {tuple(a.shape)}")
        torch._check(xg.dim() == 2 and xg.shape[0] == T and xg.shape[1] == H,
                     lambda: f"{name}: xs[{g}] must be [T={T}, H={H}], got {tuple(xg.shape)}")
        torch._check(a.dtype == ad and xg.dtype in (ad, x.dtype),
                     lambda: f"{name}: lora_a[{g}] / xs[{g}] dtypes {a.dtype} / {xg.dtype}: need the adapters' "
                             f"{ad} (xs: or x's {x.dtype})")
        torch._check(a.device == x.device and xg.device == x.device,
                     lambda: f"{name}: lora_a[{g}] / xs[{g}] not on {x.device}")
    for i, b in enumerate(lora_b):
        g = slice_a[i]
        torch._check(0 <= g < len(lora_a), lambda: f"{name}: slice_a[{i}]={g} names no lora_a tensor")
        torch._check(b.dim() == 2 and b.shape[1] == lora_a[g].shape[0],
                     lambda: f"{name}: lora_b[{i}] must be [n, r={lora_a[g].shape[0]}], got {tuple(b.shape)}")
        torch._check(b.dtype == ad and b.device == x.device,
                     lambda: f"{name}: lora_b[{i}] is {b.dtype} on {b.device}, adapters {ad} on {x.device}")
        torch._check(0 <= slice_start[i] and slice_start[i] + b.shape[0] <= n_out,
                     lambda: f"{name}: slice {i} [{slice_start[i]}, {slice_start[i] + b.shape[0]}) outside "
                             f"the output's {n_out} columns")
    return slice_owners([w.shape[0] for w in weights], slice_start, [b.shape[0] for b in lora_b], name)


def slice_owners(widths: Sequence[int], slice_start: Sequence[int], slice_widths: Sequence[int],
                 name: str = "qkvz_lora_train") -> list[tuple[int, int]]:
    """``(projection, first column in it)`` of every slice (``slice_start``: columns of the projections
    side by side); a slice must lie inside one projection."""
    bounds = [0]
    for w in widths:
        bounds.append(bounds[-1] + w)
    owners = []
    for i, (start, n) in enumerate(zip(slice_start, slice_widths)):
        p = next((k for k in range(len(widths)) if bounds[k] <= start < bounds[k + 1]), None)
        torch._check(p is not None and start + n <= bounds[p + 1],
                     lambda: f"{name}: slice {i} [{start}, {start + n}) crosses the projections' bounds {bounds}")
        owners.append((p, start - bounds[p]))
    return owners


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_train", mutates_args=())
def qkvz_lora_train(
    x: torch.Tensor,
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    scales: Sequence[float],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(outs, s)``: the projections with their LoRA (module docstring); every device, plain torch."""
    owners = check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
    outs = [x @ w.t() for w in weights]
    s = [xg.to(a.dtype) @ a.t() for xg, a in zip(xs, lora_a)]
    _add_lora_reference(outs, s, lora_b, slice_a, owners, scales)
    return outs, s


def _kernels_hold(ranks) -> bool:
    """The Triton kernels hold a whole rank in registers (a larger one runs the torch implementation)."""
    return max(ranks) <= KERNEL_MAX_RANK


def _add_lora_reference(outs, s, lora_b, slice_a, owners, scales) -> None:
    acc = torch.promote_types(outs[0].dtype, lora_b[0].dtype)
    for i, b in enumerate(lora_b):
        p, start = owners[i]
        cols = outs[p][:, start:start + b.shape[0]]
        if acc == cols.dtype:
            cols.addmm_(s[slice_a[i]], b.t(), alpha=scales[i])
        else:   # fp32 adapters on a 16-bit base: the slice's sum in fp32, rounded once (only [T, n_i] in fp32)
            cols.copy_(torch.addmm(cols.to(acc), s[slice_a[i]], b.t(), alpha=scales[i]))


@cuda_impl("qkvz_lora_train")
def _train_cuda(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales):
    owners = check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
    outs = [x @ w.t() for w in weights]   # library GEMMs: the base rounded as PEFT's
    kernels = _kernels_hold([b.shape[1] for b in lora_b]) and all(b.stride(-1) == 1 for b in lora_b)
    s = _shrink_cuda(xs, lora_a) if kernels else [xg.to(a.dtype) @ a.t() for xg, a in zip(xs, lora_a)]
    if not kernels:
        _add_lora_reference(outs, s, lora_b, slice_a, owners, scales)
    else:   # one launch over every slice, reading and writing each output once in its own dtype
        from fx_passes.ops.kernels.lora_train import expand_add_   # imports Triton: only on a CUDA call

        expand_add_(outs, s, lora_b, slice_a, owners, slice_start, scales)
    return outs, s


def _shrink_cuda(xs, lora_a) -> list[torch.Tensor]:
    """``s[g] = xs[g].to(ad) @ A_g^T``: an input in the adapters' dtype through the library GEMM; a 16-bit
    one under fp32 adapters (x itself, no dropout) through the kernel, which casts it in registers where
    the library GEMM would need an fp32 copy of [T, H]."""
    s: list = [None] * len(xs)
    for g, (xg, a) in enumerate(zip(xs, lora_a)):
        if xg.dtype == a.dtype or xg.stride(-1) != 1:   # (the kernel reads rows of unit stride)
            s[g] = xg.to(a.dtype) @ a.t()
    rest = [g for g in range(len(xs)) if s[g] is None]
    if rest:
        from fx_passes.ops.kernels.lora_train import shrink   # imports Triton: only on a CUDA call

        for g, sg in zip(rest, shrink([xs[g] for g in rest], [lora_a[g] for g in rest])):
            s[g] = sg
    return s


@qkvz_lora_train.register_fake
def _fake(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales):
    check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
    return ([x.new_empty((x.shape[0], w.shape[0])) for w in weights],
            [a.new_empty((xg.shape[0], a.shape[0])) for xg, a in zip(xs, lora_a)])


def _setup_context(ctx, inputs, output):
    x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales = inputs
    _, s = output
    ctx.slice_a, ctx.slice_start, ctx.scales = list(slice_a), list(slice_start), list(scales)
    # A groups reading one input (no dropout: q/k/v and z read the same cast of x) share its tensor and,
    # in the backward, its dA / dx GEMMs
    ctx.xs_of = [next(h for h in range(len(xs)) if xs[h] is xg) for xg in xs]
    ctx.xs_is_x = [xg is x for xg in xs]   # no dropout: the LoRA reads x itself (cast in the kernels)
    distinct = [xg for g, xg in enumerate(xs) if ctx.xs_of[g] == g]
    ctx.n = (len(distinct), len(weights), len(lora_a), len(lora_b))
    # x itself is needed only for a trainable base weight's gradient (frozen: the usual case)
    keep_x = x if any(w.requires_grad for w in weights) else None
    ctx.save_for_backward(keep_x, *distinct, *weights, *lora_a, *lora_b, *s)


def _unpack(ctx):
    n_xs, n_w, n_a, n_b = ctx.n
    saved = list(ctx.saved_tensors)
    x = saved.pop(0)
    parts = []
    for count in (n_xs, n_w, n_a, n_b, n_a):
        parts.append(saved[:count])
        saved = saved[count:]
    distinct = dict(zip(sorted(set(ctx.xs_of)), parts[0]))
    parts[0] = [distinct[h] for h in ctx.xs_of]
    return (x, *parts)


def _slice_runs(slice_a: Sequence[int], owners: Sequence[tuple[int, int]], lora_b: Sequence[torch.Tensor],
                scales: Sequence[float], group: int) -> list[tuple[int, int, int, list[int]]]:
    """The slices of A group ``group`` as runs of adjacent columns of one projection with one scale:
    ``[(projection, first column, columns, [slice indices in column order]), ...]`` (q | k | v: one run)."""
    mine = sorted((owners[i], i) for i in range(len(lora_b)) if slice_a[i] == group)
    runs: list[tuple[int, int, int, list[int]]] = []
    for (p, start), i in mine:
        if runs:
            q, first, n, members = runs[-1]
            if q == p and first + n == start and scales[members[-1]] == scales[i]:
                runs[-1] = (p, first, n + lora_b[i].shape[0], members + [i])
                continue
        runs.append((p, start, lora_b[i].shape[0], [i]))
    return runs


def lora_grads_reference(dys: Sequence[torch.Tensor], s: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                         slice_a: Sequence[int], slice_start: Sequence[int], scales: Sequence[float],
                         need_db: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(dS, dB)`` of :func:`qkvz_lora_train_grad` in torch ops: per A group, one GEMM per run of adjacent
    slices with one scale (q | k | v: one), in the adapters' dtype."""
    ad = lora_b[0].dtype
    owners = slice_owners([d.shape[1] for d in dys], slice_start, [b.shape[0] for b in lora_b])
    d_s: list = []
    d_b: list = [None] * len(lora_b)
    for g, sg in enumerate(s):
        acc = None
        for p, first, n, members in _slice_runs(slice_a, owners, lora_b, scales, g):
            run = dys[p][:, first:first + n].to(ad)  # the run's columns only in the adapters' dtype
            scale = scales[members[0]]               # d(s @ B^T) = scale * dy: folded into the products
            b_run = lora_b[members[0]] if len(members) == 1 else torch.cat([lora_b[i] for i in members])
            part = torch.mm(run, b_run) * scale
            acc = part if acc is None else acc + part
            if need_db:
                d_b_run = torch.mm(run.t(), sg) * scale
                row = 0
                for i in members:
                    d_b[i] = d_b_run[row:row + lora_b[i].shape[0]].clone()
                    row += lora_b[i].shape[0]
        d_s.append(acc if acc is not None else sg.new_zeros(sg.shape))
    return d_s, (d_b if need_db else [])


def _check_grad_args(dys, s, lora_b, slice_a, slice_start, scales):
    name = "qkvz_lora_train_grad"
    torch._check(len(dys) >= 1 and all(d.dim() == 2 and d.shape[0] == dys[0].shape[0] for d in dys),
                 lambda: f"{name}: dys must be 2-D [T, n_p] tensors, got {[tuple(d.shape) for d in dys]}")
    torch._check(len(s) >= 1 and len(lora_b) >= 1 and len(slice_a) == len(lora_b) == len(slice_start) == len(scales),
                 lambda: f"{name}: need s (>= 1) and one slice_a / slice_start / scale per lora_b")
    T, ad = dys[0].shape[0], lora_b[0].dtype
    for g, sg in enumerate(s):
        torch._check(sg.dim() == 2 and sg.shape[0] == T and sg.dtype == ad,
                     lambda: f"{name}: s[{g}] must be [T={T}, r] in {ad}, got {tuple(sg.shape)} {sg.dtype}")
    for i, b in enumerate(lora_b):
        g = slice_a[i]
        torch._check(0 <= g < len(s), lambda: f"{name}: slice_a[{i}]={g} names no s tensor")
        torch._check(b.dim() == 2 and b.shape[1] == s[g].shape[1] and b.dtype == ad,
                     lambda: f"{name}: lora_b[{i}] must be [n, r={s[g].shape[1]}] in {ad}, got "
                             f"{tuple(b.shape)} {b.dtype}")
    return slice_owners([d.shape[1] for d in dys], slice_start, [b.shape[0] for b in lora_b], name)


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_train_grad", mutates_args=())
def qkvz_lora_train_grad(
    dys: Sequence[torch.Tensor],
    s: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    scales: Sequence[float],
    need_db: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The LoRA gradients that read the outputs' gradients ``dys`` (one per projection): ``dS[g] = sum_i
    scales[i] * dy_i @ B_i`` over the slices of A group ``g``, and (``need_db``) ``dB_i = scales[i] * dy_i^T @
    s[slice_a[i]]``; the adapters' dtype (``dy_i``: slice i's columns, ``slice_start`` as in the forward)."""
    _check_grad_args(dys, s, lora_b, slice_a, slice_start, scales)
    return lora_grads_reference(dys, s, lora_b, slice_a, slice_start, scales, need_db)


@qkvz_lora_train_grad.register_fake
def _grad_fake(dys, s, lora_b, slice_a, slice_start, scales, need_db):
    _check_grad_args(dys, s, lora_b, slice_a, slice_start, scales)
    return [sg.new_empty(sg.shape) for sg in s], ([b.new_empty(b.shape) for b in lora_b] if need_db else [])


@cuda_impl("qkvz_lora_train_grad")
def _grad_cuda(dys, s, lora_b, slice_a, slice_start, scales, need_db):
    owners = _check_grad_args(dys, s, lora_b, slice_a, slice_start, scales)
    if not _kernels_hold([b.shape[1] for b in lora_b]):
        return lora_grads_reference(dys, s, lora_b, slice_a, slice_start, scales, need_db)
    from fx_passes.ops.kernels.lora_train import lora_db, lora_ds   # imports Triton: only on a CUDA call
    from fx_passes.ops.tuning import device_info

    unit = [t if t.stride(-1) == 1 else t.contiguous() for t in dys]   # e.g. the expanded gradient of a sum
    s = [t if t.stride(-1) == 1 else t.contiguous() for t in s]
    lora_b = [b if b.stride(-1) == 1 else b.contiguous() for b in lora_b]
    d_s = lora_ds(unit, lora_b, slice_a, owners, scales, [t.shape[1] for t in s])
    d_b = lora_db(unit, s, lora_b, slice_a, owners, scales, device_info(unit[0].device).sms) if need_db else []
    return d_s, d_b


def _check_grad_input_args(dys, weights):
    torch._check(len(dys) == len(weights) >= 1 and all(d.dim() == 2 and w.dim() == 2 and d.shape[1] == w.shape[0]
                                                          and d.shape[0] == dys[0].shape[0] for d, w in zip(dys, weights)),
                 lambda: "qkvz_grad_input: need one [T, n_p] gradient per [n_p, H] weight")


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_grad_input", mutates_args=())
def qkvz_grad_input(dys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``dx = sum_p dys[p] @ weights[p]``: the GEMMs after the first accumulate into its result in place
    (library GEMM, beta = 1), where out-of-place ``addmm``s copy the [T, H] sum before each."""
    return _grad_input(dys, weights)


@cuda_impl("qkvz_grad_input")
def _grad_input(dys, weights):
    _check_grad_input_args(dys, weights)
    d_x = dys[0] @ weights[0]
    for dy, w in zip(dys[1:], weights[1:]):
        d_x.addmm_(dy, w)
    return d_x


@qkvz_grad_input.register_fake
def _grad_input_fake(dys, weights):
    _check_grad_input_args(dys, weights)
    return dys[0].new_empty((dys[0].shape[0], weights[0].shape[1]))


def _check_input_grad_args(x, ds, lora_a, d_x):
    name = "qkvz_lora_input_grad"
    torch._check(x.dim() == 2 and len(ds) == len(lora_a) >= 1,
                 lambda: f"{name}: need a 2-D x and one ds per lora_a, got {tuple(x.shape)}, {len(ds)}, {len(lora_a)}")
    for g, (d, a) in enumerate(zip(ds, lora_a)):
        torch._check(d.dim() == 2 and a.dim() == 2 and d.shape == (x.shape[0], a.shape[0]) and a.shape[1] == x.shape[1]
                     and d.dtype == a.dtype,
                     lambda: f"{name}: ds[{g}] {tuple(d.shape)} {d.dtype} / lora_a[{g}] {tuple(a.shape)} {a.dtype} do not "
                             f"fit x {tuple(x.shape)}")
    torch._check(d_x is None or (d_x.shape == x.shape and d_x.dtype == x.dtype),
                 lambda: f"{name}: d_x must be like x {tuple(x.shape)} {x.dtype}")


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_input_grad", mutates_args=())
def qkvz_lora_input_grad(x: torch.Tensor, ds: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor],
                         d_x: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients through A groups whose LoRA input is ``x`` itself (read in the adapters' dtype):
    ``dA_g = ds_g^T @ x`` and, given ``d_x`` (x's gradient so far), ``d_x + sum_g ds_g @ A_g`` summed in
    promote(x, adapters) dtype and rounded once to x's dtype (an empty tensor without ``d_x``)."""
    _check_input_grad_args(x, ds, lora_a, d_x)
    return _input_grad_reference(x, ds, lora_a, d_x)


def _input_grad_reference(x, ds, lora_a, d_x):
    ad = lora_a[0].dtype
    d_a = [d.t() @ x.to(ad) for d in ds]
    if d_x is None:
        return d_a, x.new_empty((0,))
    acc = torch.promote_types(x.dtype, ad)
    total = d_x.to(acc)
    for d, a in zip(ds, lora_a):
        total = total + (d @ a).to(acc)
    return d_a, total.to(x.dtype)


@qkvz_lora_input_grad.register_fake
def _input_grad_fake(x, ds, lora_a, d_x):
    _check_input_grad_args(x, ds, lora_a, d_x)
    return [a.new_empty(a.shape) for a in lora_a], (x.new_empty((0,)) if d_x is None else d_x.new_empty(d_x.shape))


@cuda_impl("qkvz_lora_input_grad")
def _input_grad_cuda(x, ds, lora_a, d_x):
    _check_input_grad_args(x, ds, lora_a, d_x)
    if not _kernels_hold([a.shape[0] for a in lora_a]) or x.stride(-1) != 1:
        return _input_grad_reference(x, ds, lora_a, d_x)
    from fx_passes.ops.kernels.lora_train import input_grads   # imports Triton: only on a CUDA call
    from fx_passes.ops.tuning import device_info

    ds = [d if d.stride(-1) == 1 else d.contiguous() for d in ds]
    d_x = d_x if d_x is None or d_x.is_contiguous() else d_x.contiguous()
    d_a, new = input_grads(x, ds, lora_a, d_x, device_info(x.device).sms)
    return d_a, (x.new_empty((0,)) if new is None else new)


def _backward(ctx, grad_outs: Optional[list], grad_s: Optional[list]):
    x, xs, weights, lora_a, lora_b, s = _unpack(ctx)
    need = ctx.needs_input_grad   # x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales
    d_x = d_w = None
    d_xs: list = [None] * len(xs)
    d_a: list = [None] * len(lora_a)
    d_b: list = [None] * len(lora_b)
    T = s[0].shape[0]
    grad_outs = list(grad_outs) if grad_outs is not None else [None] * len(weights)
    dys = [g if g is not None else w.new_zeros((T, w.shape[0])) for g, w in zip(grad_outs, weights)]
    ad = lora_a[0].dtype
    if need[0]:
        d_x = torch.ops.fx_passes.qkvz_grad_input(dys, list(weights))
    if need[2]:   # frozen base weights (the usual case) skip this
        d_w = [dy.t() @ x if w.requires_grad else None for dy, w in zip(dys, weights)]
    if not (need[1] or need[3] or need[4]):
        return d_x, d_xs, d_w, d_a, d_b, None, None, None
    d_s, grads_b = torch.ops.fx_passes.qkvz_lora_train_grad(dys, list(s), list(lora_b), ctx.slice_a,
                                                             ctx.slice_start, ctx.scales, bool(need[4]))
    if need[4]:
        d_b = list(grads_b)
    d_s = list(d_s)
    if grad_s is not None:
        d_s = [ds if gs is None else ds + gs.to(ad) for ds, gs in zip(d_s, grad_s)]
    for h in sorted(set(ctx.xs_of)):   # one dA GEMM and one dxs GEMM per distinct LoRA input
        groups = [g for g in range(len(lora_a)) if ctx.xs_of[g] == h]
        if ctx.xs_is_x[h] and xs[h].dtype != ad:   # x itself under wider adapters: its side in the kernels
            grads_a, new_dx = torch.ops.fx_passes.qkvz_lora_input_grad(
                xs[h], [d_s[g] for g in groups], [lora_a[g] for g in groups], d_x)
            if need[3]:
                for g, da in zip(groups, grads_a):
                    d_a[g] = da
            if d_x is not None:
                d_x = new_dx   # xs[h]'s gradient folded into x's (the same tensor): none for xs[h]
            continue
        ds = d_s[groups[0]] if len(groups) == 1 else torch.cat([d_s[g] for g in groups], 1)
        if need[3]:
            d_a_all = ds.t() @ xs[h].to(ad)
            row = 0
            for g in groups:
                d_a[g] = d_a_all[row:row + lora_a[g].shape[0]]
                row += lora_a[g].shape[0]
        if need[1]:   # autograd sums the gradients of one input passed twice: it gets the whole sum once
            a = lora_a[groups[0]] if len(groups) == 1 else torch.cat([lora_a[g] for g in groups], 0)
            d_xs[h] = (ds @ a).to(xs[h].dtype)
    return d_x, d_xs, d_w, d_a, d_b, None, None, None


qkvz_lora_train.register_autograd(_backward, setup_context=_setup_context)
