"""Fuse each Qwen3.5 GatedDeltaNet layer's input projections (in_proj_qkv, in_proj_z, and the gates'
in_proj_b / in_proj_a) and their LoRA adds into one op.

Unfused (per GDN layer, PEFT LoRA, post-grad ATen)::

    x2d = reshape(x, [T, H])
    qkv = mm(x2d, W_qkv.T) --+-- add ---------------------------- (cast) --> conv1d -> split[k, k, v]
      s_qkv = mm(x2d, A_qkv.T) -> mm(., B_qkv.T) -> mul(., scale) -+
    z   = mm(x2d, W_z.T)   --+-- add ---------------------------- (cast) --> gated RMSNorm
      s_z   = mm(x2d, A_z.T)   -> mm(., B_z.T)   -> mul(., scale) -+

Fused::

    y  = fx_passes.qkvz_gemm(x2d, W_qkv, W_z)                    # one GEMM, [T, 2k + 2v]
    y' = auto_functionalized(fx_passes.qkvz_lora_, out=y, x=x2d,
             lora_a=[A_qkv, A_z], lora_b=[B_qkv[:k], B_qkv[k:2k], B_qkv[2k:], B_z],
             slice_a=[0, 0, 0, 1], slice_start=[0, k, 2k, 2k + v])   # one 4-slice LoRA op,
                                                                     # shrink of A_qkv runs once
    qkv = slice(y', 1, 0, 2k + v)   z = slice(y', 1, 2k + v, 2k + 2v)   (views, reshaped as before)

With ``QkvzFusionConfig.gemm_lora_op`` (the default) a layer with exactly one LoRA op gets the two as
ONE functional op, ``y' = fx_passes.qkvz_gemm_lora(x2d, [W_qkv, W_z], lora_a=..., lora_b=..., ...)``,
whose CUDA kernel at decode runs the LoRA expand in the GEMM's epilogue. Several LoRA ops per layer
(several active adapters, or per-projection tensor scales under ``dynamic=True``) keep the two-op form.

The gates (``QkvzFusionConfig.fold_ba``, on by default): ``b = in_proj_b(x)`` and ``a = in_proj_a(x)``
(``num_v_heads`` outputs each, feeding sigmoid / softplus) read the same x, so they join the op as two
more weights and, with their LoRA, two more slices with their own A groups::

    y' = fx_passes.qkvz_gemm_lora(x2d, [W_qkv, W_z, W_b, W_a],
             lora_a=[A_qkv, A_z, A_b, A_a], lora_b=[B_qkv[:k], B_qkv[k:2k], B_qkv[2k:], B_z, B_b, B_a],
             slice_a=[0, 0, 0, 1, 2, 3], slice_start=[0, k, 2k, 2k + v, 2k + 2v, 2k + 2v + nv])
    qkv, z, b, a = column slices of y'

Only the projections a LoRA targets get slices (PEFT's default targets leave b / a without any). A
layer whose b / a cannot be folded (another input, another dtype, an unknown LoRA form, ...) keeps the
qkv / z rewrite and its b / a GEMMs as they were; the reason is in ``LayerMatch.ba_reason``.

A layer is rewritten only when every condition below holds; otherwise it stays as it was and
the failed condition (with its node) is recorded in the :class:`~fx_passes.report.LayerMatch`:

* both base GEMMs read the same activation and have the GDN shape ``N_qkv = 2 * key + N_z``
  (b / a: the same activation, values cast alike, the same dtype and device);
* each projection's output is ``base + sum(LoRA terms)`` through add / addmm / view / cast only,
  the LoRA terms read that same activation (not a dropout of it) and every removed node has no
  user outside the pattern (nothing saved for backward);
* no LoRA node of the layer (``...in_proj_qkv.lora_*``) is left outside the match (DoRA,
  mixed-batch ``adapter_names``, unknown variants);
* float dtypes only; the result dtype equals the base GEMM's dtype.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import logging
import operator
import os
import re
from typing import Any, Optional

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, Node

from fx_passes.fusion.fx_utils import (
    QKVZ_GEMM_LORA_OP, QKVZ_GEMM_OP, QKVZ_LORA_OP, SLICE_NAMES, emit, erase_dead, finish_rewrite, graph_code,
)
from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.matcher import (
    ADDMM_OPS, FLOAT_DTYPES, MM_OPS, VIEW_OPS, CAST_OPS, LinearLeaf, LoraLeaf, NoMatch, SumMatch,
    check_users_inside, decompose_sum, fake_value, forward_chain, is_call, match_linear,
    match_linear_operands, module_path, strip_views,
)
from fx_passes.ops.qkvz_gemm import weights_are_packed
from fx_passes.report import GraphReport, LayerMatch, count_op_calls, count_ops

logger = logging.getLogger("fx_passes")

aten = torch.ops.aten
SPLIT_OPS = (aten.split_with_sizes.default, aten.split.Tensor)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rewrite_source_files() -> tuple[str, ...]:
    """Every source file of the package: any of them can change what the rewrite emits."""
    return tuple(sorted(glob.glob(os.path.join(_PACKAGE_DIR, "**", "*.py"), recursive=True)))


@dataclasses.dataclass
class _Candidate:
    layer: str
    qkv: Node
    z: Node
    identified_by: str
    prefix: Optional[str] = None   # module path of the layer when identified by module path
    gates: list = dataclasses.field(default_factory=list)   # [(name, base GEMM node)] of b and a
    gates_missing: Optional[str] = None                      # why there are none to fold


@dataclasses.dataclass
class _Projection:
    base: LinearLeaf
    chain: SumMatch
    out_shape_arg: Optional[Any]   # shape of the reshape back to [B, S, n], if any

    @property
    def bias(self) -> Optional[Node]:
        return self.chain.biases[0] if self.chain.biases else None


class QkvzLoraFusionPass(CustomGraphPass):
    """Post-grad pass: one qkvz GEMM + one batched 4-slice LoRA op per Qwen3.5 GDN layer.

    Usable as ``torch._inductor.config.post_grad_custom_post_pass`` (it is a
    ``CustomGraphPass``: ``__call__(graph)`` and ``uuid()``). Keeps ``matched_count`` and one
    :class:`~fx_passes.report.GraphReport` per graph it ran on, in ``reports``.
    """

    pass_name = "qkvz_lora_fusion"

    def __init__(self, config: Optional[QkvzFusionConfig] = None):
        self.config = config or QkvzFusionConfig()
        self.matched_count = 0
        self.reports: list[GraphReport] = []
        # layer -> (packed, note), set by the fx_passes backend for the graph it compiles: the weight
        # pairs it will pack once the compile succeeded (the graph's fake tensors still show them apart)
        self.packing_notes: dict[str, tuple[bool, str]] = {}

    # ------------------------------------------------------------ CustomGraphPass
    def uuid(self) -> str:
        digest = hashlib.sha256(f"{self.pass_name}|{self.config.cache_key()}|torch={torch.__version__}".encode())
        for path in rewrite_source_files():  # read every time: torch's get_hash_for_files caches per process
            with open(path, "rb") as source:
                digest.update(os.path.relpath(path, _PACKAGE_DIR).encode() + b"\0" + source.read())
        return digest.hexdigest()

    def __call__(self, graph: Graph) -> None:
        """One graph: report -> match + rewrite (:meth:`match_and_rewrite`) -> sort / lint / recompile ->
        count -> log -> dump. Subclasses add forms by overriding :meth:`match_and_rewrite` only."""
        report = GraphReport(pass_name=self.pass_name, graph_index=len(self.reports))
        report.ops_before = count_ops(graph)
        before = graph_code(graph) if self.config.dump_dir else None
        self.match_and_rewrite(graph, report)
        if report.rewritten:
            finish_rewrite(graph)
        report.ops_after = count_ops(graph)
        self._record(report, before, graph_code(graph) if self.config.dump_dir else None)

    def record_compiled_elsewhere(self, source: str, source_code: Optional[str]) -> GraphReport:
        """A graph Inductor compiled without calling this pass (``source``: ``report.FROM_CACHE``, the code
        came from its FX graph cache; ``report.NOT_RUN``, otherwise): reported with the fx_passes op calls
        its compiled code holds, so a warm cache is never a silent nothing."""
        report = GraphReport(pass_name=self.pass_name, graph_index=len(self.reports), source=source,
                             code_op_calls=count_op_calls(source_code or ""))
        self._record(report, None, source_code)
        return report

    def _record(self, report: GraphReport, before: Optional[str], after: Optional[str]) -> None:
        self.matched_count += len(report.rewritten)
        self.reports.append(report)
        # the report rides on the log record too: a logging.Handler gets it without holding this pass
        # (the registered "fx_passes" backend makes a fresh pass per graph)
        logger.info(report.summary(), extra={"fx_passes_report": report.to_dict()})
        for layer in report.layers:
            logger.debug("%s", layer.line())
        if self.config.dump_dir:
            from fx_passes.dump_files import write_pass_dump

            write_pass_dump(self.config.dump_dir, report, before, after)

    def match_and_rewrite(self, graph: Graph, report: GraphReport) -> None:
        """Find the GDN layers of ``graph`` and rewrite each one that is safe; one LayerMatch per
        candidate goes into ``report.layers`` (rewritten, or the node and condition that failed)."""
        for candidate in self._find_candidates(graph, report):
            report.layers.append(self._rewrite_layer(graph, candidate))

    # ------------------------------------------------------------ find
    def _find_candidates(self, graph: Graph, report: GraphReport) -> list[_Candidate]:
        cfg = self.config
        by_prefix: dict[str, dict[str, list[Node]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        names = (cfg.qkv_name, cfg.z_name, cfg.b_name, cfg.a_name)
        proj = re.compile(rf"^(.*)\.({'|'.join(map(re.escape, names))})(\.base_layer)?$")
        unnamed: list[Node] = []
        for node in graph.nodes:
            if not is_call(node, MM_OPS + ADDMM_OPS):
                continue
            path = module_path(node)
            if path is None:
                unnamed.append(node)
                continue
            found = proj.match(path)
            if found:
                by_prefix[found.group(1)][found.group(2)].append(node)
        candidates = []
        for prefix, found in by_prefix.items():
            qkv, z = found.get(cfg.qkv_name, []), found.get(cfg.z_name, [])
            if not qkv and not z:
                continue   # only b / a-named GEMMs here (another model's modules): no GDN layer
            if len(qkv) != 1 or len(z) != 1:
                report.layers.append(LayerMatch(
                    layer=prefix, rewritten=False, node=(qkv or z)[0].name,
                    reason=f"expected one base GEMM each for {cfg.qkv_name} and {cfg.z_name}, "
                           f"found {len(qkv)} and {len(z)}"))
                continue
            cand = _Candidate(prefix, qkv[0], z[0], "module_path", prefix)
            b, a = found.get(cfg.b_name, []), found.get(cfg.a_name, [])
            if len(b) == 1 and len(a) == 1:
                cand.gates = [(cfg.b_name, b[0]), (cfg.a_name, a[0])]
            else:
                cand.gates_missing = (f"expected one base GEMM each for {cfg.b_name} and {cfg.a_name}, "
                                      f"found {len(b)} and {len(a)}")
            candidates.append(cand)
        if cfg.structural_fallback:
            candidates += _structural_candidates(unnamed, (cfg.b_name, cfg.a_name))
        return candidates

    # ------------------------------------------------------------ match + rewrite
    def _rewrite_layer(self, graph: Graph, cand: _Candidate) -> LayerMatch:
        result = LayerMatch(layer=cand.layer, rewritten=False, qkv_node=cand.qkv.name, z_node=cand.z.name,
                            identified_by=cand.identified_by)
        cfg = self.config
        try:
            qkv, z = self._match_projection(cand, cand.qkv, cfg.qkv_name), \
                self._match_projection(cand, cand.z, cfg.z_name)
            key_dim, value_dim = _check_layer(qkv, z)
            projections = [(cfg.qkv_name, qkv), (cfg.z_name, z)]
            _pair_lora_terms(projections)
        except NoMatch as miss:
            result.reason, result.node = miss.reason, miss.node_name
            logger.debug("%s not rewritten: %s", cand.layer, miss)
            return result
        except Exception as error:  # noqa: BLE001  (a matcher bug must not break the user's compile)
            result.reason = f"internal error while matching (layer left as it was): {type(error).__name__}: {error}"
            logger.warning("fx_passes: %s not rewritten: %s", cand.layer, result.reason)
            return result
        gates, result.ba_reason = self._match_gates(cand, qkv) if cfg.fold_ba else ([], "fold_ba is off")
        if not cfg.fuse_without_lora and not _pair_lora_terms(projections + gates):
            result.reason, result.node = "layer has no LoRA and fuse_without_lora is off", cand.qkv.name
            return result
        attempts = [projections + gates, projections] if gates else [projections]
        for folded in attempts:
            error = self._emit_layer(graph, folded, key_dim, value_dim, result)
            if error is None:
                break
            if len(folded) > 2:   # the op refused the b / a slices: keep the qkv / z rewrite
                result.ba_reason = f"the fused op does not take them: {error}"
                continue
            result.reason = f"the fused op does not take this layer: {error}"
            logger.debug("%s not rewritten: %s", cand.layer, result.reason)
            return result
        if result.ba_reason:
            logger.debug("%s: b / a not folded: %s", cand.layer, result.ba_reason)
        removed = set()
        for _, proj in folded:
            removed |= _pattern_nodes(proj)
        result.removed_nodes = erase_dead(graph, removed)
        result.rewritten = True
        return result

    def _match_gates(self, cand: _Candidate, qkv: _Projection) -> tuple[list, Optional[str]]:
        """``([(name, projection) of b, of a], None)`` when both fold into the layer's op, else
        ``([], why not)``."""
        if not cand.gates:
            return [], cand.gates_missing
        try:
            gates = [(name, self._match_projection(cand, node, name)) for name, node in cand.gates]
            for name, gate in gates:
                _check_gate(qkv, gate, name)
            _pair_lora_terms(gates)   # the same adapter twice on one projection: not folded
        except NoMatch as miss:
            return [], f"{miss.node_name}: {miss.reason}"
        except Exception as error:  # noqa: BLE001  (a matcher bug must not cost the qkv / z rewrite)
            return [], f"internal error while matching: {type(error).__name__}: {error}"
        return gates, None

    def _emit_layer(self, graph: Graph, folded: list, key_dim: int, value_dim: int,
                    result: LayerMatch) -> Optional[str]:
        """Emit the layer's op over ``folded`` projections; None, or the op's error (graph unchanged)."""
        old_nodes = set(graph.nodes)
        weights = [fake_value(proj.base.weight) for _, proj in folded]
        result.folded = [name for name, _ in folded]
        result.slice_sizes = [key_dim, key_dim, value_dim, value_dim] + \
            [proj.base.out_features for _, proj in folded[2:]]
        result.weights_packed = weights_are_packed(weights)
        result.packing = None
        if not result.weights_packed and result.layer in self.packing_notes:
            count, result.packing = self.packing_notes[result.layer]
            result.weights_packed = count >= len(folded)
        result.kernel, result.adapters, result.lora_slices, result.shared_a = None, [], [], False
        try:
            _emit(graph, folded, key_dim, _pair_lora_terms(folded), result, self.config.gemm_lora_op)
        except Exception as error:  # noqa: BLE001  (the op refused: undo)
            for node in reversed([n for n in graph.nodes if n not in old_nodes]):
                graph.erase_node(node)
            result.kernel, result.adapters, result.lora_slices, result.folded = None, [], [], []
            return f"{type(error).__name__}: {error}"
        result.new_nodes = [n.name for n in graph.nodes if n not in old_nodes]
        return None

    def _match_projection(self, cand: _Candidate, base_node: Node, proj_name: str) -> _Projection:
        if is_call(base_node, ADDMM_OPS):
            base = match_linear_operands(base_node, base_node.args[1], base_node.args[2])
        else:
            base = match_linear(base_node)
        dtype = fake_value(base_node).dtype
        if dtype not in FLOAT_DTYPES:
            raise NoMatch(base_node, f"base GEMM dtype {dtype} is not fp16/bf16/fp32")
        chain, first_miss = None, None
        for end in reversed(forward_chain(base_node)):
            try:
                chain = _validate_chain(decompose_sum(end), base, dtype)
                break
            except NoMatch as miss:
                first_miss = first_miss or miss
        if chain is None:
            raise first_miss
        if cand.prefix is not None:
            _check_no_lora_left_behind(base_node.graph, f"{cand.prefix}.{proj_name}.", chain, first_miss)
        return _Projection(base=base, chain=chain, out_shape_arg=_reshape_arg(chain, base))


# ---------------------------------------------------------------- matching helpers

def _validate_chain(chain: SumMatch, base: LinearLeaf, dtype: torch.dtype) -> SumMatch:
    if len(chain.linears) != 1 or chain.linears[0].node is not base.node:
        extra = [leaf.node.name for leaf in chain.linears if leaf.node is not base.node]
        raise NoMatch(chain.end, f"sum holds other linears besides the base GEMM: {extra}")
    end_val = fake_value(chain.end)
    if end_val is None or end_val.dtype != dtype:
        raise NoMatch(chain.end, f"result dtype {getattr(end_val, 'dtype', None)} != base GEMM dtype {dtype}")
    n = base.out_features
    if end_val.shape[-1] != n:
        raise NoMatch(chain.end, f"result last dim {end_val.shape[-1]} != {n}")
    for view in (node for node in chain.interior if is_call(node, VIEW_OPS)):
        if fake_value(view).shape[-1] != n:
            raise NoMatch(view, "a reshape in the sum mixes output columns")
    if len(chain.biases) > 1:
        raise NoMatch(chain.end, f"{len(chain.biases)} 1-D addends (one bias expected)")
    for bias in chain.biases:
        if tuple(fake_value(bias).shape) != (n,) or fake_value(bias).dtype != dtype:
            raise NoMatch(bias, f"1-D addend {tuple(fake_value(bias).shape)} {fake_value(bias).dtype} is not a "
                                f"[{n}] {dtype} bias")
    for lora in chain.loras:
        if lora.out_features != n:
            raise NoMatch(lora.top, f"LoRA B has {lora.out_features} rows, the projection {n}")
        why = _input_mismatch(lora, base.x2d)
        if why is not None:
            raise NoMatch(lora.shrink, why)
        if fake_value(lora.lora_a).dtype not in FLOAT_DTYPES:
            raise NoMatch(lora.lora_a, f"LoRA weight dtype {fake_value(lora.lora_a).dtype} unsupported")
    removed = set(chain.all_nodes())
    check_users_inside([node for node in removed if node is not chain.end], removed, keep={base.weight})
    return chain


# what dropout leaves in a graph: aten's ops before Inductor's post-grad passes, its random ops after them
_RANDOM_OP_NAMES = ("dropout", "bernoulli", "inductor_random", "inductor_lookup_seed", "rand")


def _input_mismatch(lora: LoraLeaf, base_x2d: Node) -> Optional[str]:
    """None when the LoRA shrink reads exactly the values the op will give it -- the base GEMM's input
    cast to the adapters' dtype -- up to reshapes and float casts (PEFT casts x to its adapters'
    dtype; autocast casts both GEMMs' input down alike); else why not."""
    lora_chain, lora_root = _cast_chain(lora.x2d)
    base_chain, base_root = _cast_chain(base_x2d)
    if lora_root is not base_root:
        if _has_dropout(lora.x2d):
            return "LoRA input goes through dropout (training with lora_dropout > 0), the base GEMM's does not"
        return (f"LoRA input ({strip_views(lora.x2d).name}) is another tensor than the base GEMM's "
                f"({strip_views(base_x2d).name})")
    root_dtype = fake_value(lora_root).dtype
    adapter_dtype = fake_value(lora.lora_a).dtype
    theirs = _roundings(root_dtype, lora_chain)
    ours = _roundings(root_dtype, base_chain + [adapter_dtype])
    if theirs != ours:
        return (f"LoRA input is x rounded through {theirs or 'nothing'}, the fused op would give it x rounded "
                f"through {ours or 'nothing'} (the base GEMM's input cast to the adapters' {adapter_dtype})")
    return None


def _cast_chain(node: Node) -> tuple[list[torch.dtype], Node]:
    """The float dtypes cast to on the way from the root to ``node`` (views skipped), and the root."""
    dtypes = []
    while True:
        node = strip_views(node)
        val = fake_value(node)
        if not (is_call(node, CAST_OPS) and val is not None and val.is_floating_point()):
            return dtypes[::-1], node
        dtypes.append(val.dtype)
        node = node.args[0]


def _roundings(start: torch.dtype, casts: list[torch.dtype]) -> list[torch.dtype]:
    """The lossy roundings a value of dtype ``start`` goes through under ``casts``, in order: a cast to
    fp32 loses nothing, a cast to the 16-bit dtype the value already fits loses nothing."""
    fits = None if start == torch.float32 else start
    lossy = []
    for dtype in casts:
        if dtype == torch.float32 or dtype == fits:
            continue
        lossy.append(dtype)
        fits = dtype
    return lossy


def _same_values(a: Node, b: Node) -> bool:
    """``a`` and ``b`` are one tensor cast alike (autocast casts x once per GEMM)."""
    chain_a, root_a = _cast_chain(a)
    chain_b, root_b = _cast_chain(b)
    if root_a is not root_b or fake_value(a).dtype != fake_value(b).dtype:
        return False
    root_dtype = fake_value(root_a).dtype
    return _roundings(root_dtype, chain_a) == _roundings(root_dtype, chain_b)


def _has_dropout(node: Node, depth: int = 8) -> bool:
    """A random op (a dropout mask) within ``depth`` producers of ``node``."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.op == "call_function" and any(word in str(n.target) for word in _RANDOM_OP_NAMES):
                return True
            nxt += [a for a in n.all_input_nodes if a.op == "call_function"]
        frontier = nxt
    return False


def _check_no_lora_left_behind(graph: Graph, proj_prefix: str, chain: SumMatch, miss: Optional[NoMatch]) -> None:
    absorbed = set(chain.all_nodes())
    for lora in chain.loras:
        # the op reads A and B (and x) as they are: their casts (autocast) stay as its inputs
        absorbed |= _input_nodes(lora.x2d) | _input_nodes(lora.lora_a) | _input_nodes(lora.lora_b)
    for node in graph.nodes:
        path = module_path(node) if node.op == "call_function" else None
        if path and path.startswith(proj_prefix + "lora_") and node not in absorbed:
            why = f"; nearest miss: {miss.node_name}: {miss.reason}" if miss else ""
            raise NoMatch(node, f"LoRA node of {proj_prefix.rstrip('.')} is not part of a recognized "
                                f"LoRA add{why}")


def _input_nodes(x2d: Node) -> set[Node]:
    nodes, node = set(), x2d
    while is_call(node, VIEW_OPS + CAST_OPS):
        nodes.add(node)
        node = node.args[0]
    return nodes


def _reshape_arg(chain: SumMatch, base: LinearLeaf) -> Optional[Any]:
    """The shape the chain reshapes [T, n] back into, or None when the result stays 2-D."""
    end_shape = tuple(fake_value(chain.end).shape)
    if end_shape == tuple(fake_value(base.node).shape):
        return None
    for node in chain.interior:
        if is_call(node, VIEW_OPS) and tuple(fake_value(node).shape) == end_shape:
            return node.args[1]
    raise NoMatch(chain.end, f"cannot rebuild result shape {end_shape} from a reshape in the sum")


def _check_layer(qkv: _Projection, z: _Projection) -> tuple[int, int]:
    xq, xz = qkv.base.x_source, z.base.x_source
    if xq is not xz and not _same_values(qkv.base.x2d, z.base.x2d):
        raise NoMatch(z.base.node, f"{qkv.base.node.name} and {z.base.node.name} read different inputs "
                                   f"({xq.name} vs {xz.name})")
    vq, vz = fake_value(qkv.base.x2d), fake_value(z.base.x2d)
    if tuple(vq.shape) != tuple(vz.shape):
        raise NoMatch(z.base.node, "the two GEMM inputs have different 2-D shapes")
    wq, wz = fake_value(qkv.base.weight), fake_value(z.base.weight)
    if wq.dtype != wz.dtype or wq.dtype != vq.dtype:
        raise NoMatch(z.base.node, f"dtypes differ: x {vq.dtype}, W_qkv {wq.dtype}, W_z {wz.dtype}")
    if wq.device != wz.device:
        raise NoMatch(z.base.node, "the two weights live on different devices")
    n_qkv, value_dim = wq.shape[0], wz.shape[0]
    if (n_qkv - value_dim) <= 0 or (n_qkv - value_dim) % 2:
        raise NoMatch(qkv.base.node, f"N_qkv={n_qkv} is not 2 * key_dim + N_z (N_z={value_dim})")
    return (n_qkv - value_dim) // 2, value_dim


def _check_gate(qkv: _Projection, gate: _Projection, name: str) -> None:
    """b / a fold into the layer's op: the same x (values cast alike), 2-D shape, dtype and device."""
    if gate.base.x_source is not qkv.base.x_source and not _same_values(qkv.base.x2d, gate.base.x2d):
        raise NoMatch(gate.base.node, f"{name} reads another input ({gate.base.x_source.name}) than "
                                      f"{qkv.base.node.name} ({qkv.base.x_source.name})")
    if tuple(fake_value(gate.base.x2d).shape) != tuple(fake_value(qkv.base.x2d).shape):
        raise NoMatch(gate.base.node, f"{name}'s GEMM input has another 2-D shape")
    wq, wg = fake_value(qkv.base.weight), fake_value(gate.base.weight)
    if wg.dtype != wq.dtype or wg.device != wq.device:
        raise NoMatch(gate.base.node, f"{name} weight {wg.dtype} on {wg.device}, W_qkv {wq.dtype} on {wq.device}")


@dataclasses.dataclass
class _LoraOp:
    adapter: str
    leaves: dict   # projection name -> LoraLeaf, in column order


def _scale_key(leaf: LoraLeaf) -> Any:
    return ("node", leaf.scale) if isinstance(leaf.scale, Node) else ("float", float(leaf.scale))


def _pair_lora_terms(projections: list) -> list[_LoraOp]:
    """One op per adapter covering its slices on every projection (``[(name, _Projection)]``); an
    adapter's projections with different scales or adapter dtypes get one op each such group."""
    by_name: dict[str, dict[str, LoraLeaf]] = {}
    for side, proj in projections:
        for i, leaf in enumerate(proj.chain.loras):
            name = leaf.adapter or f"#{i}"
            if side in by_name.setdefault(name, {}):
                raise NoMatch(leaf.top, f"adapter {name} appears twice on one projection")
            by_name[name][side] = leaf
    ops = []
    for name, sides in by_name.items():
        shared: dict[Any, dict[str, LoraLeaf]] = {}
        for side, _ in projections:   # column order
            if side in sides:
                leaf = sides[side]
                shared.setdefault((_scale_key(leaf), fake_value(leaf.lora_a).dtype), {})[side] = leaf
        ops += [_LoraOp(name, leaves) for leaves in shared.values()]
    return ops


def _structural_candidates(mms: list[Node], gate_names: tuple[str, str]) -> list[_Candidate]:
    """GDN layers in graphs without module paths: shared input, N_qkv = 2k + N_z, split [k, k, N_z]
    downstream; b / a: the two other linears of that input with ``N_z / N`` an integer (head dim) whose
    output feeds no GEMM (a LoRA shrink's does)."""
    linears = []
    for node in mms:
        try:
            linears.append(match_linear(node))
        except NoMatch:
            continue
    by_input: dict[Node, list[LinearLeaf]] = collections.defaultdict(list)
    for leaf in linears:
        by_input[leaf.x_source].append(leaf)
    candidates = []
    for leaves in by_input.values():
        used: set[Node] = set()
        for q in leaves:
            for z in leaves:
                diff = q.out_features - z.out_features
                if q is z or q.node in used or z.node in used or diff <= 0 or diff % 2:
                    continue
                if _has_split_downstream(q.node, [diff // 2, diff // 2, z.out_features]):
                    cand = _Candidate(f"structural:{q.node.name}", q.node, z.node, "structure")
                    used |= {q.node, z.node}
                    # not a LoRA shrink (its [T, r] output feeds the expand's GEMM)
                    gates = [g for g in leaves if g.node not in used and g.out_features < z.out_features
                             and z.out_features % g.out_features == 0
                             and not any(is_call(u, MM_OPS + ADDMM_OPS) for u in g.node.users)]
                    if len(gates) == 2 and gates[0].out_features == gates[1].out_features:
                        cand.gates = list(zip(gate_names, (g.node for g in gates)))
                        used |= {g.node for g in gates}
                    else:
                        cand.gates_missing = (f"{len(gates)} other linear(s) of the same input with a width "
                                              f"dividing N_z (b and a expected)")
                    candidates.append(cand)
    return candidates


def _has_split_downstream(node: Node, sizes: list[int], max_nodes: int = 64) -> bool:
    seen, frontier = set(), [node]
    while frontier and len(seen) < max_nodes:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if is_call(current, SPLIT_OPS) and isinstance(current.args[1], (list, tuple)) \
                and list(current.args[1]) == sizes:
            return True
        frontier += list(current.users)
    return False


# ---------------------------------------------------------------- rewrite helpers

def _emit(graph: Graph, folded: list, key_dim: int, ops: list[_LoraOp], result: LayerMatch, one_op: bool) -> None:
    """The layer's op over ``folded`` = ``[(name, _Projection)]`` (qkv, z, then b / a when folded) and
    the column slices that replace each projection's result."""
    qkv_name = folded[0][0]
    starts, col = [], 0
    for _, proj in folded:
        starts.append(col)
        col += proj.base.out_features
    start_of = {name: start for (name, _), start in zip(folded, starts)}
    n_qkv = folded[0][1].base.out_features
    weights = [proj.base.weight for _, proj in folded]
    users = [u for _, proj in folded for u in proj.chain.end.users]
    order = {node: i for i, node in enumerate(graph.nodes)}
    anchor = min(users, key=order.__getitem__) if users else folded[0][1].chain.end.next
    x2d = folded[0][1].base.x2d
    names_of = {name: SLICE_NAMES[3 + i] for i, (name, _) in enumerate(folded[1:])}   # z, b, a
    with graph.inserting_before(anchor):   # (finish_rewrite sorts: inputs defined later move up)
        one_op = one_op and len(ops) <= 1
        if one_op:
            result.kernel = "fx_passes.qkvz_gemm_lora" if ops else "fx_passes.qkvz_gemm"
            fused = None if ops else emit(graph, QKVZ_GEMM_OP, (x2d, weights))
        else:
            fused = emit(graph, QKVZ_GEMM_OP, (x2d, weights))
            result.kernel = "fx_passes.qkvz_gemm" + "".join(" + fx_passes.qkvz_lora_" for _ in ops)
        for op in ops:
            lora_a, lora_b, slice_a, slice_start, names = [], [], [], [], []
            for side, leaf in op.leaves.items():
                lora_a.append(leaf.lora_a)
                if side == qkv_name:   # q, k, v: one A (its shrink runs once), three B row blocks
                    for i, (lo, hi) in enumerate(((0, key_dim), (key_dim, 2 * key_dim), (2 * key_dim, n_qkv))):
                        lora_b.append(emit(graph, aten.slice.Tensor, (leaf.lora_b, 0, lo, hi)))
                        slice_a.append(len(lora_a) - 1)
                        slice_start.append(lo)
                        names.append(SLICE_NAMES[i])
                    result.shared_a = True
                else:
                    lora_b.append(leaf.lora_b)
                    slice_a.append(len(lora_a) - 1)
                    slice_start.append(start_of[side])
                    names.append(names_of[side])
            scale_leaf = next(iter(op.leaves.values()))
            tensor_scale = scale_leaf.scale if isinstance(scale_leaf.scale, Node) else None
            lora_kwargs = dict(lora_a=lora_a, lora_b=lora_b, slice_a=slice_a, slice_start=slice_start,
                               token_lora_ids=None, lora_scales=tensor_scale,
                               scale=1.0 if tensor_scale is not None else float(scale_leaf.scale))
            if one_op:  # GEMM + LoRA in one functional op (decode: the expand in the GEMM epilogue)
                fused = emit(graph, QKVZ_GEMM_LORA_OP, (x2d, weights), lora_kwargs)
            else:
                functional = emit(graph, auto_functionalized, (QKVZ_LORA_OP,), dict(
                    out=fused, x=x2d, **lora_kwargs))
                fused = emit(graph, operator.getitem, (functional, 1))
            result.adapters.append(op.adapter)
            result.lora_slices.append(names)
        values = []
        for (_, proj), lo in zip(folded, starts):
            value = emit(graph, aten.slice.Tensor, (fused, 1, lo, lo + proj.base.out_features))
            if proj.bias is not None:   # Inductor fuses the add into the slice's consumers
                value = emit(graph, aten.add.Tensor, (value, proj.bias))
            if proj.out_shape_arg is not None:
                value = emit(graph, aten.reshape.default, (value, proj.out_shape_arg))
            values.append(value)
        # uses are replaced only once every new node exists: a failure above leaves the graph as it was
        for (_, proj), value in zip(folded, values):
            proj.chain.end.replace_all_uses_with(value)


def _pattern_nodes(proj: _Projection) -> set[Node]:
    nodes = set(proj.chain.all_nodes()) | _input_nodes(proj.base.x2d) | {proj.base.x2d}
    for lora in proj.chain.loras:
        nodes |= _input_nodes(lora.x2d) | {lora.x2d}
    return {n for n in nodes if n.op == "call_function"}


__all__ = ["QkvzLoraFusionPass", "QKVZ_GEMM_OP", "QKVZ_GEMM_LORA_OP", "QKVZ_LORA_OP", "rewrite_source_files"]
