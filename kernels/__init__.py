"""Triton kernels of dabdetr's fused ops (installed as ``dabdetr.kernels``): the ``triton`` backend.

Importing this package registers the ops ``dabdetr::<op>_triton`` / ``dabdetr::<op>_backward_triton``
(see ``_register``) and makes ``backend="triton"`` (and the automatic choice on CUDA tensors when
the CUDA C++ kernels are not built) use them. It never raises: without Triton, or if registration
fails, the backend is reported unavailable with the reason (``dabdetr.ops.available_backends``
leaves it out; ``backend="triton"`` raises a ``BackendError`` that says why).

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton
interpreter, used by CI; the variable must be set before this package is imported). Modules:
``sine`` (sine_embed, modulated_sine_query), ``attention`` (content_position_attention),
``_register`` (torch.library registration), ``_common`` (shared helpers).
"""

import os as _os

AVAILABLE = False
UNAVAILABLE_REASON = None


def _usable() -> bool:
    # Registering costs ~1 s of imports (torch.library.triton_op pulls in parts of Inductor): done
    # only where the kernels can run at all. The kernel modules themselves import without it (the
    # compile report builds cubins on machines with no GPU).
    if _os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    import torch

    return torch.cuda.is_available()


try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as _exc:  # ImportError, or a broken install
    UNAVAILABLE_REASON = (
        f"Triton is not importable ({type(_exc).__name__}: {_exc}); install it with `pip install triton` "
        f"(it ships with torch's CUDA wheels on Linux)"
    )
else:
    if not _usable():
        UNAVAILABLE_REASON = (
            "Triton kernels run on CUDA devices and none is visible (for testing on the CPU, set "
            "TRITON_INTERPRET=1 before importing dabdetr: the Triton interpreter runs them on CPU tensors)"
        )
    else:
        try:
            from . import _register

            _register.register()
            AVAILABLE = True
        except Exception as _exc:  # pragma: no cover - reported through the dispatcher
            UNAVAILABLE_REASON = f"the Triton kernels failed to register ({type(_exc).__name__}: {_exc})"

if not AVAILABLE:
    try:
        from dabdetr.ops import _dispatch as _d

        _d.set_python_backend_unavailable("triton", UNAVAILABLE_REASON)
    except Exception:  # pragma: no cover
        pass

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON"]
