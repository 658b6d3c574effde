"""Image processor for Pix2Seq: resize, pad to a square canvas, rescale/normalise, and detection post-processing."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb as convert_to_rgb_pil
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AnnotationFormat,
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
    infer_channel_dimension_format,
    is_pil_image,
    is_valid_image,
    make_flat_list_of_images,
    validate_annotations,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging


logger = logging.get_logger(__name__)

# PIL modes holding more than 8 bits per pixel. Pillow opens 16-bit PNG/TIFF files as "I;16*" or, for some files and
# older versions, as 32-bit "I"; an 8-bit image `.convert("I")` is "I" too, and "F" holds 32-bit floats.
_PIL_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UINT16_MAX = 65535.0
# Premultiplied-alpha modes, which Pillow converts to their straight-alpha form only.
_PIL_PREMULTIPLIED_MODES = {"La": "LA", "RGBa": "RGBA"}
# Modes whose conversion to RGB Pillow does not do right, with how to convert them.
_PIL_REFUSED_MODES = {
    "LAB": "convert it to RGB with a colour transform, e.g. PIL.ImageCms.applyTransform(image, "
    'PIL.ImageCms.buildTransform(PIL.ImageCms.createProfile("LAB"), PIL.ImageCms.createProfile("sRGB"), "LAB", '
    '"RGB"))',
}


def straight_alpha_pil_image(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    A PIL image in a mode that converts to RGB: premultiplied alpha ("La", "RGBa") becomes straight alpha ("LA",
    "RGBA"); other modes are returned as they are.

    Raises:
        `ValueError` naming the mode, and saying how to convert it, for modes Pillow cannot convert to RGB correctly
        ("LAB") or at all.
    """
    if image.mode in _PIL_PREMULTIPLIED_MODES:
        return image.convert(_PIL_PREMULTIPLIED_MODES[image.mode])
    if image.mode in _PIL_REFUSED_MODES:
        raise ValueError(f"PIL images of mode {image.mode!r} are not supported: {_PIL_REFUSED_MODES[image.mode]}.")
    if image.mode not in PIL.Image.MODES and not image.mode.startswith("I;16"):
        raise ValueError(f"PIL images of mode {image.mode!r} are not supported: convert it to 'RGB' first.")
    return image


def high_bit_depth_pil_values(image: PIL.Image.Image) -> tuple[np.ndarray, float] | None:
    """
    The pixels of a PIL image of more than 8 bits ("I;16*", "I", "F") as a float32 array with the value that stands
    for full intensity, which is read from the data's real range:

    - "I;16*": 16-bit, 65535;
    - "I" (32-bit integers): 255 when every value is in 0..255 (an 8-bit image converted to "I"), else 65535 when
      every value is in 0..65535 (a 16-bit file);
    - "F" (32-bit floats): 1.0 when every value is in [0, 1], else 255 when every value is in [0, 255].

    Returns:
        `(array, full_intensity)`, or `None` for the other (8-bit) modes.

    Raises:
        `ValueError` naming the mode and the range of the values, and how to convert the image, for values outside
        those ranges (negative, larger, or not finite).
    """
    if image.mode in _PIL_16BIT_MODES:
        return np.array(image).astype(np.float32), _UINT16_MAX
    if image.mode not in ("I", "F"):
        return None
    array = np.array(image)
    if array.size == 0:
        return array.astype(np.float32), 255.0
    low, high = array.min(), array.max()
    ranges = (255.0, _UINT16_MAX) if image.mode == "I" else (1.0, 255.0)
    for full_intensity in ranges:
        if low >= 0 and high <= full_intensity:  # False for NaN
            return array.astype(np.float32), full_intensity
    raise ValueError(
        f"PIL image of mode {image.mode!r} has values in [{low}, {high}], which fit neither 8-bit (0..255) nor "
        + ("16-bit (0..65535) data" if image.mode == "I" else "[0, 1] data")
        + ": scale it to 0..255 yourself, e.g. `PIL.Image.fromarray(np.clip(values * k, 0, 255).astype(np.uint8))`, "
        "or pass the values as a float array in [0, 1] with `do_rescale=False`."
    )


class Pix2SeqImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    pad_value (`float`, *optional*, defaults to `self.pad_value`):
        Value of the padded canvas pixels, in the units of the image after rescaling and before normalisation (0.3
        with the default `do_rescale=True` is the official Pix2Seq value; with `do_normalize=True` the padding is
        normalised like every other pixel).
    official_resize (`bool`, *optional*, defaults to `self.official_resize`):
        Resize as the official Pix2Seq evaluation does: rescale to float first, then an antialiased bilinear resize of
        the float image, its size computed as TensorFlow does (halves rounded to even). Off by default: resizing the
        8-bit image is faster and differs by about 3e-3 per pixel. Converted official checkpoints turn it on.
    """

    pad_value: float
    official_resize: bool


def get_size_for_longest_edge(
    image_size: tuple[int, int], longest_edge: int, tensorflow_rounding: bool = False
) -> tuple[int, int]:
    """
    Size `(height, width)` of an image of size `image_size` resized, keeping its aspect ratio, so that its longer side
    is `longest_edge`. The shorter side is rounded to the nearest pixel (halves up) and is at least 1; with
    `tensorflow_rounding`, it is computed as `tf.image.resize(..., preserve_aspect_ratio=True)` does (float32 scale,
    halves to even), as the official Pix2Seq preprocessing.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"Cannot resize an empty image of size (height={height}, width={width}).")
    if tensorflow_rounding:
        scale = min(np.float32(longest_edge) / np.float32(height), np.float32(longest_edge) / np.float32(width))
        return tuple(max(1, int(np.round(np.float32(scale) * np.float32(side)))) for side in (height, width))
    if height >= width:
        return longest_edge, max(1, math.floor(width * longest_edge / height + 0.5))
    return max(1, math.floor(height * longest_edge / width + 0.5)), longest_edge


_BOX_FORMAT_NAMES = {"XYXY": "x_min, y_min, x_max, y_max", "XYWH": "x, y, w, h"}


def clip_boxes_to_image(
    boxes: torch.Tensor, image_size: tuple[int, int], box_name: Callable[[int], str], box_format: str = "XYXY"
) -> tv_tensors.BoundingBoxes:
    """
    Checks the boxes of one image and clips them to it: the one check of boxes given in pixels, whichever way they
    come in (COCO annotations or tensors).

    Args:
        boxes (`torch.Tensor` of shape `[N, 4]`): boxes in the pixels of the image, in `box_format`.
        image_size (`tuple[int, int]`): `(height, width)` of the image.
        box_name (`Callable[[int], str]`): how an error names box `i` (e.g. `"Image 7, annotation 2"`).
        box_format (`str`, *optional*, defaults to `"XYXY"`): `"XYXY"` (`x_min, y_min, x_max, y_max`) or `"XYWH"`
            (COCO's `x, y, w, h`).

    Returns:
        `tv_tensors.BoundingBoxes` (`[N, 4]`, XYXY, float64) clipped to the image.

    Raises:
        `ValueError` naming the box and its value for a box that is not finite or has no area inside the image.
    """
    height, width = int(image_size[0]), int(image_size[1])
    given = boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    format_name = _BOX_FORMAT_NAMES[box_format]
    finite = torch.isfinite(given).all(dim=1)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{box_name(index)}: box {given[index].tolist()} ({format_name}) is not finite (NaN or inf).")
    clipped = tv_tensors.BoundingBoxes(given, format=box_format, canvas_size=(height, width))
    clipped = tvF.clamp_bounding_boxes(tvF.convert_bounding_box_format(clipped, new_format="XYXY"))
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if bool(empty.any()):
        index = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"{box_name(index)}: box {given[index].tolist()} ({format_name}) has no area inside the {width}x{height} "
            f"image (clipped to {clipped[index].tolist()} as x_min, y_min, x_max, y_max). Remove degenerate boxes "
            "before processing."
        )
    return clipped


def _field(outputs: Any, name: str) -> Any:
    """Reads `name` from a `ModelOutput`/mapping or an object with attributes; `None` when absent."""
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _target_size_list(target_sizes, batch_size: int) -> list[tuple[int, int]] | None:
    """Turns `target_sizes` (list of `(height, width)` or tensor `[batch_size, 2]`) into a list of int pairs."""
    if target_sizes is None:
        return None
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        if target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"`target_sizes` must have shape (batch_size, 2), got {tuple(target_sizes.shape)}.")
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"Got {len(target_sizes)} target sizes for a batch of {batch_size} images; pass one (height, width) per "
            "image."
        )
    sizes = []
    for size in target_sizes:
        height, width = (int(v) for v in size)
        if height < 1 or width < 1:
            raise ValueError(f"Target sizes must be positive (height, width) pairs, got {tuple(size)}.")
        sizes.append((height, width))
    return sizes


class Pix2SeqImageProcessor(TorchvisionBackend):
    r"""
    Image processor of Pix2Seq (torchvision backend).

    Every image is resized, keeping its aspect ratio, so that its longer side is `size["longest_edge"]` (640), then
    padded at the bottom and right to the square canvas `longest_edge x longest_edge` with `pad_value` (0.3 in [0, 1]
    pixel units, as the official code). Pixels are rescaled to [0, 1] (`do_rescale`) and, optionally, normalised with
    `image_mean`/`image_std` (`do_normalize=False` by default, as the official code; set it with the ImageNet
    statistics for ImageNet-pretrained timm backbones). Boxes are given to the model normalised to the canvas, so a
    canvas-normalised box maps back to the original image as `box * max(height, width)`.

    Inputs may be PIL images, NumPy arrays or torch tensors, channels first or last (`input_data_format` settles
    ambiguous shapes such as `1 x 1 x 3`), grayscale, RGBA (composited on white; premultiplied "La"/"RGBa" too) or
    16-bit (PIL "I;16" images and `uint16` arrays are scaled by `255 / 65535` to the 8-bit range first, so
    `rescale_factor` works for every input). PIL "I" and "F" images are scaled by the range of their values (8-bit,
    16-bit, or [0, 1] floats; other values are refused, see `high_bit_depth_pil_values`).

    With `annotations` (COCO detection format, as DETR's image processor takes them), the output also holds `labels`:
    one dict per image with `boxes` (`[N, 4]`, `(x_min, y_min, x_max, y_max)` normalised to the canvas),
    `class_labels` (`category_id` as given), `image_id`, `orig_size` (`(height, width)` of the input) and `size`
    (`(height, width)` of the resized image on the canvas, before padding). Crowd annotations (`iscrowd=1`) are left
    out, as DETR does. Boxes are clipped to the image; a box that is not finite or has no area after clipping is an
    error (the data layer filters such boxes before this point).

    With `do_resize=False` the images are not resized and must already fit on the canvas (e.g. after scale-jitter and
    random-crop augmentation); boxes are still normalised to the canvas.
    """

    valid_kwargs = Pix2SeqImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BILINEAR
    size = {"longest_edge": 640}
    default_to_square = False
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_pad = True
    pad_value = 0.3
    official_resize = False
    do_convert_rgb = True

    def __init__(self, **kwargs: Unpack[Pix2SeqImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Input preparation
    # ----------------------------------------------------------------------------------------------------------------

    def _standardize_kwargs(self, size=None, **kwargs) -> dict:
        """Accepts `size` as an int or `{"longest_edge": int}`: the canvas is always square."""
        if size is not None:
            if isinstance(size, int) and not isinstance(size, bool):
                size = {"longest_edge": size}
            size = dict(size) if isinstance(size, (Mapping, SizeDict)) else size
            if not isinstance(size, dict) or set(size) != {"longest_edge"}:
                raise ValueError(
                    f"Pix2Seq resizes the longer image side and pads to a square canvas: `size` must be an int or "
                    f'{{"longest_edge": int}}, got {size}.'
                )
            longest_edge = size["longest_edge"]
            if not isinstance(longest_edge, int) or isinstance(longest_edge, bool) or longest_edge < 1:
                raise ValueError(f'`size["longest_edge"]` must be a positive int, got {longest_edge!r}.')
            size = SizeDict(longest_edge=longest_edge)
        return super()._standardize_kwargs(size=size, **kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        """Flattens the input into a list of images; unlike the base class, also accepts 2D (grayscale) arrays."""
        if isinstance(images, (list, tuple)) and all(isinstance(item, (list, tuple)) and not item for item in images):
            raise ValueError(f"`images` is empty ({images!r}): pass at least one image (PIL, NumPy or torch).")
        images = self.fetch_images(images)
        if is_valid_image(images) and not is_pil_image(images) and images.ndim == 2:
            return [images]
        if (
            isinstance(images, (list, tuple))
            and len(images) > 0
            and all(is_valid_image(image) and (is_pil_image(image) or image.ndim in (2, 3)) for image in images)
        ):
            return list(images)
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: torch.device | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Converts one PIL image, array or tensor into a channels-first tensor: `uint8` for 8-bit inputs, `float32` in
        the 8-bit range [0, 255] for 16-bit inputs and PIL "I"/"F" images (scaled by their range, see
        `high_bit_depth_pil_values`), unchanged dtype otherwise; RGB when `do_convert_rgb`.

        A floating-point image whose values all lie in [0, 1] while `do_rescale` is on gets a warning (once): it is
        divided by 255 like any other input, as DETR's processor does, which leaves it nearly black.
        """
        image_type = get_image_type(image)
        if image_type not in (ImageType.PIL, ImageType.TORCH, ImageType.NUMPY):
            raise ValueError(f"Unsupported image type {type(image)}; pass PIL images, NumPy arrays or torch tensors.")

        full_intensity = None  # for inputs of more than 8 bits: the value of white, scaled to 255 below
        if image_type == ImageType.PIL:
            image = straight_alpha_pil_image(image)
            high_bit_depth = high_bit_depth_pil_values(image)
            if high_bit_depth is not None:
                array, full_intensity = high_bit_depth
                image = torch.from_numpy(array)
            elif do_convert_rgb and (image.mode != "RGB" or "transparency" in image.info):
                image = torch.from_numpy(convert_to_rgb_pil(image, return_numpy=True))
            else:
                image = torch.from_numpy(np.array(image))
            # `np.array` of a PIL image is (H, W) or (H, W, C).
            input_data_format = ChannelDimension.LAST
        elif image_type == ImageType.NUMPY:
            image = np.ascontiguousarray(image)
            if not image.dtype.isnative:  # e.g. big-endian 16-bit data, which torch cannot wrap
                image = image.astype(image.dtype.newbyteorder("="))
            image = torch.from_numpy(image)

        if image.dtype == torch.uint16:
            image = image.to(torch.float32)
            full_intensity = _UINT16_MAX
        elif (
            full_intensity is None
            and image.is_floating_point()
            and kwargs.get("do_rescale")
            and image.numel()
            and bool(image.max() <= 1)
        ):
            logger.warning_once(
                "Pix2SeqImageProcessor got a floating-point image with every value in [0, 1] and rescales it by "
                "`rescale_factor` (1/255) like 8-bit pixels, as DETR's processor does. If your pixels are already in "
                "[0, 1], pass `do_rescale=False`."
            )

        if image.ndim == 2:
            image = image.unsqueeze(0)
            input_data_format = ChannelDimension.FIRST
        if image.ndim != 3:
            raise ValueError(f"Expected an image with 2 or 3 dimensions, got shape {tuple(image.shape)}.")
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        # No `.contiguous()` here: torchvision resizes channels-last uint8 memory fastest, and stacking copies anyway.
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            image = image.permute(2, 0, 1)

        if full_intensity is not None:
            # To [0, 1] for the RGB(A) conversion, then to the 8-bit range that `rescale_factor` expects.
            image = image / full_intensity
            if do_convert_rgb:
                image = self.convert_to_rgb(image, input_data_format=ChannelDimension.FIRST)
            image = image * 255.0
        elif do_convert_rgb and image_type != ImageType.PIL:
            image = self.convert_to_rgb(image, input_data_format=ChannelDimension.FIRST)

        if device is not None:
            image = image.to(device)
        return image

    # ----------------------------------------------------------------------------------------------------------------
    # Geometry
    # ----------------------------------------------------------------------------------------------------------------

    def resize(
        self,
        image: torch.Tensor,
        size: SizeDict,
        resample: PILImageResampling | tvF.InterpolationMode | int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Resizes `image` (`[..., C, H, W]`) keeping its aspect ratio so that its longer side is `size.longest_edge`;
        `size` may also give an exact `height` and `width`.
        """
        if size.longest_edge is not None:
            height, width = get_size_for_longest_edge(
                image.shape[-2:], size.longest_edge, tensorflow_rounding=kwargs.pop("tensorflow_rounding", False)
            )
        elif size.height is not None and size.width is not None:
            height, width = size.height, size.width
        else:
            raise ValueError(f'`size` must be {{"longest_edge": int}} or give `height` and `width`, got {size}.')
        if (height, width) == tuple(image.shape[-2:]):
            return image
        return super().resize(image, SizeDict(height=height, width=width), resample=resample, **kwargs)

    def prepare_annotation(self, annotation: dict, image_size: tuple[int, int]) -> dict:
        """
        Reads one image's COCO detection annotation into a target in the pixel coordinates of the input image.

        Args:
            annotation (`dict`): `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int,
                "iscrowd": 0 | 1 (optional)}, ...]}`, boxes in absolute pixels.
            image_size (`tuple[int, int]`): `(height, width)` of the image.

        Returns:
            `dict` with `boxes` (`tv_tensors.BoundingBoxes`, XYXY, clipped to the image), `class_labels`
            (`LongTensor[N]`), `image_id` (`LongTensor[1]`) and `orig_size` (`LongTensor[2]`).

        Raises:
            `ValueError` naming the image id, the annotation index and the value for a malformed box, a non-integer
            `category_id`/`image_id`, or a box that `clip_boxes_to_image` refuses (not finite, no area in the image).
        """
        height, width = int(image_size[0]), int(image_size[1])
        image_id = annotation["image_id"]
        if isinstance(image_id, torch.Tensor) and image_id.numel() == 1:
            image_id = image_id.item()
        if not isinstance(image_id, (int, np.integer)) or isinstance(image_id, bool):
            raise ValueError(f"`image_id` must be an int, got {image_id!r}.")
        image_id = int(image_id)

        xywh, class_labels, indices = [], [], []
        for index, obj in enumerate(annotation["annotations"]):
            if obj.get("iscrowd", 0):
                continue
            if "bbox" not in obj or "category_id" not in obj:
                raise ValueError(
                    f"Image {image_id}, annotation {index}: expected the keys 'bbox' and 'category_id', got "
                    f"{sorted(obj)}."
                )
            bbox = obj["bbox"]
            try:
                bbox = [float(v) for v in (bbox.tolist() if hasattr(bbox, "tolist") else bbox)]
            except (TypeError, ValueError):
                raise ValueError(f"Image {image_id}, annotation {index}: 'bbox' must be 4 numbers, got {bbox!r}.")
            if len(bbox) != 4:
                raise ValueError(f"Image {image_id}, annotation {index}: 'bbox' must be 4 numbers, got {bbox!r}.")
            category_id = obj["category_id"]
            if isinstance(category_id, torch.Tensor) and category_id.numel() == 1:
                category_id = category_id.item()
            if isinstance(category_id, (float, np.floating)) and float(category_id).is_integer():
                category_id = int(category_id)
            if not isinstance(category_id, (int, np.integer)) or isinstance(category_id, bool):
                raise ValueError(
                    f"Image {image_id}, annotation {index}: 'category_id' must be an int, got {category_id!r}."
                )
            xywh.append(bbox)
            class_labels.append(int(category_id))
            indices.append(index)

        boxes = clip_boxes_to_image(
            torch.tensor(xywh, dtype=torch.float64),
            (height, width),
            box_name=lambda position: f"Image {image_id}, annotation {indices[position]}",
            box_format="XYWH",
        )
        return {
            "boxes": boxes,
            "class_labels": torch.tensor(class_labels, dtype=torch.int64),
            "image_id": torch.tensor([image_id], dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }

    def boxes_to_canvas(self, boxes: tv_tensors.BoundingBoxes, resized_size: tuple[int, int], canvas_size: int):
        """
        Maps XYXY pixel boxes of an image onto the canvas: resized with the image to `resized_size`, padded
        bottom/right to `canvas_size x canvas_size`, then divided by `canvas_size`. Returns a `FloatTensor[N, 4]`.
        """
        boxes = tvF.resize(boxes, size=list(resized_size))
        boxes = tvF.pad(boxes, padding=[0, 0, canvas_size - resized_size[1], canvas_size - resized_size[0]])
        return (boxes.as_subclass(torch.Tensor) / canvas_size).to(torch.float32)

    # ----------------------------------------------------------------------------------------------------------------
    # Preprocessing
    # ----------------------------------------------------------------------------------------------------------------

    def preprocess(
        self,
        images: ImageInput,
        annotations: dict | list[dict] | None = None,
        boxes: list[torch.Tensor] | None = None,
        **kwargs: Unpack[Pix2SeqImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Prepares images (and, optionally, their objects' boxes) for the model.

        Args:
            images (`ImageInput`):
                An image or a batch of images (PIL, NumPy or torch; channels first or last; 8- or 16-bit).
            annotations (`dict` or `list[dict]`, *optional*):
                COCO detection annotations, one `{"image_id", "annotations": [{"bbox", "category_id", "iscrowd"?}]}`
                per image, boxes `[x, y, w, h]` in absolute pixels (as DETR's image processor takes them).
            boxes (`list[torch.Tensor]`, *optional*):
                The same boxes as tensors, instead of `annotations`: per image a `[N, 4]` tensor of
                `(x_min, y_min, x_max, y_max)` in its pixels (what `Pix2SeqCollator` hands over).
            **kwargs:
                Overrides of the processor's settings (`size`, `do_rescale`, `do_normalize`, `image_mean`,
                `image_std`, `pad_value`, `input_data_format`, `return_tensors`, ...).

        Returns:
            [`BatchFeature`] with `pixel_values` (`[batch_size, 3, S, S]`); with `annotations`, `labels` (see the
            class docstring); with `boxes`, `boxes`: per image a `FloatTensor[N, 4]` of `(x_min, y_min, x_max, y_max)`
            normalised to the canvas.

        Raises:
            `ValueError` naming the image and box (image id and annotation index, or position in the batch and in
            `boxes`) and the value for a box that is not finite or has no area inside its image.
        """
        return super().preprocess(images, annotations, boxes, **kwargs)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        annotations: dict | list[dict] | None,
        boxes: list[torch.Tensor] | None,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | tvF.InterpolationMode | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...] | None,
        image_std: float | tuple[float, ...] | None,
        do_pad: bool,
        pad_value: float,
        official_resize: bool,
        return_tensors: str | TensorType | None,
        disable_grouping: bool | None,
        do_center_crop: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if not do_pad:
            raise ValueError(
                "Pix2Seq places every image on a square canvas and normalises boxes to it; `do_pad=False` is not "
                "supported."
            )
        if do_center_crop:
            raise ValueError("`do_center_crop=True` is not supported: cropping would cut objects out of the image.")
        if size is None or size.longest_edge is None:
            raise ValueError(f'`size` must be {{"longest_edge": int}}, got {size}.')
        canvas = size.longest_edge
        for index, image in enumerate(images):
            if image.is_floating_point() and not bool(torch.isfinite(image).all()):
                count = int((~torch.isfinite(image)).sum())
                raise ValueError(
                    f"Image {index} of the batch has {count} NaN or infinite pixel values (of {image.numel()}); "
                    "images must hold finite values."
                )

        if annotations is not None and boxes is not None:
            raise ValueError("Pass the boxes either as COCO `annotations` or as `boxes` tensors, not both.")
        targets = None
        if boxes is not None:
            boxes = self._pixel_boxes(boxes, [image.shape[-2:] for image in images])
        if annotations is not None:
            if isinstance(annotations, dict):
                annotations = [annotations]
            if len(annotations) != len(images):
                raise ValueError(
                    f"The number of images ({len(images)}) and annotations ({len(annotations)}) do not match."
                )
            validate_annotations(AnnotationFormat.COCO_DETECTION, (AnnotationFormat.COCO_DETECTION,), annotations)
            targets = [
                self.prepare_annotation(annotation, image.shape[-2:]) for image, annotation in zip(images, annotations)
            ]

        if not do_resize:
            for index, image in enumerate(images):
                if max(image.shape[-2:]) > canvas:
                    raise ValueError(
                        f"Image {index} has size {tuple(image.shape[-2:])}, larger than the {canvas}x{canvas} canvas; "
                        "set `do_resize=True` or crop it first."
                    )
        grouped_images, grouped_images_index = group_images_by_shape(images, disable_grouping=disable_grouping)
        processed_groups = {}
        for shape, stacked_images in grouped_images.items():
            if official_resize:
                # Float (and rescaled) first: the official code resizes the [0, 1] float image, with antialiasing.
                stacked_images = stacked_images.to(torch.float32)
                if do_rescale:
                    stacked_images = self.rescale(stacked_images, rescale_factor)
                if do_resize:
                    stacked_images = self.resize(
                        stacked_images, size=size, resample=resample, antialias=True, tensorflow_rounding=True
                    )
                processed_groups[shape] = stacked_images
                continue
            if do_resize:
                stacked_images = self.resize(stacked_images, size=size, resample=resample)
            # Float before padding, so that a fractional `pad_value` survives whatever the input dtype.
            stacked_images = stacked_images.to(torch.float32)
            if do_rescale:
                stacked_images = self.rescale(stacked_images, rescale_factor)
            processed_groups[shape] = stacked_images
        processed = reorder_images(processed_groups, grouped_images_index)
        resized_sizes = [tuple(image.shape[-2:]) for image in processed]

        pad_size = SizeDict(height=canvas, width=canvas)
        processed = self.pad(processed, pad_size=pad_size, fill_value=pad_value, disable_grouping=disable_grouping)
        pixel_values = torch.stack(processed, dim=0)
        if do_normalize:
            pixel_values = self.normalize(pixel_values, image_mean, image_std)

        encoded = BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)
        if targets is not None:
            labels = []
            for target, resized_size in zip(targets, resized_sizes):
                target["boxes"] = self.boxes_to_canvas(target["boxes"], resized_size, canvas)
                target["size"] = torch.tensor(resized_size, dtype=torch.int64)
                labels.append(BatchFeature(target, tensor_type=return_tensors))
            encoded["labels"] = labels
        if boxes is not None:
            encoded["boxes"] = [
                self.boxes_to_canvas(image_boxes, resized_size, canvas)
                for image_boxes, resized_size in zip(boxes, resized_sizes)
            ]
        return encoded

    @staticmethod
    def _pixel_boxes(boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[tv_tensors.BoundingBoxes]:
        """The `boxes` tensors of a batch, checked and clipped to their images by `clip_boxes_to_image`."""
        if isinstance(boxes, torch.Tensor) or len(boxes) != len(image_sizes):
            count = "a single tensor" if isinstance(boxes, torch.Tensor) else f"{len(boxes)} box tensors"
            raise ValueError(
                f"`boxes` must be a list with one `[N, 4]` tensor per image: got {count} for {len(image_sizes)} "
                "images."
            )
        checked = []
        for index, (image_boxes, image_size) in enumerate(zip(boxes, image_sizes)):
            image_boxes = torch.as_tensor(image_boxes)
            if image_boxes.numel() == 0:
                image_boxes = image_boxes.reshape(0, 4)
            if image_boxes.ndim != 2 or image_boxes.shape[1] != 4:
                raise ValueError(
                    f"Image {index} of the batch: `boxes` must have shape [N, 4] (x_min, y_min, x_max, y_max), got "
                    f"{tuple(image_boxes.shape)}."
                )
            name = f"Image {index} of the batch, box {{}}"
            checked.append(clip_boxes_to_image(image_boxes, image_size, box_name=name.format))
        return checked

    # ----------------------------------------------------------------------------------------------------------------
    # Post-processing
    # ----------------------------------------------------------------------------------------------------------------

    def post_process_detections(
        self,
        detections: list[dict[str, torch.Tensor]],
        threshold: float = 0.5,
        target_sizes: TensorType | list[tuple[int, int]] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        Filters, sorts and rescales per-image detections whose boxes are normalised to the canvas.

        Args:
            detections (`list[dict]`): per image, `scores` (`[N]`), `labels` (`[N]`) and `boxes` (`[N, 4]`, XYXY
                normalised to the padded square canvas).
            threshold (`float`): keep detections with a score strictly above it.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `[batch_size, 2]`, *optional*):
                `(height, width)` of each original image. Boxes are then mapped to its pixels (`box * max(height,
                width)`, clipped to the image), and a box that the clipping leaves without area (one in the padding
                beside the image) is dropped. Without it boxes stay normalised to the canvas.
            top_k (`int`, *optional*): keep at most the `top_k` best-scoring detections per image.

        Returns:
            `list[dict]`: per image, `scores`, `labels` and `boxes` (XYXY), sorted by score, best first.
        """
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"`top_k` must be a non-negative int or None, got {top_k!r}.")
        sizes = _target_size_list(target_sizes, len(detections))
        results = []
        for index, detection in enumerate(detections):
            scores, labels, boxes = detection["scores"], detection["labels"], detection["boxes"]
            keep = scores > threshold
            scores, labels, boxes = scores[keep], labels[keep], boxes[keep].to(torch.float32)
            if sizes is not None:
                height, width = sizes[index]
                scaled = boxes * max(height, width)
                boxes = tv_tensors.BoundingBoxes(scaled, format="XYXY", canvas_size=(height, width))
                boxes = tvF.clamp_bounding_boxes(boxes).as_subclass(torch.Tensor)
                # A box that the clipping leaves without area lies in the padding beside the image: not a detection.
                emptied = ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])) & (boxes != scaled).any(dim=1)
                scores, labels, boxes = scores[~emptied], labels[~emptied], boxes[~emptied]
            order = torch.sort(scores, descending=True, stable=True).indices
            if top_k is not None:
                order = order[:top_k]
            scores, labels, boxes = scores[order], labels[order], boxes[order]
            results.append({"scores": scores, "labels": labels, "boxes": boxes})
        return results

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes: TensorType | list[tuple[int, int]] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        [`Pix2SeqProcessor.post_process_object_detection`] (the same code) for the outputs that carry their
        detections: `model(pixel_values)` and `model.generate` with its defaults. Reading raw tokens needs the token
        layout, which only the processor has.

        Args:
            outputs, threshold, target_sizes, top_k: see [`Pix2SeqProcessor.post_process_object_detection`].

        Returns:
            `list[dict]`: per image, `scores`, `labels` and `boxes` (`(x_min, y_min, x_max, y_max)`), best first.
        """
        return post_process_object_detection(self, outputs, threshold, target_sizes, top_k)


_GENERATE_HINT = (
    "Call `model.generate(pixel_values, return_dict_in_generate=True, output_logits=True)` (the defaults of "
    "Pix2Seq's generation config) so that the output carries both `sequences` and the raw `logits`: the class "
    "scores are read from the raw logits."
)


def post_process_object_detection(
    image_processor: Pix2SeqImageProcessor,
    outputs,
    threshold: float = 0.5,
    target_sizes: TensorType | list[tuple[int, int]] | None = None,
    top_k: int | None = None,
    read_tokens: Callable | None = None,
) -> list[dict[str, torch.Tensor]]:
    """
    The post-processing of both [`Pix2SeqProcessor`] and [`Pix2SeqImageProcessor`]: model outputs -> DETR-style
    detections, filtered, sorted and rescaled by `image_processor.post_process_detections`.

    Args:
        image_processor ([`Pix2SeqImageProcessor`]): rescales the boxes.
        outputs: a detection output (`scores`, `labels`, `pred_boxes`, optionally `object_mask`), an output carrying
            one as `detections` (`model.generate`'s), or, with `read_tokens`, any `generate` output with `sequences`
            and raw `logits`.
        threshold, target_sizes, top_k: see [`Pix2SeqProcessor.post_process_object_detection`].
        read_tokens (`Callable`, *optional*): turns a `generate` output into per-image detections
            (`Pix2SeqProcessor.batch_decode`); without it, such an output is a `TypeError`.
    """
    if isinstance(outputs, torch.Tensor):
        raise TypeError(
            "`post_process_object_detection` got a bare tensor of token ids, which has no scores: read it with "
            "`Pix2SeqProcessor.batch_decode`, or keep the raw logits. " + _GENERATE_HINT
        )
    if _field(outputs, "detections") is not None:
        outputs = _field(outputs, "detections")
    pred_boxes, scores, labels = (_field(outputs, name) for name in ("pred_boxes", "scores", "labels"))
    if pred_boxes is not None and scores is not None and labels is not None:
        if scores.ndim == 2 and scores.shape[-1] != pred_boxes.shape[-2]:
            raise ValueError(
                f"`scores` {tuple(scores.shape)} and `pred_boxes` {tuple(pred_boxes.shape)} disagree on the number "
                "of detection slots."
            )
        object_mask = _field(outputs, "object_mask")
        if object_mask is None:
            object_mask = torch.ones_like(scores, dtype=torch.bool)
        detections = [
            {"scores": s[m], "labels": l[m], "boxes": b[m]}
            for s, l, b, m in zip(scores, labels, pred_boxes, object_mask.bool())
        ]
    elif _field(outputs, "sequences") is not None:
        if _field(outputs, "logits") is None:
            raise TypeError("The `generate` output has no raw `logits`. " + _GENERATE_HINT)
        if read_tokens is None:
            raise TypeError(
                "This `generate` output carries no `detections`; reading its tokens needs the token layout: call "
                "`Pix2SeqProcessor.post_process_object_detection`."
            )
        detections = read_tokens(outputs)
    else:
        raise TypeError(
            "Expected the detection output of `Pix2SeqForObjectDetection` (`model(pixel_values)`, with `scores`, "
            "`labels` and `pred_boxes`) or the output of `model.generate` (with `sequences` and `logits`), got "
            f"{type(outputs).__name__}."
        )
    return image_processor.post_process_detections(
        detections, threshold=threshold, target_sizes=target_sizes, top_k=top_k
    )


__all__ = ["Pix2SeqImageProcessor", "get_size_for_longest_edge"]
