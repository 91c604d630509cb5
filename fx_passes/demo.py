"""The main job: a tiny random Qwen3.5 + PEFT LoRA, compiled with and without the pass.

Prints, per GDN layer, what matched; the op counts before/after; and the max logits difference
of both compiled models against eager.
"""
from __future__ import annotations

import argparse
import time

import torch

from fx_passes.backend import FxPassesBackend
from fx_passes.config import QkvzFusionConfig
from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs


# max |logits - eager| of the tiny model (|logits| ~ 1) beyond which the demo fails
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--moe", action="store_true", help="Qwen3.5-MoE instead of the dense model")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="in_proj_qkv,in_proj_z,in_proj_b,in_proj_a",
                        help="PEFT target_modules, comma-separated (or all-linear)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (every other one is GDN)")
    parser.add_argument("--no-pack", action="store_true",
                        help="the backend leaves the projection weights apart (QkvzFusionConfig(pack_weights=False))")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")


def run(args: argparse.Namespace) -> int:
    spec = TinyQwen35Spec(num_layers=args.layers, moe=args.moe)
    dtype = getattr(torch, args.dtype)
    targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    model = add_lora(build_tiny_qwen35(spec, dtype=dtype, device=args.device), r=args.rank, targets=targets)
    ids = example_inputs(spec, device=args.device)
    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        torch._dynamo.reset()
        start = time.perf_counter()
        plain = torch.compile(model, backend="inductor", dynamic=args.dynamic)(input_ids=ids).logits.float()
        t_plain = time.perf_counter() - start
        torch._dynamo.reset()
        backend = FxPassesBackend(QkvzFusionConfig(pack_weights=not args.no_pack))
        start = time.perf_counter()
        fused_logits = torch.compile(model, backend=backend, dynamic=args.dynamic)(input_ids=ids).logits.float()
        t_fused = time.perf_counter() - start
    print(f"model: tiny Qwen3.5{'-MoE' if args.moe else ''}, {spec.num_gdn_layers} GDN layer(s), "
          f"LoRA r={args.rank} on {args.targets.replace(',', ' + ')}, {args.dtype} on {args.device}")
    for report in backend.fusion_pass.reports:
        print(report.to_text())
    print(f"max |logits - eager|: inductor without the pass {(plain - eager).abs().max().item():.3e}, "
          f"with the pass {(fused_logits - eager).abs().max().item():.3e}; "
          f"fused vs unfused compiled {(fused_logits - plain).abs().max().item():.3e}")
    print(f"compile+run seconds: without {t_plain:.1f}, with {t_fused:.1f}")
    if backend.packed_layers:
        print(f"the backend packed the projection weights of {len(backend.packed_layers)} layer(s) into one buffer each")
    # a graph Inductor served from its cache (a second run on this machine) was not seen by the pass:
    # its report counts the fused ops in the cached code instead
    fused = sum(r.fused_layers for r in backend.fusion_pass.reports)
    if fused != spec.num_gdn_layers:
        print(f"ERROR: expected {spec.num_gdn_layers} GDN layers running fused, got {fused}")
        return 1
    if (fused_vs_eager := (fused_logits - eager).abs().max().item()) > TOLERANCE[dtype]:
        print(f"ERROR: logits differ from eager by {fused_vs_eager:.3e} (> {TOLERANCE[dtype]:.0e})")
        return 1
    return 0
