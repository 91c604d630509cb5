"""vLLM's split GDN projection LoRA (punica / Triton ``vllm::lora_shrink`` + ``vllm::lora_expand``).

Post-grad graph of vLLM's split path (0.19-0.20: separate ``in_proj_qkv`` [k, k, v] and
``in_proj_z`` [v] LoRA layers), per projection::

    buf = empty([n_slices, T, r], f32)
    s   = auto_functionalized(vllm.lora_shrink, inputs=x, lora_a_weights=[a_0..], output_tensor=buf,
                              token_lora_mapping=slice(map, 0, 0, T), ..., scaling=1.0)[1]
    y   = mm(x, permute(W, [1, 0]))
    y'  = auto_functionalized(vllm.lora_expand, inputs=s, lora_b_weights=[b_0..], output_tensor=y,
                              ..., offset_start=0, add_inputs=True)[1]

Rewritten, per layer (qkv + z sharing x)::

    y  = fx_passes.qkvz_gemm(x, W_qkv, W_z)
    y' = auto_functionalized(fx_passes.qkvz_lora_, out=y, x=x,
             lora_a=[select(a_i, 1, 0) ...],  lora_b=[select(b_i, 1, 0) ...],   # (max_loras, r, H) / (max_loras, n, r) views
             slice_a=..., slice_start=[0, k, 2k, 2k + v], token_lora_ids=slice(map, 0, 0, T), scale=scaling)[1]
    qkv = slice(y', 1, 0, 2k + v);  z = slice(y', 1, 2k + v, 2k + 2v)

A groups: one per distinct ``lora_a_weights`` node (vLLM's split path passes ``[lora_a] * 3`` as
separate stacked tensors, and warm-up dummy LoRAs differ per slice, so q, k, v share a group only
when the graph passes the very same node).

``no_lora_flag_cpu`` is honoured: vLLM does NOT refresh ``token_lora_mapping`` when no token has
a LoRA (it only sets the flag), so the ids are ``where(no_lora_flag_cpu[0], -1, mapping)``
(all ``-1`` -> our op adds nothing; the early exit itself, a host-side skip, is lost).
Not used: ``num_active_loras`` / ``lora_ids`` / ``token_indices_sorted_by_lora_ids`` /
``num_tokens_per_lora`` / ``lora_token_start_loc`` (scheduling hints of vLLM's kernels; our op
reads the per-token ids directly).
"""
from __future__ import annotations

import collections
import operator
import re
from typing import Optional

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch.fx import Graph, Node

from fx_passes.fusion.matcher import FLOAT_DTYPES, NoMatch, fake_value, match_linear, module_path
from fx_passes.report import LayerMatch

aten = torch.ops.aten
SHRINK_NAME = "vllm.lora_shrink.default"
EXPAND_NAME = "vllm.lora_expand.default"
SLICE_NAMES = ("q", "k", "v", "z")


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


class _VllmProjection:
    """One LoRA projection: base mm + shrink + expand, all checked."""

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
        for name in ("token_lora_mapping",):
            if _strip_slice(skw[name]) is not _strip_slice(kw[name]):
                raise NoMatch(expand, f"shrink and expand use different {name}")
        if len(self.lora_a) != len(self.lora_b):
            raise NoMatch(expand, f"{len(self.lora_a)} A vs {len(self.lora_b)} B slices")
        for w in self.lora_a + self.lora_b:
            v = fake_value(w)
            if v is None or v.dim() != 4 or v.shape[1] != 1:
                raise NoMatch(expand, f"stacked LoRA weight {getattr(w, 'name', w)} is not (max_loras, 1, ., .)")
            if v.dtype not in FLOAT_DTYPES:
                raise NoMatch(expand, f"LoRA weight dtype {v.dtype}")
        self.slice_sizes = [fake_value(b).shape[2] for b in self.lora_b]
        if sum(self.slice_sizes) != self.base.out_features:
            raise NoMatch(expand, f"B slices {self.slice_sizes} do not cover N={self.base.out_features}")

    def nodes(self) -> set[Node]:
        shrink_users = set(self.shrink.users)
        nodes = {self.expand, self.out, self.mm, self.shrink, self.buffer, *shrink_users, *self.base.interior}
        for op in (self.shrink, self.expand):
            for value in op.kwargs.values():
                if isinstance(value, Node) and value.target is aten.slice.Tensor:
                    nodes.add(value)
        return {n for n in nodes if isinstance(n, Node) and n.op == "call_function"}


def feeds_vllm_lora(node: Node) -> bool:
    """``node`` (a base GEMM) is read by a vLLM LoRA op: the HF matcher must leave it alone."""
    return any(_af_op_name(user) in (SHRINK_NAME, EXPAND_NAME) for user in node.users)


class VllmSplitLoraFusion:
    """Finds and rewrites vLLM split-path GDN projections; returns one LayerMatch per layer."""

    def __init__(self, qkv_name: str = "in_proj_qkv", z_name: str = "in_proj_z"):
        self.qkv_name, self.z_name = qkv_name, z_name

    def __call__(self, graph: Graph) -> list[LayerMatch]:
        proj = re.compile(rf"^(.*?)\.?({re.escape(self.qkv_name)}|{re.escape(self.z_name)})$")
        by_prefix: dict[str, dict[str, list[Node]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for node in graph.nodes:
            if _af_op_name(node) != EXPAND_NAME:
                continue
            found = proj.match(module_path(node) or "")
            if found:
                by_prefix[found.group(1)][found.group(2)].append(node)
        results = []
        for prefix, found in by_prefix.items():
            result = LayerMatch(layer=prefix or "<root>", rewritten=False, identified_by="module_path+vllm_lora")
            q, z = found.get(self.qkv_name, []), found.get(self.z_name, [])
            try:
                if len(q) != 1 or len(z) != 1:
                    raise NoMatch((q or z)[0], f"expected one lora_expand each for {self.qkv_name} and "
                                               f"{self.z_name}, found {len(q)} and {len(z)}")
                self._rewrite(graph, _VllmProjection(q[0]), _VllmProjection(z[0]), result)
            except NoMatch as miss:
                result.reason, result.node = miss.reason, miss.node_name
            results.append(result)
        if any(r.rewritten for r in results):
            from torch._inductor.pattern_matcher import stable_topological_sort

            stable_topological_sort(graph)
            graph.lint()
            if graph.owning_module is not None:
                graph.owning_module.recompile()
        return results

    def _rewrite(self, graph: Graph, qkv: _VllmProjection, z: _VllmProjection, result: LayerMatch) -> None:
        from fx_passes.fusion.qkvz_lora_fusion import QKVZ_GEMM_OP, QKVZ_LORA_OP, _call, _erase_dead
        from fx_passes.ops.qkvz_gemm import weights_are_packed

        result.qkv_node, result.z_node = qkv.mm.name, z.mm.name
        if qkv.base.x2d is not z.base.x2d:
            raise NoMatch(z.mm, f"{qkv.mm.name} and {z.mm.name} read different inputs")
        if len(qkv.lora_b) + len(z.lora_b) > 4 or len(z.lora_b) != 1:
            raise NoMatch(z.expand, f"unsupported slice counts {len(qkv.lora_b)} + {len(z.lora_b)}")
        if _strip_slice(qkv.mapping) is not _strip_slice(z.mapping):
            raise NoMatch(z.shrink, "qkv and z use different token_lora_mapping tensors")
        if qkv.no_lora_flag is not z.no_lora_flag:
            raise NoMatch(z.shrink, "qkv and z use different no_lora_flag_cpu tensors")
        if qkv.scaling != z.scaling:
            raise NoMatch(z.shrink, f"scaling differs: {qkv.scaling} vs {z.scaling}")
        wq, wz, xv = fake_value(qkv.base.weight), fake_value(z.base.weight), fake_value(qkv.base.x2d)
        if not (wq.dtype == wz.dtype == xv.dtype) or wq.dtype not in FLOAT_DTYPES:
            raise NoMatch(z.mm, f"dtypes differ: x {xv.dtype}, W_qkv {wq.dtype}, W_z {wz.dtype}")
        a_dtypes = {fake_value(w).dtype for w in qkv.lora_a + z.lora_a + qkv.lora_b + z.lora_b}
        if len(a_dtypes) != 1:
            raise NoMatch(z.expand, f"LoRA weights have mixed dtypes {a_dtypes}")
        n_qkv, n_z = qkv.base.out_features, z.base.out_features
        if n_qkv <= n_z or (n_qkv - n_z) % 2:
            raise NoMatch(qkv.mm, f"N_qkv={n_qkv} is not 2 * key_dim + N_z (N_z={n_z})")
        removed = qkv.nodes() | z.nodes()
        keep = {qkv.mapping}
        for node in removed:
            if node in keep or node is qkv.out or node is z.out:   # outputs: their uses are replaced
                continue
            outside = [u for u in node.users if u not in removed]
            if outside:
                raise NoMatch(node, f"used outside the pattern by {', '.join(u.name for u in outside)}")
        users = [u for p in (qkv, z) for u in p.out.users]
        order = {node: i for i, node in enumerate(graph.nodes)}
        anchor = min(users, key=order.__getitem__) if users else z.out.next
        if order[qkv.mapping] > order[anchor]:
            raise NoMatch(qkv.mapping, "token_lora_mapping defined after the first output user")
        x2d = qkv.base.x2d
        old = set(graph.nodes)
        with graph.inserting_before(anchor):
            fused = _call(graph, QKVZ_GEMM_OP, (x2d, qkv.base.weight, z.base.weight))
            groups: dict[Node, int] = {}
            lora_a, lora_b, slice_a, slice_start = [], [], [], []
            start = 0
            for a, b in list(zip(qkv.lora_a, qkv.lora_b)) + list(zip(z.lora_a, z.lora_b)):
                if a not in groups:
                    groups[a] = len(lora_a)
                    lora_a.append(_call(graph, aten.select.int, (a, 1, 0)))
                slice_a.append(groups[a])
                lora_b.append(_call(graph, aten.select.int, (b, 1, 0)))
                slice_start.append(start)
                start += fake_value(b).shape[2]
            # vLLM does not refresh token_lora_mapping when no token has a LoRA (it sets
            # no_lora_flag_cpu and its kernels exit early): honour the flag by masking every id to -1
            # (flag as a 0-d tensor: a CPU scalar may meet a CUDA mapping in where)
            flag = _call(graph, aten.select.int, (qkv.no_lora_flag, 0, 0))
            minus_one = _call(graph, aten.scalar_tensor.default, (-1,), dict(
                dtype=fake_value(qkv.mapping).dtype, device=fake_value(qkv.mapping).device))
            ids = _call(graph, aten.where.self, (flag, minus_one, qkv.mapping))
            functional = _call(graph, auto_functionalized, (QKVZ_LORA_OP,), dict(
                out=fused, x=x2d, lora_a=lora_a, lora_b=lora_b, slice_a=slice_a, slice_start=slice_start,
                token_lora_ids=ids, lora_scales=None, scale=qkv.scaling))
            fused = _call(graph, operator.getitem, (functional, 1))
            qkv.out.replace_all_uses_with(_call(graph, aten.slice.Tensor, (fused, 1, 0, n_qkv)))
            z.out.replace_all_uses_with(_call(graph, aten.slice.Tensor, (fused, 1, n_qkv, n_qkv + n_z)))
        result.new_nodes = [n.name for n in graph.nodes if n not in old]
        result.removed_nodes = _erase_dead(graph, removed - keep)
        result.slice_sizes = qkv.slice_sizes + z.slice_sizes
        result.weights_packed = weights_are_packed(wq, wz)
        result.shared_a = len(lora_a) < len(slice_a)
        result.adapters = ["vllm_stacked"]
        result.lora_slices = [list(SLICE_NAMES[:len(slice_a)])]
        result.kernel = "fx_passes.qkvz_gemm + fx_passes.qkvz_lora_"
        result.rewritten = True


__all__ = ["VllmSplitLoraFusion", "feeds_vllm_lora", "SHRINK_NAME", "EXPAND_NAME"]
