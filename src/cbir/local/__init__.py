"""Local-region aggregation: regions of an image go through the network one by one, and their
descriptors are encoded into one vector by BoW, VLAD or Fisher vectors.

- `regions`: where the regions come from: sliding windows at several scales
  (``regions:sliding<L>``) or selective-search proposals (``regions:proposals<N>``).
- `encoders`: ``BoW<k>``, ``VLAD<k>``, ``FV<k>`` (optionally ``d<dims>`` for the local PCA),
  learned on a separate image set and saved with the index.
"""

from cbir.local.encoders import ENCODERS, LocalEncoder, parse_encoder
from cbir.local.regions import REGIONS, RegionSpec, parse_regions, selective_search, sliding_windows

__all__ = ["ENCODERS", "LocalEncoder", "REGIONS", "RegionSpec", "parse_encoder", "parse_regions",
           "selective_search", "sliding_windows"]
