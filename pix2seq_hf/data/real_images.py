"""
A small real-photograph detection set with many objects per image, built reproducibly from a photograph that
scikit-image ships (`skimage.data.coins()`: 24 coins on a grey background, public domain; see `skimage.data`), for
benchmarks beside the synthetic sets.

The coins are found by a classical segmentation (Sobel edges, a watershed from dark-background and bright-coin markers,
holes filled, connected components), so every box is a coin's extent in the photograph. The top half of the photograph
(12 coins) feeds the training images and the bottom half (the other 12) the validation images, so validation shows
coins never trained on. Each image is a 2x2 mosaic of square crops of its half, each flipped, turned by a multiple of
90 degrees, rescaled and jittered in brightness and contrast; a coin cut by a crop keeps the box of its visible part,
and one with less than `MIN_VISIBLE_FRACTION` of it visible becomes an ignore region (`iscrowd` 1: not trained on, not
counted at evaluation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


# The photograph's coins lie in four rows; this row of pixels runs between the second and the third.
SPLIT_ROW = 150
# A coin cut by a crop is a box of its own when at least this share of it is visible, else an ignore region.
MIN_VISIBLE_FRACTION = 0.4
CATEGORIES = [{"id": 1, "name": "coin"}]


def _require_skimage():
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise ImportError(
            "The coins set is built from scikit-image's sample photograph: `pip install scikit-image` (or the "
            "`benchmark` extra, `pip install -e .[benchmark]`)."
        ) from None


def segment_coins() -> tuple[np.ndarray, np.ndarray]:
    """
    The coins photograph and its coins: Sobel edges flooded by a watershed from markers on the dark background (< 30)
    and on bright coin pixels (> 150), holes filled, connected components of at least 100 pixels.

    Returns:
        `(image, labels)`: the grayscale photograph (uint8, 303 x 384) and an int32 map of the same size, 0 on the
        background and `1..24` on the coins.
    """
    _require_skimage()
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    image = data.coins()
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[image < 30] = 1
    markers[image > 150] = 2
    flooded = segmentation.watershed(filters.sobel(image), markers)
    labels = measure.label(ndimage.binary_fill_holes(flooded == 2))
    small = np.bincount(labels.ravel()) < 100
    small[0] = False
    return image, measure.label(np.where(small[labels], 0, labels) > 0).astype(np.int32)


def _tile(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator):
    """A random square crop of `image`/`labels`, flipped, turned, rescaled to `size` and jittered; with the coin areas."""
    height, width = image.shape
    side = int(rng.integers(min(96, height), min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop, crop_labels = image[top : top + side, left : left + side], labels[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop, crop_labels = crop[:, ::-1], crop_labels[:, ::-1]
    turns = int(rng.integers(0, 4))
    crop, crop_labels = np.rot90(crop, turns), np.rot90(crop_labels, turns)
    pixels = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    tile_labels = np.array(Image.fromarray(np.ascontiguousarray(crop_labels)).resize((size, size), Image.NEAREST))
    contrast, brightness = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    pixels = np.clip((np.asarray(pixels, dtype=np.float32) - 128) * contrast + 128 + brightness, 0, 255)
    return pixels.astype(np.uint8), tile_labels, (size / side) ** 2


def _objects(tile_labels: np.ndarray, full_areas: dict[int, int], scale: float, offset: tuple[int, int]) -> list[dict]:
    """COCO annotations (without ids) of the coins visible in a tile placed at `offset` (x, y) of the mosaic."""
    objects = []
    for coin in np.unique(tile_labels):
        if coin == 0:
            continue
        rows, columns = np.nonzero(tile_labels == coin)
        x0, y0 = int(columns.min()), int(rows.min())
        width, height = int(columns.max()) + 1 - x0, int(rows.max()) + 1 - y0
        visible = len(rows) / (full_areas[int(coin)] * scale)
        objects.append(
            {
                "bbox": [x0 + offset[0], y0 + offset[1], width, height],
                "area": float(len(rows)),
                "category_id": 1,
                "iscrowd": int(visible < MIN_VISIBLE_FRACTION),
            }
        )
    return objects


def _write_split(
    folder: Path, name: str, count: int, image: np.ndarray, labels: np.ndarray, image_size: int, seed: int
) -> Path:
    rng = np.random.default_rng(seed)
    full_areas = {int(coin): int(area) for coin, area in zip(*np.unique(labels, return_counts=True)) if coin}
    half = image_size // 2
    images, annotations = [], []
    for index in range(count):
        mosaic = np.zeros((image_size, image_size), dtype=np.uint8)
        image_id = index + 1
        for row in range(2):
            for column in range(2):
                pixels, tile_labels, scale = _tile(image, labels, half, rng)
                mosaic[row * half : (row + 1) * half, column * half : (column + 1) * half] = pixels
                for entry in _objects(tile_labels, full_areas, scale, (column * half, row * half)):
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **entry})
        file_name = f"{name}_{image_id:03d}.png"
        Image.fromarray(mosaic).convert("RGB").save(folder / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def build_coins_dataset(
    folder: str | os.PathLike,
    num_train: int = 48,
    num_validation: int = 16,
    image_size: int = 384,
    seed: int = 0,
) -> dict[str, str]:
    """
    Writes the coins detection set (see the module docstring) as COCO jsons and PNG images into `folder`.

    Args:
        folder (`str` or `os.PathLike`): where `train.json`, `validation.json` and `images/` go (created if needed).
        num_train / num_validation (`int`, *optional*, defaults to 48 / 16): images of each split.
        image_size (`int`, *optional*, defaults to 384): side of the square images (even; each holds 2x2 tiles).
        seed (`int`, *optional*, defaults to 0): the crops and jitter; the same seed writes the same set.

    Returns:
        `dict` with `train_annotations`, `validation_annotations` and `images` (the folder both jsons refer to), the
        `examples/train.py` options `--coco_annotations`, `--validation_coco_annotations` and
        `--coco_images` / `--validation_coco_images`.

    Raises:
        `ImportError` without scikit-image; `ValueError` for a count below 1 or an odd or too small `image_size`.
    """
    if num_train < 1 or num_validation < 1:
        raise ValueError(f"num_train and num_validation must be at least 1, got {num_train!r} and {num_validation!r}.")
    if image_size < 32 or image_size % 2:
        raise ValueError(f"image_size must be an even number of at least 32, got {image_size!r}.")
    image, labels = segment_coins()
    shared = (set(np.unique(labels[:SPLIT_ROW])) & set(np.unique(labels[SPLIT_ROW:]))) - {0}
    if shared:
        raise RuntimeError(f"Coins {sorted(shared)} lie across row {SPLIT_ROW}, which should separate the splits.")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    top = (image[:SPLIT_ROW], labels[:SPLIT_ROW])
    bottom = (image[SPLIT_ROW:], labels[SPLIT_ROW:])
    train = _write_split(folder, "train", num_train, *top, image_size, seed)
    validation = _write_split(folder, "validation", num_validation, *bottom, image_size, seed + 1)
    return {"train_annotations": str(train), "validation_annotations": str(validation), "images": str(folder / "images")}


__all__ = ["build_coins_dataset", "segment_coins"]
