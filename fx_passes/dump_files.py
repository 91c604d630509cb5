"""The dump folder's files: what the pass writes per graph, and the report built from them.

The pass calls :func:`write_pass_dump` after each graph (``QkvzFusionConfig.dump_dir``, or the
``FX_PASSES_DUMP_DIR`` switch); :func:`write_summary` rebuilds ``report.txt`` / ``report.json``.
The tools on top (depyf, ``dump_compile``, the CLI) live in :mod:`fx_passes.dump`, whose docstring
describes the folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import threading
from typing import Iterator, Optional

from fx_passes.config import DUMP_ENV
from fx_passes.report import GraphReport, LayerMatch

logger = logging.getLogger("fx_passes")

REPORT_TXT = "report.txt"
REPORT_JSON = "report.json"
DUMP_INFO = "dump_info.json"
DEPYF_SUBDIR = "depyf"
_LOCK_FILE = ".fx_passes_dump.lock"
_GRAPH_RE = re.compile(r"^graph_(\d+)\.json$")
OUR_FILES = re.compile(r"^(graph_\d+(_before\.py|_after\.py|\.json)|report\.txt|report\.json|dump_info\.json)$")
_write_lock = threading.Lock()   # one writer per process; the file lock covers other processes


# ============================================================================ per-graph files (the pass)

@dataclasses.dataclass
class DumpedGraph:
    index: int
    before: str          # paths
    after: str
    json: str


def write_pass_dump(dump_dir: str, report: GraphReport, before_code: Optional[str],
                    after_code: Optional[str], graph_kind: str = "post-grad ATen graph") -> Optional[DumpedGraph]:
    """Called by a pass after each graph: write graph_<i>_{before,after}.py and graph_<i>.json, then
    rebuild report.txt / report.json. ``graph_kind``: which graph the pass saw (the headers say it). A
    failure to write is logged as a warning (it never breaks a compile).

    Logs one DEBUG line only: the pass itself already logs the INFO summary and the per-layer lines.
    """
    try:
        with _write_lock:
            os.makedirs(dump_dir, exist_ok=True)
            index, before_path = _reserve_index(dump_dir)
            header = (f"# fx_passes {report.pass_name}: dump graph {index:03d} (pass graph {report.graph_index}, "
                      f"pid {os.getpid()}), {graph_kind} {{}} the pass\n")
            with open(before_path, "w") as out:
                out.write(header.format("BEFORE") + _as_python(before_code))
            after_path = os.path.join(dump_dir, f"graph_{index:03d}_after.py")
            with open(after_path, "w") as out:
                out.write(header.format("AFTER") + _as_python(after_code))
            entry = _graph_entry(index, report, before_path, after_path)
            json_path = os.path.join(dump_dir, f"graph_{index:03d}.json")
            write_atomic(json_path, json.dumps(entry, indent=1))
            write_summary(dump_dir)
        logger.debug("dump: graph %03d of %s -> %s", index, report.pass_name, os.path.abspath(dump_dir))
        return DumpedGraph(index, before_path, after_path, json_path)
    except Exception as error:  # noqa: BLE001  (a dump is a side product: it never breaks a compile)
        logger.warning("fx_passes dump to %s failed: %s: %s", dump_dir, type(error).__name__, error,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return None


def _as_python(code: Optional[str]) -> str:
    """print_readable names post-grad modules ``class <lambda>(...)``: make the file parse."""
    if not code:
        return "# (not recorded)\n"
    return re.sub(r"^class <lambda>\(", "class GraphModule(", code, count=1, flags=re.M)


def _reserve_index(dump_dir: str) -> tuple[int, str]:
    """The next free index, claimed by creating graph_<i>_before.py exclusively (safe across processes)."""
    index = max((int(m.group(1)) for m in map(_GRAPH_RE.match, os.listdir(dump_dir)) if m), default=-1) + 1
    while True:
        path = os.path.join(dump_dir, f"graph_{index:03d}_before.py")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return index, path
        except FileExistsError:
            index += 1


def _graph_entry(index: int, report: GraphReport, before_path: str, after_path: str) -> dict:
    return {
        "dump_index": index,
        "pid": os.getpid(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "before_file": os.path.basename(before_path),
        "after_file": os.path.basename(after_path),
        "report": report.to_dict(),
    }


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as out:
        out.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(dump_dir: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:   # not POSIX: the thread lock only
        yield
        return
    with open(os.path.join(dump_dir, _LOCK_FILE), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ============================================================================ report.txt / report.json

def load_graph_entries(dump_dir: str) -> list[dict]:
    """Every graph_<i>.json of the folder, by index."""
    entries = []
    for name in os.listdir(dump_dir):
        if _GRAPH_RE.match(name):
            try:
                with open(os.path.join(dump_dir, name)) as handle:
                    entries.append(json.load(handle))
            except (OSError, ValueError):
                continue
    return sorted(entries, key=lambda e: e["dump_index"])


def report_from_dict(data: dict) -> GraphReport:
    fields = {f.name for f in dataclasses.fields(GraphReport)}
    layer_fields = {f.name for f in dataclasses.fields(LayerMatch)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["layers"] = [LayerMatch(**{k: v for k, v in layer.items() if k in layer_fields})
                        for layer in data.get("layers", [])]
    return GraphReport(**kwargs)


def write_summary(dump_dir: str) -> dict:
    """Rebuild report.txt and report.json from the folder's graph_<i>.json (and dump_info.json)."""
    with _file_lock(dump_dir):
        entries = load_graph_entries(dump_dir)
        info = read_json(os.path.join(dump_dir, DUMP_INFO))
        reports = [report_from_dict(e["report"]) for e in entries]
        layers = [layer for r in reports for layer in r.layers]
        totals = {"graphs": len(reports), "layers": len(layers),
                  "rewritten": sum(layer.rewritten for layer in layers),
                  "skipped": sum(not layer.rewritten for layer in layers),
                  "graphs_from_cache": sum(r.source != "pass" for r in reports),
                  "fused_layers": sum(r.fused_layers for r in reports)}
        summary = {"dump_dir": os.path.abspath(dump_dir), "totals": totals,
                   "depyf": (info or {}).get("depyf") or {"ran": False, "note": _NO_DEPYF_SWITCH},
                   "info": info, "graphs": entries}
        write_atomic(os.path.join(dump_dir, REPORT_JSON), json.dumps(summary, indent=1))
        write_atomic(os.path.join(dump_dir, REPORT_TXT), _summary_text(summary, reports))
    return summary


_NO_DEPYF_SWITCH = (f"not run: these files come from the {DUMP_ENV} / QkvzFusionConfig.dump_dir switch; "
                    "`python -m fx_passes dump` or fx_passes.dump.dump_compile(...) add depyf's decompiled code")


def _summary_text(summary: dict, reports: list[GraphReport]) -> str:
    info, totals, depyf_state = summary["info"] or {}, summary["totals"], summary["depyf"]
    lines = [f"fx_passes graph dump: {summary['dump_dir']}"]
    if info.get("what"):
        lines.append(f"compiled: {info['what']}")
    if info.get("torch"):
        lines.append(f"torch {info['torch']}")
    if depyf_state.get("ran"):
        lines.append(f"depyf {depyf_state.get('version')}: decompiled Dynamo code and graphs in "
                     f"{DEPYF_SUBDIR}/ ({depyf_state.get('files', '?')} files; full_code_for_*.py first)")
    elif depyf_state.get("available") is False:
        lines.append(f"depyf unavailable ({depyf_state.get('error')}): no decompiled Dynamo code; "
                     "the before/after graphs and this report are complete")
    else:
        lines.append(f"depyf: {depyf_state.get('note', 'not run')}")
    if info.get("error"):
        lines.append(f"compile FAILED: {info['error']}")
    lines.append(f"totals: {totals['graphs']} graph(s) seen by the pass; {totals['layers']} GDN layer "
                 f"candidate(s): {totals['rewritten']} rewritten, {totals['skipped']} skipped")
    if totals["graphs_from_cache"]:
        lines.append(f"        {totals['graphs_from_cache']} graph(s) compiled without the pass (cache); GDN layers "
                     f"running fused in all graphs: {totals['fused_layers']}")
    if not reports:
        lines.append("(the pass ran on no graph: nothing compiled through Inductor, or an FX-graph-cache hit)")
    for entry, report in zip(summary["graphs"], reports):
        lines += ["", f"== graph {entry['dump_index']:03d}: {entry['before_file']} -> {entry['after_file']} "
                      f"(pid {entry['pid']}, pass graph {report.graph_index}) =="]
        lines.append(report.to_text())
        for layer in report.layers:
            if layer.rewritten:
                lines.append(f"    {layer.layer}: removed {len(layer.removed_nodes)} node(s) "
                             f"{layer.removed_nodes}, new {layer.new_nodes}")
        lines.append(f"  nodes (call_function): {sum(report.ops_before.values())} before, "
                     f"{sum(report.ops_after.values())} after; full op counts in report.json")
    return "\n".join(lines) + "\n"


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


__all__ = ["DEPYF_SUBDIR", "DUMP_INFO", "DumpedGraph", "OUR_FILES", "REPORT_JSON", "REPORT_TXT", "load_graph_entries",
           "read_json", "report_from_dict", "write_atomic", "write_pass_dump", "write_summary"]
