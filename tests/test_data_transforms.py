"""Tests of the training augmentation: boxes follow the pixels, cropped-away boxes are dropped, seeding works."""

import pytest
import torch
from torchvision.transforms import v2

from pix2seq_hf.data.transforms import (
    AUGMENTATION_PRESETS,
    AugmentationConfig,
    RandomCropToCanvas,
    apply_transforms,
    build_train_transforms,
)


CANVAS = 64


def _bright_region_box(image: torch.Tensor, channel: int | None = None) -> list[float] | None:
    """XYWH box around the pixels brighter than mid-grey (in `channel`, or in every channel), `None` when none."""
    plane = image.float()
    mask = plane[channel] > 127 if channel is not None else (plane > 127).all(dim=0)
    if channel is not None:
        others = [c for c in range(3) if c != channel]
        mask &= (plane[others] < 128).all(dim=0)
    if not mask.any():
        return None
    rows, cols = mask.nonzero(as_tuple=True)
    return [
        cols.min().item(),
        rows.min().item(),
        cols.max().item() + 1 - cols.min().item(),
        rows.max().item() + 1 - rows.min().item(),
    ]


def test_presets():
    assert AUGMENTATION_PRESETS["finetune"] == AugmentationConfig((0.3, 2.0), 0.5, 0.0)
    assert AUGMENTATION_PRESETS["scratch"] == AugmentationConfig((0.1, 3.0), 0.5, 0.5)
    assert AUGMENTATION_PRESETS["light"].scale_range == (0.8, 1.25)
    assert build_train_transforms("none", CANVAS) is None
    steps = build_train_transforms("finetune", CANVAS).transforms
    assert [type(step) for step in steps] == [
        v2.ScaleJitter,
        RandomCropToCanvas,
        v2.RandomHorizontalFlip,
        v2.ClampBoundingBoxes,
        v2.SanitizeBoundingBoxes,
    ]
    assert steps[0].scale_range == (0.3, 2.0) and steps[0].target_size == (CANVAS, CANVAS)
    scratch = build_train_transforms("scratch", CANVAS).transforms
    assert any(isinstance(step, v2.RandomGrayscale) for step in scratch)
    assert scratch[0].scale_range == (0.1, 3.0)


def test_bad_configs():
    with pytest.raises(ValueError, match="Unknown augmentation preset 'strong'"):
        build_train_transforms("strong", CANVAS)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentationConfig(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="hflip_prob"):
        AugmentationConfig(hflip_prob=1.5)
    with pytest.raises(ValueError, match="canvas_size"):
        build_train_transforms("finetune", 0)


@pytest.mark.parametrize("preset", ["finetune", "scratch"])
def test_boxes_stay_on_the_object(preset):
    # A white rectangle on black; after any augmentation the box must still frame the white pixels.
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    image[:, 12:42, 20:50] = 255
    transforms = build_train_transforms(preset, CANVAS)
    if preset == "scratch":  # colour distortion may grey the white box out of the threshold
        transforms = v2.Compose(
            [t for t in transforms.transforms if not isinstance(t, (v2.RandomApply, v2.RandomGrayscale))]
        )
    kept = 0
    for seed in range(40):
        out, boxes, labels = apply_transforms(
            transforms, image, torch.tensor([[20.0, 12, 30, 30]]), torch.tensor([3]), seed=seed
        )
        assert out.shape[0] == 3 and max(out.shape[-2:]) <= CANVAS
        white = _bright_region_box(out)
        if boxes.shape[0] == 0:
            # Dropped only when (almost) nothing of the rectangle is left in the crop.
            assert white is None or white[2] < 2 or white[3] < 2
            continue
        kept += 1
        assert labels.tolist() == [3]
        assert white is not None
        # Bilinear resizing blurs the edge by about a pixel; the box matches the white region within that.
        assert torch.allclose(boxes[0], torch.tensor(white, dtype=torch.float32), atol=1.5), (seed, boxes, white)
    assert kept > 20


def test_boxes_cropped_away_are_dropped_with_their_labels():
    # Red square top-left (label 0), green square bottom-right (label 1); at scale 2 a 64-pixel crop of the
    # 128-pixel image cannot hold both.
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0, 2:10, 2:10] = 255
    image[1, 54:62, 54:62] = 255
    boxes = torch.tensor([[2.0, 2, 8, 8], [54.0, 54, 8, 8]])
    transforms = build_train_transforms(AugmentationConfig(scale_range=(2.0, 2.0), hflip_prob=0.0), CANVAS)
    dropped = 0
    for seed in range(30):
        out, out_boxes, out_labels = apply_transforms(transforms, image, boxes, torch.tensor([0, 1]), seed=seed)
        assert tuple(out.shape) == (3, CANVAS, CANVAS)
        assert out_labels.numel() <= 1
        dropped += 2 - out_labels.numel()
        for label, channel in ((0, 0), (1, 1)):
            visible = _bright_region_box(out, channel)
            if label in out_labels.tolist():
                box = out_boxes[out_labels.tolist().index(label)]
                assert visible is not None
                assert torch.allclose(box, torch.tensor(visible, dtype=torch.float32), atol=1.5)
            else:
                # Gone from the labels only when gone from the pixels (or a sliver under a pixel wide).
                assert visible is None or min(visible[2:]) <= 1
    assert dropped >= 30


def test_crop_to_canvas_keeps_small_images_whole_and_partial_boxes_are_clipped():
    image = torch.zeros(3, 40, 100, dtype=torch.uint8)
    crop = v2.Compose([RandomCropToCanvas(CANVAS), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])
    seen_clipped = False
    for seed in range(20):
        out, boxes, _ = apply_transforms(crop, image, torch.tensor([[30.0, 5, 40, 20]]), torch.tensor([0]), seed=seed)
        assert tuple(out.shape) == (3, 40, CANVAS)  # height kept whole, width cut to the canvas
        if boxes.numel():
            x, y, w, h = boxes[0].tolist()
            assert x >= 0 and x + w <= CANVAS and (y, h) == (5, 20)
            seen_clipped |= w < 40
    assert seen_clipped


def test_seeded_augmentation_is_reproducible_and_leaves_global_rng_alone():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    boxes, labels = torch.tensor([[5.0, 5, 30, 20], [40, 10, 20, 30]]), torch.tensor([1, 2])
    transforms = build_train_transforms("scratch", CANVAS)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = apply_transforms(transforms, image, boxes, labels, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = apply_transforms(transforms, image, boxes, labels, seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    outputs = {tuple(apply_transforms(transforms, image, boxes, labels, seed=s)[0].shape) for s in range(8)}
    assert len(outputs) > 1  # different seeds, different augmentations


def test_no_jitter_config_fits_the_image_on_the_canvas():
    transforms = build_train_transforms(AugmentationConfig(scale_range=None, hflip_prob=1.0), CANVAS)
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    out, boxes, _ = apply_transforms(transforms, image, torch.tensor([[0.0, 0, 50, 50]]), torch.tensor([0]), seed=0)
    assert tuple(out.shape) == (3, 32, 64)
    assert torch.allclose(boxes, torch.tensor([[48.0, 0, 16, 16]]))  # scaled by 0.32 and flipped
