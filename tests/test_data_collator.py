"""Tests of `Pix2SeqCollator`: what it gives the processor, reproducibility, evaluation targets, batch shapes."""

import io
import logging
import math

import datasets
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from pix2seq_hf.data.collator import Pix2SeqCollator, derive_seed
from pix2seq_hf.data.synthetic import make_synthetic_detection_dataset
from pix2seq_hf.data.transforms import build_train_transforms


CANVAS = 64


class RecordingProcessor:
    """
    Stands in for `Pix2SeqProcessor` where a test checks what the collator hands to it: records every call and
    returns the real processor's output keys (pixels resized unless `do_resize=False`, padded to the canvas; random
    token ids from the given generator).
    """

    def __init__(self):
        self.calls = []

    def __call__(self, images, boxes=None, class_labels=None, return_tensors="pt", generator=None, **kwargs):
        self.calls.append(
            {"images": images, "boxes": boxes, "class_labels": class_labels, "generator": generator, **kwargs}
        )
        pixel_values = torch.zeros(len(images), 3, CANVAS, CANVAS)
        for index, image in enumerate(images):
            tensor = image if isinstance(image, torch.Tensor) else tvF.pil_to_tensor(image.convert("RGB"))
            if kwargs.get("do_resize", True):
                tensor = tvF.resize(tensor, size=None, max_size=CANVAS)
            assert max(tensor.shape[-2:]) <= CANVAS
            pixel_values[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor.float() / 255
        out = {"pixel_values": pixel_values}
        if boxes is not None:
            out["decoder_input_ids"] = torch.randint(0, 50, (len(images), 10), generator=generator)
            out["labels"] = torch.randint(0, 50, (len(images), 10), generator=generator)
        return out


def _example(image_id, size=(80, 60), objects=(), crowd=()):
    """An example in the common format with a white rectangle for each object."""
    image = Image.new("RGB", size)
    for x, y, w, h in list(objects) + list(crowd):
        image.paste((255, 255, 255), (x, y, x + w, y + h))
    boxes = [list(map(float, b)) for b in list(objects) + list(crowd)]
    return {
        "image": image,
        "image_id": image_id,
        "width": size[0],
        "height": size[1],
        "objects": {
            "id": list(range(len(boxes))),
            "area": [b[2] * b[3] for b in boxes],
            "bbox": boxes,
            "category": [1] * len(objects) + [2] * len(crowd),
            "iscrowd": [0] * len(objects) + [1] * len(crowd),
        },
    }


EXAMPLES = [
    _example(11, objects=[(5, 5, 20, 10)], crowd=[(40, 30, 20, 20)]),
    _example(12, size=(50, 90), objects=[(10, 20, 15, 15), (30, 60, 10, 20)]),
    _example(13, size=(30, 30)),
]


def test_training_batch_goes_through_augmentation_then_the_processor_without_resize():
    processor = RecordingProcessor()
    collator = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), seed=1)
    batch = collator(EXAMPLES)
    assert set(batch) == {"pixel_values", "decoder_input_ids", "labels"}
    assert batch["pixel_values"].shape == (3, 3, CANVAS, CANVAS)
    call = processor.calls[-1]
    assert call["do_resize"] is False and call["input_data_format"] == "channels_first"
    assert isinstance(call["generator"], torch.Generator)
    # The objects go to the processor as tensors, in one box format: (x_min, y_min, x_max, y_max) pixels.
    assert "annotations" not in call and len(call["boxes"]) == len(call["class_labels"]) == 3
    for image, boxes, labels in zip(call["images"], call["boxes"], call["class_labels"]):
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and max(image.shape[-2:]) <= CANVAS
        assert isinstance(boxes, torch.Tensor) and boxes.shape == (labels.shape[0], 4)
        assert labels.dtype == torch.int64 and (labels == 1).all()  # the crowd object (label 2) is left out
        for x0, y0, x1, y1 in boxes.tolist():
            w, h, x, y = x1 - x0, y1 - y0, x0, y0
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0
            assert x + w <= image.shape[2] + 1e-4 and y + h <= image.shape[1] + 1e-4
            # The box still frames white pixels of the augmented image.
            inside = image[:, int(y) : int(y + h + 0.999), int(x) : int(x + w + 0.999)]
            assert inside.float().mean() > 100


def test_training_is_reproducible_per_image_whatever_the_batch():
    transforms = build_train_transforms("scratch", CANVAS)
    first = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=5)(EXAMPLES)
    again = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=5)(EXAMPLES)
    for key in first:
        assert torch.equal(first[key], again[key])
    # Image 12's augmentation does not depend on its batch neighbours or position (workers, resumption).
    alone = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=5)(EXAMPLES[1:2][::-1])
    assert torch.equal(alone["pixel_values"][0], first["pixel_values"][1])
    # Another epoch or seed gives another augmentation.
    collator = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=5)
    collator.set_epoch(1)
    assert not torch.equal(collator(EXAMPLES)["pixel_values"], first["pixel_values"])
    other_seed = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=6)(EXAMPLES)
    assert not torch.equal(other_seed["pixel_values"], first["pixel_values"])
    assert derive_seed(5, 0, 12, 0) == derive_seed(5, 0, 12, 0) != derive_seed(5, 1, 12, 0)


def test_two_augmentations_per_image():
    processor = RecordingProcessor()
    collator = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), num_augmentations=2)
    batch = collator(EXAMPLES[:2])
    assert batch["pixel_values"].shape[0] == 4 and batch["labels"].shape[0] == 4
    assert len(processor.calls[-1]["images"]) == len(processor.calls[-1]["boxes"]) == 4
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    with pytest.raises(ValueError, match="num_augmentations"):
        Pix2SeqCollator(processor, num_augmentations=0)


def test_several_sequences_per_image_in_training_batches_only():
    processor = RecordingProcessor()
    collator = Pix2SeqCollator(processor, num_augmentations=2, sequences_per_image=3)
    collator(EXAMPLES[:2])
    assert len(processor.calls[-1]["images"]) == 4 and processor.calls[-1]["sequences_per_image"] == 3
    Pix2SeqCollator(processor, training=False, sequences_per_image=3)(EXAMPLES[:2])
    assert processor.calls[-1]["sequences_per_image"] == 1
    with pytest.raises(ValueError, match="sequences_per_image"):
        Pix2SeqCollator(processor, sequences_per_image=0)


def test_training_without_transforms_lets_the_processor_resize():
    processor = RecordingProcessor()
    Pix2SeqCollator(processor, transforms=None)(EXAMPLES)
    call = processor.calls[-1]
    assert "do_resize" not in call and isinstance(call["images"][0], Image.Image)
    assert call["boxes"][0].tolist() == [[5.0, 5.0, 25.0, 15.0]] and call["class_labels"][0].tolist() == [1]


def test_evaluation_batch_has_ground_truth_with_crowd_objects():
    processor = RecordingProcessor()
    collator = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), training=False)
    batch = collator(EXAMPLES)
    call = processor.calls[-1]
    assert "do_resize" not in call  # the processor's normal resize; no augmentation at evaluation
    assert call["images"][0] is EXAMPLES[0]["image"]
    first = batch["targets"][0]
    assert first["image_id"].tolist() == [11] and first["orig_size"].tolist() == [60, 80]
    assert first["boxes"].tolist() == [[5, 5, 25, 15], [40, 30, 60, 50]]  # XYXY pixels
    assert first["labels"].tolist() == [1, 2] and first["iscrowd"].tolist() == [0, 1]
    assert first["area"].tolist() == [200, 400]
    assert batch["targets"][2]["boxes"].shape == (0, 4)
    # Evaluation sequences (for a validation loss) are the same on every call.
    assert torch.equal(collator(EXAMPLES)["labels"], batch["labels"])
    no_sequences = Pix2SeqCollator(RecordingProcessor(), training=False, return_sequences=False)(EXAMPLES)
    assert set(no_sequences) == {"pixel_values", "targets"}


def test_undecoded_images_and_size_mismatch(caplog):
    buffer = io.BytesIO()
    EXAMPLES[1]["image"].save(buffer, format="PNG")
    raw = dict(EXAMPLES[1], image={"bytes": buffer.getvalue(), "path": None})
    assert Pix2SeqCollator(RecordingProcessor(), training=False)([raw])["targets"][0]["orig_size"].tolist() == [90, 50]

    wrong = dict(EXAMPLES[1], width=90, height=50)  # e.g. an EXIF rotation applied when decoding
    collator = Pix2SeqCollator(RecordingProcessor(), training=False)
    with caplog.at_level(logging.WARNING):
        collator([wrong, wrong])
    assert collator.stats["size_mismatches"] == 2
    # Boxes are clipped to the decoded image; one left with nothing is dropped.
    outside = dict(_example(14, size=(50, 90), objects=[(40, 5, 30, 10), (60, 5, 10, 10)]), width=90, height=50)
    target = collator([outside])["targets"][0]
    assert target["boxes"].tolist() == [[40, 5, 50, 15]] and target["labels"].tolist() == [1]
    assert sum("the decoded image is 50x90 but the example says 90x50" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="image_id 12: the decoded image is 50x90"):
        Pix2SeqCollator(RecordingProcessor(), on_size_mismatch="error")([wrong])
    skipping = Pix2SeqCollator(RecordingProcessor(), training=False, on_size_mismatch="skip")
    batch = skipping([EXAMPLES[0], wrong])
    assert [t["image_id"].item() for t in batch["targets"]] == [11] and batch["pixel_values"].shape[0] == 1
    assert skipping.stats["skipped_examples"] == 1
    with pytest.raises(ValueError, match="Every example of the batch was skipped"):
        skipping([wrong])
    with pytest.raises(ValueError, match="expected 'objects' with 'bbox' and 'category'"):
        Pix2SeqCollator(RecordingProcessor())([{"image": EXAMPLES[0]["image"], "image_id": 1, "objects": {}}])


def test_decoded_images_are_kept_so_a_small_set_decodes_once(monkeypatch, tmp_path):
    from pix2seq_hf.data import collator as collator_module
    from pix2seq_hf.data.images import DecodedImageCache

    raw = []
    for example in EXAMPLES[:2]:
        buffer = io.BytesIO()
        example["image"].save(buffer, format="PNG")
        raw.append(dict(example, image={"bytes": buffer.getvalue(), "path": None}))
    path = tmp_path / "13.png"
    EXAMPLES[2]["image"].save(path)
    raw.append(dict(EXAMPLES[2], image={"bytes": None, "path": str(path)}))
    decoded = []
    real_decode = collator_module.decode_image

    def counting_decode(value, record):
        decoded.append(record)
        return real_decode(value, record)

    monkeypatch.setattr(collator_module, "decode_image", counting_decode)
    transforms = build_train_transforms("light", CANVAS)
    kept = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=3)
    batches = []
    for epoch in range(3):
        kept.set_epoch(epoch)
        batches.append(kept(raw))
    assert len(decoded) == 3  # each image once, from bytes and from a file
    assert kept.image_cache.used_bytes == sum(e["width"] * e["height"] * 3 for e in EXAMPLES)
    # The same batches as decoding every time.
    decoded.clear()
    uncached = Pix2SeqCollator(RecordingProcessor(), transforms=transforms, seed=3, image_cache_bytes=0)
    for epoch, batch in enumerate(batches):
        uncached.set_epoch(epoch)
        assert torch.equal(uncached(raw)["pixel_values"], batch["pixel_values"])
    assert len(decoded) == 9
    # A budget keeps what fits; a changed copy leaves the kept image as it was.
    cache = DecodedImageCache(80 * 60 * 3)
    first, second = EXAMPLES[0]["image"], EXAMPLES[1]["image"]
    cache.put(("path", "a"), first)
    cache.put(("path", "b"), second)
    assert cache.get(("path", "b")) is None and cache.used_bytes == 80 * 60 * 3
    copy = cache.get(("path", "a"))
    copy.paste((1, 2, 3), (0, 0, 80, 60))
    assert cache.get(("path", "a")).tobytes() == first.tobytes()
    assert cache.key(first) is None and DecodedImageCache(0).key({"bytes": b"png", "path": None}) is None
    with pytest.raises(ValueError, match="image cache size must be an int of at least 0 bytes, got -1"):
        Pix2SeqCollator(RecordingProcessor(), image_cache_bytes=-1)


# ------------------------------------------------------------------------------------------------------------------
# With the real processor
# ------------------------------------------------------------------------------------------------------------------


def _real_processor():
    from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor
    from pix2seq_hf.processing_pix2seq import Pix2SeqProcessor

    return Pix2SeqProcessor(
        image_processor=Pix2SeqImageProcessor(size={"longest_edge": CANVAS}),
        num_bins=100,
        num_classes=5,
        vocab_size=300,
        noise_token_id=30,
        class_token_offset=40,
        coord_token_offset=200,
        max_objects=10,
    )


def test_collator_with_the_real_processor_on_synthetic_data():
    processor = _real_processor()
    dataset = make_synthetic_detection_dataset(6, seed=0, image_size=96)
    examples = [dataset[i] for i in range(len(dataset))]
    train = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), num_augmentations=2)
    batch = train(examples)
    assert batch["pixel_values"].shape == (12, 3, CANVAS, CANVAS)
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == (12, 50)
    assert (batch["decoder_input_ids"][:, 0] == processor.bos_token_id).all()
    again = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), num_augmentations=2)
    assert all(torch.equal(batch[key], again(examples)[key]) for key in batch)

    evaluation = Pix2SeqCollator(processor, training=False)(examples)
    assert evaluation["pixel_values"].shape == (6, 3, CANVAS, CANVAS)
    assert evaluation["labels"].shape == (6, 50)
    assert len(evaluation["targets"]) == 6
    assert evaluation["targets"][0]["orig_size"].tolist() == [96, 96]
    assert evaluation["targets"][0]["boxes"].shape[0] == len(examples[0]["objects"]["bbox"])


def test_the_processor_checks_the_objects_and_the_error_names_the_image_ids():
    processor = _real_processor()  # 5 classes
    bad_label = _example(12, size=(50, 90), objects=[(10, 20, 15, 15)])
    bad_label["objects"]["category"] = [7]
    for collator in (Pix2SeqCollator(processor), Pix2SeqCollator(processor, training=False)):
        message = r"Image 1 of the batch, box 0: label 7 is outside \[0, num_classes=5\).*image_ids \[11, 12\]"
        with pytest.raises(ValueError, match=message):
            collator([EXAMPLES[0], bad_label])
    not_finite = _example(14, objects=[(5, 5, 20, 10)])
    not_finite["objects"]["bbox"] = [[5.0, float("nan"), 20.0, 10.0]]
    with pytest.raises(ValueError, match=r"Image 0 of the batch, box 0: box \[5.0, nan, 25.0, nan\] .* not finite"):
        Pix2SeqCollator(processor)([not_finite])


def test_collator_in_a_dataloader_with_a_prepared_dataset():
    from torch.utils.data import DataLoader

    dataset = make_synthetic_detection_dataset(8, seed=1, image_size=64)
    collator = Pix2SeqCollator(_real_processor(), transforms=build_train_transforms("scratch", CANVAS), seed=3)
    loader = DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collator, num_workers=0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 3, CANVAS, CANVAS)
    assert isinstance(dataset.features["image"], datasets.Image)


def test_real_processor_sequences_frame_the_augmented_objects():
    # White rectangles on black: after augmentation, padding and tokenisation, every real object of the target
    # sequence must frame white pixels of `pixel_values` (coordinates read back from the tokens).
    processor = _real_processor()
    collator = Pix2SeqCollator(processor, transforms=build_train_transforms("finetune", CANVAS), seed=2)
    layout = processor.token_layout
    checked = 0
    for epoch in range(4):
        collator.set_epoch(epoch)
        batch = collator(EXAMPLES[:2])
        for pixels, labels in zip(batch["pixel_values"], batch["labels"]):
            objects = labels[: 5 * layout.max_objects].reshape(-1, 5)
            real = objects[:, 0] >= layout.coord_token_offset
            for tokens in objects[real]:
                assert layout.class_token_offset <= tokens[4] < layout.class_token_end
                ymin, xmin, ymax, xmax = (
                    (tokens[:4] - layout.coord_token_offset).float() / (layout.num_bins - 1) * CANVAS
                ).tolist()
                # The centre is white, and so is the inside (a pixel in from each side, where resizing blurs).
                assert pixels[:, int((ymin + ymax) / 2), int((xmin + xmax) / 2)].min() > 0.9
                inside = pixels[
                    :, math.ceil(ymin) + 1 : math.floor(ymax) - 1, math.ceil(xmin) + 1 : math.floor(xmax) - 1
                ]
                assert inside.numel() == 0 or inside.min() > 0.9, (ymin, xmin, ymax, xmax)
                # Just outside the box, the image is black or padding (the objects are far apart).
                outside = pixels[
                    :, max(round(ymin) - 2, 0) : round(ymax) + 2, max(round(xmin) - 2, 0) : round(xmax) + 2
                ]
                assert (outside > 0.9).all(dim=0).sum() <= (ymax - ymin + 1) * (xmax - xmin + 1)
                checked += 1
    assert checked >= 8
