"""Every retrieval method runs end to end: pipeline string -> extraction -> (fit) -> search -> mAP.

A tiny benchmark made from scikit-image's photos (small inputs, so that each pipeline takes
a second or two), a separate labelled fitting set, the index round trip and `cbir compare`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from cbir.datasets import load_benchmark
from cbir.evaluation import evaluate
from cbir.pipeline import Extractor, PipelineError, PipelineSpec, fit_set, resolve_spec

BENCH_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
FIT_PHOTOS = ("camera", "coins", "moon", "page", "clock", "brick")


def _photo(name: str) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    img.thumbnail((160, 160))
    return img


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    bench = root / "bench"
    (bench / "database").mkdir(parents=True)
    (bench / "queries").mkdir()
    database, queries = [], []
    for name in BENCH_PHOTOS:
        img = _photo(name)
        img.save(bench / "database" / f"{name}.jpg")
        ImageOps.grayscale(img).convert("RGB").save(bench / "database" / f"{name}_gray.jpg")
        w, h = img.size
        img.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(bench / "queries" / f"{name}.jpg")
        group = [f"database/{name}.jpg", f"database/{name}_gray.jpg"]
        database += group
        queries.append({"image": f"queries/{name}.jpg", "positives": group, "junk": [], "tags": ["crop"]})
    (bench / "gt.json").write_text(json.dumps({"name": "tiny", "database": database, "queries": queries}))
    fit = root / "fit"  # a folder per class: labelled
    for name in FIT_PHOTOS:
        (fit / name).mkdir(parents=True)
        img = _photo(name)
        img.save(fit / name / "a.jpg")
        ImageOps.mirror(img).save(fit / name / "b.jpg")
    return bench, fit


# (pipeline, descriptor size, mAP measured on this tiny benchmark). Each method must stay
# within 0.05 of its own figure, so that a broken method fails even where the others are at 1.
METHODS = [
    ("efficientnet_lite0/bn2,long96,SUM,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,AVE,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,RMAC3,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,SPP,L2", 21 * 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,CroW,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,SCDA,L2", 2 * 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,CAM3,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,MS3,GeM3,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,scales1-0.5,MAX,L2", 1280, 1.0),
    ("efficientnet_lite0/blocks.5+bn2,long96,GeM3,W0.3-0.7,L2", 192 + 1280, 1.0),
    ("efficientnet_lite0/blocks.5+bn2,long96,GeM3,Wlearn,L2", 192 + 1280, 1.0),
    ("efficientnet_lite0/head,crop96,L2,PCA8,L2", 8, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,POW0.5,L2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,PCAW8,L2", 8, 0.875),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,PCAWR8,L2", 8, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,PCAWS8-0.3,L2", 8, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,QE2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,aQE3a3", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,DBA2", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,KRR3", 1280, 1.0),
    ("efficientnet_lite0/bn2,long96,GeM3,L2,DBA2,DIFF3", 1280, 1.0),
    ("efficientnet_lite0/head,long96,regions:sliding2@64,BoW8d8,L2", 8, 0.823),
    ("efficientnet_lite0/head,long96,regions:sliding2@64,VLAD4d8,L2", 32, 0.948),
    ("efficientnet_lite0/bn2,long96,regions:proposals4@64,GeM3,FV2d8,L2", 32, 1.0),
]


@pytest.mark.parametrize("pipeline,dim,measured", METHODS, ids=[m[0].split(",", 1)[1] for m in METHODS])
def test_method_runs_end_to_end(data, pipeline, dim, measured):
    bench_dir, fit_dir = data
    bench = load_benchmark(bench_dir)
    ex = Extractor(resolve_spec(pipeline), threads=1)
    fit, labels = fit_set(fit_dir)
    result = evaluate(bench, ex, fit_on=fit if ex.needs_fit else None, fit_labels=labels, warn=lambda m: None)
    s = result.summary
    assert s["dim"] == dim
    assert s["pipeline"] == str(ex.spec) == pipeline
    assert s["map"] >= measured - 0.05, s


def test_multiscale_is_the_pooling_combination_of_single_scales(data):
    from cbir.pipeline import rescale_batch

    bench_dir, _ = data
    ms = Extractor(resolve_spec("efficientnet_lite0/bn2,long96,MS2,GeM3"), threads=1)
    one = Extractor(resolve_spec("efficientnet_lite0/bn2,long96,GeM3"), threads=1)
    img = ms.load(bench_dir / "database" / "coffee.jpg")[None]
    a = one.raw_descriptors(img)
    b = one.raw_descriptors(rescale_batch(img, 2 ** -0.5))
    ref = ((a**3 + b**3) / 2) ** (1 / 3)
    np.testing.assert_allclose(ms.raw_descriptors(img), ref, rtol=1e-4)


def test_spec_strings_round_trip_and_errors():
    s = "efficientnet_lite0/blocks.5+bn2,long512,MS3,GeM3,W0.3-0.7,L2,PCAWS64-0.2,L2,DBA5,aQE10a3"
    spec = PipelineSpec.parse(s)
    assert str(spec) == s and spec.layers == ("blocks.5", "bn2")
    assert spec.descriptor == s.rsplit(",DBA5", 1)[0]
    r = PipelineSpec.parse("efficientnet_lite0/head,long512,regions:proposals16@160,FV16d32,L2")
    assert r.regions == "regions:proposals16@160" and r.encoder == "FV16d32"
    for bad, msg in [("efficientnet_lite0/blocks.5+bn2,long512,GeM3,L2", "fusion"),
                     ("efficientnet_lite0/blocks.5+bn2,long512,GeM3,W0.5,L2", "weights for 2 layers"),
                     ("efficientnet_lite0,long512,GeM3,VLAD16,L2", "pairs"),
                     ("efficientnet_lite0,long512,GeM3,MS3,L2", "out of place"),
                     ("efficientnet_lite0,long512,GeM3,L2,DIFF,QE3", "last")]:
        with pytest.raises(PipelineError, match=msg):
            PipelineSpec.parse(bad)


def test_cam_needs_a_classifier():
    from cbir.pooling import parse_pooling

    ex = Extractor(resolve_spec("open_nsfw/relu48,long96,CAM,L2"), threads=1)
    with pytest.raises(PipelineError, match="classifier"):
        ex.pool_context(parse_pooling("CAM")[0])


def test_index_keeps_learned_state_and_search_reranks(data, tmp_path):
    from cbir.index import Searcher, update_index

    bench_dir, fit_dir = data
    pipe = "efficientnet_lite0/head,long96,regions:sliding2@64,VLAD4d8,L2,PCAW8,L2"
    update_index(bench_dir / "database", tmp_path / "idx", pipe, fit_on=fit_set(fit_dir)[0], warn=lambda m: None)
    s = Searcher(tmp_path / "idx")
    assert set(k.split(".")[0] for k in s.extractor.post_state()) == {"enc", "1"}
    q = bench_dir / "queries" / "coffee.jpg"
    plain = s.search(q, k=3)
    assert len(plain) == 3
    # the index's own vectors are what the re-loaded extractor computes
    ids, vecs = s.index.live()
    db_path = bench_dir / "database" / "coffee.jpg"
    row = [i for i, e in zip(ids, map(s.index.get, ids)) if e.path == str(db_path)][0]
    np.testing.assert_allclose(s.extractor.extract_one(db_path), s.index.vector(row), atol=1e-5)
    rr = Searcher(tmp_path / "idx", pipeline=s.index.pipeline + ",DBA2,QE1")
    rr.search(q, k=3)  # the first search builds the FAISS index from every vector, once
    # A re-ranked search then reads only the rows it needs, never the whole database...
    rr.index.live = lambda: (_ for _ in ()).throw(AssertionError("re-ranking copied the whole database"))
    hits = rr.search(q, k=3)
    assert len(hits) == 3 and hits[0].score >= hits[-1].score
    assert {h.path for h in hits} <= {e.path for e in s.index.entries().values()}
    # ...and, with the whole database in the shortlist, equals re-ranking the whole database.
    from cbir.rerank import rerank

    ref = rerank(s.extractor.extract_one(q)[None], vecs, rr.extractor.rerankers)[0]
    # (DBA makes each photo and its gray twin near-identical, so compare scores, not tie order.)
    row = {int(i): n for n, i in enumerate(ids)}
    np.testing.assert_allclose([h.score for h in hits], np.sort(ref)[::-1][:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([h.score for h in hits], [ref[row[h.id]] for h in hits], rtol=1e-4, atol=1e-5)

    from typer.testing import CliRunner

    from cbir.cli import app

    res = CliRunner().invoke(app, ["search", str(q), "--index", str(tmp_path / "idx"), "-k", "3", "--json",
                                   "--rerank", "DBA2,QE1"])
    assert res.exit_code == 0, res.output
    assert [r["path"] for r in json.loads(res.output)["results"]] == [h.path for h in hits]
    bad = CliRunner().invoke(app, ["search", str(q), "--index", str(tmp_path / "idx"), "--rerank", "KRR5,QE1"])
    assert bad.exit_code == 2 and "last" in bad.output


def test_compare_shares_forward_passes_and_matches_eval(data, tmp_path):
    from typer.testing import CliRunner

    from cbir.cli import app
    from cbir.compare import compare_pipelines

    bench_dir, fit_dir = data
    bench = load_benchmark(bench_dir)
    fit, labels = fit_set(fit_dir)
    methods = ["efficientnet_lite0/bn2,long96,GeM3,L2", "efficientnet_lite0/blocks.5,long96,MAX,L2",
               "efficientnet_lite0/blocks.5+bn2,long96,GeM3,Wlearn,L2", "efficientnet_lite0/bn2,long96,GeM3,L2,PCAW8,L2,QE1",
               "efficientnet_lite0/head,long96,regions:sliding2@64,VLAD4d8,L2", "efficientnet_lite0/bn2,long96,GeM3,PCA999"]
    rows = compare_pipelines(bench, methods, fit, labels, threads=1, warn=lambda m: None)
    assert [r["method"] for r in rows] == methods
    assert "error" in rows[-1] and "PCA" in rows[-1]["error"]
    for m, r in zip(methods[:-1], rows):
        ex = Extractor(resolve_spec(m), threads=1)
        ref = evaluate(bench, ex, fit_on=fit if ex.needs_fit else None, fit_labels=labels, warn=lambda m: None).summary
        assert abs(r["map"] - ref["map"]) < 1e-3 and r["dim"] == ref["dim"] and r["ms_per_image"] > 0

    md = tmp_path / "t.md"
    res = CliRunner().invoke(app, ["compare", str(bench_dir), "-m", methods[0] + ";" + methods[1], "--json",
                                   "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["best"] in methods[:2] and len(out["rows"]) == 2
    assert "| method | dim | mAP | mAP crop | ms/img |" in md.read_text()
