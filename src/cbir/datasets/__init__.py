"""Retrieval benchmarks: one `Benchmark` shape, read from the common on-disk layouts.

- ``gt.json`` (the layout of ``../shared/datasets/README.md``)
- Revisited Oxford/Paris: ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` beside ``jpg/``, with
  the Easy / Medium / Hard protocols (each query appears once per protocol, tagged with it)
- INRIA Holidays: ``NNNNSS.jpg``; ``SS == 00`` is the query of group ``NNNN``
- UKBench: ``ukbenchNNNNN.jpg``; groups of four consecutive numbers, every image a query
- a folder per class: every image is a query, its positives are its folder-mates

Paths in a benchmark are relative to its ``root``. A query that is itself in the database
lists itself as junk, except in UKBench where, by that benchmark's convention, it counts.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from cbir.images import list_images


class DatasetError(ValueError):
    """A benchmark folder that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class GroundTruthObject:
    """One object of a multi-object photo: its box, what shows it in the database (empty:
    not in the collection), and, for a tilted or perspective-warped one, its 4 corners."""

    bbox: tuple[float, float, float, float]
    positives: tuple[str, ...] = ()
    polygon: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Query:
    image: str
    positives: tuple[str, ...]
    junk: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    objects: tuple[GroundTruthObject, ...] | None = None  # None: not listed; (): a photo of none
    mask: str | None = None  # a PNG of the photo's size, 255 on the object(s)


@dataclass
class Benchmark:
    name: str
    root: Path
    database: list[str]
    queries: list[Query]
    kind: str = "gt.json"
    metadata: dict[str, dict] = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def with_tags(self, tags: tuple[str, ...] | list[str]) -> "Benchmark":
        """The same benchmark with only the queries that carry any of ``tags``."""
        if not tags:
            return self
        queries = [q for q in self.queries if set(tags) & set(q.tags)]
        if not queries:
            known = sorted({t for q in self.queries for t in q.tags})
            raise DatasetError(f"{self.root}: no query is tagged {' or '.join(tags)}; tags: {', '.join(known)}")
        return replace(self, queries=queries)


def load_benchmark(root: str | Path) -> Benchmark:
    """Detect the layout of ``root`` and read it."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such benchmark directory")
    if (root / "gt.json").exists():
        return _load_gt_json(root)
    pkls = sorted(root.glob("gnd_r*.pkl"))
    if pkls:
        return _load_revisited(root, pkls[0])
    files = _images(root)
    names = [Path(f).name for f in files]
    if names and all(re.fullmatch(r"ukbench\d{5}\.\w+", n) for n in names):
        return _load_ukbench(root, files)
    if names and all(re.fullmatch(r"\d{6}\.\w+", n) for n in names):
        return _load_holidays(root, files)
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs:
        return _load_class_folders(root, subdirs)
    raise DatasetError(f"{root}: no gt.json, gnd_r*.pkl, Holidays/UKBench file names, or class folders found")


def _box(value, where: str) -> tuple[float, float, float, float]:
    box = tuple(float(v) for v in value)
    if len(box) != 4 or not box[2] > box[0] or not box[3] > box[1]:
        raise DatasetError(f"{where}: bbox {list(value)} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    return box  # type: ignore[return-value]


def _object(o: dict, where: str) -> GroundTruthObject:
    polygon = None
    if o.get("polygon") is not None:
        pts = o["polygon"]
        if len(pts) != 4 or any(len(p) != 2 for p in pts):
            raise DatasetError(f"{where}: polygon has {len(pts)} points, not 4 [x, y] corners")
        polygon = tuple((float(x), float(y)) for x, y in pts)
    return GroundTruthObject(_box(o["bbox"], where), tuple(o.get("positives", ())), polygon)


def _query(q: dict, i: int) -> Query:
    where = f"gt.json query {i} ({q.get('image', '?')})"
    objects = (tuple(_object(o, f"{where} object {j}") for j, o in enumerate(q["objects"]))
               if q.get("objects") is not None else None)
    return Query(q["image"], tuple(q.get("positives", ())), tuple(q.get("junk", ())), tuple(q.get("tags", ())),
                 bbox=_box(q["bbox"], where) if q.get("bbox") else None, objects=objects, mask=q.get("mask"))


def _load_gt_json(root: Path) -> Benchmark:
    try:
        gt = json.loads((root / "gt.json").read_text())
        queries = [_query(q, i) for i, q in enumerate(gt["queries"])]
        database = list(gt["database"])
    except (KeyError, TypeError, ValueError) as e:  # ValueError: a JSONDecodeError, or ours from _query
        detail = e if isinstance(e, DatasetError) else f"not in the expected format ({type(e).__name__}: {e})"
        raise DatasetError(f"{root / 'gt.json'}: {detail}") from None
    meta = json.loads((root / "metadata.json").read_text()) if (root / "metadata.json").exists() else {}
    return Benchmark(gt.get("name", root.name), root, database, queries, "gt.json", meta)


# What a real gnd_r*.pkl holds: dicts, lists, strings and numbers (opcodes, no look-up), and
# numpy arrays and scalars. Nothing else may be named, so a crafted file cannot call anything.
PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes (a numpy array's data) from Python 3
} | {(module, name) for module in ("builtins", "__builtin__")  # containers older protocols name
     for name in ("set", "frozenset", "bytes", "bytearray", "list", "dict", "tuple", "complex")}


class _BenchmarkUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a benchmark file never holds")
        return super().find_class(module, name)


def read_ground_truth_pickle(pkl: Path) -> dict:
    """A Revisited Oxford/Paris ``gnd_*.pkl``, read without running any code from it."""
    try:
        with open(pkl, "rb") as f:
            cfg = _BenchmarkUnpickler(f).load()
    except OSError as e:
        raise DatasetError(f"{pkl}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # a crafted or corrupt pickle can raise almost anything
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DatasetError(f"{pkl}: refused, not a benchmark ground-truth pickle ({msg})") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise DatasetError(f"{pkl}: not a benchmark ground-truth pickle (no imlist, qimlist and gnd)")
    return cfg


def _load_revisited(root: Path, pkl: Path) -> Benchmark:
    cfg = read_ground_truth_pickle(pkl)
    img_dir = "jpg/" if (root / "jpg").is_dir() else ""
    try:
        database = [f"{img_dir}{n}.jpg" for n in cfg["imlist"]]
        queries = []
        for qname, g in zip(cfg["qimlist"], cfg["gnd"]):
            easy, hard, junk = ([database[i] for i in g.get(key, [])] for key in ("easy", "hard", "junk"))
            bbox = tuple(float(v) for v in g["bbx"]) if g.get("bbx") is not None else None
            # The three protocols of Radenovic et al. 2018.
            for tag, pos, jk in (("easy", easy, junk + hard), ("medium", easy + hard, junk),
                                 ("hard", hard, junk + easy)):
                queries.append(Query(f"{img_dir}{qname}.jpg", tuple(pos), tuple(jk), (tag,), bbox))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{pkl}: not in the expected format ({type(e).__name__}: {e})") from None
    return Benchmark(pkl.stem.replace("gnd_", ""), root, database, queries, "revisited")


def _images(root: Path, folder: Path | None = None) -> list[str]:
    """The images under ``folder`` (default: ``root``), as paths relative to ``root``."""
    return [p.relative_to(root).as_posix() for p in list_images(folder or root)]


def _groups(files: list[str], key) -> list[list[str]]:
    """``files`` grouped by ``key(file)``, groups in key order."""
    return [list(g) for _, g in itertools.groupby(sorted(files, key=key), key)]


def _load_holidays(root: Path, files: list[str]) -> Benchmark:
    queries = []
    for members in _groups(files, lambda f: Path(f).stem[:4]):
        q = [m for m in members if Path(m).stem.endswith("00")]
        if q:
            queries.append(Query(q[0], tuple(m for m in members if m != q[0]), (q[0],), ("holidays",)))
    return Benchmark(root.name, root, files, queries, "holidays")


def _load_ukbench(root: Path, files: list[str]) -> Benchmark:
    groups = _groups(files, lambda f: int(re.search(r"(\d{5})", Path(f).name).group(1)) // 4)
    queries = [Query(f, tuple(members), (), ("ukbench",)) for members in groups for f in members]
    return Benchmark(root.name, root, files, queries, "ukbench")


def _load_class_folders(root: Path, subdirs: list[Path]) -> Benchmark:
    by_class = {d.name: _images(root, d) for d in sorted(subdirs)}
    queries = [Query(m, tuple(x for x in members if x != m), (m,), (cls,))
               for cls, members in by_class.items() for m in members]
    database = [m for members in by_class.values() for m in members]
    return Benchmark(root.name, root, database, queries, "folders")
