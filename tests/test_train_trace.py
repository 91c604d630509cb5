"""The training ops' CUDA bodies traced into the graph (what Inductor compiles; no GPU here: fake CUDA
tensors, in a fresh interpreter without the Triton interpreter, see ``train_trace_script.py``): the forward
op's traced graph holds the four base GEMMs (fp32 products where LoRA is added) and our two kernels (the
shrink over x, the expand-add) and no op call, or from ``train_fused_min_t`` the shrink kernel and the base
GEMMs with the LoRA in their epilogue or as their first K steps (one kernel: it makes its TMA descriptors on
the device; the K steps' operands made by Inductor's own ops); the backward's dx GEMM with the host TMA descriptors
it takes recorded for Inductor's code to make, dx the one tensor its mutation analysis finds written (dx and dA
where the GEMM computes dA on its lighter programs); the
dS + dB kernel with the launch summing its partial sums (and the shrink's, over a wide x); every
kernel writes in place once Inductor's reinplacing ran (no copy left); off CUDA and under ``torch.export`` the
op stays whole. The numerics of the traced graphs run on the
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
    # qkv's and z's GEMMs with an fp32 output (the LoRA added into it, rounded once), b's and a's in bf16
    assert traced["ops"]["aten::mm.dtype"] == 2 and traced["ops"]["aten::mm"] == 2, traced
    assert not any(op.startswith("fx_passes::") for op in traced["ops"]), traced
    large = got["forward_large"]   # the GEMMs with the LoRA in their epilogue: one kernel, no library GEMM
    assert large["kernels"] == ["_ds_kernel", "_gemm_expand_kernel"], large
    assert "aten::mm" not in large["ops"] and not any(op.startswith("fx_passes::") for op in large["ops"]), large
    # the LoRA as qkv's and z's first K steps: the same two kernels, the K steps' operands (s's and B's two-part
    # splits) as Inductor's own ops, split by integer ops on the fp32 bits (a 16-bit round trip Inductor elides)
    kstep = got["forward_kstep"]
    assert kstep["kernels"] == ["_ds_kernel", "_gemm_expand_kernel"] and "aten::mm" not in kstep["ops"], kstep
    assert kstep["ops"].get("aten::view.dtype", 0) >= 4 and kstep["ops"].get("aten::bitwise_and.Scalar"), kstep
    assert traced["cloned"] == large["cloned"] == kstep["cloned"] == [], (traced, large)   # every kernel in place
    # the dx GEMM takes host TMA descriptors of dy and W (the graph records each one's tensor and block shape);
    # the kernels' mutation analysis finds dx written (its descriptors made on the device) and no other argument,
    # and Inductor's reinplacing leaves no copy: the graph returns the kernel's dx
    block_m, block_n, block_k = 128, 256, 64
    dx = got["dx"]
    assert dx["kernels"] == ["_gemm_dx_kernel"] and dx["tail"] == 0, dx
    want = {**{f"d{p}": [block_m, block_k] for p in range(4)}, **{f"w{p}": [block_k, block_n] for p in range(4)}}
    for case in (dx, got["dx_tail"]):
        assert case["written"] == ["o_ptr"] and case["returns"] == ["o_ptr"] and case["cloned"] == [], case
    # with dA on its lighter programs: dx and dA written, both returned as the kernel wrote them
    dx_da = got["dx_da"]
    assert dx_da["da"] and dx_da["kernels"] == ["_gemm_dx_kernel"], dx_da
    assert dx_da["written"] == ["o_ptr", "da_ptr"] and dx_da["returns"] == ["o_ptr", "da_ptr"], dx_da
    assert dx_da["cloned"] == [], dx_da
    assert dx["descriptors"] == want, dx
    tail = got["dx_tail"]   # and the half tiles' own dy descriptors
    assert tail["tail"] > 0, tail
    assert tail["descriptors"] == {**want, **{f"h{p}": [block_m // 2, block_k] for p in range(4)}}, tail
    # the shrink over x in column chunks (H 600): their partial sums finished by our sum kernel, in place
    wide = got["forward_wide"]
    assert wide["kernels"] == ["_ds_kernel", "_part_sums_kernel", "_expand_add_kernel"] and wide["cloned"] == [], wide
    # dS + dB, then one launch summing both kernels' partial sums: the graph returns what it wrote, no copy
    dsdb = got["dsdb"]
    assert dsdb["kernels"] == ["_dsdb_kernel", "_part_sums_kernel"] and dsdb["cloned"] == [], dsdb
    assert dsdb["returns"] == ["_part_sums_kernel.out0", "_part_sums_kernel.out1"], dsdb
    for kept in ("forward_cpu", "forward_export"):
        assert got[kept] == {"ops": {"fx_passes::qkvz_lora_train": 1}, "kernels": [], "cloned": []}, (kept, got[kept])
