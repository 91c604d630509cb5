"""The prefill GEMM experiment (``benchmarks/sweep_prefill_gemm.py``: persistent TMA GEMM with the LoRA in its
epilogue, not yet dispatched by the op) computes the right thing: tiny shapes under the Triton interpreter,
partial tiles in T, both A groups, with and without LoRA, against fp32."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "sweep_prefill_gemm.py")


def test_prefill_gemm_experiment_matches_fp32():
    spec = importlib.util.spec_from_file_location("sweep_prefill_gemm", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = dict(module.cpu_check())
    assert len(results) == 2 * len(module.CPU_CONFIGS)
    for name, err in results.items():
        assert err < 1e-5, f"{name}: relative error {err:.1e}"
