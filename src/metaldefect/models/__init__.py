"""Models: backbones created by timm name with offline pretrained weights, and heads."""
from metaldefect.models.backbones import DEFAULT_BACKBONE, KNOWN_BACKBONES, Backbone, create_backbone

__all__ = ["DEFAULT_BACKBONE", "KNOWN_BACKBONES", "Backbone", "create_backbone"]
