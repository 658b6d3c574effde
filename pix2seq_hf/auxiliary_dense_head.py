"""Auxiliary dense supervision of the Pix2Seq encoder output, for training only (one-to-many, as in Co-DETR / H-DETR).

Pix2Seq learns from one signal, the next token, and from scratch its encoder learns slowly where objects are. This
head gives every cell of the encoder output its own target, read from the training sequence itself (no extra data
plumbing): the cell that holds an object's centre predicts the object's class and box, every other cell predicts
background. It adds two linear layers that detection never uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .configuration_pix2seq import Pix2SeqConfig


def objects_from_labels(labels: torch.Tensor, config: Pix2SeqConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    The real objects of Pix2Seq training targets.

    Args:
        labels (`torch.LongTensor` of shape `(batch_size, length)`): target tokens, groups of `ymin xmin ymax xmax class`
            from position 0 (noise objects, EOS, padding and `-100` are skipped).
        config (`Pix2SeqConfig`): the token layout.

    Returns:
        One `(boxes, classes)` pair per image: `xyxy` boxes normalised to the canvas (float `[N, 4]`) and class
        indices (long `[N]`).
    """
    groups = labels[:, : labels.shape[1] // 5 * 5].reshape(labels.shape[0], -1, 5)
    classes = groups[..., 4] - config.class_token_offset
    coordinates = groups[..., :4] - config.coord_token_offset
    real = (classes >= 0) & (classes < config.num_classes)
    real &= ((coordinates >= 0) & (coordinates < config.num_bins)).all(-1)
    ymin, xmin, ymax, xmax = (coordinates.float() / (config.num_bins - 1)).unbind(-1)
    boxes = torch.stack([xmin, ymin, xmax, ymax], dim=-1)
    return [(boxes[i][real[i]], classes[i][real[i]]) for i in range(labels.shape[0])]


class Pix2SeqAuxiliaryDenseHead(nn.Module):
    """
    Per-cell class (`num_classes + 1`, the last is background) and box (`cx, cy, w, h` through a sigmoid) predictions
    on the encoder output, and their loss (`loss`): cross-entropy over all cells plus, on the cells that hold an
    object's centre, L1 (weight 5) and GIoU (weight 2) on the box, as DETR weighs its box terms.
    """

    def __init__(self, config: Pix2SeqConfig):
        super().__init__()
        self.config = config
        self.class_head = nn.Linear(config.decoder_hidden_size, config.num_classes + 1)
        self.box_head = nn.Linear(config.decoder_hidden_size, 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns class logits `(batch, cells, num_classes + 1)` and `cxcywh` boxes in [0, 1] `(batch, cells, 4)`."""
        return self.class_head(hidden_states), self.box_head(hidden_states).sigmoid()

    def loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, image_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """
        The auxiliary loss of one batch.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, cells, decoder_hidden_size)`): the encoder output (a
                row-major feature grid).
            labels (`torch.LongTensor` of shape `(batch_size, length)`): the training targets of the decoder.
            image_size (`tuple[int, int]`, *optional*): pixel height and width, to find the grid's shape (square when
                not given).

        Returns:
            `torch.Tensor`: the scalar loss.
        """
        batch_size, cells, _ = hidden_states.shape
        aspect = 1.0 if image_size is None else image_size[0] / image_size[1]
        grid_h = max(1, round(math.sqrt(cells * aspect)))
        grid_w = cells // grid_h
        if grid_h * grid_w != cells:
            raise ValueError(f"Cannot lay {cells} encoder cells out as a grid for images of size {image_size}.")
        class_logits, boxes = self(hidden_states)
        class_targets = torch.full((batch_size, cells), self.config.num_classes, dtype=torch.long, device=labels.device)
        box_targets = torch.zeros(batch_size, cells, 4, device=hidden_states.device)
        for index, (object_boxes, object_classes) in enumerate(objects_from_labels(labels, self.config)):
            if object_boxes.shape[0] == 0:
                continue
            centres = (object_boxes[:, :2] + object_boxes[:, 2:]) / 2
            sizes = (object_boxes[:, 2:] - object_boxes[:, :2]).clamp(min=0)
            column = (centres[:, 0] * grid_w).long().clamp(0, grid_w - 1)
            row = (centres[:, 1] * grid_h).long().clamp(0, grid_h - 1)
            # Largest first, so that where two centres share a cell the smaller object (written last) keeps it.
            for k in torch.argsort(sizes.prod(-1), descending=True).tolist():
                cell = int(row[k]) * grid_w + int(column[k])
                class_targets[index, cell] = object_classes[k]
                box_targets[index, cell] = torch.cat([centres[k], sizes[k]]).to(box_targets)
        loss = nn.functional.cross_entropy(class_logits.flatten(0, 1).float(), class_targets.flatten())
        positive = class_targets != self.config.num_classes
        if bool(positive.any()):
            predicted, target = boxes[positive].float(), box_targets[positive]
            loss = loss + 5.0 * nn.functional.l1_loss(predicted, target)
            loss = loss + 2.0 * generalized_box_iou_loss(_xyxy(predicted), _xyxy(target), reduction="mean")
        return loss


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, size = boxes[:, :2], boxes[:, 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
