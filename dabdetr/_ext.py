"""Loading of the compiled extension ``dabdetr._C`` (C++ CPU kernels, CUDA kernels when built).

The extension only registers operators with the dispatcher (``TORCH_LIBRARY(dabdetr, m)``, and the
backbone's CPU-only ops: the Winograd transforms, ``TORCH_LIBRARY(dabdetr_winograd, m)``, and the
layout copy, ``TORCH_LIBRARY(dabdetr_layout, m)``); it has no Python API. Importing it is optional: without it every op runs its reference implementation.

``DABDETR_LIBRARY=/path/to/lib.so`` loads a specific build instead of ``dabdetr._C`` (useful to
test a build made outside the source tree).
"""

from __future__ import annotations

import os

import torch

LOADED = False
LOAD_ERROR: str | None = None
HAS_CPU_KERNELS = False
HAS_CUDA_KERNELS = False

# The operators csrc/ops.cpp defines (each forward op has a ``<name>_backward`` op).
FORWARD_OPS = ("sine_embed", "modulated_sine_query", "content_position_attention")
OPS = FORWARD_OPS + tuple(f"{op}_backward" for op in FORWARD_OPS)
# (op, dispatch key) -> registered; read once at load time (a plain dict lookup, which
# torch.compile traces without a graph break).
_REGISTERED: dict = {}

BUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (needs a C++ compiler and ninja; "
    "see README.md, 'Install')"
)


def _load() -> None:
    global LOADED, LOAD_ERROR, HAS_CPU_KERNELS, HAS_CUDA_KERNELS
    path = os.environ.get("DABDETR_LIBRARY")
    try:
        if path:
            torch.ops.load_library(path)
        else:
            from . import _C  # noqa: F401  (registers the operators)
    except (ImportError, OSError) as exc:
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        return
    LOADED = True
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in OPS:
        for key in ("CPU", "CUDA"):
            _REGISTERED[(op, key)] = has(f"dabdetr::{op}", key)
    HAS_CPU_KERNELS = all(_REGISTERED[(op, "CPU")] for op in OPS)
    HAS_CUDA_KERNELS = all(_REGISTERED[(op, "CUDA")] for op in OPS)


_load()


def kernel_registered(op: str, dispatch_key: str) -> bool:
    """Whether ``dabdetr::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return _REGISTERED.get((op, dispatch_key), False)


def has_cpu_op(qualname: str) -> bool:
    """Whether the loaded extension registered ``qualname`` (``"namespace::op"``) with a CPU
    kernel: how the backbone's CPU-only ops (``dabdetr_winograd::*``, ``dabdetr_layout::relayout``)
    tell whether they can be called."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    except RuntimeError:  # "operator ... does not exist": an older build
        return False
