"""Input conversion and safe division shared by the metric modules."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """torch tensor (any device, with or without grad) / list / array -> numpy array: metrics
    are bookkeeping, not part of a graph, and numpy keeps them identical on every device."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def safe_divide(num, den, zero_division: float = 0.0) -> np.ndarray:
    """``num / den`` elementwise, ``zero_division`` where ``den == 0``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, zero_division, dtype=np.float64)
    return np.divide(num, den, out=out, where=den != 0)
