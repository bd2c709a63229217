"""cbir.toolbox: the detector / segmenter building blocks of the notes, separate from retrieval
(docs/toolbox.md). ``layers`` and the registry are imported here; ``augment``, ``losses``,
``flops`` and ``receptive_field`` on demand.
"""

from cbir.toolbox import layers
from cbir.toolbox.registry import MODULES, create_module, get_entry, list_modules, register_module

__all__ = ["MODULES", "create_module", "get_entry", "layers", "list_modules", "register_module"]
