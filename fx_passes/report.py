"""What the pass saw: one :class:`LayerMatch` per GDN layer candidate, one :class:`GraphReport` per graph.

Reports hold names and numbers only (no graph references), so a pass instance that keeps them
stays picklable and deep-copyable.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
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
    folded: list[str] = dataclasses.field(default_factory=list)   # the projections in the one op, in column order
    ba_reason: Optional[str] = None         # why b / a were not folded in (the layer has them, or may)
    slice_sizes: list[int] = dataclasses.field(default_factory=list)   # [key, key, value, value(, nv, nv)]
    adapters: list[str] = dataclasses.field(default_factory=list)      # one entry per LoRA op emitted
    lora_slices: list[list[str]] = dataclasses.field(default_factory=list)  # slices each LoRA op covers
    shared_a: bool = False                  # q, k, v share one A: their shrink runs once
    weights_packed: Optional[bool] = None   # the op's weights adjacent in one buffer when the graph runs
    packing: Optional[str] = None           # who packed them, or why they stay unpacked
    kernel: Optional[str] = None            # which ops the layer now runs
    autocast: Optional[str] = None          # the dtype autocast ran the layer's GEMMs in (the op's inputs cast to it)
    scale_in_b: bool = False                # symbolic LoRA scalings (dynamic=True): scale * B is the op's B
    removed_nodes: list[str] = dataclasses.field(default_factory=list)
    new_nodes: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        if self.rewritten:
            packed = {True: "packed", False: "NOT packed (a GEMM launch per weight)",
                      None: "unknown"}[self.weights_packed]
            if self.packing:
                packed += f" ({self.packing})"
            extra = f"; b/a not folded: {self.ba_reason}" if self.ba_reason else ""
            extra += f"; under autocast: inputs cast to {self.autocast}" if self.autocast else ""
            extra += "; symbolic LoRA scalings: scale * B enters the op" if self.scale_in_b else ""
            return (f"REWRITTEN {self.layer}: {' + '.join(self.folded) or self.qkv_node} -> {self.kernel}; "
                    f"slices {self.slice_sizes}; LoRA {self.lora_slices or 'none'}; "
                    f"shared A for q,k,v: {self.shared_a}; weights {packed}{extra}")
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


# The ops a rewritten layer runs; each rewritten layer emits exactly one qkvz_gemm or qkvz_gemm_lora.
FUSED_OPS = ("qkvz_gemm_lora", "qkvz_gemm", "qkvz_lora_")
_LAYER_OPS = ("qkvz_gemm_lora", "qkvz_gemm")
# What a layer fused by the training rewrite (fx_passes.fusion.train_lora_fusion) runs: the op in the forward
# graph, its backward ops in the backward graph.
TRAIN_OPS = ("qkvz_lora_train", "qkvz_lora_train_backward")
# A call of one of our ops in Inductor's output code: the Python wrapper's `torch.ops.fx_passes.<op>.default(`
# or the C++ wrapper's "fx_passes::<op>" (comment lines, which name source nodes, are skipped).
_CALL_RE = re.compile(r"torch\.ops\.fx_passes\.(\w+)\.default\(|\"fx_passes::(\w+)\"")

PASS_RAN = "pass"
FROM_CACHE = "fx_graph_cache"
NOT_RUN = "pass_not_run"


def count_op_calls(source_code: str) -> dict[str, int]:
    """Calls of fx_passes ops in a compiled graph's output code, by op name."""
    counts: collections.Counter = collections.Counter()
    for line in source_code.splitlines():
        if line.lstrip().startswith(("#", "//")):
            continue
        for match in _CALL_RE.finditer(line):
            counts[match.group(1) or match.group(2)] += 1
    return dict(sorted(counts.items()))


class LayerViews:
    """``rewritten`` / ``skipped`` over a ``layers`` list (a graph's report, a dump's)."""

    layers: list

    @property
    def rewritten(self) -> list[LayerMatch]:
        return [layer for layer in self.layers if layer.rewritten]

    @property
    def skipped(self) -> list[LayerMatch]:
        return [layer for layer in self.layers if not layer.rewritten]


@dataclasses.dataclass
class GraphReport(LayerViews):
    """One compiled graph. ``source`` says where its code came from: ``"pass"`` (the pass ran on it:
    ``layers`` and the op counts are filled), ``"fx_graph_cache"`` (Inductor served the compiled code
    from its cache, so the pass did not run; ``code_op_calls`` counts our ops in that code) or
    ``"pass_not_run"`` (compiled, but the pass was not called in this process)."""

    pass_name: str
    graph_index: int
    layers: list[LayerMatch] = dataclasses.field(default_factory=list)
    ops_before: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_after: dict[str, int] = dataclasses.field(default_factory=dict)
    source: str = PASS_RAN
    code_op_calls: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def fused_layers(self) -> int:
        """GDN layers that run fused in this graph: rewritten ones, or for a graph served from a cache
        the qkvz_gemm / qkvz_gemm_lora calls in its code (one per rewritten layer)."""
        if self.source == PASS_RAN:
            return len(self.rewritten)
        return sum(self.code_op_calls.get(op, 0) for op in _LAYER_OPS)


    def summary(self) -> str:
        if self.source != PASS_RAN:
            calls = ", ".join(f"{n} fx_passes.{op}" for op, n in self.code_op_calls.items()) or "no fx_passes op"
            why = ("served from Inductor's FX graph cache, the pass did not run" if self.source == FROM_CACHE
                   else "the pass was not called for it in this process")
            return f"{self.pass_name} graph {self.graph_index}: {why}; its compiled code calls {calls}"
        trained = {op: self.ops_before.get(f"fx_passes.{op}.default", 0) for op in TRAIN_OPS}
        if not self.layers and any(trained.values()):   # a training graph the backend rewrote before AOTAutograd
            calls = ", ".join(f"{n} fx_passes.{op}" for op, n in trained.items() if n)
            return (f"{self.pass_name} graph {self.graph_index}: no GDN layer left to fuse: fused by the training "
                    f"rewrite ({calls})")
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
        return dataclasses.asdict(self) | {"summary": self.summary(), "fused_layers": self.fused_layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
