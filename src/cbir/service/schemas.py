"""The service's response bodies; they document the API in its OpenAPI schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Result(BaseModel):
    id: int
    name: str = Field(description="File name (for uploads, the name it was uploaded under).")
    score: float = Field(description="Cosine similarity to the query (higher is closer).")
    meta: dict[str, Any] = Field(description="The catalog's metadata for this image, e.g. artist and title.")
    image_url: str
    thumbnail_url: str


class FoundObject(BaseModel):
    box: list[float] = Field(description="x0, y0, x1, y1 in pixels of the query as displayed.")
    polygon: list[list[float]] | None = Field(description="The object's 4 corners when it is tilted or in perspective.")
    score: float = Field(description="The localizer's confidence that this is an object.")
    identified: Result | None = Field(description="The database image this object is, when its best match passes "
                                                  "the index's acceptance threshold; null: not in the collection.")
    results: list[Result]


class SearchResponse(BaseModel):
    results: list[Result] = Field(description="The results of the first (best) object, or of the whole query.")
    objects: list[FoundObject] = Field(default_factory=list, description="Each object found in the query photo "
                                       "(by the server's localizer, or the box drawn) with its own results.")
    localizer: str | None = Field(default=None, description="How the objects were found: a localizer, 'box' for a "
                                  "box drawn by hand, null for a search by an indexed image.")
    k: int
    count: int = Field(description="Images in the index.")
    ms: float = Field(description="Server time for the whole search, in milliseconds.")
    extract_ms: float = Field(description="Of which: decoding the query and running the network.")
    search_ms: float = Field(description="Of which: nearest-neighbour search and catalog look-ups.")


class ImageInfo(BaseModel):
    id: int
    name: str
    meta: dict[str, Any]
    size: int = Field(description="File size in bytes.")
    sha256: str
    width: int | None = Field(None, description="Pixels, after EXIF orientation; null if the file cannot be read now.")
    height: int | None = None
    uploaded: bool = Field(description="Added through this service (stored in the index's uploads folder).")
    image_url: str
    thumbnail_url: str


class AddResponse(BaseModel):
    added: list[ImageInfo] = Field(description="One per uploaded file, in order.")
    existing: list[int] = Field(description="Ids among `added` that were already indexed (same content).")
    count: int


class DeleteResponse(BaseModel):
    deleted: int
    count: int


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    max_files: int
    max_uploads: int = Field(description="Uploads received at once; beyond it, 503 with Retry-After.")
    max_meta_bytes: int = Field(description="Size of an upload's `meta` JSON (a flat object of scalars).")


class Stats(BaseModel):
    count: int
    pipeline: str
    dim: int
    index_type: str = Field(description="The FAISS index type the index was configured with.")
    index_type_resolved: str | None = Field(None, description="What that type resolved to for this index (e.g. for `auto`).")
    segments: int
    read_only: bool
    limits: Limits


class Health(BaseModel):
    status: str
    count: int
