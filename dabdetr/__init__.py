"""dabdetr: DAB-DETR ("Dynamic Anchor Boxes are Better Queries for DETR", ICLR 2022) with fused
kernels for its hot ops (C++ for the CPU, CUDA, Triton), registered as PyTorch ops."""

from . import ops
from ._ext import LOADED as extension_loaded

__version__ = "0.1.0"

_MODEL_EXPORTS = ("DABDETR", "load_original_checkpoint")


def __getattr__(name):
    # The model package imports more (scipy for the matcher); load it on first use.
    if name in _MODEL_EXPORTS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'dabdetr' has no attribute {name!r}")


__all__ = ["ops", "extension_loaded", "__version__", *_MODEL_EXPORTS]
