"""nn.Modules built on dabdetr's fused ops, to drop into other DETR variants."""

from .cross_attention import ContentPositionCrossAttention

__all__ = ["ContentPositionCrossAttention"]
