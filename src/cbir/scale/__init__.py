"""The cluster path: extraction on Ray Data (``cbir index --engine ray``, extra ``cbir[ray]``),
written as Parquet shards that `cbir.scale.shards.ingest_shards` adds to an index. (Search at
scale lives with the index: `cbir.index.factory`, `cbir.index.milvus`.) Optional dependencies
are imported where they are used, never here."""
