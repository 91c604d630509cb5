"""The package's layers: ops at the bottom, the matching engine and passes above them, integrations
(backend, vLLM pass) above those, tools (dump, demo, CLI) on top. Nothing imports upward, and no two
modules import each other (directly or round a longer cycle), counting imports inside functions too."""
from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fx_passes")

# lower number = lower layer; a module may import its own layer and those below
LAYERS = {
    # inside ops: argument rules, tuning, memos and the plain GEMM op; the kernels; the dispatch; the LoRA ops
    "fx_passes.ops.library": 0, "fx_passes.ops.lora_args": 0, "fx_passes.ops.tuning": 0, "fx_passes.ops.memo": 0,
    "fx_passes.ops.qkvz_gemm": 0, "fx_passes.ops.kernels": 0.1, "fx_passes.ops.dispatch": 0.2,
    "fx_passes.ops.qkvz_lora": 0.3, "fx_passes.ops.qkvz_gemm_lora": 0.3, "fx_passes.ops": 0.4,
    "fx_passes.config": 1, "fx_passes.report": 1, "fx_passes.packing": 1,
    "fx_passes.dump_files": 1, "fx_passes.fusion": 2, "fx_passes.backend": 3, "fx_passes.vllm_pass": 3,
    "fx_passes.models": 4, "fx_passes.demo": 4, "fx_passes.dump": 4, "fx_passes.__main__": 4,
}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = "fx_passes." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            edges[name] |= {t for t in targets if t in modules and t != name and t != "fx_passes"}
    return edges


def _layer(module: str) -> float:
    for prefix, layer in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer in LAYERS")


def test_no_import_cycles():
    edges = _imports(_modules())
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in edges[module]:
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def test_nothing_imports_upward():
    edges = _imports(_modules())
    upward = [(a, b) for a, targets in edges.items() for b in targets
              if a != "fx_passes" and _layer(b) > _layer(a)]
    assert not upward, upward
