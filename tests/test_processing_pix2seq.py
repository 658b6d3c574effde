"""Tests of `Pix2SeqProcessor`: training sequences, post-processing of model and generate outputs, serialisation."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.utils import GenerateEncoderDecoderOutput

from pix2seq_hf.box_codec import Pix2SeqTokenLayout
from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor
from pix2seq_hf.processing_pix2seq import Pix2SeqProcessor
from helpers import TINY_LAYOUT
from helpers import tiny_config as shared_tiny_config

S = 64
LAYOUT = dict(TINY_LAYOUT)
L = 5 * LAYOUT["max_objects"]
BOS, EOS, NOISE = LAYOUT["bos_token_id"], LAYOUT["eos_token_id"], LAYOUT["noise_token_id"]
CLASS0, COORD0, BINS = LAYOUT["class_token_offset"], LAYOUT["coord_token_offset"], LAYOUT["num_bins"]


def make_processor(**codec_options):
    return Pix2SeqProcessor(Pix2SeqImageProcessor(size=S), **LAYOUT, **codec_options)


def tiny_config(**overrides):
    return shared_tiny_config(layers=1, **overrides)


def image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def coco(image_id, *objects):
    return {
        "image_id": image_id,
        "annotations": [{"bbox": list(obj[:4]), "category_id": obj[4]} for obj in objects],
    }


def quantise(value):
    return int(torch.round(torch.tensor(value) * (BINS - 1)).clamp(0, BINS - 1))


def object_tokens(canvas_box, label):
    """Tokens `ymin xmin ymax xmax class` of a canvas-normalised XYXY box."""
    x_min, y_min, x_max, y_max = canvas_box
    return [COORD0 + quantise(v) for v in (y_min, x_min, y_max, x_max)] + [CLASS0 + label]


def generate_output(sequences, class_logit=None):
    """
    A `GenerateEncoderDecoderOutput` for token rows `sequences` (without the prompt): raw logits put 12 on the chosen
    token and 0 elsewhere; at class slots `class_logit[row][object]` overrides the chosen class's logit.
    """
    sequences = torch.tensor(sequences, dtype=torch.long)
    batch, steps = sequences.shape
    logits = torch.zeros(batch, steps, LAYOUT["vocab_size"])
    logits.scatter_(2, sequences[..., None], 12.0)
    if class_logit is not None:
        for row, values in enumerate(class_logit):
            for obj, value in enumerate(values):
                logits[row, 5 * obj + 4, sequences[row, 5 * obj + 4]] = value
    prompt = torch.full((batch, 1), BOS, dtype=torch.long)
    return GenerateEncoderDecoderOutput(
        sequences=torch.cat([prompt, sequences], dim=1), logits=tuple(logits.unbind(dim=1))
    ), logits


# ---------------------------------------------------------------------------------------------------------------------
# Construction, compatibility, serialisation
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_match_the_official_layout():
    processor = Pix2SeqProcessor()
    assert processor.token_layout == Pix2SeqTokenLayout()
    assert isinstance(processor.image_processor, Pix2SeqImageProcessor)
    assert processor.image_processor.size.longest_edge == 640
    assert processor.codec_options == {
        "object_order": "random",
        "sequence_augmentation": True,
        "class_corruption_prob": 0.5,
        "duplicate_noise_share": None,
        "duplicate_jitter": 0.05,
        "random_box_size_std": 0.5,
    }


def test_from_config_and_compatibility():
    config = tiny_config()
    processor = Pix2SeqProcessor.from_config(config, sequence_augmentation=False)
    assert processor.token_layout == config.token_layout
    assert processor.sequence_augmentation is False
    processor.check_model_compatible(config)
    processor.check_model_compatible(SimpleNamespace(config=config))  # a model holding the config
    processor.check_model_compatible(config.token_layout)

    other = tiny_config(num_bins=50, max_objects=20, max_position_embeddings=128)
    with pytest.raises(ValueError) as error:
        processor.check_model_compatible(other)
    message = str(error.value)
    assert "num_bins: 100 here vs 50" in message and "max_objects: 10 here vs 20" in message
    assert "num_classes" not in message
    with pytest.raises(TypeError, match="Pix2Seq model, config or token layout"):
        processor.check_model_compatible(SimpleNamespace(config=object()))


def test_invalid_layout_is_an_error():
    with pytest.raises(ValueError, match="overlap"):
        Pix2SeqProcessor(**{**LAYOUT, "class_token_offset": 198})


def test_save_and_load(tmp_path):
    processor = Pix2SeqProcessor(
        Pix2SeqImageProcessor(size=96, pad_value=0.25, do_normalize=True),
        **LAYOUT,
        object_order="area",
        sequence_augmentation=False,
        class_corruption_prob=0.25,
        duplicate_jitter=0.1,
        random_box_size_std=0.3,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Pix2SeqProcessor"
    for name, value in LAYOUT.items():
        assert saved[name] == value, name
    assert saved["object_order"] == "area"
    assert saved["sequence_augmentation"] is False
    assert saved["class_corruption_prob"] == 0.25
    assert saved["duplicate_jitter"] == 0.1 and saved["random_box_size_std"] == 0.3
    assert saved["image_processor"]["size"] == {"longest_edge": 96}
    assert saved["image_processor"]["pad_value"] == 0.25

    loaded = Pix2SeqProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.token_layout == processor.token_layout
    assert loaded.codec_options == processor.codec_options
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()

    overridden = Pix2SeqProcessor.from_pretrained(tmp_path, sequence_augmentation=True)
    assert overridden.sequence_augmentation is True


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and training sequences
# ---------------------------------------------------------------------------------------------------------------------


def test_images_only():
    inputs = make_processor()([image(30, 50), image(50, 30)])
    assert set(inputs) == {"pixel_values"}
    assert inputs["pixel_values"].shape == (2, 3, S, S)


def test_training_sequence_without_augmentation():
    processor = make_processor(sequence_augmentation=False)
    inputs = processor(image(30, 50), annotations=coco(1, (10, 5, 20, 10, 3)))
    assert set(inputs) == {"pixel_values", "decoder_input_ids", "labels"}
    assert inputs["decoder_input_ids"].shape == inputs["labels"].shape == (1, L)
    canvas_box = processor.image_processor(image(30, 50), annotations=coco(1, (10, 5, 20, 10, 3)))["labels"][0]
    expected = object_tokens(canvas_box["boxes"][0].tolist(), 3)
    labels = inputs["labels"][0]
    assert labels[:5].tolist() == expected
    assert labels[5] == EOS
    decoder_input_ids = inputs["decoder_input_ids"][0]
    assert decoder_input_ids[0] == BOS
    assert decoder_input_ids[1:5].tolist() == expected[:4]  # coordinates are never corrupted


def test_training_sequence_with_augmentation_is_full_and_seeded():
    processor = make_processor()
    annotations = [coco(1, (10, 5, 20, 10, 3), (0, 0, 30, 20, 1)), coco(2, (4, 4, 8, 8, 0))]
    images = [image(30, 50), image(40, 40)]
    first = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(0))
    again = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(0))
    other = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first["labels"], again["labels"])
    torch.testing.assert_close(first["decoder_input_ids"], again["decoder_input_ids"])
    assert not torch.equal(first["decoder_input_ids"], other["decoder_input_ids"])

    class_targets = first["labels"][:, 4::5]
    # Image 0: its two real objects come first (in some order), then noise objects up to max_objects.
    assert sorted(class_targets[0, :2].tolist()) == [CLASS0 + 1, CLASS0 + 3]
    assert torch.all(class_targets[0, 2:] == NOISE)
    assert class_targets[1, 0] == CLASS0 and torch.all(class_targets[1, 1:] == NOISE)


def test_several_sequences_per_image_are_separate_draws_of_its_objects():
    processor = make_processor(object_order="random")
    annotations = [coco(1, (10, 5, 20, 10, 3), (0, 0, 30, 20, 1), (2, 2, 6, 6, 4)), coco(2, (4, 4, 8, 8, 0))]
    images = [image(30, 50), image(40, 40)]
    inputs = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(0), sequences_per_image=3)
    assert inputs["pixel_values"].shape[0] == 2
    assert inputs["labels"].shape == inputs["decoder_input_ids"].shape == (6, L)
    objects = inputs["labels"].view(6, -1, 5)
    # Rows 0-2 are image 0's: the same three real objects first, each row its own order, noise and corruption.
    first = sorted(map(tuple, objects[0, :3].tolist()))
    assert all(sorted(map(tuple, objects[row, :3].tolist())) == first for row in (1, 2))
    assert sorted(row[4] for row in first) == [CLASS0 + 1, CLASS0 + 3, CLASS0 + 4]
    assert len({tuple(row.tolist()) for row in inputs["decoder_input_ids"][:3]}) == 3
    assert torch.all(objects[3:, 0, 4] == CLASS0) and torch.all(objects[3:, 1:, 4] == NOISE)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="sequences_per_image"):
            processor(images, annotations=annotations, sequences_per_image=bad)
    with pytest.raises(ValueError, match="need the objects"):
        processor(images, sequences_per_image=2)


def test_image_without_objects():
    with_noise = make_processor()(image(20, 20), annotations=coco(9), generator=torch.Generator().manual_seed(0))
    labels = with_noise["labels"][0].view(-1, 5)
    assert torch.all(labels[:, 4] == NOISE)  # every slot is a noise object
    assert torch.all(labels[:, :4] == -100)  # whose coordinates are not supervised
    decoder_input_ids = with_noise["decoder_input_ids"][0]
    # Decoder input: BOS, then the noise boxes' coordinate tokens.
    assert decoder_input_ids[0] == BOS
    assert torch.all((decoder_input_ids[1:5] >= COORD0) & (decoder_input_ids[1:5] < COORD0 + BINS))

    plain = make_processor(sequence_augmentation=False)(image(20, 20), annotations=coco(9))
    assert plain["labels"][0, 0] == EOS
    assert plain["decoder_input_ids"][0, 0] == BOS


def test_more_objects_than_max_objects_are_truncated():
    objects = [(i, i, 5, 5, i % 5) for i in range(15)]
    processor = make_processor(sequence_augmentation=False)
    inputs = processor(image(40, 40), annotations=coco(3, *objects), generator=torch.Generator().manual_seed(0))
    assert inputs["labels"].shape == (1, L)
    class_targets = inputs["labels"][0, 4::5]
    assert torch.all((class_targets >= CLASS0) & (class_targets < CLASS0 + 5))  # ten real objects, no EOS


def test_category_id_out_of_range_is_an_error():
    processor = make_processor()
    for category_id in (5, -1, np.int64(7)):
        annotation = coco(42, (1, 1, 4, 4, 0), (2, 2, 4, 4, category_id))
        with pytest.raises(
            ValueError, match=rf"Image 42, annotation 1: category_id {category_id} is outside \[0, num_classes=5\)"
        ):
            processor(image(10, 10), annotations=annotation)


def test_tensor_objects_give_the_sequences_of_coco_annotations():
    processor = make_processor()
    images = [image(30, 50, seed=1), image(40, 20, seed=2)]
    annotations = [coco(1, (2, 3, 10, 12, 0), (20, 5, 25, 20, 4)), coco(2)]
    from_coco = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(3))
    boxes = [torch.tensor([[2.0, 3, 12, 15], [20, 5, 45, 25]]), torch.zeros(0, 4)]
    class_labels = [torch.tensor([0, 4]), torch.zeros(0, dtype=torch.long)]
    from_tensors = processor(
        images, boxes=boxes, class_labels=class_labels, generator=torch.Generator().manual_seed(3)
    )
    assert set(from_tensors) == {"pixel_values", "decoder_input_ids", "labels"}
    for key in from_coco:
        assert torch.equal(from_tensors[key], from_coco[key]), key
    with pytest.raises(ValueError, match="`boxes` and `class_labels` go together"):
        processor(images, boxes=boxes)
    with pytest.raises(ValueError, match="either as COCO `annotations` or as `boxes`"):
        processor(images, annotations=annotations, boxes=boxes, class_labels=class_labels)


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 5], r"Image 0 of the batch, box 1: label 5 is outside \[0, num_classes=5\)"),
        ([-1, 0], r"Image 0 of the batch, box 0: label -1 is outside"),
        ([0.0, 1.0], r"Image 0 of the batch: `class_labels` must hold integers, got torch.float32"),
        ([0], r"Image 0 of the batch: 2 boxes but 1 class labels"),
    ],
)
def test_bad_class_labels_are_errors(labels, message):
    boxes = [torch.tensor([[2.0, 3, 12, 15], [20, 5, 45, 25]])]
    with pytest.raises(ValueError, match=message):
        make_processor()(image(30, 50), boxes=boxes, class_labels=[torch.tensor(labels)])


def test_bad_boxes_are_errors():
    processor = make_processor()
    with pytest.raises(ValueError, match="Image 4, annotation 0: box .* is not finite"):
        processor(image(10, 10), annotations=coco(4, (float("nan"), 1, 2, 2, 0)))
    with pytest.raises(ValueError, match="Image 4, annotation 0: box .* has no area"):
        processor(image(10, 10), annotations=coco(4, (3, 3, 0, 2, 0)))


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing and decoding
# ---------------------------------------------------------------------------------------------------------------------


def test_post_process_detection_output_delegates_to_image_processor():
    processor = make_processor()
    outputs = SimpleNamespace(
        scores=torch.tensor([[0.9, 0.2]]),
        labels=torch.tensor([[1, 2]]),
        pred_boxes=torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0]]]),
        object_mask=torch.tensor([[True, True]]),
    )
    result = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(100, 200)])
    expected = processor.image_processor.post_process_object_detection(outputs, 0.5, [(100, 200)])
    assert len(result) == 1
    torch.testing.assert_close(result[0]["boxes"], expected[0]["boxes"])
    torch.testing.assert_close(result[0]["boxes"], torch.tensor([[20.0, 40.0, 60.0, 80.0]]))


@pytest.mark.parametrize("height, width", [(30, 50), (77, 41)])
def test_box_round_trip_through_sequences(height, width):
    processor = make_processor(sequence_augmentation=False, object_order="area")
    boxes_xywh = [(3.0, 4.0, 20.0, 10.0), (10.0, 12.0, 8.0, 15.0)]
    annotation = coco(1, *[(*box, label) for box, label in zip(boxes_xywh, (2, 4))])
    inputs = processor(image(height, width), annotations=annotation)
    target_tokens = inputs["labels"][0]
    assert target_tokens[10] == EOS
    output, _ = generate_output([target_tokens.tolist()])

    (result,) = processor.post_process_object_detection(output, threshold=0.5, target_sizes=[(height, width)])
    expected = {label: [x, y, x + w, y + h] for (x, y, w, h), label in zip(boxes_xywh, (2, 4))}
    assert sorted(result["labels"].tolist()) == [2, 4]
    # Tolerance: half a quantisation bin plus half a resized pixel (rounding of the shorter side), in original pixels.
    scale = max(height, width)
    tolerance = scale * (0.5 / (BINS - 1) + 0.5 / S) + 1e-4
    for box, label in zip(result["boxes"], result["labels"]):
        assert torch.all((box - torch.tensor(expected[int(label)])).abs() <= tolerance), (box, label)


def test_generate_output_scores_threshold_and_top_k():
    first = object_tokens((0.1, 0.2, 0.5, 0.6), 1)
    second = object_tokens((0.5, 0.5, 1.0, 1.0), 3)
    rows = [first + second + [EOS] * 5, second + [EOS] * 10]
    output, logits = generate_output(rows, class_logit=[[12.0, 3.0], [8.0]])
    expected_scores = [
        [torch.softmax(logits[0, 4], -1)[CLASS0 + 1].item(), torch.softmax(logits[0, 9], -1)[CLASS0 + 3].item()],
        [torch.softmax(logits[1, 4], -1)[CLASS0 + 3].item()],
    ]
    processor = make_processor()
    everything = processor.post_process_object_detection(output, threshold=0.0)
    assert everything[0]["labels"].tolist() == [1, 3]
    # The coordinates are near certain (logit 12 on the written bin), so the scores are the class probabilities up to
    # their coordinate confidence (`coordinate_window`), above 0.999.
    torch.testing.assert_close(everything[0]["scores"], torch.tensor(expected_scores[0]), rtol=1e-3, atol=0)
    torch.testing.assert_close(everything[1]["scores"], torch.tensor(expected_scores[1]), rtol=1e-3, atol=0)
    q = lambda v: quantise(v) / (BINS - 1)
    torch.testing.assert_close(everything[0]["boxes"][0], torch.tensor([q(0.1), q(0.2), q(0.5), q(0.6)]))

    threshold = (expected_scores[0][0] + expected_scores[0][1]) / 2
    filtered = processor.post_process_object_detection(output, threshold=threshold)
    assert [r["labels"].tolist() for r in filtered] == [[1], [3] if expected_scores[1][0] > threshold else []]
    best = processor.post_process_object_detection(output, threshold=0.0, top_k=1)
    assert [r["labels"].tolist() for r in best] == [[1], [3]]
    sized = processor.post_process_object_detection(
        output, threshold=0.0, target_sizes=torch.tensor([[100, 50], [20, 40]])
    )
    # Image 1 is 20 x 40: canvas side 40; its box lies below y = 20, in the padding: clipped to no area, dropped.
    assert sized[1]["boxes"].shape == (0, 4) and sized[1]["labels"].tolist() == []


def test_batch_decode_with_and_without_prompt():
    tokens = object_tokens((0.1, 0.2, 0.5, 0.6), 2) + [EOS] * 5
    output, logits = generate_output([tokens])
    processor = make_processor()
    from_output = processor.batch_decode(output)
    from_tensors = processor.batch_decode(output.sequences, output.logits)
    without_prompt = processor.batch_decode(torch.tensor([tokens]), logits)
    no_logits = processor.batch_decode(output.sequences)
    for decoded in (from_output, from_tensors, without_prompt, no_logits):
        assert decoded[0]["labels"].tolist() == [2]
        torch.testing.assert_close(decoded[0]["boxes"], from_output[0]["boxes"])
    torch.testing.assert_close(from_tensors[0]["scores"], from_output[0]["scores"])


def test_post_process_rejects_what_it_cannot_decode():
    processor = make_processor()
    output, _ = generate_output([[EOS] * 5])
    with pytest.raises(TypeError, match="return_dict_in_generate=True, output_logits=True"):
        processor.post_process_object_detection(output.sequences)
    with pytest.raises(TypeError, match="no raw `logits`"):
        processor.post_process_object_detection(GenerateEncoderDecoderOutput(sequences=output.sequences))
    with pytest.raises(TypeError, match="detection output"):
        processor.post_process_object_detection(SimpleNamespace(foo=1))
    wrong_vocab = GenerateEncoderDecoderOutput(sequences=output.sequences, logits=(torch.zeros(1, 3000),) * 5)
    with pytest.raises(ValueError, match="vocab_size=300"):
        processor.post_process_object_detection(wrong_vocab)


# ---------------------------------------------------------------------------------------------------------------------
# With the model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection

    torch.manual_seed(0)
    return Pix2SeqForObjectDetection(tiny_config(max_position_embeddings=64)).eval()


def test_processor_and_model_end_to_end(tiny_model, tmp_path):
    processor = Pix2SeqProcessor.from_config(tiny_model, image_processor=Pix2SeqImageProcessor(size=S))
    processor.check_model_compatible(tiny_model)
    images = [image(30, 50, seed=1), image(50, 30, seed=2)]
    annotations = [coco(1, (10, 5, 20, 10, 3)), coco(2, (2, 2, 10, 30, 0), (15, 20, 10, 10, 4))]
    inputs = processor(images, annotations=annotations, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = tiny_model(**inputs).loss
    assert torch.isfinite(loss)

    sizes = [(30, 50), (50, 30)]
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        torch.manual_seed(3)
        detection = tiny_model(pixel_values, detect_seed=None)  # the global random state, as `generate`
        torch.manual_seed(3)
        generated = tiny_model.generate(pixel_values)
    from_detection = processor.post_process_object_detection(detection, threshold=0.0, target_sizes=sizes)
    from_generate = processor.post_process_object_detection(generated, threshold=0.0, target_sizes=sizes)
    # Both routes read the same sampled tokens (same seed) and must agree.
    for a, b, (height, width) in zip(from_detection, from_generate, sizes):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert a["labels"].tolist() == b["labels"].tolist()
        assert torch.all(a["scores"][:-1] >= a["scores"][1:])
        assert torch.all(a["boxes"] >= 0)
        assert torch.all(a["boxes"][:, 0::2] <= width) and torch.all(a["boxes"][:, 1::2] <= height)
        assert torch.all((a["labels"] >= 0) & (a["labels"] < 5))

    assert sum(len(result["scores"]) for result in from_detection) > 0  # the comparison above was not vacuous
    # An output without the model's detections (an exported model's) is read from its tokens and logits as the model
    # reads them, sub-bin coordinates included.
    bare = GenerateEncoderDecoderOutput(sequences=generated.sequences, logits=generated.logits)
    from_tokens = processor.post_process_object_detection(bare, threshold=0.0, target_sizes=sizes)
    for a, b in zip(from_tokens, from_generate):
        torch.testing.assert_close(a["boxes"], b["boxes"])

    # The processor saved next to the model comes back through AutoProcessor.
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    tiny_model.config.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Pix2SeqProcessor) and loaded.to_dict() == processor.to_dict()


def test_layout_mismatch_with_model_is_reported(tiny_model):
    processor = Pix2SeqProcessor(**{**LAYOUT, "num_classes": 7})
    with pytest.raises(ValueError, match="num_classes: 7 here vs 5 in the model config"):
        processor.check_model_compatible(tiny_model)
