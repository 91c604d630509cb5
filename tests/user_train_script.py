"""A user's PEFT fine-tuning script, run by tests/test_front_door.py in a fresh interpreter (cold, then warm
Inductor caches): tiny Qwen3.5 + PEFT LoRA (dropout 0.1) in train mode, ``torch.compile(model,
backend="fx_passes", mode=..., options=...)`` without ``import fx_passes``, two AdamW steps, and the same two
steps in eager from the same weights. Reports reach the script on the ``fx_passes`` logger. Prints one
``RESULTS <json>`` line: the reports, the loss and LoRA-gradient errors against eager.

    python user_train_script.py '<json: torch.compile keyword arguments>' [autocast]

``options`` always gets ``fallback_random`` (Inductor then draws eager's dropout masks: eager is a reference).
``autocast``: every forward (compiled and eager) under ``torch.autocast("cpu", bfloat16)``, as a
mixed-precision trainer runs it; the results then also hold each run's LoRA-gradient error against the same
steps in fp32 without autocast.
"""
import copy
import json
import sys

import torch
from user_script_common import Collect, tiny_peft_qwen35


def steps(model, run, ids, n=2, autocast=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], None
    for step in range(n):
        torch.manual_seed(10 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if grads is None:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return losses, grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    kwargs = json.loads(sys.argv[1])
    autocast = sys.argv[2:] == ["autocast"]
    assert "fx_passes" not in sys.modules   # torch finds the backend by its entry point
    kwargs["options"] = {**kwargs.get("options", {}), "fallback_random": True}
    collect = Collect.on_fx_passes_logger()
    model = tiny_peft_qwen35(lora_dropout=0.1).train()
    eager_model, fp32_model = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    losses, grads = steps(model, torch.compile(model, backend="fx_passes", **kwargs), ids, autocast=autocast)
    ref_losses, ref_grads = steps(eager_model, eager_model, ids, autocast=autocast)
    extra = {}
    if autocast:
        _, fp32_grads = steps(fp32_model, fp32_model, ids)
        extra = dict(grad_err_fp32=max(rel(grads[k], fp32_grads[k]) for k in fp32_grads),
                     eager_grad_err_fp32=max(rel(ref_grads[k], fp32_grads[k]) for k in fp32_grads))
    print("RESULTS " + json.dumps(dict(
        reports=collect.reports, lora_grads=len(grads), **extra,
        loss_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        grad_err=max(rel(grads[k], ref_grads[k]) for k in ref_grads),
        param_err=max(rel(p, dict(eager_model.named_parameters())[k]) for k, p in model.named_parameters()
                      if p.requires_grad))))


if __name__ == "__main__":
    main()
