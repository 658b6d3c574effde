"""Telling COCO `[x, y, w, h]` boxes from `[x_min, y_min, x_max, y_max]` boxes when a dataset does not say."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


logger = logging.getLogger(__name__)

BBOX_FORMATS = ("xywh", "xyxy")
BBOX_FORMATS_AUTO = ("auto", *BBOX_FORMATS)

# Annotations are often a little sloppy at the image border: a box may overshoot it by this share of the image side
# (plus one pixel) before it counts as evidence against a format.
_BORDER_TOLERANCE = 0.02
# When both formats have violations, the smaller share must be at most this fraction of the larger one to decide
# without a warning.
_DECISIVE_RATIO = 0.2


@dataclass(frozen=True)
class BBoxFormatEvidence:
    """
    What `detect_bbox_format` saw.

    Attributes:
        num_boxes (`int`): finite boxes looked at.
        xyxy_violations (`int`): boxes impossible as xyxy (`x2 < x1` or `y2 < y1`).
        xywh_violations (`int`): boxes that, read as xywh, end beyond the image (`x + w > width` or `y + h > height`,
            with a small tolerance).
        max_coordinate (`float`): largest coordinate seen (all below 1.5 means normalised boxes).
    """

    num_boxes: int
    xyxy_violations: int
    xywh_violations: int
    max_coordinate: float


def collect_bbox_evidence(
    boxes_per_image: Iterable[Sequence[Sequence[float]]], image_sizes: Iterable[tuple[int, int]]
) -> BBoxFormatEvidence:
    """
    Counts, over images, the boxes that are impossible under each reading.

    Args:
        boxes_per_image: per image, its boxes as 4 numbers in absolute pixels.
        image_sizes: per image, `(width, height)`.
    """
    num_boxes = xyxy_violations = xywh_violations = 0
    max_coordinate = 0.0
    for boxes, (width, height) in zip(boxes_per_image, image_sizes):
        for box in boxes:
            try:
                a, b, c, d = (float(v) for v in box)
            except (TypeError, ValueError):
                continue  # malformed boxes are reported when the objects are cleaned
            if not all(math.isfinite(v) for v in (a, b, c, d)):
                continue
            num_boxes += 1
            max_coordinate = max(max_coordinate, a, b, c, d)
            if c < a or d < b:
                xyxy_violations += 1
            if a + c > width * (1 + _BORDER_TOLERANCE) + 1 or b + d > height * (1 + _BORDER_TOLERANCE) + 1:
                xywh_violations += 1
    return BBoxFormatEvidence(num_boxes, xyxy_violations, xywh_violations, max_coordinate)


def detect_bbox_format(evidence: BBoxFormatEvidence, source: str = "the dataset") -> str:
    """
    Decides between "xywh" and "xyxy" from `evidence` (see `collect_bbox_evidence`).

    The heuristic: a box with `x2 < x1` (or `y2 < y1`) cannot be xyxy, and a box whose `x + w` passes the right edge
    (or `y + h` the bottom edge) cannot be a valid xywh box. On real data each reading is contradicted by many boxes
    of the other kind (any box narrower than its distance from the left edge is "impossible" as xyxy; any xyxy box
    in the right half of its image overshoots as xywh), so:

    - only xyxy contradicted -> "xywh"; only xywh contradicted -> "xyxy";
    - both contradicted (sloppy annotations) -> the reading with fewer contradictions, with a warning unless it has
      at most a fifth as many;
    - neither contradicted (too few or too particular boxes to tell) -> "xywh", the COCO convention, with a warning;
    - no boxes at all -> "xywh" (nothing to read).

    Raises:
        `ValueError` when every coordinate is below 1.5: the boxes look normalised to [0, 1], which neither format
        covers (they must be absolute pixels).
    """
    if evidence.num_boxes == 0:
        return "xywh"
    if evidence.max_coordinate < 1.5:
        raise ValueError(
            f"Every box coordinate in {source} is below 1.5 (max {evidence.max_coordinate}): the boxes look "
            "normalised to [0, 1]. Boxes must be in absolute pixels; multiply them by the image width/height first."
        )
    n, xyxy_bad, xywh_bad = evidence.num_boxes, evidence.xyxy_violations, evidence.xywh_violations
    summary = (
        f"{xyxy_bad} of {n} boxes have x2 < x1 or y2 < y1 (impossible as xyxy); {xywh_bad} of {n} end outside their "
        "image when read as xywh"
    )
    if xyxy_bad and not xywh_bad:
        return "xywh"
    if xywh_bad and not xyxy_bad:
        return "xyxy"
    if not xyxy_bad and not xywh_bad:
        logger.warning(
            f"Cannot tell the box format of {source}: {summary}. Using COCO's 'xywh'; pass `bbox_format` to be sure."
        )
        return "xywh"
    chosen = "xywh" if xyxy_bad > xywh_bad else "xyxy"
    if min(xyxy_bad, xywh_bad) > _DECISIVE_RATIO * max(xyxy_bad, xywh_bad):
        logger.warning(f"The box format of {source} is unclear: {summary}. Using {chosen!r}; pass `bbox_format`.")
    return chosen
