"""What every benchmark script shares: the Qwen3.5 GDN projection shapes, the timers, the L2 rotation
and the stamp on every result row.

Scripts run as modules from the repository root, e.g. ``python -m benchmarks.bench_qkvz_lora --help``.
Nothing here imports triton at module level (``--cpu-check`` runs choose the Triton interpreter before
triton is imported).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Mapping, Optional

import torch

from fx_passes.models import TinyQwen35Spec

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Shapes: the one table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Qwen35Shape(TinyQwen35Spec):
    """A real Qwen3.5 size: ``fx_passes.models.TinyQwen35Spec``'s GDN fields (hidden size, linear key /
    value heads and head dims: what the pass rewrites) plus the text-model fields a whole-model benchmark
    needs (names as in ``Qwen3_5TextConfig``). ``num_layers`` / ``vocab_size`` are the benchmark's choice
    (``dataclasses.replace``); the layer pattern is Qwen3.5's 3 GDN : 1 full attention."""
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 256
    note: str = ""

    def layer_types(self) -> list[str]:
        return ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(self.num_layers)]


def n_qkv(spec: TinyQwen35Spec) -> int:
    """Output columns of in_proj_qkv: q and k (key_dim each) and v (value_dim)."""
    return 2 * spec.key_dim + spec.value_dim


def n_z(spec: TinyQwen35Spec) -> int:
    """Output columns of in_proj_z (value_dim)."""
    return spec.value_dim


def gdn_dims(spec: TinyQwen35Spec) -> tuple[int, int, int]:
    """(hidden size, key_dim, value_dim) of any spec: the arguments of the op-level benchmarks' problems."""
    return spec.hidden_size, spec.key_dim, spec.value_dim


def projection_widths(spec: TinyQwen35Spec) -> list[int]:
    """Output widths of a GDN layer's four input projections: qkv, z, b, a."""
    return [2 * spec.key_dim + spec.value_dim, spec.value_dim, spec.linear_num_value_heads,
            spec.linear_num_value_heads]


def projection_weights(spec: TinyQwen35Spec, generator: torch.Generator) -> list[torch.Tensor]:
    """A GDN layer's four projection weights on CUDA, bf16, scaled by 1 / sqrt(hidden size)."""
    H = spec.hidden_size
    return [(torch.randn(n, H, device="cuda", generator=generator) * H ** -0.5).to(torch.bfloat16)
            for n in projection_widths(spec)]


def packed_weight_bytes(spec: TinyQwen35Spec, element_size: int = 2) -> int:
    """Bytes of the packed [W_qkv; W_z] (N_qkv + N_z rows of hidden_size)."""
    return (n_qkv(spec) + n_z(spec)) * spec.hidden_size * element_size


# GDN sizes are the published configs' (key heads 16 x 128 everywhere; value heads x 128). The attention
# dims of the two MoE sizes (heads x 256, 2 KV heads) are from their published configs as recalled, not
# re-checked (no download); they shape only bench_model's full-attention layer. MoE: bench_model runs a
# dense MLP of the given width in place of the experts (a 256-expert HF MoE block under torch.compile is
# dominated by its routing loop / graph breaks, not by the projections).
SHAPES: dict[str, Qwen35Shape] = {
    # Qwen3.5-35B-A3B: N_qkv 8192, N_z 4096. MoE (256 experts, 8 routed + 1 shared of width 512).
    "35B-A3B": Qwen35Shape(hidden_size=2048, linear_num_key_heads=16, linear_key_head_dim=128,
                           linear_num_value_heads=32, linear_value_head_dim=128,
                           intermediate_size=6144, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                           note="MoE in reality: dense MLP 6144 stands in for the experts; GDN sizes real"),
    # Qwen3.5-27B (dense): N_qkv 10240, N_z 6144; every field is the real one.
    "27B": Qwen35Shape(hidden_size=5120, linear_num_key_heads=16, linear_key_head_dim=128,
                       linear_num_value_heads=48, linear_value_head_dim=128,
                       intermediate_size=17408, num_attention_heads=24, num_key_value_heads=4, head_dim=256,
                       note="dense, real sizes"),
    # Qwen3.5-397B-A17B: N_qkv 12288, N_z 8192. MoE (512 experts, 10 routed + 1 shared of width 1024):
    # dense MLP 11 * 1024 = 11264 (the active experts' width) stands in.
    "397B-A17B": Qwen35Shape(hidden_size=4096, linear_num_key_heads=16, linear_key_head_dim=128,
                             linear_num_value_heads=64, linear_value_head_dim=128,
                             intermediate_size=11264, num_attention_heads=32, num_key_value_heads=2, head_dim=256,
                             note="MoE in reality: dense MLP 11264 (= active experts' width) stands in; "
                                  "GDN sizes real"),
}
# CPU logic checks (Triton interpreter): fx_passes' tiny spec; the op-level check uses 3 value heads so
# that N is not a power of two (masked tiles).
TINY = TinyQwen35Spec()
CPU_SHAPES: dict[str, TinyQwen35Spec] = {"tiny": dataclasses.replace(TINY, linear_num_value_heads=3)}


def select_shapes(names: Optional[str], table: Mapping[str, TinyQwen35Spec] = SHAPES) -> dict:
    """Rows of ``table`` whose name starts with one of the comma-separated ``names`` (case-insensitive:
    ``27b``, ``35B``, ``397b`` all work), in the order asked; None or empty: the whole table. Unknown
    names exit."""
    if not names:
        return dict(table)
    out = {}
    for w in (w.strip().lower() for w in names.split(",") if w.strip()):
        hits = {k: v for k, v in table.items() if k.lower().startswith(w)}
        if not hits:
            raise SystemExit(f"unknown shape {w!r}: {list(table)}")
        out.update(hits)
    return out


def csv_list(s: Optional[str], cast=str) -> Optional[list]:
    """'1,16,64' -> [1, 16, 64] (with ``cast=int``); None stays None."""
    return None if s is None else [cast(v.strip()) for v in s.split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------
# Timers
# ------------------------------------------------------------------------------------------------
class Timer:
    """Op-level timer: CUDA-graph replay median (``triton.testing.do_bench_cudagraph``, ms); on the CPU
    (logic checks only) the wall clock of one call after one warm-up call."""

    def __init__(self, device: str, rep: float):
        self.device, self.rep = device, rep

    def __call__(self, fn: Callable) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench_cudagraph

            return float(do_bench_cudagraph(fn, rep=self.rep, return_mode="median"))
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _n_reps(first_ms: float, reps: int, rep_ms: float) -> int:
    """As many reps as fit in ``rep_ms`` (at least 3), at most ``reps``."""
    return int(max(1, min(reps, max(3, rep_ms / max(first_ms, 1e-3)))))


def time_wall(fn: Callable, *, reps: int = 50, warmup: int = 3, rep_ms: float = 1500.0) -> float:
    """CPU: median wall clock (ms) over the calls that fit in ``rep_ms``."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    n = _n_reps((time.perf_counter() - t0) * 1e3, reps, rep_ms)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_events(fn: Callable, *, reps: int = 50, warmup: int = 3, rep_ms: float = 1500.0) -> float:
    """CUDA events around each call (median ms): GPU time between the call's first and last kernel, so
    host launch overhead shows wherever the host cannot keep the GPU busy (small decode steps)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = _n_reps((time.perf_counter() - t0) * 1e3, reps, rep_ms)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def time_graph(fn: Callable, ref: torch.Tensor, *, reps: int = 50, warmup: int = 3,
               rep_ms: float = 1500.0) -> tuple[float, float]:
    """Capture one call into a CUDA graph and time its replays with events (no host overhead).

    Returns (median ms, rel. error of the replayed output against ``ref``, the plain call's output): a
    replay that computes something else than the plain call (e.g. a host-side value frozen into the
    graph) must not pass silently."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(max(2, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        n = _n_reps((time.perf_counter() - t0) * 1e3, reps, rep_ms)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events), err
    finally:
        del graph
        torch.cuda.synchronize()


def rel_err(got, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``got`` against ``ref`` (each a tensor, or a tuple of column blocks
    concatenated); inf when ``got`` is not finite."""
    if isinstance(got, (tuple, list)):
        got = torch.cat(list(got), -1)
    if isinstance(ref, (tuple, list)):
        ref = torch.cat(list(ref), -1)
    got, ref = got.float(), ref.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# L2 rotation and ceilings
# ------------------------------------------------------------------------------------------------
def l2_cache_bytes(device: str = "cuda") -> int:
    """The GPU's L2 size in bytes (0 on the CPU)."""
    return torch.cuda.get_device_properties().L2_cache_size if device == "cuda" else 0


def rotation_sets(w_bytes: int, device: str) -> int:
    """How many weight sets a timed call rotates over so that W is never served from L2 (in a model,
    other layers' weights evict it): enough to cover twice the L2 cache; 1 on the CPU. (35B-A3B's packed
    W is 50 MB, under the H200's 60 MB L2: without rotation its base GEMM partly ran from L2.)"""
    if device != "cuda":
        return 1
    return max(1, math.ceil(2 * l2_cache_bytes(device) / w_bytes))


def measure_ceilings(device: str) -> tuple[float, float]:
    """(copy bandwidth in B/s, bf16 mm peak in FLOP/s) measured on this card: the roofline's two ceilings
    (a 1 GiB copy; an 8192^3 bf16 mm). Placeholders on the CPU."""
    if device != "cuda":
        return 1e11, 1e12
    from triton.testing import do_bench

    a = torch.randn(1024**3 // 2, dtype=torch.bfloat16, device=device)  # 1 GiB
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    bw = 2 * a.numel() * a.element_size() / (t * 1e-3)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    w = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t = do_bench(lambda: x @ w, rep=200, return_mode="median")
    peak = 2 * m**3 / (t * 1e-3)
    del x, w
    torch.cuda.empty_cache()
    return bw, peak


# ------------------------------------------------------------------------------------------------
# Result rows
# ------------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest() -> str:
    """12 hex digits of a sha256 over the ``fx_passes`` package's sources (``.py`` and ``.json``, with their
    paths): names the code a row measured where git cannot (a copy of the tree whose ``.git`` is older
    than its files: ``commit`` then names an older commit and ``dirty`` is True). Compare with this
    function's output on a checkout."""
    root = pathlib.Path(REPO_ROOT) / "fx_passes"
    digest = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(device: Optional[str] = None, packages: Iterable[str] = ()) -> dict:
    """The stamp of a run: GPU name (or "cpu"), torch / triton versions (+ ``packages``' versions, None
    where not installed), git commit (None where git or the repository is missing; ``dirty`` True when
    the working tree differs from it), the package sources' digest (:func:`source_digest`), UTC date and
    the command line."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               torch=torch.__version__)
    for name in ("triton", *packages):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    env["commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if env["commit"] else None
    env["dirty"] = None if status is None else bool(status)
    env["source"] = source_digest()
    env["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)   # set when run as python -m
    argv0 = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    env["command"] = " ".join(["python", *argv0, *sys.argv[1:]])
    return env


def result_row(env: Mapping, **fields) -> dict:
    """One data row: the run's stamp (``environment()``) followed by the measured fields."""
    return {**env, **fields}


def json_path(name: str, explicit: Optional[str] = None) -> Optional[str]:
    """Where a script writes its rows: ``explicit``, else ``$OUT/<name>.json``, else None (no file)."""
    if explicit:
        return explicit
    out = os.environ.get("OUT")
    return os.path.join(out, f"{name}.json") if out else None


def write_rows(path: Optional[str], rows: list) -> None:
    """Write the rows (a JSON list of dicts); scripts call it after every row, so a cut run keeps its data."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1, default=str)
