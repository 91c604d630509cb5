"""The training ops' CUDA bodies traced into the graph (what Inductor compiles; no GPU here: fake CUDA
tensors, in a fresh interpreter without the Triton interpreter, see ``train_trace_script.py``): the forward
op's traced graph holds the four base GEMMs and our two kernels (the shrink over x, the expand-add) and no
op call, or from ``train_fused_min_t`` the shrink kernel and the base GEMMs with the expand in their epilogue
(one kernel: it makes its TMA descriptors on the device); off CUDA and under ``torch.export`` the op stays whole.
The numerics of the traced graphs run on the
GPU: ``python -m benchmarks.gpu_train_check --compiled``."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("train_trace_script.py")


def test_training_forward_traces_into_gemms_and_kernels_on_cuda_only():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    traced = got["forward"]
    assert traced["kernels"] == ["_ds_kernel", "_expand_add_kernel"], traced
    assert traced["ops"]["aten::mm"] == 4 and not any(op.startswith("fx_passes::") for op in traced["ops"]), traced
    large = got["forward_large"]   # the GEMMs with the expand in their epilogue: one kernel, no library GEMM
    assert large["kernels"] == ["_ds_kernel", "_gemm_expand_kernel"], large
    assert "aten::mm" not in large["ops"] and not any(op.startswith("fx_passes::") for op in large["ops"]), large
    for kept in ("forward_cpu", "forward_export"):
        assert got[kept] == {"ops": {"fx_passes::qkvz_lora_train": 1}, "kernels": []}, (kept, got[kept])
