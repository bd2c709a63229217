"""cbir: content-based image retrieval with deep features.

Data flows one way through the subpackages:

    models (backbone -> feature maps) -> pooling (maps -> vectors) -> postprocess
    (normalise, PCA) -> index (vectors + catalog + FAISS) -> evaluation / service

`cbir.metrics` holds every metric (retrieval, classification, detection, segmentation,
boxes); `cbir.toolbox` holds the detector/segmenter building blocks of the notes.
"""

__version__ = "0.1.0"
