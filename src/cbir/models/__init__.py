"""Backbones (pretrained networks with named taps) and the engines that run them."""

from cbir.models.backbones import (
    Backbone,
    BackboneError,
    get_backbone,
    list_backbones,
    register_backbone,
)
from cbir.models.engine import ENGINES, Engine, create_engine

__all__ = [
    "Backbone", "BackboneError", "ENGINES", "Engine", "create_engine", "get_backbone",
    "list_backbones", "register_backbone",
]
