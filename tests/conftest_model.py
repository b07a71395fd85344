"""Helpers of the model tests (a plain module, imported by test_model_*.py / test_checkpoint.py /
test_matcher.py; ``tests/`` is on sys.path through conftest.py).

* :func:`load_fixture` reads ``../shared/fixtures/dab_detr_r18_tiny.pt`` (relative to the repository
  root): a missing file skips the test with a message, or FAILS it when ``CI=true``.
* :data:`MODEL_BACKENDS`: ``"torch"`` always, ``"cpu"`` when the C++ kernels of all three ops are
  registered (a skipped param saying why otherwise).
* :func:`small_config`: a small, fast model configuration for training tests.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict

import pytest
import torch

from dabdetr import ops
from dabdetr.models import DABDETRConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "fixtures"))
FIXTURE_PATH = os.path.join(FIXTURE_DIR, "dab_detr_r18_tiny.pt")
OPS = ("sine_embed", "modulated_sine_query", "content_position_attention")


def fixture_or_skip(path: str = FIXTURE_PATH) -> str:
    if not os.path.exists(path):
        msg = (f"parity fixture not found at {path} (expected ../shared/fixtures relative to the "
               f"repository root)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return path


@functools.lru_cache(maxsize=1)
def _load(path: str) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_fixture() -> Dict[str, Any]:
    """The fixture dict (cached; do not modify its tensors in place)."""
    return _load(fixture_or_skip())


def _cpu_backend_missing() -> str:
    missing = [op for op in OPS if "cpu" not in ops.available_backends("cpu", op)]
    if not missing:
        return ""
    from dabdetr.ops import _dispatch

    return f"C++ CPU kernels unavailable for {missing}: {_dispatch._why_missing('cpu', missing[0], torch.device('cpu'))}"


def model_backends(include_fused: bool = True):
    params = [pytest.param("torch", id="torch")]
    if include_fused:
        why = _cpu_backend_missing()
        marks = [pytest.mark.skip(reason=why)] if why else []
        params.append(pytest.param("cpu", id="cpu", marks=marks))
    return params


MODEL_BACKENDS = model_backends()


def small_config(**overrides: Any) -> DABDETRConfig:
    """ResNet-18, d=64, 1 encoder + 2 decoder layers, 12 queries, 7 classes (odd sizes on purpose)."""
    base = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=96,
                num_queries=12, num_classes=7, num_select=20)
    base.update(overrides)
    return DABDETRConfig(**base)


def small_batch(gen: torch.Generator, sizes=((64, 96), (48, 80)), num_classes: int = 7):
    """Random images (list of [3,H,W]) and targets with 1-3 boxes each."""
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    targets = []
    for i in range(len(sizes)):
        n = 1 + i % 3
        cxcy = 0.25 + 0.5 * torch.rand(n, 2, generator=gen)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=gen)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=gen),
                        "boxes": torch.cat([cxcy, wh], dim=1)})
    return images, targets
