import os

# Triton kernels run on CPU tensors only through the interpreter; set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_compile():
    """Every test compiles from scratch: no Dynamo state, no Inductor cache hits (a hit skips the pass)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()
