"""Reading image files and `datasets.Image` values (decoded or not) with errors that name the record."""

from __future__ import annotations

import io
import os

import datasets
import PIL.Image


IMAGE_CHECKS = ("none", "exists", "decode")
BAD_IMAGE_POLICIES = ("error", "skip")


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


def decode_image(value, record: str) -> PIL.Image.Image:
    """
    Decodes an image as `datasets` does when an example is read (`datasets.Image().decode_example`: EXIF orientation
    applied), but with errors that name the record and the file.

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
        if "://" not in path and not os.path.isfile(path):
            raise ImageReadError(f"{record}: image {source} does not exist.", missing=True)
    try:
        return datasets.Image().decode_example(storage)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ImageReadError(f"{record}: cannot read image {source}: {error}", missing=False) from None


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
