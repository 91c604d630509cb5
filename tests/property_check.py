"""Random Qwen3.5 + PEFT configurations compiled with the fx_passes backend, against eager.

Each configuration draws: hidden size, GDN key / value head counts and dims, LoRA ranks per projection
(1 and > 128 included), alpha / rslora, 1-3 active adapters, which projections carry LoRA, dense or MoE,
packed or unpacked weights, batch / sequence, an attention mask with padding, fp32 or bf16. The check:
the compile succeeds; every GDN layer is either rewritten or skipped with a reason; the logits agree
with eager within the dtype's tolerance (relative to max |logits|).

    python tests/property_check.py --many 500 [--seed 0] [--json out.json] [--jobs N]   # the long run
    tests/test_property.py runs a fixed list of seeds in CI.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import random
import sys
import time
import traceback
from typing import Optional

import torch

# max |compiled - eager| / max |eager| of the logits. fp32: summation order only (Inductor vs eager);
# bf16: the model itself runs in bf16 through 2 layers, where one rounding of a GEMM output differs.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@dataclasses.dataclass
class Config:
    seed: int
    hidden: int
    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    targets: tuple
    rank: int
    z_rank: Optional[int]          # rank_pattern for in_proj_z (None: same as rank)
    alpha: int
    rslora: bool
    adapters: int
    moe: bool
    pack: bool
    batch: int
    seq: int
    padded: bool
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def draw(seed: int) -> Config:
    rng = random.Random(seed)
    k_heads = rng.choice([1, 2, 4])
    return Config(
        seed=seed,
        hidden=rng.choice([32, 48, 64, 96]),
        k_heads=k_heads,
        k_dim=rng.choice([8, 16, 32]),
        v_heads=k_heads * rng.choice([1, 2]),
        v_dim=rng.choice([8, 16, 32]),
        targets=rng.choice([("in_proj_qkv", "in_proj_z"), ("in_proj_qkv", "in_proj_z"), ("in_proj_qkv",),
                            ("in_proj_z",), ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")]),
        rank=rng.choice([1, 2, 4, 8, 16, 64, 130]),
        z_rank=rng.choice([None, None, None, 1, 12, 160]),
        alpha=rng.choice([1, 8, 16, 32]),
        rslora=rng.random() < 0.25,
        adapters=rng.choice([1, 1, 2, 3]),
        moe=rng.random() < 0.3,
        pack=rng.random() < 0.8,
        batch=rng.choice([1, 2, 3]),
        seq=rng.choice([1, 3, 8, 9]),
        padded=rng.random() < 0.3,
        dtype=rng.choice(["float32", "float32", "bfloat16"]),
    )


def build(cfg: Config):
    from peft import LoraConfig, get_peft_model
    from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
                              Qwen3_5TextConfig)

    torch.manual_seed(cfg.seed)
    common = dict(vocab_size=96, hidden_size=cfg.hidden, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, linear_num_key_heads=cfg.k_heads,
                  linear_key_head_dim=cfg.k_dim, linear_num_value_heads=cfg.v_heads,
                  linear_value_head_dim=cfg.v_dim, linear_conv_kernel_dim=4,
                  layer_types=["linear_attention", "full_attention"], use_cache=False)
    if cfg.moe:
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**common, moe_intermediate_size=16,
                                                           shared_expert_intermediate_size=16, num_experts=4,
                                                           num_experts_per_tok=2))
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**common, intermediate_size=64))
    model = model.to(cfg.torch_dtype).eval()
    lora = dict(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), use_rslora=cfg.rslora,
                init_lora_weights=False)
    if cfg.z_rank is not None:
        lora["rank_pattern"] = {"in_proj_z": cfg.z_rank}
    peft_model = get_peft_model(model, LoraConfig(**lora), adapter_name="a0")
    for i in range(1, cfg.adapters):
        peft_model.add_adapter(f"a{i}", LoraConfig(**lora))
    if cfg.adapters > 1:
        peft_model.base_model.set_adapter([f"a{i}" for i in range(cfg.adapters)])
    return peft_model.eval()


def inputs(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, 96, (cfg.batch, cfg.seq), generator=g)
    kwargs = {"input_ids": ids}
    if cfg.padded:
        mask = torch.ones(cfg.batch, cfg.seq, dtype=torch.long)
        mask[0, : cfg.seq // 2] = 0   # left padding of the first sequence
        kwargs["attention_mask"] = mask
    return kwargs


def check(cfg: Config) -> dict:
    """Compile one configuration; returns its outcome (never raises)."""
    from fx_passes import FxPassesBackend, QkvzFusionConfig

    result = dict(config=dataclasses.asdict(cfg))
    start = time.perf_counter()
    try:
        model = build(cfg)
        kwargs = inputs(cfg)
        backend = FxPassesBackend(QkvzFusionConfig(pack_weights=cfg.pack))
        # the FX graph cache off: two draws can give the same graph, and a hit would skip the pass
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            eager = model(**kwargs).logits.float()
            torch._dynamo.reset()
            got = torch.compile(model, backend=backend)(**kwargs).logits.float()
        torch._dynamo.reset()
        layers = [layer for report in backend.fusion_pass.reports for layer in report.layers]
        err = ((got - eager).abs().max() / eager.abs().max().clamp_min(1e-6)).item()
        result.update(
            status="ok", rel_err=err, tol=TOLERANCE[cfg.torch_dtype],
            rewritten=sum(layer.rewritten for layer in layers),
            skipped=[layer.reason for layer in layers if not layer.rewritten],
            layers=len(layers), kernels=[layer.kernel for layer in layers if layer.rewritten])
        if not err <= TOLERANCE[cfg.torch_dtype]:
            result["status"] = "mismatch"
        elif len(layers) != 1:
            result["status"] = f"found {len(layers)} GDN layers, expected 1"
        elif any(not reason for reason in result["skipped"]):
            result["status"] = "skipped without a reason"
    except Exception as error:  # noqa: BLE001  (the run records every failure)
        result.update(status="compile_failure", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
    result["seconds"] = time.perf_counter() - start
    return result


def _check_seed(seed: int) -> dict:
    return check(draw(seed))


def summarize(results: list[dict]) -> dict:
    reasons = collections.Counter(reason.split(":")[0][:120] for r in results for reason in r.get("skipped", []))
    import peft
    import transformers

    return dict(versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__, python=sys.version.split()[0]),
                configs=len(results),
                passed=sum(r["status"] == "ok" for r in results),
                mismatches=sum(r["status"] == "mismatch" for r in results),
                compile_failures=sum(r["status"] == "compile_failure" for r in results),
                other_failures=sum(r["status"] not in ("ok", "mismatch", "compile_failure") for r in results),
                rewritten_layers=sum(r.get("rewritten", 0) for r in results),
                skipped_layers=sum(len(r.get("skipped", [])) for r in results),
                skip_reasons=dict(reasons.most_common()),
                max_rel_err={dt: max((r.get("rel_err", 0.0) for r in results if r["config"]["dtype"] == dt),
                                     default=None) for dt in ("float32", "bfloat16")})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--many", type=int, default=20, help="how many configurations")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--json", default=None, help="write every result and the summary here")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes (one thread each); results are the same as with one")
    args = parser.parse_args(argv)
    seeds = range(args.seed, args.seed + args.many)
    if args.jobs > 1:
        # one intra-op thread and one Inductor compile thread per worker: N workers use N cores
        os.environ.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        pool = concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"))
        outcomes = pool.map(_check_seed, seeds)
    else:
        pool, outcomes = None, map(_check_seed, seeds)
    results = []
    for seed, r in zip(seeds, outcomes):
        results.append(r)
        print(f"seed {seed}: {r['status']} ({r['seconds']:.1f} s) rewritten {r.get('rewritten')} "
              f"skipped {r.get('skipped')} err {r.get('rel_err', float('nan')):.2e}", flush=True)
        if args.json and (len(results) % 10 == 0 or seed == args.seed + args.many - 1):
            with open(args.json, "w") as out:
                json.dump(dict(summary=summarize(results), results=results), out, indent=1)
    if pool is not None:
        pool.shutdown()
    summary = summarize(results)
    print(json.dumps(summary, indent=1))
    return 0 if summary["passed"] == summary["configs"] else 1


if __name__ == "__main__":
    sys.exit(main())
