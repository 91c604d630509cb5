"""The GDN projection block with trainable LoRA, as one autograd-aware op (issue 17).

``fx_passes::qkvz_lora_train(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales) -> (outs, s)``::

    s[:, g]   = xs[g].to(adapters) @ lora_a[g]^T            [T, sum of ranks], A group g in columns
                                                            off_g = r_0 + .. + r_{g-1} .. off_g + r_g
    delta[i]  = scales[i] * s[:, slice_a[i]] @ lora_b[i]^T  columns [slice_start[i], + n_i) of cat(outs)
    outs[p]   = round(x @ W_p^T + sum of delta[i] over p's slices)   summed in fp32 (x's dtype where wider),
                                                            rounded to x's dtype once; one tensor per projection

which is what PEFT's LoRA ``Linear`` computes for every adapter of every projection (``result = base_layer(x);
result = result + lora_B(lora_A(dropout(x))) * scaling; result.to(x.dtype)``) up to where it rounds: PEFT
rounds the base GEMM's output, and the sum after each adapter, to x's dtype; the op rounds base + LoRA once.
The two differ by at most a unit in the last place of an output element (about one element in five at rank 16
on a bf16 base), the op's the closer to the exact sum (1.66e-3 against 1.82e-3 from fp64 at 35B-A3B's widths,
1.66e-3 against 2.43e-3 with two adapters). One rounding is what lets the fused GEMM carry the LoRA as K steps
of its main loop (:mod:`~.kernels.gemm_lora_train`), where rounding the base first needs a second pass over
each tile after it. (On Hopper from the device's ``train_fused_min_t`` the LoRA of fp32 adapters multiplies
two-part 16-bit splits of s and B: ~2^-16 relative in delta, below the 16-bit output's rounding.)
``slice_start`` counts columns of the projections side by side; a slice lies inside one projection. ``xs[g]``
is the LoRA input of A group ``g``: ``x`` itself (in x's dtype: the op casts it, on CUDA in the kernels'
registers), or what PEFT made of it (the cast to the adapters' dtype, its dropout): dropout stays outside the
op, so Inductor's RNG draws the masks, and q / k / v (one PEFT module, one A) read one mask, z another. Slices
may overlap (two adapters on one projection add up). ``s`` (every group's shrink, side by side) is returned so
that autograd keeps it for the backward (dB needs it) instead of recomputing the shrink.

One output per projection, not one packed [T, N] tensor: the graph reads the projections apart, and the
backward of slicing one output is a zero-filled [T, N] gradient per slice summed up (4 fills, 4 copies
and 3 adds of [T, N]: 1.8 ms of a 7 ms step at 35B-A3B T 16384 on an H200); with one output each, each
gradient arrives as it is.

Backward: ONE op, :func:`qkvz_lora_train_backward` (traced by AOTAutograd into the joint graph): ``dx =
sum_p dy_p @ W_p`` (GEMMs accumulating into one buffer, each rounding it), ``dS[:, g] = sum_i scales[i] *
dy_i @ B_i`` over the slices of group g, ``dB_i = scales[i] * dy_i^T @ s[:, g]``, ``dA_g = dS_g^T @ xs[g]``
and, when the LoRA reads x itself, x's LoRA gradient ``dS_g @ A_g`` added into dx (summed in promote(x,
adapters) dtype and rounded once). Other LoRA inputs (dropout outputs) get ``dS_g @ A_g`` in the traced
graph from the op's dS, one input at a time, so that each [T, H] fp32 gradient is freed after its dropout's
backward read it. Frozen weights (no ``requires_grad``) get no gradient work. One op, not three: at T <=
4096 a step's time is the host's, and each op call costs a dispatcher crossing with its list arguments boxed
and its checks.

Host cost: the argument checks and everything planned from shapes alone run once per call signature
(:class:`~fx_passes.ops.memo.LruMemo` by :func:`_signature`), as the inference op does. Under
``torch.compile`` on CUDA both ops' bodies are traced into the graph Inductor compiles
(:func:`_inline_for_inductor`): its code then calls the GEMMs and launches the kernels itself, and a step
runs no Python of ours. (From the device's ``train_fused_min_t`` on Hopper the forward's base GEMMs and
x's gradient are TMA GEMMs with the LoRA in their epilogues, :mod:`~.kernels.gemm_lora_train`: they make
their TMA descriptors on the device, as ``wrap_triton`` outside Dynamo cannot trace host descriptors.)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from fx_passes.ops.kernels.jit_helpers import on_device
from fx_passes.ops.library import LIB_NAMESPACE, cuda_impl, exact_dtypes, no_autograd_on_cuda
from fx_passes.ops.lora_args import KERNEL_MAX_RANK
from fx_passes.ops.memo import LruMemo, tensor_meta
from fx_passes.ops.qkvz_gemm import check_gemm_args
from fx_passes.ops.tuning import interpreting

_ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_train_args(x: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                     lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slice_a: Sequence[int],
                     slice_start: Sequence[int], scales: Sequence[float]) -> list[tuple[int, int]]:
    """Every shape / dtype / device rule of the op (the fake and the real implementation run it); returns
    each slice's ``(projection, first column in it)`` (:func:`slice_owners`)."""
    name = "qkvz_lora_train"
    check_gemm_args(x, weights)
    T, H = x.shape[0], x.shape[1]
    torch._check(len(lora_a) >= 1 and len(xs) == len(lora_a),
                 lambda: f"{name}: need one xs per lora_a (>= 1), got {len(xs)} and {len(lora_a)}")
    ad = lora_a[0].dtype
    torch._check(ad in _ADAPTER_DTYPES, lambda: f"{name}: adapter dtype {ad} is not fp16 / bf16 / fp32")
    for g, (a, xg) in enumerate(zip(lora_a, xs)):
        torch._check(xg.dim() == 2 and xg.shape[0] == T and xg.shape[1] == H,
                     lambda: f"{name}: xs[{g}] must be [T={T}, H={H}], got {tuple(xg.shape)}")
        torch._check(xg.dtype in (ad, x.dtype) and xg.device == x.device,
                     lambda: f"{name}: xs[{g}] is {xg.dtype} on {xg.device}: need the adapters' {ad} or x's "
                             f"{x.dtype} on {x.device}")
    return _check_lora(name, [w.shape[0] for w in weights], H, x.device, lora_a, lora_b, slice_a, slice_start,
                       scales)


def _check_lora(name, widths, H, device, lora_a, lora_b, slice_a, slice_start, scales) -> list[tuple[int, int]]:
    """The adapters' rules shared by the forward and the backward op; returns :func:`slice_owners`."""
    torch._check(len(lora_b) >= 1 and len(slice_a) == len(lora_b) == len(slice_start) == len(scales),
                 lambda: f"{name}: lora_b, slice_a, slice_start, scales need one entry per slice, got "
                         f"{len(lora_b)}, {len(slice_a)}, {len(slice_start)}, {len(scales)}")
    ad = lora_a[0].dtype
    for g, a in enumerate(lora_a):
        torch._check(a.dim() == 2 and a.shape[1] == H and a.shape[0] >= 1 and a.dtype == ad and a.device == device,
                     lambda: f"{name}: lora_a[{g}] must be [r, H={H}] in {ad} on {device}, got "
                             f"{tuple(a.shape)} {a.dtype} on {a.device}")
    n_out = sum(widths)
    for i, b in enumerate(lora_b):
        g = slice_a[i]
        torch._check(0 <= g < len(lora_a), lambda: f"{name}: slice_a[{i}]={g} names no lora_a tensor")
        torch._check(b.dim() == 2 and b.shape[1] == lora_a[g].shape[0],
                     lambda: f"{name}: lora_b[{i}] must be [n, r={lora_a[g].shape[0]}], got {tuple(b.shape)}")
        torch._check(b.dtype == ad and b.device == device,
                     lambda: f"{name}: lora_b[{i}] is {b.dtype} on {b.device}, adapters {ad} on {device}")
        torch._check(0 <= slice_start[i] and slice_start[i] + b.shape[0] <= n_out,
                     lambda: f"{name}: slice {i} [{slice_start[i]}, {slice_start[i] + b.shape[0]}) outside "
                             f"the output's {n_out} columns")
    return slice_owners(widths, slice_start, [b.shape[0] for b in lora_b], name)


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


def group_columns(ranks: Sequence[int]) -> list[int]:
    """First column of each A group in ``s`` (the groups side by side, in order)."""
    offs, total = [], 0
    for r in ranks:
        offs.append(total)
        total += r
    return offs


def _kernels_hold(ranks) -> bool:
    """The Triton kernels hold a whole rank in registers (a larger one runs the torch implementation, as do
    layouts with more projections or slices than a launch takes: :func:`~.kernels.lora_train.fits`)."""
    return max(ranks) <= KERNEL_MAX_RANK


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(outs, s)``: the projections with their LoRA (module docstring); every device, plain torch."""
    owners = check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
    with exact_dtypes(x):
        s = _shrink_reference(xs, lora_a)
        return forward_reference(x, weights, s, lora_b, slice_a, owners, scales,
                                 group_columns([a.shape[0] for a in lora_a])), s


def _shrink_reference(xs, lora_a) -> torch.Tensor:
    """``s[:, group g] = xs[g].to(adapters) @ A_g^T``, each group's GEMM writing its columns of ``s``."""
    ad = lora_a[0].dtype
    offs = group_columns([a.shape[0] for a in lora_a])
    s = torch.empty((xs[0].shape[0], offs[-1] + lora_a[-1].shape[0]), dtype=ad, device=xs[0].device)
    for xg, a, off in zip(xs, lora_a, offs):
        torch.mm(xg.to(ad), a.t(), out=s[:, off:off + a.shape[0]])
    return s


def forward_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor,
                      lora_b: Sequence[torch.Tensor], slice_a: Sequence[int], owners: Sequence[tuple[int, int]],
                      scales: Sequence[float], offs: Sequence[int]) -> list[torch.Tensor]:
    """The op's outputs by torch ops: a projection with slices as its base GEMM's fp32 product (x's dtype
    where wider) plus each slice's ``scale * s_g @ B^T`` in that dtype, rounded to x's dtype once."""
    outs = _base_products(x, weights, {p for p, _ in owners})
    for i, b in enumerate(lora_b):
        (p, start), g = owners[i], slice_a[i]
        acc = outs[p].dtype
        outs[p][:, start:start + b.shape[0]].addmm_(s[:, offs[g]:offs[g] + b.shape[1]].to(acc), b.t().to(acc),
                                                    alpha=scales[i])
    return [o.to(x.dtype) for o in outs]


def _base_products(x: torch.Tensor, weights: Sequence[torch.Tensor], lora: set) -> list[torch.Tensor]:
    """Each ``x @ W_p^T``: unrounded where a LoRA slice lies (projections ``lora``), in fp32 (x's dtype where
    wider: on CUDA the library GEMM's fp32 output, ``out_dtype``; on the CPU, which has no 16-bit GEMM with an
    fp32 output, the product of x and W in fp32), else in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)

    def unrounded(w):
        if acc == x.dtype:
            return x @ w.t()
        if x.device.type == "cuda":
            return torch.mm(x, w.t(), out_dtype=acc)
        return x.to(acc) @ w.to(acc).t()
    return [unrounded(w) if p in lora else x @ w.t() for p, w in enumerate(weights)]


def _distinct(xs: Sequence[torch.Tensor], x: Optional[torch.Tensor]) -> tuple[list[int], list[int], int]:
    """The distinct LoRA inputs: their first positions in ``xs``, each group's index among them, and which
    one is ``x`` itself (-1: none). Groups reading one tensor (q/k/v and z without dropout) share it."""
    firsts: list[int] = []
    xs_of = []
    for g, xg in enumerate(xs):
        h = next((k for k, f in enumerate(firsts) if xs[f] is xg), None)
        if h is None:
            firsts.append(g)
            h = len(firsts) - 1
        xs_of.append(h)
    x_input = next((h for h, f in enumerate(firsts) if xs[f] is x), -1)
    return firsts, xs_of, x_input


@dataclasses.dataclass(frozen=True)
class _XSide:
    """How the kernels treat x itself, every A group's LoRA input, in 16 bits under wider adapters (cast
    in registers): the groups as one slice of rank sum(r_g) over B = cat(A_g)^T when that rank fits a kernel
    tile (one read of x per kernel), else one slice per group."""
    groups: tuple[int, ...]
    slices: object            # kernels.lora_train.Slices over x's H columns
    cat: bool                 # the slices' B: cat(A of groups)^T (one slice) or each A^T


@dataclasses.dataclass(frozen=True)
class _TrainPlan:
    """What one call signature of the forward or the backward op runs: the checked slice owners, the
    layout of s, and the kernels' launches planned for it (no tensors)."""
    kernels: bool
    owners: tuple[tuple[int, int], ...]
    offs: tuple[int, ...]                # each group's first column in s
    R: int                               # columns of s
    out_of: tuple[int, ...] = ()         # each slice's projection
    db_rows: tuple[int, ...] = ()        # each slice's first row in dB (all slices' dB stacked)
    x_side: Optional[_XSide] = None      # x itself read by the kernels (16-bit x, wider adapters)
    expand: object = None                # forward: ExpandAdd of the slices (into the GEMMs' fp32 products)
    gemm: object = None                  # forward at large T: GemmExpand (base GEMMs + LoRA), no ExpandAdd
    shrink: object = None                # forward: LoraDs of x's side
    ds: object = None                    # backward, the slices: LoraDs (dS where no dB is asked for),
    dsdb: object = None                  # LoraDsDb (dS and dB from one read of dy)
    da: object = None                    # x's side: LoraDb (dA; None where gemm_dx runs it),
    dx: object = None                    # ExpandAdd (x's LoRA gradient)
    gemm_dx: object = None               # backward at large T: GemmDx (dx's GEMMs + x's LoRA part), no dx


def _plan(T: int, data_dtype: torch.dtype, x_itself: Optional[torch.Tensor], lora_a, lora_b, slice_a, scales, owners,
          backward: bool, gemm_of: Optional[tuple] = None, need_da: bool = False) -> _TrainPlan:
    """``data_dtype``: the outputs' (x's); ``x_itself``: x, when it is every group's LoRA input (else None);
    ``gemm_of``: the forward's ``(x, weights)``, for :class:`~.kernels.gemm_lora_train.GemmExpand` where it
    runs (:func:`~.kernels.gemm_lora_train.fusable`); the backward's ``(dys, weights)`` when it computes dx,
    for :class:`~.kernels.gemm_lora_train.GemmDx` (:func:`~.kernels.gemm_lora_train.dx_fusable`), which also
    computes dA where ``need_da`` and its schedule has room (then ``da`` is None)."""
    ranks = [a.shape[0] for a in lora_a]
    offs = tuple(group_columns(ranks))
    R = offs[-1] + ranks[-1]
    from fx_passes.ops.kernels.lora_train import ExpandAdd, LoraDb, LoraDs, LoraDsDb, Slices, fits
    from fx_passes.ops.tuning import device_info

    # (a launch takes each slice's B and its projection's tensor as pointer arguments, up to a fixed count)
    if not (_kernels_hold(ranks) and fits(len({p for p, _ in owners}), max(len(lora_b), len(lora_a)))):
        return _TrainPlan(False, tuple(owners), offs, R)

    ad = lora_a[0].dtype
    slices = Slices(tuple(b.shape[0] for b in lora_b), tuple(c for _, c in owners),
                    tuple(offs[g] for g in slice_a), tuple(ranks[g] for g in slice_a), tuple(float(c) for c in scales))
    side = None
    if x_itself is not None and x_itself.dtype != ad and x_itself.stride(-1) == 1:
        groups, H = tuple(range(len(lora_a))), x_itself.shape[1]
        if sum(ranks) <= KERNEL_MAX_RANK:
            side = _XSide(groups, Slices((H,), (0,), (0,), (R,), (1.0,)), True)
        else:
            side = _XSide(groups, Slices((H,) * len(groups), (0,) * len(groups), offs, tuple(ranks),
                                         (1.0,) * len(groups)), False)
    common = dict(kernels=True, owners=tuple(owners), offs=offs, R=R, out_of=tuple(p for p, _ in owners),
                  x_side=side)
    sms = device_info(lora_a[0].device).sms
    if not backward:
        shrink = None if side is None else LoraDs(side.slices, T, R, x_itself.dtype, ad, sms=sms)
        from fx_passes.ops.kernels.gemm_lora_train import GemmExpand, fusable

        if gemm_of is not None and fusable(*gemm_of, len(lora_b)):
            x, weights = gemm_of
            return _TrainPlan(**common, shrink=shrink, gemm=GemmExpand(
                slices, common["out_of"], [w.shape[0] for w in weights], T, x.shape[1], x.dtype, ad, x.device))
        return _TrainPlan(**common, expand=ExpandAdd(slices, T, ad, tensor_of=common["out_of"]), shrink=shrink)
    gemm_dx = dx = None
    if side is not None:
        from fx_passes.ops.kernels.gemm_lora_train import GemmDx, dx_fusable

        if gemm_of is not None and dx_fusable(*gemm_of, len(lora_a)):
            gemm_dx = GemmDx(ranks, [w.shape[0] for w in gemm_of[1]], T, x_itself.shape[1], data_dtype, ad,
                             x_itself.device, with_da=need_da)
        else:
            dx = ExpandAdd(side.slices, T, ad)
    return _TrainPlan(**common, db_rows=tuple(group_columns(slices.width)),
                      ds=LoraDs(slices, T, R, data_dtype, ad, sms=sms),
                      dsdb=LoraDsDb(slices, T, R, data_dtype, ad, sms),
                      da=None if side is None or gemm_dx is not None and gemm_dx.da_schedule is not None
                      else LoraDb(side.slices, T, R, x_itself.dtype, ad, sms, transposed=True),
                      dx=dx, gemm_dx=gemm_dx)


def _x_side_bs(side: _XSide, lora_a) -> list[torch.Tensor]:
    """The B of each x-side slice: A^T as a view (the kernels take both strides), one cat for one slice."""
    if not side.cat:
        return [lora_a[g].t() for g in side.groups]
    a = lora_a[side.groups[0]] if len(side.groups) == 1 else torch.cat([lora_a[g] for g in side.groups])
    return [a.t()]


_FORWARD_PLANS = LruMemo()
_BACKWARD_PLANS = LruMemo()


def _signature(*parts) -> tuple:
    """A call signature: tensors by :func:`tensor_meta`, lists of them, anything else as it is, and what
    else the plans depend on: the Triton interpreter, TF32 for fp32 dots."""
    key = [interpreting(), torch.backends.cuda.matmul.allow_tf32]
    for p in parts:
        if isinstance(p, torch.Tensor):
            key.append(tensor_meta(p))
        elif isinstance(p, (list, tuple)) and p and isinstance(p[0], torch.Tensor):
            key.append(tuple(tensor_meta(t) for t in p))
        else:
            key.append(tuple(p) if isinstance(p, list) else p)
    return tuple(key)


@cuda_impl("qkvz_lora_train")
def _train_cuda(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales, traced: bool = False):
    firsts, xs_of, x_input = _distinct(xs, x)
    every_reads_x = x_input == 0 and len(firsts) == 1

    def make() -> _TrainPlan:
        owners = check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
        return _plan(x.shape[0], x.dtype, x if every_reads_x else None, lora_a, lora_b, slice_a, scales, owners,
                     False, (x, weights))

    plan = _FORWARD_PLANS.get(_signature(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales,
                                         tuple(xs_of), x_input), make)
    with on_device(x, traced), exact_dtypes(x):
        if not plan.kernels:
            s = _shrink_reference(xs, lora_a)
            return forward_reference(x, weights, s, lora_b, slice_a, plan.owners, scales, plan.offs), s
        if plan.shrink is None:
            s = _shrink_reference(xs, lora_a)
        else:   # one read of x, cast in registers, where the library GEMM would need an fp32 copy of [T, H]
            s = plan.shrink([x] * len(plan.x_side.slices), _x_side_bs(plan.x_side, lora_a), traced=traced)
            s = s if s.dtype == lora_a[0].dtype else s.to(lora_a[0].dtype)
        if plan.gemm is not None:   # the GEMMs with the LoRA in their K loop or epilogue: [T, N] written once
            return plan.gemm(x, weights, s, lora_b, traced=traced), s
        # the library GEMMs' fp32 products where a slice lies, the LoRA added into them, rounded once
        outs = _base_products(x, weights, set(plan.out_of))
        plan.expand([outs[p] for p in plan.out_of], s, lora_b, traced=traced)
    return [o.to(x.dtype) for o in outs], s


@qkvz_lora_train.register_fake
def _fake(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales):
    check_train_args(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales)
    return ([x.new_empty((x.shape[0], w.shape[0])) for w in weights],
            lora_a[0].new_empty((x.shape[0], sum(a.shape[0] for a in lora_a))))


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
def _check_backward_args(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales, xs_of, x_input,
                         need_dx):
    name = "qkvz_lora_train_backward"
    torch._check(len(dys) >= 1 and all(d.dim() == 2 and d.shape[0] == dys[0].shape[0] for d in dys),
                 lambda: f"{name}: dys must be 2-D [T, n_p] tensors, got {[tuple(d.shape) for d in dys]}")
    T, H, dev = dys[0].shape[0], lora_a[0].shape[-1], dys[0].device
    torch._check(len(xs_of) == len(lora_a) and all(0 <= h < len(xs) for h in xs_of) and -1 <= x_input < len(xs),
                 lambda: f"{name}: xs_of {list(xs_of)} / x_input {x_input} do not index the {len(xs)} xs")
    for h, xh in enumerate(xs):
        torch._check(xh.dim() == 2 and xh.shape[0] == T and xh.shape[1] == H and xh.device == dev,
                     lambda: f"{name}: xs[{h}] must be [T={T}, H={H}] on {dev}, got {tuple(xh.shape)} on {xh.device}")
    torch._check(not need_dx or (len(weights) == len(dys) and all(
        w.dim() == 2 and w.shape == (d.shape[1], H) and w.dtype == d.dtype for w, d in zip(weights, dys))),
        lambda: f"{name}: x's gradient needs one [n_p, H={H}] weight per gradient, in its dtype")
    owners = _check_lora(name, [d.shape[1] for d in dys], H, dev, lora_a, lora_b, slice_a, slice_start, scales)
    R = sum(a.shape[0] for a in lora_a)
    torch._check(s.shape == (T, R) and s.dtype == lora_a[0].dtype,
                 lambda: f"{name}: s must be [T={T}, R={R}] in {lora_a[0].dtype}, got {tuple(s.shape)} {s.dtype}")
    torch._check(grad_s is None or grad_s.shape == s.shape,
                 lambda: f"{name}: grad_s must be shaped like s {tuple(s.shape)}")
    return owners


@torch.library.custom_op(f"{LIB_NAMESPACE}::qkvz_lora_train_backward", mutates_args=())
def qkvz_lora_train_backward(
    dys: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    s: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    slice_a: Sequence[int],
    slice_start: Sequence[int],
    scales: Sequence[float],
    xs_of: Sequence[int],
    x_input: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of :func:`qkvz_lora_train` given its outputs' gradients ``dys`` (and ``grad_s``, s's):
    ``(dx, dS, dA, dB)``. ``xs``: the distinct LoRA inputs, group g reading ``xs[xs_of[g]]``, ``xs[x_input]``
    being x itself (-1: none), whose LoRA gradient is added into dx. ``dx = sum_p dys[p] @ weights[p] (+ x's
    LoRA part)`` in x's dtype if ``need_dx`` (``weights`` may be empty otherwise; else dx is an empty tensor),
    ``dS`` [T, R] in the adapters' dtype (groups side by side, as in s: the other LoRA inputs' gradients
    ``dS_g @ A_g`` are the caller's, one input at a time), ``dA`` per group if ``need_da``, ``dB`` per slice if
    ``need_db`` (else empty lists)."""
    owners = _check_backward_args(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales, xs_of,
                                  x_input, need_dx)
    with exact_dtypes(s):
        return _backward_reference(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, scales, xs_of, x_input,
                                   need_dx, need_da, need_db, owners)


def lora_grads_reference(dys: Sequence[torch.Tensor], s: torch.Tensor, lora_b: Sequence[torch.Tensor],
                         slice_a: Sequence[int], owners: Sequence[tuple[int, int]], scales: Sequence[float],
                         ranks: Sequence[int], need_db: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(dS, dB)`` in torch ops, the adapters' dtype: ``dS`` [T, R] (group g in its columns of s),
    ``dB_i = scales[i] * dy_i^T @ s[:, group of i]``; dy read per slice in the adapters' dtype."""
    ad = lora_b[0].dtype
    offs = group_columns(ranks)
    d_s = torch.zeros(s.shape, dtype=ad, device=s.device)
    d_b = []
    for i, b in enumerate(lora_b):
        p, first = owners[i]
        g = slice_a[i]
        run = dys[p][:, first:first + b.shape[0]].to(ad)
        cols = slice(offs[g], offs[g] + ranks[g])
        d_s[:, cols] += torch.mm(run, b) * scales[i]   # d(s @ B^T) = scale * dy: folded into the products
        if need_db:
            d_b.append(torch.mm(run.t(), s[:, cols]) * scales[i])
    return d_s, d_b


def _sum_of_products(lhs: Sequence[torch.Tensor], rhs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k lhs[k] @ rhs[k]`` (dx over the projections' weights, a LoRA input's gradient over its A
    groups): the GEMMs after the first accumulate into its result in place (library GEMM, beta = 1), where
    out-of-place ``addmm``s or ``sum()`` copy the [T, H] sum before each."""
    total = lhs[0] @ rhs[0]
    for a, b in zip(lhs[1:], rhs[1:]):
        total.addmm_(a, b)
    return total


def _no_dx(dys) -> torch.Tensor:
    """dx where it is not asked for."""
    return dys[0].new_empty((0,))


def _backward_reference(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, scales, xs_of, x_input, need_dx,
                        need_da, need_db, owners):
    ad = lora_a[0].dtype
    ranks = [a.shape[0] for a in lora_a]
    offs = group_columns(ranks)
    d_s, d_b = lora_grads_reference(dys, s, lora_b, slice_a, owners, scales, ranks, need_db)
    if grad_s is not None:
        d_s = d_s + grad_s.to(ad)
    d_x = _sum_of_products(dys, weights) if need_dx else _no_dx(dys)
    d_x, d_a = _input_grads(xs, xs_of, x_input, d_s, lora_a, offs, d_x, need_dx, need_da)
    return d_x, d_s, d_a, d_b


def _input_grads(xs, xs_of, x_input, d_s, lora_a, offs, d_x, need_dx, need_da):
    """dA per group and x's LoRA gradient by library GEMMs, one distinct input at a time (dropout outputs,
    inputs in the adapters' dtype, a strided x): ``(dx, dA)``, x's LoRA part added into dx (its base part
    rounded by its GEMMs, the sum rounded once)."""
    ad = lora_a[0].dtype
    d_a: list = [None] * len(lora_a)
    for h, xh in enumerate(xs):
        groups = [g for g in range(len(lora_a)) if xs_of[g] == h]
        dsg = [d_s[:, offs[g]:offs[g] + lora_a[g].shape[0]] for g in groups]
        if need_da:
            for g, d in zip(groups, dsg):
                d_a[g] = d.t() @ xh.to(ad)
        if h == x_input and need_dx:
            lora_dx = _sum_of_products(dsg, [lora_a[g] for g in groups])
            acc = torch.promote_types(d_x.dtype, ad)
            d_x = (d_x.to(acc) + lora_dx.to(acc)).to(d_x.dtype)
    return d_x, (d_a if need_da else [])


no_autograd_on_cuda("qkvz_lora_train_backward")


@qkvz_lora_train_backward.register_fake
def _backward_fake(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales, xs_of, x_input, need_dx,
                   need_da, need_db):
    _check_backward_args(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales, xs_of, x_input,
                         need_dx)
    d_x = dys[0].new_empty((dys[0].shape[0], lora_a[0].shape[1])) if need_dx else _no_dx(dys)
    return (d_x, s.new_empty(s.shape), [a.new_empty(a.shape) for a in lora_a] if need_da else [],
            [b.new_empty(b.shape) for b in lora_b] if need_db else [])


@cuda_impl("qkvz_lora_train_backward")
def _backward_cuda(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales, xs_of, x_input, need_dx,
                   need_da, need_db, traced: bool = False):
    every_reads_x = x_input == 0 and len(xs) == 1

    def make() -> _TrainPlan:
        owners = _check_backward_args(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales,
                                      xs_of, x_input, need_dx)
        return _plan(s.shape[0], dys[0].dtype, xs[0] if every_reads_x else None, lora_a, lora_b, slice_a, scales,
                     owners, True, (dys, weights) if need_dx else None, need_da)

    plan = _BACKWARD_PLANS.get(_signature(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, slice_start, scales,
                                          xs_of, x_input, need_dx, need_da, need_db), make)
    with exact_dtypes(s):
        if not plan.kernels:
            return _backward_reference(dys, xs, weights, lora_a, lora_b, s, grad_s, slice_a, scales, xs_of, x_input,
                                       need_dx, need_da, need_db, plan.owners)
        with on_device(s, traced):
            return _backward_kernels(plan, dys, xs, weights, lora_a, lora_b, s, grad_s, xs_of, x_input, need_dx,
                                     need_da, need_db, traced)


def _backward_kernels(plan, dys, xs, weights, lora_a, lora_b, s, grad_s, xs_of, x_input, need_dx, need_da, need_db,
                      traced):
    ad = lora_a[0].dtype
    ranks = [a.shape[0] for a in lora_a]
    s = s if s.stride(-1) == 1 else s.contiguous()   # (the kernels read its rows with unit stride)
    dys = [d if d.stride(-1) == 1 else d.contiguous() for d in dys]   # e.g. the expanded gradient of a sum
    fused_dx = need_dx and plan.gemm_dx is not None   # (x's whole gradient after dS, by one GEMM)
    d_x = _sum_of_products(dys, weights) if need_dx and not fused_dx else _no_dx(dys)
    dy_of = [dys[p] for p in plan.out_of]
    d_b = []
    if need_db:   # one read of dy for both
        d_s, d_b_all = plan.dsdb(dy_of, lora_b, s, traced=traced)   # fp32 [T, R], every slice's dB stacked
        d_b = _pieces(d_b_all, [(slice(row, row + b.shape[0]), slice(0, b.shape[1])) for row, b in
                                zip(plan.db_rows, lora_b)], ad, traced)
    else:
        d_s = plan.ds(dy_of, lora_b, traced=traced)
    if ad != torch.float32:
        d_s = d_s.to(ad)   # (the torch implementation's dS, in the adapters' dtype)
    if grad_s is not None:
        d_s = d_s + grad_s.to(ad)
    side = plan.x_side
    d_a: list = [None] * len(lora_a)
    if side is not None:   # x itself, every group: x read in its dtype by the kernels
        x = xs[0]
        folded = plan.da is None   # dA by the dx GEMM's lighter programs (gemm_lora_train.dx_schedule)
        if folded:
            d_x, d_a_all = plan.gemm_dx.with_da(dys, weights, d_s, lora_a, x, traced=traced)
        if need_da:
            if not folded:
                d_a_all = plan.da([x] * len(side.slices), d_s, traced=traced)   # fp32 [R, H], every group's dA
            d_a = _pieces(d_a_all, [(slice(off, off + r),) for off, r in zip(plan.offs, ranks)], ad, traced)
        if fused_dx:
            if not folded:
                d_x = plan.gemm_dx(dys, weights, d_s, lora_a, traced=traced)
        elif need_dx:
            bs = _x_side_bs(side, lora_a)
            if side.cat:
                new = torch.empty_like(d_x)
                plan.dx([new], d_s, bs, srcs=[d_x], traced=traced)
            else:   # one slice per group over the same columns: in place, one after another
                new = d_x.clone()
                plan.dx([new] * len(bs), d_s, bs, traced=traced)
            d_x = new
        return d_x, d_s, (d_a if need_da else []), d_b
    d_x, d_a = _input_grads(xs, xs_of, x_input, d_s, lora_a, plan.offs, d_x, need_dx, need_da)
    return d_x, d_s, d_a, d_b


def _pieces(total: torch.Tensor, pieces: Sequence[tuple], dtype: torch.dtype, traced: bool) -> list[torch.Tensor]:
    """``total[piece]`` per piece (a slice's dB, a group's dA, of a kernel's fp32 result for all of them), in
    ``dtype``. Traced for Inductor: views of ``total`` where the dtype is kept; run as the op, copies (an op's
    outputs may not alias one another)."""
    return [total[piece].to(dtype, copy=not traced) for piece in pieces]


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales = inputs
    _, s = output
    # s's gradient (s feeds nothing but this op's backward, in the rewrite) arrives as None rather than a
    # zero-filled [T, R] tensor: the traced backward then has no fill kernel and no add into dS
    ctx.set_materialize_grads(False)
    ctx.slice_a, ctx.slice_start, ctx.scales = list(slice_a), list(slice_start), list(scales)
    # A groups reading one input (no dropout: q/k/v and z read x itself) share it, and its dA / dx work
    firsts, ctx.xs_of, ctx.x_input = _distinct(xs, x)
    ctx.firsts = firsts
    ctx.n = (len(firsts), len(weights), len(lora_a), len(lora_b))
    # x itself is needed only for a trainable base weight's gradient (frozen: the usual case)
    keep_x = x if any(w.requires_grad for w in weights) else None
    ctx.save_for_backward(keep_x, s, *[xs[f] for f in firsts], *weights, *lora_a, *lora_b)


def _unpack(ctx):
    n_xs, n_w, n_a, n_b = ctx.n
    x, s, *saved = ctx.saved_tensors
    parts = []
    for count in (n_xs, n_w, n_a, n_b):
        parts.append(saved[:count])
        saved = saved[count:]
    return (x, s, *parts)


def _backward(ctx, grad_outs: Optional[list], grad_s: Optional[torch.Tensor]):
    x, s, xs, weights, lora_a, lora_b = _unpack(ctx)
    with exact_dtypes(s):
        return _gradients(ctx, grad_outs, grad_s, x, s, xs, weights, lora_a, lora_b)


def _gradients(ctx, grad_outs, grad_s, x, s, xs, weights, lora_a, lora_b):
    need = ctx.needs_input_grad   # x, xs, weights, lora_a, lora_b (lists: one flag per tensor), ...
    n_groups = len(lora_a)
    need_x = bool(need[0])
    need_da, need_db = any(need[3]), any(need[4])
    # an input other than x that needs its own gradient (x itself: folded into dx)
    need_dxs = any(need[1][g] for g in range(n_groups) if ctx.xs_of[g] != ctx.x_input)
    d_w: list = [None] * len(weights)
    T = s.shape[0]
    dys = [g if g is not None else w.new_zeros((T, w.shape[0])) for g, w in
           zip(grad_outs if grad_outs is not None else [None] * len(weights), weights)]
    if any(need[2]):   # frozen base weights (the usual case) skip this
        d_w = [dy.t() @ x if w.requires_grad else None for dy, w in zip(dys, weights)]
    d_xs: list = [None] * n_groups
    if not (need_x or need_dxs or need_da or need_db):
        return None, d_xs, d_w, [None] * n_groups, [None] * len(lora_b), None, None, None
    d_x, d_s, d_a, d_b = torch.ops.fx_passes.qkvz_lora_train_backward(
        dys, list(xs), list(weights) if need_x else [], list(lora_a), list(lora_b), s, grad_s, ctx.slice_a,
        ctx.slice_start, ctx.scales, ctx.xs_of, ctx.x_input, need_x, need_da, need_db)
    if need_dxs:   # (dropout outputs) in the traced graph, one input at a time: Inductor frees each [T, H]
        offs = group_columns([a.shape[0] for a in lora_a])   # gradient once its dropout's backward read it
        for h, first in enumerate(ctx.firsts):   # autograd sums the gradients of one input passed twice:
            if h != ctx.x_input and need[1][first]:   # it gets the whole sum once
                groups = [g for g in range(n_groups) if ctx.xs_of[g] == h]
                d_xs[first] = _sum_of_products([d_s[:, offs[g]:offs[g] + lora_a[g].shape[0]] for g in groups],
                                               [lora_a[g] for g in groups]).to(xs[h].dtype)
    return (d_x if need_x else None, d_xs, d_w, list(d_a) if need_da else [None] * n_groups,
            list(d_b) if need_db else [None] * len(lora_b), None, None, None)


qkvz_lora_train.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Inductor: the CUDA bodies traced into the graph
# --------------------------------------------------------------------------------------------
def _keeps_op(args, kwargs) -> bool:
    """Whether a traced call stays one opaque op (the CUDA body is not inlined): tensors off CUDA (the
    CPU implementation), symbolic shapes or strides (the plans are made for concrete shapes), the Triton
    interpreter, and ``torch.export`` (which keeps custom ops whole, as it does ``triton_op``s)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    if custom_triton_ops_decomposition_disabled() or interpreting():
        return True
    for t in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and (t.device.type != "cuda" or not all(
                isinstance(d, int) for d in (*t.shape, *t.stride()))):
            return True
    return False


def _inline_for_inductor(op, body) -> None:
    """Registers how AOTAutograd's functionalization traces a CUDA call of ``op``: through ``body`` (the CUDA
    implementation) with ``traced=True``, whose kernels then launch through ``torch.library.wrap_triton``.
    The traced graph holds the library GEMMs, the Triton kernels and the casts as Inductor's own
    nodes, so the compiled code launches each of them directly and the per-signature planning runs once,
    when the graph is traced; as an opaque op, each call runs the body in Python (~0.2 ms forward, ~0.4 ms
    backward of host time per layer-step on an H200 machine's host, more than a 35B-A3B layer's GPU work at
    T 2048). What runs is the same either way: the same kernels, launches and GEMMs (``triton_op`` does the
    same for ops written with it; ours keep one schema for the CPU implementation and the kernels)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def rule(mode, op_overload, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented   # another tensor subclass: its own rules first
        if _keeps_op(args, kwargs):
            return mode.__torch_dispatch__(op_overload, types, args, kwargs)
        with mode:
            return body(*args, **kwargs, traced=True)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


_inline_for_inductor(qkvz_lora_train, _train_cuda)
_inline_for_inductor(qkvz_lora_train_backward, _backward_cuda)
