"""The box codec: quantisation, training sequences with sequence augmentation, decoding of generated tokens."""

import pytest
import torch

from pix2seq_hf.box_codec import (
    OBJECT_ORDERS,
    Pix2SeqBoxCodec,
    Pix2SeqTokenLayout,
    dequantize_coordinates,
    quantize_coordinates,
)


LAYOUT = Pix2SeqTokenLayout(
    num_bins=100, num_classes=5, vocab_size=300, class_token_offset=40, coord_token_offset=200, max_objects=10
)
NOISE, BOS, EOS = LAYOUT.noise_token_id, LAYOUT.bos_token_id, LAYOUT.eos_token_id


def _random_boxes(count, generator):
    corners = torch.rand(count, 2, 2, generator=generator)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    high = torch.maximum(high, low + 0.05).clamp(max=1.0)
    low = torch.minimum(low, high - 0.05)
    return torch.cat([low, high], dim=1)


@pytest.mark.parametrize("num_bins", [2, 3, 100, 1000, 2000])
def test_round_trip_error_is_at_most_half_a_bin(num_bins):
    generator = torch.Generator().manual_seed(num_bins)
    values = torch.cat([torch.rand(20000, generator=generator), torch.tensor([0.0, 1.0, 0.5])])
    restored = dequantize_coordinates(quantize_coordinates(values, num_bins), num_bins)
    assert (restored - values).abs().max() <= 0.5 / (num_bins - 1) + 1e-6
    assert quantize_coordinates(torch.tensor([-0.3, 1.7]), num_bins).tolist() == [0, num_bins - 1]


def test_quantisation_rounds_half_to_even():
    # 0.5 * (3 - 1) = 1.0 exactly; 0.25 * 2 = 0.5 -> 0 (even), 0.75 * 2 = 1.5 -> 2 (even)
    assert quantize_coordinates(torch.tensor([0.25, 0.75]), 3).tolist() == [0, 2]


def test_encode_decode_round_trip_through_tokens():
    codec = Pix2SeqBoxCodec(LAYOUT)
    generator = torch.Generator().manual_seed(0)
    boxes, labels = _random_boxes(7, generator), torch.randint(0, 5, (7,), generator=generator)
    tokens = codec.encode_objects(boxes, labels)
    assert tokens.shape == (35,)
    # Paper order: ymin xmin ymax xmax class.
    assert tokens[0] == quantize_coordinates(boxes[0, 1], 100) + 200 and tokens[4] == labels[0] + 40
    (decoded,) = codec.decode(tokens[None])
    assert torch.equal(decoded["labels"], labels)
    assert (decoded["boxes"] - boxes).abs().max() <= 0.5 / 99 + 1e-6
    assert torch.equal(decoded["scores"], torch.ones(7))


def _noise_statistics(codec, boxes, labels, draws=300):
    generator = torch.Generator().manual_seed(1)
    sequences = [codec.build_training_sequence(boxes, labels, generator) for _ in range(draws)]
    return sequences


def test_sequences_have_fixed_length_bos_first_and_noise_targets_masked():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    generator = torch.Generator().manual_seed(0)
    boxes, labels = _random_boxes(3, generator), torch.tensor([0, 1, 2])
    out = codec.build_training_sequence(boxes, labels, generator)
    targets, inputs = out["labels"], out["decoder_input_ids"]
    assert targets.shape == inputs.shape == (50,)
    assert inputs[0] == BOS
    # Real objects keep their tokens; noise objects: class target = noise, coordinates ignored.
    assert torch.equal(targets[:15], codec.encode_objects(boxes, labels))
    noise_part = targets[15:].reshape(7, 5)
    assert (noise_part[:, :4] == -100).all() and (noise_part[:, 4] == NOISE).all()
    # Inputs are the shifted sequence: coordinates untouched (noise coordinates included), classes corrupted.
    objects_in = torch.cat([inputs[1:], targets[-1:]]).reshape(10, 5)
    assert torch.equal(objects_in[:3, :4].reshape(-1), targets[:15].reshape(3, 5)[:, :4].reshape(-1))
    assert ((objects_in[3:, :4] >= 200) & (objects_in[3:, :4] < 300)).all()
    classes_in = objects_in[:9, 4]
    assert ((classes_in == NOISE) | ((classes_in >= 40) & (classes_in < 45))).all()


def test_noise_objects_counts_duplicates_and_ranges():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    boxes = torch.tensor([[0.2, 0.2, 0.4, 0.5], [0.6, 0.1, 0.9, 0.3]])
    labels = torch.tensor([1, 3])
    near_source, total_noise = 0, 0
    for out in _noise_statistics(codec, boxes, labels):
        inputs = out["decoder_input_ids"]
        # The decoder input carries the noise coordinates (targets hide them).
        objects = torch.cat([inputs[1:], out["labels"][-1:]]).reshape(10, 5)
        noise = objects[2:, :4]
        assert len(noise) == LAYOUT.max_objects - 2
        coords = dequantize_coordinates(noise - 200, 100)
        assert ((coords >= 0) & (coords <= 1)).all()
        yxyx_sources = boxes[:, [1, 0, 3, 2]]
        distance = (coords[:, None, :] - yxyx_sources[None]).abs().max(dim=-1).values.min(dim=1).values
        near_source += int((distance <= 0.1 * 0.3 + 0.5 / 99 + 1e-6).sum())
        total_noise += len(noise)
    # A uniform share of noise objects are duplicates (mean 1/2), each within 2 sigma = 0.1 box size of its source.
    assert 0.3 < near_source / total_noise < 0.7


def test_image_without_objects_gets_random_boxes_only():
    codec = Pix2SeqBoxCodec(LAYOUT)
    out = codec.build_training_sequence(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.Generator().manual_seed(0))
    targets = out["labels"].reshape(10, 5)
    assert (targets[:, :4] == -100).all() and (targets[:, 4] == NOISE).all()


def test_class_corruption_rate():
    codec = Pix2SeqBoxCodec(LAYOUT, class_corruption_prob=0.5)
    generator = torch.Generator().manual_seed(2)
    boxes, labels = _random_boxes(4, generator), torch.tensor([0, 1, 2, 3])
    random_class, noise = 0, 0
    for _ in range(400):
        inputs = codec.build_training_sequence(boxes, labels, generator)["decoder_input_ids"]
        class_inputs = inputs[5::5]  # class slots of the input (shifted by the prompt)
        random_class += int(((class_inputs >= 40) & (class_inputs < 45)).sum())
        noise += int((class_inputs == NOISE).sum())
    share = random_class / (random_class + noise)
    assert random_class + noise == 400 * 9  # every class slot but the last (dropped by the shift) is corrupted
    assert 0.46 < share < 0.54


def test_without_sequence_augmentation_eos_then_padding():
    codec = Pix2SeqBoxCodec(LAYOUT, sequence_augmentation=False, object_order="none")
    boxes, labels = torch.tensor([[0.1, 0.1, 0.3, 0.3]]), torch.tensor([4])
    out = codec.build_training_sequence(boxes, labels)
    targets, inputs = out["labels"], out["decoder_input_ids"]
    assert torch.equal(targets[:5], codec.encode_objects(boxes, labels))
    assert (targets[5:] == EOS).all() and targets.shape == (50,)
    assert torch.equal(inputs, torch.cat([torch.tensor([BOS]), targets[:-1]]))


def test_more_than_max_objects_are_truncated():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="area")
    generator = torch.Generator().manual_seed(3)
    boxes, labels = _random_boxes(15, generator), torch.randint(0, 5, (15,), generator=generator)
    targets = codec.build_training_sequence(boxes, labels, generator)["labels"]
    assert targets.shape == (50,) and (targets != -100).all()  # ten real objects, no noise
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = codec.decode(targets[None])[0]
    assert len(kept["labels"]) == 10
    expected = boxes[area.argsort(descending=True)[:10]]
    assert (kept["boxes"] - expected).abs().max() <= 0.5 / 99 + 1e-6


@pytest.mark.parametrize("order", OBJECT_ORDERS)
def test_object_orders(order):
    codec = Pix2SeqBoxCodec(LAYOUT, object_order=order, sequence_augmentation=False)
    boxes = torch.tensor([[0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.9, 0.9], [0.2, 0.1, 0.3, 0.2]])
    labels = torch.tensor([2, 0, 1])
    decoded = codec.decode(codec.build_training_sequence(boxes, labels, torch.Generator().manual_seed(0))["labels"][None])[0]
    expected = {"area": [0, 2, 1], "dist2ori": [0, 1, 2], "class": [0, 1, 2], "none": [2, 0, 1]}
    if order == "random":
        assert sorted(decoded["labels"].tolist()) == [0, 1, 2]
    else:
        assert decoded["labels"].tolist() == expected[order]
    with pytest.raises(ValueError, match="Unknown object_order 'size'"):
        Pix2SeqBoxCodec(LAYOUT, object_order="size")


def test_bad_objects_raise_clear_errors():
    codec = Pix2SeqBoxCodec(LAYOUT)
    with pytest.raises(ValueError, match="non-finite"):
        codec.build_training_sequence(torch.tensor([[0.1, float("nan"), 0.2, 0.3]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="label 5, outside"):
        codec.build_training_sequence(torch.tensor([[0.1, 0.1, 0.2, 0.3]]), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        codec.build_training_sequence(torch.tensor([[0.1, 0.1, 0.2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="degenerate"):
        codec.build_training_sequence(torch.tensor([[0.3, 0.1, 0.3, 0.3]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        codec.build_training_sequence(torch.rand(2, 4).sort(dim=1).values, torch.tensor([0]))
    # Slightly outside the canvas is clipped, not an error.
    out = codec.build_training_sequence(torch.tensor([[-0.1, 0.2, 1.2, 0.8]]), torch.tensor([0]))
    assert out["labels"][1] == 200 and out["labels"][3] == 299


def _object(y0, x0, y1, x1, label):
    return [200 + y0, 200 + x0, 200 + y1, 200 + x1, 40 + label]


@pytest.mark.parametrize(
    "tokens, expected_labels",
    [
        (_object(1, 2, 3, 4, 0) + _object(5, 6, 7, 8, 1), [0, 1]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 45, 202, 41] + _object(5, 6, 7, 8, 2), [0, 2]),  # class token in a coordinate slot
        (_object(1, 2, 3, 4, 0) + [200, 201, 202, 203, 204], [0]),  # coordinate in the class slot
        (_object(1, 2, 3, 4, 0) + [210, 211], [0]),  # truncated last object
        (_object(1, 2, 3, 4, 0) + [210, EOS, 212, 213, 41] + _object(5, 6, 7, 8, 2), [0]),  # EOS mid-object
        (_object(1, 2, 3, 4, 3) + [EOS] * 5 + _object(5, 6, 7, 8, 2), [3]),  # stop at EOS
        ([EOS] * 10, []),
        ([], []),
        ([BOS, 7, 999 % 300, 5, 3], []),
    ],
    ids=["clean", "class-in-coordinate-slot", "coordinate-in-class-slot", "truncated", "eos-mid-object", "eos", "all-eos", "empty", "junk"],
)
def test_malformed_sequences_drop_only_the_bad_object(tokens, expected_labels):
    codec = Pix2SeqBoxCodec(LAYOUT)
    (decoded,) = codec.decode(torch.tensor([tokens], dtype=torch.long).reshape(1, -1))
    assert decoded["labels"].tolist() == expected_labels
    assert decoded["boxes"].shape == (len(expected_labels), 4)


def test_decode_with_logits_picks_best_real_class_and_its_probability():
    codec = Pix2SeqBoxCodec(LAYOUT)
    tokens = torch.tensor([_object(10, 20, 30, 40, 0)[:4] + [NOISE]])
    logits = torch.zeros(1, 5, 300)
    logits[0, 4, NOISE] = 5.0
    logits[0, 4, 40 + 3] = 3.0
    (decoded,) = codec.decode(tokens, logits)
    expected = torch.softmax(logits[0, 4], dim=-1)[43]
    assert decoded["labels"].tolist() == [3]
    torch.testing.assert_close(decoded["scores"], expected.reshape(1))
    # Without logits a noise object is dropped.
    assert codec.decode(tokens)[0]["labels"].tolist() == []


def test_decode_sorts_swapped_corners():
    codec = Pix2SeqBoxCodec(LAYOUT)
    (decoded,) = codec.decode(torch.tensor([_object(60, 70, 10, 20, 1)]))
    x0, y0, x1, y1 = decoded["boxes"][0].tolist()
    assert x0 < x1 and y0 < y1
