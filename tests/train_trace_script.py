"""Traces the training forward op as AOTAutograd does (python functionalization, fake tensors) on fake CUDA
tensors and prints, per case, what the traced graph calls: run by ``test_train_trace.py`` in a fresh
interpreter without ``TRITON_INTERPRET`` (interpreted kernels cannot be traced; the CPU machine has no GPU, so
the device properties are those of an assumed H200). The backward op's body slices its fake CUDA tensors,
which a CPU build of torch refuses: it is traced on the GPU (``benchmarks/gpu_train_check.py --compiled``)."""
import importlib
import json
import logging
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch._subclasses.functional_tensor import dispatch_functionalize  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops import tuning  # noqa: E402

# the kernels' mutation analysis needs a GPU target: without one it assumes every argument written (warns)
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
tuning.device_info = lambda device: tuning.DeviceInfo("NVIDIA H200 (assumed)", 132, 232448, (9, 0))
train = importlib.import_module("fx_passes.ops.qkvz_lora_train")
WIDTHS, H, T = (200, 72, 4, 4), 96, 64


def called(graph) -> dict:
    """The graph's calls: ``ops`` (aten / fx_passes op names, counted) and ``kernels`` (Triton kernels)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    ops: dict = {}
    kernels = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernels.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
        elif hasattr(node.target, "name"):
            name = node.target.name()
            ops[name] = ops.get(name, 0) + 1
    return {"ops": ops, "kernels": kernels}


def tensors(device: str, T: int = T, widths=WIDTHS):
    with FakeTensorMode():
        x = torch.empty(T, H, device=device, dtype=torch.bfloat16)
        weights = [torch.empty(n, H, device=device, dtype=torch.bfloat16) for n in widths]
        lora_a = [torch.empty(8, H, device=device) for _ in range(2)]
        lora_b = [torch.empty(WIDTHS[0], 8, device=device), torch.empty(WIDTHS[1], 8, device=device)]
    return x, weights, lora_a, lora_b


def trace_forward(device="cuda", T: int = T, widths=WIDTHS):
    x, weights, lora_a, lora_b = tensors(device, T, widths)

    def f(x, *params):
        w, a, b = params[:4], params[4:6], params[6:]
        return torch.ops.fx_passes.qkvz_lora_train(x, [x, x], list(w), list(a), list(b), [0, 1], [0, 200], [2.0, 0.5])
    return called(make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, *weights, *lora_a, *lora_b))


def trace_for_export():
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition

    with _disable_custom_triton_op_functional_decomposition():
        return trace_forward()


if __name__ == "__main__":
    print(json.dumps({
        "forward": trace_forward(),
        # from train_fused_min_t, with TMA rows in every projection: the GEMMs + expand as one op
        "forward_large": trace_forward(T=tuning.tuning_for(tuning.device_info(None)).train_fused_min_t,
                                       widths=(200, 72, 8, 8)),
        "forward_cpu": trace_forward("cpu"),
        "forward_export": trace_for_export(),
    }))
