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
        ->  y' = fx_passes.qkvz_gemm_lora(x, W_qkv, W_z, <LoRA args>)   # one GEMM + the 4-slice LoRA
            qkv = slice(y', 1, 0, 2k + v);  z = slice(y', 1, 2k + v, 2k + 2v)

**Fused** (vLLM >= 0.21, PR #37912): one ``in_proj_qkvz`` = MergedColumnParallelLinear
[k, k, v, v] with a 4-slice LoRA (``expand_packed_lora`` copies A_qkv into slices 0..2) -- the block
above once. The GEMM is already one; only the LoRA ops change::

    mm_qkvz + shrink/expand(4 slices)
        ->  y' = fx_passes.qkvz_gemm_lora(x, slice(W_qkvz, 0, 0, 2k + v), slice(W_qkvz, 0, 2k + v, 2k + 2v),
                                          <LoRA args>)     # the same one GEMM (row views of one weight)

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
from fx_passes.fusion.matcher import FLOAT_DTYPES, NoMatch, check_users_inside, fake_value, match_linear, module_path
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
                 qkvz_name: str = "in_proj_qkvz", gemm_lora_op: bool = True):
        self.qkv_name, self.z_name, self.qkvz_name = qkv_name, z_name, qkvz_name
        self.gemm_lora_op = gemm_lora_op

    def __call__(self, graph: Graph) -> list[LayerMatch]:
        """Rewrite every vLLM GDN layer of ``graph`` it can prove safe (the caller sorts and lints
        the graph afterwards); one LayerMatch per layer found."""
        # longest name first: "in_proj_qkv" must not claim "...in_proj_qkvz"
        names = sorted({self.qkv_name, self.z_name, self.qkvz_name}, key=len, reverse=True)
        proj = re.compile(rf"^(?:(.*)\.)?({'|'.join(map(re.escape, names))})$")
        by_prefix: dict[str, dict[str, list[Node]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for node in graph.nodes:
            if _af_op_name(node) != EXPAND_NAME:
                continue
            found = proj.match(module_path(node) or "")
            if found:
                by_prefix[found.group(1) or ""][found.group(2)].append(node)
        results = []
        for prefix, found in by_prefix.items():
            q, z, qkvz = (found.get(name, []) for name in (self.qkv_name, self.z_name, self.qkvz_name))
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
                    self._rewrite_fused(graph, _VllmProjection(qkvz[0]), result)
                else:
                    if len(q) != 1 or len(z) != 1:
                        raise NoMatch((q or z)[0], f"expected one lora_expand each for {self.qkv_name} and "
                                                   f"{self.z_name}, found {len(q)} and {len(z)}")
                    self._rewrite_split(graph, _VllmProjection(q[0]), _VllmProjection(z[0]), result)
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

    # ------------------------------------------------------------ the two forms
    def _rewrite_split(self, graph: Graph, qkv: _VllmProjection, z: _VllmProjection, result: LayerMatch) -> None:
        result.qkv_node, result.z_node = qkv.mm.name, z.mm.name
        if qkv.base.x2d is not z.base.x2d:
            raise NoMatch(z.mm, f"{qkv.mm.name} and {z.mm.name} read different inputs")
        if len(qkv.lora_b) != 3 or len(z.lora_b) != 1:
            raise NoMatch(z.expand, f"unsupported slice counts {len(qkv.lora_b)} + {len(z.lora_b)}")
        if _strip_slice(qkv.mapping) is not _strip_slice(z.mapping):
            raise NoMatch(z.shrink, "qkv and z use different token_lora_mapping tensors")
        if qkv.no_lora_flag is not z.no_lora_flag:
            raise NoMatch(z.shrink, "qkv and z use different no_lora_flag_cpu tensors")
        if qkv.scaling != z.scaling:
            raise NoMatch(z.shrink, f"scaling differs: {qkv.scaling} vs {z.scaling}")
        wq, wz = fake_value(qkv.base.weight), fake_value(z.base.weight)
        _check_dtypes(qkv, wq, extra=(z, wz))
        n_qkv, n_z = sum(qkv.slice_sizes), sum(z.slice_sizes)
        sizes = qkv.slice_sizes + z.slice_sizes
        if not (sizes[0] == sizes[1] and sizes[2] == sizes[3]):
            raise NoMatch(qkv.expand, f"slices {sizes} are not [k, k, v, v]")
        removed = qkv.nodes() | z.nodes()
        check_users_inside([n for n in removed if n not in (qkv.out, z.out)], removed, keep={qkv.mapping})
        anchor = _anchor(graph, [qkv.out, z.out], qkv.mapping)
        x2d = qkv.base.x2d
        old = set(graph.nodes)
        with graph.inserting_before(anchor):
            weights = (qkv.base.weight, z.base.weight)
            gemm = weights if self.gemm_lora_op else emit(graph, QKVZ_GEMM_OP, (x2d, *weights))
            fused, groups = _emit_lora(graph, gemm, x2d, qkv.lora_a + z.lora_a, qkv.lora_b + z.lora_b,
                                       sizes, qkv.mapping, qkv.no_lora_flag, qkv.scaling)
            qkv_value = emit(graph, aten.slice.Tensor, (fused, 1, 0, n_qkv))
            z_value = emit(graph, aten.slice.Tensor, (fused, 1, n_qkv, n_qkv + n_z))
        qkv.out.replace_all_uses_with(qkv_value)   # only once every new node exists
        z.out.replace_all_uses_with(z_value)
        _finish(graph, result, old, removed - {qkv.mapping}, sizes, groups)
        result.weights_packed = weights_are_packed(wq, wz)
        result.kernel = "fx_passes.qkvz_gemm_lora" if self.gemm_lora_op else \
            "fx_passes.qkvz_gemm + fx_passes.qkvz_lora_"

    def _rewrite_fused(self, graph: Graph, qkvz: _VllmProjection, result: LayerMatch) -> None:
        # the GEMM stays: in the fused layout it is already the one qkvz GEMM
        result.qkv_node = result.z_node = qkvz.mm.name
        sizes = qkvz.slice_sizes
        if len(sizes) != 4 or sizes[0] != sizes[1] or sizes[2] != sizes[3]:
            # e.g. Qwen3-Next's interleaved GQA layout: one [k, k, v, v]-interleaved slice
            raise NoMatch(qkvz.expand, f"{self.qkvz_name} LoRA slices {sizes} are not [k, k, v, v]")
        _check_dtypes(qkvz, fake_value(qkvz.base.weight))
        # one op: the mm goes too (the op's GEMM reads W_qkvz through two row views); else it stays
        removed = qkvz.nodes() if self.gemm_lora_op else qkvz.lora_nodes()
        check_users_inside([n for n in removed if n is not qkvz.out], removed, keep={qkvz.mapping})
        anchor = _anchor(graph, [qkvz.out], qkvz.mapping)
        old = set(graph.nodes)
        with graph.inserting_before(anchor):
            gemm = qkvz.mm
            if self.gemm_lora_op:
                n_qkv, n = sum(sizes[:3]), sum(sizes)
                gemm = (emit(graph, aten.slice.Tensor, (qkvz.base.weight, 0, 0, n_qkv)),
                        emit(graph, aten.slice.Tensor, (qkvz.base.weight, 0, n_qkv, n)))
            fused, groups = _emit_lora(graph, gemm, qkvz.base.x2d, qkvz.lora_a, qkvz.lora_b, sizes,
                                       qkvz.mapping, qkvz.no_lora_flag, qkvz.scaling)
            qkvz.out.replace_all_uses_with(fused)
        _finish(graph, result, old, removed - {qkvz.mapping}, sizes, groups)
        result.weights_packed = True   # one weight, one GEMM
        result.kernel = "fx_passes.qkvz_gemm_lora" if self.gemm_lora_op else "vllm mm + fx_passes.qkvz_lora_"


# ---------------------------------------------------------------- shared by both forms

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


def _emit_lora(graph: Graph, out: Union[Node, tuple[Node, Node]], x2d: Node, lora_a: list[Node],
               lora_b: list[Node], sizes: list[int], mapping: Node, no_lora_flag: Node,
               scaling: float) -> tuple[Node, int]:
    """The LoRA of every slice: ``out`` a GEMM result node -> one ``auto_functionalized(fx_passes.qkvz_lora_)``
    adding into it; ``out`` a ``(w_qkv, w_z)`` pair -> one ``fx_passes.qkvz_gemm_lora(x2d, w_qkv, w_z, ...)``
    doing GEMM and LoRA. Returns (the block's result node, number of A groups)."""
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
    if isinstance(out, tuple):
        return emit(graph, QKVZ_GEMM_LORA_OP, (x2d, *out), lora_kwargs), len(a_views)
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
