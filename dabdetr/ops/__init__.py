"""dabdetr's fused ops (DESIGN.md, "The three fused ops").

Each op takes ``backend=None | "torch" | "cpu" | "cuda" | "triton"``; see :mod:`._dispatch`.
``reference`` holds the plain-PyTorch spec of each op.
"""

from . import _library  # noqa: F401  (registers fake/autograd/autocast for the C++ ops)
from . import reference
from ._dispatch import BACKENDS, BackendError, available_backends
from .content_position_attention import content_position_attention
from .modulated_sine_query import modulated_sine_query
from .sine_embed import sine_embed

# Registers the Triton backend when it can run here (a CUDA device, or TRITON_INTERPRET=1); never
# raises (without Triton the backend is reported unavailable, with the reason).
from .. import kernels as _kernels  # noqa: F401,E402

__all__ = [
    "sine_embed",
    "modulated_sine_query",
    "content_position_attention",
    "reference",
    "available_backends",
    "BackendError",
    "BACKENDS",
]
