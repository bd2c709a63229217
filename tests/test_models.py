"""Backbones and engines: the weight mapping, ImageNet sanity, ONNX == PyTorch, the export cache."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.images import Resize, open_image, to_array
from cbir.models import BackboneError, create_engine, get_backbone, list_backbones
from cbir.models.backbones import lukemelas_to_timm
from cbir.models.engine import onnx_cache_path

from conftest import skimage_photo


def _imagenet_input(name: str) -> np.ndarray:
    import io

    buf = io.BytesIO()
    skimage_photo(name, 600).save(buf, "PNG")
    return to_array(open_image(buf.getvalue(), Resize("crop", 224)))[None]


def test_lite0_checkpoint_maps_onto_timm_by_position_and_shape():
    import timm
    import torch

    bb = get_backbone("efficientnet_lite0")
    state = torch.load(bb.weights, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = lukemelas_to_timm(state, model.state_dict())
    assert list(state)[0] == "_conv_stem.weight" and list(mapped)[0] == "conv_stem.weight"
    assert len(mapped) == len(model.state_dict()) == 296
    model.load_state_dict(mapped, strict=True)  # raises on any missing or unexpected key
    for (k_src, v), k_dst in zip(state.items(), mapped):
        assert mapped[k_dst] is v, (k_src, k_dst)


def test_mapping_refuses_a_mismatched_checkpoint():
    import torch

    with pytest.raises(BackboneError, match="does not match"):
        lukemelas_to_timm({"a": torch.zeros(3)}, {"b": torch.zeros(4)})


@pytest.mark.parametrize("engine", ["onnx", "torch"])
@pytest.mark.parametrize("photo,classes", [("chelsea", range(281, 286)), ("coffee", [967, 968, 504])])
def test_lite0_imagenet_top1_is_sensible(engine, photo, classes):
    # 281-285 are the domestic cats (285 Egyptian cat); 967 espresso, 968 cup, 504 coffee mug.
    eng = create_engine(get_backbone("efficientnet_lite0"), ["logits"], engine)
    (logits,) = eng.run(_imagenet_input(photo))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in classes


def test_onnx_equals_torch_on_any_input_size():
    bb = get_backbone("efficientnet_lite0")
    layers = ["blocks.5", "bn2", "head"]
    onnx_eng, torch_eng = create_engine(bb, layers, "onnx"), create_engine(bb, layers, "torch")
    rng = np.random.default_rng(0)
    for h, w in [(224, 224), (181, 317), (400, 96)]:
        batch = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        a, b = onnx_eng.run(batch), torch_eng.run(batch)
        assert [x.shape for x in a] == [x.shape for x in b]
        assert a[0].shape[:2] == (2, 192) and a[1].shape[:2] == (2, 1280) and a[2].shape == (2, 1280)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_export_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_CACHE_DIR", str(tmp_path))
    bb = get_backbone("efficientnet_lite0")
    p1 = onnx_cache_path(bb, ["bn2"])
    assert str(p1).startswith(str(tmp_path)) and not p1.exists()
    create_engine(bb, ["bn2"], "onnx")
    assert p1.exists()
    mtime = p1.stat().st_mtime_ns
    create_engine(bb, ["bn2"], "onnx")  # second use: no re-export
    assert p1.stat().st_mtime_ns == mtime
    assert onnx_cache_path(bb, ["blocks.5"]) != p1
    assert not list(tmp_path.rglob("*.tmp"))


def test_open_nsfw_takes_any_input_size():
    bb = get_backbone("open_nsfw")
    eng = create_engine(bb, ["relu48", "head"], "onnx")
    for h, w in [(224, 224), (320, 480)]:
        maps, head = eng.run(np.zeros((1, h, w, 3), np.uint8))
        assert maps.shape[:2] == (1, 1024) and maps.shape[2] == h // 32 and head.shape == (1, 1024)
        # The graph's own head is the spatial mean of the last map.
        np.testing.assert_allclose(maps.mean(axis=(2, 3)), head, rtol=1e-4, atol=1e-4)


def test_open_nsfw_has_no_torch_form():
    with pytest.raises(BackboneError, match="no PyTorch form"):
        create_engine(get_backbone("open_nsfw"), ["relu48"], "torch")


def test_unknown_backbone_layer_and_engine_are_named():
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        get_backbone("nope")
    with pytest.raises(BackboneError, match="no layer 'blocks.9'"):
        create_engine(get_backbone("efficientnet_lite0"), ["blocks.9"])
    with pytest.raises(BackboneError, match="unknown engine 'tpu'"):
        create_engine(get_backbone("efficientnet_lite0"), ["bn2"], "tpu")


def test_timm_model_from_a_local_weights_file(tmp_path):
    import timm
    import torch

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    bb = get_backbone("timm:resnet18", path)
    assert bb.default_layer == "layer4"
    (maps,) = create_engine(bb, ["layer4"], "torch").run(np.zeros((1, 64, 96, 3), np.uint8))
    assert maps.shape == (1, 512, 2, 3)


def test_timm_hub_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = get_backbone("timm:resnet10t")
    with pytest.raises(BackboneError, match="could not download weights.*--weights"):
        bb.model()


def test_models_listing_says_what_is_present():
    rows = {r["name"]: r for r in list_backbones()}
    assert rows["efficientnet_lite0"]["present"] is True
    assert rows["open_nsfw"]["present"] is True
