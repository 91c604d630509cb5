"""A user's HF Trainer fine-tuning script, run by tests/test_front_door.py in a fresh interpreter: tiny
Qwen3.5 + PEFT LoRA (dropout 0.1) handed to ``transformers.Trainer`` compiled by the backend's name, without
``import fx_passes``, with ``bf16=True`` (accelerate runs every forward under ``torch.autocast``), three steps;
then the same Trainer run uncompiled, and uncompiled without ``bf16`` (the fp32 reference). Prints one
``RESULTS <json>`` line: the reports, each run's losses, and the adapters' distances from the fp32 run's.

    python user_trainer_script.py OUTPUT_DIR

Trainer's own ``torch_compile_backend`` takes only accelerate's list of backend names, so the script
compiles the model itself; ``remove_unused_columns=False`` because a compiled module's signature is
``(*args, **kwargs)``. ``options={"fallback_random": True}``: Inductor draws eager's dropout masks.
"""
import copy
import json
import sys

import torch
from user_script_common import Collect, tiny_peft_qwen35


def train(model, out_dir: str, compiled: bool, bf16: bool) -> list:
    """Three Trainer steps; the logged losses."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 128, (6, 8), generator=g)]
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, max_steps=3, use_cpu=True,
                             bf16=bf16, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    run = torch.compile(model, backend="fx_passes", options={"fallback_random": True}) if compiled else model
    trainer = Trainer(model=run, args=args, train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def lora(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k}


def distance(params: dict, ref: dict) -> float:
    """The largest relative distance of one adapter weight from ``ref``'s."""
    return max(((p - ref[k]).norm() / ref[k].norm()).item() for k, p in params.items())


def main():
    assert "fx_passes" not in sys.modules   # torch finds the backend by its entry point
    collect = Collect.on_fx_passes_logger()
    model = tiny_peft_qwen35(lora_dropout=0.1).train()
    eager, fp32, start = copy.deepcopy(model), copy.deepcopy(model), lora(model)
    losses = train(model, sys.argv[1], compiled=True, bf16=True)
    eager_losses = train(eager, sys.argv[1], compiled=False, bf16=True)
    fp32_losses = train(fp32, sys.argv[1], compiled=False, bf16=False)
    ref = lora(fp32)
    print("RESULTS " + json.dumps(dict(
        reports=collect.reports, losses=losses, eager_losses=eager_losses, fp32_losses=fp32_losses,
        lora_params=len(ref), moved=distance(ref, start),
        param_err_fp32=distance(lora(model), ref), eager_param_err_fp32=distance(lora(eager), ref))))


if __name__ == "__main__":
    main()
