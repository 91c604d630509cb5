"""``torch.compile(model, backend="fx_passes", mode=..., options=..., dynamic=..., fullgraph=...)``.

Inductor with the qkvz fusion as its post-grad pass. What a user of ``backend="inductor"`` expects
holds here too:

* ``mode`` and ``options`` go through torch's own Inductor wrapper (``torch._TorchCompileInductorWrapper``:
  the same mode table, the same option names and type checks), so ``mode="reduce-overhead"`` gets
  cudagraph trees and ``"max-autotune"`` autotuning exactly as with Inductor; ``dynamic`` and
  ``fullgraph`` are Dynamo's and never reach a backend.
* A ``post_grad_custom_post_pass`` of the user's (in ``options`` or set globally in
  ``torch._inductor.config``) is kept: Inductor runs ours, then theirs (a post pass is the last
  thing before lowering, so the user's stays last). The cache key holds both passes' uuids; a
  user's pass without one makes Inductor bypass its cache, as it would without us.
* Zero configuration: the backend packs the W_qkv / W_z pairs of the graph it compiles into one
  buffer (:mod:`fx_passes.packing`: memory-neutral, only where safe, after the compile succeeded),
  so the fused op runs one GEMM with no call to ``pack_qkvz_weights``. Unpacked weights cost a
  second cuBLAS launch and lose the prefill kernel (``benchmarks/RESULTS.md``, unpacked vs packed).
* Warm caches: a graph Inductor serves from its FX graph cache skips post-grad passes. The backend
  sees every graph at Inductor's compile step (it turns off only AOTAutograd's cache, which would
  skip that step too; Inductor's FX graph cache stays on) and reports a cached graph as such, with
  the fx_passes calls its compiled code holds (:meth:`QkvzLoraFusionPass.record_compiled_elsewhere`).

The name ``"fx_passes"`` comes from the package's ``torch_dynamo_backends`` entry point, which torch
loads on first use (no ``import fx_passes`` needed). Importing the package registers the name itself
only where no such entry point is installed (a source tree on ``sys.path``): registering it twice
is an error in torch.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re
from typing import Any, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.matcher import module_path
from fx_passes.fusion.qkvz_lora_fusion import QkvzLoraFusionPass
from fx_passes.fusion.train_lora_fusion import QkvzLoraTrainPass
from fx_passes.ops.qkvz_gemm import weights_are_packed
from fx_passes.packing import pack_weights, packing_choice
from fx_passes.report import FROM_CACHE, NOT_RUN

logger = logging.getLogger("fx_passes")

BACKEND_NAME = "fx_passes"
_CUSTOM_POST_PASS = "post_grad_custom_post_pass"
_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


class ComposedPostGradPass(CustomGraphPass):
    """Several post-grad passes run in order as one ``post_grad_custom_post_pass`` (for torch
    versions whose Inductor takes a single pass object there)."""

    def __init__(self, passes: list):
        self.passes = list(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for each in self.passes:
            each(graph)

    def uuid(self) -> Optional[Any]:
        uuids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(u is None for u in uuids) else tuple(uuids)


def _takes_pass_lists() -> bool:
    """Inductor runs a list of post-grad passes itself (torch >= 2.12's get_custom_graph_passes)."""
    from torch._inductor import custom_graph_pass

    return hasattr(custom_graph_pass, "get_custom_graph_passes")


def _compose(ours: QkvzLoraFusionPass, theirs: Any) -> Any:
    if theirs is None:
        return ours
    theirs = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs]
    theirs = [p for p in theirs if p is not ours]
    if not theirs:
        return ours
    return [ours, *theirs] if _takes_pass_lists() else ComposedPostGradPass([ours, *theirs])


@dataclasses.dataclass
class _PackPlan:
    layer: str
    weights: list   # W_qkv, W_z (, W_b, W_a): the prefix packing_choice picked


def _graph_layer_weights(gm: torch.fx.GraphModule, example_inputs: list, cfg: QkvzFusionConfig
                         ) -> dict[str, list[torch.Tensor]]:
    """``{layer: [W_qkv, W_z(, W_b, W_a)]}``: the projection parameters of the GDN layers in a Dynamo graph,
    found by the linears' module paths (``<layer>.<qkv_name>[.base_layer]``, ...) as the pass finds them;
    b / a only when both are there and the pass folds them."""
    names = [cfg.qkv_name, cfg.z_name] + ([cfg.b_name, cfg.a_name] if cfg.fold_ba else [])
    proj = re.compile(rf"^(.*)\.({'|'.join(map(re.escape, names))})(\.base_layer)?$")
    placeholders = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found: dict[str, dict[str, list[torch.Tensor]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS or len(node.args) < 2:
            continue
        match = proj.match(module_path(node) or "")
        weight = node.args[1]
        if not match or not isinstance(weight, torch.fx.Node):
            continue
        if weight.op == "placeholder" and placeholders[weight] < len(example_inputs):
            tensor = example_inputs[placeholders[weight]]
        elif weight.op == "get_attr":
            tensor = getattr(gm, str(weight.target), None)
        else:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            found.setdefault(match.group(1), {}).setdefault(match.group(2), []).append(tensor)
    layers = {}
    for layer, sides in found.items():
        weights = [sides.get(name, []) for name in names]
        if all(len(w) == 1 for w in weights[:2]):
            count = 4 if len(weights) == 4 and all(len(w) == 1 for w in weights[2:]) else 2
            layers[layer] = [w[0] for w in weights[:count]]
    return layers


class FxPassesBackend:
    """A Dynamo backend holding its own pass instance (and so its own reports).

    ``backend = FxPassesBackend(); torch.compile(model, backend=backend)`` then
    ``backend.fusion_pass.reports`` says what happened in every compiled graph. ``mode`` / ``options``
    / ``dynamic`` mean what they mean for ``torch.compile(backend="inductor")``.
    """

    def __init__(self, config: Optional[QkvzFusionConfig] = None, *, mode: Optional[str] = None,
                 options: Optional[dict] = None, dynamic: Optional[bool] = None,
                 fusion_pass: Optional[QkvzLoraFusionPass] = None, inductor_options: Optional[dict] = None):
        self.fusion_pass = fusion_pass if fusion_pass is not None else QkvzLoraFusionPass(config)
        self.train_pass = QkvzLoraTrainPass(self.fusion_pass.config)
        merged = {**(inductor_options or {}), **(options or {})}
        # torch's own mode table and option checks (an unknown option or mode raises here, as for Inductor)
        self.inductor = torch._TorchCompileInductorWrapper(mode, merged, dynamic)
        self.packed_layers: list[str] = []

    @property
    def config(self) -> QkvzFusionConfig:
        return self.fusion_pass.config

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        from torch._inductor.compile_fx import compile_fx

        plans = self._plan_packing(gm, example_inputs)
        if self.config.fuse_training and QkvzLoraTrainPass.applies(gm):
            self.train_pass(gm)   # a training graph: fused before AOTAutograd traces the backward
        patches = {**self.inductor.config}
        user_pass = patches.get(_CUSTOM_POST_PASS, getattr(torch._inductor.config, _CUSTOM_POST_PASS))
        patches[_CUSTOM_POST_PASS] = _compose(self.fusion_pass, user_pass)
        if self.config.dump_dir:
            # a dump must show the pass at work: compile every graph for real
            patches["force_disable_caches"] = True
        try:
            with torch._functorch.config.patch(enable_autograd_cache=False):
                compiled = compile_fx(gm, example_inputs, inner_compile=self._inner_compile, config_patches=patches)
        finally:
            self.fusion_pass.packing_notes = {}
        self._pack(plans)
        return compiled

    def reset(self) -> None:
        self.inductor.reset()

    # ------------------------------------------------------------ reports on a warm cache
    def _inner_compile(self, gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any):
        """Inductor's compile step for one graph: where its FX graph cache is consulted and, on a miss,
        the post-grad passes run. A graph compiled without our pass is reported with its code."""
        from torch._dynamo.utils import counters
        from torch._inductor.compile_fx import compile_fx_inner

        reports_before = len(self.fusion_pass.reports)
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        output = compile_fx_inner(gm, example_inputs, **kwargs)
        if len(self.fusion_pass.reports) == reports_before:
            hit = counters["inductor"]["fxgraph_cache_hit"] > hits_before
            self.fusion_pass.record_compiled_elsewhere(FROM_CACHE if hit else NOT_RUN,
                                                       getattr(output, "source_code", None))
        return output

    # ------------------------------------------------------------ zero-configuration packing
    def _plan_packing(self, gm: torch.fx.GraphModule, example_inputs: list) -> list[_PackPlan]:
        """The pairs to pack once the compile has succeeded; the pass reports them packed (packing
        before the compile would change the inputs under Dynamo's fake tensors)."""
        if not self.config.pack_weights:
            return []
        plans, notes = [], {}
        for layer, weights in _graph_layer_weights(gm, example_inputs, self.config).items():
            todo, note = packing_choice(weights)
            if todo is None:
                if not weights_are_packed(weights[:2]):
                    notes[layer] = (0, note)
                    logger.info("fx_passes backend: %s weights %s", layer, note)
                continue
            plans.append(_PackPlan(layer, todo))
            notes[layer] = (len(todo), f"{note} by the fx_passes backend")
        self.fusion_pass.packing_notes = notes
        return plans

    def _pack(self, plans: list[_PackPlan]) -> None:
        for plan in plans:
            todo, _ = packing_choice(plan.weights)
            if todo is None or len(todo) != len(plan.weights):
                continue   # changed since the plan (another compile packed them)
            pack_weights(todo)
            self.packed_layers.append(plan.layer)
            logger.debug("fx_passes backend: packed the projection weights of %s", plan.layer)


def fx_passes_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *, mode: Optional[str] = None,
                      options: Optional[dict] = None):
    """The registered ``"fx_passes"`` backend: default configuration, a fresh pass per graph;
    ``mode`` / ``options`` as for ``backend="inductor"``."""
    return FxPassesBackend(mode=mode, options=options)(gm, example_inputs)


def _reset_backend() -> None:
    """What ``torch._dynamo.reset()`` calls on a backend: Inductor's own reset (cudagraph trees)."""
    torch._TorchCompileInductorWrapper(None, None, None).reset()


fx_passes_backend.reset = _reset_backend


def _installed_as_entry_point() -> bool:
    try:
        points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    except Exception:  # noqa: BLE001  (broken metadata: behave as if not installed)
        return False
    return any(point.name == BACKEND_NAME for point in points)


def register() -> None:
    """Make ``backend="fx_passes"`` resolvable. Installed packages need nothing: torch loads the entry
    point itself and would refuse a second registration of the name."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS and not _installed_as_entry_point():
        register_backend(fx_passes_backend, name=BACKEND_NAME)


__all__ = ["BACKEND_NAME", "ComposedPostGradPass", "FxPassesBackend", "fx_passes_backend", "register"]
