"""Graph dumps: what the qkvz fusion pass saw and did, as one folder of readable files.

Three ways in:

* ``python -m fx_passes dump [--out DIR] [--dtype ..] [--moe] [--device cpu|cuda]``: the embedded tiny
  Qwen3.5 + PEFT LoRA;
* :func:`dump_compile` ``(model, example_inputs, out_dir, config=None)``: a user's own model;
* the opt-in switch ``FX_PASSES_DUMP_DIR=DIR`` (or ``QkvzFusionConfig(dump_dir=DIR)``): the pass writes
  its per-graph files wherever it runs (``torch.compile``, vLLM) with no other code change. It is read
  when the pass (its config) is made.

The folder::

    DIR/report.txt                   human-readable match report of every graph (header: depyf status)
    DIR/report.json                  the same for tools: {"totals", "depyf", "graphs": [...]}
    DIR/graph_<i>_before.py          post-grad ATen graph just before the pass (print_readable)
    DIR/graph_<i>_after.py           ... and just after it
    DIR/graph_<i>.json               the report of graph <i> alone (report.json is rebuilt from these)
    DIR/dump_info.json               what ``dump`` / ``dump_compile`` compiled (absent with the env switch)
    DIR/depyf/                       ``dump`` / ``dump_compile`` only: depyf's decompiled Dynamo code
                                     (full_code_for_*.py, __transformed_code_*.py) and graphs
                                     (__compiled_fn_*.{Captured,Forward,AFTER_POST_GRAD,...}.py, kernels)

``<i>`` is taken by creating ``graph_<i>_before.py`` exclusively (``O_EXCL``), so several graphs, pass
instances or processes (vLLM workers) writing into one folder never collide; ``report.json`` /
``report.txt`` are rebuilt under a file lock after every graph.

Inductor skips a post-grad pass on an FX-graph-cache or AOTAutograd-cache hit, and ``uuid()`` ignores
``dump_dir``: with a warm cache nothing would be written. ``dump`` / ``dump_compile`` therefore reset Dynamo
and compile with ``force_disable_caches=True``, and so does the ``fx_passes`` backend whenever its pass has a
dump folder (the env switch included). A pass handed to Inductor's options or to vLLM directly needs
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` (under vLLM also ``VLLM_DISABLE_COMPILE_CACHE=1``). The folder
accumulates: delete it to start afresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import glob
import inspect
import json
import os
import shutil
import threading
import warnings
from typing import Any, Iterator, Optional

from fx_passes.config import QkvzFusionConfig
from fx_passes.dump_files import (
    DEPYF_SUBDIR, DUMP_INFO, OUR_FILES, REPORT_JSON, REPORT_TXT, DumpedGraph, load_graph_entries, report_from_dict,
    write_atomic, write_pass_dump, write_summary,
)
from fx_passes.report import GraphReport, LayerMatch, LayerViews


# ============================================================================ depyf, version-robust

def _keyword_names(fn) -> Optional[set[str]]:
    """Names ``fn`` accepts by keyword; None: it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _missing_kwargs(original, replacement) -> set[str]:
    """Keywords ``original`` takes that ``replacement`` does not (``{"*"}``: original takes any)."""
    orig, repl = _keyword_names(original), _keyword_names(replacement)
    if repl is None:
        return set()
    if orig is None:
        return {"*"}
    return orig - repl - {"cls", "self"}


@contextlib.contextmanager
def depyf_dump(dump_dir: str, *, required: bool = False, **prepare_debug_kwargs) -> Iterator[bool]:
    """``depyf.prepare_debug(dump_dir)`` that also works where depyf's patches lag behind torch.

    depyf 0.20 replaces ``PyCodeCache.load_by_key_path`` with ``(key, path, linemap=None, attrs=None)``;
    torch 2.13 calls it with ``set_sys_modules=`` (every Triton kernel load). Signatures are compared
    (no version numbers): only where the original takes keywords depyf's replacement lacks, a wrapper
    takes them and hands them to the original, still through depyf's replacement (so kernels are still
    copied into the dump). On exit, also on an exception, the exact original objects are restored
    (depyf itself puts back a bound method instead of the classmethod), and depyf's global state.

    Yields True with depyf active; False when depyf is not installed and ``required`` is False.
    """
    try:
        import depyf
        from depyf.explain import global_variables as depyf_globals
    except ImportError:
        if required:
            raise
        depyf = None
    if depyf is None:   # yield outside the except block: errors of the body do not chain to the ImportError
        yield False
        return

    import torch._dynamo.utils as dynamo_utils
    import torch.fx.graph_module as fx_graph_module
    from torch._inductor.codecache import PyCodeCache

    saved_load = PyCodeCache.__dict__["load_by_key_path"]       # the raw classmethod object
    saved_exec = fx_graph_module._exec_with_source
    lazy_format = dynamo_utils.lazy_format_graph_code
    saved_lazy_code = lazy_format.__code__
    saved_data = dict(depyf_globals.data)
    tls = threading.local()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*You are trying to debug `torch\.compile`")
            with depyf.prepare_debug(dump_dir, **prepare_debug_kwargs):
                replacement = PyCodeCache.__dict__["load_by_key_path"]
                original = saved_load.__get__(None, PyCodeCache)
                if replacement is not saved_load and _missing_kwargs(original, replacement):
                    def forward_to_original(key, path, linemap=None, attrs=None):
                        return original(key, path, linemap, attrs, **(getattr(tls, "extra", None) or {}))

                    depyf_globals.data["unpatched_load_by_key_path"] = forward_to_original  # read per call

                    @functools.wraps(replacement)
                    def load_by_key_path(key, path, linemap=None, attrs=None, **extra):
                        previous = getattr(tls, "extra", None)
                        tls.extra = extra
                        try:
                            return replacement(key, path, linemap, attrs)
                        finally:
                            tls.extra = previous

                    PyCodeCache.load_by_key_path = staticmethod(load_by_key_path)
                yield True
    finally:
        PyCodeCache.load_by_key_path = saved_load
        fx_graph_module._exec_with_source = saved_exec
        lazy_format.__code__ = saved_lazy_code
        depyf_globals.data.clear()
        depyf_globals.data.update(saved_data)


def _depyf_version() -> Optional[str]:
    try:
        import importlib.metadata

        return importlib.metadata.version("depyf")
    except Exception:  # noqa: BLE001  (not installed, or no metadata)
        return None


# ============================================================================ dump_compile (the API)

@dataclasses.dataclass
class DumpResult(LayerViews):
    out_dir: str
    output: Any                            # what the compiled model returned
    reports: list[GraphReport]             # every graph the pass ran on, in dump order
    graphs: list[DumpedGraph]
    depyf_available: bool
    depyf_dir: Optional[str]               # DIR/depyf when depyf ran
    depyf_files: list[str]
    report_txt: str
    report_json: str

    @property
    def layers(self) -> list[LayerMatch]:
        return [layer for report in self.reports for layer in report.layers]



def clean_dump_dir(out_dir: str) -> None:
    """Remove what an earlier dump wrote into ``out_dir`` (only our own file names and depyf/)."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if OUR_FILES.match(name):
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(os.path.join(out_dir, DEPYF_SUBDIR), ignore_errors=True)


def dump_compile(model: Any, example_inputs: Any, out_dir: str, config: Optional[QkvzFusionConfig] = None, *,
                 dynamic: Optional[bool] = None, inductor_options: Optional[dict] = None, use_depyf: bool = True,
                 clean: bool = True, what: Optional[str] = None, backward: bool = False,
                 autocast: Optional[Any] = None) -> DumpResult:
    """Compile ``model`` with the fx_passes backend, run it once, and write one dump folder.

    ``example_inputs``: a dict (keyword arguments), a tuple / list (positional arguments) or one
    argument. Runs in the caller's grad mode. ``backward``: also run the backward of the output's sum (its
    first tensor, or ``.logits``), so a training compile's backward graph is compiled and dumped too.
    ``autocast``: a dtype to run the forward under ``torch.autocast`` in (a mixed-precision step). ``config``:
    the pass configuration (its ``dump_dir`` is replaced by ``out_dir``). Resets Dynamo before and after (a
    function compiled earlier would otherwise not recompile, so the pass would not run) and disables Inductor's
    caches for the compile.
    ``clean`` removes an earlier dump's files from ``out_dir`` first.
    """
    import torch

    from fx_passes.backend import FxPassesBackend

    out_dir = os.path.abspath(out_dir)
    if clean:
        clean_dump_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = dataclasses.replace(config or QkvzFusionConfig(), dump_dir=out_dir)
    backend = FxPassesBackend(config=config, inductor_options=inductor_options)
    depyf_dir = os.path.join(out_dir, DEPYF_SUBDIR)
    info: dict = {"tool": "fx_passes dump", "what": what or type(model).__name__, "torch": torch.__version__,
                  "started": datetime.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
                  "depyf": {"ran": False, "available": None}}
    write_atomic(os.path.join(out_dir, DUMP_INFO), json.dumps(info, indent=1))

    args, kwargs = _split_inputs(example_inputs)
    output, depyf_on = None, False
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            depyf_context = depyf_dump(depyf_dir, required=False) if use_depyf else contextlib.nullcontext(False)
            with depyf_context as depyf_on:
                compiled = torch.compile(model, backend=backend, dynamic=dynamic)
                device = next((a.device.type for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), "cpu")
                with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
                    output = compiled(*args, **kwargs)
                if backward:
                    _first_tensor(output).float().sum().backward()
                # `compiled` stays alive until depyf has read the cache entries on exit
    except Exception as error:  # noqa: BLE001  (record, then re-raise)
        info["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        torch._dynamo.reset()
        depyf_files = sorted(glob.glob(os.path.join(depyf_dir, "*"))) if depyf_on else []
        if depyf_on:
            info["depyf"] = {"ran": True, "available": True, "version": _depyf_version(), "dir": DEPYF_SUBDIR,
                             "files": len(depyf_files)}
        elif use_depyf:
            info["depyf"] = {"ran": False, "available": False, "error": "depyf is not installed"}
        else:
            info["depyf"] = {"ran": False, "available": None, "note": "not requested (use_depyf=False)"}
        info["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_atomic(os.path.join(out_dir, DUMP_INFO), json.dumps(info, indent=1))
        summary = write_summary(out_dir)

    entries = summary["graphs"]
    graphs = [DumpedGraph(e["dump_index"], os.path.join(out_dir, e["before_file"]), os.path.join(out_dir, e["after_file"]),
                          os.path.join(out_dir, f"graph_{e['dump_index']:03d}.json")) for e in entries]
    return DumpResult(out_dir=out_dir, output=output, reports=[report_from_dict(e["report"]) for e in entries],
                      graphs=graphs, depyf_available=bool(depyf_on), depyf_dir=depyf_dir if depyf_on else None,
                      depyf_files=depyf_files, report_txt=os.path.join(out_dir, REPORT_TXT),
                      report_json=os.path.join(out_dir, REPORT_JSON))


def _first_tensor(output: Any):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"dump_compile(backward=True): no tensor to take the backward of in a {type(output).__name__}")


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# ============================================================================ python -m fx_passes dump

def add_arguments(parser) -> None:
    from fx_passes import demo

    demo.add_arguments(parser)
    parser.add_argument("--out", default="fx_passes_dump", help="the dump folder (default ./fx_passes_dump; "
                                                                "an earlier dump's files in it are replaced)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout; > 0 compiles in train mode, so every layer is skipped (a report demo)")
    parser.add_argument("--train", action="store_true",
                        help="a training step (train mode, grad enabled, forward + backward) with the training "
                             "rewrite on: its Dynamo graphs before / after, then Inductor's forward and backward")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                        help="the forward under torch.autocast in this dtype (a mixed-precision step)")
    parser.add_argument("--no-depyf", action="store_true", help="only our before/after graphs and the report")


def run(args) -> int:
    import torch

    from fx_passes.models import TinyQwen35Spec, add_lora, build_tiny_qwen35, example_inputs
    from fx_passes.packing import pack_qkvz_weights

    spec = TinyQwen35Spec(num_layers=args.layers, moe=args.moe)
    model = add_lora(build_tiny_qwen35(spec, dtype=getattr(torch, args.dtype), device=args.device),
                     r=args.rank, dropout=args.dropout)
    packed = 0 if args.no_pack or args.train else pack_qkvz_weights(model)
    if args.dropout > 0 or args.train:
        model.train()
    what = (f"tiny Qwen3.5{'-MoE' if args.moe else ''} ({spec.num_gdn_layers} GDN layer(s)), PEFT LoRA r={args.rank}"
            f"{f' dropout={args.dropout} (train mode)' if args.dropout > 0 else ''}"
            f"{', a training step (forward + backward, training rewrite on)' if args.train else ''}, {args.dtype} on "
            f"{args.device}{f' under autocast {args.autocast}' if args.autocast else ''}, "
            f"weights of {packed} layer(s) packed{', dynamic' if args.dynamic else ''}")
    ids = example_inputs(spec, device=args.device)
    config = QkvzFusionConfig(fuse_training=True) if args.train else None
    with torch.set_grad_enabled(args.train):
        result = dump_compile(model, {"input_ids": ids}, args.out, config, dynamic=args.dynamic or None,
                              use_depyf=not args.no_depyf, what=what, backward=args.train,
                              autocast=getattr(torch, args.autocast) if args.autocast else None)
    depyf_note = (f"depyf: {len(result.depyf_files)} files in {result.depyf_dir}" if result.depyf_available
                  else "depyf: not run" + (" (not installed)" if not args.no_depyf else ""))
    print(f"wrote {result.out_dir}: {len(result.graphs)} graph(s), {len(result.layers)} GDN layer candidate(s), "
          f"{len(result.rewritten)} rewritten, {len(result.skipped)} skipped; {depyf_note}")
    print(f"read {result.report_txt} first")
    return 0


__all__ = ["DumpResult", "DumpedGraph", "clean_dump_dir", "depyf_dump", "dump_compile", "load_graph_entries",
           "report_from_dict", "write_pass_dump", "write_summary"]
