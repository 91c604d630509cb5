"""One helper for every fusion test: compile with the pass, check what matched, the op counts and
the numerics against eager and against the same model compiled without the pass."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from fx_passes import FxPassesBackend, QkvzLoraFusionPass

# dtype -> (rtol, atol) for logits of the tiny models (|logits| ~ 1)
DTYPE_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}

MM = "aten.mm.default"


class RecordingPass(QkvzLoraFusionPass):
    """The real pass, keeping each graph's code before and after it ran (vLLM-test style)."""

    def __init__(self, *args, before_hook: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_hook = before_hook
        self.graphs_before: list[str] = []
        self.graphs_after: list[str] = []

    def __call__(self, graph):
        if self.before_hook is not None:
            self.before_hook(graph)
        self.graphs_before.append(str(graph))
        super().__call__(graph)
        self.graphs_after.append(str(graph))


@dataclasses.dataclass
class FusionRun:
    fusion_pass: RecordingPass
    fused: object
    eager: object
    unfused: object = None

    @property
    def layers(self):
        return [layer for report in self.fusion_pass.reports for layer in report.layers]

    def op_count(self, name: str, when: str = "after") -> int:
        return sum(getattr(r, f"ops_{when}").get(name, 0) for r in self.fusion_pass.reports)


def _outputs(model, args, kwargs):
    out = model(*args, **kwargs)
    if hasattr(out, "logits"):
        return (out.logits,)
    return out if isinstance(out, tuple) else (out,)


def compile_with_pass(model, *args, fusion_pass: Optional[RecordingPass] = None, dynamic: bool = False,
                      compare_unfused: bool = False, grad: bool = False, **kwargs) -> FusionRun:
    fusion_pass = fusion_pass or RecordingPass()
    context = torch.enable_grad if grad else torch.no_grad
    with context():
        eager = _outputs(model, args, kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=FxPassesBackend(fusion_pass=fusion_pass), dynamic=dynamic)
        fused = _outputs(compiled, args, kwargs)
        unfused = None
        if compare_unfused:
            torch._dynamo.reset()
            unfused = _outputs(torch.compile(model, backend="inductor", dynamic=dynamic), args, kwargs)
    return FusionRun(fusion_pass, fused, eager, unfused)


GATES = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]


def assert_fused(run: FusionRun, *, layers: int, lora_ops_per_layer: int, mm_removed: int,
                 dtype: torch.dtype = torch.float32, folded: Optional[list] = None) -> None:
    """Exactly ``layers`` rewrites, each folding ``folded`` (default: all four GDN projections), the mm
    count drop, the new ops, and the numerics."""
    rewritten = [layer for layer in run.layers if layer.rewritten]
    assert len(rewritten) == layers, [layer.line() for layer in run.layers]
    assert run.fusion_pass.matched_count == layers
    assert not [layer for layer in run.layers if not layer.rewritten], [l.line() for l in run.layers]
    folded = GATES if folded is None else folded
    assert all(layer.folded == folded for layer in rewritten), [l.line() for l in rewritten]
    if folded == GATES:
        assert all(layer.ba_reason is None for layer in rewritten), [l.line() for l in rewritten]
    removed = run.op_count(MM, "before") - run.op_count(MM, "after")
    assert removed == mm_removed, f"{removed} mm removed, expected {mm_removed}"
    # one LoRA op per layer: GEMM + LoRA as ONE qkvz_gemm_lora (QkvzFusionConfig.gemm_lora_op, the default);
    # no LoRA: qkvz_gemm alone; several LoRA ops: qkvz_gemm + one qkvz_lora_ each
    one_op = lora_ops_per_layer == 1 and run.fusion_pass.config.gemm_lora_op
    assert run.op_count("fx_passes.qkvz_gemm_lora.default") == (layers if one_op else 0)
    assert run.op_count("fx_passes.qkvz_gemm.default") == (0 if one_op else layers)
    assert run.op_count("auto_functionalized(qkvz_lora_.default)") == (0 if one_op else layers * lora_ops_per_layer)
    # each graph after the pass holds one fused GEMM op (qkvz_gemm or qkvz_gemm_lora) per layer rewritten in it
    assert len(run.fusion_pass.reports) == len(run.fusion_pass.graphs_after)
    for report, after in zip(run.fusion_pass.reports, run.fusion_pass.graphs_after):
        assert after.count("target=torch.ops.fx_passes.qkvz_gemm") == sum(l.rewritten for l in report.layers)
    rtol, atol = DTYPE_TOL[dtype]
    for got, want in zip(run.fused, run.eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    if run.unfused is not None:
        for got, want in zip(run.fused, run.unfused):
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def assert_unchanged(run: FusionRun) -> None:
    """The pass left every graph exactly as it found it, and the outputs match eager."""
    assert run.fusion_pass.graphs_before == run.fusion_pass.graphs_after
    assert run.fusion_pass.matched_count == 0
    for got, want in zip(run.fused, run.eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-5)


class GdnProjections(torch.nn.Module):
    """A real PEFT-wrapped GDN layer's projections called on a 2-D input (as vLLM does): the small graph of
    the entry-point, dump and addmm-form tests. ``z_input_offset`` != 0 gives z another input; ``gates``:
    in_proj_b / in_proj_a are called too (``gate_input_offset`` != 0: on another input)."""

    def __init__(self, gdn, z_input_offset: float = 0.0, gates: bool = False, gate_input_offset: float = 0.0):
        super().__init__()
        self.linear_attn = gdn
        self.z_input_offset, self.gates, self.gate_input_offset = z_input_offset, gates, gate_input_offset

    def forward(self, x):
        z_in = x + self.z_input_offset if self.z_input_offset else x
        out = (self.linear_attn.in_proj_qkv(x).relu(), self.linear_attn.in_proj_z(z_in).sigmoid())
        if not self.gates:
            return out
        g_in = x + self.gate_input_offset if self.gate_input_offset else x
        return (*out, self.linear_attn.in_proj_b(g_in).sigmoid(), self.linear_attn.in_proj_a(g_in).exp())


def gdn_projections(z_input_offset: float = 0.0, gates: bool = False, gate_input_offset: float = 0.0,
                    targets=None) -> GdnProjections:
    """GdnProjections over layer 0 of a 2-layer tiny Qwen3.5 with PEFT LoRA on in_proj_qkv + in_proj_z
    (``targets``: other target modules)."""
    from fx_passes.models import GDN_TARGETS, TinyQwen35Spec, add_lora, build_tiny_qwen35

    model = add_lora(build_tiny_qwen35(TinyQwen35Spec(num_layers=2)), targets=targets or GDN_TARGETS)
    return GdnProjections(model.base_model.model.model.layers[0].linear_attn, z_input_offset, gates,
                          gate_input_offset)


__all__ = ["GATES", "GdnProjections", "gdn_projections", "DTYPE_TOL", "RecordingPass", "FusionRun", "compile_with_pass", "assert_fused", "assert_unchanged"]
