"""Token layout of Pix2Seq sequences and the box codec that turns boxes into tokens and back."""

from __future__ import annotations

from dataclasses import fields

import torch

from .configuration_pix2seq import TOKENS_PER_OBJECT, Pix2SeqTokenLayout


OBJECT_ORDERS = ("random", "area", "dist2ori", "class", "none")
"""Orders of the real objects in a training sequence; `"none"` keeps the given order."""

NOISE_KINDS = ("duplicate", "shifted", "random")
"""Kinds of noise objects, indexed by the `kinds` that `Pix2SeqBoxCodec.sample_noise_objects` returns."""


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"`num_bins` must be an integer of at least 2, got {num_bins!r}.")


def quantize_coordinates(coords: torch.Tensor, num_bins: int) -> torch.LongTensor:
    """
    Maps normalised coordinates in [0, 1] to bins: `clip(round(v * (num_bins - 1)), 0, num_bins - 1)`, rounding half to
    even (`torch.round`) as the official code does. Values outside [0, 1] land in the first/last bin.

    Args:
        coords (`torch.Tensor`): coordinates of any shape; must be finite.
        num_bins (`int`): number of bins (at least 2).

    Returns:
        `torch.LongTensor` of the same shape.
    """
    _check_num_bins(num_bins)
    coords = torch.as_tensor(coords).float()
    if not bool(torch.isfinite(coords).all()):
        raise ValueError("Cannot quantise non-finite coordinates (NaN or inf).")
    return torch.round(coords * (num_bins - 1)).clamp(0, num_bins - 1).long()


def dequantize_coordinates(bins: torch.Tensor, num_bins: int) -> torch.FloatTensor:
    """
    Maps bins back to normalised coordinates: `bin / (num_bins - 1)`.

    Args:
        bins (`torch.Tensor`): bin indices of any shape.
        num_bins (`int`): number of bins (at least 2).

    Returns:
        `torch.FloatTensor` of the same shape.
    """
    _check_num_bins(num_bins)
    return torch.as_tensor(bins).float() / (num_bins - 1)


def check_coordinate_window(window) -> None:
    """Raises a `ValueError` unless `window` (the `coordinate_window` option) is a non-negative int."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"`coordinate_window` must be a non-negative int (bins), got {window!r}.")


def read_coordinate_distributions(
    coordinate_logits: torch.Tensor, bins: torch.Tensor, window: int
) -> tuple[torch.FloatTensor, torch.FloatTensor]:
    """
    Reads the model's distributions over the coordinate bins around the written bins:

    - a sub-bin position: the mean bin under the softmax over the coordinate bins, restricted to the `window` bins
      either side of the written bin (fewer where the written bin is nearer than that to the first or last, so that
      edges are not pulled inwards). It recovers the part of a box's position that the bins' spacing and the model's
      spread round off, without moving a coordinate towards another object's edge farther away;
    - a confidence: the probability mass within `window` bins of the written bin (the bins that exist), the
      probability that the coordinate lies there.

    Args:
        coordinate_logits (`torch.Tensor` of shape `[..., num_bins]`): raw logits of the coordinate tokens.
        bins (`torch.LongTensor` of shape `[...]`): the written bins, in `[0, num_bins)`.
        window (`int`): bins either side of the written one that count (at least 1).

    Returns:
        `(positions, confidences)`: `torch.FloatTensor`s of shape `[...]`, fractional bins (for
        `dequantize_coordinates`) and probabilities.
    """
    check_coordinate_window(window)
    if window == 0:
        raise ValueError("`coordinate_window=0` reads the written bins: there is no distribution to read.")
    num_bins = coordinate_logits.shape[-1]
    offsets = torch.arange(-window, window + 1, device=bins.device)
    unclipped = bins[..., None] + offsets
    neighbours = unclipped.clamp(0, num_bins - 1)
    log_probs = torch.log_softmax(coordinate_logits.float(), dim=-1).gather(-1, neighbours)
    exists = (unclipped >= 0) & (unclipped < num_bins)
    confidences = log_probs.masked_fill(~exists, float("-inf")).exp().sum(-1)
    symmetric = offsets.abs() <= torch.minimum(bins, num_bins - 1 - bins)[..., None]
    weights = torch.softmax(log_probs.masked_fill(~symmetric, float("-inf")), dim=-1)
    return (weights * neighbours).sum(-1), confidences


def best_class_scores(class_logits: torch.Tensor, token_layout) -> tuple[torch.FloatTensor, torch.LongTensor]:
    """
    The score and label of objects from the raw logits at their class token: the best real class under a softmax
    over the full vocabulary (noise, coordinates and EOS take their share of the mass, so an unsure object scores low).

    Args:
        class_logits (`torch.Tensor` of shape `(..., vocab_size)`): raw logits at class tokens.
        token_layout (`Pix2SeqTokenLayout`): where the class tokens are.

    Returns:
        `(scores, labels)`, each of shape `(...)`: probabilities in `[0, 1]` and labels in `[0, num_classes)`.
    """
    log_probs = torch.log_softmax(class_logits.float(), dim=-1)
    best, labels = log_probs[..., token_layout.class_token_offset : token_layout.class_token_end].max(dim=-1)
    return best.exp(), labels


def _truncated_normal(shape, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Normal(0, std) samples truncated at +-2 std (as `tf.random.truncated_normal`, used by the official code)."""
    if std == 0:
        return torch.zeros(shape)
    return torch.nn.init.trunc_normal_(
        torch.empty(shape), mean=0.0, std=std, a=-2 * std, b=2 * std, generator=generator
    )


def _boxes_from_centres(centres: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes from `[n, 2]` (x, y) centres and `[n, 2]` (width, height) sizes."""
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)


class Pix2SeqBoxCodec:
    """
    Writes objects as Pix2Seq token sequences (with the paper's sequence augmentation) and reads generated sequences
    back into boxes, labels and scores.

    Boxes given to and returned by the codec are `xyxy` (x_min, y_min, x_max, y_max) floats normalised to the padded
    square canvas, in [0, 1]. Tokens are written in the paper's order `ymin xmin ymax xmax class`.

    Args:
        layout (`Pix2SeqTokenLayout`): the token layout (e.g. `config.token_layout`).
        object_order (`str`, *optional*, defaults to `"random"`): order of the real objects in a training sequence:
            `"random"` (a new shuffle on every call, the paper's choice), `"area"` (largest first), `"dist2ori"`
            (top-left corner closest to the canvas origin first), `"class"` (by label) or `"none"` (as given). Ties
            keep the given order.
        sequence_augmentation (`bool`, *optional*, defaults to `True`): top every sequence up to `max_objects` with
            noise objects and corrupt the class tokens of the decoder input (paper section 2.3). Off: real objects,
            then EOS, then padding, and the decoder input is the clean target shifted right.
        class_corruption_prob (`float`, *optional*, defaults to 0.5): with augmentation on, every class token of the
            decoder input (real and noise objects alike) is replaced, with this probability by a uniformly drawn real
            class token, otherwise by the noise token (the official `rand_n_fake_cls` corruption).
        duplicate_noise_share (`float`, *optional*): share of the noise objects that are duplicates of real objects;
            the rest are "bad" boxes. `None` (default) follows the official release: on every call the number of
            duplicates is drawn uniformly from `0..num_noise`, so the share is uniform on [0, 1] (1/2 on average; the
            paper gives no number). A float `s` in [0, 1] makes it `round(s * num_noise)` on every call.
        duplicate_jitter (`float`, *optional*, defaults to 0.05): each coordinate of a duplicate is its source's plus
            a normal jitter of this sigma times the source's width (x) or height (y), truncated at 2 sigma.
        random_box_size_std (`float`, *optional*, defaults to 0.5): width and height of a random noise box are
            `|normal(0, sigma)|` truncated at 2 sigma (so at most 1 with the default), in canvas units.

    Noise objects (sequence augmentation on) fill the sequence up to `max_objects`, after the real objects and in a
    random order: duplicates, and "bad" boxes, each either a real box moved to a uniform centre or a random box with a
    uniform centre (about half and half: like the official release, the codec keeps a random `num_bad` of `num_bad`
    shifted plus `num_bad` random candidates). Every noise box is clipped to [0, 1]. With no real object, all noise
    objects are random boxes.
    """

    def __init__(
        self,
        layout: Pix2SeqTokenLayout,
        object_order: str = "random",
        sequence_augmentation: bool = True,
        class_corruption_prob: float = 0.5,
        duplicate_noise_share: float | None = None,
        duplicate_jitter: float = 0.05,
        random_box_size_std: float = 0.5,
    ):
        if not isinstance(layout, Pix2SeqTokenLayout):
            # With remote code the config and the model import this module separately, so the layout may be the same
            # dataclass from another copy of the module: accept anything that carries every layout field.
            names = [f.name for f in fields(Pix2SeqTokenLayout)]
            if not all(hasattr(layout, name) for name in names):
                raise TypeError(
                    f"`layout` must be a `Pix2SeqTokenLayout` (e.g. `config.token_layout`), got {type(layout).__name__}."
                )
            layout = Pix2SeqTokenLayout(**{name: getattr(layout, name) for name in names})
        if object_order not in OBJECT_ORDERS:
            raise ValueError(f"Unknown object_order {object_order!r}; choose one of {OBJECT_ORDERS}.")
        if not isinstance(sequence_augmentation, bool):
            raise ValueError(f"`sequence_augmentation` must be a bool, got {sequence_augmentation!r}.")
        if not 0.0 <= class_corruption_prob <= 1.0:
            raise ValueError(f"`class_corruption_prob` must be in [0, 1], got {class_corruption_prob}.")
        if duplicate_noise_share is not None and not 0.0 <= duplicate_noise_share <= 1.0:
            raise ValueError(f"`duplicate_noise_share` must be None or in [0, 1], got {duplicate_noise_share}.")
        if not duplicate_jitter >= 0:
            raise ValueError(f"`duplicate_jitter` must be non-negative, got {duplicate_jitter}.")
        if not random_box_size_std > 0:
            raise ValueError(f"`random_box_size_std` must be positive, got {random_box_size_std}.")
        layout.validate()
        self.layout = layout
        self.object_order = object_order
        self.sequence_augmentation = sequence_augmentation
        self.class_corruption_prob = float(class_corruption_prob)
        self.duplicate_noise_share = None if duplicate_noise_share is None else float(duplicate_noise_share)
        self.duplicate_jitter = float(duplicate_jitter)
        self.random_box_size_std = float(random_box_size_std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layout={self.layout}, object_order={self.object_order!r}, "
            f"sequence_augmentation={self.sequence_augmentation}, class_corruption_prob={self.class_corruption_prob}, "
            f"duplicate_noise_share={self.duplicate_noise_share}, duplicate_jitter={self.duplicate_jitter}, "
            f"random_box_size_std={self.random_box_size_std})"
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Encoding
    # ---------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_boxes(boxes) -> torch.Tensor:
        """Validates boxes and returns them as a float CPU tensor `[N, 4]` clipped to [0, 1]."""
        boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float32)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"`boxes` must have shape [N, 4] (xyxy), got {tuple(boxes.shape)}.")
        finite = torch.isfinite(boxes).all(dim=1)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            raise ValueError(f"`boxes[{index}]` has a non-finite coordinate: {boxes[index].tolist()}.")
        boxes = boxes.clamp(0.0, 1.0)
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bool(degenerate.any()):
            index = int(degenerate.nonzero()[0])
            raise ValueError(
                f"`boxes[{index}]` is degenerate (x_max <= x_min or y_max <= y_min after clipping to the canvas): "
                f"{boxes[index].tolist()} (xyxy, clipped). Drop such boxes before encoding."
            )
        return boxes

    def _check_objects(self, boxes, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Validates boxes/labels and returns them as float `[N, 4]` (clipped to [0, 1]) and long `[N]` CPU tensors."""
        boxes = self._check_boxes(boxes)
        labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
        if labels.is_floating_point() or labels.is_complex():
            whole = labels.is_floating_point() and bool((labels == labels.round()).all())
            if not whole:
                raise ValueError(f"`labels` must be integer class indices, got {labels.tolist()}.")
        labels = labels.long()
        if labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"Got {boxes.shape[0]} boxes but {labels.shape[0]} labels; `boxes` and `labels` must match."
            )
        out_of_range = (labels < 0) | (labels >= self.layout.num_classes)
        if bool(out_of_range.any()):
            index = int(out_of_range.nonzero()[0])
            raise ValueError(
                f"Object {index} has label {int(labels[index])} (`labels[{index}]`), outside "
                f"[0, num_classes={self.layout.num_classes})."
            )
        return boxes, labels

    def encode_objects(self, boxes, labels) -> torch.LongTensor:
        """
        Writes objects as tokens, in the given order and without EOS.

        Args:
            boxes (`torch.Tensor` of shape `[N, 4]`): xyxy boxes normalised to the canvas (clipped to [0, 1]).
            labels (`torch.Tensor` of shape `[N]`): labels in `[0, num_classes)`.

        Returns:
            `torch.LongTensor` of shape `[5 * N]`: `ymin xmin ymax xmax class` per object.
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

    def sample_noise_objects(self, boxes, count: int, generator: torch.Generator | None = None) -> dict:
        """
        Draws the noise objects of sequence augmentation for an image (see the class docstring for the recipe).

        Args:
            boxes (`torch.Tensor` of shape `[N, 4]`): the image's real xyxy boxes (after truncation to `max_objects`).
            count (`int`): number of noise objects to draw.
            generator (`torch.Generator`, *optional*): source of the randomness.

        Returns:
            `dict` with `boxes` (`torch.FloatTensor` `[count, 4]`, xyxy clipped to [0, 1], in random order), `kinds`
            (`torch.LongTensor` `[count]`, indices into `NOISE_KINDS`) and `sources` (`torch.LongTensor` `[count]`,
            the real box a duplicate or shifted box was made from, `-1` for random boxes).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"`count` must be a non-negative integer, got {count!r}.")
        return self._sample_noise(self._check_boxes(boxes), count, generator)

    def _sample_noise(self, boxes: torch.Tensor, count: int, generator) -> dict:
        num_real = boxes.shape[0]
        if num_real == 0:
            num_duplicates = 0
        elif self.duplicate_noise_share is None:
            num_duplicates = int(torch.randint(count + 1, (), generator=generator))
        else:
            num_duplicates = round(self.duplicate_noise_share * count)
        num_bad = count - num_duplicates
        if num_real == 0:
            num_shifted = 0
        else:
            # Keep a random `num_bad` of `num_bad` shifted + `num_bad` random candidates, as the official release does.
            num_shifted = int((torch.randperm(2 * num_bad, generator=generator)[:num_bad] < num_bad).sum())
        num_random = num_bad - num_shifted

        def draw_sources(k: int) -> torch.Tensor:
            # Without replacement from the real boxes tiled often enough: every real box is used about equally.
            if k == 0:
                return torch.zeros(0, dtype=torch.long)
            tiles = k // num_real + 1
            return torch.randperm(num_real * tiles, generator=generator)[:k] % num_real

        duplicate_sources, shifted_sources = draw_sources(num_duplicates), draw_sources(num_shifted)
        duplicates = boxes[duplicate_sources]
        sizes = (duplicates[:, 2:] - duplicates[:, :2]).repeat(1, 2)
        duplicates = duplicates + _truncated_normal((num_duplicates, 4), self.duplicate_jitter, generator) * sizes

        shifted = boxes[shifted_sources]
        shifted = _boxes_from_centres(torch.rand(num_shifted, 2, generator=generator), shifted[:, 2:] - shifted[:, :2])

        random_sizes = _truncated_normal((num_random, 2), self.random_box_size_std, generator).abs()
        random_boxes = _boxes_from_centres(torch.rand(num_random, 2, generator=generator), random_sizes)

        noise = torch.cat([duplicates, shifted, random_boxes]).clamp(0.0, 1.0)
        kinds = torch.cat(
            [
                torch.full((n,), kind, dtype=torch.long)
                for kind, n in enumerate((num_duplicates, num_shifted, num_random))
            ]
        )
        sources = torch.cat([duplicate_sources, shifted_sources, torch.full((num_random,), -1, dtype=torch.long)])
        # Duplicates and bad boxes are interleaved, so their place in the sequence says nothing about their kind.
        shuffle = torch.randperm(count, generator=generator)
        return {"boxes": noise[shuffle], "kinds": kinds[shuffle], "sources": sources[shuffle]}

    def build_training_sequence(self, boxes, labels, generator: torch.Generator | None = None) -> dict:
        """
        Builds the decoder input and the target of one image (sequence augmentation: see docs/concepts.md).

        Real objects are ordered (`object_order`) and truncated to `max_objects`. With sequence augmentation the
        sequence is topped up to `max_objects` objects with noise objects; in the target a noise object has the noise
        token as class and `-100` (ignored by the loss) as coordinates, and in the decoder input every class token is
        corrupted (see `class_corruption_prob`). Without augmentation the sequence is the real objects, then EOS, then
        padding (the EOS id) to `5 * max_objects` tokens (no EOS when `max_objects` objects fill it), and the decoder
        input is that sequence shifted right. The decoder input always starts with BOS and ends one token before the
        target does. EOS/padding targets are left as token ids: the model weighs them with `eos_token_weight`.

        Args:
            boxes (`torch.Tensor` of shape `[N, 4]`): xyxy boxes normalised to the canvas; coordinates outside
                [0, 1] are clipped. A non-finite coordinate, or a box with `x_max <= x_min` or `y_max <= y_min` after
                clipping, is a `ValueError` naming its index.
            labels (`torch.Tensor` of shape `[N]`): labels in `[0, num_classes)`.
            generator (`torch.Generator`, *optional*): CPU source of the randomness (order, noise, corruption).

        Returns:
            `dict` with `decoder_input_ids` and `labels`, both CPU `torch.LongTensor` of shape `[5 * max_objects]`.
        """
        boxes, labels = self._check_objects(boxes, labels)
        return self._training_sequence(boxes, labels, generator)

    def _training_sequence(self, boxes: torch.Tensor, labels: torch.Tensor, generator) -> dict:
        """`build_training_sequence` of objects already checked (as `_check_objects` returns them)."""
        layout = self.layout
        order = self._order(boxes, labels, generator)[: layout.max_objects]
        boxes, labels = boxes[order], labels[order]
        num_real, length = boxes.shape[0], layout.max_sequence_length
        real_tokens = self._tokens(boxes, labels + layout.class_token_offset)

        if not self.sequence_augmentation:
            targets = torch.full((length,), layout.pad_token_id, dtype=torch.long)
            targets[: real_tokens.numel()] = real_tokens
            if num_real < layout.max_objects:
                targets[real_tokens.numel()] = layout.eos_token_id
            inputs = targets
        else:
            num_noise = layout.max_objects - num_real
            noise = self._sample_noise(boxes, num_noise, generator)["boxes"]
            noise_tokens = self._tokens(noise, torch.full((num_noise,), layout.noise_token_id))
            sequence = torch.cat([real_tokens, noise_tokens]).reshape(layout.max_objects, TOKENS_PER_OBJECT)

            targets = sequence.clone()
            targets[num_real:, :4] = -100
            inputs = sequence.clone()
            random_classes = torch.randint(
                layout.class_token_offset, layout.class_token_end, (layout.max_objects,), generator=generator
            )
            use_random = torch.rand(layout.max_objects, generator=generator) < self.class_corruption_prob
            inputs[:, 4] = torch.where(
                use_random, random_classes, torch.full_like(random_classes, layout.noise_token_id)
            )
            targets, inputs = targets.reshape(-1), inputs.reshape(-1)

        decoder_input_ids = torch.cat([torch.tensor([layout.bos_token_id]), inputs[:-1]])
        return {"decoder_input_ids": decoder_input_ids, "labels": targets}

    def batch_build_training_sequences(
        self, boxes_list, labels_list, generator: torch.Generator | None = None
    ) -> dict:
        """
        `build_training_sequence` for each image of a batch.

        Args:
            boxes_list (`list` of `torch.Tensor` `[N_i, 4]`): xyxy boxes per image.
            labels_list (`list` of `torch.Tensor` `[N_i]`): labels per image.
            generator (`torch.Generator`, *optional*): CPU source of the randomness, drawn from image by image.

        Returns:
            `dict` with `decoder_input_ids` and `labels` of shape `[B, 5 * max_objects]`. A bad image raises the
            `ValueError` of `build_training_sequence`, prefixed with its index in the batch.
        """
        if len(boxes_list) != len(labels_list):
            raise ValueError(f"Got {len(boxes_list)} box lists but {len(labels_list)} label lists.")
        checked_boxes, checked_labels = [], []
        for index, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
            try:
                boxes, labels = self._check_objects(boxes, labels)
            except ValueError as error:
                raise ValueError(f"Image {index} of the batch: {error}") from error
            checked_boxes.append(boxes)
            checked_labels.append(labels)
        return self._batch_training_sequences(checked_boxes, checked_labels, generator)

    def _batch_training_sequences(
        self, boxes_list: list[torch.Tensor], labels_list: list[torch.Tensor], generator: torch.Generator | None
    ) -> dict:
        """
        `batch_build_training_sequences` of objects already checked where they entered: per image, float CPU boxes
        `[N, 4]` (xyxy in [0, 1], each with area) and long CPU labels `[N]` in `[0, num_classes)` (the processor
        checks them in pixels, before normalising them to the canvas).
        """
        built = [
            self._training_sequence(boxes, labels, generator)
            for boxes, labels in zip(boxes_list, labels_list, strict=True)
        ]
        length = self.layout.max_sequence_length
        if not built:
            return {key: torch.zeros(0, length, dtype=torch.long) for key in ("decoder_input_ids", "labels")}
        return {key: torch.stack([item[key] for item in built]) for key in ("decoder_input_ids", "labels")}

    # ---------------------------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------------------------

    def decode_groups(
        self,
        sequences: torch.Tensor,
        logits: torch.Tensor | None = None,
        mode: str = "strict",
        coordinate_window: int = 0,
    ) -> dict:
        """
        Reads generated sequences object by object into padded tensors: the one reader of Pix2Seq tokens.

        Group `g` of a sequence is its tokens `TOKENS_PER_OBJECT * g` to `TOKENS_PER_OBJECT * g + 4`; a trailing group
        cut short by the end of the sequence is not read. The box of a group is its four coordinate slots
        (`ymin xmin ymax xmax`) dequantised, a token outside the coordinate range counting as the nearest bin.

        - `mode="strict"` (detection): a group holds an object (`mask` is true) when its slots 0-3 are coordinate
          tokens, its slot 4 is a class token (or, with `logits`, the noise token) and no EOS came before or inside
          it. A box written with min > max on an axis is returned with the two sorted.
        - `mode="official"` (the official COCO evaluation, `decode_object_seq_to_bbox`): every group is read whatever
          its tokens (EOS included); the class is the argmax of the softmax over the whole vocabulary restricted to
          `[class_token_offset, coord_token_offset)`. A group is masked out when that class lies beyond the model's
          classes (COCO's evaluation cannot match it) or its box has max < min on an axis (a negative area, which
          COCO's evaluation ignores). Needs `logits`.

        Args:
            sequences (`torch.LongTensor` of shape `[B, T]` or `[T]`): generated tokens *without* the BOS prompt.
            logits (`torch.FloatTensor` of shape `[B, T, V]` or `[T, V]`, *optional*): the raw logits that produced
                each token. With them, the label is the best class under a softmax over the full vocabulary at the
                class slot and the score its probability (times the box's coordinate confidence with a
                `coordinate_window`). Without them (strict mode only), the label is read from the
                class token and the score is 1.
            mode (`str`, *optional*, defaults to `"strict"`): `"strict"` or `"official"`, as above.
            coordinate_window (`int`, *optional*, defaults to 0): with `logits` in strict mode and above 0, each
                coordinate is the mean bin of the model's distribution within this many bins of the written one, and
                the score is multiplied by the geometric mean of the four coordinates' probability mass there
                ([`read_coordinate_distributions`]); 0 reads the written bins and scores the class alone.

        Returns:
            `dict` with, for `G = T // TOKENS_PER_OBJECT` groups: `boxes` (`[B, G, 4]` xyxy normalised to the canvas),
            `labels` (`[B, G]`), `scores` (`[B, G]`) and `mask` (`[B, G]` bool), where `mask` is false boxes and
            scores are 0 and labels -1; with `logits` also `class_log_probs` (`[B, G, num_classes]`, float32), the
            log-probabilities of the real classes at each class slot (softmax over the full vocabulary).
        """
        if mode not in ("strict", "official"):
            raise ValueError(f'`mode` must be "strict" or "official", got {mode!r}.')
        check_coordinate_window(coordinate_window)
        if mode == "official" and logits is None:
            raise ValueError("The official reading takes the class and score from the raw `logits`; pass them.")
        layout = self.layout
        sequences = torch.as_tensor(sequences)
        if sequences.is_floating_point() or sequences.is_complex():
            raise ValueError(f"`sequences` must hold integer token ids, got dtype {sequences.dtype}.")
        if sequences.ndim == 1:
            sequences = sequences[None]
            logits = logits[None] if logits is not None else None
        if sequences.ndim != 2:
            raise ValueError(f"`sequences` must have shape [batch_size, length], got {tuple(sequences.shape)}.")
        sequences = sequences.long()
        if logits is not None:
            logits = torch.as_tensor(logits)
            if logits.ndim != 3 or logits.shape[:2] != sequences.shape:
                raise ValueError(
                    f"`logits` must have shape [batch_size, length, vocab_size] matching `sequences` "
                    f"{tuple(sequences.shape)}, got {tuple(logits.shape)}."
                )
            if logits.shape[-1] < layout.class_token_end:
                raise ValueError(
                    f"`logits` cover {logits.shape[-1]} tokens, fewer than the class tokens need "
                    f"(up to id {layout.class_token_end - 1})."
                )
        batch_size, length = sequences.shape
        num_groups = length // TOKENS_PER_OBJECT
        groups = sequences[:, : TOKENS_PER_OBJECT * num_groups].reshape(batch_size, num_groups, TOKENS_PER_OBJECT)
        coord_tokens, class_tokens = groups[..., :4], groups[..., 4]

        bins = (coord_tokens - layout.coord_token_offset).clamp(0, layout.num_bins - 1)
        box_confidences = None
        if mode == "strict" and logits is not None and coordinate_window > 0:
            slots = logits[:, : TOKENS_PER_OBJECT * num_groups].unflatten(1, (num_groups, TOKENS_PER_OBJECT))
            coordinate_logits = slots[:, :, :4, layout.coord_token_offset : layout.coord_token_end]
            bins, confidences = read_coordinate_distributions(coordinate_logits, bins, coordinate_window)
            box_confidences = confidences.clamp_min(torch.finfo(torch.float32).tiny).log().mean(-1).exp()
        y0, x0, y1, x1 = dequantize_coordinates(bins, layout.num_bins).unbind(-1)
        class_log_probs = None
        if logits is not None:
            class_slots = slice(4, TOKENS_PER_OBJECT * num_groups, TOKENS_PER_OBJECT)
            log_probs = torch.log_softmax(logits[:, class_slots].float(), dim=-1)
            class_log_probs = log_probs[..., layout.class_token_offset : layout.class_token_end]

        if mode == "official":
            best, labels = log_probs[..., layout.class_token_offset : layout.coord_token_offset].max(dim=-1)
            scores = best.exp()
            mask = (labels < layout.num_classes) & (x0 <= x1) & (y0 <= y1)
            boxes = torch.stack([x0, y0, x1, y1], dim=-1)
        else:
            is_coord = (coord_tokens >= layout.coord_token_offset) & (coord_tokens < layout.coord_token_end)
            is_real_class = (class_tokens >= layout.class_token_offset) & (class_tokens < layout.class_token_end)
            well_formed = is_coord.all(dim=-1) & is_real_class
            if logits is not None:
                well_formed |= is_coord.all(dim=-1) & (class_tokens == layout.noise_token_id)
            # Reading stops at the first EOS: the group holding it and every later group are dropped.
            eos_in_group = (groups == layout.eos_token_id).any(dim=-1)
            mask = well_formed & (eos_in_group.cumsum(dim=1) == 0)
            boxes = torch.stack(
                [torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1
            )
            if logits is not None:
                best, labels = class_log_probs.max(dim=-1)
                scores = best.exp() if box_confidences is None else best.exp() * box_confidences
            else:
                labels = class_tokens - layout.class_token_offset
                scores = torch.ones(batch_size, num_groups, device=sequences.device)

        decoded = {
            "boxes": torch.where(mask[..., None], boxes, torch.zeros_like(boxes)),
            "labels": torch.where(mask, labels, torch.full_like(labels, -1)),
            "scores": torch.where(mask, scores, torch.zeros_like(scores)),
            "mask": mask,
        }
        if class_log_probs is not None:
            decoded["class_log_probs"] = class_log_probs
        return decoded

    def decode(
        self, sequences: torch.Tensor, logits: torch.Tensor | None = None, coordinate_window: int = 0
    ) -> list[dict]:
        """
        Reads objects out of generated sequences.

        Objects are read in groups of five from the start; reading stops at the first EOS/padding token. A group with
        a token of the wrong kind in a slot (not a coordinate in slots 0-3, not a class or noise token in slot 4), an
        EOS inside it, or cut short by the end of the sequence is dropped, and the objects around it are kept:
        malformed token input never raises. A box written with min > max on an axis is returned with the two sorted.

        Args:
            sequences (`torch.LongTensor` of shape `[B, T]`): generated tokens *without* the BOS prompt (a 1-D
                sequence is read as a batch of one).
            logits (`torch.FloatTensor` of shape `[B, T, V]`, *optional*): the raw (unprocessed) logits that produced
                each token. With them, the label of an object is the best real class under a softmax over the full
                vocabulary at its class slot, and its score the probability of that class (a sampled noise object thus
                gets the best real class, as in the paper). Without them the label is read from the class token, the
                score is 1 and noise objects are dropped.
            coordinate_window (`int`, *optional*, defaults to 0): with `logits`, read each coordinate as the mean bin
                within this many bins of the written one and weigh the score by the mass there (see
                [`~decode_groups`]).

        Returns:
            `list[dict]`, one per sequence, with `boxes` (`torch.FloatTensor` `[n, 4]` xyxy normalised to the canvas),
            `labels` (`torch.LongTensor` `[n]`) and `scores` (`torch.FloatTensor` `[n]`), in the order written.
        """
        groups = self.decode_groups(sequences, logits, coordinate_window=coordinate_window)
        mask = groups["mask"]
        return [
            {key: groups[key][index][mask[index]] for key in ("boxes", "labels", "scores")}
            for index in range(mask.shape[0])
        ]


__all__ = [
    "NOISE_KINDS",
    "TOKENS_PER_OBJECT",
    "OBJECT_ORDERS",
    "Pix2SeqBoxCodec",
    "Pix2SeqTokenLayout",
    "best_class_scores",
    "dequantize_coordinates",
    "quantize_coordinates",
    "read_coordinate_distributions",
]
