"""vLLM engine smoke test on CPU: a tiny local Qwen3.5 served by ``vllm.LLM`` with torch.compile ON, once with
``QkvzLoraFusionVllmPass`` as Inductor's ``post_grad_custom_post_pass`` and once without it; greedy token ids must
match, and the pass's dump folder (``FX_PASSES_DUMP_DIR``) proves the pass ran on the compiled graph.

No LoRA here: ``vllm/platforms/cpu.py`` sets ``CompilationMode.NONE`` whenever a LoRA config is present, so on
CPU the engine compiles only without LoRA. vLLM 0.32's CPU linears are ``_C.weight_packed_linear`` (AMX, small
weights) or ``_C.onednn_mm`` custom ops, not ``aten.mm``: the pass sees the GDN layer's ``in_proj_qkvz`` but
finds nothing it rewrites (0 GDN layers), so both runs run the same code.

Each engine run is a fresh interpreter (``python this_file --engine-run ARGS``), in-process engine core
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), fresh Inductor cache dir and all compile caches off (a cache hit would skip
the pass). About 45-55 s per run on 2 cores (import vllm ~10 s, Dynamo + Inductor ~30 s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install -e '.[vllm]')", allow_module_level=True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w5 w7 w9 w11 w13 w15", "w100"]
MAX_TOKENS = 8
VOCAB = 256
SKIP_RC = 77   # the engine script could not import vllm

# vllm/model_executor/models/qwen3_5.py imports qwen3_vl.py, which imports
# transformers.models.qwen2_vl.image_processing_qwen2_vl; that module imports torchvision at module level, and
# torchvision is deliberately absent (PyPI's wheel does not load beside torch +cpu). vLLM also imports the model
# file in a child interpreter (model registry inspection, `python -m vllm.model_executor.models.registry`), so the
# stand-in goes into a sitecustomize.py on PYTHONPATH, which every interpreter of the run executes at start-up.
# It is import-only and lazy: a meta-path finder that answers for that one module name (only while torchvision is
# missing) with the two names vllm's qwen3_vl.py imports, taken from transformers' PIL twin of that module --
# the same fallback transformers itself uses for `Qwen2VLImageProcessor` without torchvision. A text-only
# Qwen3_5ForCausalLM never processes images. Any other sitecustomize found later on sys.path still runs.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, importlib.util, os, sys

_NAME = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


class _TorchvisionFreeQwen2VLImageProcessing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != _NAME or importlib.util.find_spec("torchvision") is not None:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

        module.smart_resize = pil.smart_resize
        module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil


sys.meta_path.insert(0, _TorchvisionFreeQwen2VLImageProcessing())

_here = os.path.dirname(os.path.abspath(__file__))
_other = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _other is not None and _other.loader is not None:
    _other.loader.exec_module(importlib.util.module_from_spec(_other))
'''


def build_checkpoint(out_dir: str) -> None:
    """Random tiny Qwen3.5 (1 GDN layer + 1 full-attention layer, bf16) and a word-level tokenizer, no downloads.

    vLLM CPU limits: attention head_dim >= 32; the CPU GDN kernel needs GDN head dims of 128 and bf16;
    weight_packed_linear needs K % 32 == 0 (hidden 64).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(out_dir)
    config = Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=1, linear_key_head_dim=128, linear_num_value_heads=1, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(config).to(torch.bfloat16).eval().save_pretrained(out_dir)


# ============================================================================ the engine run (subprocess)

def engine_run(ckpt: str, with_pass: bool, result_path: str) -> None:
    """One ``LLM`` with compilation on, greedy generation; writes ids and compile evidence to ``result_path``."""
    started = time.time()
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        with open(result_path, "w") as out:
            json.dump({"skip": f"vllm is not importable: {type(error).__name__}: {error}"}, out)
        sys.exit(SKIP_RC)
    import torch
    from torch._dynamo.utils import counters
    from vllm import LLM, SamplingParams

    compilation_config: dict = {}
    user_pass = None
    if with_pass:
        from fx_passes.vllm_pass import QkvzLoraFusionVllmPass

        user_pass = QkvzLoraFusionVllmPass()
        compilation_config["inductor_compile_config"] = {"post_grad_custom_post_pass": user_pass}
    llm = LLM(model=ckpt, tokenizer=ckpt, dtype="bfloat16", enforce_eager=False, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=64, kv_cache_memory_bytes=64 << 20, seed=0,
              compilation_config=compilation_config)
    ready = time.time()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    done = time.time()
    cc = llm.llm_engine.vllm_config.compilation_config
    engine_pass = cc.inductor_compile_config.get("post_grad_custom_post_pass")
    result = {
        "ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
        "compilation_mode": getattr(cc.mode, "name", str(cc.mode)), "backend": cc.backend,
        "dynamo_counters": {k: dict(v) for k, v in counters.items()},
        "pass_in_config": type(engine_pass).__name__ if engine_pass is not None else None,
        # EngineArgs.create_engine_config deep-copies compilation_config: the object handed in never runs
        "pass_is_user_object": engine_pass is user_pass if with_pass else None,
        "user_pass_reports": len(user_pass.reports) if with_pass else None,
        "vllm": vllm.__version__, "torch": torch.__version__,
        "init_s": round(ready - started, 1), "generate_s": round(done - ready, 2),
    }
    with open(result_path, "w") as out:
        json.dump(result, out, indent=1)


# ============================================================================ the test

def _run_engine(tmp_path, ckpt: str, name: str, with_pass: bool) -> dict:
    work = tmp_path / name
    work.mkdir()
    env = dict(os.environ)
    for key in ("TRITON_INTERPRET",      # set by conftest for the Triton-interpreter tests; not a real run's setting
                "VLLM_CPU_CI_ENV",       # would switch vLLM's CPU compile backend to "eager"
                "FX_PASSES_DUMP_DIR"):
        env.pop(key, None)
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"), REPO_ROOT, env.get("PYTHONPATH")])),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",     # engine core in this process: one interpreter, one log
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache"),   # shared: only the model-info cache lands here
        "VLLM_DISABLE_COMPILE_CACHE": "1",         # vLLM's AOT compile cache: a hit would skip Inductor
        "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_cache"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",  # FX-graph / AOTAutograd caches: a hit skips the pass
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    })
    if with_pass:
        env["FX_PASSES_DUMP_DIR"] = str(work / "dump")
    result_path, log_path = work / "result.json", work / "engine.log"
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--engine-run", ckpt,
                               "pass" if with_pass else "nopass", str(result_path)],
                              cwd=str(work), env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    wall = time.time() - started
    log_text = log_path.read_text()
    if proc.returncode == SKIP_RC:
        pytest.skip(json.loads(result_path.read_text())["skip"])
    assert proc.returncode == 0 and result_path.exists(), (
        f"engine run '{name}' failed (rc {proc.returncode}); log tail:\n{log_text[-6000:]}")
    result = json.loads(result_path.read_text())
    result.update(wall_s=round(wall, 1), log=log_text, dump_dir=str(work / "dump"))
    return result


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vllm_engine")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    ckpt = str(tmp_path / "tiny_qwen35")
    build_checkpoint(ckpt)
    runs = {"nopass": _run_engine(tmp_path, ckpt, "nopass", with_pass=False),
            "pass": _run_engine(tmp_path, ckpt, "pass", with_pass=True)}
    for name, run in runs.items():
        print(f"\n[vllm engine {name}] wall {run['wall_s']} s (LLM() {run['init_s']} s, generate "
              f"{run['generate_s']} s); mode {run['compilation_mode']}, backend {run['backend']}; "
              f"dynamo {run['dynamo_counters'].get('stats')}; ids {run['ids']}")
    return runs


def _assert_compiled(run: dict) -> None:
    """Dynamo captured the model and AOTAutograd + Inductor compiled it (stock Inductor on CPU)."""
    assert run["compilation_mode"].endswith("DYNAMO_TRACE_ONCE"), run["compilation_mode"]
    assert run["backend"] == "inductor"
    counters = run["dynamo_counters"]
    assert counters.get("stats", {}).get("unique_graphs", 0) >= 1, counters
    assert counters.get("aot_autograd", {}).get("ok", 0) >= 1, counters
    assert counters.get("inductor"), counters          # Inductor's post-grad passes / codegen ran


def test_engine_same_tokens_with_and_without_pass(engine_runs):
    nopass, withpass = engine_runs["nopass"], engine_runs["pass"]
    _assert_compiled(nopass)
    _assert_compiled(withpass)
    assert withpass["pass_in_config"] == "QkvzLoraFusionVllmPass"
    assert nopass["pass_in_config"] is None
    assert len(withpass["ids"]) == len(PROMPTS) and all(len(ids) == MAX_TOKENS for ids in withpass["ids"])
    assert all(0 <= i < VOCAB for ids in withpass["ids"] for i in ids)
    assert withpass["prompt_ids"] == nopass["prompt_ids"]
    assert withpass["ids"] == nopass["ids"]


def test_engine_pass_ran_on_compiled_graph(engine_runs):
    run = engine_runs["pass"]
    dump = run["dump_dir"]
    with open(os.path.join(dump, "report.json")) as handle:
        report = json.load(handle)
    totals = report["totals"]
    print(f"\n[vllm engine pass] report.json totals {totals}; pass object handed in is the one that ran: "
          f"{run['pass_is_user_object']} (its reports: {run['user_pass_reports']})")
    assert totals["graphs"] >= 1, report
    gemm_ops = ("weight_packed_linear", "onednn_mm", "aten.mm.", "aten.addmm.", "fx_passes")
    saw_gdn = False
    for entry in report["graphs"]:
        graph = entry["report"]
        print(f"  {graph['summary']}")
        for layer in graph["layers"]:
            print(f"    {'REWRITTEN' if layer['rewritten'] else 'SKIPPED'} {layer['layer']}: {layer.get('reason')}")
        print("    GEMM-like ops before -> after: " + ", ".join(
            f"{op} {n} -> {graph['ops_after'].get(op, 0)}" for op, n in sorted(graph["ops_before"].items())
            if any(g in op for g in gemm_ops)))
        before = open(os.path.join(dump, entry["before_file"])).read()
        assert os.path.exists(os.path.join(dump, entry["after_file"]))
        if "cpu_gdn_attention_core" in before or "qwen_gdn_linear_attn.py" in before:
            saw_gdn = True
        if not any(layer["rewritten"] for layer in graph["layers"]):
            assert graph["ops_after"] == graph["ops_before"], "the pass changed a graph it reports as unchanged"
    # the graph the pass saw is the whole model (DYNAMO_TRACE_ONCE: no piecewise split), GDN layer included
    assert saw_gdn, "no graph handed to the pass contains the GDN layer"


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--engine-run":
    engine_run(sys.argv[2], sys.argv[3] == "pass", sys.argv[4])
