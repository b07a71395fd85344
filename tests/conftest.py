"""Shared pytest configuration of dabdetr's tests (generic: used by the op, model and trainer tests).

Nothing here changes global state behind a test's back: there are no autouse fixtures. Tests that
want random inputs take the ``seed`` / ``gen`` fixtures, which draw a FRESH seed per test (so the
suite keeps exploring new inputs) and print it; a failure is replayed with
``DABDETR_TEST_SEED=<seed> python -m pytest <nodeid>``.

Device parametrization: ``DEVICES`` (from ``tests/_helpers.py``) has "cpu" always and "cuda"
skipped (not removed) where no GPU is visible, so the same files run on GPU machines.
"""

from __future__ import annotations

import os
import secrets
import sys

import pytest
import torch

# The helpers module sits beside this file; make `import _helpers` work whatever pytest's import
# mode or rootdir (e.g. if someone adds tests/__init__.py).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def pytest_sessionstart(session):
    """tests/cpu_asan.py runs the op tests with a sanitized build (DABDETR_LIBRARY): if it did not
    load, every op would quietly run its reference implementation and the pass would prove
    nothing, so that stops the session."""
    if os.environ.get("DABDETR_EXPECT_SANITIZED_LIBRARY") == "1":
        from dabdetr import _ext

        if not (_ext.LOADED and _ext.HAS_CPU_KERNELS and os.environ.get("DABDETR_LIBRARY")):
            raise pytest.UsageError(f"the sanitized library {os.environ.get('DABDETR_LIBRARY')} did not load or has "
                                    f"no CPU kernels: {_ext.LOAD_ERROR}")


def pytest_report_header(config):
    try:
        import dabdetr
        from dabdetr import ops

        lines = [f"dabdetr {dabdetr.__version__}: torch {torch.__version__}, extension loaded: "
                 f"{dabdetr.extension_loaded}"]
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            per_op = {op: ops.available_backends(dev, op) for op in
                      ("sine_embed", "modulated_sine_query", "content_position_attention")}
            lines.append(f"dabdetr backends on {dev}: {per_op}")
        return lines
    except Exception as exc:  # pragma: no cover - the header must never break collection
        return [f"dabdetr: import failed: {type(exc).__name__}: {exc}"]


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test (or ``DABDETR_TEST_SEED``), printed so a failure can be
    replayed. Does NOT seed the global RNGs: use the ``gen`` fixture or ``torch.Generator``."""
    env = os.environ.get("DABDETR_TEST_SEED")
    value = int(env) if env else secrets.randbits(31)
    print(f"[seed] DABDETR_TEST_SEED={value} python -m pytest '{request.node.nodeid}'")
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (create tensors on the CPU, then move)."""
    return torch.Generator().manual_seed(seed)
