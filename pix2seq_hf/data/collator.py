"""The collator that turns examples of the common format (see `schema.py`) into the batches Pix2Seq trains on."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as tvF

from .images import BAD_IMAGE_POLICIES, DecodedImageCache, ImageReadError, decode_image, to_rgb
from .transforms import apply_transforms


logger = logging.getLogger(__name__)

SIZE_MISMATCH_POLICIES = ("warn", "error", "skip")
# Decoded images a collator keeps (per process: each DataLoader worker has its own); a small set fits whole.
DEFAULT_IMAGE_CACHE_BYTES = 512 * 2**20


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on `parts` (ints and strings), stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Pix2SeqCollator:
    """
    Collates examples of the common detection format into a Pix2Seq batch.

    Training (`training=True`): crowd objects are dropped; each image is augmented `num_augmentations` times by
    `transforms` (each copy independently; `num_augmentations=2` is the paper's "two augmentations of each image per
    batch"), then the processor pads the augmented images onto its canvas (`do_resize=False`: augmentation leaves
    them at most canvas-sized) and writes the training sequences. Without `transforms` the processor resizes.

    Evaluation (`training=False`): no augmentation; the processor resizes and pads; the batch also carries the ground
    truth for COCO metrics, crowd objects included.

    Randomness is reproducible and independent of batch composition, DataLoader workers and resumption: the
    augmentation of copy `k` of image `image_id` in epoch `e` is seeded with `derive_seed(seed, e, image_id, k)`, and
    the sequence augmentation of a batch with `derive_seed(seed, e, image_ids of the batch)` (`"eval"` instead of the
    epoch for evaluation batches). Call `set_epoch` at the start of each epoch (before the DataLoader is iterated).

    Args:
        processor (`Pix2SeqProcessor`):
            Called as `processor(images=..., boxes=..., class_labels=..., return_tensors="pt", generator=...,
            **image_kwargs)`: per image a `[N, 4]` tensor of `(x_min, y_min, x_max, y_max)` pixel boxes and the `[N]`
            contiguous labels of its real (not crowd) objects. The processor checks them (a box that is not finite
            or has no area in its image, a label outside `[0, num_classes)`); the error then names the image ids of
            the batch.
        transforms (`Callable`, *optional*):
            Training augmentation on `{"image", "boxes", "labels"}` (see `build_train_transforms`); must leave images
            at most `canvas x canvas`. Ignored for evaluation.
        training (`bool`, *optional*, defaults to `True`): training or evaluation batches.
        num_augmentations (`int`, *optional*, defaults to 1): augmented copies of each image (training only); the
            batch holds `num_augmentations * len(examples)` images, the copies of one image next to each other.
        sequences_per_image (`int`, *optional*, defaults to 1): training sequences per (augmented) image, each with
            its own object order, noise objects and class corruption (training only; see [`Pix2SeqProcessor`]): the
            model's encoder runs once for all of them.
        seed (`int`, *optional*, defaults to 0): the seed of all randomness of the collator.
        return_sequences (`bool`, *optional*, defaults to `True`): also return `decoder_input_ids` and `labels`
            (for evaluation batches: to compute a validation loss).
        return_targets (`bool`, *optional*): return the ground truth (`targets`); defaults to `not training`.
        on_size_mismatch (`str`, *optional*, defaults to `"warn"`): when a decoded image's size differs from the
            example's `width`/`height` (e.g. an EXIF rotation applied by `datasets` but not to the boxes): "warn"
            (once; use the decoded image, boxes clipped to it and dropped when nothing is left), "error", or "skip"
            the example. Counted in `stats["size_mismatches"]` (in the process that collates: with DataLoader
            workers, in each worker).
        on_bad_image (`str`, *optional*, defaults to `"error"`): for an image that is missing, does not decode, or
            is in a PIL mode that does not convert to RGB (images are read as shown, EXIF orientation applied, and
            converted to 8-bit RGB as the image processor converts them):
            "error" (an `ImageReadError` naming the image id and the file) or "skip" the example (logged, counted in
            `stats["skipped_bad_images"]`). Give the collator undecoded images (`undecoded_images(dataset)`) so that
            it decodes them itself: `datasets` would otherwise fail on a bad image before the collator sees it.
        image_cache_bytes (`int`, *optional*, defaults to `DEFAULT_IMAGE_CACHE_BYTES`, 512 MiB): decoded images kept
            in memory (`DecodedImageCache`), so that a set that fits is decoded once, not every epoch; 0 keeps none.

    Returns (of `__call__`):
        `dict` with `pixel_values` (`[B, 3, S, S]`), with `return_sequences` `decoder_input_ids` and `labels`
        (`[B * sequences_per_image, L]`), and with `return_targets` `targets`: per image a dict with `image_id`
        (`LongTensor[1]`), `orig_size` (`LongTensor[2]`, `(height, width)` of the decoded image), `boxes`
        (`FloatTensor[N, 4]`, `(x_min, y_min, x_max, y_max)` in its pixels), `labels` (`LongTensor[N]`), `iscrowd`
        (`LongTensor[N]`) and `area` (`FloatTensor[N]`). Targets come one per example (not per augmented copy) and
        describe the un-augmented image.
    """

    def __init__(
        self,
        processor,
        transforms: Callable | None = None,
        training: bool = True,
        num_augmentations: int = 1,
        sequences_per_image: int = 1,
        seed: int = 0,
        return_sequences: bool = True,
        return_targets: bool | None = None,
        on_size_mismatch: str = "warn",
        on_bad_image: str = "error",
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
    ):
        if not isinstance(num_augmentations, int) or num_augmentations < 1:
            raise ValueError(f"`num_augmentations` must be a positive int, got {num_augmentations!r}.")
        if not isinstance(sequences_per_image, int) or sequences_per_image < 1:
            raise ValueError(f"`sequences_per_image` must be a positive int, got {sequences_per_image!r}.")
        if on_size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(f"`on_size_mismatch` must be one of {SIZE_MISMATCH_POLICIES}, got {on_size_mismatch!r}.")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"`on_bad_image` must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}.")
        self.processor = processor
        self.transforms = transforms
        self.training = training
        self.num_augmentations = num_augmentations if training else 1
        self.sequences_per_image = sequences_per_image if training else 1
        self.seed = int(seed)
        self.return_sequences = return_sequences
        self.return_targets = (not training) if return_targets is None else return_targets
        self.on_size_mismatch = on_size_mismatch
        self.on_bad_image = on_bad_image
        self.image_cache = DecodedImageCache(image_cache_bytes)
        self.epoch = 0
        self.stats = {"size_mismatches": 0, "skipped_examples": 0, "skipped_bad_images": 0}
        self._warned_size_mismatch = False

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch, which (with `seed`) determines the augmentation of every image."""
        self.epoch = int(epoch)

    # ----------------------------------------------------------------------------------------------------------------

    def _image(self, example: Mapping, record: str) -> PIL.Image.Image | None:
        """The example's image as a PIL image, or `None` when it is skipped (bad image, size mismatch)."""
        value = example.get("image")
        if value is None:
            raise ValueError(f"{record}: the example has no 'image'; its keys are {sorted(example)}.")
        if not isinstance(value, (PIL.Image.Image, dict)):
            raise TypeError(
                f"{record}: 'image' must be a PIL image or a datasets.Image dict, got {type(value).__name__}."
            )
        key = self.image_cache.key(value)
        image = self.image_cache.get(key)
        if image is None:
            try:
                image = to_rgb(decode_image(value, record), record)
            except ImageReadError as error:
                if self.on_bad_image == "skip":
                    self.stats["skipped_bad_images"] += 1
                    self.stats["skipped_examples"] += 1
                    logger.warning(f"{error} Skipped (on_bad_image='skip').")
                    return None
                raise ImageReadError(
                    f"{error} Skip such images with on_bad_image='skip', or find "
                    "them all before training with check_images='decode'.",
                    missing=error.missing,
                ) from None
            self.image_cache.put(key, image)
        expected = (example.get("width"), example.get("height"))
        if None not in expected and tuple(int(v) for v in expected) != image.size:
            self.stats["size_mismatches"] += 1
            message = (
                f"{record}: the decoded image is {image.size[0]}x{image.size[1]} but the example says "
                f"{expected[0]}x{expected[1]} (an EXIF orientation applied when decoding?); its boxes may not match."
            )
            if self.on_size_mismatch == "error":
                raise ValueError(message)
            if self.on_size_mismatch == "skip":
                self.stats["skipped_examples"] += 1
                logger.warning(message + " Skipped.")
                return None
            if not self._warned_size_mismatch:
                logger.warning(message + " Using the decoded image (warned once; see `collator.stats`).")
                self._warned_size_mismatch = True
        return image

    @staticmethod
    def _objects(example: Mapping, record: str) -> dict[str, torch.Tensor]:
        """
        Boxes, labels, crowd flags and areas of an example as tensors: boxes `(x_min, y_min, x_max, y_max)`, the one
        box format of everything after this point (the examples hold COCO's `[x, y, w, h]`).
        """
        objects = example.get("objects")
        if not isinstance(objects, Mapping) or "bbox" not in objects or "category" not in objects:
            raise ValueError(
                f"{record}: expected 'objects' with 'bbox' and 'category' (the common format; see "
                f"`prepare_detection_dataset`), got {objects!r:.200}."
            )
        xywh = torch.as_tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
        num = xywh.shape[0]
        labels = torch.as_tensor(objects["category"], dtype=torch.int64).reshape(-1)
        iscrowd = torch.as_tensor(objects.get("iscrowd") or [0] * num, dtype=torch.int64).reshape(-1)
        areas = objects.get("area")
        area = torch.as_tensor(areas, dtype=torch.float32).reshape(-1) if areas else xywh[:, 2] * xywh[:, 3]
        if not labels.numel() == iscrowd.numel() == area.numel() == num:
            raise ValueError(f"{record}: 'objects' fields have different lengths.")
        boxes = tvF.convert_bounding_box_format(xywh, old_format="XYWH", new_format="XYXY", inplace=False)
        return {"boxes": boxes, "labels": labels, "iscrowd": iscrowd, "area": area}

    @staticmethod
    def _fit_to_image(objects: dict[str, torch.Tensor], image: PIL.Image.Image) -> dict[str, torch.Tensor]:
        """Clips boxes to the decoded image and drops those left empty (after a size mismatch)."""
        boxes = tv_tensors.BoundingBoxes(objects["boxes"], format="XYXY", canvas_size=(image.height, image.width))
        boxes = tvF.clamp_bounding_boxes(boxes).as_subclass(torch.Tensor)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {"boxes": boxes[keep], **{key: objects[key][keep] for key in ("labels", "iscrowd", "area")}}

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        augment = self.training and self.transforms is not None
        # `image_ids`: one per example kept (they seed the batch); `image_of_input`: one per image for the processor.
        images, boxes, labels, targets, image_ids, image_of_input = [], [], [], [], [], []
        for example in examples:
            if "image_id" not in example:
                raise ValueError(f"An example has no 'image_id'; its keys are {sorted(example)}.")
            image_id = int(example["image_id"])
            record = f"image_id {image_id}"
            image = self._image(example, record)
            if image is None:
                continue
            objects = self._objects(example, record)
            if (example.get("width"), example.get("height")) != (image.width, image.height):
                objects = self._fit_to_image(objects, image)
            image_ids.append(image_id)
            if self.return_targets:
                targets.append(self._target(image_id, image, objects))
            # Crowd regions are ground truth for evaluation only: no training sequence holds them.
            real = objects["iscrowd"] == 0
            real_boxes, real_labels = objects["boxes"][real], objects["labels"][real]
            pixels = tvF.pil_to_tensor(image) if augment else image
            for copy in range(self.num_augmentations):
                out_image, out_boxes, out_labels = pixels, real_boxes, real_labels
                if augment:
                    seed = derive_seed(self.seed, self.epoch, image_id, copy)
                    out_image, out_boxes, out_labels = apply_transforms(
                        self.transforms, pixels, real_boxes, real_labels, bbox_format="XYXY", seed=seed
                    )
                images.append(out_image)
                boxes.append(out_boxes)
                labels.append(out_labels)
                image_of_input.append(image_id)
        if not images:
            raise ValueError(f"Every example of the batch was skipped ({self.stats}).")

        kwargs = {"do_resize": False, "input_data_format": "channels_first"} if augment else {}
        if self.return_sequences:
            batch_seed = derive_seed(self.seed, self.epoch if self.training else "eval", tuple(image_ids))
            generator = torch.Generator().manual_seed(batch_seed)
            try:
                inputs = self.processor(
                    images=images,
                    boxes=boxes,
                    class_labels=labels,
                    return_tensors="pt",
                    generator=generator,
                    sequences_per_image=self.sequences_per_image,
                    **kwargs,
                )
            except ValueError as error:
                raise ValueError(f"{error} (the batch's images, in order, are image_ids {image_of_input})") from error
        else:
            inputs = self.processor(images=images, return_tensors="pt", **kwargs)
        batch = {"pixel_values": inputs["pixel_values"]}
        if self.return_sequences:
            batch["decoder_input_ids"] = inputs["decoder_input_ids"]
            batch["labels"] = inputs["labels"]
        if self.return_targets:
            batch["targets"] = targets
        return batch

    @staticmethod
    def _target(image_id: int, image: PIL.Image.Image, objects: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ground truth of one image for COCO evaluation (boxes XYXY in the pixels of the decoded image)."""
        return {
            "image_id": torch.tensor([image_id], dtype=torch.int64),
            "orig_size": torch.tensor([image.height, image.width], dtype=torch.int64),
            "boxes": objects["boxes"],
            "labels": objects["labels"],
            "iscrowd": objects["iscrowd"],
            "area": objects["area"],
        }
