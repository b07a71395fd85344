"""Backend selection for the fused ops (DESIGN.md, "Backends, registration, dispatch").

Backends: ``torch`` (the reference in ``reference.py``), ``cpu`` (C++ in csrc/cpu), ``cuda``
(csrc/cuda) and ``triton`` (kernels/, installed as ``dabdetr.kernels``).

``backend=None`` reads ``DABDETR_BACKEND`` (unset, empty or ``auto``: automatic choice); the
automatic choice is, for a CUDA tensor, cuda if built, else triton if importable, else torch; for a
CPU tensor, cpu if built, else torch. A backend asked for explicitly (argument or environment) that
is missing or cannot serve the call raises :class:`BackendError` saying why: never a silent swap.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from .. import _ext

BACKENDS = ("torch", "cpu", "cuda", "triton")

# Fused implementations provided by Python packages (the Triton backend registers its ops here when
# it is importable): {backend: {op_name: callable}}.
_PY_IMPLS: Dict[str, Dict[str, Callable]] = {"triton": {}}
# Until dabdetr.kernels registers its ops (or records why it cannot), the backend is unavailable.
_PY_UNAVAILABLE: Dict[str, str] = {"triton": "dabdetr.kernels has not registered the Triton backend"}


class BackendError(RuntimeError):
    """A backend was requested that is missing or cannot serve this call."""


def register_python_backend(backend: str, op: str, fn: Callable) -> None:
    _PY_IMPLS.setdefault(backend, {})[op] = fn
    _PY_UNAVAILABLE.pop(backend, None)


def set_python_backend_unavailable(backend: str, reason: str) -> None:
    _PY_UNAVAILABLE[backend] = reason


def python_impl(backend: str, op: str) -> Callable:
    return _PY_IMPLS[backend][op]


def _env_backend() -> Optional[str]:
    value = os.environ.get("DABDETR_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendError(
            f"DABDETR_BACKEND={value!r} is not a backend; expected one of {BACKENDS} or 'auto'"
        )
    return value


def _triton_can_run(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_missing(
    backend: str, op: str, device: torch.device, dtype: Optional[torch.dtype] = None
) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device`` (with inputs of ``dtype``, when given),
    else the reason it cannot."""
    if backend == "torch":
        return None
    if backend in ("cpu", "cuda"):
        if not _ext.LOADED:
            return (
                f"the compiled extension dabdetr._C is not available ({_ext.LOAD_ERROR}); "
                f"{_ext.BUILD_HINT}"
            )
        if device.type != backend:
            return f"backend '{backend}' runs on {backend} tensors, got tensors on {device}"
        key = "CPU" if backend == "cpu" else "CUDA"
        if not _ext.kernel_registered(op, key):
            hint = (
                "rebuild on a machine where torch has CUDA and nvcc is found "
                "(DABDETR_BUILD_CUDA=1 forces it; see README.md)"
                if backend == "cuda"
                else _ext.BUILD_HINT
            )
            return f"dabdetr._C was built without {key} kernels for '{op}'; {hint}"
        return None
    if backend == "triton":
        if backend in _PY_UNAVAILABLE:
            return _PY_UNAVAILABLE[backend]
        if op not in _PY_IMPLS.get(backend, {}):
            return f"the Triton backend has no kernel for '{op}'"
        if not _triton_can_run(device):
            return (
                f"Triton kernels run on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), "
                f"got tensors on {device}"
            )
        if dtype == torch.float64:
            return "the Triton kernels take float32, float16 and bfloat16, not float64 (use 'cuda' or 'torch')"
        return None
    raise BackendError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")


def resolve(
    op: str,
    device: torch.device,
    backend: Optional[str],
    unsupported: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Pick the backend that runs ``op`` on ``device`` for inputs of ``dtype``.

    ``unsupported``: why no fused kernel can serve this particular call (e.g. ``dropout_p > 0``),
    or None. Automatic choice then falls back to the reference; an explicit fused backend raises.
    """
    explicit = backend if backend is not None else _env_backend()
    if explicit is not None:
        if explicit not in BACKENDS:
            raise BackendError(f"unknown backend {explicit!r}; expected one of {BACKENDS} or None")
        reason = _why_missing(explicit, op, device, dtype)
        if reason is None and explicit != "torch" and unsupported is not None:
            reason = unsupported
        if reason is not None:
            src = "backend=" if backend is not None else "DABDETR_BACKEND="
            raise BackendError(f"dabdetr.ops.{op}: {src}{explicit!r} cannot run this call: {reason}")
        return explicit
    if unsupported is not None:
        return "torch"
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for candidate in order:
        if _why_missing(candidate, op, device, dtype) is None:
            return candidate
    return "torch"


def available_backends(device: str | torch.device = "cpu", op: str = "sine_embed") -> list:
    """The backends that can run ``op`` on ``device`` on this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS if _why_missing(b, op, device) is None]
