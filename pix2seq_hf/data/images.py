"""
Reading image files and `datasets.Image` values (decoded or not) with errors that name the record: the one image
reader of the loaders, the collator and the scripts. Images are shown as a viewer shows them (EXIF orientation
applied, as `datasets` and transformers' `load_image` do), and sizes are read in that frame.
"""

from __future__ import annotations

import hashlib
import io
import os

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_transforms import convert_to_rgb

from ..image_processing_pix2seq import high_bit_depth_pil_values, straight_alpha_pil_image


IMAGE_CHECKS = ("none", "exists", "decode")
BAD_IMAGE_POLICIES = ("error", "skip")
# EXIF orientations that turn the stored image by 90 degrees (width and height swap when it is shown).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
MAX_IMAGE_PIXELS_HELP = (
    "Pillow's guard against decompression bombs: an image of more pixels is read with a warning, one of more than "
    f"twice as many is refused as unreadable (default: Pillow's {PIL.Image.MAX_IMAGE_PIXELS}; 0: no limit)."
)


def set_max_image_pixels(limit: int | None) -> None:
    """
    Sets Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) for this process (and DataLoader workers
    forked after it): Pillow warns about an image of more than `limit` pixels and refuses one of more than `2 * limit`
    (`PIL.Image.DecompressionBombError`, reported as an unreadable image). `None` or 0 lifts the limit.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"The image pixel limit must be positive (or 0 for none), got {limit!r}.")
    PIL.Image.MAX_IMAGE_PIXELS = limit or None


class ImageReadError(ValueError):
    """An image that is missing or cannot be decoded; `missing` tells which."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def describe_image_value(value) -> str:
    """A short description of where an image comes from (its path, or in-memory bytes), for messages."""
    if isinstance(value, dict):
        if value.get("path"):
            return f"file {value['path']!r}"
        return "in-memory image bytes"
    if isinstance(value, (str, os.PathLike)):
        return f"file {os.fspath(value)!r}"
    filename = getattr(value, "filename", None)
    return f"file {filename!r}" if filename else "in-memory image"


def open_image(value, record: str, decode: bool = True) -> PIL.Image.Image:
    """
    Opens an image given as a PIL image, a path, or a `datasets.Image` storage dict (`{"bytes", "path"}`).

    Args:
        value: the image.
        record (`str`): how to name the record in errors, e.g. "train[3] (image_id 17)".
        decode (`bool`): decode every pixel (finds truncated files); otherwise only the header is read.

    Returns:
        The `PIL.Image.Image` (the file is read lazily when `decode=False`).

    Raises:
        `ImageReadError` naming the record and the file for a missing or undecodable image.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    source = describe_image_value(value)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        target = io.BytesIO(data) if data is not None else path
    else:
        target = value
    if target is None:
        raise ImageReadError(f"{record}: the image has neither bytes nor a path.", missing=True)
    if not isinstance(target, io.BytesIO) and not os.path.isfile(target):
        raise ImageReadError(f"{record}: image {source} does not exist.", missing=True)
    try:
        image = PIL.Image.open(target)
        if decode:
            image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ImageReadError(f"{record}: cannot read image {source}: {error}", missing=False) from None
    return image


def _orientation(image: PIL.Image.Image) -> int | None:
    try:
        return image.getexif().get(PIL.Image.ExifTags.Base.Orientation)
    except (OSError, SyntaxError, ValueError):  # unreadable EXIF: shown as stored
        return None


def image_size(value, record: str) -> tuple[int, int]:
    """
    `(width, height)` of an image as it is shown (EXIF orientation applied), read from the file's header. A PIL image
    is taken as it is, as `decode_image` takes it (`datasets` has already turned the images it decodes).

    Raises:
        `ImageReadError` naming the record and the file for a missing or unreadable image.
    """
    if isinstance(value, PIL.Image.Image):
        return value.size
    image = open_image(value, record, decode=False)
    try:
        width, height = image.size
        if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    finally:
        image.close()
    return width, height


def to_rgb(image: PIL.Image.Image, record: str) -> PIL.Image.Image:
    """
    An 8-bit RGB copy of a PIL image, converted as the image processor converts it: transparency composited on white,
    premultiplied alpha and images of more than 8 bits ("I;16", "I", "F") scaled by the range of their values.

    Raises:
        `ImageReadError` naming the record for a mode that cannot be converted (the message says how to convert it).
    """
    try:
        image = straight_alpha_pil_image(image)
        high_bit_depth = high_bit_depth_pil_values(image)
    except ValueError as error:
        raise ImageReadError(f"{record}: {error}", missing=False) from None
    if high_bit_depth is not None:
        values, full_intensity = high_bit_depth
        image = PIL.Image.fromarray(np.rint(values * (255.0 / full_intensity)).astype(np.uint8), mode="L")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))


def decode_image(value, record: str) -> PIL.Image.Image:
    """
    Decodes an image as it is shown (EXIF orientation applied, as `datasets.Image().decode_example` and
    transformers' `load_image` do), with errors that name the record and the file. Local files and bytes are read with
    Pillow; other paths (`hf://...`) through `datasets`.

    Args:
        value: a PIL image (returned as is), a path, or a `datasets.Image` storage dict (`{"bytes", "path"}`).
        record (`str`): how to name the record in errors, e.g. "image_id 17".

    Returns:
        The decoded `PIL.Image.Image`.

    Raises:
        `ImageReadError` naming the record and the file for a missing or undecodable image.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    storage = {"path": os.fspath(value), "bytes": None} if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(storage, dict):
        raise TypeError(f"{record}: expected a PIL image, a path or a datasets.Image dict, got {type(value).__name__}.")
    source = describe_image_value(value)
    path = storage.get("path")
    if storage.get("bytes") is None:
        if not path:
            raise ImageReadError(f"{record}: the image has neither bytes nor a path.", missing=True)
        if "://" in path:
            try:
                return datasets.Image().decode_example(storage)
            except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
                raise ImageReadError(f"{record}: cannot read image {source}: {error}", missing=False) from None
    image = open_image(storage, record, decode=True)
    if _orientation(image) is None:
        return image
    try:
        return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{record}: cannot read image {source}: {error}", missing=False) from None
    finally:
        image.close()  # the file; the transposed image is a copy


class DecodedImageCache:
    """
    Decoded images kept in memory, up to `max_bytes` of pixels, so that the images of a small set are decoded once
    instead of once per epoch (decoding a 384 px PNG costs about as much as a tenth of a `tiny` training step on a
    CPU). An image is known by where it comes from: its file path, or a digest of its encoded bytes. Once the budget
    is spent, further images are decoded every time.

    Args:
        max_bytes (`int`): the most pixel bytes kept (width x height x channels of each image); 0 keeps none.
    """

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"The image cache size must be an int of at least 0 bytes, got {max_bytes!r}.")
        self.max_bytes, self.used_bytes = max_bytes, 0
        self._images: dict[tuple, PIL.Image.Image] = {}

    def key(self, value) -> tuple | None:
        """Where the undecoded image `value` (a `{"bytes", "path"}` dict or a path) comes from; `None` for an image
        that is already decoded or when nothing is kept."""
        if not self.max_bytes:
            return None
        if isinstance(value, (str, os.PathLike)):
            return ("path", os.fspath(value))
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return ("bytes", hashlib.blake2b(value["bytes"], digest_size=16).digest())
            if value.get("path"):
                return ("path", value["path"])
        return None

    def get(self, key: tuple | None) -> PIL.Image.Image | None:
        """A copy of the image kept under `key` (the caller may change it), or `None`."""
        image = self._images.get(key) if key is not None else None
        return None if image is None else image.copy()

    def put(self, key: tuple | None, image: PIL.Image.Image) -> None:
        """Keeps a copy of `image` under `key` while the budget allows."""
        size = image.width * image.height * len(image.getbands())
        if key is None or key in self._images or self.used_bytes + size > self.max_bytes:
            return
        self._images[key] = image.copy()
        self.used_bytes += size


def undecoded_images(dataset: datasets.Dataset, column: str = "image") -> datasets.Dataset:
    """
    The same dataset with its image column left undecoded (`{"bytes", "path"}` dicts), for readers that decode it
    themselves with `decode_image` (as `Pix2SeqCollator` does), so that a bad image is reported by record and file
    instead of failing inside `datasets`. Only the column's feature changes; no data is rewritten.
    """
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def check_image(value, record: str, check: str) -> None:
    """
    Checks one image as `check` says: "none" (nothing), "exists" (a path-backed image's file exists), "decode" (the
    image decodes). Raises `ImageReadError` naming the record otherwise.
    """
    if check == "none":
        return
    if check == "exists":
        path = value.get("path") if isinstance(value, dict) and value.get("bytes") is None else None
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
        if path is not None and not os.path.isfile(path):
            raise ImageReadError(f"{record}: image file {path!r} does not exist.", missing=True)
        return
    image = open_image(value, record, decode=True)
    if image is not value:
        image.close()


def validate_image_options(check_images: str, on_bad_image: str) -> None:
    """Raises `ValueError` for an unknown `check_images` or `on_bad_image` value."""
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"`check_images` must be one of {IMAGE_CHECKS}, got {check_images!r}.")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"`on_bad_image` must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}.")
