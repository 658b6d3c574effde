"""
A synthetic detection set of coloured shapes on textured backgrounds, made in code (no download), for smoke tests,
CPU experiments and the default run of `examples/train.py`.

How an image is made (every random draw comes from a NumPy generator seeded with `(seed, split, index)`, so an image
depends only on those three numbers: the same seed gives byte-identical images, whatever `num_images` is):

1. Background: a random base colour with one texture, chosen uniformly: a linear gradient to a second colour,
   sinusoidal stripes, per-pixel Gaussian noise, or a checkerboard. Textures are of low contrast (tens of grey
   levels), so that they never look like objects.
2. Objects: 1 to 10 (uniform), each of a uniform random class. The class is the shape: circle, square, triangle
   (apex up), cross, ring (and diamond with `num_classes=6`). Each shape has a random size (between
   `min_object_size` and `max_object_size` of the image side, capped when there are many objects so that they fit),
   a mild random aspect ratio (up to 1.25:1), a random position inside the image, and a random flat colour chosen
   far from the background under it (L1 distance of at least 180 over RGB), so colour carries no class information
   and every shape stands out. Objects may overlap (IoU up to `max_overlap`); later ones are painted on top. The box
   is the tight box of the shape's pixels, its area the number of pixels.

The shapes differ in their outline (round, straight, pointed, hollow) and stand out from their background, so that
a small model can learn them on a CPU: `examples/train.py` with no dataset argument trains the `tiny` preset on this
set (what that run reaches is in docs/training.md).
"""

from __future__ import annotations

import io
import math
import zlib

import datasets
import numpy as np
import PIL.Image

from .schema import detection_features


SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
_TEXTURES = ("gradient", "stripes", "noise", "checker")
_MIN_COLOUR_DISTANCE = 180
_MAX_PLACEMENT_TRIES = 50

# Named variants of the set: the arguments of `make_synthetic_detection_dataset` each one sets.
SYNTHETIC_VARIANTS: dict[str, dict] = {
    # The default: 128 px, 1 to 10 objects of 10-40 % of the image side.
    "shapes": {},
    # Dense scenes: 384 px, 20 to 60 small objects of 3-10 % of the side (about 12 to 38 pixels).
    "dense": {"image_size": 384, "min_objects": 20, "max_objects": 60, "min_object_size": 0.03, "max_object_size": 0.1},
}


def _shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean `[height, width]` mask of `shape` inscribed in a `width x height` box (pixel centres sampled)."""
    v = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5
    u = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5
    radius2 = u * u + v * v
    if shape == "circle":
        return radius2 <= 0.25
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":
        return np.abs(u) <= (v + 0.5) / 2
    if shape == "cross":
        return (np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6)
    if shape == "ring":
        return (radius2 <= 0.25) & (radius2 >= 0.3**2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 0.5
    raise ValueError(f"Unknown shape {shape!r}; known shapes are {SHAPE_NAMES}.")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A `[size, size, 3]` float32 background in [0, 255] with one low-contrast texture."""
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    texture = _TEXTURES[rng.integers(len(_TEXTURES))]
    if texture == "gradient":
        other = base + rng.uniform(-60, 60, size=3).astype(np.float32)
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        image = base + t[..., None] * (other - base)
    elif texture == "stripes":
        amplitude, period, phase = rng.uniform(10, 30), rng.uniform(6, 20), rng.uniform(0, 2 * math.pi)
        image = base + (amplitude * np.sin(2 * math.pi * along / period + phase))[..., None]
    elif texture == "noise":
        image = base + rng.normal(0, rng.uniform(6, 16), size=(size, size, 3)).astype(np.float32)
    else:
        cell, amplitude = int(rng.integers(6, 17)), rng.uniform(10, 25)
        sign = ((x.astype(np.int64) // cell + y.astype(np.int64) // cell) % 2) * 2 - 1
        image = base + (amplitude * sign)[..., None]
    return np.clip(image, 0, 255)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at L1 distance >= `_MIN_COLOUR_DISTANCE` from `under` (the mean colour below the shape)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - under).sum() >= _MIN_COLOUR_DISTANCE:
            return colour.astype(np.float32)
    return np.where(under > 127.5, 0.0, 255.0).astype(np.float32)


def _iou(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> float:
    """IoU of two `(x, y, w, h)` placement boxes (used only to space objects out while drawing)."""
    x0, y0 = max(box[0], other[0]), max(box[1], other[1])
    x1, y1 = min(box[0] + box[2], other[0] + other[2]), min(box[1] + box[3], other[1] + other[3])
    intersection = max(0, x1 - x0) * max(0, y1 - y0)
    return intersection / (box[2] * box[3] + other[2] * other[3] - intersection)


def render_synthetic_image(
    rng: np.random.Generator,
    image_size: int,
    num_classes: int,
    min_objects: int,
    max_objects: int,
    min_object_size: float,
    max_object_size: float,
    max_overlap: float,
) -> tuple[np.ndarray, list[list[float]], list[int], list[float]]:
    """
    Draws one image (see the module docstring).

    Returns:
        `(image, boxes, labels, areas)`: a `uint8 [image_size, image_size, 3]` array, tight `[x, y, w, h]` boxes,
        class labels (indices into `SHAPE_NAMES`) and pixel areas.
    """
    image = _background(rng, image_size)
    wanted = int(rng.integers(min_objects, max_objects + 1))
    # Many objects get smaller on average, so that they fit with little overlap.
    upper = min(max_object_size, max(min_object_size, math.sqrt(0.6 / wanted)))
    placed: list[tuple[int, int, int, int]] = []
    boxes, labels, areas = [], [], []
    for _ in range(wanted):
        for _ in range(_MAX_PLACEMENT_TRIES):
            label = int(rng.integers(num_classes))
            side = rng.uniform(min_object_size, upper) * image_size
            aspect = math.exp(rng.uniform(-math.log(1.25), math.log(1.25)))
            width = int(np.clip(round(side * math.sqrt(aspect)), 4, image_size))
            height = int(np.clip(round(side / math.sqrt(aspect)), 4, image_size))
            x, y = int(rng.integers(0, image_size - width + 1)), int(rng.integers(0, image_size - height + 1))
            candidate = (x, y, width, height)
            if all(_iou(candidate, other) <= max_overlap for other in placed):
                break
        else:
            continue  # no room found for this object
        mask = _shape_mask(SHAPE_NAMES[label], height, width)
        region = image[y : y + height, x : x + width]
        region[mask] = _contrasting_colour(rng, region[mask].mean(axis=0))
        rows, cols = np.nonzero(mask)
        placed.append(candidate)
        boxes.append(
            [
                float(x + cols.min()),
                float(y + rows.min()),
                float(cols.max() - cols.min() + 1),
                float(rows.max() - rows.min() + 1),
            ]
        )
        labels.append(label)
        areas.append(float(mask.sum()))
    return np.round(image).astype(np.uint8), boxes, labels, areas


def _split_salt(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def make_synthetic_detection_dataset(
    num_images: int,
    seed: int = 0,
    image_size: int = 128,
    num_classes: int = 5,
    min_objects: int = 1,
    max_objects: int = 10,
    min_object_size: float = 0.1,
    max_object_size: float = 0.4,
    max_overlap: float = 0.2,
    split: str = "train",
) -> datasets.Dataset:
    """
    Makes the synthetic shapes detection set in the common example format (CPPE-5 schema, see `schema.py`).

    Args:
        num_images (`int`): number of images (at least 1).
        seed (`int`, *optional*, defaults to 0): the seed; image `i` depends only on `(seed, split, i)`.
        image_size (`int`, *optional*, defaults to 128): side of the square images, in pixels (at least 16).
        num_classes (`int`, *optional*, defaults to 5): number of shape classes, the first of `SHAPE_NAMES`
            (1 to 6).
        min_objects, max_objects (`int`, *optional*, default to 1 and 10): objects per image, drawn uniformly (an
            image may hold fewer than drawn when no room is left, never fewer than 1).
        min_object_size, max_object_size (`float`, *optional*, default to 0.1 and 0.4): object side as a share of
            the image side.
        max_overlap (`float`, *optional*, defaults to 0.2): largest IoU between two objects.
        split (`str`, *optional*, defaults to `"train"`): salts the seed, so that splits never share images.

    Returns:
        `datasets.Dataset` with `image` (PNG), `image_id` (`0..num_images-1`), `width`, `height` and `objects`
        (`id`, `area`, `bbox` in COCO xywh pixels, `category` as a ClassLabel of shape names, `iscrowd` = 0).
    """
    if num_images < 1:
        raise ValueError(f"`num_images` must be at least 1, got {num_images}.")
    if image_size < 16:
        raise ValueError(f"`image_size` must be at least 16 pixels, got {image_size}.")
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(
            f"`num_classes` must be in 1..{len(SHAPE_NAMES)} (the shapes {SHAPE_NAMES}), got {num_classes}."
        )
    if not 1 <= min_objects <= max_objects <= 100:
        raise ValueError(f"Need 1 <= min_objects <= max_objects <= 100, got {min_objects} and {max_objects}.")
    if not 0 < min_object_size <= max_object_size <= 1:
        raise ValueError(
            f"Need 0 < min_object_size <= max_object_size <= 1, got {min_object_size} and {max_object_size}."
        )
    if 4 / image_size > max_object_size:
        raise ValueError(f"`max_object_size={max_object_size}` gives objects under 4 pixels in {image_size}px images.")
    if not 0 <= max_overlap < 1:
        raise ValueError(f"`max_overlap` must be in [0, 1), got {max_overlap}.")

    salt = _split_salt(split)
    columns = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for index in range(num_images):
        rng = np.random.default_rng([seed, salt, index])
        pixels, boxes, labels, areas = render_synthetic_image(
            rng, image_size, num_classes, min_objects, max_objects, min_object_size, max_object_size, max_overlap
        )
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["image_id"].append(index)
        columns["width"].append(image_size)
        columns["height"].append(image_size)
        columns["objects"].append(
            {
                "id": [index * 100 + j for j in range(len(boxes))],
                "area": areas,
                "bbox": boxes,
                "category": labels,
                "iscrowd": [0] * len(boxes),
            }
        )
    features = detection_features(SHAPE_NAMES[:num_classes])
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.NamedSplit(split))


def load_synthetic_detection(
    train_size: int = 2000, validation_size: int = 200, seed: int = 0, **kwargs
) -> datasets.DatasetDict:
    """
    The synthetic shapes set as a `DatasetDict` with `train` and `validation` splits (disjoint: each split salts the
    seed with its name).

    Args:
        train_size (`int`, *optional*, defaults to 2000): images in `train`.
        validation_size (`int`, *optional*, defaults to 200): images in `validation`.
        seed (`int`, *optional*, defaults to 0): the seed of both splits.
        **kwargs: the other arguments of `make_synthetic_detection_dataset` (`image_size`, `num_classes`, ...).
    """
    return datasets.DatasetDict(
        {
            "train": make_synthetic_detection_dataset(train_size, seed=seed, split="train", **kwargs),
            "validation": make_synthetic_detection_dataset(validation_size, seed=seed, split="validation", **kwargs),
        }
    )
