"""vLLM's GDN projection LoRA (punica / Triton ``vllm::lora_shrink`` + ``vllm::lora_expand``).

vLLM applies a LoRA'd linear as: base GEMM, then ``lora_shrink`` (x @ A_i.T for every slice, into
an fp32 buffer) and ``lora_expand`` (buffer_i @ B_i.T added in place into column block i of the
GEMM output). Post-grad (auto-functionalization v1, which vLLM forces), per LoRA'd linear::

    buf = empty([n_slices, T, r], f32)
    s   = auto_functionalized(vllm.lora_shrink, inputs=x, lora_a_weights=[a_0..], output_tensor=buf,
                              token_lora_mapping=slice(map, 0, 0, T), ..., no_lora_flag_cpu=flag,
                              scaling=1.0)[1]
    y   = mm(x, permute(W, [1, 0]))
    y'  = auto_functionalized(vllm.lora_expand, inputs=s, lora_b_weights=[b_0..], output_tensor=y,
                              ..., offset_start=0, add_inputs=True)[1]

(``a_i`` ``(max_loras, 1, r, H)``, ``b_i`` ``(max_loras, 1, n_i, r)``: every slice is its own graph
input; ``T`` is a SymInt placeholder when vLLM marks the token dim dynamic.)

Two layouts of a Qwen3.5 GatedDeltaNet layer, both rewritten:

**Split** (vLLM 0.19-0.20, PR #36976): ``in_proj_qkv`` [k, k, v] (3 slices) and ``in_proj_z`` [v]
(1 slice) -- the block above twice, both reading x::

    mm_qkv + shrink/expand(3 slices)        mm_z + shrink/expand(1 slice)
        ->  y' = fx_passes.qkvz_gemm_lora(x, [W_qkv, W_z], <LoRA args>)   # one GEMM + the 4-slice LoRA
            qkv = slice(y', 1, 0, 2k + v);  z = slice(y', 1, 2k + v, 2k + 2v)

**Fused** (vLLM >= 0.21, PR #37912): one ``in_proj_qkvz`` = MergedColumnParallelLinear
[k, k, v, v] with a 4-slice LoRA (``expand_packed_lora`` copies A_qkv into slices 0..2) -- the block
above once. The GEMM is already one; only the LoRA ops change::

    mm_qkvz + shrink/expand(4 slices)
        ->  y' = fx_passes.qkvz_gemm_lora(x, [W_qkvz], <LoRA args>)     # the same one GEMM

**The gates** (``QkvzFusionConfig.fold_ba``): vLLM's ``in_proj_ba`` = MergedColumnParallelLinear [nv, nv]
reads the same x; with LoRA on it is wrapped like the others (a 2-slice shrink / expand, always present
when LoRA is enabled). Both forms fold it into the same op as one more weight and, with its LoRA, two
more slices::

    ->  y' = fx_passes.qkvz_gemm_lora(x, [W_qkv, W_z, W_ba] | [W_qkvz, W_ba], <LoRA args, 6 slices>)
        qkv(z) = slice(y', ...);  ba = slice(y', 1, 2k + 2v, 2k + 2v + 2 nv)

An ``in_proj_ba`` that reads another tensor, uses another token mapping / flag / scaling, or has another
LoRA form stays as it was (the reason in ``LayerMatch.ba_reason``); with ``gemm_lora_op=False`` the fused
form keeps vLLM's own qkvz GEMM, so ``in_proj_ba`` is not folded there either.

With ``QkvzFusionConfig(gemm_lora_op=False)`` both forms keep the GEMM as its own op (split:
``fx_passes.qkvz_gemm``; fused: vLLM's ``mm``) followed by
``y' = auto_functionalized(fx_passes.qkvz_lora_, out=y, x=x, <LoRA args>)[1]``.
On CUDA at decode ``qkvz_gemm_lora`` runs the LoRA expand in the GEMM's epilogue (see
:mod:`fx_passes.ops.qkvz_gemm_lora`).

LoRA args, both forms::

    lora_a = [select(a_g, 1, 0) ...]      # (max_loras, r, H) views, one per distinct A node
    lora_b = [select(b_i, 1, 0) ...]      # (max_loras, n_i, r) views, one per slice
    slice_a = group of each slice;  slice_start = [0, k, 2k, 2k + v]
    token_lora_ids = where(select(no_lora_flag_cpu, 0, 0), -1, slice(map, 0, 0, T));  scale = scaling

A groups: one per distinct ``lora_a_weights`` node (vLLM passes one stacked tensor per slice even
when loading copied the same A into them, and warm-up dummy LoRAs differ per slice, so q, k, v
share a group only when the graph passes the very same node).

``no_lora_flag_cpu`` is honoured: vLLM does NOT refresh ``token_lora_mapping`` when no token has
a LoRA (it only sets the flag), so the ids are masked to ``-1`` when the flag is set (our op then
adds nothing; the early exit itself, a host-side skip, is lost).
Not used: ``num_active_loras`` / ``lora_ids`` / ``token_indices_sorted_by_lora_ids`` /
``num_tokens_per_lora`` / ``lora_token_start_loc`` (scheduling hints of vLLM's kernels; our op
reads the per-token ids directly).

Slice sizes must be static: ``fx_passes.qkvz_lora_`` takes ``slice_start`` as ``int[]``. Under
``torch.compile(dynamic=True)`` the stacked LoRA weights (plain tensors, not parameters) get
symbolic sizes; turning those into ints after Dynamo has frozen its guards would be unsound, so
such a layer is reported as not rewritten. vLLM marks only the token dim dynamic, which is fine.
"""
from __future__ import annotations

import collections
import logging
import operator
import re
from typing import Optional, Union

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch.fx import Graph, Node

from fx_passes.fusion.fx_utils import QKVZ_GEMM_LORA_OP, QKVZ_GEMM_OP, QKVZ_LORA_OP, SLICE_NAMES, emit, erase_dead
from fx_passes.fusion.matcher import (
    FLOAT_DTYPES, LinearLeaf, NoMatch, check_users_inside, fake_value, match_linear, module_path,
)
from fx_passes.ops.qkvz_gemm import weights_are_packed
from fx_passes.report import LayerMatch


logger = logging.getLogger("fx_passes")

aten = torch.ops.aten
SHRINK_NAME = "vllm.lora_shrink.default"
EXPAND_NAME = "vllm.lora_expand.default"


def _af_op_name(node: Node) -> Optional[str]:
    if node.op == "call_function" and node.target is auto_functionalized and node.args:
        return str(node.args[0])
    return None


def _single_getitem(node: Node, index: int) -> Node:
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != index:
        raise NoMatch(node, f"expected exactly one user getitem(., {index}), found "
                            f"{[u.name for u in users]}")
    return users[0]


def _strip_slice(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and node.target is aten.slice.Tensor:
        node = node.args[0]
    return node


def _static_int(value, node: Node, what: str) -> int:
    """``value`` as an int when it is one without a new guard, else NoMatch (see module docstring)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if not is_concrete_int(value):
        raise NoMatch(node, f"{what} is symbolic ({value}): compiled with dynamic=True? "
                            f"(qkvz_lora_ needs static slice sizes; mark only the token dim dynamic)")
    return int(value)


class _VllmProjection:
    """One LoRA'd linear: base mm + shrink + expand, all checked."""

    def __init__(self, expand: Node):
        self.expand = expand
        kw = expand.kwargs
        self.out = _single_getitem(expand, 1)
        if not kw.get("add_inputs", False) or kw.get("offset_start", 0) != 0:
            raise NoMatch(expand, "lora_expand without add_inputs=True / offset_start=0")
        self.mm = kw["output_tensor"]
        self.base = match_linear(self.mm)
        if list(self.mm.users) != [expand]:
            raise NoMatch(self.mm, f"base GEMM used outside the pattern by "
                                   f"{[u.name for u in self.mm.users if u is not expand]}")
        shrink_out = kw["inputs"]
        if not (shrink_out.target is operator.getitem and _af_op_name(shrink_out.args[0]) == SHRINK_NAME):
            raise NoMatch(expand, "lora_expand input is not a lora_shrink result")
        self.shrink = shrink_out.args[0]
        _single_getitem(self.shrink, 1)
        if list(shrink_out.users) != [expand]:
            raise NoMatch(shrink_out, "shrink buffer used outside the pattern")
        skw = self.shrink.kwargs
        if skw["inputs"] is not self.base.x2d:
            raise NoMatch(self.shrink, "lora_shrink reads another tensor than the base GEMM")
        self.scaling = float(skw.get("scaling", 1.0))
        self.lora_a = list(skw["lora_a_weights"])
        self.lora_b = list(kw["lora_b_weights"])
        self.buffer = skw["output_tensor"]
        self.mapping = skw["token_lora_mapping"]
        self.no_lora_flag = skw["no_lora_flag_cpu"]
        if skw["no_lora_flag_cpu"] is not kw["no_lora_flag_cpu"]:
            raise NoMatch(expand, "shrink and expand use different no_lora_flag_cpu")
        if _strip_slice(skw["token_lora_mapping"]) is not _strip_slice(kw["token_lora_mapping"]):
            raise NoMatch(expand, "shrink and expand use different token_lora_mapping")
        if len(self.lora_a) != len(self.lora_b):
            raise NoMatch(expand, f"{len(self.lora_a)} A vs {len(self.lora_b)} B slices")
        for w in self.lora_a + self.lora_b:
            v = fake_value(w)
            if v is None or v.dim() != 4 or v.shape[1] != 1:
                raise NoMatch(expand, f"stacked LoRA weight {getattr(w, 'name', w)} is not (max_loras, 1, ., .)")
            if v.dtype not in FLOAT_DTYPES:
                raise NoMatch(expand, f"LoRA weight dtype {v.dtype}")
        self.slice_sizes = [_static_int(fake_value(b).shape[2], b, f"output size of LoRA B {b.name}")
                            for b in self.lora_b]
        n = _static_int(self.base.out_features, self.base.weight, "base GEMM N")
        if sum(self.slice_sizes) != n:
            raise NoMatch(expand, f"B slices {self.slice_sizes} do not cover N={n}")

    def lora_nodes(self) -> set[Node]:
        """Nodes that exist only for the LoRA: shrink, expand, their buffer, getitems, metadata slices."""
        nodes = {self.expand, self.out, self.shrink, self.buffer, *self.shrink.users}
        for op in (self.shrink, self.expand):
            for value in op.kwargs.values():
                if isinstance(value, Node) and value.target is aten.slice.Tensor:
                    nodes.add(value)
        return {n for n in nodes if isinstance(n, Node) and n.op == "call_function"}

    def nodes(self) -> set[Node]:
        """:meth:`lora_nodes` plus the base GEMM (mm, permute)."""
        return self.lora_nodes() | {n for n in self.base.interior if n.op == "call_function"}


def feeds_vllm_lora(node: Node) -> bool:
    """``node`` (a base GEMM) is read by a vLLM LoRA op: the HF matcher must leave it alone."""
    return any(_af_op_name(user) in (SHRINK_NAME, EXPAND_NAME) for user in node.users)


class VllmLoraFusion:
    """Finds and rewrites vLLM GDN projections, split or fused form; returns one LayerMatch per layer.

    A layer is found by the module path of its ``lora_expand`` nodes (``nn_module_stack`` ends at
    the LoRA wrapper): ``<layer>.<qkv_name>`` + ``<layer>.<z_name>`` (split) or
    ``<layer>.<qkvz_name>`` (fused).
    """

    def __init__(self, qkv_name: str = "in_proj_qkv", z_name: str = "in_proj_z",
                 qkvz_name: str = "in_proj_qkvz", gemm_lora_op: bool = True, ba_name: str = "in_proj_ba",
                 fold_ba: bool = True):
        self.qkv_name, self.z_name, self.qkvz_name, self.ba_name = qkv_name, z_name, qkvz_name, ba_name
        self.gemm_lora_op, self.fold_ba = gemm_lora_op, fold_ba

    def __call__(self, graph: Graph) -> list[LayerMatch]:
        """Rewrite every vLLM GDN layer of ``graph`` it can prove safe (the caller sorts and lints
        the graph afterwards); one LayerMatch per layer found."""
        # longest name first: "in_proj_qkv" must not claim "...in_proj_qkvz"
        names = sorted({self.qkv_name, self.z_name, self.qkvz_name, self.ba_name}, key=len, reverse=True)
        proj = re.compile(rf"^(?:(.*)\.)?({'|'.join(map(re.escape, names))})$")
        by_prefix: dict[str, dict[str, list[Node]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        plain_ba: dict[str, list[Node]] = collections.defaultdict(list)   # in_proj_ba GEMMs without LoRA
        for node in graph.nodes:
            found = proj.match(module_path(node) or "") if node.op == "call_function" else None
            if not found:
                continue
            prefix, name = found.group(1) or "", found.group(2)
            if _af_op_name(node) == EXPAND_NAME:
                by_prefix[prefix][name].append(node)
            elif name == self.ba_name and node.target is aten.mm.default and not feeds_vllm_lora(node):
                plain_ba[prefix].append(node)
        results = []
        for prefix, found in by_prefix.items():
            q, z, qkvz = (found.get(name, []) for name in (self.qkv_name, self.z_name, self.qkvz_name))
            if not (q or z or qkvz):
                continue   # an in_proj_ba alone: no GDN layer to fold it into
            fused = bool(qkvz)
            result = LayerMatch(layer=prefix or "<root>", rewritten=False,
                                identified_by="module_path+vllm_lora" + ("_fused" if fused else ""))
            old_nodes = set(graph.nodes)
            try:
                if fused:
                    if len(qkvz) != 1 or q or z:
                        raise NoMatch(qkvz[0], f"expected one lora_expand for {self.qkvz_name} and none for "
                                               f"{self.qkv_name} / {self.z_name}, found {len(qkvz)}, "
                                               f"{len(q)}, {len(z)}")
                    qkvz_proj = _VllmProjection(qkvz[0])
                    ba = self._match_ba(found.get(self.ba_name, []), plain_ba[prefix], qkvz_proj, result)
                    self._rewrite_fused(graph, qkvz_proj, ba, result)
                else:
                    if len(q) != 1 or len(z) != 1:
                        raise NoMatch((q or z)[0], f"expected one lora_expand each for {self.qkv_name} and "
                                                   f"{self.z_name}, found {len(q)} and {len(z)}")
                    qkv_proj = _VllmProjection(q[0])
                    ba = self._match_ba(found.get(self.ba_name, []), plain_ba[prefix], qkv_proj, result)
                    self._rewrite_split(graph, qkv_proj, _VllmProjection(z[0]), ba, result)
            except NoMatch as miss:
                result.reason, result.node = miss.reason, miss.node_name
                logger.debug("%s not rewritten: %s", result.layer, miss)
            except Exception as error:  # noqa: BLE001  (never break the compile: undo, keep the layer)
                for node in reversed([n for n in graph.nodes if n not in old_nodes]):
                    if not node.users:
                        graph.erase_node(node)
                result.rewritten, result.kernel = False, None
                result.reason = f"internal error while rewriting (layer left as it was): {type(error).__name__}: {error}"
                logger.warning("fx_passes: %s not rewritten: %s", result.layer, result.reason)
            results.append(result)
        return results

    # ------------------------------------------------------------ in_proj_ba
    def _match_ba(self, expands: list[Node], mms: list[Node], first: _VllmProjection,
                  result: LayerMatch) -> Optional[Union[_VllmProjection, LinearLeaf]]:
        """The layer's in_proj_ba when it can join the op: a :class:`_VllmProjection` (with its LoRA) or a
        :class:`LinearLeaf` (a plain GEMM); else None with ``result.ba_reason`` set."""
        if not self.fold_ba:
            result.ba_reason = "fold_ba is off"
            return None
        try:
            if len(expands) + len(mms) != 1:
                raise NoMatch(None, f"expected one {self.ba_name} GEMM, found {len(expands)} with LoRA and "
                                    f"{len(mms)} without")
            if expands:
                ba = _VllmProjection(expands[0])
                _check_same_lora_inputs(first, ba, self.ba_name)
                base = ba.base
            else:
                ba = base = match_linear(mms[0])
            if base.x2d is not first.base.x2d:
                raise NoMatch(base.node, f"{self.ba_name} reads another tensor than {first.mm.name}")
            wv, wf = fake_value(base.weight), fake_value(first.base.weight)
            if wv.dtype != wf.dtype or wv.device != wf.device:
                raise NoMatch(base.node, f"{self.ba_name} weight {wv.dtype} on {wv.device}, the layer's "
                                         f"{wf.dtype} on {wf.device}")
            _static_int(base.out_features, base.weight, f"{self.ba_name} N")
        except NoMatch as miss:
            result.ba_reason = f"{miss.node_name}: {miss.reason}" if miss.node is not None else miss.reason
            return None
        return ba

    # ------------------------------------------------------------ the two forms
    def _rewrite_split(self, graph: Graph, qkv: _VllmProjection, z: _VllmProjection,
                       ba: Optional[Union[_VllmProjection, LinearLeaf]], result: LayerMatch) -> None:
        result.qkv_node, result.z_node = qkv.mm.name, z.mm.name
        if qkv.base.x2d is not z.base.x2d:
            raise NoMatch(z.mm, f"{qkv.mm.name} and {z.mm.name} read different inputs")
        if len(qkv.lora_b) != 3 or len(z.lora_b) != 1:
            raise NoMatch(z.expand, f"unsupported slice counts {len(qkv.lora_b)} + {len(z.lora_b)}")
        _check_same_lora_inputs(qkv, z, self.z_name)
        wq, wz = fake_value(qkv.base.weight), fake_value(z.base.weight)
        _check_dtypes(qkv, wq, extra=(z, wz))
        sizes = qkv.slice_sizes + z.slice_sizes
        if not (sizes[0] == sizes[1] and sizes[2] == sizes[3]):
            raise NoMatch(qkv.expand, f"slices {sizes} are not [k, k, v, v]")
        parts = [(self.qkv_name, qkv), (self.z_name, z)] + ([(self.ba_name, ba)] if ba is not None else [])
        self._emit(graph, parts, [qkv.base.weight, z.base.weight], result, gemm_node=None)
        result.kernel = "fx_passes.qkvz_gemm_lora" if self.gemm_lora_op else \
            "fx_passes.qkvz_gemm + fx_passes.qkvz_lora_"

    def _rewrite_fused(self, graph: Graph, qkvz: _VllmProjection, ba: Optional[Union[_VllmProjection, LinearLeaf]],
                       result: LayerMatch) -> None:
        result.qkv_node = result.z_node = qkvz.mm.name
        sizes = qkvz.slice_sizes
        if len(sizes) != 4 or sizes[0] != sizes[1] or sizes[2] != sizes[3]:
            # e.g. Qwen3-Next's interleaved GQA layout: one [k, k, v, v]-interleaved slice
            raise NoMatch(qkvz.expand, f"{self.qkvz_name} LoRA slices {sizes} are not [k, k, v, v]")
        _check_dtypes(qkvz, fake_value(qkvz.base.weight))
        if ba is not None and not self.gemm_lora_op:
            result.ba_reason = "gemm_lora_op is off: vLLM's qkvz GEMM stays, in_proj_ba cannot join it"
            ba = None
        parts = [(self.qkvz_name, qkvz)] + ([(self.ba_name, ba)] if ba is not None else [])
        # one op: the mm goes too (the op's GEMM reads W_qkvz); two-op form: vLLM's mm stays
        self._emit(graph, parts, [qkvz.base.weight], result, gemm_node=None if self.gemm_lora_op else qkvz.mm)
        result.kernel = "fx_passes.qkvz_gemm_lora" if self.gemm_lora_op else "vllm mm + fx_passes.qkvz_lora_"

    def _emit(self, graph: Graph, parts: list, weights: list, result: LayerMatch, gemm_node: Optional[Node]) -> None:
        """One op over ``parts`` = ``[(name, _VllmProjection | LinearLeaf)]`` (the first carries the layer's
        token mapping); ``weights`` the GEMM's weights before in_proj_ba's. ``gemm_node``: vLLM's GEMM
        that stays (two-op fused form), else the op's own GEMM (``qkvz_gemm`` with ``gemm_lora_op=False``)."""
        first = parts[0][1]
        lora_parts = [p for _, p in parts if isinstance(p, _VllmProjection)]
        ba = parts[-1][1] if len(parts) > 1 and parts[-1][0] == self.ba_name else None
        if ba is not None:
            weights = weights + [ba.base.weight if isinstance(ba, _VllmProjection) else ba.weight]
        lora_a = [a for p in lora_parts for a in p.lora_a]
        lora_b = [b for p in lora_parts for b in p.lora_b]
        sizes = [n for p in lora_parts for n in p.slice_sizes]
        starts, col = [], 0
        for _, p in parts:
            starts.append(col)
            col += sum(p.slice_sizes) if isinstance(p, _VllmProjection) else _static_int(p.out_features, p.weight, "N")
        removed, outs = set(), []
        for _, p in parts:
            if isinstance(p, _VllmProjection):
                removed |= p.lora_nodes() if p is first and gemm_node is not None else p.nodes()
                outs.append(p.out)
            else:
                removed |= {n for n in p.interior if n.op == "call_function"}
                outs.append(p.node)
        check_users_inside([n for n in removed if n not in outs], removed, keep={first.mapping})
        anchor = _anchor(graph, outs, first.mapping)
        x2d = first.base.x2d
        old = set(graph.nodes)
        with graph.inserting_before(anchor):
            if gemm_node is not None:
                gemm = gemm_node
            elif self.gemm_lora_op:
                gemm = weights
            else:
                gemm = emit(graph, QKVZ_GEMM_OP, (x2d, weights))
            fused, groups = _emit_lora(graph, gemm, x2d, lora_a, lora_b, sizes, first.mapping,
                                       first.no_lora_flag, first.scaling)
            values = []
            for (_, p), start, out in zip(parts, starts, outs):
                n = fake_value(out).shape[1]
                values.append(fused if len(parts) == 1 else emit(graph, aten.slice.Tensor, (fused, 1, start, start + n)))
        for out, value in zip(outs, values):   # only once every new node exists
            out.replace_all_uses_with(value)
        ba_sizes = [] if ba is None else (ba.slice_sizes if isinstance(ba, _VllmProjection) else
                                          [_static_int(ba.out_features, ba.weight, "N")])
        _finish(graph, result, old, removed - {first.mapping}, sizes, groups)
        result.folded = [name for name, _ in parts]
        result.slice_sizes = [n for p in lora_parts if p is not ba for n in p.slice_sizes] + ba_sizes
        result.lora_slices = [list(SLICE_NAMES[:len(sizes)])] if sizes else []
        result.weights_packed = weights_are_packed([fake_value(w) for w in weights])


# ---------------------------------------------------------------- shared by both forms

def _check_same_lora_inputs(first: _VllmProjection, other: _VllmProjection, name: str) -> None:
    """One op, one token mapping, flag and scaling: ``other``'s must be ``first``'s."""
    if _strip_slice(first.mapping) is not _strip_slice(other.mapping):
        raise NoMatch(other.shrink, f"{name} uses another token_lora_mapping tensor")
    if first.no_lora_flag is not other.no_lora_flag:
        raise NoMatch(other.shrink, f"{name} uses another no_lora_flag_cpu tensor")
    if first.scaling != other.scaling:
        raise NoMatch(other.shrink, f"{name} scaling {other.scaling} differs from {first.scaling}")


def _check_dtypes(proj: _VllmProjection, weight, extra: Optional[tuple] = None) -> None:
    """x and the base weight(s) share one float dtype; all LoRA weights share one dtype."""
    xv = fake_value(proj.base.x2d)
    projs, weights = [proj], [weight]
    if extra is not None:
        projs.append(extra[0])
        weights.append(extra[1])
    if any(w.dtype != xv.dtype for w in weights) or xv.dtype not in FLOAT_DTYPES:
        raise NoMatch(projs[-1].mm, f"dtypes differ: x {xv.dtype}, weights {[w.dtype for w in weights]}")
    lora_dtypes = {fake_value(w).dtype for p in projs for w in p.lora_a + p.lora_b}
    if len(lora_dtypes) != 1:
        raise NoMatch(projs[-1].expand, f"LoRA weights have mixed dtypes {lora_dtypes}")


def _anchor(graph: Graph, outs: list[Node], mapping: Node) -> Node:
    """Insert point: before the first user of any output (every input is defined by then)."""
    users = [u for out in outs for u in out.users]
    order = {node: i for i, node in enumerate(graph.nodes)}
    anchor = min(users, key=order.__getitem__) if users else max(outs, key=order.__getitem__).next
    if order[mapping] > order[anchor]:
        raise NoMatch(mapping, "token_lora_mapping defined after the first output user")
    return anchor


def _emit_lora(graph: Graph, out: Union[Node, list[Node]], x2d: Node, lora_a: list[Node],
               lora_b: list[Node], sizes: list[int], mapping: Node, no_lora_flag: Node,
               scaling: float) -> tuple[Node, int]:
    """The LoRA of every slice (slices from column 0 on, ``sizes`` wide): ``out`` a GEMM result node ->
    one ``auto_functionalized(fx_passes.qkvz_lora_)`` adding into it; ``out`` a list of weights -> one
    ``fx_passes.qkvz_gemm_lora(x2d, weights, ...)`` doing GEMM and LoRA. Returns (the block's result
    node, number of A groups)."""
    groups: dict[Node, int] = {}
    a_views, b_views, slice_a, slice_start = [], [], [], []
    start = 0
    for a, b, size in zip(lora_a, lora_b, sizes):
        if a not in groups:
            groups[a] = len(a_views)
            a_views.append(emit(graph, aten.select.int, (a, 1, 0)))
        slice_a.append(groups[a])
        b_views.append(emit(graph, aten.select.int, (b, 1, 0)))
        slice_start.append(start)
        start += size
    # vLLM does not refresh token_lora_mapping when no token has a LoRA (it sets no_lora_flag_cpu
    # and its kernels exit early): honour the flag by masking every id to -1
    # (flag as a 0-d tensor: a CPU scalar may meet a CUDA mapping in where)
    flag = emit(graph, aten.select.int, (no_lora_flag, 0, 0))
    mv = fake_value(mapping)
    minus_one = emit(graph, aten.scalar_tensor.default, (-1,), dict(dtype=mv.dtype, device=mv.device))
    ids = emit(graph, aten.where.self, (flag, minus_one, mapping))
    lora_kwargs = dict(lora_a=a_views, lora_b=b_views, slice_a=slice_a, slice_start=slice_start,
                       token_lora_ids=ids, lora_scales=None, scale=scaling)
    if isinstance(out, list):
        return emit(graph, QKVZ_GEMM_LORA_OP, (x2d, out), lora_kwargs), len(a_views)
    functional = emit(graph, auto_functionalized, (QKVZ_LORA_OP,), dict(out=out, x=x2d, **lora_kwargs))
    return emit(graph, operator.getitem, (functional, 1)), len(a_views)


def _finish(graph: Graph, result: LayerMatch, old: set[Node], removed: set[Node], sizes: list[int],
            groups: int) -> None:
    result.new_nodes = [n.name for n in graph.nodes if n not in old]
    result.removed_nodes = erase_dead(graph, removed)
    result.slice_sizes = list(sizes)
    result.shared_a = groups < len(sizes)
    result.adapters = ["vllm_stacked"]
    result.lora_slices = [list(SLICE_NAMES[:len(sizes)])]
    result.rewritten = True


__all__ = ["VllmLoraFusion", "feeds_vllm_lora", "SHRINK_NAME", "EXPAND_NAME"]
