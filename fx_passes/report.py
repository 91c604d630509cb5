"""What the pass saw: one :class:`LayerMatch` per GDN layer candidate, one :class:`GraphReport` per graph.

Reports hold names and numbers only (no graph references), so a pass instance that keeps them
stays picklable and deep-copyable.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Optional

import torch


@dataclasses.dataclass
class LayerMatch:
    layer: str                              # module path of the GDN layer, or "structural:<mm node>"
    rewritten: bool
    reason: Optional[str] = None            # the failed condition when not rewritten
    node: Optional[str] = None              # the node where it failed
    qkv_node: Optional[str] = None          # the base in_proj_qkv GEMM
    z_node: Optional[str] = None            # the base in_proj_z GEMM
    identified_by: str = "module_path"      # or "structure"
    slice_sizes: list[int] = dataclasses.field(default_factory=list)   # [key, key, value, value]
    adapters: list[str] = dataclasses.field(default_factory=list)      # one entry per LoRA op emitted
    lora_slices: list[list[str]] = dataclasses.field(default_factory=list)  # slices each LoRA op covers
    shared_a: bool = False                  # q, k, v share one A: their shrink runs once
    weights_packed: Optional[bool] = None   # W_qkv, W_z adjacent in one buffer at compile time
    kernel: Optional[str] = None            # which ops the layer now runs
    removed_nodes: list[str] = dataclasses.field(default_factory=list)
    new_nodes: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        if self.rewritten:
            packed = {True: "packed", False: "NOT packed (2 GEMM launches)", None: "unknown"}[self.weights_packed]
            return (f"REWRITTEN {self.layer}: {self.qkv_node} + {self.z_node} -> {self.kernel}; "
                    f"slices {self.slice_sizes}; LoRA {self.lora_slices or 'none'}; "
                    f"shared A for q,k,v: {self.shared_a}; weights {packed}")
        return f"SKIPPED   {self.layer}: at node {self.node}: {self.reason}"


def count_ops(graph: torch.fx.Graph) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for node in graph.nodes:
        if node.op == "call_function":
            target = node.target
            name = getattr(target, "__name__", str(target))
            if hasattr(target, "_schema"):
                name = str(target._schema.name).replace("::", ".") + "." + (target._overloadname or "default")
            if name == "auto_functionalized" and node.args:
                name = f"auto_functionalized({getattr(node.args[0], '__name__', node.args[0])})"
            counts[name] += 1
    return dict(sorted(counts.items()))


@dataclasses.dataclass
class GraphReport:
    pass_name: str
    graph_index: int
    layers: list[LayerMatch] = dataclasses.field(default_factory=list)
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rewritten(self) -> list[LayerMatch]:
        return [layer for layer in self.layers if layer.rewritten]

    @property
    def skipped(self) -> list[LayerMatch]:
        return [layer for layer in self.layers if not layer.rewritten]

    def summary(self) -> str:
        return (f"{self.pass_name} graph {self.graph_index}: {len(self.layers)} GDN layer(s) found, "
                f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped")

    def op_delta(self) -> dict[str, tuple[int, int]]:
        keys = sorted(set(self.ops_before) | set(self.ops_after))
        return {k: (self.ops_before.get(k, 0), self.ops_after.get(k, 0))
                for k in keys if self.ops_before.get(k, 0) != self.ops_after.get(k, 0)}

    def to_text(self) -> str:
        lines = [self.summary()]
        lines += ["  " + layer.line() for layer in self.layers]
        delta = self.op_delta()
        if delta:
            lines.append("  op counts that changed (before -> after):")
            lines += [f"    {name}: {before} -> {after}" for name, (before, after) in delta.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"summary": self.summary()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
