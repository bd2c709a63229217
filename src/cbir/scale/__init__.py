"""Speed and scale: the cluster path (the batch size by measurement is an engine concern:
`cbir.models.batch_size`).

- `cbir.index.factory`: FAISS index types by collection size (``Flat``, ``HNSW32``,
  ``IVF...,PQ...,RFlat`` with exact re-ranking).
- `cbir.scale.ray_extract`: extraction on Ray Data (``cbir index --engine ray``), written
  as Parquet shards that `cbir.scale.shards.ingest_shards` adds to an index (extra ``cbir[ray]``).
- `cbir.scale.milvus`: a Milvus backend for search (``--backend milvus://HOST:PORT/COLLECTION``,
  extra ``cbir[milvus]``).

Optional dependencies are imported where they are used, never here.
"""
