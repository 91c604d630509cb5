"""Tiles of the training op's Triton kernels (issue 17): each of ``expand_add_``, ``lora_ds``, ``lora_db`` and
``lora_dsdb`` (dS and dB from one read of dy; ``ds+db``: the two kernels it replaces, back to back, at their
default tiles) over a grid of launches at the given widths, ranks and T (GPU time: CUDA-graph replays,
:func:`gpu_ms`), with the default launch's time beside the best one. bf16 base, fp32 adapters (PEFT's
default), LoRA on qkv and z.

    python -m benchmarks.sweep_train_kernels --shapes 35B-A3B,27B --T 4096,16384
    python -m benchmarks.sweep_train_kernels --kernels dsdb,ds+db   # only these
    python -m benchmarks.sweep_train_kernels --kernels dsdb --rank 16,32,64 --T 2048,8192 --block-m 64 \
        --dsdb-splits 0   # dsdb's tiles per rank, its token splits by its own rule
    python -m benchmarks.sweep_train_kernels --precisions bf16x3,tf32x3   # the default tiles, per precision

``--precisions``: each kernel at its default tiles with its fp32 dots forced to each precision in turn (the
kernels pick theirs from the dtypes: ``lora_train.dot_precision``), its time and its error against an fp64
reference (relative, Frobenius; a bf16 output's error is its rounding, ~2e-3). The expand multiplies
two fp32 factors and does not take ``dot_precision``: its columns run the same code (run-to-run noise).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
from unittest import mock

import torch
import triton.testing

from benchmarks.common import (csv_list, environment, json_path, projection_widths, result_row, select_shapes,
                               write_rows)
from fx_passes.ops.kernels import lora_train as lt
from fx_passes.ops.tuning import device_info


def launches(block_ms, block_ns, warps, stages):
    return [lt.TrainLaunch(m, n, w, st) for m, n, w, st in itertools.product(block_ms, block_ns, warps, stages)]


def gpu_ms(fn) -> float:
    """GPU time of ``fn`` (ms): median of CUDA-graph replays (the function forms plan their launches on every
    call: host work the ops do once per signature, which a timer around the call would count at small T)."""
    return triton.testing.do_bench_cudagraph(fn, rep=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="35B-A3B,27B")
    ap.add_argument("--T", default="4096,16384")
    ap.add_argument("--rank", default="16", help="LoRA ranks (comma-separated; --precisions: the first)")
    ap.add_argument("--block-m", default="32,64,128", help="token tiles of the candidate launches")
    ap.add_argument("--dsdb-splits", default="0,2,4,8", help="dsdb's candidate token splits (0: its own rule)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--precisions", default=None, help="compare these dot precisions at the default tiles")
    ap.add_argument("--kernels", default="expand,ds,db,dsdb,ds+db,shrink_x,da_x")
    args = ap.parse_args()
    if args.precisions:
        return compare_precisions(args)
    env = environment("cuda")
    sms = device_info(torch.device("cuda")).sms
    kw = lambda name, values: [{name: v} for v in values]   # noqa: E731
    block_ms = csv_list(args.block_m, int)
    # kernel: default launch (None: the kernel's own choice), its keywords, candidate launches, their keywords
    grid = {
        "expand": (lt.EXPAND_LAUNCH, {}, launches(block_ms, [64, 128, 256], [4, 8], [2, 3]), [{}]),
        "ds": (lt.DS_LAUNCH, {}, launches(block_ms, [64, 128], [4, 8], [3, 4]), kw("chunk", [1024, 2048, 4096])),
        "db": (lt.DB_LAUNCH, {}, launches(block_ms, [32, 64, 128], [4, 8], [3, 4]), kw("programs_per_sm", [2, 4])),
        "dsdb": (None, {}, launches(block_ms, [64, 128, 256], [4, 8], [2, 3]),
                 kw("splits", [k or None for k in csv_list(args.dsdb_splits, int)])),
        "ds+db": (None, {}, [None], [{}]),
        "shrink_x": (lt.DS_LAUNCH, {}, launches(block_ms, [64, 128], [4], [3, 4]),
                     kw("chunk", [256, 512, 1024, 2048])),
        "da_x": (lt.DB_LAUNCH, {}, launches(block_ms, [32, 64, 128], [4], [3, 4]),
                 kw("programs_per_sm", [2, 4, 8])),
    }
    grid = {k: v for k, v in grid.items() if k in csv_list(args.kernels, str)}
    rows = []
    for name, spec in select_shapes(args.shapes).items():
        widths = projection_widths(spec)
        H = spec.hidden_size
        for r in csv_list(args.rank, int):
            lora_b = [torch.randn(widths[0], r, device="cuda"), torch.randn(widths[1], r, device="cuda")]
            lora_a = torch.randn(2 * r, H, device="cuda")
            sl = lt.Slices((widths[0], widths[1]), (0, 0), (0, r), (r, r), (2.0, 2.0))
            x_side = lt.Slices((H,), (0,), (0,), (2 * r,), (1.0,))
            for T in csv_list(args.T, int):
                outs = [torch.randn(T, n, device="cuda", dtype=torch.bfloat16) for n in widths[:2]]
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                s = torch.randn(T, 2 * r, device="cuda")
                calls = {
                    "expand": lambda cfg, **k: lt.expand_add_(outs, s, lora_b, sl, launch=cfg, **k),
                    "ds": lambda cfg, **k: lt.lora_ds(outs, lora_b, sl, 2 * r, launch=cfg, **k),
                    "db": lambda cfg, **k: lt.lora_db(outs, s, sl, sms, launch=cfg, **k),
                    "dsdb": lambda cfg, **k: lt.lora_dsdb(outs, lora_b, s, sl, sms, launch=cfg, **k),
                    "ds+db": lambda cfg, **k: (lt.lora_ds(outs, lora_b, sl, 2 * r), lt.lora_db(outs, s, sl, sms)),
                    "shrink_x": lambda cfg, **k: lt.lora_ds([x], [lora_a.t()], x_side, 2 * r, launch=cfg, **k),
                    "da_x": lambda cfg, **k: lt.lora_db([x], s, x_side, sms, transposed=True, launch=cfg, **k),
                }
                for kernel, (default, default_kw, cands, cand_kws) in grid.items():
                    timed = []
                    for cfg, extra in itertools.product(cands, cand_kws):
                        try:
                            timed.append((gpu_ms(lambda: calls[kernel](cfg, **extra)), cfg, extra))
                        except Exception as e:   # out of shared memory / registers: not a candidate here
                            print(f"  {kernel} {cfg} {extra}: {type(e).__name__}", flush=True)
                    timed.sort(key=lambda t: t[0])
                    base = gpu_ms(lambda: calls[kernel](default, **default_kw))
                    best_ms, best, best_kw = timed[0]
                    print(f"{name:10s} r{r:<3d} T{T:<6d} {kernel:8s} default {base * 1e3:7.1f} us  best {best_ms * 1e3:7.1f} us "
                          f"{label(best, best_kw)}  next: " + ", ".join(f"{t * 1e3:.0f} {label(c, k)}"
                                                                      for t, c, k in timed[1:4]), flush=True)
                    rows.append(result_row(env, shape=name, r=r, T=T, kernel=kernel, default_us=base * 1e3,
                                           best_us=best_ms * 1e3, best=dict(dataclass_dict(best), **best_kw),
                                           all=[(t * 1e3, dict(dataclass_dict(c), **k)) for t, c, k in timed]))
                    write_rows(json_path("sweep_train_kernels", args.json), rows)


def label(cfg, extra: dict) -> str:
    if cfg is None:
        return "-"
    return f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}" + "".join(
        f" {k}={v}" for k, v in extra.items())


@contextlib.contextmanager
def forced_precision(precision: str):
    with mock.patch.object(lt, "dot_precision", lambda data, adapters: precision):
        yield


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def compare_precisions(args) -> None:
    env = environment("cuda")
    sms = device_info(torch.device("cuda")).sms
    rows = []
    for name, spec in select_shapes(args.shapes).items():
        widths = [2 * spec.key_dim + spec.value_dim, spec.value_dim]
        H, r = spec.hidden_size, csv_list(args.rank, int)[0]
        g = torch.Generator().manual_seed(0)
        lora_b = [(torch.randn(n, r, generator=g) * 0.02).cuda() for n in widths]
        lora_a = (torch.randn(2 * r, H, generator=g) * H ** -0.5).cuda()
        sl = lt.Slices(tuple(widths), (0, 0), (0, r), (r, r), (2.0, 2.0))
        x_side = lt.Slices((H,), (0,), (0,), (2 * r,), (1.0,))
        for T in csv_list(args.T, int):
            outs = [torch.randn(T, n, generator=g).to("cuda", torch.bfloat16) for n in widths]
            x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
            s = torch.randn(T, 2 * r, generator=g).cuda()
            o64, b64, s64, x64, a64 = ([t.double() for t in outs], [b.double() for b in lora_b], s.double(),
                                       x.double(), lora_a.double())
            want_out = [o + 2.0 * s64[:, i * r:(i + 1) * r] @ b.t() for i, (o, b) in enumerate(zip(o64, b64))]
            want = {
                "expand": torch.cat(want_out, 1),
                "ds": torch.cat([2.0 * o @ b for o, b in zip(o64, b64)], 1),
                "db": torch.cat([2.0 * o.t() @ s64[:, i * r:(i + 1) * r] for i, o in enumerate(o64)], 0),
                "dsdb": torch.cat([2.0 * o @ b for o, b in zip(o64, b64)], 1),
                "dsdb_db": torch.cat([2.0 * o.t() @ s64[:, i * r:(i + 1) * r] for i, o in enumerate(o64)], 0),
                "shrink_x": x64 @ a64.t(),
                "da_x": s64.t() @ x64,
            }

            scratch = [o.clone() for o in outs]

            def expand():
                got = [o.clone() for o in outs]
                lt.expand_add_(got, s, lora_b, sl)
                return torch.cat(got, 1)

            # kernel: (what is timed: the launch alone, in place on scratch for the expand; its checked result)
            calls = {
                "expand": (lambda: lt.expand_add_(scratch, s, lora_b, sl), expand),
                "ds": (lambda: lt.lora_ds(outs, lora_b, sl, 2 * r),) * 2,
                "db": (lambda: lt.lora_db(outs, s, sl, sms), lambda: lt.lora_db(outs, s, sl, sms)[:, :r]),
                "dsdb": (lambda: lt.lora_dsdb(outs, lora_b, s, sl, sms),
                         lambda: lt.lora_dsdb(outs, lora_b, s, sl, sms)[0]),
                "dsdb_db": (lambda: lt.lora_dsdb(outs, lora_b, s, sl, sms),
                            lambda: lt.lora_dsdb(outs, lora_b, s, sl, sms)[1][:, :r]),
                "shrink_x": (lambda: lt.lora_ds([x], [lora_a.t()], x_side, 2 * r),) * 2,
                "da_x": (lambda: lt.lora_db([x], s, x_side, sms, transposed=True),
                         lambda: lt.lora_db([x], s, x_side, sms, transposed=True)),
            }
            for kernel, (run, result) in calls.items():
                cell, first = {}, None
                for precision in csv_list(args.precisions, str):
                    with forced_precision(precision):
                        got = result()
                        us = gpu_ms(run) * 1e3
                    first = got if first is None else first   # elements unlike the first precision's
                    cell[precision] = dict(us=us, err=_rel(got, want[kernel]),
                                           differ=(got != first).float().mean().item())
                print(f"{name:10s} T{T:<6d} {kernel:8s} " + "  ".join(
                    f"{p} {c['us']:7.1f} us err {c['err']:.1e} differ {c['differ']:.1e}" for p, c in cell.items()),
                      flush=True)
                rows.append(result_row(env, shape=name, T=T, rank=r, kernel=kernel, cells=cell))
                write_rows(json_path("sweep_train_kernels_precision", args.json), rows)


def dataclass_dict(cfg) -> dict:
    if cfg is None:
        return {}
    return dict(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


if __name__ == "__main__":
    main()
