"""The prefill kernel of ``fx_passes::qkvz_gemm_lora`` (persistent TMA GEMM, LoRA chained into its
accumulator) against the plain-torch reference, its eligibility rules and the op's dispatch to it.

Runs on the CPU through the Triton interpreter (fp16: the interpreter has no bf16), called directly on
CPU tensors with small blocks and 3 persistent programs, so every case has several tiles per program,
column tiles that straddle a slice boundary (v | z at column 56 with 16-wide tiles) and a K tail.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fx_passes.ops  # noqa: E402,F401
from fx_passes.ops import dispatch, tuning  # noqa: E402
from fx_passes.ops.kernels import gemm_lora_prefill as prefill  # noqa: E402
from fx_passes.ops.lora_args import LoraSlices  # noqa: E402
from test_qkvz_gemm_lora_kernel import LAYOUTS, TOL, _assert_close, _case, _packed, _reference  # noqa: E402

SMALL = tuning.PrefillLaunch(16, 16, 16, 2, 4, num_programs=3)
PREFILL_FUSED_MIN_T = tuning.tuning_for(tuning.OFF_GPU_DEVICE).prefill_fused_min_t


def _run(x, weights, *lora_args, config=SMALL, with_lora=True):
    lora = LoraSlices.of(*lora_args) if with_lora else None
    return prefill.gemm_lora_prefill(x, weights, lora, config=config)


def _fusable(x, weights, lora_a, lora_b):
    return prefill.prefill_fusable(x, weights, LoraSlices.of(lora_a, lora_b, [0] * len(lora_b), [0] * len(lora_b)))


def _packed_case(T, layout, *, adapters=None, rank=8, seed=0):
    x, weights, *rest = _case(T, layout, torch.float16, adapters=adapters, rank=rank, seed=seed)
    return (x, _packed(weights), *rest)


@pytest.mark.parametrize("T", [5, 37])
@pytest.mark.parametrize("adapters", [None, 1, 3])   # 1: token ids with a single adapter (vLLM, max_loras 1)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prefill_kernel_matches_reference(layout, adapters, T):
    args = _packed_case(T, layout, adapters=adapters)
    assert _fusable(*args[:4])
    got = _run(*args, 1.5)
    _assert_close(got, _reference(*args, 1.5), torch.float16)


@pytest.mark.parametrize("blocks", [(32, 32, 16, 2, 4), (16, 64, 32, 2, 4)])
def test_prefill_kernel_other_tiles_and_rank(blocks):
    """Tiles spanning several slices (32 / 64 columns), rank 24 (BLOCK_R 32, masked), 5 adapters whose B
    tiles are loaded 2 at a time (the last pair partly past L)."""
    args = _packed_case(29, "four_groups", adapters=5, rank=24, seed=4)
    got = _run(*args, 0.5, config=tuning.PrefillLaunch(*blocks, num_programs=2))
    _assert_close(got, _reference(*args, 0.5), torch.float16)


def test_prefill_kernel_rows_without_adapter_get_the_base_product():
    args = _packed_case(37, "qkvz", adapters=2, seed=7)
    x, weights, ids = args[0], args[1], args[6]
    got = _run(*args, 2.0)
    rows = (ids == -1).nonzero().flatten()
    assert rows.numel() > 0
    base = torch.cat([x.float() @ w.float().t() for w in weights], 1)
    _assert_close(got[rows], base[rows], torch.float16)
    no_lora = _run(*args, 2.0, with_lora=False)
    _assert_close(no_lora, base, torch.float16)
    # and the LoRA rows really changed: a kernel that dropped the LoRA would fail the test above
    assert (got.float() - no_lora.float()).abs().max() > 10 * TOL[torch.float16] * base.abs().max()


def test_prefill_fusable_rules():
    x, weights, lora_a, lora_b, *_ = _packed_case(8, "qkvz")
    assert _fusable(x, weights, lora_a, lora_b)
    assert not _fusable(x, [w.clone() for w in weights], lora_a, lora_b)          # not packed
    assert not _fusable(x, weights, [a.float() for a in lora_a], [b.float() for b in lora_b])
    wide = torch.zeros(8, x.shape[1] + 1, dtype=x.dtype)
    wide[:, :-1] = x
    assert not _fusable(wide[:, :-1], weights, lora_a, lora_b)                    # 82-byte rows
    x32, weights32, a32, b32, *_ = _case(8, "qkvz", torch.float32)
    assert not _fusable(x32, _packed(weights32), a32, b32)                        # fp32
    x4, weights4, a4, b4, *_ = _packed_case(8, "qkvzba")
    assert _fusable(x4, weights4, a4, b4)                                         # four weights, packed
    assert not _fusable(x4, weights4[:3] + [weights4[3].clone()], a4, b4)         # W_a not in the buffer
    odd = _packed(weights4[:3] + [weights4[3][:-1]])
    assert not _fusable(x4, odd, a4, b4[:-1] + [b4[-1][:-1]])                     # out rows of 182 bytes


def test_prefill_config_must_fit_the_device(monkeypatch):
    """A device without TMA, or with less shared memory than the tiles need, never gets the kernel."""
    x, weights, lora_a, lora_b, *_ = _packed_case(8, "qkvz")
    assert tuning.prefill_smem(tuning.PrefillLaunch(), 2) <= tuning.OFF_GPU_DEVICE.shared_memory
    for small in (tuning.DeviceInfo("small card", 132, 101376, (9, 0)), tuning.DeviceInfo("A100", 108, 166912, (8, 0))):
        monkeypatch.setattr(tuning, "OFF_GPU_DEVICE", small)
        assert tuning.prefill_launch(x.device, x.dtype) is None
        assert not _fusable(x, weights, lora_a, lora_b)


@pytest.mark.parametrize("T, fused", [(70, False), (PREFILL_FUSED_MIN_T + 3, True)])
def test_op_prefill_path_dispatches_the_fused_kernel(T, fused, monkeypatch):
    """From PREFILL_FUSED_MIN_T tokens, fusable arguments run the prefill kernel (default blocks);
    fewer tokens take the cuBLAS paths (LoRA on all four projections covers every column: delta written
    first, cuBLAS accumulates). Same result either way."""
    calls = []
    real = dispatch.gemm_lora_prefill
    monkeypatch.setattr(dispatch, "gemm_lora_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, weights, *rest = _packed_case(T, "qkvzba", adapters=2, seed=9)
    lora = LoraSlices.of(*rest, 1.25)
    assert dispatch.gemm_lora_path(x, weights, lora) == ("prefill" if fused else "accumulate")
    got = dispatch.gemm_lora(x, weights, lora)
    assert bool(calls) == fused
    args = (x, weights, *rest)
    _assert_close(got, _reference(*args, 1.25), torch.float16)
