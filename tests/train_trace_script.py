"""Traces the training forward op as AOTAutograd does (python functionalization, fake tensors) on fake CUDA
tensors and prints, per case, what the traced graph calls: run by ``test_train_trace.py`` in a fresh
interpreter without ``TRITON_INTERPRET`` (interpreted kernels cannot be traced; the CPU machine has no GPU, so
the device properties are those of an assumed H200). The backward op's body slices its fake CUDA tensors,
which a CPU build of torch refuses: it is traced on the GPU (``benchmarks/gpu_train_check.py --compiled``)."""
import contextlib
import importlib
import json
import logging
import operator
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._inductor.fx_passes import reinplace  # noqa: E402
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


def kernel_nodes(graph) -> list:
    """The graph's Triton kernel calls (``triton_kernel_wrapper_*`` nodes)."""
    return [node for node in graph.graph.nodes if "triton_kernel_wrapper" in str(node.target)]


def called(graph) -> dict:
    """The graph's calls: ``ops`` (aten / fx_passes op names, counted) and ``kernels`` (Triton kernels); then
    Inductor's reinplacing (post-grad, run on the graph) and ``cloned``, the kernels' written arguments it must
    still copy (each a buffer and a copy the compiled code would add; two written arguments of one tensor keep
    one, and the graph returns one of the two copies)."""
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
    with assumed_sm90_target():
        reinplace.reinplace_inplaceable_ops_core(graph.graph)
    cloned = [name for node in kernel_nodes(graph) for name in node.kwargs["tensors_to_clone"]]
    return {"ops": ops, "kernels": kernels, "cloned": cloned}


def tensors(device: str, T: int = T, widths=WIDTHS, h: int = H):
    with FakeTensorMode():
        x = torch.empty(T, h, device=device, dtype=torch.bfloat16)
        weights = [torch.empty(n, h, device=device, dtype=torch.bfloat16) for n in widths]
        lora_a = [torch.empty(8, h, device=device) for _ in range(2)]
        lora_b = [torch.empty(WIDTHS[0], 8, device=device), torch.empty(WIDTHS[1], 8, device=device)]
    return x, weights, lora_a, lora_b


def trace_forward(device="cuda", T: int = T, widths=WIDTHS, h: int = H):
    x, weights, lora_a, lora_b = tensors(device, T, widths, h)

    def f(x, *params):
        w, a, b = params[:4], params[4:6], params[6:]
        return torch.ops.fx_passes.qkvz_lora_train(x, [x, x], list(w), list(a), list(b), [0, 1], [0, 200], [2.0, 0.5])
    with assumed_sm90_target():
        return called(make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, *weights, *lora_a, *lora_b))


def trace_dx(T: int, widths=WIDTHS, with_da: bool = False):
    """The backward's dx GEMM traced alone (the backward op's body cannot be, see above): its kernel and the
    host TMA descriptors the graph records (argument name: block shape) for Inductor's code to make;
    ``with_da``: the same GEMM computing dA too (``GemmDx.with_da``)."""
    from fx_passes.ops.kernels.gemm_lora_train import GemmDx

    with FakeTensorMode():
        dys = [torch.empty(T, n, device="cuda", dtype=torch.bfloat16) for n in widths]
        weights = [torch.empty(n, H, device="cuda", dtype=torch.bfloat16) for n in widths]
        ds = torch.empty(T, 16, device="cuda")
        lora_a = [torch.empty(8, H, device="cuda") for _ in range(2)]
        x = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
    plan = GemmDx([8, 8], list(widths), T, H, torch.bfloat16, torch.float32, torch.device("cuda"), with_da=with_da)

    def f(*a):
        n = len(widths)
        args = (list(a[:n]), list(a[n:2 * n]), a[2 * n], list(a[2 * n + 1:-1]))
        return plan.with_da(*args, a[-1], traced=True) if with_da else plan(*args, traced=True)
    with assumed_sm90_target():
        graph = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*dys, *weights, ds, *lora_a, x)
    nodes = kernel_nodes(graph)
    out = {"descriptors": {name: meta[1][0] for node in nodes
                           for name, meta in node.kwargs["tma_descriptor_metadata"].items()},
           "written": [name for node in nodes for name in node.kwargs["tensors_to_clone"]],
           "tail": plan.tail, "da": plan.da_schedule is not None}
    returned = graph.graph.output_node().args[0]   # which of the kernel's results the graph returns
    out["returns"] = [r.args[1] if r.target is operator.getitem else str(r)
                      for r in (returned if isinstance(returned, (list, tuple)) else [returned])]
    return {**called(graph), **out}


def trace_dsdb(T: int = T):
    """The backward's dS + dB kernel and its partial sums traced alone (the backward op's body cannot be):
    the kernels and which kernel's results the graph returns."""
    from fx_passes.ops.kernels.lora_train import LoraDsDb, Slices

    widths = (120, 80)
    with FakeTensorMode():
        dys = [torch.empty(T, n, device="cuda", dtype=torch.bfloat16) for n in widths]
        lora_b = [torch.empty(n, 8, device="cuda") for n in widths]
        s = torch.empty(T, 16, device="cuda")
    plan = LoraDsDb(Slices(widths, (0, 0), (0, 8), (8, 8), (2.0, 0.5)), T, 16, torch.bfloat16, torch.float32, 132)

    def f(*a):
        return plan(list(a[:2]), list(a[2:4]), a[4], traced=True)
    with assumed_sm90_target():
        graph = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*dys, *lora_b, s)
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    returns = [f"{kernel_side_table.get_kernel(r.args[0].kwargs['kernel_idx']).fn.__name__}.{r.args[1]}"
               if r.target is operator.getitem else str(r) for r in graph.graph.output_node().args[0]]
    return {**called(graph), "returns": returns}   # (before the reinplacing rewrites the outputs)


@contextlib.contextmanager
def assumed_sm90_target():
    """The kernels' mutation analysis (Triton's TTIR of the kernel, read by torch) for an assumed sm90 GPU: it
    needs Triton's active driver only for the target, and torch's check that the device takes host TMA
    descriptors (without them it assumes every argument written, or mis-reads the descriptors' arguments)."""
    import triton
    from triton.backends.compiler import GPUTarget

    import torch.utils._triton as torch_triton

    class Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    saved, saved_driver = torch_triton.has_triton_tensor_descriptor_host_tma, triton.runtime.driver._active
    triton.runtime.driver.set_active(Target())
    torch_triton.has_triton_tensor_descriptor_host_tma = lambda: True
    try:
        yield
    finally:
        triton.runtime.driver._active = saved_driver   # (none on a machine without a GPU)
        torch_triton.has_triton_tensor_descriptor_host_tma = saved


def trace_for_export():
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition

    with _disable_custom_triton_op_functional_decomposition():
        return trace_forward()


if __name__ == "__main__":
    print(json.dumps({
        "forward": trace_forward(),
        # from train_fused_min_t, with TMA rows in every projection: the GEMMs + LoRA as one kernel (z's 72
        # columns take a narrow tile, so its slice keeps the LoRA in the epilogue)
        "forward_large": trace_forward(T=tuning.tuning_for(tuning.device_info(None)).train_fused_min_t,
                                       widths=(200, 72, 8, 8)),
        # qkv and z both 256-column tiles: the LoRA as their first K steps, its operands made by torch ops
        "forward_kstep": trace_forward(T=tuning.tuning_for(tuning.device_info(None)).train_fused_min_t,
                                       widths=(512, 256, 16, 16)),
        "dx": trace_dx(128 * 132, widths=(200, 72, 8, 8)),   # whole waves on the assumed 132 SMs
        "dx_tail": trace_dx(1100, widths=(200, 72, 8, 8)),
        # a long K against T: dA on the GEMM's lighter programs (gemm_lora_train.dx_schedule)
        "dx_da": trace_dx(1100, widths=(2048, 1024, 16, 16), with_da=True),
        "forward_wide": trace_forward(h=600),   # the shrink over x in column chunks, summed by PartSums
        "dsdb": trace_dsdb(),
        "forward_cpu": trace_forward("cpu"),
        "forward_export": trace_for_export(),
    }))
