"""PSPNet localizer: the notes' PSP module, training on tiny synthetic folders, ONNX = torch,
bad input, and the shipped weights on museum-multi (skipped without ../shared)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from psp_fixtures import make_folder

from cbir.localize import LocalizerError, create_localizer
from cbir.models.pspnet import BINS, PSPConfig, PSPNet, StaticAdaptivePool, psp_module
from cbir.toolbox.layers import PPM
from cbir.train import TrainingError, load_checkpoint
from cbir.train.segmenter import SegmenterOptions, train

torch.set_num_threads(1)


# ---------------------------------------------------------------------- structure (notes)


def test_psp_module_matches_the_notes():
    """_PSPModule(in=320, pool_sizes=[1,2,3,6]): 4 stages of pool -> 1x1 conv (80) -> BN -> ReLU,
    concat with the input (320 + 4 * 80), 3x3 conv -> 80, BN, ReLU, Dropout2d(0.1)."""
    m = psp_module(320)
    ppm, drop = m[0], m[1]
    assert isinstance(ppm, PPM) and isinstance(drop, nn.Dropout2d) and drop.p == 0.1
    assert ppm.bins == BINS == (1, 2, 3, 6) and ppm.align_corners is True
    x = torch.randn(2, 320, 30, 30)
    for b, stage in zip(BINS, ppm.stages):
        pool, cbr = stage
        assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == b
        assert cbr.conv.kernel_size == (1, 1) and cbr.conv.in_channels == 320 and cbr.conv.out_channels == 80
        assert cbr.conv.bias is None and isinstance(cbr.bn, nn.BatchNorm2d) and isinstance(cbr.act, nn.ReLU)
        assert stage(x).shape == (2, 80, b, b)
    bott = ppm.bottleneck
    assert bott.conv.kernel_size == (3, 3) and bott.conv.padding == (1, 1)
    assert bott.conv.in_channels == 320 + 4 * 80 and bott.conv.out_channels == 80
    assert isinstance(bott.bn, nn.BatchNorm2d) and isinstance(bott.act, nn.ReLU)
    assert m(x).shape == (2, 80, 30, 30)


@pytest.mark.parametrize("n", [16, 24, 30, 32])
def test_static_pool_equals_adaptive_pool(n):
    x = torch.randn(2, 5, n, n)
    for b in BINS:
        assert torch.allclose(StaticAdaptivePool(b, (n, n))(x), nn.AdaptiveAvgPool2d(b)(x), atol=1e-6)


@pytest.mark.parametrize("stride", [16, 8])
def test_network_shapes(stride):
    net = PSPNet(PSPConfig(output_stride=stride, input_size=256), pretrained=True)
    x = torch.randn(2, 3, 256, 256)
    net.train()
    main, aux = net(x)
    g = 256 // stride
    assert main.shape == (2, 2, g, g) and aux.shape == (2, 2, g, g)
    net.eval()
    with torch.no_grad():
        f2, f4, f5, f6 = net.features(x[:1])
        assert (f2.shape[1:], f4.shape[1], f5.shape[1], f6.shape[1]) == ((24, 64, 64), 112, 192, 320)
        assert net(x[:1])[1] is None
    trained = net.trained_state(finetuned=False)
    assert all(k.startswith(("head.", "aux.")) for k in trained)


def test_edge_decoder_gives_logits_at_stride_4():
    net = PSPNet(PSPConfig(input_size=256, decoder=True), pretrained=True)
    net.train()
    main, aux = net(torch.randn(2, 3, 256, 256))
    assert main.shape == (2, 2, 64, 64) and aux.shape == (2, 2, 16, 16)
    trained = net.trained_state(finetuned=False)
    assert any(k.startswith("head.decoder.") for k in trained) and not any(k.startswith("head.classifier") for k in trained)
    main.sum().backward()
    assert net.head.decoder.low[0].weight.grad.abs().sum() > 0  # the stride-4 map reaches the logits


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("psp")
    folder = make_folder(root / "train", 6, seed=0)
    big = make_folder(root / "big", 6, seed=0, big=True)
    return root, folder, big


@pytest.fixture(scope="module")
def overfit(tiny):
    """Train the head on six photos and validate on the same six: it must overfit them."""
    root, _, big = tiny
    out = root / "out" / "psp.pt"
    opts = SegmenterOptions(epochs=15, batch=2, lr=1e-2, input_size=384, ema_decay=0.0, seed=0, border_weight=0)
    logs = []
    weights = train(big, big, out, opts, log=logs.append)
    return out, weights, logs


def test_training_overfits_a_handful_of_photos(overfit):
    out, weights, logs = overfit
    hist = weights["history"]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["val_iou"] > 0.9
    assert weights["val_figures"]["pixel_f1"] > 0.9
    assert (out.parent / "psp.pt.train" / "curves.png").is_file()
    assert (out.parent / "psp.pt.train" / "history.json").is_file()
    # Only what was trained ships, in float16: the head (no aux head, no backbone).
    assert all(k.startswith("head.") for k in weights["state"])
    assert out.stat().st_size < 3e6
    assert 0 < weights["threshold"] < 1 and weights["min_area"] > 0


def test_localizer_onnx_matches_torch(overfit, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    out, _, _ = overfit
    _, _, big = tiny
    photo = Image.open(big / "queries" / "q001.jpg").convert("RGB")
    a = create_localizer(f"pspnet:{out}")
    b = create_localizer(f"pspnet:{out}", engine="torch")
    pa, pb = a.probability(photo), b.probability(photo)
    assert pa.shape == (photo.height, photo.width)
    assert np.abs(pa - pb).max() < 1e-4
    assert list((tmp_path / "cache" / "onnx").glob("pspnet-*.onnx"))
    ra, rb = a(photo), b(photo)
    assert len(ra) == len(rb) == 1
    for r in ra:
        assert r.polygon.shape == (4, 2) and r.mask.shape == (photo.height, photo.width)
    np.testing.assert_allclose([r.box for r in ra], [r.box for r in rb], atol=1)


def test_edge_decoder_with_core_trains_on_two_folders_and_exports(tiny, tmp_path, monkeypatch):
    """The shipped variant (decoder + core channel), trained on two folders as one set, overfits
    both the mask and the cores, and runs the same on ONNX, core map included."""
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path / "cache"))
    root, _, big = tiny
    out = root / "decoder" / "psp.pt"
    opts = SegmenterOptions(epochs=12, batch=4, lr=1e-2, input_size=256, ema_decay=0.0, seed=0, border_weight=0,
                            decoder=True, core=True)
    w = train([big, big], big, out, opts, log=lambda m: None)
    assert w["data"]["train_photos"] == 12 and w["config"]["decoder"] and w["config"]["core"]
    assert w["history"][-1]["val_iou"] > 0.9 and w["history"][-1]["val_core_iou"] > 0.7
    assert w["state"]["head.decoder.classifier.weight"].shape[0] == 3  # 2 classes + the core
    assert w["core_level"] in (0.3, 0.5, 0.7)
    photo = Image.open(big / "queries" / "q001.jpg").convert("RGB")
    a, b = create_localizer(f"pspnet:{out}"), create_localizer(f"pspnet:{out}", engine="torch")
    (pa, ca), (pb, cb) = a.maps(photo), b.maps(photo)
    assert ca is not None and ca.shape == (photo.height, photo.width)
    assert np.abs(pa - pb).max() < 1e-4 and np.abs(ca - cb).max() < 1e-4
    # The core lies inside the painting's mask, and is smaller than it.
    assert (ca > 0.5).sum() < (pa > 0.5).sum() and ((ca > 0.5) & (pa > 0.5)).sum() > 0.9 * (ca > 0.5).sum()
    assert len(a(photo)) == 1


def test_core_target_keeps_touching_paintings_apart():
    from scipy import ndimage

    from cbir.train.segmenter import core_target, shrink_distance

    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert shrink_distance(square, 0.6) == pytest.approx(100 * 0.64 / 40)
    left, right = square + (5, 5), square + (15, 5)  # sharing an edge: one component as masks
    core = core_target([left, right], (32, 32), 0.6)
    assert ndimage.label(core)[1] == 2
    assert 0.2 * 100 < core.sum() / 2 < 0.6 * 100  # each core about (10 - 2 * 1.6)^2 cells
    tiny = np.array([[2, 2], [3, 2], [3, 3], [2, 3]], float)  # too small to shrink: its innermost pixel stays
    assert core_target([tiny], (8, 8), 0.6).sum() >= 1


def test_core_map_splits_a_merged_component():
    from cbir.localize.pspnet import regions_from_probability

    prob = np.zeros((100, 200), np.float32)
    prob[20:80, 20:100] = prob[20:80, 100:180] = 0.9  # two paintings that touch: one component
    core = np.zeros_like(prob)
    core[30:70, 30:90] = core[30:70, 110:170] = 0.9
    assert len(regions_from_probability(prob, 0.5, 0.01, split=False)) == 1
    regions = regions_from_probability(prob, 0.5, 0.01, core=core, core_level=0.5)
    assert sorted(r.box[0] for r in regions) == [20, 100]


def test_resume_after_a_killed_run(overfit, tiny):
    from cbir.train import atomic_save

    root, folder, _ = tiny
    out = root / "resume" / "psp.pt"
    opts = SegmenterOptions(epochs=3, batch=3, input_size=256, seed=1)
    train(folder, folder, out, opts, log=lambda m: None)
    ckpt = out.with_name("psp.pt.train") / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    state["epoch"], state["history"] = 0, state["history"][:1]  # as if killed after epoch 1
    atomic_save(state, ckpt)
    logs = []
    w = train(folder, folder, out, opts, log=logs.append)
    assert any("resuming from epoch 2/3" in m for m in logs)
    assert len(w["history"]) == 3
    # Other options against that checkpoint: refused, not mixed.
    with pytest.raises(TrainingError, match="other options"):
        train(folder, folder, out, SegmenterOptions(epochs=5, batch=3, input_size=256, seed=1), log=lambda m: None)


# ---------------------------------------------------------------------------- bad input


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_training_folder_without_masks(tmp_path):
    folder = make_folder(tmp_path / "nomask", 2, masks=False)
    out = tmp_path / "out" / "w.pt"
    with pytest.raises(TrainingError, match="has no mask") as e:
        train(folder, folder, out, SegmenterOptions(epochs=1, input_size=256))
    _one_line(e)
    assert not (tmp_path / "out").exists()


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims ``w x h`` (no pixel data needed to be refused)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("size,match", [((1, 1), "too small"), ((20000, 20000), "over the limit")])
def test_training_photo_too_small_or_huge(tmp_path, size, match):
    folder = make_folder(tmp_path / "bad", 2)
    gt = json.loads((folder / "gt.json").read_text())
    bad = folder / gt["queries"][1]["image"]
    if size == (1, 1):
        Image.new("RGB", size).save(bad)
    else:
        _png_header(bad, *size)
    out = tmp_path / "out" / "w.pt"
    with pytest.raises(TrainingError, match=match) as e:
        train(folder, folder, out, SegmenterOptions(epochs=1, input_size=256))
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_and_weights(tiny, overfit, tmp_path):
    root, folder, _ = tiny
    out = tmp_path / "w.pt"
    ckpt = tmp_path / "w.pt.train" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TrainingError, match="not a readable checkpoint") as e:
        train(folder, folder, out, SegmenterOptions(epochs=1, input_size=256))
    _one_line(e)
    assert not out.exists() and sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(LocalizerError) as e:
        create_localizer(f"pspnet:{bad}")
    _one_line(e)
    with pytest.raises(LocalizerError, match="not found") as e:
        create_localizer(f"pspnet:{tmp_path / 'missing.pt'}")


@pytest.mark.parametrize("size", [(1, 1), (20000, 40)])
def test_localizer_refuses_tiny_or_sliver_photos(overfit, size):
    out, _, _ = overfit
    loc = create_localizer(f"pspnet:{out}", engine="torch")
    with pytest.raises(LocalizerError, match="too small or too elongated") as e:
        loc(Image.new("RGB", size))
    _one_line(e)


def test_cli_error_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cbir.cli import app

    folder = make_folder(tmp_path / "nomask", 2, masks=False)
    r = CliRunner().invoke(app, ["train", "segmenter", "--data", str(folder), "--val", str(folder),
                                 "--out", str(tmp_path / "w.pt")])
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no mask" in lines[0]


# --------------------------------------------------------------- shipped weights (museum)


def test_shipped_weights_floor_on_museum_multi():
    """The shipped model on the 90 museum-multi photos, a little under the measured figures."""
    from conftest import shared_benchmark

    from cbir.metrics.detection import DetectionMAP

    root = shared_benchmark("museum-multi")
    loc = create_localizer("pspnet")
    gt = json.loads((root / "gt.json").read_text())
    f1s, counts, preds, targets = [], [], [], []
    for q in gt["queries"]:
        photo = Image.open(root / q["image"]).convert("RGB")
        regions = loc(photo)
        mask = np.asarray(Image.open(root / q["mask"]).convert("L")) > 127
        pm = np.zeros_like(mask)
        for r in regions:
            pm |= r.mask
        f1s.append(2 * (pm & mask).sum() / max(pm.sum() + mask.sum(), 1))
        counts.append(len(regions) == len(q["objects"]))
        preds.append({"boxes": np.array([r.box for r in regions]).reshape(-1, 4),
                      "scores": np.array([r.score for r in regions]), "labels": np.zeros(len(regions), int)})
        targets.append({"boxes": np.array([o["bbox"] for o in q["objects"]], float).reshape(-1, 4),
                        "labels": np.zeros(len(q["objects"]), int)})
    m = DetectionMAP(style="coco")
    m.update(preds, targets)
    ap50 = m.compute()["map_50"]
    assert np.mean(f1s) >= FLOOR["pixel_f1"], np.mean(f1s)
    assert ap50 >= FLOOR["det_ap50"], ap50
    assert np.mean(counts) >= FLOOR["count_accuracy"], np.mean(counts)


# Measured figures minus a margin (round 4: pixel F1 0.968, det AP50 0.970, count 0.978;
# docs/pspnet.md).
FLOOR = {"pixel_f1": 0.96, "det_ap50": 0.95, "count_accuracy": 0.95}
