"""Backbones (pretrained networks with named taps) and the engines that run them."""

from cbir.models.backbones import BACKBONES, Backbone, BackboneError, get_backbone, list_backbones
from cbir.models.engine import ENGINES, create_engine

__all__ = ["BACKBONES", "Backbone", "BackboneError", "ENGINES", "create_engine", "get_backbone",
           "list_backbones"]
