"""Triton kernels of dabdetr's fused ops (installed as ``dabdetr.kernels``).

Empty for now: the Triton backend is the subject of its own issue. The dispatcher reports the
backend as unavailable until this package registers its kernels.
"""
