"""Model-level benchmark (issue #3): a transformers Qwen3.5 with real layer sizes + PEFT LoRA, compiled by
Inductor with and without the fx_passes qkvz fusion.

What is measured, per (preset, LoRA rank, adapter dtype, phase):

* the model: ``Qwen3_5ForCausalLM`` built from a ``Qwen3_5TextConfig`` with the REAL layer sizes of a preset
  (a row of ``benchmarks.common.SHAPES``: hidden size, GDN key/value heads and head dims, MLP width,
  attention heads) but only a few layers (default 4: 3 GatedDeltaNet + 1 full attention), a small
  vocabulary (default 1024, so the LM head does not dominate), random weights (HF init, std 0.02), bf16,
  eval, ``use_cache=False``. Preset ``tiny`` (the CPU smoke test) is ``fx_passes.models.TinyQwen35Spec``
  built by ``fx_passes.models.build_tiny_qwen35`` (alternating GDN / full-attention layers);
* PEFT LoRA on the four GDN projections (``--targets``; r, alpha = 2r, no dropout) with RANDOM, non-zero B, so the
  LoRA path is real work; adapters in fp32 (PEFT's default ``autocast_adapter_dtype``: fp32 adapters on a
  bf16 base) or cast to bf16 (``--adapter-dtype bf16``);
* phases: ``decode:B`` = one forward over ``[B, 1]`` (B sequences of one token, T = B tokens). There is NO
  KV / recurrent cache (``use_cache=False``), so a "decode step" is just a short forward: the GDN layers run
  their chunked (prefill) algorithm, padded to one 64-token chunk per sequence, instead of the recurrent
  single-step update of a real cached decode. ``prefill:S`` = one forward over ``[1, S]``;
* variants, all on ONE model whose W_qkv / W_z were packed once by ``fx_passes.pack_qkvz_weights``
  (memory neutral, values unchanged; the script checks that packing leaves the eager logits bit-identical):
    eager      no compile;
    inductor   ``torch.compile(model, backend="inductor", mode=--mode, dynamic=False)``;
    fx_passes  ``torch.compile(model, backend="fx_passes", mode=--mode, dynamic=False)`` (the registered name,
               as a user writes it): Inductor + our post-grad pass (one ``qkvz_gemm_lora`` per GDN layer); its
               report (from the ``fx_passes`` logger) is printed, and a compile that rewrites 0 GDN layers
               aborts the run;
    no_lora    the same base weights without LoRA, ``torch.compile(backend="inductor")``: what the LoRA
               should ideally cost nothing above;
    no_lora_fx (optional, ``--variants``) the base model through our backend (1 GEMM per GDN layer, no LoRA).
  and per row the projection block alone (the first GDN layer's four projections with their LoRA, the
  row's tokens), compiled by inductor and by fx_passes: its speedup, the GDN layers' blocks as a share of
  the inductor model time, and how much of the model-level gain the blocks' gain explains (``--no-block``
  skips it). Dynamo is reset before every compile (one shape per compile, ``dynamic=False``), so each (phase, variant)
  is one compile whose wall time is printed;
* the GDN core (gated delta rule after the projections; transformers' torch fallback, fla is absent) is the
  same in every variant: by default (``--gdn-core opaque``) the chunked rule is ONE custom op, eager inside,
  because Dynamo would unroll its loop over 64-token chunks (compile time growing with S: minutes per compile
  at prefill:4096), and one-token sequences use transformers' recurrent rule (what a cached decode step runs)
  instead of a chunk padded to 64 tokens, compiled on its own as one opaque op (default ``--decode-core
  recurrent-opaque``): the same kernels in every variant. ``--decode-core recurrent`` compiles it inline with
  the model, where Inductor fuses it differently per variant (RESULTS.md, model level). ``--gdn-core compiled
  --decode-core chunked`` runs transformers' code untouched.

Timing (CUDA): each callable is first run eagerly / compiled, then captured into a CUDA graph and replayed
(``graph``: GPU time only); where capture fails the row falls back to CUDA events around each call (host
launch overhead included). Both are recorded where possible: ``ms_graph`` and ``ms_events``. Medians.
On the CPU (smoke test only): wall clock. Correctness: relative Frobenius error of each variant's logits
against eager (no_lora against the eager base model) and, for a 16-bit model, against the same model in fp32:
a row fails when inductor or fx_passes is more than ERR_FP32_FACTOR times as far from the fp32 logits as
eager's own (without the fp32 model: 2e-2 against eager).

    python -m benchmarks.bench_model --preset 27b,35b,397b --adapter-dtype bf16 --decode-core recurrent-opaque
                                                           # issue 16's model-level table
    python -m benchmarks.bench_model --mode reduce-overhead  # CUDA graphs through the backends (cudagraph trees)
    python -m benchmarks.bench_model                       # 27B, r=16, fp32 adapters, decode 1-256, prefill:2048
    python -m benchmarks.bench_model --quick               # 27B, r=16, decode:16 + prefill:2048
    python -m benchmarks.bench_model --preset 27b,397b --rank 16,64 --adapter-dtype fp32,bf16 \\
        --phases decode:1,decode:16,decode:64,prefill:1024,prefill:4096
    python -m benchmarks.bench_model --device cpu --preset tiny --phases decode:1 --reps 2   # CPU smoke test

With $OUT set (or --json), the rows go to $OUT/bench_model.json (rewritten after every row): a JSON list of
data rows, one per (preset, rank, adapter dtype, phase), each stamped by ``benchmarks.common.environment``
(GPU, torch / triton / transformers / peft versions, commit, UTC date, command) with the model's
configuration (``config``) and one cell per variant. The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import logging
import math
import sys
import time
import traceback
from typing import Callable, Iterator, Optional
from unittest import mock

import torch

import fx_passes  # noqa: F401  (backend="fx_passes" resolvable from a source tree without the entry point)
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35
from fx_passes.packing import pack_qkvz_weights

from benchmarks.common import (SHAPES, TINY, Qwen35Shape, environment, json_path, rel_err, result_row,
                               select_shapes, time_events, time_graph, time_wall, write_rows)

logger = logging.getLogger("fx_passes")

ERR_LIMIT = 2e-2          # bf16 logits after a few random layers, relative Frobenius error vs eager
ERR_FP32_FACTOR = 1.5     # a compiled variant's logits may be at most this much farther from the fp32 model than eager's
# CUDA-graph replay vs the same callable's plain call: not bitwise (cuBLAS split-K reductions differ run to run;
# in bf16 logits one flipped rounding upstream shows as 2e-3 - 8e-3, measured in every variant incl. no_lora);
# what the check exists for (a host value frozen into the graph) shows as O(1)
REPLAY_LIMIT = 2e-2
LORA_SEED, MODEL_SEED, INPUT_SEED = 1, 0, 2
ALL_VARIANTS = ("eager", "inductor", "fx_passes", "no_lora", "no_lora_fx")
DEFAULT_VARIANTS = ("eager", "inductor", "fx_passes", "no_lora")
COMPILED = ("inductor", "fx_passes", "no_lora", "no_lora_fx")
DEFAULT_PHASES = "decode:1,decode:8,decode:32,decode:128,decode:256,prefill:2048"
GDN_PROJECTIONS = "in_proj_qkv,in_proj_z,in_proj_b,in_proj_a"
QUICK_PHASES = "decode:16,prefill:2048"
CPU_SMOKE_PHASES = "decode:1"


# Presets: the rows of benchmarks.common.SHAPES (names matched case-insensitively by prefix: 27b, 35b, 397b)
# and "tiny" (fx_passes.models.TinyQwen35Spec, the CPU smoke test).
PRESETS: dict[str, TinyQwen35Spec] = {**SHAPES, "tiny": TINY}


def preset_names(text: str) -> list[str]:
    """'27b,tiny' -> ['27B', 'tiny'] (exits on an unknown name)."""
    return list(select_shapes(text, PRESETS))


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default=None,
                   help=f"comma list of {list(PRESETS)}, case-insensitive prefixes (default 27B; cpu: tiny)")
    p.add_argument("--rank", default="16", help="comma list of LoRA ranks (alpha = 2r)")
    p.add_argument("--adapter-dtype", default="fp32",
                   help="comma list of fp32 (PEFT's default autocast_adapter_dtype) and/or bf16")
    p.add_argument("--phases", default=None,
                   help=f"comma list of decode:B / prefill:S (default {DEFAULT_PHASES}; --quick {QUICK_PHASES}; "
                        f"cpu {CPU_SMOKE_PHASES})")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(ALL_VARIANTS)}")
    p.add_argument("--targets", default=GDN_PROJECTIONS, help="PEFT target modules (default the four GDN projections)")
    p.add_argument("--mode", default=None, choices=[None, "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of every compiled variant (reduce-overhead: the CUDA graphs come from "
                        "the backend's cudagraph trees; timing is then CUDA events per call)")
    p.add_argument("--no-block", action="store_true",
                   help="skip the projection block alone (one GDN layer's four projections + LoRA compiled by "
                        "inductor and fx_passes: its share of the model time)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="each compiled variant's N costliest GPU kernels (us per call, torch.profiler over 5 calls; "
                        "printed and kept in the JSON cell)")
    p.add_argument("--quick", action="store_true", help=f"one preset, r=16, phases {QUICK_PHASES}")
    p.add_argument("--layers", type=int, default=4, help="decoder layers; every 4th is full attention")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gdn-core", default="opaque", choices=["opaque", "compiled"],
                   help="opaque: the chunked gated-delta rule is one custom op, eager inside (compile time "
                        "independent of S); compiled: compiled with the rest (compile time grows with S)")
    p.add_argument("--decode-core", default="recurrent-opaque", choices=["recurrent", "recurrent-opaque", "chunked"],
                   help="one-token sequences: transformers' recurrent rule (a cached decode step's core) compiled "
                        "with the model, or compiled on its own as one opaque op (the same kernels in every "
                        "variant, as an fla kernel would be), or the chunked rule padded to 64 tokens per sequence")
    p.add_argument("--timing", default="auto", choices=["auto", "graph", "events"],
                   help="auto: CUDA graph replay AND per-call events (graph falls back to events on failure)")
    p.add_argument("--reps", type=int, default=50, help="max timed calls (or replays) per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rep-ms", type=float, default=1500.0,
                   help="time budget of one measurement: fewer reps for slow calls (at least 3)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting new compiles when the run is about to pass this many seconds "
                        "(the table is still printed); 0 = no limit")
    p.add_argument("--allow-cache", action="store_true",
                   help="let inductor / no_lora use Inductor's caches (fx_passes never does: a hit skips the pass)")
    p.add_argument("--json", default=None, help="JSON path (default $OUT/bench_model.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="fx_passes INFO log (one line per graph)")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.preset is None:
        args.preset = "tiny" if cpu else "27B"
    if args.phases is None:
        args.phases = CPU_SMOKE_PHASES if cpu else (QUICK_PHASES if args.quick else DEFAULT_PHASES)
    if args.mode == "reduce-overhead":
        args.timing = "events"   # the compiled callable replays its own CUDA graph
    if args.quick:
        args.preset = args.preset.split(",")[0]
        args.rank = "16"
    return args


def _csv(s: str, cast=str) -> list:
    return [cast(v.strip()) for v in s.split(",") if v.strip()]


def parse_phase(text: str) -> tuple[str, int, int]:
    """'decode:64' -> ('decode', 64, 1): input [64, 1]; 'prefill:4096' -> ('prefill', 1, 4096)."""
    kind, _, n = text.partition(":")
    if kind not in ("decode", "prefill") or not n.isdigit() or int(n) < 1:
        raise SystemExit(f"bad phase {text!r}: use decode:B or prefill:S")
    return (kind, int(n), 1) if kind == "decode" else (kind, 1, int(n))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def build_base_model(preset: TinyQwen35Spec, layers: int, vocab: int, dtype: torch.dtype,
                     device: str) -> torch.nn.Module:
    """A random Qwen3_5ForCausalLM with the preset's sizes. A real size (``Qwen35Shape``) is built directly
    on ``device`` in ``dtype`` (initialised in fp32 on the host it would take minutes); the tiny spec by
    ``fx_passes.models.build_tiny_qwen35``."""
    spec = dataclasses.replace(preset, num_layers=layers, vocab_size=vocab)
    if not isinstance(preset, Qwen35Shape):
        return build_tiny_qwen35(spec, dtype=dtype, device=device, seed=MODEL_SEED)
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=layers, layer_types=spec.layer_types(),
        num_attention_heads=preset.num_attention_heads, num_key_value_heads=preset.num_key_value_heads,
        head_dim=preset.head_dim, linear_num_key_heads=preset.linear_num_key_heads,
        linear_num_value_heads=preset.linear_num_value_heads, linear_key_head_dim=preset.linear_key_head_dim,
        linear_value_head_dim=preset.linear_value_head_dim, linear_conv_kernel_dim=4,
        initializer_range=0.02, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(MODEL_SEED)
    with torch.device(device):
        model = Qwen3_5ForCausalLM._from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def attach_lora(base: torch.nn.Module, r: int, adapter_dtype: str, dtype: torch.dtype,
                targets: str = GDN_PROJECTIONS) -> torch.nn.Module:
    """PEFT LoRA on ``targets`` with random non-zero B (fx_passes.models.add_lora).

    fp32: PEFT's default autocast_adapter_dtype=True (fp32 adapters on a bf16 / fp16 base).
    bf16: the adapters cast to the base dtype afterwards."""
    model = add_lora(base, r=r, alpha=2 * r, targets=_csv(targets), seed=LORA_SEED, autocast_adapter_dtype=True)
    if adapter_dtype == "bf16":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(dtype)
    return model.eval()


def lora_dtypes(model: torch.nn.Module) -> list[str]:
    return sorted({str(p.dtype).replace("torch.", "") for n, p in model.named_parameters() if "lora_" in n})


def make_inputs(batch: int, seq: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(INPUT_SEED + 7919 * batch + seq)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


def logits_fn(module: Callable, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fn():
        with torch.no_grad():
            return module(input_ids=ids).logits
    return fn


@torch.library.custom_op("bench_model::gdn_chunk_rule", mutates_args=())
def gdn_chunk_rule_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                      beta: torch.Tensor, use_qk_l2norm: bool) -> torch.Tensor:
    """transformers' chunked gated-delta rule (zero initial state, no final state) as ONE opaque op: Dynamo and
    Inductor see a single extern call (as an fla kernel registered as an op would be), not its chunk loop, and
    there is no graph break (a break under PEFT's forward-hook context manager makes Dynamo give up on the
    whole top frame and compile the LoRA linears one by one, so no graph holds both projections of a layer)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    chunked = hf.torch_chunk_gated_delta_rule
    chunked = getattr(chunked, "bench_original", chunked)  # the unpatched function while gdn_core is active
    out, _ = chunked(query, key, value, g=g, beta=beta, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=use_qk_l2norm)
    return out.contiguous()


@gdn_chunk_rule_op.register_fake
def _(query, key, value, g, beta, use_qk_l2norm):
    return value.new_empty(value.shape, dtype=query.dtype)  # [batch, seq, v_heads, v_dim], query's dtype


@torch.library.custom_op("bench_model::gdn_chunk_rule_bwd", mutates_args=())
def gdn_chunk_rule_bwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                       beta: torch.Tensor, use_qk_l2norm: bool, grad: torch.Tensor) -> list[torch.Tensor]:
    """The rule's input gradients (training benchmarks), by recomputing it eagerly under autograd on the
    calling thread with the autograd dispatch keys let back in (:func:`_autograd_dispatch`). Not in a
    thread of its own: on CUDA this kernel runs on the autograd engine's device thread, which would then
    wait for the thread's ``autograd.grad`` while that call's work waits in the same thread's queue (the
    training step hung). Not ``torch.func.vjp``: fla's kernel (where installed, transformers runs it here)
    is an ``autograd.Function`` without ``setup_context``, which functorch transforms refuse."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    chunked = hf.torch_chunk_gated_delta_rule
    chunked = getattr(chunked, "bench_original", chunked)
    tensors = (query, key, value, g, beta)
    with _autograd_dispatch():
        inputs = [t.detach().requires_grad_() for t in tensors]
        out = chunked(*inputs[:3], g=inputs[3], beta=inputs[4], initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=use_qk_l2norm)[0]
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True)
    return [(torch.zeros_like(t) if d is None else d).to(t.dtype).contiguous() for t, d in zip(tensors, grads)]


@contextlib.contextmanager
def _autograd_dispatch() -> Iterator[None]:
    """Grad mode on and the autograd dispatch keys out of the thread's excluded set (a custom op's kernel
    may run below autograd), so that eager ops inside record a graph."""
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.ADInplaceOrView):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), \
            torch.enable_grad():
        yield


@gdn_chunk_rule_bwd.register_fake
def _(query, key, value, g, beta, use_qk_l2norm, grad):
    return [t.new_empty(t.shape) for t in (query, key, value, g, beta)]


def _gdn_rule_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.l2 = inputs[5]


def _gdn_rule_backward(ctx, grad):
    return (*torch.ops.bench_model.gdn_chunk_rule_bwd(*ctx.saved_tensors, ctx.l2, grad), None)


gdn_chunk_rule_op.register_autograd(_gdn_rule_backward, setup_context=_gdn_rule_setup)


@functools.lru_cache(maxsize=None)
def _recurrent_step():
    """transformers' recurrent rule compiled on its own (lazily: the first call compiles per shape)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    return torch.compile(hf.torch_recurrent_gated_delta_rule, dynamic=False)


@torch.library.custom_op("bench_model::gdn_recurrent_rule", mutates_args=())
def gdn_recurrent_rule_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, use_qk_l2norm: bool) -> torch.Tensor:
    """transformers' recurrent gated-delta rule (zero initial state, no final state) as ONE opaque op,
    compiled on its own over contiguous inputs. Compiled inline with the model, Inductor's fusion of this
    step depends on the layouts and producers upstream of it, so two variants that differ only in their
    projections get different core kernels (at decode 128 on 35B-A3B widths: one fused reduction in one
    variant, a materialized [B, H, 128, 128] fp32 state and three reductions in another, 3x the time).
    Opaque, the core is the same kernels in every variant, as an fla kernel would be."""
    args = [t.contiguous() for t in (query, key, value, g, beta)]
    out, _ = _recurrent_step()(*args, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=use_qk_l2norm)
    return out.contiguous()


@gdn_recurrent_rule_op.register_fake
def _(query, key, value, g, beta, use_qk_l2norm):
    return value.new_empty(value.shape, dtype=query.dtype)


@contextlib.contextmanager
def gdn_core(core: str, decode_core: str) -> Iterator[None]:
    """Choose how transformers' GDN core (the gated delta rule after the projections) runs, for as long as
    the context is open (a scoped patch of ``modeling_qwen3_5.torch_chunk_gated_delta_rule``, which the GDN
    forward looks up at call time; Dynamo guards on it).

    core "opaque": the chunked rule (transformers' torch fallback, or fla's kernel where installed) runs as
    one custom op (``bench_model::gdn_chunk_rule``, eager inside), the same in every variant. Compiled as
    Python, Dynamo unrolls its loop over 64-token chunks, so compile time grows with S (on this CPU machine a
    tiny-model prefill:4096 compile had not finished after 5 min, decode:64 took 78 s) while the projections
    the pass rewrites are the same. core "compiled": transformers' code as is.
    decode_core "recurrent": for one-token sequences, transformers' own recurrent rule (what a cached decode
    step runs; the same math for one token from a zero state) instead of the chunked rule, which pads every
    sequence to a 64-token chunk (64x the work). "chunked": as is. The recurrent step is compiled (a few
    pointwise ops and reductions). "recurrent-opaque": that step compiled on its own as one opaque op
    (``bench_model::gdn_recurrent_rule``), the same kernels in every variant."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    chunked = hf.torch_chunk_gated_delta_rule
    recurrent = hf.torch_recurrent_gated_delta_rule
    if core == "compiled" and decode_core == "chunked":
        yield
        return

    def patched(query, key, value, *args, **kwargs):
        if decode_core.startswith("recurrent") and query.shape[1] == 1:  # [batch, seq, heads, dim]
            kwargs.pop("chunk_size", None)
            simple = (not args and kwargs.get("initial_state") is None and not kwargs.get("output_final_state")
                      and kwargs.get("cu_seqlens") is None)
            if decode_core == "recurrent-opaque" and simple:
                out = gdn_recurrent_rule_op(query, key, value, kwargs["g"], kwargs["beta"],
                                            bool(kwargs.get("use_qk_l2norm_in_kernel", False)))
                return out, None
            return recurrent(query, key, value, *args, **kwargs)
        simple = (not args and kwargs.get("initial_state") is None and not kwargs.get("output_final_state")
                  and kwargs.get("cu_seqlens") is None and kwargs.get("chunk_size", 64) == 64)
        if core == "opaque" and simple:
            out = gdn_chunk_rule_op(query, key, value, kwargs["g"], kwargs["beta"],
                                    bool(kwargs.get("use_qk_l2norm_in_kernel", False)))
            return out, None
        return chunked(query, key, value, *args, **kwargs)

    patched.bench_original = chunked
    with mock.patch.object(hf, "torch_chunk_gated_delta_rule", patched):
        yield


# ------------------------------------------------------------------------------------------------
# Timing (timers: benchmarks.common)
# ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timing(args) -> dict:
    return dict(reps=args.reps, warmup=args.warmup, rep_ms=args.rep_ms)


def measure(fn: Callable, ref: torch.Tensor, cell: dict, args) -> None:
    """Fill cell with ms_graph / ms_events / ms_wall; ``ref`` is the plain (non-graph) call's output."""
    if args.device != "cuda":
        cell["ms_wall"] = time_wall(fn, **_timing(args))
        return
    if args.timing in ("auto", "graph"):
        try:
            cell["ms_graph"], cell["err_graph_replay"] = time_graph(fn, ref, **_timing(args))
            if not cell["err_graph_replay"] <= REPLAY_LIMIT:
                cell["graph_note"] = "replay output differs from the plain call: graph time not used"
        except Exception as e:  # capture can fail on host syncs / CPU tensors: fall back to events
            cell["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            logger.warning("CUDA graph capture failed (%s); events only", cell["graph_error"])
            torch.cuda.synchronize()
    if args.timing in ("auto", "events") or "ms_graph" not in cell:
        cell["ms_events"] = time_events(fn, **_timing(args))
    if args.profile:
        from benchmarks.profile_block import kernel_times

        cell["top_kernels_us"] = dict(list(kernel_times(fn, iters=5).items())[:args.profile])
        print("\n".join(f"    {us:9.1f} us  {name}" for name, us in cell["top_kernels_us"].items()), flush=True)


def cell_ms(cell: Optional[dict], method: str) -> Optional[float]:
    if not cell:
        return None
    if method == "graph":
        return cell.get("ms_graph") if "graph_note" not in cell else None
    return cell.get(f"ms_{method}")


def row_method(row: dict) -> str:
    """The timing method of a row's main numbers: graph when inductor and fx_passes both have it."""
    if "ms_wall" in (row["cells"].get("inductor") or {}) or row["device"] == "cpu":
        return "wall"
    if all(cell_ms(row["cells"].get(v), "graph") for v in ("inductor", "fx_passes") if v in row["cells"]):
        return "graph"
    return "events"


# ------------------------------------------------------------------------------------------------
# One (preset, adapter dtype, rank): build once, pack once, every phase x variant
# ------------------------------------------------------------------------------------------------
def compile_variant(variant: str, target: torch.nn.Module, mode: Optional[str]):
    """A fresh torch.compile of one variant as a user writes it: ``backend="inductor"`` or
    ``backend="fx_passes"`` (the registered name), ``mode``, ``dynamic=False`` (Dynamo reset first, so the
    previous variant's graphs and guards are gone and this compile is timed alone). Compilation happens at
    the first call (see ``first_call``)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph / graph-break counts of this compile only
    backend = "fx_passes" if variant in ("fx_passes", "no_lora_fx", "block_fx_passes") else "inductor"
    return torch.compile(target, backend=backend, mode=None if mode == "default" else mode, fullgraph=False,
                         dynamic=False)


class ReportLog(logging.Handler):
    """The pass's graph reports as the ``fx_passes`` logger carries them (``extra={"fx_passes_report": ...}``):
    what a user of ``backend="fx_passes"`` gets without holding the pass object."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reports: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        report = getattr(record, "fx_passes_report", None)
        if report is not None:
            self.reports.append(report)

    def __enter__(self) -> "ReportLog":
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger.removeHandler(self)
        logger.setLevel(self._level)


def first_call(fn: Callable, variant: str, args) -> torch.Tensor:
    """The compiling call. Inductor's caches are off for it: a cache hit would skip our post-grad pass (and
    its report), and fresh compiles keep the printed compile times comparable across runs; --allow-cache
    lets inductor / no_lora use them."""
    use_cache = args.allow_cache and variant in ("inductor", "no_lora")
    with torch._inductor.config.patch(force_disable_caches=not use_cache):
        return fn()


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return dict(graphs=int(counters["stats"].get("unique_graphs", 0)),
                graph_breaks=int(sum(counters["graph_break"].values())))


def run_config(preset_name: str, adapter_dtype: str, r: int, phases: list, variants: list, args, state) -> None:
    """Build the model once, pack once, then every phase x variant under the chosen GDN core."""
    preset, device, dtype = PRESETS[preset_name], args.device, getattr(torch, args.dtype)
    t0 = time.perf_counter()
    base = build_base_model(preset, args.layers, args.vocab, dtype, device)
    cfg = base.config
    n_gdn = sum(t == "linear_attention" for t in cfg.layer_types)
    bare = copy.deepcopy(base) if any(v.startswith("no_lora") for v in variants) else None
    model = attach_lora(base, r, adapter_dtype, dtype)
    # probes: packing must leave eager logits bit-identical; the GDN-core choice must agree with transformers'
    # own path to bf16 noise (on the first decode and the first prefill phase: the cores differ by phase)
    probes = [next(ph for ph in phases if ph[0].startswith(kind))
              for kind in ("decode", "prefill") if any(ph[0].startswith(kind) for ph in phases)]
    core_errs = {}
    with torch.no_grad():
        probe_ids = make_inputs(probes[0][1], probes[0][2], args.vocab, device)
        before_pack = model(input_ids=probe_ids).logits.clone()
        packed = pack_qkvz_weights(model)
        if bare is not None:
            pack_qkvz_weights(bare)  # the same layout for the no-LoRA baseline (Inductor runs 2 mms either way)
        after_pack = model(input_ids=probe_ids).logits
        pack_diff = (after_pack.float() - before_pack.float()).abs().max().item()
        for probe in probes:
            ids = make_inputs(probe[1], probe[2], args.vocab, device)
            hf_logits = model(input_ids=ids).logits
            with gdn_core(args.gdn_core, args.decode_core):
                core_errs[probe[0]] = rel_err(model(input_ids=ids).logits, hf_logits)
            del hf_logits
    del before_pack, after_pack
    lora_dt = lora_dtypes(model)
    n_params = sum(p.numel() for p in model.parameters())
    config_info = dict(preset=preset_name, preset_dims=dataclasses.asdict(preset), layers=args.layers,
                       gdn_layers=n_gdn, vocab=args.vocab, params=n_params, r=r, alpha=2 * r,
                       adapter_dtype=adapter_dtype, lora_param_dtypes=lora_dt, packed_layers=packed,
                       packing_max_abs_diff=pack_diff, gdn_core_vs_hf_rel_err=core_errs)
    note = getattr(preset, "note", "") or "fx_passes.models.TinyQwen35Spec, smoke test"
    print(f"\n### preset {preset_name} ({note}): hidden {cfg.hidden_size}, GDN key_dim {preset.key_dim} "
          f"value_dim {preset.value_dim} (N_qkv {2 * preset.key_dim + preset.value_dim}, N_z {preset.value_dim}), "
          f"MLP {cfg.intermediate_size}, attention {cfg.num_attention_heads}x{cfg.head_dim} "
          f"({cfg.num_key_value_heads} KV); {args.layers} layers ({n_gdn} GDN), vocab {args.vocab}, "
          f"{n_params / 1e9:.2f} B params incl. LoRA\n    LoRA r={r} alpha={2 * r}, adapter params {lora_dt} "
          f"({adapter_dtype}); packed {packed} GDN layer(s): packing changed eager logits by {pack_diff:.1e} "
          f"(expected 0); GDN core {args.gdn_core}/{args.decode_core} vs transformers' path: rel err "
          f"{', '.join(f'{k} {v:.1e}' for k, v in core_errs.items())}; built in {time.perf_counter() - t0:.1f} s",
          flush=True)
    try:
        with gdn_core(args.gdn_core, args.decode_core):
            for phase in phases:
                if state.out_of_budget():
                    state.skipped.append(f"{preset_name}/r{r}/{adapter_dtype}/{phase[0]}")
                    continue
                run_phase(phase, model, bare, variants, n_gdn, dict(preset=preset_name, r=r,
                          adapter_dtype=adapter_dtype, lora_param_dtypes=lora_dt, config=config_info), args, state)
    finally:
        del model, bare, base
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()


def fp32_reference(model: torch.nn.Module, ids: torch.Tensor, ref: torch.Tensor):
    """(eager's relative error against the fp32 model, the fp32 model's logits): the same weights in fp32
    (a copy), so each compiled variant's error is judged against the exact math, not against eager's own
    bf16 roundings. (None, None) when the model already runs in fp32."""
    if next(model.parameters()).dtype == torch.float32:
        return None, None
    m32 = copy.deepcopy(model).float()
    with torch.no_grad():
        ref32 = m32(input_ids=ids).logits.float()
    del m32
    return rel_err(ref, ref32), ref32


def run_phase(phase: tuple, model: torch.nn.Module, bare: Optional[torch.nn.Module], variants: list, n_gdn: int,
              row_head: dict, args, state) -> None:
    """One table row: every variant on one input shape (one compile per compiled variant)."""
    phase_text, batch, seq = phase
    device = args.device
    ids = make_inputs(batch, seq, args.vocab, device)
    row = dict(row_head, phase=phase_text, batch=batch, seq=seq, tokens=batch * seq, device=device, cells={})
    with torch.no_grad():
        ref = model(input_ids=ids).logits.clone()
        ref_bare = bare(input_ids=ids).logits.clone() if bare is not None else None
        row["eager_err_vs_fp32"], ref32 = fp32_reference(model, ids, ref)
    for variant in variants:
        if variant != "eager" and state.out_of_budget():
            row["cells"][variant] = dict(error="skipped: --budget-s reached")
            continue
        cell = row["cells"].setdefault(variant, {})
        target_ref = ref if variant in ("eager", "inductor", "fx_passes") else ref_bare
        try:
            module = model
            if variant != "eager":
                module = compile_variant(variant, model if variant in ("inductor", "fx_passes") else bare, args.mode)
            fn = logits_fn(module, ids)
            t1 = time.perf_counter()
            with ReportLog() as log:
                out = fn() if variant == "eager" else first_call(fn, variant, args)  # dynamic=False: this shape only
            _sync(device)
            if variant != "eager":
                cell["compile_s"] = time.perf_counter() - t1
                cell.update(_dynamo_counts())
            cell["err_vs_eager"] = rel_err(out, target_ref)
            if ref32 is not None and variant in ("inductor", "fx_passes"):
                cell["err_vs_fp32"] = rel_err(out, ref32)
            if variant in ("fx_passes", "no_lora_fx"):
                check_reports(log.reports, variant, cell, n_gdn, args)
            measure(fn, out, cell, args)
            del out
        except FusionDidNotFire:
            finish_row(row, variants)
            state.rows.append(row)
            state.dump()
            raise
        except Exception as e:  # keep going; the row says what broke
            cell["error"] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        print(fmt_cell(row, variant), flush=True)
    if not args.no_block and not state.out_of_budget():
        measure_block(model, batch, seq, n_gdn, row, args)
    torch._dynamo.reset()
    finish_row(row, variants)
    state.rows.append(row)
    print(fmt_row(row), flush=True)
    state.dump()


class ProjectionBlock(torch.nn.Module):
    """One GDN layer's input projections as the model runs them (PEFT's wrapped linears: base + LoRA)."""

    def __init__(self, gdn: torch.nn.Module):
        super().__init__()
        self.gdn = gdn   # a submodule: the compiled graph keeps the module paths (gdn.in_proj_qkv, ...)
        self.names = [n for n in _csv(GDN_PROJECTIONS) if hasattr(gdn, n)]

    def forward(self, hidden: torch.Tensor):
        return tuple(getattr(self.gdn, name)(hidden) for name in self.names)


def measure_block(model: torch.nn.Module, batch: int, seq: int, n_gdn: int, row: dict, args) -> None:
    """The projection block alone (the first GDN layer's, same tokens as the row), compiled by inductor
    and by fx_passes: ``row["block"]`` holds both cells, and ``finish_row`` the block's share of the
    model time and how much of the model-level gain the block explains."""
    gdn = next(m for _, m in model.named_modules() if hasattr(m, "in_proj_qkv") and hasattr(m, "in_proj_z"))
    block = ProjectionBlock(gdn)
    p = next(gdn.in_proj_qkv.parameters())
    g = torch.Generator().manual_seed(INPUT_SEED + batch + seq)
    hidden = torch.randn(batch, seq, model.config.hidden_size, generator=g).to(p.device, getattr(torch, args.dtype))
    with torch.no_grad():
        ref = torch.cat(block(hidden), -1)
    cells = row.setdefault("block", {})
    for variant in ("block_inductor", "block_fx_passes"):
        cell = cells.setdefault(variant, {})
        try:
            compiled = compile_variant(variant, block, args.mode)

            def fn(compiled=compiled):
                with torch.no_grad():
                    return compiled(hidden)
            with ReportLog() as log:
                out = first_call(fn, variant, args)
            cell["err_vs_eager"] = rel_err(out, ref)
            if variant == "block_fx_passes":
                cell["fused_layers"] = sum(r["fused_layers"] for r in log.reports)
                if cell["fused_layers"] != 1:
                    cell["error"] = f"the pass fused {cell['fused_layers']} layers of the block (expected 1)"
            measure(fn, out, cell, args)
            del out
        except Exception as e:  # noqa: BLE001  (the row says what broke)
            cell["error"] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
    print(f"  block ({' + '.join(block.names)}, one layer, {batch * seq} tokens): "
          + ", ".join(f"{v} {_ms(cell_ms(c, row_method_of(c)))} ms" for v, c in cells.items()), flush=True)


def row_method_of(cell: dict) -> str:
    return "graph" if cell_ms(cell, "graph") else ("events" if "ms_events" in cell else "wall")


class FusionDidNotFire(RuntimeError):
    pass


def check_reports(reports: list, variant: str, cell: dict, n_gdn: int, args) -> None:
    """``reports``: the graph reports (dicts) the fx_passes logger carried during the compile."""
    rewritten = sum(r["fused_layers"] for r in reports)
    found = sum(len(r["layers"]) for r in reports)
    cell.update(gdn_found=found, gdn_rewritten=rewritten, report=reports)
    print(f"  -- {variant}: fx_passes report ({len(reports)} graph(s)) --")
    for report in reports:
        print("  " + report["summary"])
        for layer in report["layers"]:
            print(f"    {layer['layer']}: " + ("rewritten, " + " + ".join(layer["folded"]) if layer["rewritten"]
                                               else f"not rewritten: {layer['reason']}"))
    if rewritten == 0:
        raise FusionDidNotFire(f"{variant}: the fx_passes pass rewrote 0 of {n_gdn} GDN layers on {args.device} "
                               f"({len(reports)} graph(s) seen): the timings would be Inductor's. See the report "
                               f"above.")
    if rewritten != n_gdn and variant == "fx_passes":
        print(f"  WARNING {variant}: {rewritten} of {n_gdn} GDN layers rewritten")


def finish_row(row: dict, variants: list) -> None:
    cells = row["cells"]
    row["method"] = row_method(row)
    for method in ("graph", "events", "wall"):
        ind, fx, nl = (cell_ms(cells.get(v), method) for v in ("inductor", "fx_passes", "no_lora"))
        if ind and fx:
            row[f"speedup_fx_vs_inductor_{method}"] = ind / fx
        if fx and nl:
            row[f"fx_over_no_lora_{method}"] = fx / nl
        if ind and nl:
            row[f"inductor_over_no_lora_{method}"] = ind / nl
    block = row.get("block") or {}
    for method in ("graph", "events", "wall"):
        b_ind, b_fx = (cell_ms(block.get(v), method) for v in ("block_inductor", "block_fx_passes"))
        ind, fx = (cell_ms(cells.get(v), method) for v in ("inductor", "fx_passes"))
        if b_ind and b_fx:
            row[f"block_speedup_{method}"] = b_ind / b_fx
            if ind:   # the GDN layers' projection blocks as a share of the inductor-compiled model
                row[f"block_share_of_inductor_{method}"] = row["config"]["gdn_layers"] * b_ind / ind
            if ind and fx and ind != fx:   # model-level gain explained by the blocks' gain (1.0: all of it)
                row[f"block_gain_explains_{method}"] = row["config"]["gdn_layers"] * (b_ind - b_fx) / (ind - fx)
    errs = [c["err_vs_eager"] for v, c in {**cells, **block}.items() if v != "eager" and "err_vs_eager" in c]
    failed = [v for v, c in {**cells, **block}.items() if "error" in c and not c["error"].startswith("skipped")]
    row["max_rel_err"] = max(errs) if errs else None
    eager32 = row.get("eager_err_vs_fp32")
    if eager32:   # judged against the fp32 model: no farther from it than ERR_FP32_FACTOR x eager bf16
        errs32 = {v: c["err_vs_fp32"] for v, c in cells.items() if "err_vs_fp32" in c}
        row["max_err_vs_fp32_over_eager"] = max(errs32.values()) / eager32 if errs32 else None
        row["ok"] = not failed and all(e <= ERR_FP32_FACTOR * eager32 for e in errs32.values())
    else:
        row["ok"] = not failed and all(e <= ERR_LIMIT for e in errs)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _ms(v: Optional[float]) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _x(v: Optional[float]) -> str:
    return f"{v:.3f}x" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def fmt_cell(row: dict, variant: str) -> str:
    c = row["cells"].get(variant, {})
    parts = [f"  {row['preset']} r={row['r']} {row['adapter_dtype']} {row['phase']:<13s} {variant:<10s}"]
    if "compile_s" in c:
        parts.append(f"compile {c['compile_s']:.1f} s ({c.get('graphs', '?')} graph(s), "
                     f"{c.get('graph_breaks', '?')} break(s))")
    for m in ("graph", "events", "wall"):
        if f"ms_{m}" in c:
            parts.append(f"{m} {c[f'ms_{m}']:.3f} ms")
    if "err_vs_eager" in c:
        parts.append(f"err {c['err_vs_eager']:.1e}")
    for k in ("graph_error", "graph_note", "error"):
        if k in c:
            parts.append(f"[{k}: {c[k][:160]}]")
    return " | ".join(parts)


def fmt_row(row: dict) -> str:
    m = row["method"]
    return (f"ROW {row['preset']} r={row['r']} {row['adapter_dtype']} {row['phase']} ({m}): "
            f"fx_passes vs inductor {_x(row.get(f'speedup_fx_vs_inductor_{m}'))}, "
            f"fx_passes / no_lora {_x(row.get(f'fx_over_no_lora_{m}'))}, "
            f"block {_x(row.get(f'block_speedup_{m}'))} (share {_pct(row.get(f'block_share_of_inductor_{m}'))}, "
            f"explains {_x(row.get(f'block_gain_explains_{m}'))} of the gain), "
            f"max rel err {_err(row)}")


def _err(row: dict) -> str:
    """Worst error vs eager bf16, and (where measured) the worst distance to the fp32 model as a multiple of
    eager bf16's own; FAIL as ``finish_row`` judged."""
    err, r32 = row.get("max_rel_err"), row.get("max_err_vs_fp32_over_eager")
    return (("-" if err is None else f"{err:.1e}") + ("" if r32 is None else f" (fp32: {r32:.2f}x eager's)")
            + ("" if row["ok"] else " FAIL"))


def print_table(rows: list, meta: dict, method: Optional[str] = None) -> None:
    """One markdown table. method None: each row's main method (graph where inductor and fx_passes both
    captured, else events; wall on the CPU)."""
    title = {None: "main timing per row (see the timing column)", "events": "CUDA events per call "
             "(host launch overhead included)"}.get(method, method)
    print(f"\n#### {title}\n")
    print("| preset | r | adapters | phase | tokens | eager ms | inductor ms | fx_passes ms | no_lora (inductor) ms "
          "| speedup fx_passes vs inductor | fx_passes / no_lora | inductor / no_lora | block speedup "
          "| blocks' share of inductor | block gain / model gain | max rel err vs eager (vs fp32) | timing |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m = method or row["method"]
        c = row["cells"]
        eager = cell_ms(c.get("eager"), m) or (cell_ms(c.get("eager"), "events") if m == "graph" else None)
        eager_s = _ms(eager) + ("*" if m == "graph" and eager and not cell_ms(c.get("eager"), "graph") else "")
        err_s = _err(row)
        print(f"| {row['preset']} | {row['r']} | {row['adapter_dtype']} | {row['phase']} | {row['tokens']} | "
              f"{eager_s} | {_ms(cell_ms(c.get('inductor'), m))} | {_ms(cell_ms(c.get('fx_passes'), m))} | "
              f"{_ms(cell_ms(c.get('no_lora'), m))} | {_x(row.get(f'speedup_fx_vs_inductor_{m}'))} | "
              f"{_x(row.get(f'fx_over_no_lora_{m}'))} | {_x(row.get(f'inductor_over_no_lora_{m}'))} | "
              f"{_x(row.get(f'block_speedup_{m}'))} | {_pct(row.get(f'block_share_of_inductor_{m}'))} | "
              f"{_x(row.get(f'block_gain_explains_{m}'))} | {err_s} | {m} |")


def print_compile_times(rows: list) -> None:
    print("\n#### compile wall times (s), first call incl. Dynamo + Inductor (+ Triton) compile\n")
    for row in rows:
        cells = " ".join(f"{v}={c['compile_s']:.1f}" for v, c in row["cells"].items() if "compile_s" in c)
        print(f"- {row['preset']} r={row['r']} {row['adapter_dtype']} {row['phase']}: {cells}")


class RunState:
    """Rows, JSON sink and the wall-clock budget of one run. ``stamp``: the fields every JSON row starts with."""

    def __init__(self, stamp: dict, json_path: Optional[str], budget_s: float):
        self.stamp, self.json_path, self.budget_s = stamp, json_path, budget_s
        self.start = time.perf_counter()
        self.rows: list = []
        self.skipped: list = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_budget(self) -> bool:
        """True when the next compile would probably run past the budget: elapsed + the longest compile so
        far (plus its timing) > budget."""
        if not self.budget_s:
            return False
        longest = max((c.get("compile_s", 0.0) for r in self.rows for c in r["cells"].values()), default=0.0)
        return self.elapsed() + 1.3 * longest + 10 > self.budget_s

    def dump(self) -> None:
        """The rows so far (and one row per phase skipped for the budget), each stamped."""
        rows = [result_row(self.stamp, **row) for row in self.rows]
        rows += [result_row(self.stamp, status="skipped_for_budget", skipped=what) for what in self.skipped]
        write_rows(self.json_path, rows)


def versions(device: str) -> dict:
    """``benchmarks.common.environment`` with transformers / peft, and which GDN kernels transformers picks
    (the fla / causal_conv1d packages replace its torch fallbacks)."""
    meta = environment(device, packages=("transformers", "peft"))
    meta["fla_installed"] = importlib.util.find_spec("fla") is not None
    meta["causal_conv1d_installed"] = importlib.util.find_spec("causal_conv1d") is not None
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logger.setLevel(logging.INFO)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device; use --device cpu for the smoke test")
    presets = preset_names(args.preset)
    ranks = _csv(args.rank, int)
    adapter_dtypes = _csv(args.adapter_dtype)
    if not set(adapter_dtypes) <= {"fp32", "bf16"}:
        raise SystemExit("--adapter-dtype: fp32 and/or bf16")
    phases = [(t, *parse_phase(t)[1:]) for t in _csv(args.phases)]
    variants = _csv(args.variants)
    if not set(variants) <= set(ALL_VARIANTS):
        raise SystemExit(f"--variants: {list(ALL_VARIANTS)}")
    if args.device == "cpu" and any(p != "tiny" for p in presets):
        print("WARNING: real-size presets on the CPU take a long time")

    path = json_path("bench_model", args.json)
    meta = versions(args.device) | dict(args=vars(args), err_limit=ERR_LIMIT,
                                     err_fp32_factor=ERR_FP32_FACTOR)
    n_compiles = len(presets) * len(ranks) * len(adapter_dtypes) * len(phases) * sum(v in COMPILED for v in variants)
    header = (f"# bench_model: {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
              f"transformers {meta['transformers']} | peft {meta['peft']} | {meta['date_utc']} | "
              f"commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}\n"
              f"command: {meta['command']}\n"
              f"model: Qwen3_5ForCausalLM, the layer sizes of the preset(s), {args.layers} layers "
              f"(real sizes 3 GDN : 1 full attention; tiny alternating), "
              f"vocab {args.vocab}, random weights (std 0.02), {args.dtype}, eval, use_cache=False; "
              f"GDN kernels: fla {'INSTALLED' if meta['fla_installed'] else 'not installed'}, causal_conv1d "
              f"{'INSTALLED' if meta['causal_conv1d_installed'] else 'not installed'} (else transformers' torch "
              f"fallbacks)\n"
              f"NOTE: use_cache=False (no KV / recurrent cache): decode:B is one forward over [B, 1] (B sequences "
              f"of one token), a short forward rather than a cached decode step: attention sees only the token "
              f"itself and the GDN state starts from zero. GDN core: "
              + {"recurrent": "transformers' recurrent rule for one-token sequences (what a cached decode step "
                              "runs) compiled with the model, ",
                 "recurrent-opaque": "transformers' recurrent rule for one-token sequences (what a cached decode "
                                     "step runs) compiled on its own as one opaque op (same kernels in every "
                                     "variant), ",
                 "chunked": "the chunked rule also for one-token sequences (each padded to a 64-token chunk), ",
                 }[args.decode_core]
              + ("the chunked rule (prefill) as one opaque custom op, eager inside, in every variant (compile "
                 "time independent of S; no graph break)"
                 if args.gdn_core == "opaque" else "the chunked rule compiled (its chunk loop unrolled)")
              + ". prefill:S is one forward over [1, S].\n"
              f"variants {variants}; {n_compiles} compile(s) planned, each timed below; budget "
              f"{args.budget_s:.0f} s; timing: {args.timing if args.device == 'cuda' else 'wall clock (CPU)'}")
    print(header, flush=True)
    state = RunState(meta, path, args.budget_s)

    code = 0
    try:
        for preset_name in presets:
            for adapter_dtype in adapter_dtypes:
                for r in ranks:
                    if state.out_of_budget():
                        state.skipped.append(f"{preset_name}/r{r}/{adapter_dtype}/*")
                        continue
                    run_config(preset_name, adapter_dtype, r, phases, variants, args, state)
    except FusionDidNotFire as e:
        print(f"\nERROR: {e}", flush=True)
        code = 2
    state.dump()
    rows = state.rows
    print(f"\n## results ({state.elapsed():.0f} s wall)")
    print(header)
    if state.skipped:
        print(f"SKIPPED for --budget-s {args.budget_s:.0f}: {', '.join(state.skipped)}")
    if args.device == "cuda" and any(r["method"] == "graph" for r in rows):
        print_table(rows, meta, "events")
    print_compile_times(rows)
    print_table(rows, meta)
    print("\nms = median; speedup = inductor ms / fx_passes ms; fx_passes / no_lora = what LoRA still costs above "
          "the LoRA-free model; max rel err = worst relative Frobenius error of any compiled variant's logits vs "
          f"eager; (fp32: ...) = the worst compiled variant's distance to the same model in fp32 as a multiple of "
          f"eager bf16's (limit {ERR_FP32_FACTOR}x; without the fp32 model, limit {ERR_LIMIT} vs eager); timing graph = CUDA-graph replay (eager* = events, capture failed), events = "
          "CUDA events per call, wall = CPU wall clock.")
    if path:
        print(f"JSON: {path}")
    if code == 0 and (not rows or not all(r["ok"] for r in rows)):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
