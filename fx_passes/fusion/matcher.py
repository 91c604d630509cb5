"""The matching engine: reads linears, LoRA terms and sums out of a post-grad ATen graph.

Nothing here knows about Qwen3.5; :mod:`fx_passes.fusion.qkvz_lora_fusion` holds the pattern.
Every matcher either returns a description of what it matched or raises :class:`NoMatch` naming
the node and the condition that failed, so a near miss can be reported as precisely as a hit.

Forms read (post-grad, functionalized)::

    linear      mm(x2d, permute(W, [1, 0]))                       W: [n, H]
                addmm(c, x2d, permute(W, [1, 0]))  ==  c + linear   (Inductor's addmm form)
    LoRA term   mul(view?(mm(mm(cast?(view?(x)), permute(A)), permute(B))), scale)
                scale: a Python number or a 0-d tensor (dynamic=True); no mul when removed as a no-op
    sum         add(add(base, term_1), term_2) ... through reshape / view / dtype casts
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims

MM_OPS = (aten.mm.default,)
ADDMM_OPS = (aten.addmm.default,)
ADD_OPS = (aten.add.Tensor,)
MUL_OPS = (aten.mul.Tensor,)
VIEW_OPS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
CAST_OPS = (prims.convert_element_type.default, aten._to_copy.default)
TRANSPOSE_OPS = (aten.permute.default, aten.t.default)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NoMatch(Exception):
    """A condition failed at ``node``; ``reason`` says which."""

    def __init__(self, node: Optional[Node], reason: str):
        super().__init__(f"{node.name if node is not None else '<graph>'}: {reason}")
        self.node = node
        self.reason = reason

    @property
    def node_name(self) -> Optional[str]:
        return self.node.name if self.node is not None else None


def fake_value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def is_call(node: Any, targets: tuple) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _strip(node: Node, targets: tuple, seen: Optional[list] = None) -> Node:
    while is_call(node, targets):
        if is_call(node, CAST_OPS) and not _is_float_cast(node):
            break
        if seen is not None:
            seen.append(node)
        node = node.args[0]
    return node


def _is_float_cast(node: Node) -> bool:
    """A dtype-only cast to a float dtype (no device / layout change)."""
    if node.target is prims.convert_element_type.default:
        return node.args[1] in FLOAT_DTYPES
    extra = set(node.kwargs) - {"dtype"}
    return node.kwargs.get("dtype") in FLOAT_DTYPES and not extra and len(node.args) == 1


def strip_views(node: Node, seen: Optional[list] = None) -> Node:
    return _strip(node, VIEW_OPS, seen)


def strip_views_and_casts(node: Node, seen: Optional[list] = None) -> Node:
    return _strip(node, VIEW_OPS + CAST_OPS, seen)


# ---------------------------------------------------------------- module paths

_DYNAMO_PREFIX = re.compile(r"^L\['[^']+'\]")
_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]")
_SUBSCRIPT = re.compile(r"\['([^']+)'\]")


def clean_module_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['base_model'].model.layers.0`` -> ``base_model.model.layers.0``."""
    path = _DYNAMO_PREFIX.sub("", path)
    path = _DICT_MODULES.sub(r".\1", path)
    path = _SUBSCRIPT.sub(r".\1", path)
    return path.strip(".")


def module_stack(node: Node) -> list[tuple[str, str]]:
    """``[(clean path, class name), ...]`` outermost first; empty when the graph carries none."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) else (value, "")
        out.append((clean_module_path(str(path)), getattr(cls, "__name__", str(cls))))
    return out


def module_path(node: Node) -> Optional[str]:
    stack = module_stack(node)
    return stack[-1][0] if stack else None


# ---------------------------------------------------------------- leaves

@dataclasses.dataclass
class LinearLeaf:
    """``x2d @ weight.T`` read from an ``mm`` (or the mm half of an ``addmm``)."""
    node: Node            # the mm (or addmm) node
    x2d: Node             # 2-D activation operand
    x_source: Node        # x2d with reshapes stripped: identifies "the same input"
    weight: Node          # [n, H]
    interior: list[Node]  # nodes that exist only for this leaf (transpose, mm)

    @property
    def out_features(self) -> int:
        return fake_value(self.weight).shape[0]


@dataclasses.dataclass
class LoraLeaf:
    """``scale * (x @ A.T) @ B.T``."""
    top: Node
    x2d: Node
    x_source: Node                 # the activation with reshapes and dtype casts stripped
    lora_a: Node                   # [r, H]
    lora_b: Node                   # [n, r]
    scale: Union[float, Node]      # Python number, or a 0-d tensor node
    shrink: Node                   # the x @ A.T mm
    interior: list[Node]
    adapter: Optional[str] = None  # PEFT adapter name from the module path, when present

    @property
    def out_features(self) -> int:
        return fake_value(self.lora_b).shape[0]


def _transposed_weight(node: Any) -> Optional[Node]:
    """``W`` for ``permute(W, [1, 0])`` / ``t(W)`` of a 2-D ``W``, else None."""
    if not is_call(node, TRANSPOSE_OPS):
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    weight = node.args[0]
    val = fake_value(weight)
    if not isinstance(weight, Node) or val is None or val.dim() != 2:
        return None
    return weight


def match_linear_operands(node: Node, x2d: Any, wt: Any) -> LinearLeaf:
    weight = _transposed_weight(wt)
    if weight is None:
        raise NoMatch(node, "second GEMM operand is not permute(W, [1, 0]) of a 2-D weight")
    if not isinstance(x2d, Node) or fake_value(x2d) is None or fake_value(x2d).dim() != 2:
        raise NoMatch(node, "first GEMM operand is not a 2-D tensor")
    return LinearLeaf(node=node, x2d=x2d, x_source=strip_views(x2d), weight=weight, interior=[wt, node])


def match_linear(node: Node) -> LinearLeaf:
    if not is_call(node, MM_OPS):
        raise NoMatch(node, f"expected aten.mm, found {node.target}")
    return match_linear_operands(node, node.args[0], node.args[1])


def _split_scale(node: Node) -> tuple[Node, Union[float, Node], list[Node]]:
    """``mul(p, s)`` -> (p, s, [mul, cast?]); anything else -> (node, 1.0, [])."""
    if not is_call(node, MUL_OPS):
        return node, 1.0, []
    lhs, rhs = node.args[0], node.args[1]
    for product, scale in ((lhs, rhs), (rhs, lhs)):
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return product, float(scale), [node]
        val = fake_value(scale)
        if isinstance(scale, Node) and val is not None and val.dim() == 0 and val.is_floating_point():
            return product, scale, [node]
    return node, 1.0, []   # a product of two tensors: the rank-1 expand itself (see match_lora_term)


_SQUEEZE = (aten.squeeze.dim,)
_SUM = (aten.sum.dim_IntList,)
_UNSQUEEZE = (aten.unsqueeze.default,)


def match_shrink(node: Any) -> tuple[Node, Node, list[Node]]:
    """``x2d @ A.T`` -> (x2d, A, the nodes computing it). Two forms: ``mm(x2d, permute(A))``, and the
    dot product Inductor makes of a [1, H] x [H, 1] mm (one token, rank 1):
    ``unsqueeze(sum(mul(squeeze(x2d, 0), squeeze(permute(A), -1)), [0], True), 0)``."""
    if is_call(node, MM_OPS):
        lora_a = _transposed_weight(node.args[1])
        if lora_a is None:
            raise NoMatch(node, "LoRA shrink: second operand is not permute(A, [1, 0])")
        return node.args[0], lora_a, [node, node.args[1]]
    if is_call(node, _UNSQUEEZE) and node.args[1] == 0 and is_call(node.args[0], _SUM):
        total = node.args[0]
        product = total.args[0]
        if list(total.args[1]) == [0] and (total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim")) \
                and is_call(product, MUL_OPS) and "dtype" not in total.kwargs:
            for xs, at in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
                if is_call(xs, _SQUEEZE) and is_call(at, _SQUEEZE) and xs.args[1] == 0 and at.args[1] in (-1, 1):
                    lora_a = _transposed_weight(at.args[0])
                    if lora_a is not None and fake_value(lora_a).shape[0] == 1:
                        return xs.args[0], lora_a, [node, total, product, xs, at, at.args[0]]
    raise NoMatch(node, "LoRA expand input is not an mm(x, permute(A)) (nor its one-token rank-1 dot form)")


def _rank1_expand(node: Node) -> tuple[Node, Node]:
    """Rank 1: Inductor makes the [T, 1] x [1, N] expand an outer product, ``mul(s, permute(B))``;
    returns (B, s)."""
    if is_call(node, MUL_OPS) and all(isinstance(a, Node) for a in node.args[:2]):
        for s, bt in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            lora_b, sv = _transposed_weight(bt), fake_value(s)
            if lora_b is not None and fake_value(lora_b).shape[1] == 1 and sv is not None and sv.dim() == 2 \
                    and sv.shape[1] == 1:
                return lora_b, s
    raise NoMatch(node, "LoRA term: expected mm(shrink, permute(B)) (or its rank-1 outer-product form)")


def match_lora_term(node: Node) -> LoraLeaf:
    product, scale, interior = _split_scale(node)
    views: list[Node] = []
    expand = strip_views(product, views)
    interior += views
    if is_call(expand, MM_OPS):
        lora_b = _transposed_weight(expand.args[1])
        if lora_b is None:
            raise NoMatch(expand, "LoRA expand: second operand is not permute(B, [1, 0])")
        shrink = expand.args[0]
    else:
        lora_b, shrink = _rank1_expand(expand)
    x2d, lora_a, shrink_nodes = match_shrink(shrink)
    if not isinstance(x2d, Node) or fake_value(x2d) is None or fake_value(x2d).dim() != 2:
        raise NoMatch(shrink, "LoRA shrink input is not a 2-D tensor")
    if fake_value(lora_b).shape[1] != fake_value(lora_a).shape[0]:
        raise NoMatch(expand, "LoRA rank of A and B differ")
    interior += [expand, expand.args[1], *shrink_nodes]
    adapter = None
    path = module_path(shrink) or ""
    found = re.search(r"\.lora_A\.([^.]+)$", path)
    if found:
        adapter = found.group(1)
    return LoraLeaf(top=node, x2d=x2d, x_source=strip_views_and_casts(x2d), lora_a=lora_a, lora_b=lora_b,
                    scale=scale, shrink=shrink, interior=interior, adapter=adapter)


# ---------------------------------------------------------------- sums

@dataclasses.dataclass
class SumMatch:
    end: Node
    linears: list[LinearLeaf]
    loras: list[LoraLeaf]
    interior: list[Node]  # adds, views and casts between the leaves and ``end`` (``end`` included)
    biases: list[Node] = dataclasses.field(default_factory=list)   # 1-D addends (a linear's bias)

    def all_nodes(self) -> list[Node]:
        nodes = list(self.interior)
        for leaf in (*self.linears, *self.loras):
            nodes += leaf.interior
        return nodes


def decompose_sum(end: Node) -> SumMatch:
    """Split ``end`` into linear, LoRA and bias (1-D) addends through add / addmm / reshape / cast."""
    linears: list[LinearLeaf] = []
    loras: list[LoraLeaf] = []
    interior: list[Node] = []
    biases: list[Node] = []

    def visit(node: Any) -> None:
        if not isinstance(node, Node):
            raise NoMatch(end, f"addend {node!r} is not a tensor")
        if is_call(node, VIEW_OPS) or (is_call(node, CAST_OPS) and _is_float_cast(node)):
            interior.append(node)
            visit(node.args[0])
        elif is_call(node, ADD_OPS):
            if node.kwargs.get("alpha", 1) != 1:
                raise NoMatch(node, "add with alpha != 1")
            interior.append(node)
            visit(node.args[0])
            visit(node.args[1])
        elif is_call(node, ADDMM_OPS):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise NoMatch(node, "addmm with beta or alpha != 1")
            visit(node.args[0])
            try:
                leaf = match_linear_operands(node, node.args[1], node.args[2])
            except NoMatch:
                # LoRA expand folded into addmm: addmm(base, shrink, permute(B)), scale 1.0
                loras.append(_lora_from_addmm(node))
                return
            linears.append(leaf)
        elif is_call(node, MM_OPS):
            linears.append(match_linear(node))
        elif fake_value(node) is not None and getattr(fake_value(node), "dim", lambda: -1)() == 1:
            biases.append(node)
        else:
            try:
                loras.append(match_lora_term(node))
            except NoMatch as lora_miss:
                raise NoMatch(lora_miss.node, f"addend is neither a linear nor a LoRA term ({lora_miss.reason})")

    visit(end)
    return SumMatch(end=end, linears=linears, loras=loras, interior=interior, biases=biases)


def _lora_from_addmm(node: Node) -> LoraLeaf:
    lora_b = _transposed_weight(node.args[2])
    shrink = node.args[1]
    if lora_b is None:
        raise NoMatch(node, "addmm is neither base + linear nor base + LoRA expand")
    x2d, lora_a, shrink_nodes = match_shrink(shrink)
    found = re.search(r"\.lora_A\.([^.]+)$", module_path(shrink) or "")
    return LoraLeaf(top=node, x2d=x2d, x_source=strip_views_and_casts(x2d), lora_a=lora_a, lora_b=lora_b,
                    scale=1.0, shrink=shrink, interior=[node, node.args[2], *shrink_nodes],
                    adapter=found.group(1) if found else None)


def forward_chain(start: Node) -> list[Node]:
    """``start`` and each single user after it that can extend a sum (add, addmm, view, cast)."""
    chain = [start]
    node = start
    while len(node.users) == 1:
        user = next(iter(node.users))
        extends = (is_call(user, ADD_OPS + ADDMM_OPS + VIEW_OPS)
                   or (is_call(user, CAST_OPS) and _is_float_cast(user)))
        if not extends:
            break
        chain.append(user)
        node = user
    return chain


def check_users_inside(nodes: list[Node], allowed: set[Node], keep: set[Node]) -> None:
    """Every node that will be removed has only users inside the rewrite."""
    for node in nodes:
        if node in keep:
            continue
        outside = [u for u in node.users if u not in allowed]
        if outside:
            raise NoMatch(node, f"used outside the pattern by {', '.join(u.name for u in outside)}"
                                f" (e.g. saved for backward)")


__all__ = [
    "NoMatch", "LinearLeaf", "LoraLeaf", "SumMatch", "decompose_sum", "forward_chain", "match_linear",
    "match_lora_term", "match_shrink", "module_path", "module_stack", "clean_module_path", "strip_views",
    "strip_views_and_casts", "fake_value", "is_call", "check_users_inside",
]
