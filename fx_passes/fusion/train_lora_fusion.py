"""Fuse each GDN layer's projections and their TRAINABLE LoRA into one autograd-aware op (issue 17).

Runs on the Dynamo graph (torch-level ops, before AOTAutograd), inside the ``fx_passes`` backend, when
the graph is compiled with grad enabled and some LoRA parameter requires grad. There the LoRA is still
one pattern per PEFT module, and the backward is not yet traced: the op's registered backward
(:mod:`fx_passes.ops.qkvz_lora_train`) becomes the joint graph's, so forward and backward are fused
together. (After AOTAutograd the forward would be split from the backward by the partitioner and every
LoRA intermediate saved for backward would pin the unfused form: the post-grad pass leaves such layers
alone.) Inference graphs (no grad, or frozen adapters) are left to the post-grad pass and its kernels.

Unfused (per GDN layer, PEFT LoRA ``Linear``, train mode; per projection p in qkv, z (, b, a))::

    base_p = linear(x, W_p)
    xc     = x | x.to(adapter dtype)                 (PEFT casts x to the adapters' dtype)
    d_p    = dropout(xc, p, True, False) | xc        (one dropout module per PEFT module and adapter)
    y_p    = add(base_p, mul(linear(linear(d_p, A_p), B_p), scale_p))    (+ one add per extra adapter)
    y_p    = y_p.to(x dtype)                         (PEFT's result.to(torch_result_dtype))

Fused::

    outs, s = fx_passes.qkvz_lora_train(x2d, [d_qkv, d_z, ...], [W_qkv, W_z(, W_b, W_a)], [A_qkv, A_z, ...],
                                        [B_qkv, B_z, ...], slice_a, slice_start, scales)
    y_qkv, y_z(, y_b, y_a) = outs[p].reshape(*x.shape[:-1], n_p)     (one output per projection)

where ``d_p`` is the dropout's output, or x2d itself without dropout (PEFT's cast of x to the adapters'
dtype is dropped: the op casts x in its kernels, and keeps x rather than an fp32 copy for the backward).
Under ``dynamic=True`` Dynamo makes each ``scale_p`` a graph input (a 0-d tensor read by ``.item()``), not a
number the op can take: then ``mul(B_p, scale_p)`` is the op's B and its scale is 1 (the same compiled graph
follows a scaling that changes, e.g. by PEFT's ``set_scale``).

The dropout nodes stay in the graph (the op reads their outputs), so the masks are Inductor's RNG as
without the pass; only the graph position of a dropout may move (the op and its users are reordered
topologically). A layer is rewritten only when every projection's chain matches exactly, every removed
node has no user outside it (nothing else reads a LoRA intermediate), all projections read the same x,
the base linears have no bias and the x / weight dtypes agree; otherwise it stays as it was and the
report says which condition failed at which node.

Under autocast (a bf16 / fp16 region around an fp32 model, or around fp32 adapters on a 16-bit base: what
mixed-precision trainers run) the Dynamo graph holds no casts: autocast casts each linear's inputs to its
dtype when the graph is traced again by AOTAutograd. A linear whose output dtype is not its inputs' ran under
it. When any linear of the layer did, every one of them (base, shrinks, expands) must give that one 16-bit
dtype, and the rewrite casts what autocast would have cast, explicitly: x, the weights, A, B and each LoRA
input ``.to(dtype)``, so the op runs as PEFT does under autocast -- 16-bit GEMMs and 16-bit LoRA products,
gradients cast back to each fp32 tensor by autograd -- and no implementation of the op depends on the
autocast state (the op's own bodies run with autocast off).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import re
from typing import Any, Optional

import torch
from torch.fx import Graph, GraphModule, Node

import fx_passes.ops  # noqa: F401  (registers torch.ops.fx_passes.*)
from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.fx_utils import erase_dead, finish_rewrite
from fx_passes.fusion.matcher import NoMatch, module_path
from fx_passes.report import GraphReport, LayerMatch, count_ops

logger = logging.getLogger("fx_passes")

TRAIN_OP = torch.ops.fx_passes.qkvz_lora_train.default
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_DROPOUT = (torch.nn.functional.dropout, torch.dropout)
_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
ROOT_LAYER = "<graph root>"   # the layer name of projections with no module prefix (a frame rooted at the layer)


def _val(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, Node) else node


def _is(node: Any, targets: tuple) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype of a ``t.to(dtype)`` / ``t.to(dtype=...)`` node, else None."""
    if not (isinstance(node, Node) and node.op == "call_method" and node.target == "to"):
        return None
    args = list(node.args[1:]) + ([node.kwargs["dtype"]] if "dtype" in node.kwargs else [])
    if len(args) != 1 or not isinstance(args[0], torch.dtype) or set(node.kwargs) - {"dtype"}:
        return None
    return args[0]


def _only_user(node: Node, nodes_seen: list) -> Node:
    users = list(node.users)
    if len(users) != 1:
        raise NoMatch(node, f"{len(users)} users (one expected: the value would be needed elsewhere)")
    nodes_seen.append(node)
    return users[0]


@dataclasses.dataclass
class LoraTerm:
    xs: Node               # the LoRA input (dropout output, cast or x)
    a: Node
    b: Node
    scale: Any             # a number, or a node of a symbolic one (``dynamic=True``: PEFT's scaling is an input)
    dropout: Any           # None without dropout; p (a number, or a node of a symbolic one)
    linears: tuple[Node, Node]   # linear(d, A), linear(., B)


@dataclasses.dataclass
class Projection:
    name: str
    base: Node             # linear(x, W)
    x: Node
    weight: Node
    end: Node              # what the rest of the graph reads
    terms: list[LoraTerm]
    removed: list[Node]    # nodes the rewrite deletes


def _weight(node: Any, what: str) -> Node:
    if not isinstance(node, Node) or node.op not in ("placeholder", "get_attr") \
            or not isinstance(_val(node), torch.Tensor):
        raise NoMatch(node if isinstance(node, Node) else None, f"{what} is not a graph input / parameter")
    return node


def _match_term(node: Node, x: Node, removed: list) -> LoraTerm:
    """``mul(linear(linear(d, A), B), scale)``; d = dropout(xc) | xc; xc = x | x.to(dtype)."""
    if not _is(node, _MUL):
        raise NoMatch(node, "LoRA term is not a mul by the scaling")
    up, scale = node.args
    if isinstance(up, (int, float)):
        up, scale = scale, up
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) or _symbolic_scale(scale)):
        raise NoMatch(node, f"LoRA scaling is neither a number nor a symbolic one ({type(_val(scale)).__name__})")
    if not _is(up, _LINEAR) or len(up.args) < 2 or (len(up.args) > 2 and up.args[2] is not None):
        raise NoMatch(up, "LoRA B is not a bias-free linear")
    shrink = up.args[0]
    if not _is(shrink, _LINEAR) or len(shrink.args) < 2 or (len(shrink.args) > 2 and shrink.args[2] is not None):
        raise NoMatch(shrink, "LoRA A is not a bias-free linear")
    for n in (shrink, up):
        _only_user(n, removed)
    d, p = shrink.args[0], None
    if _is(d, _DROPOUT):
        args = list(d.args) + [d.kwargs.get(k) for k in ("p", "training", "inplace") if k in d.kwargs]
        if len(args) < 3 or args[2] is not True or (len(args) > 3 and args[3]):
            raise NoMatch(d, "dropout not in training mode, or in place")
        p, xc = args[1], args[0]   # (symbolic under dynamic=True: only its presence matters here)
    else:
        xc = d
    if xc is not x and not (_cast_dtype(xc) is not None and xc.args[0] is x):
        raise NoMatch(xc, "the LoRA input is neither x nor a dtype cast of it")
    return LoraTerm(d, _weight(shrink.args[1], "lora_A weight"), _weight(up.args[1], "lora_B weight"),
                    scale if isinstance(scale, Node) else float(scale), p, (shrink, up))


def _symbolic_scale(node: Any) -> bool:
    """A float Dynamo did not specialize: ``dynamic=True`` makes PEFT's ``scaling[adapter]`` a 0-d tensor
    input, read by ``.item()`` into a SymFloat."""
    return isinstance(node, Node) and isinstance(_val(node), torch.SymFloat)


def match_projection(name: str, base: Node) -> Projection:
    """The chain from one projection's base linear to the node its users read."""
    if len(base.args) < 2 or (len(base.args) > 2 and base.args[2] is not None) or base.kwargs.get("bias") is not None:
        raise NoMatch(base, "base linear has a bias")
    x, weight = base.args[0], _weight(base.args[1], "base weight")
    removed: list[Node] = []
    terms, cur = [], base
    while True:
        users = list(cur.users)
        if len(users) != 1:
            break
        user = users[0]
        other = None
        if _is(user, _ADD) and len(user.args) == 2 and cur in user.args:
            other = user.args[1] if user.args[0] is cur else user.args[0]
        if _is(other, _MUL):   # PEFT's `result + lora_B(lora_A(dropout(x))) * scaling`: must match whole
            term_removed: list[Node] = []
            terms.append(_match_term(other, x, term_removed))
            _only_user(other, term_removed)
            removed += term_removed
            removed.append(cur)
            cur = user
            continue
        if terms and _cast_dtype(user) is not None:
            removed.append(cur)
            cur = user
        break
    removed.append(cur)
    return Projection(name, base, x, weight, cur, terms, removed)


class QkvzLoraTrainPass:
    """The training rewrite, one instance per backend; one :class:`GraphReport` per graph in ``reports``."""

    pass_name = "qkvz_lora_train_fusion"

    def __init__(self, config: Optional[QkvzFusionConfig] = None):
        self.config = config or QkvzFusionConfig()
        self.reports: list[GraphReport] = []

    @staticmethod
    def applies(gm: GraphModule) -> bool:
        """Grad enabled and some LoRA weight of the graph requires grad (the graph will be trained)."""
        if not torch.is_grad_enabled():
            return False
        return any(isinstance(_val(n), torch.Tensor) and _val(n).requires_grad and "lora_" in str(n.target).lower()
                   for g in _graphs(gm) for n in g.nodes if n.op in ("placeholder", "get_attr"))

    def __call__(self, gm: GraphModule) -> GraphReport:
        report = GraphReport(pass_name=self.pass_name, graph_index=len(self.reports))
        before_code = gm.print_readable(print_output=False) if self.config.dump_dir else None
        for graph in _graphs(gm):
            before = count_ops(graph)
            changed = self._rewrite_graph(graph, report)
            for k, v in before.items():
                report.ops_before[k] = report.ops_before.get(k, 0) + v
            for k, v in count_ops(graph).items():
                report.ops_after[k] = report.ops_after.get(k, 0) + v
            if changed:   # the op's users may precede its last input: topological order restored here
                finish_rewrite(graph)
        self.reports.append(report)
        logger.info(report.summary(), extra={"fx_passes_report": report.to_dict()})
        for layer in report.layers:
            logger.debug("%s", layer.line())
        if self.config.dump_dir:
            from fx_passes.dump_files import write_pass_dump

            write_pass_dump(self.config.dump_dir, report, before_code, gm.print_readable(print_output=False),
                            graph_kind="Dynamo graph (torch level, before AOTAutograd; checkpoint bodies inside)")
        return report

    # ------------------------------------------------------------------------------------------------
    def _projection_nodes(self, graph: Graph) -> dict[str, dict[str, Node]]:
        """``{layer: {projection name: base linear}}`` by module path (``<layer>.<name>[.base_layer]``)."""
        cfg = self.config
        names = [cfg.qkv_name, cfg.z_name] + ([cfg.b_name, cfg.a_name] if cfg.fold_ba else [])
        # no prefix: the graph of a frame rooted at the GDN layer itself (Dynamo compiles the layer's
        # forward on its own when a graph break elsewhere splits the model)
        pattern = re.compile(rf"^(?:(.*)\.)?({'|'.join(map(re.escape, names))})(\.base_layer)?$")
        layers: dict[str, dict[str, list[Node]]] = {}
        for node in graph.nodes:
            if _is(node, _LINEAR):
                match = pattern.match(module_path(node) or "")
                if match:
                    layer = match.group(1) or ROOT_LAYER
                    layers.setdefault(layer, {}).setdefault(match.group(2), []).append(node)
        return {layer: {k: v[0] for k, v in found.items() if len(v) == 1} for layer, found in layers.items()}

    def _rewrite_graph(self, graph: Graph, report: GraphReport) -> bool:
        cfg, changed = self.config, False
        for layer, found in self._projection_nodes(graph).items():
            if cfg.qkv_name not in found or cfg.z_name not in found:
                missing = cfg.z_name if cfg.qkv_name in found else cfg.qkv_name
                present = found.get(cfg.qkv_name) or found.get(cfg.z_name)
                report.layers.append(LayerMatch(layer=layer, rewritten=False, node=present.name if present else None,
                                                reason=f"{missing} is not in this graph (or not once)"))
                continue
            try:
                projections = [match_projection(name, found[name]) for name in (cfg.qkv_name, cfg.z_name)]
                ba_reason = None
                if cfg.b_name in found and cfg.a_name in found:
                    try:
                        projections += [match_projection(name, found[name]) for name in (cfg.b_name, cfg.a_name)]
                    except NoMatch as e:
                        ba_reason = f"{e.reason} (at {e.node_name})"
                autocast = self._check_layer(projections)
                _check_no_lora_left(graph, layer, projections)
                match = self._rewrite_layer(graph, layer, projections, autocast)
                match.ba_reason = ba_reason
                report.layers.append(match)
                changed = True
            except NoMatch as e:
                report.layers.append(LayerMatch(layer=layer, rewritten=False, reason=e.reason, node=e.node_name))
            except Exception as error:  # noqa: BLE001  (a bug of ours must not break the user's compile)
                reason = f"internal error (layer left as it was): {type(error).__name__}: {error}"
                report.layers.append(LayerMatch(layer=layer, rewritten=False, reason=reason))
                logger.warning("fx_passes: %s not rewritten: %s", layer, reason)
        return changed

    @staticmethod
    def _check_layer(projections: list[Projection]) -> Optional[torch.dtype]:
        """Raises :class:`NoMatch` where the layer cannot be fused; returns autocast's dtype where its linears
        ran under autocast (:func:`_autocast_dtype`), else None."""
        x = projections[0].x
        if not any(p.terms for p in projections[:2]):
            raise NoMatch(projections[0].base, "no trainable LoRA on in_proj_qkv / in_proj_z")
        x_val = _val(x)
        for p in projections:
            if p.x is not x:
                raise NoMatch(p.base, f"{p.name} reads another input than {projections[0].name}")
        autocast = _autocast_dtype(projections)
        # the dtype the projections compute in and return: autocast's, else x's (the weights' must match)
        dtype = autocast or x_val.dtype
        for p in projections:
            if autocast is None and _val(p.weight).dtype != x_val.dtype:
                raise NoMatch(p.base, f"{p.name} weight dtype {_val(p.weight).dtype} != x dtype {x_val.dtype}")
            if _val(p.end).dtype != dtype:
                raise NoMatch(p.end, f"{p.name} result dtype {_val(p.end).dtype} != {dtype}"
                                     + (" (autocast's)" if autocast else " (x's)"))
        dtypes = {_val(n).dtype for p in projections for t in p.terms for n in (t.xs, t.a, t.b)}
        if autocast is None and len(dtypes) > 1:
            raise NoMatch(projections[0].base, f"LoRA inputs / weights of several dtypes {sorted(map(str, dtypes))}")
        return autocast

    def _rewrite_layer(self, graph: Graph, layer: str, projections: list[Projection],
                       autocast: Optional[torch.dtype] = None) -> LayerMatch:
        x = projections[0].x
        xv = _val(x)
        H = _val(projections[0].weight).shape[1]   # an int (x's may be a SymInt Dynamo specialized)
        groups: dict[Node, int] = {}        # A node -> group index
        xs, lora_a, lora_b, slice_a, slice_start, scales, names = [], [], [], [], [], [], []
        col = 0
        # Without dropout the op reads x itself: its kernels cast it in registers (PEFT's x.to(adapter dtype)
        # would be a [T, H] fp32 copy written, read by the shrink and kept for dA). Under autocast x and the
        # LoRA input are both cast to autocast's dtype: one tensor again, where PEFT's cast loses nothing.
        dropped_casts: set[Node] = set()
        for p in projections:
            for t in p.terms:
                if t.dropout is None and _cast_dtype(t.xs) is not None and t.xs.args[0] is x \
                        and (autocast is None or _cast_dtype(t.xs) in (torch.float32, autocast)):
                    dropped_casts.add(t.xs)
                    t.xs = x
                if t.a not in groups:
                    groups[t.a] = len(lora_a)
                    lora_a.append(t.a)
                    xs.append(t.xs)
                elif xs[groups[t.a]] is not t.xs:
                    raise NoMatch(t.a, "one lora_A read through two different inputs")
                lora_b.append(t.b)
                slice_a.append(groups[t.a])
                slice_start.append(col)
                scales.append(t.scale)
                names.append(p.name)
            col += _val(p.weight).shape[0]
        weights = [p.weight for p in projections]
        # A symbolic scaling (a graph input: not a number the op can take) multiplies B before the op, which
        # then scales by 1: ``s @ (scale * B)^T`` is PEFT's ``(s @ B^T) * scale`` up to where it rounds, and
        # autograd takes ``dB = scale * dB'`` through the mul (one [n, r] product per slice and step).
        b_scales = [sc if isinstance(sc, Node) else None for sc in scales]
        scales = [1.0 if isinstance(sc, Node) else sc for sc in scales]
        _check_op_accepts(x, xs, weights, lora_a, lora_b, slice_a, slice_start, scales, autocast)
        last_input = max((n for n in [x, *xs] if n.op != "placeholder"), key=_position(graph), default=None)
        prev = last_input if last_input is not None else next(n for n in graph.nodes if n.op != "placeholder").prev
        src = projections[0].base
        new_nodes: list[Node] = []

        def put(op: str, target: Any, args: tuple, like: Node = src) -> Node:
            nonlocal prev
            with graph.inserting_after(prev):
                prev = _emit(graph, op, target, args, like)
            new_nodes.append(prev)
            return prev

        def cast(n: Node) -> Node:   # what autocast would have cast, explicitly (the weights: once per layer)
            return n if autocast is None or _val(n).dtype == autocast else put("call_method", "to", (n, autocast))

        try:   # every new node first, the graph's uses rewired after: a failure leaves the graph as it was
            flat: dict[Node, Node] = {}
            for n in [x, *xs]:
                if n not in flat:
                    flat[n] = put("call_method", "reshape", (cast(n), -1, H))
            x2d, xs2d = flat[x], [flat[n] for n in xs]
            lora_b = [b if sc is None else put("call_function", operator.mul, (b, sc))
                      for b, sc in zip(lora_b, b_scales)]
            weights, lora_a, lora_b = ([cast(n) for n in nodes] for nodes in (weights, lora_a, lora_b))
            op = put("call_function", TRAIN_OP, (x2d, xs2d, weights, lora_a, lora_b, slice_a, slice_start, scales))
            outs = put("call_function", operator.getitem, (op, 0))
            # x's leading sizes: ints when static, else x.size(d) nodes
            lead = [size if isinstance(size, int) else put("call_method", "size", (x, d))
                    for d, size in enumerate(xv.shape[:-1])]
            pieces = []
            for k, p in enumerate(projections):
                flat_p = put("call_function", operator.getitem, (outs, k), p.end)
                pieces.append(put("call_method", "reshape", (flat_p, *lead, _val(p.weight).shape[0]), p.end))
        except Exception:
            for n in reversed(new_nodes):
                graph.erase_node(n)
            raise
        for p, piece in zip(projections, pieces):
            p.end.replace_all_uses_with(piece)
        removed = erase_dead(graph, {n for p in projections for n in p.removed} | dropped_casts)
        sizes = [_val(p.weight).shape[0] for p in projections]
        return LayerMatch(layer=layer, rewritten=True, qkv_node=projections[0].base.name,
                          z_node=projections[1].base.name, folded=[p.name for p in projections],
                          slice_sizes=sizes, lora_slices=[[n] for n in names],
                          shared_a=bool(projections[0].terms),   # q, k, v: one PEFT module, one A
                          kernel="fx_passes.qkvz_lora_train", autocast=str(autocast) if autocast else None,
                          scale_in_b=any(sc is not None for sc in b_scales),
                          removed_nodes=removed, new_nodes=[n.name for n in new_nodes if isinstance(n, Node)])


def _autocast_dtype(projections: list[Projection]) -> Optional[torch.dtype]:
    """The dtype autocast runs the layer's linears in (a linear whose output dtype is not its inputs' ran under
    it), None where it cast none of them. Raises :class:`NoMatch` unless, where it cast any, every linear of
    the layer gives one 16-bit dtype (a layer half inside an autocast region stays as it is)."""
    linears = [n for p in projections for n in (p.base, *(lin for t in p.terms for lin in t.linears))]
    cast = [n for n in linears if any(_val(a).dtype != _val(n).dtype for a in n.args[:2])]
    if not cast:
        return None
    dtype = _val(cast[0]).dtype
    other = next((n for n in linears if _val(n).dtype != dtype), None)
    if other is not None:
        raise NoMatch(other, f"autocast runs {cast[0].name} in {dtype} but {other.name} gives {_val(other).dtype}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise NoMatch(cast[0], f"autocast to {dtype}: the op takes 16-bit autocast dtypes")
    return dtype


def _check_no_lora_left(graph: Graph, layer: str, projections: list[Projection]) -> None:
    """Every PEFT node of the projections (``<layer>.<projection>.lora_*``) is in the matched chains: a LoRA
    variant of another form (DoRA, ...) would otherwise keep running beside the op, its layer reported as
    fused."""
    prefix = "" if layer == ROOT_LAYER else layer + "."
    covered = {n for p in projections for n in p.removed} | {t.xs for p in projections for t in p.terms} \
        | {v for p in projections for t in p.terms for v in (t.scale, t.dropout) if isinstance(v, Node)}
    owners = tuple(f"{prefix}{p.name}.lora_" for p in projections)
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and node not in covered \
                and (module_path(node) or "").startswith(owners):
            raise NoMatch(node, f"a LoRA node outside the matched pattern ({module_path(node)}): another LoRA form")


def _check_op_accepts(x: Node, xs: list, weights: list, lora_a: list, lora_b: list, slice_a: list,
                      slice_start: list, scales: list, autocast: Optional[torch.dtype] = None) -> None:
    """Run the op's fake implementation on the layer's example values (cast to ``autocast``'s dtype where
    given) before the graph is touched: a layer the op would reject stays as it was (with the op's message)
    instead of failing the compile half-way."""
    def val(n: Node):
        v = _val(n)
        return v if autocast is None else v.to(autocast)

    def flat(n: Node):
        v = val(n)
        return v.reshape(-1, v.shape[-1])
    mode = next((v.fake_mode for v in (_val(x), *map(_val, weights)) if isinstance(v, torch._subclasses.FakeTensor)),
                None)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            TRAIN_OP(flat(x), [flat(n) for n in xs], [val(w) for w in weights], [val(a) for a in lora_a],
                     [val(b) for b in lora_b], slice_a, slice_start, scales)
    except Exception as e:  # noqa: BLE001  (whatever the op's checks raise, the layer is reported, not fused)
        raise NoMatch(x, f"fx_passes.qkvz_lora_train rejects the layer: {str(e).splitlines()[0][:200]}") from e


def _position(graph: Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _graphs(gm: GraphModule) -> list[Graph]:
    """The graph and every subgraph module's (activation-checkpoint bodies, other higher-order ops)."""
    return [m.graph for m in gm.modules() if isinstance(m, GraphModule)]


def _emit(graph: Graph, op: str, target: Any, args: tuple, like: Node) -> Node:
    """A node with the Dynamo metadata later passes read: its ``example_value`` (run on the inputs' fake
    values) and the module stack / stack trace of ``like``."""
    node = graph.create_node(op, target, args, {})
    fake_args = torch.fx.node.map_arg(args, lambda n: _val(n))
    # the inputs' own fake mode (the tracing context may hold another one while a backend runs)
    mode = next((v.fake_mode for v in torch.utils._pytree.tree_leaves(fake_args)
                 if isinstance(v, torch._subclasses.FakeTensor)), None)
    with mode if mode is not None else contextlib.nullcontext():
        if op == "call_method":
            value = getattr(fake_args[0], target)(*fake_args[1:])
        else:
            value = target(*fake_args)
    node.meta["example_value"] = value
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node
