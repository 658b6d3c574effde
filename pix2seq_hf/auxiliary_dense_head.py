"""Auxiliary supervision of Pix2Seq, read from the training sequence itself (no extra data plumbing).

Pix2Seq learns from one signal, the next token, and from scratch it learns slowly where objects are. An extra loss
gives that signal directly; detection reads the head only in a model with `auxiliary_copy` (see `auxiliary_copy.py`):

- `Pix2SeqAuxiliaryDenseHead` (one-to-many, as in Co-DETR / H-DETR, with FCOS's assignment): the cells of the encoder
  output near an object's centre and inside its box predict its class and the distances to its four sides, every other
  cell predicts background; two linear layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .box_codec import Pix2SeqBoxCodec
from .configuration_pix2seq import Pix2SeqConfig


def object_groups(labels: torch.Tensor, config: Pix2SeqConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The objects of Pix2Seq training targets, group by group.

    Args:
        labels (`torch.LongTensor` of shape `(batch_size, length)`): target tokens, groups of `ymin xmin ymax xmax class`
            from position 0 (a trailing partial group is dropped).
        config (`Pix2SeqConfig`): the token layout.

    Returns:
        `(boxes, classes, real)` of shapes `(batch_size, groups, 4)`, `(batch_size, groups)`, `(batch_size, groups)`:
        `xyxy` boxes normalised to the canvas, class indices, and whether the group is a real object (noise objects,
        EOS, padding and `-100` are not), as [`Pix2SeqBoxCodec.decode_groups`] reads them (0 and -1 elsewhere).
    """
    decoded = Pix2SeqBoxCodec(config.token_layout).decode_groups(labels)
    return decoded["boxes"], decoded["labels"], decoded["mask"]


def objects_from_labels(labels: torch.Tensor, config: Pix2SeqConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    The real objects of Pix2Seq training targets (see `object_groups`).

    Returns:
        One `(boxes, classes)` pair per image: `xyxy` boxes normalised to the canvas (float `[N, 4]`) and class
        indices (long `[N]`).
    """
    boxes, classes, real = object_groups(labels, config)
    return [(boxes[i][real[i]], classes[i][real[i]]) for i in range(labels.shape[0])]


def feature_grid(cells: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The `(height, width)` of the row-major grid of `cells` features of an image of `image_size` (square when not
    given). Raises `ValueError` when the cells do not make such a grid."""
    aspect = 1.0 if image_size is None else image_size[0] / image_size[1]
    grid_h = max(1, round(math.sqrt(cells * aspect)))
    grid_w = cells // grid_h
    if grid_h * grid_w != cells:
        raise ValueError(f"Cannot lay {cells} encoder cells out as a grid for images of size {image_size}.")
    return grid_h, grid_w


def cell_centres(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Centres of the cells of a row-major `grid_h x grid_w` grid over the canvas: `(grid_h * grid_w, 2)` as `x, y`
    in [0, 1]."""
    ys, xs = torch.meshgrid(
        (torch.arange(grid_h, device=device) + 0.5) / grid_h,
        (torch.arange(grid_w, device=device) + 0.5) / grid_w,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def cell_boxes(distances: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """
    The boxes the auxiliary head predicts at the cells of a row-major feature grid.

    Args:
        distances (`torch.Tensor` of shape `(..., cells, 4)`): distances from each cell centre to the left, top,
            right and bottom sides, in units of the canvas (`Pix2SeqAuxiliaryDenseHead` output).
        image_size (`tuple[int, int]`, *optional*): pixel height and width, to find the grid's shape (square when not
            given).

    Returns:
        `torch.Tensor` of shape `(..., cells, 4)`: `xyxy` boxes normalised to the canvas (not clipped).
    """
    grid_h, grid_w = feature_grid(distances.shape[-2], image_size)
    points = cell_centres(grid_h, grid_w, distances.device).to(distances.dtype)
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def assign_cells(
    boxes: torch.Tensor, grid_h: int, grid_w: int, center_radius: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    FCOS's centre sampling: a cell is a positive of an object when its centre lies inside the object's box and within
    `center_radius` cells of the box centre (on both axes); a cell that several objects claim goes to the smallest.

    Args:
        boxes (`torch.Tensor` of shape `(num_objects, 4)`): `xyxy` boxes normalised to the canvas.
        grid_h, grid_w (`int`): the feature grid.
        center_radius (`float`, *optional*, defaults to 1.5): in cells.

    Returns:
        `(positive, assigned)`: a boolean `(grid_h * grid_w,)` mask of the positive cells and, for every cell, the
        index of its object (meaningless where `positive` is false).
    """
    points = cell_centres(grid_h, grid_w, boxes.device)
    radius = center_radius * torch.tensor([1.0 / grid_w, 1.0 / grid_h], device=boxes.device)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (points[:, None, :] >= boxes[None, :, :2]) & (points[:, None, :] <= boxes[None, :, 2:])
    near = (points[:, None, :] - centres[None]).abs() <= radius
    claims = (inside & near).all(-1)  # (cells, objects)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    areas = torch.where(claims, areas[None, :], torch.full_like(areas, math.inf)[None, :])
    smallest, assigned = areas.min(-1)
    return torch.isfinite(smallest), assigned


class Pix2SeqAuxiliaryDenseHead(nn.Module):
    """
    One-to-many dense supervision of the encoder output, as FCOS trains its head: every cell assigned to an object by
    `assign_cells` predicts the object's class (sigmoid focal loss over all cells and classes, background = all
    zeros) and the distances from the cell centre to the box's four sides (GIoU loss, weight 2); both are normalised by
    the number of positive cells.
    """

    center_radius = 1.5

    def __init__(self, config: Pix2SeqConfig):
        super().__init__()
        self.config = config
        self.class_head = nn.Linear(config.decoder_hidden_size, config.num_classes)
        self.box_head = nn.Linear(config.decoder_hidden_size, 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns class logits `(batch, cells, num_classes)` and the distances `(batch, cells, 4)` from each cell
        centre to the left, top, right and bottom box sides (non-negative, in units of the canvas)."""
        return self.class_head(hidden_states), nn.functional.softplus(self.box_head(hidden_states))

    def loss(
        self,
        class_logits: torch.Tensor,
        distances: torch.Tensor,
        labels: torch.Tensor,
        image_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """
        The auxiliary loss of one batch.

        Args:
            class_logits (`torch.Tensor` of shape `(batch_size, cells, num_classes)`),
            distances (`torch.Tensor` of shape `(batch_size, cells, 4)`): this head's outputs on the memory (a
                row-major feature grid).
            labels (`torch.LongTensor` of shape `(batch_size, length)`): the training targets of the decoder.
            image_size (`tuple[int, int]`, *optional*): pixel height and width, to find the grid's shape (square when
                not given).

        Returns:
            `torch.Tensor`: the scalar loss.
        """
        grid_h, grid_w = feature_grid(class_logits.shape[1], image_size)
        points = cell_centres(grid_h, grid_w, class_logits.device)
        class_targets = torch.zeros_like(class_logits, dtype=torch.float32)
        predicted, target, anchors = [], [], []
        for index, (boxes, classes) in enumerate(objects_from_labels(labels, self.config)):
            if boxes.shape[0] == 0:
                continue
            boxes = boxes.to(class_logits.device)
            positive, assigned = assign_cells(boxes, grid_h, grid_w, self.center_radius)
            assigned = assigned[positive]
            class_targets[index, positive, classes.to(class_targets.device)[assigned]] = 1.0
            predicted.append(distances[index, positive])
            target.append(boxes[assigned])
            anchors.append(points[positive])
        num_positive = max(1, sum(len(p) for p in predicted))
        loss = sigmoid_focal_loss(class_logits.float(), class_targets, reduction="sum") / num_positive
        if predicted:
            anchors, sides = torch.cat(anchors), torch.cat(predicted).float()
            boxes = torch.cat([anchors - sides[:, :2], anchors + sides[:, 2:]], dim=-1)
            loss = loss + 2.0 * generalized_box_iou_loss(boxes, torch.cat(target), reduction="sum") / num_positive
        return loss
