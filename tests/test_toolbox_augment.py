"""Bag-of-freebies augmentation: boxes stay inside the image, masks stay aligned, types round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.toolbox import augment as A


def _sample(
    h: int = 60,
    w: int = 80,
    objects: tuple[tuple[int, int, int, int], ...] = ((10, 15, 40, 45), (50, 5, 75, 30)),
) -> dict:
    """Image whose red channel is 255 exactly on the objects; mask = object index + 1."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = 60  # some texture-free colour elsewhere
    mask = np.zeros((h, w), np.int64)
    for k, (x1, y1, x2, y2) in enumerate(objects):
        img[y1:y2, x1:x2, 0] = 255
        mask[y1:y2, x1:x2] = k + 1
    return {
        "image": img,
        "boxes": np.array(objects, np.float32).reshape(-1, 4),
        "labels": np.arange(1, len(objects) + 1),
        "mask": mask,
    }


def _assert_consistent(out: dict, box_tol: float = 1.5, enclose_only: bool = False) -> None:
    """Boxes inside the image; each box matches its object's mask; the mask matches the image.

    ``enclose_only``: the box only has to contain the object (a rotated box cut by a crop
    is looser than the object: the usual cost of axis-aligned boxes).
    """
    img, mask, boxes = out["image"], out["mask"], out["boxes"]
    h, w = mask.shape
    assert img.shape[:2] == (h, w)
    assert len(boxes) == len(out["labels"])
    if len(boxes):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    for box, label in zip(boxes, out["labels"]):
        ys, xs = np.nonzero(mask == label)
        assert len(ys), f"box {box} of label {label} has no mask pixels"
        mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        if enclose_only:
            assert (box[:2] <= mask_box[:2] + box_tol).all() and (box[2:] >= mask_box[2:] - box_tol).all()
        else:
            np.testing.assert_allclose(box, mask_box, atol=box_tol)
    # Image and mask say the same thing about where the objects are.
    agree = ((img[..., 0] > 127) == (mask > 0)).mean()
    assert agree > 0.98, agree


GEOMETRIC = [
    A.HorizontalFlip(p=1.0),
    A.VerticalFlip(p=1.0),
    A.RandomScale((0.5, 1.7)),
    A.RandomCrop(),
    A.RandomCrop(size=(50, 50)),
    A.RandomCrop(size=(90, 100)),  # larger than the image: padded
    A.RandomRotation(degrees=25),
    A.Compose(
        [A.RandomScale((0.7, 1.3)), A.RandomRotation(15), A.HorizontalFlip(), A.RandomCrop(scale=(0.5, 1.0))]
    ),
]


@pytest.mark.parametrize("transform", GEOMETRIC, ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("seed", range(4))
def test_geometric_transforms_keep_boxes_and_masks_consistent(transform: A.Transform, seed: int) -> None:
    out = transform(_sample(), rng=seed)
    # Rotation: the box encloses the rotated box corners, which is the rotated object's extent.
    rotated = "Rotation" in repr(transform)
    _assert_consistent(out, box_tol=2.0 if rotated else 1.5, enclose_only=isinstance(transform, A.Compose))


def test_flip_formula_and_involution() -> None:
    s = _sample()
    out = A.HorizontalFlip(p=1.0)(s)
    np.testing.assert_array_equal(out["boxes"][0], [80 - 40, 15, 80 - 10, 45])
    back = A.HorizontalFlip(p=1.0)(out)
    np.testing.assert_array_equal(back["image"], s["image"])
    np.testing.assert_array_equal(back["boxes"], s["boxes"])
    out = A.VerticalFlip(p=1.0)(s)
    np.testing.assert_array_equal(out["boxes"][1], [50, 60 - 30, 75, 60 - 5])


def test_crop_keeps_exactly_the_boxes_still_visible() -> None:
    s = _sample()
    areas = {k: (s["mask"] == k).sum() for k in (1, 2)}
    crop = A.RandomCrop(size=(40, 45))
    for seed in range(10):
        out = crop(s, rng=seed)
        _assert_consistent(out)
        for k in (1, 2):
            ys, xs = np.nonzero(out["mask"] == k)
            visible = (
                len(ys) >= 1 and np.ptp(ys) + 1 >= 2 and np.ptp(xs) + 1 >= 2 and len(ys) >= 0.1 * areas[k]
            )
            assert (k in out["labels"]) == visible, (seed, k)


def test_scale_changes_size_and_boxes_together() -> None:
    out = A.RandomScale((2.0, 2.0))(_sample())
    assert out["image"].shape == (120, 160, 3)
    np.testing.assert_allclose(out["boxes"][0], [20, 30, 80, 90])


@pytest.mark.parametrize("seed", range(3))
def test_mosaic_places_four_images_consistently(seed: int) -> None:
    samples = []
    for k in range(4):
        s = _sample(objects=((10 + 3 * k, 12, 40 + 3 * k, 44),))
        s["labels"] = np.array([k + 1])
        s["mask"] = (s["mask"] > 0) * (k + 1)
        samples.append(s)
    out = A.Mosaic(output_size=(128, 160))(samples, rng=seed)
    assert out["image"].shape == (128, 160, 3) and out["mask"].shape == (128, 160)
    assert len(out["boxes"]) >= 1
    _assert_consistent(out)


def test_cutmix_pastes_image_mask_and_boxes_together() -> None:
    a = _sample(objects=((5, 5, 30, 30),))
    b = _sample(objects=((40, 20, 70, 50),))
    b["labels"], b["mask"] = np.array([2]), (b["mask"] > 0) * 2
    for seed in range(5):
        out = A.CutMix(alpha=1.0)(a, b, rng=seed)
        _assert_consistent(out)
        pasted = (out["image"] != a["image"]).any(-1) | (out["mask"] != a["mask"])
        frac = 1.0 - out["cutmix_lambda"]
        assert pasted.mean() <= frac + 1e-9


def test_mixup_blends_and_keeps_all_boxes() -> None:
    a = {
        "image": np.full((8, 8, 3), 200, np.uint8),
        "boxes": np.array([[0, 0, 4, 4]], np.float32),
        "labels": np.array([1]),
    }
    b = {
        "image": np.full((8, 8, 3), 100, np.uint8),
        "boxes": np.array([[2, 2, 8, 8]], np.float32),
        "labels": np.array([2]),
    }
    out = A.MixUp(alpha=2.0)(a, b, rng=1)
    lam = out["mixup_lambda"]
    assert 0 < lam < 1
    np.testing.assert_allclose(out["image"].astype(float), np.rint(200 * lam + 100 * (1 - lam)), atol=0.5)
    np.testing.assert_array_equal(out["labels"], [1, 2])
    np.testing.assert_allclose(out["weights"], [lam, 1 - lam], rtol=1e-6)
    with pytest.raises(ValueError, match="same size"):
        A.MixUp()(a, {"image": np.zeros((9, 8, 3), np.uint8)})


OCCLUSION = [
    A.RandomErasing(p=1.0),
    A.Cutout(size=0.3, n_holes=2),
    A.HideAndSeek(grid_sizes=(16,)),
    A.GridMask(p=1.0),
    A.GridMask(p=1.0, rotate=30),
]


@pytest.mark.parametrize("transform", OCCLUSION, ids=lambda t: type(t).__name__)
def test_occlusion_changes_pixels_only(transform: A.Transform) -> None:
    s = _sample()
    out = transform(s, rng=0)
    np.testing.assert_array_equal(out["boxes"], s["boxes"])
    np.testing.assert_array_equal(out["mask"], s["mask"])
    assert out["image"].shape == s["image"].shape and out["image"].dtype == np.uint8
    assert (out["image"] != s["image"]).any()


def test_gridmask_keep_ratio() -> None:
    gm = A.GridMask(d_range=(0.2, 0.2), ratio=0.6)
    keep = gm.grid(200, 200, np.random.default_rng(0))
    assert abs(keep.mean() - (1 - (1 - 0.6) ** 2)) < 0.03


def test_cutout_hole_size() -> None:
    s = {"image": np.full((50, 50, 3), 255, np.uint8)}
    out = A.Cutout(size=10, fill=0.0)(s, rng=0)
    assert "boxes" not in out
    zero = (out["image"] == 0).all(-1)
    assert 0 < zero.sum() <= 100


def test_photometric_changes_pixels_only_and_stays_in_range() -> None:
    s = _sample()
    t = A.Compose([A.ColorJitter(0.4, 0.4, 0.4, 0.1), A.GaussianNoise(0.05, p=1.0)])
    out = t(s, rng=3)
    np.testing.assert_array_equal(out["boxes"], s["boxes"])
    np.testing.assert_array_equal(out["mask"], s["mask"])
    assert out["image"].dtype == np.uint8 and (out["image"] != s["image"]).any()
    f = {"image": torch.rand(3, 16, 16)}
    outf = t(f, rng=3)["image"]
    assert outf.min() >= 0 and outf.max() <= 1


def test_hsv_round_trip_and_hue_shift() -> None:
    rgb = np.random.default_rng(0).random((10, 10, 3))
    np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(rgb)), rgb, atol=1e-9)
    red = np.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-9)
    np.testing.assert_allclose(A.adjust_saturation(red, 0.0), np.full((1, 1, 3), 0.299))


def test_tensor_samples_round_trip() -> None:
    s = _sample()
    t = {
        "image": torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255,
        "boxes": torch.from_numpy(s["boxes"]),
        "labels": torch.from_numpy(s["labels"]),
        "mask": torch.from_numpy(s["mask"]),
    }
    out = A.Compose([A.HorizontalFlip(p=1.0), A.RandomScale((1.5, 1.5))])(t, rng=0)
    assert isinstance(out["image"], torch.Tensor) and out["image"].shape == (3, 90, 120)
    assert out["image"].dtype == torch.float32 and isinstance(out["boxes"], torch.Tensor)
    assert out["labels"].dtype == torch.int64 and out["mask"].dtype == torch.int64
    ref = A.Compose([A.HorizontalFlip(p=1.0), A.RandomScale((1.5, 1.5))])(s, rng=0)
    np.testing.assert_allclose(out["boxes"].numpy(), ref["boxes"])
    np.testing.assert_array_equal(out["mask"].numpy(), ref["mask"])


def test_same_seed_same_output_and_input_untouched() -> None:
    s = _sample()
    before = s["image"].copy()
    t = A.Compose([A.RandomRotation(20), A.ColorJitter(), A.RandomErasing(p=1.0)])
    o1, o2 = t(s, rng=7), t(s, rng=7)
    np.testing.assert_array_equal(o1["image"], o2["image"])
    np.testing.assert_array_equal(o1["boxes"], o2["boxes"])
    np.testing.assert_array_equal(s["image"], before)
