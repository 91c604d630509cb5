"""Graph utilities shared by the matchers and the pass: emit a node with its fake value, erase dead
nodes, the stable topological sort, printable graph code. No pattern knowledge here."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree
from torch.fx import Graph, Node

import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)

# What the rewrites emit.
QKVZ_GEMM_OP = torch.ops.fx_passes.qkvz_gemm.default
QKVZ_LORA_OP = torch.ops.fx_passes.qkvz_lora_.default
QKVZ_GEMM_LORA_OP = torch.ops.fx_passes.qkvz_gemm_lora.default
SLICE_NAMES = ("q", "k", "v", "z", "b", "a")     # the op's output column blocks, in order


def emit(graph: Graph, target: Any, args: tuple, kwargs: Optional[dict] = None) -> Node:
    """Create a call_function node and its ``meta['val']`` from the inputs' fake values."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    tensors = [v for v in pytree.tree_leaves((fake_args, fake_kwargs)) if isinstance(v, torch.Tensor)]
    mode = torch._guards.detect_fake_mode(tensors)
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def erase_dead(graph: Graph, candidates: set[Node]) -> list[str]:
    """Erase the nodes of ``candidates`` left without users (repeatedly); returns their names."""
    removed, changed = [], True
    candidates = set(candidates)
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users:
                removed.append(node.name)
                candidates.discard(node)
                graph.erase_node(node)
                changed = True
    return removed


def finish_rewrite(graph: Graph) -> None:
    """After a rewrite: restore topological order, check the graph, regenerate the module's code."""
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(graph)
    graph.lint()
    if graph.owning_module is not None:
        graph.owning_module.recompile()


def graph_code(graph: Graph) -> str:
    module = graph.owning_module
    if module is not None:
        return module.print_readable(print_output=False)
    return str(graph)


__all__ = ["QKVZ_GEMM_OP", "QKVZ_LORA_OP", "QKVZ_GEMM_LORA_OP", "SLICE_NAMES", "emit", "erase_dead", "finish_rewrite", "graph_code"]
