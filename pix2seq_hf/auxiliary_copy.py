"""Coordinate and class tokens copied from the auxiliary dense head, through a pointer over the memory cells.

A training option beyond the paper (`config.auxiliary_copy`, for models with an auxiliary dense head). From scratch
the decoder learns late to write precise coordinates and the right classes, while the auxiliary head, trained on the
same encoder output, soon knows every object's box and class at the cells near its centre. With the copy, at each
position the decoder points at memory cells (a softmax over them of a query from its output against keys from the
memory) and mixes its next-token distribution with what the pointed cells predict:

    p(token) = (1 - g) p_decoder(token) + g sum_n alpha_n q_n(token),    g = sigmoid(w . h)

where, at a coordinate position, `q_n` is a Gaussian over the bins (standard deviation `sigma` bins) around cell
`n`'s coordinate of the kind being written (`ymin`, `xmin`, `ymax` or `xmax`), and at a class position the head's
class probabilities at cell `n` (softmax of its class logits). The head's predictions are read without gradient (its
own loss trains them); the pointer and the gate learn from the token loss. EOS and the noise class come from the
decoder alone. The tokens are still written one at a time by the decoder's loop, with the same grammar.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .auxiliary_dense_head import cell_boxes
from .configuration_pix2seq import TOKENS_PER_OBJECT, Pix2SeqConfig


def cell_box_bins(distances: torch.Tensor, num_bins: int) -> torch.Tensor:
    """
    The boxes the auxiliary head predicts at the cells of a square feature grid, in coordinate bins.

    Args:
        distances (`torch.Tensor` of shape `(batch, cells, 4)`): the head's distances (see [`cell_boxes`]).
        num_bins (`int`): coordinate bins.

    Returns:
        float32 `torch.Tensor` of shape `(batch, cells, 4)`: `ymin, xmin, ymax, xmax` as (fractional) bins in
        `[0, num_bins - 1]`, as `quantize_coordinates` maps coordinates before rounding.
    """
    x0, y0, x1, y1 = cell_boxes(distances.float()).unbind(-1)
    return torch.stack([y0, x0, y1, x1], dim=-1).clamp(0, 1) * (num_bins - 1)


def gaussian_kernels_over_bins(
    centres: torch.Tensor, num_bins: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The bins near each centre and a Gaussian's mass on them (truncated at about three standard deviations and
    renormalised over the bins that exist): the components of [`gaussian_mixture_over_bins`].

    Args:
        centres (`torch.Tensor` of shape `(..., cells)`): each component's centre, in bins.
        num_bins (`int`), sigma (`float`): the bins and the standard deviation in bins.

    Returns:
        `(index, kernel)`, both of shape `(..., cells, width)`: the bins (long) and their float32 masses.
    """
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 2, device=centres.device, dtype=torch.float32)
    bins = centres.float().floor()[..., None] + offsets
    kernel = torch.exp(-((bins - centres.float()[..., None]) ** 2) / (2 * sigma**2))
    kernel = kernel * ((bins >= 0) & (bins <= num_bins - 1))
    return bins.clamp(0, num_bins - 1).long(), kernel / kernel.sum(-1, keepdim=True)


def mixture_of_kernels(
    weights: torch.Tensor, index: torch.Tensor, kernel: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """`sum_n weights_n * kernel_n` over the bins, for [`gaussian_kernels_over_bins`] `(index, kernel)` and weights
    `(..., cells)`, accumulated with a scatter (the cost grows with the cells, not with cells x bins); float32
    `(..., num_bins)`."""
    contributions = (weights.float()[..., None] * kernel).flatten(-2)
    output = torch.zeros((*weights.shape[:-1], num_bins), device=weights.device, dtype=torch.float32)
    return output.scatter_add(-1, index.flatten(-2), contributions)


def gaussian_mixture_over_bins(
    weights: torch.Tensor, centres: torch.Tensor, num_bins: int, sigma: float
) -> torch.Tensor:
    """
    `sum_n weights_n * k(bin; centres_n)` for every bin: a mixture of Gaussians over the bins (each truncated at about
    three standard deviations and renormalised over the bins that exist).

    Args:
        weights (`torch.Tensor` of shape `(..., cells)`): mixture weights (summing to 1 over the cells).
        centres (`torch.Tensor` of shape `(..., cells)`): each component's centre, in bins.
        num_bins (`int`), sigma (`float`): the bins and the standard deviation in bins.

    Returns:
        float32 `torch.Tensor` of shape `(..., num_bins)`.
    """
    return mixture_of_kernels(weights, *gaussian_kernels_over_bins(centres, num_bins, sigma), num_bins)


class Pix2SeqAuxiliaryCopy(nn.Module):
    """
    The pointer and the gate of the copy (see the module docstring): a query from the decoder output and a key from
    each memory cell (`pointer_size` wide), and a gate from the decoder output, zero-initialised by the model (an even
    mixture at the start). Coordinate positions (`ymin xmin ymax xmax`) copy the pointed cells' boxes, class positions
    their class probabilities (the auxiliary head's class logits, softmax over the classes).
    """

    sigma = 1.0
    pointer_size = 64

    def __init__(self, config: Pix2SeqConfig):
        super().__init__()
        # Read at every call: fine-tuning onto a new label set changes the classes.
        self.config = config
        self.query = nn.Linear(config.decoder_hidden_size, self.pointer_size)
        # No key bias: it would add the same score to every cell (no effect on the softmax, a zero gradient that
        # Adam would turn into noise-driven updates).
        self.key = nn.Linear(config.decoder_hidden_size, self.pointer_size, bias=False)
        self.gate = nn.Linear(config.decoder_hidden_size, 1)

    def cell_inputs(self, memory: torch.Tensor, class_logits: torch.Tensor, distances: torch.Tensor) -> tuple:
        """
        What the copy reads of each memory cell, the same at every position of a sequence (so that a decoding loop can
        compute it once per image).

        Args:
            memory (`torch.Tensor` of shape `(batch, cells, hidden)`): the encoded image of each sequence.
            class_logits (`torch.Tensor` of shape `(batch, cells, num_classes)`), distances (`torch.Tensor` of shape
                `(batch, cells, 4)`): the auxiliary head's outputs on `memory`.

        Returns:
            `(keys, class_probabilities, kernels)`: the cells' pointer keys `(batch, cells, pointer_size)`, class
            probabilities `(batch, cells, num_classes)` (float32), and the [`gaussian_kernels_over_bins`] of the four
            coordinates of their boxes in bins ([`cell_box_bins`]; `(index, kernel)`, each `(batch, 4, cells,
            width)`).
        """
        num_bins = self.config.num_bins
        boxes = cell_box_bins(distances.detach(), num_bins)
        kernels = gaussian_kernels_over_bins(boxes.transpose(1, 2), num_bins, self.sigma)
        return self.key(memory).float(), torch.softmax(class_logits.detach().float(), dim=-1), kernels

    def forward(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        cells: tuple,
        positions: torch.LongTensor | int,
    ) -> torch.Tensor:
        """
        Args:
            logits (`torch.Tensor` of shape `(batch, length, vocab_size)`): the decoder's next-token logits.
            hidden_states (`torch.Tensor` of shape `(batch, length, hidden)`): the decoder output they come from.
            cells (`tuple`): [`cell_inputs`] of each sequence's encoded image.
            positions (`torch.LongTensor` of shape `(length,)` or `(batch, length)`, or `int`): each output's position
                in the sequence (0: the prompt, whose output predicts the first `ymin`); an `int` for one position
                shared by every row (a decoding step), which then copies only the kind of token written there.

        Returns:
            float32 `torch.Tensor` of shape `(batch, length, vocab_size)`: the log-probabilities of the mixture (the
            decoder's own distribution wherever the copy puts nothing: EOS, the noise class).
        """
        keys, class_probabilities, (index, kernel) = cells
        config = self.config
        num_bins = config.num_bins
        scores = self.query(hidden_states).float() @ keys.transpose(1, 2)
        pointer = torch.softmax(scores / math.sqrt(self.pointer_size), dim=-1)
        gate = torch.sigmoid(self.gate(hidden_states).float())
        probabilities = torch.softmax(logits.float(), dim=-1) * (1 - gate)
        copied = torch.zeros_like(probabilities)
        bins = slice(config.coord_token_offset, config.coord_token_offset + num_bins)
        classes = slice(config.class_token_offset, config.class_token_offset + class_probabilities.shape[-1])
        kind = positions % TOKENS_PER_OBJECT
        if isinstance(positions, int):
            if kind == TOKENS_PER_OBJECT - 1:
                copied[..., classes] = pointer @ class_probabilities
            else:
                # The kernels of this coordinate, computed with the cells: (batch, 1, cells, width).
                kind_index, kind_kernel = index[:, kind : kind + 1], kernel[:, kind : kind + 1]
                copied[..., bins] = mixture_of_kernels(pointer, kind_index, kind_kernel, num_bins)
        else:
            if kind.dim() == 1:
                kind = kind[None].expand(logits.shape[0], -1)
            # The kernels of each position's coordinate of every cell: (batch, length, cells, width).
            coordinate = kind.clamp(max=3)[..., None, None].expand(-1, -1, *index.shape[2:])
            kind_index, kind_kernel = index.gather(1, coordinate), kernel.gather(1, coordinate)
            is_class = (kind == TOKENS_PER_OBJECT - 1)[..., None]
            copied[..., bins] = mixture_of_kernels(pointer, kind_index, kind_kernel, num_bins) * ~is_class
            copied[..., classes] = (pointer @ class_probabilities) * is_class
        return torch.log((probabilities + gate * copied).clamp_min(torch.finfo(torch.float32).tiny))


__all__ = [
    "Pix2SeqAuxiliaryCopy",
    "cell_box_bins",
    "gaussian_kernels_over_bins",
    "gaussian_mixture_over_bins",
    "mixture_of_kernels",
]
