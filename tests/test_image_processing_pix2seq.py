"""Tests of `Pix2SeqImageProcessor`: geometry, input kinds, annotations, post-processing, serialisation."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor, get_size_for_longest_edge

S = 64  # canvas used by most tests


def random_uint8(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def coco(image_id, *objects):
    """COCO detection annotation from `(x, y, w, h, category_id[, iscrowd])` tuples."""
    annotations = []
    for obj in objects:
        annotation = {"bbox": list(obj[:4]), "category_id": obj[4]}
        if len(obj) > 5:
            annotation["iscrowd"] = obj[5]
        annotations.append(annotation)
    return {"image_id": image_id, "annotations": annotations}


@pytest.fixture(scope="module")
def processor():
    return Pix2SeqImageProcessor(size={"longest_edge": S})


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, longest_edge, expected",
    [
        ((30, 50), 64, (38, 64)),
        ((50, 30), 64, (64, 38)),
        ((64, 64), 64, (64, 64)),
        ((1, 1), 640, (640, 640)),
        ((1, 1000), 640, (1, 640)),
        ((4000, 6000), 640, (427, 640)),
        ((480, 640), 640, (480, 640)),
    ],
)
def test_size_for_longest_edge(image_size, longest_edge, expected):
    assert get_size_for_longest_edge(image_size, longest_edge) == expected


def test_defaults_follow_official_recipe():
    processor = Pix2SeqImageProcessor()
    assert processor.size.longest_edge == 640
    assert processor.pad_value == pytest.approx(0.3)
    assert processor.do_rescale and processor.rescale_factor == pytest.approx(1 / 255)
    assert not processor.do_normalize
    assert processor.do_convert_rgb
    out = processor(Image.fromarray(random_uint8(48, 64)), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 640, 640)
    assert out["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("height, width", [(30, 50), (50, 30), (64, 64)])
def test_resize_and_pad_bottom_right(processor, height, width):
    array = random_uint8(height, width)
    pixel_values = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"][0]
    new_h, new_w = get_size_for_longest_edge((height, width), S)

    # The image sits in the top-left corner, resized as torchvision does it, rescaled to [0, 1].
    expected = tvF.resize(torch.from_numpy(array).permute(2, 0, 1), [new_h, new_w], antialias=True).float() / 255
    torch.testing.assert_close(pixel_values[:, :new_h, :new_w], expected)
    # Bottom and right of it: exactly the pad value, nothing else.
    pad = torch.ones(3, S, S, dtype=torch.bool)
    pad[:, :new_h, :new_w] = False
    assert torch.all(pixel_values[pad] == torch.tensor(0.3))
    assert pad.sum() == 3 * (S * S - new_h * new_w)


def test_batch_of_mixed_sizes_and_types(processor):
    first, second = random_uint8(30, 50, seed=1), random_uint8(50, 30, seed=2)
    batch = processor([Image.fromarray(first), torch.from_numpy(second).permute(2, 0, 1)], return_tensors="pt")
    alone = [processor(Image.fromarray(first))["pixel_values"][0], processor(second)["pixel_values"][0]]
    assert batch["pixel_values"].shape == (2, 3, S, S)
    torch.testing.assert_close(batch["pixel_values"], torch.stack(alone))


def test_invalid_settings_are_errors(processor):
    image = Image.fromarray(random_uint8(10, 10))
    with pytest.raises(ValueError, match="longest_edge"):
        Pix2SeqImageProcessor(size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="longest_edge"):
        processor(image, size={"shortest_edge": 32})
    with pytest.raises(ValueError, match="do_pad=False"):
        processor(image, do_pad=False)
    with pytest.raises(ValueError, match="larger than the 64x64 canvas"):
        processor(Image.fromarray(random_uint8(10, 70)), do_resize=False)
    with pytest.raises(ValueError, match="empty image"):
        processor(np.zeros((0, 5, 3), dtype=np.uint8), input_data_format="channels_last")


def test_int_size_means_longest_edge():
    processor = Pix2SeqImageProcessor(size=32)
    assert processor.size.longest_edge == 32
    assert processor(Image.fromarray(random_uint8(8, 16)))["pixel_values"].shape == (1, 3, 32, 32)


def test_no_resize_places_image_on_canvas(processor):
    array = random_uint8(20, 40)
    annotation = coco(1, (4, 2, 10, 8, 0))
    out = processor(Image.fromarray(array), annotations=annotation, do_resize=False, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"][0, :, :20, :40], torch.from_numpy(array).permute(2, 0, 1) / 255)
    assert torch.all(out["pixel_values"][0, :, 20:, :] == torch.tensor(0.3))
    torch.testing.assert_close(out["labels"][0]["boxes"], torch.tensor([[4, 2, 14, 10]]) / S)


# ---------------------------------------------------------------------------------------------------------------------
# Rescaling and normalisation
# ---------------------------------------------------------------------------------------------------------------------


def test_normalisation_applies_to_image_and_padding(processor):
    image = Image.fromarray(random_uint8(30, 50))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    plain = processor(image, return_tensors="pt")["pixel_values"]
    normalised = processor(image, do_normalize=True, image_mean=mean, image_std=std)["pixel_values"]
    expected = (plain - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(normalised, expected)
    # The padding region holds the normalised pad value.
    torch.testing.assert_close(normalised[0, :, -1, -1], (0.3 - torch.tensor(mean)) / torch.tensor(std))


def test_no_rescale_and_custom_pad_value(processor):
    array = random_uint8(64, 32)
    out = processor(Image.fromarray(array), do_rescale=False, pad_value=7.0)["pixel_values"][0]
    torch.testing.assert_close(out[:, :, :32], torch.from_numpy(array).permute(2, 0, 1).float())
    assert torch.all(out[:, :, 32:] == 7.0)


# ---------------------------------------------------------------------------------------------------------------------
# Input kinds
# ---------------------------------------------------------------------------------------------------------------------


def test_grayscale_pil_and_2d_array(processor):
    gray = random_uint8(64, 64, channels=0)
    expected = torch.from_numpy(gray).float().div(255).expand(3, -1, -1)
    for image in (Image.fromarray(gray, mode="L"), gray, torch.from_numpy(gray)):
        pixel_values = processor(image)["pixel_values"]
        assert pixel_values.shape == (1, 3, S, S)
        torch.testing.assert_close(pixel_values[0], expected)


def test_rgba_is_composited_on_white(processor):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:32, :, 3] = 255  # top half opaque, bottom half transparent
    for image in (Image.fromarray(rgba, mode="RGBA"), rgba):
        pixel_values = processor(image)["pixel_values"][0]
        assert pixel_values.shape == (3, S, S)
        torch.testing.assert_close(pixel_values[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
        torch.testing.assert_close(pixel_values[:, 60, 5], torch.tensor([1.0, 1.0, 1.0]))


def test_16bit_inputs_are_scaled_to_unit_range(processor):
    values = (np.arange(64 * 64, dtype=np.int64) * 16 % 65536).astype(np.uint16).reshape(64, 64)
    expected = torch.from_numpy(values.astype(np.float32) / 65535)
    pil_16 = Image.fromarray(values)
    assert pil_16.mode == "I;16"
    pil_32 = Image.fromarray(values.astype(np.int32))
    assert pil_32.mode == "I"
    for image in (pil_16, pil_32, values, values.astype(">u2"), torch.from_numpy(values)):
        pixel_values = processor(image)["pixel_values"][0]
        assert pixel_values.shape == (3, S, S)
        for channel in range(3):
            torch.testing.assert_close(pixel_values[channel], expected, atol=1e-6, rtol=1e-5)
    # Colour 16-bit, channels last.
    colour = np.stack([values, 65535 - values, np.full_like(values, 65535)], axis=-1)
    pixel_values = processor(colour)["pixel_values"][0]
    torch.testing.assert_close(pixel_values[1], 1 - expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pixel_values[2], torch.ones(S, S))


def test_32bit_pil_image_outside_16bit_range_is_an_error(processor):
    with pytest.raises(ValueError, match="16-bit"):
        processor(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))



def test_integer_and_float_pil_images_are_scaled_by_their_range(processor):
    gray = random_uint8(64, 64, channels=0)
    expected = processor(Image.fromarray(gray, mode="L"))["pixel_values"]
    # An 8-bit image converted to "I" or "F" holds 0..255: 8-bit data, not nearly-black 16-bit data.
    for image in (Image.fromarray(gray, mode="L").convert("I"), Image.fromarray(gray, mode="L").convert("F")):
        torch.testing.assert_close(processor(image)["pixel_values"], expected, atol=1e-6, rtol=1e-5)
    # "F" in [0, 1]: unit-range data.
    unit = Image.fromarray(gray.astype(np.float32) / 255, mode="F")
    torch.testing.assert_close(processor(unit)["pixel_values"], expected, atol=1e-6, rtol=1e-5)
    # Values that fit no range are refused, saying how to convert.
    for values in (np.full((4, 4), -3.0, dtype=np.float32), np.full((4, 4), 1000.0, dtype=np.float32)):
        with pytest.raises(ValueError, match=r"mode 'F' has values in \[.*scale it to 0..255 yourself"):
            processor(Image.fromarray(values, mode="F"))
    with pytest.raises(ValueError, match=r"mode 'I' has values in \[-5, 7\]"):
        processor(Image.fromarray(np.array([[-5, 7]], dtype=np.int32)))


def test_premultiplied_alpha_is_converted_and_lab_is_refused_by_name(processor):
    la = Image.fromarray(np.stack([random_uint8(64, 64, channels=0), np.full((64, 64), 255, np.uint8)], axis=-1), "LA")
    expected = processor(la)["pixel_values"]
    torch.testing.assert_close(processor(la.convert("La"))["pixel_values"], expected)
    rgba = Image.fromarray(np.dstack([random_uint8(64, 64), np.full((64, 64), 255, np.uint8)]), "RGBA")
    torch.testing.assert_close(processor(rgba.convert("RGBa"))["pixel_values"], processor(rgba)["pixel_values"])
    with pytest.raises(ValueError, match="mode 'LAB' are not supported: convert it to RGB with a colour transform"):
        processor(Image.new("LAB", (8, 8)))

def test_one_pixel_image(processor):
    colour = np.array([[[10, 200, 30]]], dtype=np.uint8)
    expected = torch.tensor([10, 200, 30]).float().div(255)[:, None, None].expand(3, S, S)
    for image, kwargs in (
        (Image.fromarray(colour), {}),
        (colour, {"input_data_format": "channels_last"}),
        (torch.from_numpy(colour).permute(2, 0, 1), {"input_data_format": "channels_first"}),
    ):
        pixel_values = processor(image, **kwargs)["pixel_values"]
        assert pixel_values.shape == (1, 3, S, S)
        torch.testing.assert_close(pixel_values[0], expected)


def test_numpy_torch_pil_and_channel_orders_agree(processor):
    array = random_uint8(30, 50, seed=3)
    reference = processor(Image.fromarray(array))["pixel_values"]
    variants = [
        array,
        np.ascontiguousarray(array.transpose(2, 0, 1)),
        torch.from_numpy(array),
        torch.from_numpy(array).permute(2, 0, 1).contiguous(),
    ]
    for image in variants:
        torch.testing.assert_close(processor(image)["pixel_values"], reference)
    # Explicit channel format for an ambiguous shape (3 x 4 x 3).
    tiny = random_uint8(3, 4, seed=4)
    last = processor(tiny, input_data_format="channels_last")["pixel_values"]
    first = processor(np.ascontiguousarray(tiny.transpose(2, 0, 1)), input_data_format="channels_first")
    torch.testing.assert_close(first["pixel_values"], last)


def test_large_image_is_resized_correctly():
    processor = Pix2SeqImageProcessor()
    array = np.zeros((4000, 6000, 3), dtype=np.uint8)
    array[:, :3000, 0] = 255  # left half red
    array[:, 3000:, 2] = 255  # right half blue
    image = Image.fromarray(array)
    pixel_values = processor(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 640, 640)
    torch.testing.assert_close(pixel_values[0, :, 200, 100], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pixel_values[0, :, 200, 540], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.all(pixel_values[0, :, 427:, :] == torch.tensor(0.3))
    assert not torch.any(pixel_values[0, :, 426, :] == torch.tensor(0.3))


# ---------------------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------------------


def test_annotation_boxes_are_normalised_to_canvas(processor):
    image = Image.fromarray(random_uint8(30, 50))  # resized to 38 x 64
    annotation = coco(7, (10, 5, 20, 10, 1), (0, 0, 50, 30, 2))
    labels = processor(image, annotations=annotation, return_tensors="pt")["labels"][0]
    sy = 38 / 30  # the shorter side is rounded, so its scale differs slightly from 64 / 50
    expected = torch.tensor([[10 * 1.28, 5 * sy, 30 * 1.28, 15 * sy], [0, 0, 64, 38]]) / S
    torch.testing.assert_close(labels["boxes"], expected)
    assert labels["boxes"].dtype == torch.float32
    assert labels["class_labels"].tolist() == [1, 2]
    assert labels["image_id"].tolist() == [7]
    assert labels["orig_size"].tolist() == [30, 50]
    assert labels["size"].tolist() == [38, 64]


def test_boxes_are_clipped_and_crowds_dropped(processor):
    image = Image.fromarray(random_uint8(64, 64))
    annotation = coco(1, (-10, 50, 30, 30, 0), (5, 5, 10, 10, 3, 1), (60, -5, 100, 20, 4))
    labels = processor(image, annotations=annotation)["labels"][0]
    torch.testing.assert_close(labels["boxes"], torch.tensor([[0, 50, 20, 64], [60, 0, 64, 15]]) / S)
    assert labels["class_labels"].tolist() == [0, 4]


def test_image_without_objects(processor):
    out = processor(Image.fromarray(random_uint8(20, 20)), annotations=coco(5))
    assert out["labels"][0]["boxes"].shape == (0, 4)
    assert out["labels"][0]["class_labels"].shape == (0,)


@pytest.mark.parametrize(
    "bbox, message",
    [
        ([1, 2, float("nan"), 4], r"Image 11, annotation 1: box \[1.0, 2.0, nan, 4.0\] \(x, y, w, h\) is not finite"),
        ([1, 2, float("inf"), 4], r"Image 11, annotation 1: box .*inf.* is not finite"),
        ([5, 5, 0, 4], r"Image 11, annotation 1: box \[5.0, 5.0, 0.0, 4.0\] .* has no area"),
        ([5, 5, -3, 4], r"Image 11, annotation 1: box .* has no area"),
        ([100, 5, 10, 4], r"Image 11, annotation 1: box \[100.0, 5.0, 10.0, 4.0\] .* has no area inside the 20x10"),
        ([1, 2, 3], r"Image 11, annotation 1: 'bbox' must be 4 numbers"),
    ],
)
def test_bad_boxes_are_errors(processor, bbox, message):
    annotation = {
        "image_id": 11,
        "annotations": [{"bbox": [0, 0, 2, 2], "category_id": 0}, {"bbox": bbox, "category_id": 0}],
    }
    with pytest.raises(ValueError, match=message):
        processor(Image.fromarray(random_uint8(10, 20)), annotations=annotation)


def test_boxes_as_tensors_map_to_the_canvas_like_coco_annotations(processor):
    images = [Image.fromarray(random_uint8(48, 80, seed=1)), Image.fromarray(random_uint8(90, 30, seed=2))]
    annotations = [coco(1, (-10, 5, 30, 30, 0), (60, 10, 30, 20, 4)), coco(2, (3, 40, 20, 60, 1))]
    from_coco = processor(images, annotations=annotations)
    boxes = [torch.tensor([[-10.0, 5, 20, 35], [60, 10, 90, 30]]), torch.tensor([[3.0, 40, 23, 100]])]
    from_tensors = processor(images, boxes=boxes)
    torch.testing.assert_close(from_tensors["pixel_values"], from_coco["pixel_values"])
    assert "labels" not in from_tensors
    for canvas_boxes, target in zip(from_tensors["boxes"], from_coco["labels"]):
        torch.testing.assert_close(canvas_boxes, target["boxes"])
    with pytest.raises(ValueError, match="either as COCO `annotations` or as `boxes`"):
        processor(images, annotations=annotations, boxes=boxes)


@pytest.mark.parametrize(
    "box, message",
    [
        ([1.0, 2.0, float("nan"), 4.0], r"Image 1 of the batch, box 1: box \[1.0, 2.0, nan, 4.0\] \(x_min.*finite"),
        ([5.0, 5.0, 5.0, 9.0], r"Image 1 of the batch, box 1: box \[5.0, 5.0, 5.0, 9.0\] .* has no area"),
        ([30.0, 2.0, 40.0, 4.0], r"Image 1 of the batch, box 1: .* has no area inside the 20x10 image"),
    ],
)
def test_bad_box_tensors_are_errors_naming_image_box_and_value(processor, box, message):
    images = [Image.fromarray(random_uint8(10, 20)), Image.fromarray(random_uint8(10, 20))]
    boxes = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0], box])]
    with pytest.raises(ValueError, match=message):
        processor(images, boxes=boxes)
    with pytest.raises(ValueError, match=r"Image 0 of the batch: `boxes` must have shape \[N, 4\].*\(3,\)"):
        processor(images, boxes=[torch.ones(3), boxes[1]])
    with pytest.raises(ValueError, match=r"one `\[N, 4\]` tensor per image: got 1 box tensors for 2 images"):
        processor(images, boxes=boxes[:1])


def test_malformed_annotations_are_errors(processor):
    image = Image.fromarray(random_uint8(10, 10))
    with pytest.raises(ValueError, match="number of images"):
        processor([image, image], annotations=[coco(1)])
    with pytest.raises(ValueError, match="'category_id' must be an int"):
        processor(image, annotations={"image_id": 1, "annotations": [{"bbox": [0, 0, 2, 2], "category_id": "cat"}]})
    with pytest.raises(ValueError, match="Invalid COCO detection annotations"):
        processor(image, annotations={"annotations": []})


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------------


def fake_detection_output():
    """Two images, three slots each; the last slot of image 0 is not a real detection."""
    return SimpleNamespace(
        scores=torch.tensor([[0.6, 0.9, 0.99], [0.3, 0.7, 0.55]]),
        labels=torch.tensor([[1, 2, 3], [4, 0, 1]]),
        pred_boxes=torch.tensor(
            [
                [[0.1, 0.1, 0.5, 0.3], [0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.3, 0.3]],
                [[0.5, 0.5, 0.6, 0.6], [0.25, 0.5, 0.75, 0.95], [0.0, 0.0, 0.1, 0.1]],
            ]
        ),
        object_mask=torch.tensor([[True, True, False], [True, True, True]]),
    )


def test_post_process_threshold_sort_and_mask(processor):
    results = processor.post_process_object_detection(fake_detection_output(), threshold=0.5)
    assert [r["scores"].tolist() for r in results] == [pytest.approx([0.9, 0.6]), pytest.approx([0.7, 0.55])]
    assert [r["labels"].tolist() for r in results] == [[2, 1], [0, 1]]
    # No target sizes: boxes stay normalised to the canvas.
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.5, 0.3]]))
    everything = processor.post_process_object_detection(fake_detection_output(), threshold=0.0)
    assert [len(r["scores"]) for r in everything] == [2, 3]


def test_post_process_top_k(processor):
    results = processor.post_process_object_detection(fake_detection_output(), threshold=0.0, top_k=1)
    assert [r["labels"].tolist() for r in results] == [[2], [0]]
    assert all(r["boxes"].shape == (1, 4) for r in results)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_post_process_target_sizes_non_square(processor, as_tensor):
    sizes = [(200, 400), (300, 100)]  # landscape, portrait
    target_sizes = torch.tensor(sizes) if as_tensor else sizes
    results = processor.post_process_object_detection(
        fake_detection_output(), threshold=0.5, target_sizes=target_sizes
    )
    # Landscape 200 x 400: canvas side = 400; the full-canvas box is clipped to the image.
    torch.testing.assert_close(
        results[0]["boxes"], torch.tensor([[0.0, 0.0, 400.0, 200.0], [40.0, 40.0, 200.0, 120.0]])
    )
    # Portrait 300 x 100: canvas side = 300; x is clipped at 100.
    torch.testing.assert_close(
        results[1]["boxes"], torch.tensor([[75.0, 150.0, 100.0, 285.0], [0.0, 0.0, 30.0, 30.0]])
    )


def test_post_process_accepts_model_output_mapping(processor):
    from transformers.utils import ModelOutput

    fake = fake_detection_output()
    output = ModelOutput(scores=fake.scores, labels=fake.labels, pred_boxes=fake.pred_boxes)
    results = processor.post_process_object_detection(output, threshold=0.95)
    assert [r["labels"].tolist() for r in results] == [[3], []]  # no object_mask: every slot counts


def test_post_process_errors(processor):
    with pytest.raises(ValueError, match="2 target sizes for a batch of 2|1 target sizes for a batch of 2"):
        processor.post_process_object_detection(fake_detection_output(), target_sizes=[(10, 10)])
    generate_output = SimpleNamespace(sequences=torch.zeros(2, 6, dtype=torch.long), logits=(torch.zeros(2, 30),) * 5)
    with pytest.raises(TypeError, match="carries no `detections`"):
        processor.post_process_object_detection(generate_output)
    with pytest.raises(TypeError, match="read it with `Pix2SeqProcessor.batch_decode`"):
        processor.post_process_object_detection(torch.zeros(2, 6, dtype=torch.long))



def test_post_process_drops_boxes_left_without_area_by_clipping(processor):
    # A 100 x 10 image fills the top tenth of the canvas; below it is padding.
    output = SimpleNamespace(
        scores=torch.tensor([[0.9, 0.8, 0.7, 0.6]]),
        labels=torch.tensor([[0, 1, 2, 3]]),
        pred_boxes=torch.tensor(
            [[[0.1, 0.5, 0.4, 0.9], [0.1, 0.0, 0.5, 0.05], [0.3, 0.02, 0.3, 0.08], [0.6, 0.05, 0.7, 0.5]]]
        ),
    )
    (result,) = processor.post_process_object_detection(output, threshold=0.0, target_sizes=[(10, 100)])
    # Box 0 lies in the padding: dropped. Box 3 reaches into it: clipped. Box 2 has no width as the model gave it:
    # kept (the clipping did not empty it).
    assert result["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[10.0, 0.0, 50.0, 5.0], [30.0, 2.0, 30.0, 8.0], [60.0, 5.0, 70.0, 10.0]])
    )
    # top_k counts the boxes that are kept.
    (result,) = processor.post_process_object_detection(output, threshold=0.0, target_sizes=[(10, 100)], top_k=1)
    assert result["labels"].tolist() == [1]
    # Without target sizes nothing is clipped, so nothing is dropped.
    (result,) = processor.post_process_object_detection(output, threshold=0.0)
    assert len(result["labels"]) == 4


@pytest.mark.parametrize("height, width", [(30, 50), (50, 30), (100, 97)])
def test_box_round_trip_to_original_pixels(processor, height, width):
    boxes_xywh = [(3.0, 4.0, 20.0, 10.0), (0.0, 0.0, width, height), (width - 7.5, height - 6.25, 7.5, 6.25)]
    annotation = coco(1, *[(*box, 0) for box in boxes_xywh])
    labels = processor(Image.fromarray(random_uint8(height, width)), annotations=annotation)["labels"][0]
    canvas_boxes = labels["boxes"]
    output = SimpleNamespace(
        scores=torch.ones(1, 3), labels=torch.zeros(1, 3, dtype=torch.long), pred_boxes=canvas_boxes[None]
    )
    (result,) = processor.post_process_object_detection(output, threshold=0.5, target_sizes=[(height, width)])
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh])
    # The shorter side is rounded to whole pixels when resizing: at most half a resized pixel.
    tolerance = 0.5 * max(height, width) / S
    assert torch.all((result["boxes"] - expected).abs() <= tolerance + 1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load(tmp_path):
    processor = Pix2SeqImageProcessor(
        size=96, pad_value=0.5, do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Pix2SeqImageProcessor"
    assert saved["size"] == {"longest_edge": 96}
    assert saved["pad_value"] == 0.5 and saved["do_normalize"] is True
    loaded = Pix2SeqImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = Image.fromarray(random_uint8(20, 30))
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
