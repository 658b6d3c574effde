"""Pix2Seq processor: the image processor plus the box codec that writes and reads token sequences."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .box_codec import Pix2SeqBoxCodec, Pix2SeqTokenLayout
from .generation_pix2seq import PIX2SEQ_GENERATION_DEFAULTS, generated_tokens_and_logits
from .image_processing_pix2seq import Pix2SeqImageProcessor, post_process_object_detection


# The layout of a processor built without layout arguments: the defaults of `Pix2SeqConfig`.
_DEFAULT_LAYOUT = Pix2SeqTokenLayout()


class Pix2SeqProcessor(ProcessorMixin):
    r"""
    Pix2Seq processor: a [`Pix2SeqImageProcessor`] and the box codec (token layout + sequence augmentation).

    `processor(images, annotations=...)` (COCO dicts) or `processor(images, boxes=..., class_labels=...)` (tensors)
    returns `pixel_values` and the training inputs `decoder_input_ids` and `labels` (`[batch_size, 5 * max_objects]`)
    built by [`Pix2SeqBoxCodec`];
    `processor.post_process_object_detection(outputs, ...)` turns model outputs (the detection output of
    `model(pixel_values)` or the output of `model.generate`) into DETR-style detections.

    The token layout fields and the codec options are init arguments, saved in `processor_config.json` by
    `save_pretrained` and restored by `from_pretrained`. [`~Pix2SeqProcessor.from_config`] builds a processor that
    matches a model config.

    Args:
        image_processor ([`Pix2SeqImageProcessor`], *optional*):
            The image processor; a default one (640 canvas) when not given.
        num_bins, num_classes, vocab_size, pad_token_id, eos_token_id, bos_token_id, noise_token_id,
        class_token_offset, coord_token_offset, max_objects:
            The token layout ([`Pix2SeqTokenLayout`], by default `Pix2SeqConfig`'s); must match the model's config (see
            [`~Pix2SeqProcessor.check_model_compatible`]). Images with more than `max_objects` objects keep
            `max_objects` of them (after ordering) in their training sequence.
        object_order (`str`, *optional*, defaults to `"random"`):
            Order of the objects in a training sequence (see [`Pix2SeqBoxCodec`]).
        sequence_augmentation (`bool`, *optional*, defaults to `True`):
            Pad training sequences with noise objects (paper section 2.3); without it, real objects then EOS.
        class_corruption_prob (`float`, *optional*, defaults to 0.5):
            Probability that a class token of the decoder input is replaced by a random class rather than the noise
            token.
        duplicate_noise_share (`float`, *optional*):
            Share of the noise objects that are duplicates of real ones; `None` (the official code) draws it
            uniformly per image.
        duplicate_jitter (`float`, *optional*, defaults to 0.05):
            Sigma of the jitter of duplicate noise boxes, as a share of the box size.
        random_box_size_std (`float`, *optional*, defaults to 0.5):
            Sigma of the size of random noise boxes.
    """

    def __init__(
        self,
        image_processor: Pix2SeqImageProcessor | None = None,
        num_bins: int = _DEFAULT_LAYOUT.num_bins,
        num_classes: int = _DEFAULT_LAYOUT.num_classes,
        vocab_size: int = _DEFAULT_LAYOUT.vocab_size,
        pad_token_id: int = _DEFAULT_LAYOUT.pad_token_id,
        eos_token_id: int = _DEFAULT_LAYOUT.eos_token_id,
        bos_token_id: int = _DEFAULT_LAYOUT.bos_token_id,
        noise_token_id: int = _DEFAULT_LAYOUT.noise_token_id,
        class_token_offset: int = _DEFAULT_LAYOUT.class_token_offset,
        coord_token_offset: int = _DEFAULT_LAYOUT.coord_token_offset,
        max_objects: int = _DEFAULT_LAYOUT.max_objects,
        object_order: str = "random",
        sequence_augmentation: bool = True,
        class_corruption_prob: float = 0.5,
        duplicate_noise_share: float | None = None,
        duplicate_jitter: float = 0.05,
        random_box_size_std: float = 0.5,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = Pix2SeqImageProcessor()
        self.num_bins = num_bins
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.noise_token_id = noise_token_id
        self.class_token_offset = class_token_offset
        self.coord_token_offset = coord_token_offset
        self.max_objects = max_objects
        self.object_order = object_order
        self.sequence_augmentation = sequence_augmentation
        self.class_corruption_prob = class_corruption_prob
        self.duplicate_noise_share = duplicate_noise_share
        self.duplicate_jitter = duplicate_jitter
        self.random_box_size_std = random_box_size_std

        self.token_layout = Pix2SeqTokenLayout(
            **{field.name: getattr(self, field.name) for field in fields(Pix2SeqTokenLayout)}
        )
        self.token_layout.validate()
        self.box_codec = Pix2SeqBoxCodec(self.token_layout, **self.codec_options)
        super().__init__(image_processor, **kwargs)

    @property
    def codec_options(self) -> dict[str, Any]:
        """The options of the box codec (everything but the token layout)."""
        return {
            "object_order": self.object_order,
            "sequence_augmentation": self.sequence_augmentation,
            "class_corruption_prob": self.class_corruption_prob,
            "duplicate_noise_share": self.duplicate_noise_share,
            "duplicate_jitter": self.duplicate_jitter,
            "random_box_size_std": self.random_box_size_std,
        }

    @classmethod
    def from_config(
        cls, config, image_processor: Pix2SeqImageProcessor | None = None, **codec_options
    ) -> Pix2SeqProcessor:
        """
        Builds a processor whose token layout is the one of `config` (a `Pix2SeqConfig`, or a model holding one).

        Args:
            config (`Pix2SeqConfig` or `Pix2SeqForObjectDetection`): where the token layout is read from.
            image_processor ([`Pix2SeqImageProcessor`], *optional*): defaults to a default image processor.
            **codec_options: `object_order`, `sequence_augmentation`, `class_corruption_prob`, `duplicate_noise_share`, `duplicate_jitter`,
                `random_box_size_std`.
        """
        config = getattr(config, "config", config)
        layout = Pix2SeqTokenLayout.from_config(config)
        return cls(image_processor=image_processor, **layout.to_dict(), **codec_options)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The only sub-processor is always a `Pix2SeqImageProcessor`: load it directly rather than through
        # `AutoImageProcessor`, so that loading does not depend on the Auto registration having run.
        return [Pix2SeqImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)]

    # ----------------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: ImageInput | None = None,
        annotations: dict | list[dict] | None = None,
        return_tensors: str | TensorType | None = "pt",
        generator: torch.Generator | None = None,
        boxes: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        sequences_per_image: int = 1,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepares images and, optionally, training sequences. The objects come either as COCO `annotations` (as
        DETR's processors take them) or as `boxes` and `class_labels` tensors; both are checked once, where they
        enter (boxes by the image processor, labels here), and encoded the same way.

        Args:
            images (`ImageInput`):
                An image or a batch of images (see [`Pix2SeqImageProcessor`]).
            annotations (`dict` or `list[dict]`, *optional*):
                COCO detection annotations, one `{"image_id", "annotations": [{"bbox": [x, y, w, h],
                "category_id", "iscrowd"?}]}` per image; `category_id` must be a contiguous label in
                `[0, num_classes)`. Crowd annotations are left out.
            return_tensors (`str` or `TensorType`, *optional*, defaults to `"pt"`):
                Type of the returned arrays.
            generator (`torch.Generator`, *optional*):
                Random generator of the sequence augmentation (object order, noise objects, class corruption).
            boxes (`list[torch.Tensor]`, *optional*):
                Instead of `annotations`: per image a `[N, 4]` tensor of `(x_min, y_min, x_max, y_max)` in its pixels.
            class_labels (`list[torch.Tensor]`, *optional*):
                With `boxes`: per image the `[N]` integer labels of its boxes, in `[0, num_classes)`.
            sequences_per_image (`int`, *optional*, defaults to 1):
                Training sequences written per image, each with its own draw of the object order (`"random"`), the
                noise objects and the class corruption; image `i`'s are rows `i * k` to `i * k + k - 1` of
                `decoder_input_ids` and `labels`, and the model runs its encoder once for all of them.
            **kwargs:
                Passed to the image processor (`size`, `do_normalize`, `input_data_format`, ...).

        Returns:
            [`BatchFeature`] with `pixel_values` and, with objects, `decoder_input_ids` and `labels`
            (`[batch_size * sequences_per_image, 5 * max_objects]`), ready for `model(**inputs)`.

        Raises:
            `ValueError` naming the image, the object and the value for a box that is not finite or has no area in
            its image, or a label that is not an integer in `[0, num_classes)`.
        """
        if images is None:
            raise ValueError("`Pix2SeqProcessor` needs `images`.")
        if (boxes is None) != (class_labels is None):
            raise ValueError("`boxes` and `class_labels` go together: pass both (one tensor of each per image).")
        if (
            isinstance(sequences_per_image, bool)
            or not isinstance(sequences_per_image, numbers.Integral)
            or sequences_per_image < 1
        ):
            raise ValueError(f"`sequences_per_image` must be a positive int, got {sequences_per_image!r}.")
        if sequences_per_image > 1 and annotations is None and boxes is None:
            raise ValueError(
                f"`sequences_per_image={sequences_per_image}` writes training sequences, which need the objects "
                "(`annotations`, or `boxes` and `class_labels`)."
            )
        if annotations is not None and boxes is not None:
            raise ValueError(
                "Pass the objects either as COCO `annotations` or as `boxes` and `class_labels`, not both."
            )

        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
            self._check_category_ids(annotations)
            inputs = self.image_processor(images, annotations=annotations, return_tensors="pt", **kwargs)
            canvas_boxes = [target["boxes"] for target in inputs["labels"]]
            class_labels = [target["class_labels"] for target in inputs["labels"]]
        elif boxes is not None:
            inputs = self.image_processor(images, boxes=boxes, return_tensors="pt", **kwargs)
            canvas_boxes = inputs["boxes"]
            class_labels = self._checked_class_labels(class_labels, canvas_boxes)
        else:
            inputs = self.image_processor(images, return_tensors="pt", **kwargs)
        data = {"pixel_values": inputs["pixel_values"]}
        if annotations is not None or boxes is not None:
            data.update(
                self.box_codec._batch_training_sequences(
                    [item for item in canvas_boxes for _ in range(sequences_per_image)],
                    [item for item in class_labels for _ in range(sequences_per_image)],
                    generator,
                )
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _label_range_error(self, label: str) -> ValueError:
        """The error for `label` (which names the image, the object and the value) outside `[0, num_classes)`."""
        return ValueError(
            f"{label} is outside [0, num_classes={self.num_classes}). Map dataset category ids to contiguous labels "
            "0..num_classes-1 before the processor (see `id2label`)."
        )

    def _check_category_ids(self, annotations: list[dict]) -> None:
        """Raises `ValueError` for a `category_id` outside `[0, num_classes)`, naming image, annotation and id."""
        for annotation in annotations:
            if not isinstance(annotation, Mapping) or "annotations" not in annotation:
                continue  # the image processor reports malformed annotations
            for index, obj in enumerate(annotation["annotations"]):
                category_id = obj.get("category_id") if isinstance(obj, Mapping) else None
                if isinstance(category_id, torch.Tensor) and category_id.numel() == 1:
                    category_id = category_id.item()
                if isinstance(category_id, numbers.Real) and not 0 <= category_id < self.num_classes:
                    label = f"Image {annotation.get('image_id')}, annotation {index}: category_id {category_id}"
                    raise self._label_range_error(label)

    def _checked_class_labels(self, class_labels, boxes: list[torch.Tensor]) -> list[torch.LongTensor]:
        """
        The `class_labels` tensors of a batch as CPU `LongTensor`s, one per image and one label per box; raises
        `ValueError` naming the image and the object for anything else or a label outside `[0, num_classes)`.
        """
        if isinstance(class_labels, torch.Tensor) or len(class_labels) != len(boxes):
            raise ValueError(
                f"`class_labels` must be a list with one tensor per image: got {type(class_labels).__name__} of "
                f"length {len(class_labels)} for {len(boxes)} images."
            )
        checked = []
        for index, (labels, image_boxes) in enumerate(zip(class_labels, boxes)):
            labels = torch.as_tensor(labels).detach().cpu()
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"Image {index} of the batch: `class_labels` must hold integers, got {labels.dtype}.")
            labels = labels.reshape(-1).long()
            if labels.numel() != image_boxes.shape[0]:
                raise ValueError(
                    f"Image {index} of the batch: {image_boxes.shape[0]} boxes but {labels.numel()} class labels; "
                    "give one label per box."
                )
            outside = (labels < 0) | (labels >= self.num_classes)
            if bool(outside.any()):
                position = int(outside.nonzero()[0, 0])
                label = f"Image {index} of the batch, box {position}: label {int(labels[position])}"
                raise self._label_range_error(label)
            checked.append(labels)
        return checked

    # ----------------------------------------------------------------------------------------------------------------
    # Outputs
    # ----------------------------------------------------------------------------------------------------------------

    def _sequences_and_logits(self, sequences, logits=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Normalises generated tokens for the codec with [`generated_tokens_and_logits`] (a `generate` output, or a
        tensor of tokens with its logits: per-step logits stacked, beams resolved, prompt dropped); a tensor of tokens
        without logits loses its leading detection prompt (BOS) column when it has one.
        """
        if isinstance(sequences, torch.Tensor):
            sequences = {"sequences": sequences, "logits": logits}
        elif logits is not None:
            sequences = {"sequences": sequences["sequences"], "logits": logits}
        sequences, logits = generated_tokens_and_logits(sequences)
        if logits is None:
            if sequences.shape[1] > 0 and bool((sequences[:, 0] == self.bos_token_id).all()):
                sequences = sequences[:, 1:]
        elif logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"The logits have {logits.shape[-1]} entries per step but the processor's token layout has "
                f"`vocab_size={self.vocab_size}`: the processor does not belong to this model (see "
                "`Pix2SeqProcessor.check_model_compatible`)."
            )
        return sequences, logits

    def batch_decode(
        self, sequences, logits=None, coordinate_window: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """
        Reads objects out of generated token sequences with the box codec.

        Args:
            sequences (`torch.LongTensor` of shape `[B, T]` or a `generate` output):
                Generated tokens, with or without the leading detection prompt.
            logits (`torch.FloatTensor` `[B, T, V]` or tuple of `T` tensors `[B, V]`, *optional*):
                Raw logits of each generated token (taken from a `generate` output when not given); without them
                every object scores 1.
            coordinate_window (`int`, *optional*):
                With logits, each coordinate is the mean bin of the model's distribution within this many bins of the
                written one and each score is weighed by the mass there (the `coordinate_window` decoding option);
                `None`: that option's default.

        Returns:
            `list[dict]`: per image, `boxes` (`[N, 4]`, XYXY normalised to the canvas), `labels` and `scores`.
        """
        sequences, logits = self._sequences_and_logits(sequences, logits)
        if coordinate_window is None:
            coordinate_window = PIX2SEQ_GENERATION_DEFAULTS["coordinate_window"]
        return self.box_codec.decode(sequences, logits, coordinate_window=coordinate_window)

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes: TensorType | list[tuple[int, int]] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        Turns model outputs into DETR-style detections: `[{"scores", "labels", "boxes"}]`, boxes
        `(x_min, y_min, x_max, y_max)` in the pixels of the original images when `target_sizes` is given (normalised
        to the canvas otherwise), best score first.

        Args:
            outputs:
                The detection output of `model(pixel_values)` (`scores`, `labels`, `pred_boxes`) or the output of
                `model.generate`, which carries its `detections` (both also taken by
                [`Pix2SeqImageProcessor.post_process_object_detection`], the same code), or any output with `sequences`
                (`[B, 1 + T]`, prompt first) and raw `logits` (tuple of `T` tensors `[B, vocab_size]`), read with the
                processor's box codec.
            threshold (`float`, *optional*, defaults to 0.5):
                Keep detections with a score strictly above it.
            target_sizes (`torch.Tensor` `[B, 2]` or `list[tuple[int, int]]`, *optional*):
                `(height, width)` of each original image.
            top_k (`int`, *optional*):
                Keep at most the `top_k` best-scoring detections per image.

        Raises:
            `TypeError` for a bare tensor of token ids or a `generate` output without raw logits; `ValueError` when
            the logits do not fit the processor's vocabulary.
        """
        return post_process_object_detection(
            self.image_processor, outputs, threshold, target_sizes, top_k, read_tokens=self.batch_decode
        )

    def check_model_compatible(self, model_or_config) -> None:
        """
        Raises `ValueError` naming every token layout field on which the processor and the model disagree.

        Args:
            model_or_config: a `Pix2SeqForObjectDetection`, a `Pix2SeqConfig` or a `Pix2SeqTokenLayout`.
        """
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(config, Pix2SeqTokenLayout):
            layout = config
        else:
            try:
                layout = Pix2SeqTokenLayout.from_config(config)
            except AttributeError as error:
                raise TypeError(
                    f"Expected a Pix2Seq model, config or token layout, got {type(model_or_config).__name__} "
                    f"({error})."
                ) from None
        self.token_layout.check_compatible(layout, what="model config")


__all__ = ["Pix2SeqProcessor"]
