"""A user's script, run by tests/test_front_door.py in a fresh interpreter (cold, then warm caches).

What a user of HF + PEFT writes: a Qwen3.5 with LoRA, ``torch.compile(model, backend="fx_passes", ...)``
with no ``import fx_passes`` (unless ``--import-first``). Reports reach the script the way they reach
any user of the registered backend: on the ``fx_passes`` logger (each summary record carries the
report as ``record.fx_passes_report``). Prints a ``CASE <json>`` line per case as it finishes, then
one ``RESULTS <json>`` line with all of them.

    python user_compile_script.py '<json list of cases>' [--import-first] [--cuda]

(``--cuda``: bf16 on the GPU, for the GPU machine; the tests run it on the CPU in fp32.)

A case: ``{"name": str, "kwargs": {...torch.compile keyword arguments...}, "user_pass": bool}``.
"""
import json
import sys
import time

if "--import-first" in sys.argv:
    import fx_passes  # noqa: F401

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from user_script_common import Collect, tiny_peft_qwen35


class SeesFusedOps(CustomGraphPass):
    """The user's own post-grad pass: records whether it ran after ours (the graph holds our op)."""

    def __init__(self):
        self.calls = []

    def __call__(self, graph):
        self.calls.append(sum(str(n.target).startswith("fx_passes.") for n in graph.nodes))

    def uuid(self):
        return "sees-fused-ops-1"


CUDA = "--cuda" in sys.argv
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


def build_model():
    return tiny_peft_qwen35(DEVICE, DTYPE)


def main():
    cases = json.loads(sys.argv[1])
    collect = Collect.on_fx_passes_logger()
    model = build_model()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    imported_before = "fx_passes" in sys.modules
    results = []
    for case in cases:
        torch._dynamo.reset()
        collect.reports.clear()
        start = time.perf_counter()
        kwargs = dict(case.get("kwargs", {}))
        user_pass = None
        if case.get("user_pass"):
            user_pass = SeesFusedOps()
            kwargs["options"] = {**kwargs.get("options", {}), "post_grad_custom_post_pass": user_pass}
        compiled = torch.compile(model, backend="fx_passes", **kwargs)
        with torch.no_grad():
            outs = [compiled(input_ids=ids).logits.clone() for _ in range(3)]   # cudagraph trees record on call 2
        results.append(dict(
            name=case["name"], reports=list(collect.reports),
            max_diff=max((out.float() - eager.float()).abs().max().item() for out in outs),
            user_pass_calls=None if user_pass is None else user_pass.calls, seconds=time.perf_counter() - start))
        print("CASE " + json.dumps(results[-1]), flush=True)   # one line per case: a later hang loses none
    print("RESULTS " + json.dumps(dict(imported_before_compile=imported_before, cases=results)))


if __name__ == "__main__":
    main()
