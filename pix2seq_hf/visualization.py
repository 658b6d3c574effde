"""Drawing detections on images (with `torchvision.utils.draw_bounding_boxes`)."""

from __future__ import annotations

import colorsys

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes


def _label_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def draw_detections(
    image: Image.Image,
    detections: dict,
    id2label: dict[int, str] | None = None,
    threshold: float = 0.0,
    width: int = 2,
    min_size: int = 512,
) -> Image.Image:
    """
    Draws boxes with their label and score on a copy of `image`.

    Args:
        image (`PIL.Image.Image`): the original image.
        detections (`dict`): one entry of `post_process_object_detection`: `scores` [n], `labels` [n] and `boxes`
            [n, 4] (absolute xyxy in the pixels of `image`), tensors or lists.
        id2label (`dict[int, str]`, *optional*): class names; the label id is written when missing.
        threshold (`float`, *optional*, defaults to 0.0): detections below this score are not drawn.
        width (`int`, *optional*, defaults to 2): line width in pixels.
        min_size (`int`, *optional*, defaults to 512): a smaller image is enlarged (with its boxes) until its shorter
            side is this long, so that the captions (a fixed-size font) stay readable on small images; 0 keeps the
            image's size.

    Returns:
        `PIL.Image.Image`: an RGB image with the detections drawn (enlarged as `min_size` says).
    """
    image = image.convert("RGB")
    scale = max(1.0, min_size / max(1, min(image.size)))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    image_tensor = F.pil_to_tensor(image)
    scores = torch.as_tensor(detections["scores"], dtype=torch.float32).reshape(-1)
    labels = torch.as_tensor(detections["labels"], dtype=torch.int64).reshape(-1)
    boxes = torch.as_tensor(detections["boxes"], dtype=torch.float32).reshape(-1, 4) * scale
    keep = scores >= threshold
    scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
    if len(boxes) == 0:
        return F.to_pil_image(image_tensor)
    id2label = id2label or {}
    captions = [f"{id2label.get(int(label), str(int(label)))} {float(score):.2f}" for label, score in zip(labels, scores)]
    colours = [_label_colour(int(label)) for label in labels]
    # Captions in black on a band of the box's colour, readable on any background.
    drawn = draw_bounding_boxes(
        image_tensor,
        boxes,
        labels=captions,
        colors=colours,
        width=width,
        label_colors="black",
        label_background_colors=colours,
        fill_labels=True,
    )
    return F.to_pil_image(drawn)
