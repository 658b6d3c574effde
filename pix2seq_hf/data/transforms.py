"""
Training image augmentation of Pix2Seq (scale jitter, crop, flip, as the paper trains), built from
`torchvision.transforms.v2` on `tv_tensors.BoundingBoxes`, so that every piece of box geometry is torchvision's.

A training sample is a dict `{"image": tv_tensors.Image, "boxes": tv_tensors.BoundingBoxes, "labels": LongTensor}`;
the transforms return the same structure. After augmentation the image is at most `canvas x canvas`: the processor
then pads it (bottom/right) onto the canvas without resizing (`do_resize=False`). Evaluation uses no augmentation
(the processor resizes and pads).

The transforms draw from torch's global generator; `apply_transforms` runs them under a given seed (in a forked RNG
state), which is how the collator makes augmentation reproducible per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvF


@dataclass(frozen=True)
class AugmentationConfig:
    """
    Settings of the training augmentation.

    Attributes:
        scale_range (`tuple[float, float]` or `None`): scale jitter: the longer image side is resized to
            `s * canvas` with `s ~ U(scale_range)`, then the image is randomly cropped to at most `canvas x canvas`.
            `None` turns geometry augmentation off (the processor then resizes as for evaluation).
        hflip_prob (`float`): probability of a horizontal flip.
        color_jitter_strength (`float`): strength `s` of the colour distortion (SimCLR-style, as the Pix2Seq code
            base: with probability 0.8 jitter brightness, contrast and saturation by `0.8 s` and hue by `0.2 s`; with
            probability 0.2 convert to grayscale). 0 turns it off.
        min_box_size (`float`): boxes narrower or lower than this many pixels after augmentation are dropped.
    """

    scale_range: tuple[float, float] | None = (0.3, 2.0)
    hflip_prob: float = 0.5
    color_jitter_strength: float = 0.0
    min_box_size: float = 1.0

    def __post_init__(self):
        if self.scale_range is not None:
            low, high = self.scale_range
            if not 0 < low <= high:
                raise ValueError(f"`scale_range` must satisfy 0 < min <= max, got {self.scale_range}.")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"`hflip_prob` must be in [0, 1], got {self.hflip_prob}.")
        if self.color_jitter_strength < 0:
            raise ValueError(f"`color_jitter_strength` must be non-negative, got {self.color_jitter_strength}.")
        if self.min_box_size < 1:
            raise ValueError(f"`min_box_size` must be at least 1 pixel, got {self.min_box_size}.")

    @property
    def is_identity(self) -> bool:
        """Whether the config changes nothing (no jitter, no flip, no colour)."""
        return self.scale_range is None and self.hflip_prob == 0 and self.color_jitter_strength == 0


AUGMENTATION_PRESETS: dict[str, AugmentationConfig] = {
    # The official fine-tuning recipe: scale jitter [0.3, 2.0], random crop, horizontal flip, no colour.
    "finetune": AugmentationConfig(scale_range=(0.3, 2.0), hflip_prob=0.5, color_jitter_strength=0.0),
    # The paper's from-scratch recipe: scale jitter [0.1, 3.0] and colour distortion 0.5.
    "scratch": AugmentationConfig(scale_range=(0.1, 3.0), hflip_prob=0.5, color_jitter_strength=0.5),
    # The paper's Objects365 pretraining of ResNet models: scale jitter [0.9, 1.2], no colour.
    "pretrain": AugmentationConfig(scale_range=(0.9, 1.2), hflip_prob=0.5, color_jitter_strength=0.0),
    # Mild jitter and flips, for small data sets and short runs (e.g. the synthetic shapes on a CPU), where the
    # official range shrinks small objects to a few pixels.
    "light": AugmentationConfig(scale_range=(0.8, 1.25), hflip_prob=0.5, color_jitter_strength=0.0),
    # No augmentation: training images are resized and padded like evaluation images.
    "none": AugmentationConfig(scale_range=None, hflip_prob=0.0, color_jitter_strength=0.0),
}


class RandomCropToCanvas(v2.Transform):
    """
    Random crop to at most `size x size`: each side longer than `size` is cut to `size` at a uniform random offset,
    shorter sides are kept whole (the image is padded onto the canvas later, never here).
    """

    def __init__(self, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"`size` must be a positive number of pixels, got {size}.")
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_height, crop_width = min(height, self.size), min(width, self.size)
        top = int(torch.randint(0, height - crop_height + 1, ()))
        left = int(torch.randint(0, width - crop_width + 1, ()))
        return {"top": top, "left": left, "height": crop_height, "width": crop_width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(tvF.crop, inpt, **params)


class _FitToCanvas(v2.Transform):
    """Resizes the longer side to `size` (keeping the aspect ratio), as the processor's resize would."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(tvF.resize, inpt, size=None, max_size=self.size)


def build_train_transforms(config: str | AugmentationConfig, canvas_size: int) -> v2.Compose | None:
    """
    Builds the training augmentation.

    Args:
        config (`str` or `AugmentationConfig`): a preset name from `AUGMENTATION_PRESETS` ("finetune", "scratch",
            "light", "none") or a config.
        canvas_size (`int`): the processor's canvas (`image_processor.size["longest_edge"]`).

    Returns:
        A `v2.Compose` taking and returning `{"image", "boxes", "labels"}`: scale jitter, random crop to the canvas,
        horizontal flip, optional colour distortion, then boxes clamped to the image (`ClampBoundingBoxes`) and
        boxes with no area left, with their labels, removed (`SanitizeBoundingBoxes`). `None` when `config` changes
        nothing (train with the processor's resize).
    """
    if isinstance(config, str):
        if config not in AUGMENTATION_PRESETS:
            raise ValueError(f"Unknown augmentation preset {config!r}; choose one of {sorted(AUGMENTATION_PRESETS)}.")
        config = AUGMENTATION_PRESETS[config]
    if not isinstance(canvas_size, int) or canvas_size < 1:
        raise ValueError(f"`canvas_size` must be a positive int, got {canvas_size!r}.")
    if config.is_identity:
        return None
    steps: list[v2.Transform] = []
    if config.scale_range is not None:
        steps.append(v2.ScaleJitter(target_size=(canvas_size, canvas_size), scale_range=tuple(config.scale_range)))
    # Without jitter the image still has to fit on the canvas.
    steps.append(RandomCropToCanvas(canvas_size) if config.scale_range is not None else _FitToCanvas(canvas_size))
    if config.hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=config.hflip_prob))
    if config.color_jitter_strength > 0:
        s = config.color_jitter_strength
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
        steps.append(v2.RandomGrayscale(p=0.2))
    steps.append(v2.ClampBoundingBoxes())
    steps.append(v2.SanitizeBoundingBoxes(min_size=config.min_box_size))
    return v2.Compose(steps)


def apply_transforms(
    transforms,
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    bbox_format: str = "XYWH",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Augments one image and its boxes.

    Args:
        transforms: the augmentation (e.g. from `build_train_transforms`), a callable on `{"image", "boxes",
            "labels"}`.
        image (`torch.Tensor`): `[3, H, W]` image (uint8 or float).
        boxes (`torch.Tensor`): `[N, 4]` boxes in absolute pixels of `image`, in `bbox_format`.
        labels (`torch.Tensor`): `[N]` labels.
        bbox_format (`str`, *optional*, defaults to `"XYWH"`): format of `boxes`, given and returned (torchvision's
            names: "XYWH", "XYXY", "CXCYWH").
        seed (`int`, *optional*): run the transforms with torch's global generator seeded with `seed` (the global
            state is restored afterwards); `None` uses the current global state.

    Returns:
        `(image, boxes, labels)`: the augmented image `[3, H', W']`, its boxes `[M, 4]` in `bbox_format` absolute
        pixels (clipped, each with positive area) and their labels `[M]`, all plain tensors.
    """
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(
            boxes.reshape(-1, 4).to(torch.float32), format=bbox_format, canvas_size=tuple(image.shape[-2:])
        ),
        "labels": labels.reshape(-1).to(torch.int64),
    }
    if seed is None:
        out = transforms(sample)
    else:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the transforms draw from it; fork_rng restores only it): torch.manual_seed would
            # also seed every accelerator's, recording a stack trace for each (a sixth of a batch's collation time).
            torch.default_generator.manual_seed(seed)
            out = transforms(sample)
    out_boxes = tvF.convert_bounding_box_format(out["boxes"], new_format=bbox_format)
    return (
        out["image"].as_subclass(torch.Tensor),
        out_boxes.as_subclass(torch.Tensor),
        out["labels"].as_subclass(torch.Tensor),
    )
