"""The training-step benchmark runs end to end on the CPU (its timings are the GPU's; here: no time, the same
compiles, rewrite check and errors), so that a change to the package or to the benchmark that breaks the
benchmark shows in CI rather than on the GPU machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_block_runs_on_cpu_and_rewrites_every_layer(tmp_path):
    out = tmp_path / "block.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)   # the CPU op, as a CPU user runs it
    cmd = [sys.executable, "-m", "benchmarks.bench_train_block", "--device", "cpu", "--shapes", "35B-A3B",
           "--T", "32", "--rank", "8", "--layers", "2", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    cells = row["cells"]
    assert set(cells) == {"frozen", "inductor", "fx_passes"}, cells
    fx = cells["fx_passes"]
    assert fx["rewritten"] == 2, fx   # (the benchmark raises before writing a row otherwise)
    for variant in ("inductor", "fx_passes"):   # bf16 outputs and dx against the fp32 step; fp32 adapters' grads
        cell = cells[variant]
        assert cell["out_err_vs_fp32"] < 4e-3 and cell["dx_err_vs_fp32"] < 4e-3, (variant, cell)
        assert cell["grad_err_vs_fp32"] < 1e-5 and cell["warm_grad_err_vs_fp32"] < 1e-5, (variant, cell)


def test_bench_train_block_under_autocast_rewrites_and_trains_as_inductor_does(tmp_path):
    """``--autocast``: the LoRA's products in bf16 in both compiled variants; the rewritten layer's errors
    against the fp32 step no larger than BF16_FACTOR x Inductor's (the unfused graph under autocast)."""
    out = tmp_path / "block.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.bench_train_block", "--device", "cpu", "--shapes", "35B-A3B",
           "--T", "32", "--rank", "8", "--autocast", "--variants", "inductor,fx_passes", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    fx, inductor = row["cells"]["fx_passes"], row["cells"]["inductor"]
    assert row["autocast"] and fx["rewritten"] == 1, row
    assert inductor["grad_err_vs_fp32"] > 1e-4, inductor   # bf16 products: not the fp32 adapters' 1e-5
    for key in ("grad_err_vs_fp32", "warm_grad_err_vs_fp32", "out_err_vs_fp32", "dx_err_vs_fp32"):
        assert fx[key] <= 1.5 * inductor[key] + 1e-4, (key, fx[key], inductor[key])
