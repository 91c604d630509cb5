"""The front door, as a user meets it: a fresh interpreter per run, ``torch.compile(model,
backend="fx_passes", mode=..., options=..., dynamic=..., fullgraph=...)`` without importing the package
first, the same script run twice on one machine (cold, then warm Inductor caches), and the demo twice.

Every run asserts the rewrite (from the pass's reports on a cold cache; from the fused ops in the
cached code on a warm one) and the logits against eager.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GDN_LAYERS = 2
TOL = 1e-4   # fp32 logits (|logits| ~ 1)

CASES = [
    dict(name="default"),
    # one mode for all: a mode only picks Inductor options from torch's table (each mode's: tests/test_backend.py);
    # max-autotune's options do the most on the CPU (C++ GEMM templates)
    dict(name="max-autotune", kwargs=dict(mode="max-autotune")),
    # options merged with ours, and the user's own post-grad pass run after ours (alone,
    # {"triton.cudagraphs": True} is reduce-overhead's config: a cache hit)
    dict(name="options-user-post-pass", kwargs=dict(options={"triton.cudagraphs": True, "epilogue_fusion": False}),
         user_pass=True),
    dict(name="dynamic-fullgraph", kwargs=dict(dynamic=True, fullgraph=True)),
]


def _env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "FX_PASSES_"))}
    env.update(TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)   # the CPU path of our ops is plain torch; Inductor's own code is C++
    return env


def _run(args: list[str], cache_dir: str, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _user_script(cases: list[dict], cache_dir: str, *extra: str) -> dict:
    done = _run([os.path.join(HERE, "user_compile_script.py"), json.dumps(cases), *extra], cache_dir)
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def _check_case(case: dict, warm: bool) -> None:
    name, reports = case["name"], case["reports"]
    assert case["max_diff"] < TOL, (name, case["max_diff"])
    assert reports, f"{name}: no report at all"
    assert sum(r["fused_layers"] for r in reports) == GDN_LAYERS, (name, [r["summary"] for r in reports])
    if warm:
        # the cache served the code: said so, with what the code runs
        assert all(r["source"] == "fx_graph_cache" for r in reports), (name, [r["summary"] for r in reports])
        assert sum(r["code_op_calls"].get("qkvz_gemm_lora", 0) + r["code_op_calls"].get("qkvz_gemm", 0)
                   for r in reports) == GDN_LAYERS
        assert all("served from Inductor's FX graph cache" in r["summary"] for r in reports)
        return
    assert all(r["source"] == "pass" for r in reports), (name, [r["summary"] for r in reports])
    layers = [layer for r in reports for layer in r["layers"]]
    assert len(layers) == GDN_LAYERS and all(layer["rewritten"] for layer in layers), [r["summary"] for r in reports]
    mm_removed = sum(r["ops_before"].get("aten.mm.default", 0) - r["ops_after"].get("aten.mm.default", 0)
                     for r in reports)
    assert mm_removed == 8 * GDN_LAYERS, (name, mm_removed)   # per layer: 4 base (qkv, z, b, a) + 2 shrink + 2 expand mms
    assert all(layer["weights_packed"] for layer in layers), [layer["packing"] for layer in layers]
    if case["user_pass_calls"] is not None:   # the user's post pass ran, after ours
        assert case["user_pass_calls"] and all(n >= GDN_LAYERS for n in case["user_pass_calls"]), case


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inductor_cache"))


@pytest.fixture(scope="module")
def cold(cache_dir):
    return _user_script(CASES, cache_dir)


@pytest.fixture(scope="module")
def warm(cache_dir, cold):
    return _user_script(CASES, cache_dir)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_backend_by_name_cold_cache(cold, index):
    assert not cold["imported_before_compile"]          # torch found the backend through the entry point
    _check_case(cold["cases"][index], warm=False)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_backend_by_name_warm_cache(warm, index):
    _check_case(warm["cases"][index], warm=True)


def test_backend_by_name_after_import(tmp_path):
    result = _user_script(CASES[:1], str(tmp_path), "--import-first")
    assert result["imported_before_compile"]
    _check_case(result["cases"][0], warm=False)


def test_demo_passes_twice_on_one_machine(tmp_path):
    first = _run(["-m", "fx_passes", "demo"], str(tmp_path))
    assert f"{GDN_LAYERS} GDN layer(s) found, {GDN_LAYERS} rewritten" in first.stdout, first.stdout
    second = _run(["-m", "fx_passes", "demo"], str(tmp_path))
    assert "served from Inductor's FX graph cache" in second.stdout, second.stdout
    assert f"{GDN_LAYERS} fx_passes.qkvz_gemm_lora" in second.stdout, second.stdout
    assert "ERROR" not in first.stdout + second.stdout


# ------------------------------------------------------------------------------------------------
# Fine-tuning (issue 17): a PEFT training script through the backend name, cold then warm caches
# ------------------------------------------------------------------------------------------------
# The script always passes options ({"fallback_random": True}: eager's dropout masks) and the backend merges
# them as for inference: other options and modes are the inference cases' (above).


def _train_script(kwargs: dict, cache_dir: str, *flags: str) -> dict:
    """The user's training script as the README has it: the backend's name, no setting (the training
    rewrite is on by default)."""
    env = _env(cache_dir)
    done = subprocess.run([sys.executable, os.path.join(HERE, "user_train_script.py"), json.dumps(kwargs), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_training_script_by_name_cold_then_warm_cache(tmp_path):
    """Both runs rewrite every GDN layer before AOTAutograd (the rewrite precedes Inductor's caches, so a
    warm run reports it too) and train as eager does: two AdamW steps, loss, LoRA grads and adapters 1e-5."""
    for run in ("cold", "warm"):
        result = _train_script({}, str(tmp_path))
        train = [r for r in result["reports"] if r["pass_name"] == "qkvz_lora_train_fusion"]
        layers = [layer for r in train for layer in r["layers"]]
        assert len(layers) == GDN_LAYERS and all(layer["rewritten"] for layer in layers), (run, train)
        assert result["lora_grads"] == 4 * GDN_LAYERS, run
        assert result["loss_err"] < 1e-5 and result["grad_err"] < 1e-5 and result["param_err"] < 1e-5, (run, result)


def test_mixed_precision_training_script_cold_then_warm_cache(tmp_path):
    """The same script with every forward under ``torch.autocast(bfloat16)`` (an fp32 model, as a
    mixed-precision trainer runs it): both runs rewrite every GDN layer under autocast (its dtype in the
    report), and the LoRA gradients are no farther from the fp32 steps without autocast than 1.5x eager
    autocast's."""
    for run in ("cold", "warm"):
        result = _train_script({}, str(tmp_path), "autocast")
        train = [r for r in result["reports"] if r["pass_name"] == "qkvz_lora_train_fusion"]
        layers = [layer for r in train for layer in r["layers"]]
        assert len(layers) == GDN_LAYERS and all(layer["rewritten"] for layer in layers), (run, train)
        assert all(layer["autocast"] == "torch.bfloat16" for layer in layers), (run, train)
        assert result["lora_grads"] == 4 * GDN_LAYERS, run
        assert result["eager_grad_err_fp32"] > 1e-4, (run, result)   # bf16 products, not fp32's
        assert result["grad_err_fp32"] <= 1.5 * result["eager_grad_err_fp32"] + 1e-4, (run, result)


def test_hf_trainer_bf16_with_a_model_compiled_by_name(tmp_path):
    """``transformers.Trainer(model=torch.compile(peft_model, backend="fx_passes"), args=TrainingArguments(
    bf16=True, ...))``, how PEFT users train (``user_trainer_script.py``; accelerate puts each forward under
    autocast): every GDN layer is rewritten under autocast, and after three steps the adapters (which moved)
    are no farther from the fp32 run's than 1.5x the uncompiled bf16 run's, as is each step's loss."""
    env = _env(str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, os.path.join(HERE, "user_trainer_script.py"), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULTS "))[len("RESULTS "):])
    train = [r for r in result["reports"] if r["pass_name"] == "qkvz_lora_train_fusion"]
    layers = [layer for r in train for layer in r["layers"]]
    assert len(layers) == GDN_LAYERS and all(layer["rewritten"] for layer in layers), train
    assert all(layer["autocast"] == "torch.bfloat16" for layer in layers), train
    assert result["lora_params"] == 4 * GDN_LAYERS and result["moved"] > 0.05, result
    assert result["param_err_fp32"] <= 1.5 * result["eager_param_err_fp32"] + 1e-3, result
    assert len(result["losses"]) == len(result["fp32_losses"]) == 3, result
    for got, eager, exact in zip(result["losses"], result["eager_losses"], result["fp32_losses"]):
        assert abs(got - exact) <= 1.5 * abs(eager - exact) + 1e-3 * abs(exact), result
