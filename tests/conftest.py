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


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist reads the marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's ``-n auto --dist loadgroup``): the tests of a module that share a
    module-scoped fixture (a cold-then-warm compile pair, a vLLM engine run) go to one worker, so the
    fixture runs once; every other test is scheduled on its own."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(d.scope == "module" for name in info.names_closure for d in info.name2fixturedefs.get(name, ())):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
