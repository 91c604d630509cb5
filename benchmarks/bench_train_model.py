"""Issue 17: a model-level PEFT training step (a few real-width Qwen3.5 layers), Inductor vs fx_passes.

A random ``Qwen3_5ForCausalLM`` with the preset's widths (``benchmarks.bench_model.build_base_model``:
``--layers`` decoder layers, 3 GDN : 1 full attention), bf16 and frozen, PEFT LoRA (r, alpha 2r, fp32
adapters: PEFT's default) on ``in_proj_qkv`` / ``in_proj_z``, train mode. One step: forward, next-token
cross-entropy of the logits (eager, outside the compiled model), ``loss.backward()``, AdamW step on the adapters, ``zero_grad``. Per variant: ms
per step (CUDA events, median of ``--reps``), peak memory of a step above what is allocated before it, the
loss against Inductor's. The gated-delta core (transformers' chunked torch rule) runs as one opaque op with
a recomputing backward in both variants (``benchmarks.bench_model.gdn_core``) (compiled as Python, Dynamo unrolls its 64-token chunk loop: minutes
of compile; it is not what the pass rewrites). Where the ``fla`` package (flash-linear-attention) is
importable, transformers runs fla's Triton chunk kernel there instead of its torch rule (as a user's
install would); each row records ``fla``.

    python -m benchmarks.bench_train_model --preset 35b,27b --seq 2048,8192
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from benchmarks.bench_model import PRESETS, build_base_model, gdn_core, preset_names
from benchmarks.common import csv_list, environment, json_path, result_row, write_rows
from fx_passes.backend import FxPassesBackend
from fx_passes.config import QkvzFusionConfig
from fx_passes.models import add_lora

VARIANTS = ("inductor", "fx_passes")


def build(preset, layers: int, vocab: int, rank: int, device: str) -> torch.nn.Module:
    base = build_base_model(preset, layers, vocab, torch.bfloat16, device)
    model = add_lora(base, r=rank, alpha=2 * rank, targets=["in_proj_qkv", "in_proj_z"], seed=1)
    return model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="35b,27b")
    ap.add_argument("--seq", default="2048,8192")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, cuda = args.device, args.device == "cuda"
    env = environment(dev)
    rows, t0 = [], time.perf_counter()
    for name in preset_names(args.preset):
        preset = PRESETS[name]
        for S in csv_list(args.seq, int):
            if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                print(f"budget reached: {name} S{S} skipped", flush=True)
                continue
            ids = torch.randint(0, args.vocab, (1, S), generator=torch.Generator().manual_seed(S)).to(dev)
            row = dict(preset=name, seq=S, r=args.rank, layers=args.layers, cells={},
                       fla=importlib.util.find_spec("fla") is not None)
            for variant in VARIANTS:
                torch._dynamo.reset()
                model = build(preset, args.layers, args.vocab, args.rank, dev)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                backend = FxPassesBackend(QkvzFusionConfig(fuse_training=True)) if variant == "fx_passes" else "inductor"
                compiled = torch.compile(model, backend=backend, dynamic=False)
                losses = []

                def step():
                    logits = compiled(input_ids=ids).logits
                    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.detach())

                with gdn_core("opaque", "chunked"):
                    c0 = time.perf_counter()
                    step()
                    cell = dict(compile_s=time.perf_counter() - c0, first_loss=losses[0].item())
                    if variant == "fx_passes":
                        cell["rewritten"] = sum(len(r.rewritten) for r in backend.train_pass.reports)
                        gdn = sum(1 for n, _ in model.named_modules() if n.endswith("linear_attn"))
                        if cell["rewritten"] != gdn:
                            raise RuntimeError(f"the training rewrite fused {cell['rewritten']} of {gdn} GDN layers: "
                                               + "; ".join(r.to_text() for r in backend.train_pass.reports))
                    times = []
                    for i in range(args.reps + 2):
                        if cuda:
                            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            a.record()
                        step()
                        if cuda:
                            b.record()
                            torch.cuda.synchronize()
                            if i >= 2:
                                times.append(a.elapsed_time(b))
                    cell["ms"] = statistics.median(times) if times else float("nan")
                    if cuda:
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        step()
                        torch.cuda.synchronize()
                        cell["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
                    else:
                        cell["peak_mb"] = float("nan")
                row["cells"][variant] = cell
                print(f"{name:10s} S{S:<6d} {variant:9s} {cell['ms']:8.2f} ms  peak {cell['peak_mb']:9.1f} MB  "
                      f"loss {cell['first_loss']:.5f}  compile {cell['compile_s']:.1f} s"
                      + (f"  rewritten {cell['rewritten']}" if "rewritten" in cell else ""), flush=True)
                model = opt = compiled = step = None   # free the variant before the next one is built
                if cuda:
                    torch.cuda.empty_cache()
            c = row["cells"]
            row["inductor_over_fx"] = c["inductor"]["ms"] / c["fx_passes"]["ms"]
            row["peak_fx_over_inductor"] = c["fx_passes"]["peak_mb"] / max(c["inductor"]["peak_mb"], 1e-9)
            row["first_loss_rel_diff"] = abs(c["fx_passes"]["first_loss"] - c["inductor"]["first_loss"]) / abs(
                c["inductor"]["first_loss"])
            print(f"  -> inductor / fx_passes {row['inductor_over_fx']:.3f}x, peak fx / inductor "
                  f"{row['peak_fx_over_inductor']:.3f}, first-step loss rel diff {row['first_loss_rel_diff']:.1e}",
                  flush=True)
            rows.append(result_row(env, **row))
            write_rows(json_path("bench_train_model", args.json), rows)


if __name__ == "__main__":
    main()
