"""The box codec: quantisation, training sequences with sequence augmentation, decoding of generated tokens."""

import math

import pytest
import torch

from pix2seq_hf.box_codec import (
    NOISE_KINDS,
    OBJECT_ORDERS,
    Pix2SeqBoxCodec,
    Pix2SeqTokenLayout,
    dequantize_coordinates,
    quantize_coordinates,
    read_coordinate_distributions,
)


# pad/EOS 0, prompt 10, noise 30, classes 40..44, coordinate bins 200..299, 10 objects (50 tokens) per sequence.
LAYOUT = Pix2SeqTokenLayout(
    num_bins=100, num_classes=5, vocab_size=300, class_token_offset=40, coord_token_offset=200, max_objects=10
)
NOISE, BOS, EOS = LAYOUT.noise_token_id, LAYOUT.bos_token_id, LAYOUT.eos_token_id
HALF_BIN = 0.5 / 99 + 1e-6
DUPLICATE, SHIFTED, RANDOM = (NOISE_KINDS.index(kind) for kind in ("duplicate", "shifted", "random"))


def _random_boxes(count, generator, min_size=0.05):
    corners = torch.rand(count, 2, 2, generator=generator)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    high = torch.maximum(high, low + min_size).clamp(max=1.0)
    low = torch.minimum(low, high - min_size)
    return torch.cat([low, high], dim=1)


def _object(y0, x0, y1, x1, label):
    """Tokens of one object of LAYOUT, from bins and a label."""
    return [200 + y0, 200 + x0, 200 + y1, 200 + x1, 40 + label]


def _written_objects(out):
    """The full augmented sequence (real + noise objects) as `[max_objects, 5]`, read off the decoder input."""
    # The decoder input is BOS + sequence[:-1]; the missing last token is a class slot, taken from the target.
    return torch.cat([out["decoder_input_ids"][1:], out["labels"][-1:]]).reshape(LAYOUT.max_objects, 5)


# ---------------------------------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bins", [2, 3, 100, 1000, 2000])
def test_round_trip_error_is_at_most_half_a_bin(num_bins):
    generator = torch.Generator().manual_seed(num_bins)
    values = torch.cat([torch.rand(20000, generator=generator), torch.tensor([0.0, 1.0, 0.5])])
    bins = quantize_coordinates(values, num_bins)
    assert bins.dtype == torch.long and bins.min() >= 0 and bins.max() <= num_bins - 1
    restored = dequantize_coordinates(bins, num_bins)
    assert (restored - values).abs().max() <= 0.5 / (num_bins - 1) + 1e-6
    assert quantize_coordinates(torch.tensor([-0.3, 1.7]), num_bins).tolist() == [0, num_bins - 1]
    assert dequantize_coordinates(torch.tensor([0, num_bins - 1]), num_bins).tolist() == [0.0, 1.0]


def test_quantisation_rounds_half_to_even():
    # 0.25 * (3 - 1) = 0.5 -> 0 (even), 0.75 * 2 = 1.5 -> 2 (even); a floor would give 0 and 1.
    assert quantize_coordinates(torch.tensor([0.25, 0.75]), 3).tolist() == [0, 2]


def test_quantisation_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_coordinates(torch.tensor([0.1, float("nan")]), 10)
    with pytest.raises(ValueError, match="`num_bins` must be an integer of at least 2, got 1"):
        quantize_coordinates(torch.tensor([0.1]), 1)
    with pytest.raises(ValueError, match="`num_bins`"):
        dequantize_coordinates(torch.tensor([0]), 1)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------


def test_tokens_are_written_ymin_xmin_ymax_xmax_class():
    codec = Pix2SeqBoxCodec(LAYOUT)
    tokens = codec.encode_objects(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]), torch.tensor([3, 0]))
    assert tokens.tolist() == _object(20, 10, 40, 30, 3) + _object(59, 50, 79, 69, 0)
    assert codec.encode_objects(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).tolist() == []


@pytest.mark.parametrize("num_bins", [2, 100, 1000])
def test_encode_decode_round_trip_through_tokens(num_bins):
    layout = Pix2SeqTokenLayout(
        num_bins=num_bins, num_classes=5, vocab_size=200 + num_bins, class_token_offset=40, coord_token_offset=200
    )
    codec = Pix2SeqBoxCodec(layout)
    generator = torch.Generator().manual_seed(num_bins)
    boxes, labels = _random_boxes(50, generator), torch.randint(0, 5, (50,), generator=generator)
    tokens = codec.encode_objects(boxes, labels)
    assert tokens.shape == (250,)
    (decoded,) = codec.decode(tokens[None])
    assert torch.equal(decoded["labels"], labels)
    assert (decoded["boxes"] - boxes).abs().max() <= 0.5 / (num_bins - 1) + 1e-6
    assert torch.equal(decoded["scores"], torch.ones(50))


# ---------------------------------------------------------------------------------------------------------------------
# Training sequences with sequence augmentation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_real", [0, 1, 3, 10])
def test_sequence_layout_with_augmentation(num_real):
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    generator = torch.Generator().manual_seed(num_real)
    boxes, labels = _random_boxes(num_real, generator), torch.randint(0, 5, (num_real,), generator=generator)
    out = codec.build_training_sequence(boxes, labels, generator)
    assert set(out) == {"decoder_input_ids", "labels"}
    targets, inputs = out["labels"], out["decoder_input_ids"]
    assert targets.shape == inputs.shape == (50,) and targets.dtype == inputs.dtype == torch.long
    assert inputs[0] == BOS
    # Real objects keep their tokens.
    assert torch.equal(targets[: 5 * num_real], codec.encode_objects(boxes, labels))
    # Noise objects fill the rest: class target = noise, coordinate targets -100, and -100 nowhere else.
    expected_ignored = torch.zeros(10, 5, dtype=torch.bool)
    expected_ignored[num_real:, :4] = True
    assert torch.equal(targets == -100, expected_ignored.reshape(-1))
    assert (targets.reshape(10, 5)[num_real:, 4] == NOISE).all()
    assert (targets != EOS).all()  # always full: no EOS with augmentation
    # Decoder input = BOS + sequence[:-1]: coordinates (noise ones included) untouched, class slots corrupted.
    written = _written_objects(out)
    assert torch.equal(written[:num_real, :4], targets.reshape(10, 5)[:num_real, :4])
    assert ((written[:, :4] >= 200) & (written[:, :4] < 300)).all()
    assert ((written[:, 4] == NOISE) | ((written[:, 4] >= 40) & (written[:, 4] < 45))).all()


def test_decoding_a_target_sequence_gives_back_the_real_objects():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    generator = torch.Generator().manual_seed(4)
    boxes, labels = _random_boxes(4, generator), torch.tensor([4, 0, 2, 2])
    targets = codec.build_training_sequence(boxes, labels, generator)["labels"]
    (decoded,) = codec.decode(targets)  # the -100 coordinates of noise objects are not coordinate tokens: dropped
    assert torch.equal(decoded["labels"], labels)
    assert (decoded["boxes"] - boxes).abs().max() <= HALF_BIN


def test_noise_objects_in_sequences_are_near_their_sources_about_half_the_time():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    boxes = torch.tensor([[0.2, 0.2, 0.4, 0.5], [0.6, 0.1, 0.9, 0.3]])
    labels = torch.tensor([1, 3])
    generator = torch.Generator().manual_seed(1)
    near_source, total_noise = 0, 0
    for _ in range(300):
        out = codec.build_training_sequence(boxes, labels, generator)
        assert int((out["labels"].reshape(10, 5)[:, 4] == NOISE).sum()) == LAYOUT.max_objects - 2
        noise = dequantize_coordinates(_written_objects(out)[2:, :4] - 200, 100)  # yxyx
        assert ((noise >= 0) & (noise <= 1)).all()
        yxyx_sources = boxes[:, [1, 0, 3, 2]]
        distance = (noise[:, None, :] - yxyx_sources[None]).abs().max(dim=-1).values.min(dim=1).values
        # Duplicates lie within 2 sigma = 0.1 x box size (0.3 at most here) of their source.
        near_source += int((distance <= 0.1 * 0.3 + HALF_BIN).sum())
        total_noise += len(noise)
    # The number of duplicates is uniform on 0..8, so about half of the noise objects are duplicates.
    assert 0.4 < near_source / total_noise < 0.6


def test_noise_object_statistics():
    codec = Pix2SeqBoxCodec(LAYOUT)
    # Real boxes away from the canvas edges, so that duplicates are never clipped.
    boxes = torch.tensor([[0.3, 0.3, 0.5, 0.6], [0.4, 0.2, 0.8, 0.4], [0.35, 0.35, 0.45, 0.45]])
    sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    generator = torch.Generator().manual_seed(5)
    count, draws = 8, 2000
    num_duplicates, num_shifted, num_bad, relative_jitter, first_kinds, last_kinds = [], 0, 0, [], [], []
    for _ in range(draws):
        noise = codec.sample_noise_objects(boxes, count, generator)
        noise_boxes, kinds, sources = noise["boxes"], noise["kinds"], noise["sources"]
        assert noise_boxes.shape == (count, 4) and kinds.shape == sources.shape == (count,)
        assert ((noise_boxes >= 0) & (noise_boxes <= 1)).all()
        is_duplicate, is_shifted, is_random = kinds == DUPLICATE, kinds == SHIFTED, kinds == RANDOM
        assert (sources[is_random] == -1).all() and ((sources[~is_random] >= 0) & (sources[~is_random] < 3)).all()
        # Duplicates: within 2 sigma = 0.1 x the source's width/height on every coordinate.
        jitter = (noise_boxes[is_duplicate] - boxes[sources[is_duplicate]]) / sizes[sources[is_duplicate]]
        assert (jitter.abs() <= 0.1 + 1e-5).all()
        relative_jitter.append(jitter.reshape(-1))
        # Shifted boxes: the size of their source (clipping can only shrink them).
        shifted_size = noise_boxes[is_shifted, 2:] - noise_boxes[is_shifted, :2]
        assert (shifted_size <= sizes[sources[is_shifted], :2] + 1e-6).all()
        num_duplicates.append(int(is_duplicate.sum()))
        num_shifted += int(is_shifted.sum())
        num_bad += int((~is_duplicate).sum())
        first_kinds.append(int(kinds[0]))
        last_kinds.append(int(kinds[-1]))
    num_duplicates = torch.tensor(num_duplicates, dtype=torch.float)
    # The number of duplicates is uniform on 0..count: mean count/2, every value drawn.
    assert abs(num_duplicates.mean() - count / 2) < 0.25
    assert sorted(set(num_duplicates.long().tolist())) == list(range(count + 1))
    # Bad boxes: about half shifted real boxes, half random boxes.
    assert 0.45 < num_shifted / num_bad < 0.55
    # Jitter: normal of sigma 0.05 truncated at 2 sigma, whose standard deviation is 0.05 * 0.8796.
    assert abs(torch.cat(relative_jitter).std() - 0.05 * 0.8796) < 0.002
    # Kinds are shuffled, not written in blocks: first and last noise objects are duplicates about half the time
    # (in blocks, the first would be a duplicate in 8 draws out of 9).
    assert abs(first_kinds.count(DUPLICATE) / draws - 0.5) < 0.05
    assert abs(last_kinds.count(DUPLICATE) / draws - 0.5) < 0.05


def test_random_noise_boxes_follow_the_size_distribution():
    codec = Pix2SeqBoxCodec(LAYOUT)
    noise = codec.sample_noise_objects(torch.zeros(0, 4), 20000, torch.Generator().manual_seed(6))
    assert (noise["kinds"] == RANDOM).all() and (noise["sources"] == -1).all()  # no real object: random boxes only
    boxes = noise["boxes"]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    # Width w = |N(0, 0.5)| truncated at 1, centre c ~ U(0, 1), clipped to [0, 1]: E[clipped width] = E[w] - E[w^2]/4.
    phi2, mass = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    mean_w = 0.5 * math.sqrt(2 / math.pi) * (1 - math.exp(-2)) / mass
    mean_w2 = 0.25 * (1 - 4 * phi2 / mass)
    widths = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    assert abs(widths.mean() - (mean_w - mean_w2 / 4)) < 0.006
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert abs(centres.mean() - 0.5) < 0.01


@pytest.mark.parametrize("share, expected", [(0.0, 0), (0.5, 4), (1.0, 8), (0.3, 2)])
def test_fixed_duplicate_share(share, expected):
    codec = Pix2SeqBoxCodec(LAYOUT, duplicate_noise_share=share)
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        kinds = codec.sample_noise_objects(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), 8, generator)["kinds"]
        assert int((kinds == DUPLICATE).sum()) == expected
    # No real object to duplicate: random boxes only, whatever the share.
    kinds = codec.sample_noise_objects(torch.zeros(0, 4), 8, generator)["kinds"]
    assert (kinds == RANDOM).all()


def test_empty_image_gets_a_full_sequence_of_random_noise():
    codec = Pix2SeqBoxCodec(LAYOUT)
    out = codec.build_training_sequence(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.Generator().manual_seed(0)
    )
    targets = out["labels"].reshape(10, 5)
    assert (targets[:, :4] == -100).all() and (targets[:, 4] == NOISE).all()
    assert ((_written_objects(out)[:, :4] >= 200) & (_written_objects(out)[:, :4] < 300)).all()
    assert codec.sample_noise_objects(torch.zeros(0, 4), 0)["boxes"].shape == (0, 4)


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_class_corruption_rate(prob):
    codec = Pix2SeqBoxCodec(LAYOUT, class_corruption_prob=prob)
    generator = torch.Generator().manual_seed(2)
    boxes, labels = _random_boxes(4, generator), torch.tensor([0, 1, 2, 3])
    class_inputs = torch.stack(
        [codec.build_training_sequence(boxes, labels, generator)["decoder_input_ids"][5::5] for _ in range(400)]
    )  # class slots of the input (shifted by the prompt); the last class slot is dropped by the shift
    is_random_class = (class_inputs >= 40) & (class_inputs < 45)
    # Every class slot, real and noise objects alike, is corrupted: a random real class, else the noise token.
    assert (is_random_class | (class_inputs == NOISE)).all()
    assert abs(is_random_class.float().mean() - prob) < 0.04
    assert abs(is_random_class[:, :4].float().mean() - prob) < 0.06  # real objects
    assert abs(is_random_class[:, 4:].float().mean() - prob) < 0.06  # noise objects
    if prob > 0:  # random classes are drawn over all classes
        assert set(class_inputs[is_random_class].tolist()) == {40, 41, 42, 43, 44}


def test_class_corruption_does_not_follow_the_true_class():
    codec = Pix2SeqBoxCodec(LAYOUT, class_corruption_prob=1.0, object_order="none")
    generator = torch.Generator().manual_seed(3)
    boxes, labels = _random_boxes(1, generator), torch.tensor([2])
    first_class = [
        int(codec.build_training_sequence(boxes, labels, generator)["decoder_input_ids"][5]) for _ in range(500)
    ]
    assert abs(first_class.count(42) / 500 - 0.2) < 0.06


def test_same_seed_same_sequence():
    codec = Pix2SeqBoxCodec(LAYOUT)
    boxes, labels = _random_boxes(3, torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    first = codec.build_training_sequence(boxes, labels, torch.Generator().manual_seed(11))
    again = codec.build_training_sequence(boxes, labels, torch.Generator().manual_seed(11))
    other = codec.build_training_sequence(boxes, labels, torch.Generator().manual_seed(12))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["decoder_input_ids"], other["decoder_input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# Training sequences without augmentation, orders, truncation
# ---------------------------------------------------------------------------------------------------------------------


def test_without_sequence_augmentation_eos_then_padding():
    codec = Pix2SeqBoxCodec(LAYOUT, sequence_augmentation=False, object_order="none")
    boxes, labels = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.2, 0.9, 0.4]]), torch.tensor([4, 1])
    out = codec.build_training_sequence(boxes, labels)
    targets, inputs = out["labels"], out["decoder_input_ids"]
    assert targets.shape == inputs.shape == (50,)
    assert torch.equal(targets[:10], codec.encode_objects(boxes, labels))
    assert targets[10] == EOS and (targets[11:] == LAYOUT.pad_token_id).all() and (targets != -100).all()
    # The decoder input is the clean target shifted right: class tokens are not corrupted.
    assert torch.equal(inputs, torch.cat([torch.tensor([BOS]), targets[:-1]]))


def test_without_sequence_augmentation_full_and_empty_sequences():
    codec = Pix2SeqBoxCodec(LAYOUT, sequence_augmentation=False, object_order="none")
    generator = torch.Generator().manual_seed(8)
    boxes, labels = _random_boxes(10, generator), torch.randint(0, 5, (10,), generator=generator)
    full = codec.build_training_sequence(boxes, labels)["labels"]
    assert torch.equal(full, codec.encode_objects(boxes, labels))  # max_objects objects: no room for EOS
    empty = codec.build_training_sequence(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (empty["labels"] == EOS).all() and empty["decoder_input_ids"].tolist() == [BOS] + [EOS] * 49


@pytest.mark.parametrize("augmentation", [True, False])
def test_more_than_max_objects_are_truncated_after_ordering(augmentation):
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="area", sequence_augmentation=augmentation)
    generator = torch.Generator().manual_seed(3)
    boxes, labels = _random_boxes(15, generator), torch.randint(0, 5, (15,), generator=generator)
    targets = codec.build_training_sequence(boxes, labels, generator)["labels"]
    assert targets.shape == (50,) and (targets != -100).all() and (targets != NOISE).all()  # ten real objects
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = codec.decode(targets[None])[0]
    expected = area.argsort(descending=True)[:10]
    assert torch.equal(kept["labels"], labels[expected])
    assert (kept["boxes"] - boxes[expected]).abs().max() <= HALF_BIN


def test_random_order_truncation_keeps_a_random_subset():
    codec = Pix2SeqBoxCodec(LAYOUT)
    boxes = torch.stack([torch.tensor([0.0, 0.0, 0.05, 0.05]) + i * 0.05 for i in range(15)])
    generator = torch.Generator().manual_seed(9)
    seen = set()
    for _ in range(30):
        kept = codec.decode(
            codec.build_training_sequence(boxes, torch.zeros(15, dtype=torch.long), generator)["labels"]
        )
        xmins = torch.round(kept[0]["boxes"][:, 0] / 0.05).long().tolist()
        assert len(set(xmins)) == 10  # ten distinct real objects
        seen.update(xmins)
    assert seen == set(range(15))


@pytest.mark.parametrize("order", OBJECT_ORDERS)
def test_object_orders(order):
    codec = Pix2SeqBoxCodec(LAYOUT, object_order=order, sequence_augmentation=False)
    boxes = torch.tensor([[0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.9, 0.9], [0.2, 0.1, 0.3, 0.2]])
    labels = torch.tensor([2, 0, 1])
    generator = torch.Generator().manual_seed(0)
    orders = {
        tuple(codec.decode(codec.build_training_sequence(boxes, labels, generator)["labels"])[0]["labels"].tolist())
        for _ in range(30)
    }
    expected = {"area": (0, 2, 1), "dist2ori": (0, 1, 2), "class": (0, 1, 2), "none": (2, 0, 1)}
    if order == "random":
        assert len(orders) == 6  # a new shuffle every call: all 3! orders show up
    else:
        assert orders == {expected[order]}


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "boxes, labels, message",
    [
        ([[0.1, float("nan"), 0.2, 0.3]], [0], r"`boxes\[0\]` has a non-finite coordinate"),
        ([[0.1, 0.1, 0.2, 0.3], [0.1, 0.1, float("inf"), 0.3]], [0, 1], r"`boxes\[1\]` has a non-finite"),
        ([[0.1, 0.1, 0.2, 0.3]], [5], r"Object 0 has label 5 \(`labels\[0\]`\), outside \[0, num_classes=5\)"),
        ([[0.1, 0.1, 0.2, 0.3]], [-1], "has label -1"),
        ([[0.1, 0.1, 0.2, 0.3]], [1.5], "`labels` must be integer class indices"),
        ([[0.1, 0.1, 0.2]], [0], r"`boxes` must have shape \[N, 4\] \(xyxy\), got \(1, 3\)"),
        ([0.1, 0.1, 0.2, 0.3], [0], r"shape \[N, 4\]"),
        ([[0.1, 0.1, 0.2, 0.3], [0.3, 0.1, 0.3, 0.3]], [0, 0], r"`boxes\[1\]` is degenerate .* \[0.3"),
        ([[0.1, 0.5, 0.2, 0.4]], [0], r"`boxes\[0\]` is degenerate"),
        ([[1.2, 0.1, 1.5, 0.3]], [0], r"`boxes\[0\]` is degenerate"),  # entirely off the canvas
        ([[0.1, 0.1, 0.2, 0.3], [0.2, 0.2, 0.3, 0.3]], [0], "2 boxes but 1 labels"),
    ],
)
def test_bad_objects_raise_clear_errors(boxes, labels, message):
    codec = Pix2SeqBoxCodec(LAYOUT)
    with pytest.raises(ValueError, match=message):
        codec.build_training_sequence(torch.tensor(boxes), torch.tensor(labels))
    with pytest.raises(ValueError, match=message):
        codec.encode_objects(torch.tensor(boxes), torch.tensor(labels))


def test_boxes_slightly_outside_the_canvas_are_clipped():
    codec = Pix2SeqBoxCodec(LAYOUT, object_order="none")
    out = codec.build_training_sequence(torch.tensor([[-0.1, 0.2, 1.2, 0.8]], dtype=torch.float64), [2.0])
    assert out["labels"][:5].tolist() == _object(20, 0, 79, 99, 2)


def test_batch_of_training_sequences():
    codec = Pix2SeqBoxCodec(LAYOUT)
    generator = torch.Generator().manual_seed(10)
    boxes_list = [_random_boxes(n, generator) for n in (0, 3, 12)]
    labels_list = [torch.zeros(n, dtype=torch.long) for n in (0, 3, 12)]
    batch = codec.batch_build_training_sequences(boxes_list, labels_list, generator)
    assert batch["decoder_input_ids"].shape == batch["labels"].shape == (3, 50)
    assert (batch["decoder_input_ids"][:, 0] == BOS).all()
    assert [int((row.reshape(10, 5)[:, 4] == NOISE).sum()) for row in batch["labels"]] == [10, 7, 0]
    empty = codec.batch_build_training_sequences([], [])
    assert empty["labels"].shape == (0, 50)
    with pytest.raises(ValueError, match="Got 3 box lists but 2 label lists"):
        codec.batch_build_training_sequences(boxes_list, labels_list[:2])
    labels_list[1] = torch.tensor([0, 7, 0])
    with pytest.raises(ValueError, match=r"Image 1 of the batch: Object 1 has label 7"):
        codec.batch_build_training_sequences(boxes_list, labels_list)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"object_order": "size"}, ValueError, r"Unknown object_order 'size'; choose one of \('random', 'area'"),
        ({"class_corruption_prob": 1.5}, ValueError, "`class_corruption_prob` must be in \\[0, 1\\], got 1.5"),
        ({"class_corruption_prob": float("nan")}, ValueError, "`class_corruption_prob`"),
        ({"duplicate_noise_share": -0.1}, ValueError, "`duplicate_noise_share` must be None or in \\[0, 1\\]"),
        ({"duplicate_jitter": -0.05}, ValueError, "`duplicate_jitter` must be non-negative"),
        ({"random_box_size_std": 0.0}, ValueError, "`random_box_size_std` must be positive"),
        ({"sequence_augmentation": "yes"}, ValueError, "`sequence_augmentation` must be a bool"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        Pix2SeqBoxCodec(LAYOUT, **kwargs)


def test_constructor_validates_the_layout():
    with pytest.raises(TypeError, match="`layout` must be a `Pix2SeqTokenLayout`"):
        Pix2SeqBoxCodec(LAYOUT.to_dict())
    with pytest.raises(ValueError, match="overlap"):
        Pix2SeqBoxCodec(Pix2SeqTokenLayout(num_classes=5, class_token_offset=28, vocab_size=3000))


def test_zero_duplicate_jitter_makes_exact_duplicates():
    codec = Pix2SeqBoxCodec(LAYOUT, duplicate_noise_share=1.0, duplicate_jitter=0.0)
    box = torch.tensor([[0.1, 0.2, 0.6, 0.4]])
    assert torch.equal(codec.sample_noise_objects(box, 5)["boxes"], box.expand(5, 4))
    with pytest.raises(ValueError, match="`count` must be a non-negative integer, got -1"):
        codec.sample_noise_objects(box, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, expected_labels",
    [
        (_object(1, 2, 3, 4, 0) + _object(5, 6, 7, 8, 1), [0, 1]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 45, 202, 41] + _object(5, 6, 7, 8, 2), [0, 2]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 44, 202, 41] + _object(5, 6, 7, 8, 2), [0, 2]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 202, 203, 204] + _object(5, 6, 7, 8, 2), [0, 2]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 202, 203, 45] + _object(5, 6, 7, 8, 2), [0, 2]),
        (_object(1, 2, 3, 4, 0) + [200, 201, 202, 203, NOISE] + _object(5, 6, 7, 8, 2), [0, 2]),
        (_object(1, 2, 3, 4, 0) + [-100, -100, -100, -100, 41] + [200, 201, 202, 999, 41], [0]),
        (_object(1, 2, 3, 4, 0) + [210, 211], [0]),
        (_object(1, 2, 3, 4, 0) + [210, EOS, 212, 213, 41] + _object(5, 6, 7, 8, 2), [0]),
        (_object(1, 2, 3, 4, 3) + [EOS] * 5 + _object(5, 6, 7, 8, 2), [3]),
        (_object(1, 2, 3, 4, 3) + [210, 211, 212, 213, EOS] + _object(5, 6, 7, 8, 2), [3]),
        ([EOS] * 10, []),
        ([], []),
        ([BOS, 7, 299, 5, 3], []),
    ],
    ids=[
        "clean",
        "class-in-coordinate-slot",
        "last-class-in-coordinate-slot",
        "coordinate-in-class-slot",
        "unknown-class",
        "noise-without-logits",
        "ignored-and-out-of-vocabulary",
        "truncated",
        "eos-mid-object",
        "eos",
        "eos-in-class-slot",
        "all-eos",
        "empty",
        "junk",
    ],
)
def test_malformed_sequences_drop_only_the_bad_object(tokens, expected_labels):
    codec = Pix2SeqBoxCodec(LAYOUT)
    (decoded,) = codec.decode(torch.tensor([tokens], dtype=torch.long).reshape(1, -1))
    assert decoded["labels"].tolist() == expected_labels
    assert decoded["boxes"].shape == (len(expected_labels), 4) and decoded["scores"].shape == (len(expected_labels),)
    assert ((decoded["boxes"] >= 0) & (decoded["boxes"] <= 1)).all()


def test_decode_batch_rows_are_independent():
    codec = Pix2SeqBoxCodec(LAYOUT)
    rows = torch.tensor(
        [
            _object(1, 2, 3, 4, 0) + _object(5, 6, 7, 8, 1) + [EOS] * 5,
            [EOS] * 5 + _object(5, 6, 7, 8, 1) * 2,
            _object(1, 2, 3, 4, 4) + [210, 211, 212, 213, 250] + _object(99, 99, 0, 0, 2),
        ]
    )
    decoded = codec.decode(rows)
    assert [d["labels"].tolist() for d in decoded] == [[0, 1], [], [4, 2]]
    torch.testing.assert_close(decoded[0]["boxes"], torch.tensor([[2, 1, 4, 3], [6, 5, 8, 7]]) / 99)
    groups = codec.decode_groups(rows)
    assert groups["mask"].tolist() == [[True, True, False], [False, False, False], [True, False, True]]
    assert groups["labels"][1].tolist() == [-1, -1, -1] and (groups["boxes"][1] == 0).all()
    assert groups["scores"].tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 1]]
    # A 1-D sequence is read as a batch of one.
    assert codec.decode(rows[0])[0]["labels"].tolist() == [0, 1]


def test_decode_with_logits_picks_best_real_class_and_its_probability():
    codec = Pix2SeqBoxCodec(LAYOUT)
    tokens = torch.tensor([_object(10, 20, 30, 40, 0)[:4] + [NOISE] + _object(1, 2, 3, 4, 1) + [EOS]])
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 11, 300, generator=generator)
    logits[0, 4, NOISE] = 9.0  # the noise token was sampled; the best real class is 3
    logits[0, 4, 40 + 3] = 5.0
    logits[0, 9, 40 + 4] = 6.0  # the class token says 1 but the logits prefer 4: the logits win
    decoded = codec.decode(tokens, logits)[0]
    probs = torch.softmax(logits[0], dim=-1)  # over the FULL vocabulary
    assert decoded["labels"].tolist() == [3, 4]
    torch.testing.assert_close(decoded["scores"], torch.stack([probs[4, 43], probs[9, 44]]))
    assert decoded["scores"][0] < 0.05  # most of the mass is on the noise token
    # Half-precision logits give the same labels; without logits the noise object is dropped.
    assert codec.decode(tokens, logits.half())[0]["labels"].tolist() == [3, 4]
    assert codec.decode(tokens)[0]["labels"].tolist() == [1]


def test_decode_rejects_mismatched_logits_and_bad_shapes():
    codec = Pix2SeqBoxCodec(LAYOUT)
    tokens = torch.tensor([_object(1, 2, 3, 4, 0)])
    with pytest.raises(ValueError, match=r"`logits` must have shape .* got \(1, 4, 300\)"):
        codec.decode(tokens, torch.zeros(1, 4, 300))
    with pytest.raises(ValueError, match="`logits` cover 44 tokens"):
        codec.decode(tokens, torch.zeros(1, 5, 44))
    with pytest.raises(ValueError, match=r"`sequences` must have shape \[batch_size, length\]"):
        codec.decode(tokens[None])
    with pytest.raises(ValueError, match="integer token ids"):
        codec.decode(tokens.float())


def test_decode_sorts_swapped_corners():
    codec = Pix2SeqBoxCodec(LAYOUT)
    (decoded,) = codec.decode(torch.tensor([_object(60, 70, 10, 20, 1)]))
    torch.testing.assert_close(decoded["boxes"], torch.tensor([[20, 10, 70, 60]]) / 99)


def test_decode_reads_full_sequences():
    layout = Pix2SeqTokenLayout()  # official sizes: 100 objects, 500 tokens, vocabulary 3000
    codec = Pix2SeqBoxCodec(layout)
    generator = torch.Generator().manual_seed(0)
    objects = torch.cat(
        [
            torch.randint(1000, 2000, (8, 100, 4), generator=generator),
            torch.randint(100, 180, (8, 100, 1), generator=generator),
        ],
        dim=-1,
    )
    sequences = objects.reshape(8, 500)
    logits = torch.randn(8, 500, 3000, generator=generator)

    assert [len(d["labels"]) for d in codec.decode(sequences, logits)] == [100] * 8
    assert [len(d["labels"]) for d in codec.decode(sequences)] == [100] * 8


def test_coordinate_window_reads_the_mean_bin_and_the_mass_near_the_written_one():
    logits = torch.full((5, 100), -30.0)
    logits[0, [40, 41]] = 3.0  # written 40, as much mass on 41: half a bin up
    logits[1, [39, 40, 41]] = 3.0  # symmetric around the written bin: unchanged
    logits[2, 40], logits[2, 90] = 3.0, 3.0  # far mass (another object's edge) outside the window does not count
    logits[3, [0, 1, 2]] = 3.0  # the first bin: no room below, the edge is not pulled inwards
    logits[4, [97, 98, 99]] = 3.0  # next to the last bin: one bin either side, symmetric
    bins = torch.tensor([40, 40, 40, 0, 98])
    positions, confidences = read_coordinate_distributions(logits, bins, 2)
    torch.testing.assert_close(positions, torch.tensor([40.5, 40.0, 40.0, 0.0, 98.0]))
    # The mass within 2 bins (of the bins that exist): all of it, all, half (the rest is at bin 90), all, all.
    torch.testing.assert_close(confidences, torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0]))
    # A window wide enough takes in the far mode (written bin 50: the mode at 90 is 40 bins away).
    position, confidence = read_coordinate_distributions(logits[2:3], torch.tensor([50]), 45)
    assert float(position) > 60 and float(confidence) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no distribution to read"):
        read_coordinate_distributions(logits, bins, 0)


def test_decode_with_a_coordinate_window_moves_boxes_and_weighs_scores():
    codec = Pix2SeqBoxCodec(LAYOUT)
    tokens = torch.tensor([_object(10, 20, 30, 40, 1) + _object(50, 50, 60, 60, 2)])
    logits = torch.zeros(1, 10, 300)
    for slot, bin_ in enumerate((10, 20, 30, 40)):
        logits[0, slot, 200 + bin_ + 1] = 12.0  # each coordinate of object 0 sure, one bin up from the written one
    logits[0, 4, 40 + 1] = logits[0, 9, 40 + 2] = 8.0  # both classes equally sure; object 1's coordinates uniform
    plain = codec.decode(tokens, logits)[0]
    torch.testing.assert_close(plain["boxes"][0], torch.tensor([20, 10, 40, 30]) / 99)
    torch.testing.assert_close(plain["scores"][0], plain["scores"][1])
    read = codec.decode(tokens, logits, coordinate_window=3)[0]
    shift = read["boxes"][0] - plain["boxes"][0]
    assert bool((shift > 0.9 / 99).all()) and bool((shift < 1 / 99).all())
    # Object 1's coordinates spread over all 100 bins: 7 of them within the window, its score falls accordingly.
    torch.testing.assert_close(read["scores"][1], plain["scores"][1] * 0.07, rtol=1e-4, atol=0)
    assert 0.99 * plain["scores"][0] < read["scores"][0] <= plain["scores"][0]
    # Without logits there is no distribution to read: the written bins.
    torch.testing.assert_close(codec.decode(tokens, coordinate_window=3)[0]["boxes"], plain["boxes"])
    # The official reading keeps the written bins and the class probabilities.
    official = codec.decode_groups(tokens, logits, mode="official", coordinate_window=3)
    torch.testing.assert_close(official["boxes"][0], plain["boxes"])
    torch.testing.assert_close(official["scores"][0], plain["scores"])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`coordinate_window` must be a non-negative int"):
            codec.decode(tokens, logits, coordinate_window=bad)


def test_official_reading_reads_every_group_past_eos_and_masks_what_coco_ignores():
    codec = Pix2SeqBoxCodec(LAYOUT)
    # Group 0 a proper object, group 1 starts with EOS, group 2 has max < min in y, group 3 an unknown class.
    tokens = torch.tensor(
        [_object(1, 2, 3, 4, 0) + [EOS, 200, 210, 220, 41] + _object(50, 10, 20, 30, 2) + _object(1, 1, 9, 9, 3)]
    )
    logits = torch.zeros(1, 20, 300)
    for slot, token in ((4, 42), (9, 43), (14, 41), (19, 60)):  # class token 60: beyond the 5 classes, before 200
        logits[0, slot, token] = 6.0
    official = codec.decode_groups(tokens, logits, mode="official")
    assert official["mask"].tolist() == [[True, True, False, False]]
    assert official["labels"].tolist() == [[2, 3, -1, -1]]  # the logits decide, not the class token
    torch.testing.assert_close(official["boxes"][0, 1], torch.tensor([0.0, 0.0, 20 / 99, 10 / 99]))
    torch.testing.assert_close(official["scores"][0, 0], torch.softmax(logits[0, 4], dim=-1)[42])
    # Strict reading of the same tokens: reading stops at the EOS.
    strict = codec.decode_groups(tokens, logits)
    assert strict["mask"].tolist() == [[True, False, False, False]]
    torch.testing.assert_close(strict["class_log_probs"], official["class_log_probs"])
    with pytest.raises(ValueError, match="raw `logits`"):
        codec.decode_groups(tokens, mode="official")
    with pytest.raises(ValueError, match='"strict" or "official"'):
        codec.decode_groups(tokens, logits, mode="paper")
