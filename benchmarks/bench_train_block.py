"""Issue 17: one GDN layer's projection block in a training step (forward + backward), at real widths.

The block is ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a`` (bf16, frozen) with PEFT LoRA on
qkv and z (r, alpha 2r, ``--dropout``), in train mode; x requires grad (the layers below need dx).
``--layers N`` puts N such blocks, each with its own x, into one step (a model's step pays the fixed cost
of entering the compiled graph and the autograd engine once for all its layers: one block per step
overstates it). ``--autocast`` runs every variant's forward under ``torch.autocast(bfloat16)``, as
mixed-precision trainers do (the fp32 adapters' products then run in bf16). Variants, each
``torch.compile``d by name:

* ``frozen``    the same four projections without LoRA (what the LoRA should ideally cost nothing above);
* ``inductor``  PEFT's graph compiled by Inductor (unfused);
* ``fx_passes`` the backend (an ``FxPassesBackend``, to read its report: the run stops unless the layer was
                rewritten): the training rewrite (``fx_passes::qkvz_lora_train``, forward + backward);
* ``fx_split``  (``--split``) the same, with the training forward's base GEMMs and its expand, and dx's
                GEMMs and x's LoRA gradient, as separate launches at every T (library GEMMs, then the expand
                kernel: what runs below the device's ``train_fused_min_t``), to measure the fused GEMMs
                (``gemm_lora_train``) in the same run;
* ``fx_opaque`` (``--opaque``) the same, compiled with the training ops kept as opaque ops (their CUDA bodies
                run in Python on every call instead of being traced into Inductor's graph: what the
                inlining saves, in the same run).

Per variant: ms per step (forward + ``backward`` with fixed output grads; CUDA events, median of
``--reps``) started on an idle GPU (``ms``: host and GPU time add up) and issued back to back
(``stream_ms``: max of the two, as in a model's stream of layers), the device's own time per step
(``gpu_ms``, profiler: what ``stream_ms`` is once the host keeps ahead), peak memory of one step above what
is allocated before it, and the relative error of every
LoRA gradient, every output and x's gradient against the same step in eager fp32. The variants are
compiled side by side and timed in ``--rounds`` interleaved rounds, so that a drift of clocks or host load
during the run lands on every variant alike; times are the medians of the rounds, ratios the medians of the
per-round ratios, whose range the run prints (a spread that no rounding of one run removes: the same tree's
35B-A3B step at T 2048 took 1.6-2.4 ms from process to process: host-bound, see ``gpu_ms``).

    python -m benchmarks.bench_train_block --shapes 27B,35B-A3B,397B-A17B --T 4096,16384 --rank 16,64
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time

import torch

from benchmarks.common import csv_list, environment, json_path, result_row, select_shapes, write_rows
from fx_passes.backend import FxPassesBackend
from fx_passes.config import QkvzFusionConfig

VARIANTS = ("frozen", "inductor", "fx_passes")


class Projections(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        H, k, v, nv = spec.hidden_size, spec.key_dim, spec.value_dim, spec.linear_num_value_heads
        self.in_proj_qkv = torch.nn.Linear(H, 2 * k + v, bias=False)
        self.in_proj_z = torch.nn.Linear(H, v, bias=False)
        self.in_proj_b = torch.nn.Linear(H, nv, bias=False)
        self.in_proj_a = torch.nn.Linear(H, nv, bias=False)

    def forward(self, x):
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)


class Layer(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.linear_attn = Projections(spec)


class Block(torch.nn.Module):
    """``layers`` GDN layers' projection blocks, each reading its own input: one compiled step holds them
    all, as a model's step holds all its layers (the per-step cost of entering the compiled graph and the
    autograd engine is paid once, not per layer)."""

    def __init__(self, spec, layers: int = 1):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(spec) for _ in range(layers))

    def forward(self, *xs):
        return tuple(o for layer, x in zip(self.layers, xs) for o in layer.linear_attn(x))


def build(spec, rank: int, dropout: float, device: str, lora: bool, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    block = Block(spec, layers).to(device=device, dtype=torch.bfloat16)
    for p in block.parameters():
        p.requires_grad_(False)
    if not lora:
        return block
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["in_proj_qkv", "in_proj_z"])
    return get_peft_model(block, config).train()   # fp32 adapters on the bf16 base (PEFT's default)


def mixed_precision(device: str, on: bool):
    """``--autocast``: the forward under ``torch.autocast(bfloat16)``, as mixed-precision trainers run it (the
    fp32 adapters' GEMMs then run in bf16, in eager PEFT as in every compiled variant)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on)


def step_fn(model, xs, grads, cudagraphs: bool = False, autocast: bool = False):
    """One training step of the block; ``cudagraphs`` (``mode="reduce-overhead"``): each call starts a new
    step for CUDA-graph trees and drops the LoRA gradients first, as ``optimizer.zero_grad()`` does (the
    previous step's outputs, gradients included, are overwritten by the next replay: accumulating into
    them fails)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = xs[0].device.type

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            for p in params:
                p.grad = None
        for x in xs:
            x.grad = None
        with mixed_precision(device, autocast):
            outs = model(*xs)
        torch.autograd.backward(outs, grads)
    return step


def time_steps(step, reps: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_stream(step, reps: int, rounds: int = 3) -> float:
    """ms per step with ``reps`` steps issued back to back (median of ``rounds``): the host runs ahead while
    the GPU works, so a step costs max(host, GPU) as in a model's stream of layers; :func:`time_steps`
    starts each step on an idle GPU (host and GPU time mostly add up)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def time_interleaved(row: dict, steps: dict, reps: int, rounds: int) -> None:
    """Times every variant in ``rounds`` rounds, each round timing the variants one after another (the order
    rotated from round to round), so that a drift of the GPU's clocks or of the host between variants lands
    in every variant alike; each cell keeps its per-round times and their medians (``ms``, ``stream_ms``)."""
    names = list(steps)
    for i in range(rounds):
        for v in names[i % len(names):] + names[:i % len(names)]:
            cell = row["cells"][v]
            cell.setdefault("ms_rounds", []).append(time_steps(steps[v], reps))
            cell.setdefault("stream_ms_rounds", []).append(time_stream(steps[v], reps, rounds=1))
    for v in names:
        cell = row["cells"][v]
        cell["ms"], cell["stream_ms"] = (statistics.median(cell["ms_rounds"]),
                                         statistics.median(cell["stream_ms_rounds"]))


def ratio_rounds(row: dict, a: str, b: str, key: str = "stream_ms") -> list[float]:
    """Variant a's time over b's, round by round (the two timed within one round)."""
    return [x / y for x, y in zip(row["cells"][a][key + "_rounds"], row["cells"][b][key + "_rounds"])]


def gpu_ms(step, steps: int = 5) -> float:
    """ms of device work per step (kernels, copies and sets as the profiler records them, CUDA-graph replays
    included), averaged over ``steps`` steps: what a step costs once the host keeps ahead of the GPU, which a
    block of a few narrow layers does not (35B-A3B at T 2048)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1000


def peak_mb(step) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def profile_step(step, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"--- {title}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))


def opaque_ops():
    """While the first call compiles: custom ops stay opaque in the traced graph (what ``torch.export`` asks
    for; the training ops honour it as ``triton_op``s do)."""
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition

    return _disable_custom_triton_op_functional_decomposition()


@contextlib.contextmanager
def split_forward():
    """While the first call compiles: ``train_fused_min_t`` out of reach and the ops' plans made afresh
    (they are kept per call signature, which the fused variant shares)."""
    import importlib
    from unittest import mock

    from fx_passes.ops.kernels import gemm_lora_train
    from fx_passes.ops.memo import LruMemo

    train = importlib.import_module("fx_passes.ops.qkvz_lora_train")
    tuning_for = gemm_lora_train.tuning_for
    never = lambda info: dataclasses.replace(tuning_for(info), train_fused_min_t=1 << 62)   # noqa: E731
    with mock.patch.object(gemm_lora_train, "tuning_for", never), mock.patch.object(train, "_FORWARD_PLANS",
                                                                                    LruMemo()), \
            mock.patch.object(train, "_BACKWARD_PLANS", LruMemo()):
        yield


def lora_grads(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="27B,35B-A3B,397B-A17B")
    ap.add_argument("--T", default="4096,16384")
    ap.add_argument("--rank", default="16,64")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--layers", type=int, default=1, help="projection blocks per step (see Block)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds, the variants interleaved in each")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting rows after this many seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32) in every variant")
    ap.add_argument("--autocast", action="store_true",
                    help="every variant's forward under torch.autocast(bfloat16) (the LoRA's GEMMs in bf16)")
    ap.add_argument("--mode", default=None, help="torch.compile mode of every variant (e.g. reduce-overhead)")
    ap.add_argument("--profile", action="store_true", help="print each variant's CUDA kernels (one step)")
    ap.add_argument("--opaque", action="store_true", help="also the fx_opaque variant (see the module docstring)")
    ap.add_argument("--split", action="store_true", help="also the fx_split variant (see the module docstring)")
    ap.add_argument("--variants", default=None, help="only these variants, comma-separated (e.g. frozen,fx_passes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    variants = VARIANTS + (("fx_opaque",) if args.opaque else ()) + (("fx_split",) if args.split else ())
    if args.variants:
        variants = tuple(v for v in variants if v in csv_list(args.variants, str))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dev = args.device
    env = environment(dev)
    rows, t0 = [], time.perf_counter()
    for name, spec in select_shapes(args.shapes).items():
        for r in csv_list(args.rank, int):
            models = {"frozen": build(spec, r, args.dropout, dev, lora=False, layers=args.layers),
                      "lora": build(spec, r, args.dropout, dev, lora=True, layers=args.layers)}
            exact = copy.deepcopy(models["lora"]).float()
            for T in csv_list(args.T, int):
                if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                    print(f"budget reached: {name} r{r} T{T} and later skipped", flush=True)
                    continue
                g = torch.Generator().manual_seed(T)
                xs = [torch.randn(T, spec.hidden_size, generator=g).to(dev, torch.bfloat16).requires_grad_()
                      for _ in range(args.layers)]
                with torch.no_grad():
                    outs = models["frozen"](*xs)
                grads = [torch.randn(o.shape, generator=g).to(dev, o.dtype) for o in outs]
                x32 = [x.detach().float().requires_grad_() for x in xs]
                torch.manual_seed(0)
                exact.zero_grad()
                ref_outs = exact(*x32)
                torch.autograd.backward(ref_outs, [gr.float() for gr in grads])
                ref = lora_grads(exact)
                row = dict(shape=name, r=r, T=T, layers=args.layers, dropout=args.dropout, tf32=args.tf32,
                           autocast=args.autocast, mode=args.mode, cells={})
                steps = {}
                torch._dynamo.reset()   # once per row: the variants' compiled graphs are kept side by side
                for variant in variants:
                    model = models["frozen" if variant == "frozen" else "lora"]
                    model.zero_grad()
                    if variant.startswith("fx_"):
                        backend = FxPassesBackend(QkvzFusionConfig(fuse_training=True), mode=args.mode)
                        compiled = torch.compile(model, backend=backend, dynamic=False)
                    else:
                        compiled = torch.compile(model, backend="inductor", mode=args.mode, dynamic=False)
                    step = steps[variant] = step_fn(compiled, xs, grads, cudagraphs=args.mode == "reduce-overhead",
                                                    autocast=args.autocast)
                    c0 = time.perf_counter()
                    torch.manual_seed(0)
                    with {"fx_opaque": opaque_ops, "fx_split": split_forward}.get(variant, contextlib.nullcontext)():
                        step()
                    cell = dict(compile_s=time.perf_counter() - c0)
                    # x's gradient (copies: a later CUDA-graph replay overwrites x.grad)
                    dx = [x.grad.float() for x in xs] if variant != "frozen" else []
                    if variant != "frozen":   # the outputs of one more training forward (bf16 rounding ~2e-3)
                        torch.manual_seed(0)
                        with mixed_precision(dev, args.autocast):
                            again = compiled(*xs)
                        cell["out_err_vs_fp32"] = max(((o.detach().float() - r.detach()).norm() / r.norm()).item()
                                                      for o, r in zip(again, ref_outs))
                    if variant.startswith("fx_"):
                        cell["rewritten"] = sum(len(rep.rewritten) for rep in backend.train_pass.reports)
                        if cell["rewritten"] != args.layers:
                            raise RuntimeError(f"the training rewrite fused {cell['rewritten']} layers "
                                               f"({args.layers} expected): "
                                               + "; ".join(rep.to_text() for rep in backend.train_pass.reports))
                    if variant != "frozen":
                        got = lora_grads(model)
                        cell["grad_err_vs_fp32"] = max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
                        cell["dx_err_vs_fp32"] = max(((d - x_ref.grad).norm() / x_ref.grad.norm()).item()
                                                     for d, x_ref in zip(dx, x32))
                    if variant != "frozen":   # again on warm launches (the compiling call and two more before)
                        model.zero_grad()
                        step()
                        got = lora_grads(model)
                        cell["warm_grad_err_vs_fp32"] = max(((got[k] - ref[k]).norm() / ref[k].norm()).item()
                                                            for k in ref)
                    if args.profile and dev == "cuda":
                        profile_step(step, f"{name} r{r} T{T} {variant}")
                    row["cells"][variant] = cell
                if dev == "cuda":
                    time_interleaved(row, steps, args.reps, args.rounds)
                for variant, cell in row["cells"].items():   # (after the timed steps: CUDA graphs recorded)
                    cell["peak_mb"] = peak_mb(steps[variant]) if dev == "cuda" else float("nan")
                    cell["gpu_ms"] = gpu_ms(steps[variant]) if dev == "cuda" else float("nan")
                for variant, cell in row["cells"].items():
                    nan = float("nan")
                    print(f"{name:10s} r{r:<3d} T{T:<6d} L{args.layers:<2d} {variant:9s} {cell.get('ms', nan):8.3f} ms"
                          f" (stream {cell.get('stream_ms', nan):8.3f}, gpu {cell['gpu_ms']:8.3f})"
                          f"  peak {cell['peak_mb']:9.1f} MB"
                          f"  grad err {cell.get('grad_err_vs_fp32', nan):.1e}"
                          f" / {cell.get('warm_grad_err_vs_fp32', nan):.1e}"
                          f"  out err {cell.get('out_err_vs_fp32', nan):.1e}"
                          f"  dx err {cell.get('dx_err_vs_fp32', nan):.1e}  compile {cell['compile_s']:.1f} s",
                          flush=True)
                c = row["cells"]
                if "frozen" in c and "fx_passes" in c and dev == "cuda":
                    q = row["stream_fx_over_frozen_rounds"] = ratio_rounds(row, "fx_passes", "frozen")
                    row["gpu_fx_over_frozen"] = c["fx_passes"]["gpu_ms"] / c["frozen"]["gpu_ms"]
                    print(f"  -> stream fx_passes / frozen per round: median {statistics.median(q):.3f}x, "
                          f"range {min(q):.3f}-{max(q):.3f} ({len(q)} rounds); gpu {row['gpu_fx_over_frozen']:.3f}x",
                          flush=True)
                if dev != "cuda" or not all(v in c for v in VARIANTS):   # (--variants: the cells alone)
                    rows.append(result_row(env, **row))
                    write_rows(json_path("bench_train_block", args.json), rows)
                    continue
                pairs = dict(fx_over_frozen=("fx_passes", "frozen"), inductor_over_fx=("inductor", "fx_passes"),
                             split_over_fx=("fx_split", "fx_passes"), opaque_over_fx=("fx_opaque", "fx_passes"))
                for key, (a, b) in pairs.items():
                    if a in c:
                        row[key] = statistics.median(ratio_rounds(row, a, b, "ms"))
                        row["stream_" + key] = statistics.median(ratio_rounds(row, a, b))
                if "fx_split" in c:
                    print(f"  -> fx_split / fx_passes {row['split_over_fx']:.3f}x (stream "
                          f"{row['stream_split_over_fx']:.3f}x)", flush=True)
                if "fx_opaque" in c:
                    print(f"  -> fx_opaque / fx_passes {row['opaque_over_fx']:.3f}x (stream "
                          f"{row['stream_opaque_over_fx']:.3f}x)", flush=True)
                print(f"  -> fx_passes / frozen {row['fx_over_frozen']:.3f}x, inductor / fx_passes "
                      f"{row['inductor_over_fx']:.3f}x (stream {row['stream_fx_over_frozen']:.3f}x, "
                      f"{row['stream_inductor_over_fx']:.3f}x), peak fx / inductor "
                      f"{c['fx_passes']['peak_mb'] / max(c['inductor']['peak_mb'], 1e-9):.3f}", flush=True)
                rows.append(result_row(env, **row))
                write_rows(json_path("bench_train_block", args.json), rows)
            del models, exact
            torch.cuda.empty_cache() if dev == "cuda" else None


if __name__ == "__main__":
    main()
