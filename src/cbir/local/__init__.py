"""Local-region aggregation: the regions of an image (`regions`: sliding windows or
selective-search proposals) go through the network one by one, and their descriptors are
encoded into one vector (`encoders`: BoW, VLAD or Fisher vectors)."""

from cbir.local.encoders import ENCODERS, LocalEncoder, parse_encoder
from cbir.local.regions import REGIONS, RegionSpec, parse_regions, selective_search, sliding_windows

__all__ = ["ENCODERS", "LocalEncoder", "REGIONS", "RegionSpec", "parse_encoder", "parse_regions",
           "selective_search", "sliding_windows"]
