"""Random Qwen3.5 + PEFT configurations (tests/property_check.py) on a fixed list of seeds: each compiles
with the fx_passes backend, every GDN layer is rewritten or skipped with a reason, logits match eager.
The long run (>= 500 seeds) is ``python tests/property_check.py --many 500``; its record is in the README."""
import pytest

from property_check import check, draw

# drawn once and kept: together they cover rank 1 and > 128, a z rank pattern, 2-3 adapters, LoRA on
# qkv only / z only / all GDN linears, MoE, unpacked weights, padding masks, bf16
SEEDS = [0, 2, 3, 5, 11, 17, 23, 28]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configuration(seed):
    result = check(draw(seed))
    assert result["status"] == "ok", {k: v for k, v in result.items() if k != "traceback"} | {
        "traceback": result.get("traceback", "")[-1500:]}
    assert result["rewritten"] + len(result["skipped"]) == 1
