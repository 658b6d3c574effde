"""Token layout of Pix2Seq sequences and the box codec that turns boxes into tokens and back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


@dataclass(frozen=True)
class Pix2SeqTokenLayout:
    """
    Where each kind of token lives in the Pix2Seq vocabulary (DESIGN.md section 3).

    Args:
        num_bins (`int`): number of quantisation bins per coordinate.
        num_classes (`int`): number of real object classes (labels `0..num_classes-1`).
        vocab_size (`int`): size of the vocabulary; every range below must fit inside it.
        pad_token_id (`int`): padding token, also used as end-of-sequence (as in the official code).
        eos_token_id (`int`): end-of-sequence token.
        bos_token_id (`int`): detection prompt, the first token of every decoder input.
        noise_token_id (`int`): class token of the fake ("noise") objects of sequence augmentation.
        class_token_offset (`int`): token of label `i` is `class_token_offset + i`.
        coord_token_offset (`int`): token of bin `b` is `coord_token_offset + b`.
        max_objects (`int`): objects per training sequence; a sequence holds `5 * max_objects` tokens.
    """

    num_bins: int = 1000
    num_classes: int = 80
    vocab_size: int = 3000
    pad_token_id: int = 0
    eos_token_id: int = 0
    bos_token_id: int = 10
    noise_token_id: int = 30
    class_token_offset: int = 100
    coord_token_offset: int = 1000
    max_objects: int = 100

    @classmethod
    def from_config(cls, config) -> Pix2SeqTokenLayout:
        """Reads the layout fields off a `Pix2SeqConfig` (or any object with the same attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def class_token_end(self) -> int:
        """One past the last class token."""
        return self.class_token_offset + self.num_classes

    @property
    def coord_token_end(self) -> int:
        """One past the last coordinate token."""
        return self.coord_token_offset + self.num_bins

    @property
    def tokens_per_object(self) -> int:
        return 5

    @property
    def max_sequence_length(self) -> int:
        """Tokens in a full target sequence: `5 * max_objects` (EOS included only when there is room)."""
        return self.tokens_per_object * self.max_objects

    def validate(self) -> None:
        """Raises `ValueError` naming the offending field when the layout is inconsistent."""
        if self.num_bins < 2:
            raise ValueError(f"`num_bins` must be at least 2 to quantise a coordinate, got {self.num_bins}.")
        if self.num_classes < 1:
            raise ValueError(f"`num_classes` must be at least 1, got {self.num_classes}.")
        if self.max_objects < 1:
            raise ValueError(f"`max_objects` must be at least 1, got {self.max_objects}.")
        if self.pad_token_id != self.eos_token_id:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) and `eos_token_id` ({self.eos_token_id}) must be the same "
                "token: Pix2Seq pads with end-of-sequence."
            )
        ranges = {
            "pad/eos token": (self.pad_token_id, self.pad_token_id + 1),
            "bos token": (self.bos_token_id, self.bos_token_id + 1),
            "noise token": (self.noise_token_id, self.noise_token_id + 1),
            "class tokens": (self.class_token_offset, self.class_token_end),
            "coordinate tokens": (self.coord_token_offset, self.coord_token_end),
        }
        for name, (start, end) in ranges.items():
            if start < 0:
                raise ValueError(f"The {name} start at {start}; token ids must be non-negative.")
            if end > self.vocab_size:
                raise ValueError(
                    f"The {name} occupy ids {start}..{end - 1}, which does not fit in `vocab_size={self.vocab_size}`"
                    f" (num_classes={self.num_classes}, num_bins={self.num_bins}); raise `vocab_size` or move the range."
                )
        items = sorted(ranges.items(), key=lambda item: item[1])
        for (name_a, (start_a, end_a)), (name_b, (start_b, end_b)) in zip(items, items[1:]):
            if start_b < end_a:
                raise ValueError(
                    f"Token ranges overlap: {name_a} use ids {start_a}..{end_a - 1} and {name_b} use ids "
                    f"{start_b}..{end_b - 1}. Check `class_token_offset`, `coord_token_offset`, `noise_token_id`, "
                    f"`bos_token_id`, `num_classes` and `num_bins`."
                )

    def check_compatible(self, other: Pix2SeqTokenLayout, what: str = "model config") -> None:
        """
        Raises `ValueError` listing every field on which `other` (e.g. a model's layout) disagrees with this one
        (e.g. a processor's layout): sequences written with one cannot be read with the other.
        """
        mismatches = [
            f"{f.name}: {getattr(self, f.name)} here vs {getattr(other, f.name)} in the {what}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if mismatches:
            raise ValueError(
                "The Pix2Seq token layout of the processor does not match the "
                f"{what}: " + "; ".join(mismatches) + ". Build the processor with `Pix2SeqProcessor.from_pretrained` "
                "of the same checkpoint, or with the model's config."
            )


OBJECT_ORDERS = ("random", "area", "dist2ori", "class", "none")


def quantize_coordinates(coords: torch.Tensor, num_bins: int) -> torch.LongTensor:
    """
    Maps normalised coordinates in [0, 1] to bins: `clip(round(v * (num_bins - 1)), 0, num_bins - 1)`, rounding half to
    even (`torch.round`) as the official code does.

    Args:
        coords (`torch.Tensor`): coordinates of any shape.
        num_bins (`int`): number of bins.

    Returns:
        `torch.LongTensor` of the same shape.
    """
    return torch.round(coords.float() * (num_bins - 1)).clamp(0, num_bins - 1).long()


def dequantize_coordinates(bins: torch.Tensor, num_bins: int) -> torch.FloatTensor:
    """Maps bins back to normalised coordinates `bin / (num_bins - 1)`."""
    return bins.float() / (num_bins - 1)


def _truncated_normal(shape, std: float, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """Normal(0, std) samples truncated to [-bound, bound]."""
    return torch.nn.init.trunc_normal_(torch.empty(shape), mean=0.0, std=std, a=-bound, b=bound, generator=generator)


class Pix2SeqBoxCodec:
    """
    Writes objects as Pix2Seq token sequences (with the paper's sequence augmentation) and reads generated sequences
    back into boxes, labels and scores.

    Boxes given to and returned by the codec are `xyxy` (x_min, y_min, x_max, y_max), normalised to the padded square
    canvas. Tokens are written in the paper's order `ymin xmin ymax xmax class`.

    Args:
        layout (`Pix2SeqTokenLayout`): the token layout.
        object_order (`str`, *optional*, defaults to `"random"`): order of the real objects in a training sequence:
            `"random"` (the paper's choice), `"area"` (largest first), `"dist2ori"` (top-left corner closest to the
            origin first), `"class"` (by label) or `"none"` (as given).
        sequence_augmentation (`bool`, *optional*, defaults to `True`): top every sequence up to `max_objects` with
            noise objects and corrupt the class tokens of the decoder input (paper section 2.3). Off: real objects,
            then EOS, then padding.
        class_corruption_prob (`float`, *optional*, defaults to 0.5): with augmentation on, probability that a class
            token of the decoder input is replaced by a random real class; otherwise it is replaced by the noise token.
        duplicate_jitter (`float`, *optional*, defaults to 0.05): sigma of the jitter of duplicate noise boxes, as a
            share of the box's width/height (truncated at twice that).
        random_box_size_std (`float`, *optional*, defaults to 0.5): sigma of the size of random noise boxes (truncated
            normal at +-2 sigma, absolute value).
    """

    def __init__(
        self,
        layout: Pix2SeqTokenLayout,
        object_order: str = "random",
        sequence_augmentation: bool = True,
        class_corruption_prob: float = 0.5,
        duplicate_jitter: float = 0.05,
        random_box_size_std: float = 0.5,
    ):
        if object_order not in OBJECT_ORDERS:
            raise ValueError(f"Unknown object_order {object_order!r}; choose one of {OBJECT_ORDERS}.")
        if not 0.0 <= class_corruption_prob <= 1.0:
            raise ValueError(f"`class_corruption_prob` must be in [0, 1], got {class_corruption_prob}.")
        if duplicate_jitter < 0 or random_box_size_std <= 0:
            raise ValueError(
                f"Noise scales must be positive: duplicate_jitter={duplicate_jitter}, "
                f"random_box_size_std={random_box_size_std}."
            )
        layout.validate()
        self.layout = layout
        self.object_order = object_order
        self.sequence_augmentation = sequence_augmentation
        self.class_corruption_prob = class_corruption_prob
        self.duplicate_jitter = duplicate_jitter
        self.random_box_size_std = random_box_size_std

    # ---------------------------------------------------------------------------------------------------------------
    # Encoding
    # ---------------------------------------------------------------------------------------------------------------

    def _check_objects(self, boxes, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Validates boxes/labels and returns them as float `[N, 4]` (clipped to [0, 1]) and long `[N]` tensors."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"`boxes` must have shape [N, 4] (xyxy), got {tuple(boxes.shape)}.")
        labels = labels.reshape(-1)
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"Got {boxes.shape[0]} boxes but {labels.shape[0]} labels.")
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise ValueError(f"Box {index} has a non-finite coordinate: {boxes[index].tolist()}.")
        out_of_range = (labels < 0) | (labels >= self.layout.num_classes)
        if out_of_range.any():
            index = int(out_of_range.nonzero()[0])
            raise ValueError(
                f"Object {index} has label {int(labels[index])}, outside [0, num_classes={self.layout.num_classes})."
            )
        boxes = boxes.clamp(0.0, 1.0)
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            index = int(degenerate.nonzero()[0])
            raise ValueError(
                f"Box {index} is degenerate (zero area after clipping to the canvas): {boxes[index].tolist()} (xyxy)."
            )
        return boxes, labels

    def encode_objects(self, boxes, labels) -> torch.LongTensor:
        """
        Writes objects as tokens, in the given order and without EOS.

        Args:
            boxes (`torch.Tensor` of shape `[N, 4]`): xyxy boxes normalised to the canvas.
            labels (`torch.Tensor` of shape `[N]`): labels in `[0, num_classes)`.

        Returns:
            `torch.LongTensor` of shape `[5 * N]`.
        """
        boxes, labels = self._check_objects(boxes, labels)
        return self._tokens(boxes, labels + self.layout.class_token_offset)

    def _tokens(self, boxes: torch.Tensor, class_tokens: torch.Tensor) -> torch.LongTensor:
        """Objects (xyxy boxes, class *tokens*) -> flat `ymin xmin ymax xmax class` tokens."""
        yxyx = boxes[:, [1, 0, 3, 2]]
        coords = quantize_coordinates(yxyx, self.layout.num_bins) + self.layout.coord_token_offset
        return torch.cat([coords, class_tokens.reshape(-1, 1).long()], dim=1).reshape(-1)

    def _order(self, boxes: torch.Tensor, labels: torch.Tensor, generator) -> torch.LongTensor:
        count = boxes.shape[0]
        if self.object_order == "random":
            return torch.randperm(count, generator=generator)
        if self.object_order == "area":
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            return torch.argsort(area, descending=True, stable=True)
        if self.object_order == "dist2ori":
            return torch.argsort(boxes[:, 0] ** 2 + boxes[:, 1] ** 2, stable=True)
        if self.object_order == "class":
            return torch.argsort(labels, stable=True)
        return torch.arange(count)

    def _noise_boxes(self, boxes: torch.Tensor, count: int, generator) -> torch.Tensor:
        """
        `count` noise boxes (xyxy, clipped to [0, 1]) for an image whose real boxes are `boxes` (paper section 2.3):
        a uniform share of duplicates (real boxes with jittered coordinates), the rest bad boxes, half of them real boxes
        moved to a random centre and half random boxes. With no real box, random boxes only.
        """
        if count == 0:
            return torch.zeros(0, 4)
        num_real = boxes.shape[0]
        if num_real == 0:
            num_duplicates, num_shifted = 0, 0
        else:
            num_duplicates = int(torch.rand((), generator=generator) * (count + 1)) if count > 0 else 0
            num_duplicates = min(num_duplicates, count)
            num_shifted = (count - num_duplicates) // 2
        num_random = count - num_duplicates - num_shifted
        parts = []
        if num_duplicates:
            source = boxes[torch.randint(num_real, (num_duplicates,), generator=generator)]
            size = (source[:, 2:] - source[:, :2]).repeat(1, 2)
            jitter = _truncated_normal((num_duplicates, 4), self.duplicate_jitter, 2 * self.duplicate_jitter, generator)
            parts.append(source + jitter * size)
        if num_shifted:
            source = boxes[torch.randint(num_real, (num_shifted,), generator=generator)]
            half_size = (source[:, 2:] - source[:, :2]) / 2
            centre = torch.rand(num_shifted, 2, generator=generator)
            parts.append(torch.cat([centre - half_size, centre + half_size], dim=1))
        if num_random:
            centre = torch.rand(num_random, 2, generator=generator)
            half_size = _truncated_normal((num_random, 2), self.random_box_size_std, 2 * self.random_box_size_std, generator)
            half_size = half_size.abs() / 2
            parts.append(torch.cat([centre - half_size, centre + half_size], dim=1))
        return torch.cat(parts).clamp(0.0, 1.0)

    def build_training_sequence(self, boxes, labels, generator: torch.Generator | None = None) -> dict:
        """
        Builds the decoder input and the target of one image (DESIGN.md section 4).

        Args:
            boxes (`torch.Tensor` of shape `[N, 4]`): xyxy boxes normalised to the canvas; slightly outside [0, 1] is
                clipped, a box of zero area after clipping is a `ValueError`.
            labels (`torch.Tensor` of shape `[N]`): labels in `[0, num_classes)`.
            generator (`torch.Generator`, *optional*): source of the randomness (order, noise, corruption).

        Returns:
            `dict` with `decoder_input_ids` and `labels`, both `torch.LongTensor` of shape `[5 * max_objects]`.
            More than `max_objects` objects are truncated after ordering. In `labels`, noise objects have the noise
            token as class target and `-100` (ignored) as coordinate targets.
        """
        layout = self.layout
        boxes, labels = self._check_objects(boxes, labels)
        order = self._order(boxes, labels, generator)[: layout.max_objects]
        boxes, labels = boxes[order], labels[order]
        length = layout.max_sequence_length
        real_tokens = self._tokens(boxes, labels + layout.class_token_offset)

        if self.sequence_augmentation:
            num_noise = layout.max_objects - boxes.shape[0]
            noise = self._noise_boxes(boxes, num_noise, generator)
            noise_tokens = self._tokens(noise, torch.full((num_noise,), layout.noise_token_id))
            sequence = torch.cat([real_tokens, noise_tokens])
            targets = sequence.clone()
            noise_coords = torch.zeros(length, dtype=torch.bool)
            noise_coords[real_tokens.numel() :] = True
            noise_coords[4::5] = False
            targets[noise_coords] = -100

            corrupted = sequence.clone()
            is_class = torch.zeros(length, dtype=torch.bool)
            is_class[4::5] = True
            random_class = torch.randint(
                layout.class_token_offset, layout.class_token_end, (length,), generator=generator
            )
            use_random = torch.rand(length, generator=generator) < self.class_corruption_prob
            replacement = torch.where(use_random, random_class, torch.full_like(random_class, layout.noise_token_id))
            corrupted[is_class] = replacement[is_class]
            inputs = corrupted
        else:
            sequence = torch.full((length,), layout.pad_token_id, dtype=torch.long)
            sequence[: real_tokens.numel()] = real_tokens
            if real_tokens.numel() < length:
                sequence[real_tokens.numel()] = layout.eos_token_id
            targets = sequence
            inputs = sequence
        decoder_input_ids = torch.cat([torch.tensor([layout.bos_token_id]), inputs[:-1]])
        return {"decoder_input_ids": decoder_input_ids, "labels": targets}

    def batch_build_training_sequences(self, boxes_list, labels_list, generator: torch.Generator | None = None) -> dict:
        """`build_training_sequence` for a batch; returns `decoder_input_ids` and `labels` of shape `[B, 5 * max_objects]`."""
        if len(boxes_list) != len(labels_list):
            raise ValueError(f"Got {len(boxes_list)} box lists but {len(labels_list)} label lists.")
        built = [self.build_training_sequence(b, l, generator) for b, l in zip(boxes_list, labels_list)]
        return {key: torch.stack([item[key] for item in built]) for key in ("decoder_input_ids", "labels")}

    # ---------------------------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------------------------

    def decode(self, sequences: torch.Tensor, logits: torch.Tensor | None = None) -> list[dict]:
        """
        Reads objects out of generated sequences.

        Objects are read in groups of five from the start; reading stops at an EOS. A group with a token of the wrong
        kind in a slot, an EOS inside it, or cut short by the end of the sequence is dropped; malformed input never
        raises.

        Args:
            sequences (`torch.LongTensor` of shape `[B, T]`): generated tokens *without* the BOS prompt.
            logits (`torch.FloatTensor` of shape `[B, T, V]`, *optional*): the raw logits that produced each token.
                With them, the label of an object is the best real class under a softmax over the full vocabulary at
                its class slot, and its score the probability of that class (a sampled noise object thus gets the best
                real class). Without them the label is read from the class token, the score is 1 and noise objects are
                dropped.

        Returns:
            `list[dict]`, one per sequence, with `boxes` (`[n, 4]` xyxy normalised to the canvas, min/max sorted per
            axis), `labels` (`[n]`) and `scores` (`[n]`).
        """
        layout = self.layout
        sequences = torch.as_tensor(sequences)
        if sequences.ndim == 1:
            sequences = sequences[None]
            logits = logits[None] if logits is not None else None
        batch_size, length = sequences.shape
        num_groups = length // 5
        device = sequences.device
        groups = sequences[:, : 5 * num_groups].reshape(batch_size, num_groups, 5)

        is_coord = (groups[..., :4] >= layout.coord_token_offset) & (groups[..., :4] < layout.coord_token_end)
        class_tokens = groups[..., 4]
        is_real_class = (class_tokens >= layout.class_token_offset) & (class_tokens < layout.class_token_end)
        is_noise = class_tokens == layout.noise_token_id
        well_formed = is_coord.all(dim=-1) & (is_real_class | (is_noise & (logits is not None)))
        # Everything from the group holding the first EOS on is dropped.
        eos_in_group = (groups == layout.eos_token_id).any(dim=-1)
        before_eos = eos_in_group.long().cumsum(dim=1) == 0
        keep = well_formed & before_eos

        coords = dequantize_coordinates((groups[..., :4] - layout.coord_token_offset).clamp(min=0), layout.num_bins)
        y0, x0, y1, x1 = coords.unbind(-1)
        boxes = torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)], -1)

        if logits is not None:
            class_logits = logits[:, 4 : 5 * num_groups : 5].float()
            log_probs = torch.log_softmax(class_logits, dim=-1)[..., layout.class_token_offset : layout.class_token_end]
            best, labels = log_probs.max(dim=-1)
            scores = best.exp()
        else:
            labels = (class_tokens - layout.class_token_offset).clamp(min=0)
            scores = torch.ones(batch_size, num_groups, device=device)

        return [
            {"boxes": boxes[i][keep[i]], "labels": labels[i][keep[i]], "scores": scores[i][keep[i]]}
            for i in range(batch_size)
        ]
