"""``torch.compile(model, backend="fx_passes")``: Inductor with the qkvz fusion as its post-grad pass."""
from __future__ import annotations

from typing import Any, Optional

import torch

from fx_passes.config import QkvzFusionConfig
from fx_passes.fusion.qkvz_lora_fusion import QkvzLoraFusionPass

BACKEND_NAME = "fx_passes"


class FxPassesBackend:
    """A Dynamo backend holding its own pass instance (and so its own reports).

    ``backend = FxPassesBackend(); torch.compile(model, backend=backend)`` then
    ``backend.fusion_pass.reports`` says what happened in every compiled graph.
    """

    def __init__(self, config: Optional[QkvzFusionConfig] = None, inductor_options: Optional[dict] = None,
                 fusion_pass: Optional[QkvzLoraFusionPass] = None):
        self.fusion_pass = fusion_pass if fusion_pass is not None else QkvzLoraFusionPass(config)
        self.inductor_options = dict(inductor_options or {})

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        from torch._inductor.compile_fx import compile_fx

        patches = {**self.inductor_options, "post_grad_custom_post_pass": self.fusion_pass}
        if self.fusion_pass.config.dump_dir:
            # A cache hit (AOTAutograd's or the FX graph cache's) skips the post-grad pass, so a dumping
            # run would write nothing for a graph compiled before: compile it for real.
            patches["force_disable_caches"] = True
        return compile_fx(gm, example_inputs, config_patches=patches)


def fx_passes_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]):
    """The registered ``"fx_passes"`` backend: default configuration, a fresh pass per graph."""
    return FxPassesBackend()(gm, example_inputs)


def _register() -> None:
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS:
        register_backend(fx_passes_backend, name=BACKEND_NAME)


_register()
