"""Tests of Pix2Seq decoding: the logits processors (`generation_pix2seq.py`) and generation/detection of the model."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from pix2seq_hf.box_codec import Pix2SeqBoxCodec, Pix2SeqTokenLayout
from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig
from pix2seq_hf.generation_pix2seq import PIX2SEQ_GENERATION_DEFAULTS, Pix2SeqLogitsProcessor, Pix2SeqTopPLogitsWarper
from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqObjectDetectionOutput
from helpers import tiny_config as shared_tiny_config


VOCAB, COORD, CLASS, NOISE, EOS, BOS, NUM_CLASSES, NUM_BINS = 300, 200, 40, 30, 0, 10, 5, 100
LAYOUT = Pix2SeqTokenLayout(
    num_bins=NUM_BINS,
    num_classes=NUM_CLASSES,
    vocab_size=VOCAB,
    pad_token_id=EOS,
    eos_token_id=EOS,
    bos_token_id=BOS,
    noise_token_id=NOISE,
    class_token_offset=CLASS,
    coord_token_offset=COORD,
    max_objects=10,
)
COORDS = set(range(COORD, COORD + NUM_BINS))
CLASSES = set(range(CLASS, CLASS + NUM_CLASSES))


def tiny_config(**overrides) -> Pix2SeqConfig:
    return shared_tiny_config(layers=2, **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Pix2SeqForObjectDetection(tiny_config()).eval()


def make_pixels(batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def allowed_set(processor: Pix2SeqLogitsProcessor, num_generated: int, batch_size: int = 1) -> set[int]:
    input_ids = torch.full((batch_size, 1 + num_generated), COORD)
    input_ids[:, 0] = BOS
    input_ids[:, 1 + 4 : 1 + num_generated : 5] = CLASS  # keep the generated prefix well formed
    scores = processor(input_ids, torch.zeros(batch_size, VOCAB))
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def assert_parses(sequence: torch.Tensor, max_new_tokens: int, noise_allowed: bool = True):
    """Prompt, then objects `4 coordinates + class`, EOS only at an object boundary, nothing but EOS after it."""
    tokens = sequence.tolist()
    assert tokens[0] == BOS
    generated = tokens[1:]
    assert len(generated) <= max_new_tokens
    end = generated.index(EOS) if EOS in generated else len(generated)
    assert end % 5 == 0 or end == len(generated), f"EOS inside an object: {tokens}"
    class_tokens = CLASSES | ({NOISE} if noise_allowed else set())
    for position, token in enumerate(generated[:end]):
        assert token in (class_tokens if position % 5 == 4 else COORDS), f"token {token} at slot {position % 5}"
    assert all(token == EOS for token in generated[end:])


# ---------------------------------------------------------------------------------------------------------------------
# Pix2SeqLogitsProcessor on crafted inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_each_slot_allows_only_its_tokens():
    processor = Pix2SeqLogitsProcessor(LAYOUT)
    assert allowed_set(processor, 0) == COORDS | {EOS}
    for objects in (0, 2):
        for slot in (1, 2, 3):
            assert allowed_set(processor, 5 * objects + slot) == COORDS
        assert allowed_set(processor, 5 * objects + 4) == CLASSES | {NOISE}
    assert allowed_set(processor, 10) == COORDS | {EOS}


def test_eos_bias_min_objects_and_suppress_eos():
    scores = torch.zeros(1, VOCAB)
    scores[0, EOS] = 1.0
    biased = Pix2SeqLogitsProcessor(LAYOUT, eos_bias=-3.0)(torch.tensor([[BOS]]), scores)
    assert float(biased[0, EOS]) == pytest.approx(-2.0)
    assert float(biased[0, COORD]) == 0.0
    assert float(scores[0, EOS]) == 1.0  # the input is not modified in place

    at_least_two = Pix2SeqLogitsProcessor(LAYOUT, min_objects=2)
    assert EOS not in allowed_set(at_least_two, 0)
    assert EOS not in allowed_set(at_least_two, 5)
    assert EOS in allowed_set(at_least_two, 10)

    never = Pix2SeqLogitsProcessor(LAYOUT, suppress_eos=True)
    assert all(EOS not in allowed_set(never, n) for n in range(20))


def test_noise_ban_and_grammar_off():
    no_noise = Pix2SeqLogitsProcessor(LAYOUT, suppress_noise_class=True)
    assert allowed_set(no_noise, 4) == CLASSES

    free = Pix2SeqLogitsProcessor(LAYOUT, token_grammar=False)
    assert allowed_set(free, 2) == set(range(VOCAB))  # EOS anywhere, every token allowed
    free_rules = Pix2SeqLogitsProcessor(LAYOUT, token_grammar=False, suppress_noise_class=True, min_objects=1)
    assert allowed_set(free_rules, 2) == set(range(VOCAB)) - {NOISE, EOS}
    assert allowed_set(free_rules, 7) == set(range(VOCAB)) - {NOISE}


def test_vectorised_over_rows_and_ended_rows_stay_valid():
    processor = Pix2SeqLogitsProcessor(LAYOUT)
    # Row 0 ended after one object, row 1 is still writing its second object (slot 2).
    input_ids = torch.tensor(
        [
            [BOS, COORD, COORD, COORD, COORD, CLASS, EOS, EOS],
            [BOS, COORD, COORD, COORD, COORD, CLASS, COORD, COORD],
        ]
    )
    scores = processor(input_ids, torch.randn(2, VOCAB))
    assert set(torch.isfinite(scores[0]).nonzero().flatten().tolist()) == {EOS}
    assert set(torch.isfinite(scores[1]).nonzero().flatten().tolist()) == COORDS
    assert torch.isfinite(scores).any(dim=1).all()


@pytest.mark.parametrize(
    "options", [{}, {"eos_bias": -2.0, "min_objects": 1}, {"token_grammar": False, "suppress_noise_class": True}]
)
def test_positions_of_a_verification_pass_are_processed_as_one_call_each(options):
    """`process_positions` gives, row by row, what calling the processor on each prefix gives (an EOS mid-way too)."""
    processor = Pix2SeqLogitsProcessor(LAYOUT, **options)
    generator = torch.Generator().manual_seed(0)
    objects = [COORD + 3, COORD + 4, COORD + 50, COORD + 60, CLASS + 1] * 2
    sequence = torch.tensor([[BOS, *objects, EOS, COORD + 7, COORD + 8]])
    for first_length in (1, 4, 6, 10):
        rows = sequence.shape[1] - first_length + 1
        scores = torch.randn(rows, VOCAB, generator=generator)
        together = processor.process_positions(sequence, scores, first_length)
        one_by_one = torch.cat(
            [processor(sequence[:, : first_length + row], scores[row : row + 1]) for row in range(rows)]
        )
        torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need 15"):
        processor.process_positions(sequence, torch.randn(6, VOCAB), first_length=10)
    with pytest.raises(ValueError, match="early stop"):
        Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=1).process_positions(sequence, scores, 10)


def test_processor_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="min_objects"):
        Pix2SeqLogitsProcessor(LAYOUT, min_objects=-1)
    with pytest.raises(TypeError, match="min_objects"):
        Pix2SeqLogitsProcessor(LAYOUT, min_objects=1.5)
    with pytest.raises(TypeError, match="eos_bias"):
        Pix2SeqLogitsProcessor(LAYOUT, eos_bias="low")
    with pytest.raises(ValueError, match="eos_bias"):
        Pix2SeqLogitsProcessor(LAYOUT, eos_bias=float("nan"))
    with pytest.raises(TypeError, match="suppress_eos"):
        Pix2SeqLogitsProcessor(LAYOUT, suppress_eos="yes")
    with pytest.raises(ValueError, match="vocab_size=300"):
        Pix2SeqLogitsProcessor(LAYOUT)(torch.tensor([[BOS]]), torch.zeros(1, VOCAB + 1))


def test_official_top_p_keeps_mass_at_most_p():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log()
    official = Pix2SeqTopPLogitsWarper(0.85)(None, logits)
    assert torch.isfinite(official[0]).tolist() == [True, True, False, False]
    paper = TopPLogitsWarper(0.85)(None, logits)  # smallest set with mass >= p
    assert torch.isfinite(paper[0]).tolist() == [True, True, True, False]
    # The most likely token is always kept, even when alone it exceeds p.
    assert torch.isfinite(Pix2SeqTopPLogitsWarper(0.4)(None, logits)[0]).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="top_p"):
        Pix2SeqTopPLogitsWarper(0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Generation config and processor order
# ---------------------------------------------------------------------------------------------------------------------


def processors_for(model, **kwargs):
    generation_config, _ = model._prepare_generation_config(None, **kwargs)
    return model._get_logits_processor(generation_config=generation_config, input_ids_seq_length=1, device="cpu")


def test_pix2seq_processor_runs_first(model):
    processors = processors_for(model, top_p=0.4, min_objects=2)
    assert isinstance(processors[0], Pix2SeqLogitsProcessor)
    assert processors[0].min_objects == 2
    assert any(isinstance(p, TopPLogitsWarper) for p in processors)
    assert not any(isinstance(p, TopKLogitsWarper) for p in processors)  # top_k=0 in the generation config

    official = processors_for(model, official_top_p=True, temperature=0.5)
    assert isinstance(official[0], Pix2SeqLogitsProcessor)
    assert not any(isinstance(p, TopPLogitsWarper) for p in official)
    names = [type(p).__name__ for p in official]
    assert names.index("Pix2SeqTopPLogitsWarper") > names.index("TemperatureLogitsWarper")


def test_user_grammar_processor_replaces_the_configured_one(model):
    from transformers.generation.logits_process import LogitsProcessorList

    mine = Pix2SeqLogitsProcessor(LAYOUT, suppress_eos=True)
    generation_config, _ = model._prepare_generation_config(None)
    processors = model._get_logits_processor(
        generation_config=generation_config,
        input_ids_seq_length=1,
        logits_processor=LogitsProcessorList([mine]),
        device="cpu",
    )
    assert processors[0] is mine
    assert sum(isinstance(p, Pix2SeqLogitsProcessor) for p in processors) == 1
    output = model.generate(make_pixels(1), eos_bias=100.0, logits_processor=LogitsProcessorList([mine]))
    assert output.sequences.shape == (1, 51)  # the user's processor never allows EOS


def test_options_work_without_generation_config_entries(model):
    """A generation config without the Pix2Seq entries (e.g. a user's own) still accepts them as kwargs."""
    from transformers import GenerationConfig

    plain = GenerationConfig(do_sample=False, max_new_tokens=10, decoder_start_token_id=BOS, eos_token_id=EOS)
    output = model.generate(make_pixels(1), generation_config=plain, suppress_eos=True, return_dict_in_generate=True)
    assert output.sequences.shape == (1, 11)
    assert (output.sequences[:, 1:] != EOS).all()


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------


def test_sampled_sequences_parse_under_the_grammar(model):
    torch.manual_seed(0)
    output = model.generate(make_pixels(4), top_p=0.4)
    assert model.generation_config.do_sample is True
    steps = output.sequences.shape[1] - 1
    assert 1 <= steps <= 50 and len(output.logits) == steps
    assert all(step.shape == (4, VOCAB) for step in output.logits)
    for sequence in output.sequences:
        assert_parses(sequence, 50)
    official = model.generate(make_pixels(4), top_p=0.4, official_top_p=True)
    for sequence in official.sequences:
        assert_parses(sequence, 50)


def test_grammar_holds_with_random_logits_at_high_temperature(model):
    torch.manual_seed(1)
    output = model.generate(make_pixels(4, seed=3), temperature=5.0, top_p=1.0, suppress_noise_class=True)
    for sequence in output.sequences:
        assert_parses(sequence, 50, noise_allowed=False)


def test_return_dict_in_generate_false_gives_a_tensor(model):
    tokens = model.generate(make_pixels(2), return_dict_in_generate=False)
    assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.long and tokens.shape[0] == 2


def test_greedy_generation_same_with_and_without_cache(model):
    pixels = make_pixels(3)
    cached = model.generate(pixels, do_sample=False, suppress_eos=True)
    uncached = model.generate(pixels, do_sample=False, suppress_eos=True, use_cache=False)
    assert cached.sequences.shape == (3, 51)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cross_attention_keys_values_computed_once_per_image(model, monkeypatch):
    # The cached loop computes every layer's cross-attention keys/values in one product with the stacked key and value
    # weights (2 * layers * width rows); without a cache each layer projects the image at every step.
    width, layers = model.config.decoder_hidden_size, model.config.decoder_layers
    stacked_calls, per_layer_calls = [], []
    linear = torch.nn.functional.linear

    def recording_linear(input, weight, bias=None):
        if weight.shape[0] == 2 * layers * width:
            stacked_calls.append(input.shape)
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    encoder_calls = []
    hooks = [model.model.encoder.register_forward_hook(lambda *args: encoder_calls.append(1))]
    try:
        pixels = make_pixels(2)
        for loop in ({}, {"static_decoding": False}):
            stacked_calls.clear()
            encoder_calls.clear()
            output = model.generate(pixels, do_sample=False, suppress_eos=True, max_new_tokens=20, **loop)
            assert len(stacked_calls) == 1  # once for the whole generation
            assert len(encoder_calls) == 1
            assert all(output.cache.is_updated[i] for i in range(layers))
            assert int(output.cache.get_seq_length()) == 20  # the last token is never fed back
        # The stacked product gives each layer's own projections.
        memory = model.model.encoder(pixels).last_hidden_state
        for index, layer in enumerate(model.model.decoder.layers):
            cached = output.cache.cross_attention_cache.layers[index]
            heads = layer.encoder_attn.num_heads
            expected = layer.encoder_attn.k_proj(memory).view(2, -1, heads, width // heads).transpose(1, 2)
            torch.testing.assert_close(cached.keys, expected)
        hooks += [
            layer.encoder_attn.k_proj.register_forward_hook(lambda module, args, out: per_layer_calls.append(1))
            for layer in model.model.decoder.layers
        ]
        model.generate(pixels, do_sample=False, suppress_eos=True, max_new_tokens=20, use_cache=False)
        assert len(per_layer_calls) == 20 * layers  # every layer at every step
    finally:
        for hook in hooks:
            hook.remove()


def test_eos_options_shape_the_sequences(model):
    pixels = make_pixels(3)
    torch.manual_seed(2)
    full = model.generate(pixels, suppress_eos=True)
    assert full.sequences.shape == (3, 51) and (full.sequences[:, 1:] != EOS).all()

    one_object = model.generate(pixels, eos_bias=100.0, min_objects=1)
    assert one_object.sequences.shape == (3, 7)
    assert (one_object.sequences[:, 6] == EOS).all() and (one_object.sequences[:, 1:6] != EOS).all()

    torch.manual_seed(3)
    at_least_three = model.generate(pixels, eos_bias=5.0, min_objects=3)
    for sequence in at_least_three.sequences:
        assert (sequence[1:16] != EOS).all()
        assert_parses(sequence, 50)


def test_beam_search_respects_the_grammar(model):
    output = model.generate(make_pixels(2), do_sample=False, num_beams=2, max_new_tokens=15)
    for sequence in output.sequences:
        assert_parses(sequence, 15)


# ---------------------------------------------------------------------------------------------------------------------
# Detection output (model(pixel_values))
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_without_decoder_inputs_detects(model):
    torch.manual_seed(4)
    outputs = model(make_pixels(3))
    assert isinstance(outputs, Pix2SeqObjectDetectionOutput)
    assert outputs.logits.shape == (3, 10, NUM_CLASSES)
    assert outputs.pred_boxes.shape == (3, 10, 4)
    assert outputs.scores.shape == outputs.labels.shape == outputs.object_mask.shape == (3, 10)
    assert outputs.object_mask.dtype == torch.bool and outputs.object_mask.any()
    mask = outputs.object_mask
    assert ((outputs.pred_boxes[mask] >= 0) & (outputs.pred_boxes[mask] <= 1)).all()
    assert ((outputs.labels[mask] >= 0) & (outputs.labels[mask] < NUM_CLASSES)).all()
    assert ((outputs.scores[mask] > 0) & (outputs.scores[mask] <= 1)).all()
    assert (outputs.labels[~mask] == -1).all() and (outputs.scores[~mask] == 0).all()
    # Class log-probabilities: their argmax is the label, their exp at the label the score read with
    # `coordinate_window=0`; the default weighs it by the box's coordinate confidence (at most 1).
    torch.testing.assert_close(outputs.logits[mask].argmax(-1), outputs.labels[mask])
    class_probs = outputs.logits[mask].exp().gather(1, outputs.labels[mask][:, None])[:, 0]
    assert (outputs.scores[mask] <= class_probs * (1 + 1e-6)).all()
    torch.manual_seed(4)
    class_scored = model(make_pixels(3), coordinate_window=0)
    assert torch.equal(class_scored.sequences, outputs.sequences)
    torch.testing.assert_close(class_scored.scores[mask], class_probs)
    for sequence in outputs.sequences:
        assert_parses(sequence, 50)


def test_detections_agree_with_the_codec_on_whole_sequences(model):
    torch.manual_seed(5)
    generated = model.generate(make_pixels(3))
    detections = model.detections_from_generation(generated)
    logits = torch.stack(generated.logits, dim=1)
    window = model.generation_config.coordinate_window
    assert window == PIX2SEQ_GENERATION_DEFAULTS["coordinate_window"] > 0
    expected = Pix2SeqBoxCodec(LAYOUT).decode(generated.sequences[:, 1:], logits, coordinate_window=window)
    for row, image in enumerate(expected):
        mask = detections.object_mask[row]
        assert int(mask.sum()) == len(image["labels"])
        torch.testing.assert_close(detections.pred_boxes[row][mask], image["boxes"].float())
        torch.testing.assert_close(detections.labels[row][mask], image["labels"].long())
        torch.testing.assert_close(detections.scores[row][mask], image["scores"].float())


def test_coordinate_window_option_reads_the_boxes_from_the_logits(model):
    pixels = make_pixels(2)
    greedy = {"do_sample": False, "min_objects": 3}
    written = model.generate(pixels, coordinate_window=0, **greedy)
    default = model.generate(pixels, **greedy)
    assert torch.equal(written.sequences, default.sequences)  # the tokens do not change, only their reading
    codec, logits = Pix2SeqBoxCodec(LAYOUT), torch.stack(default.logits, dim=1)
    tokens = default.sequences[:, 1:]
    for window, output in ((0, written), (PIX2SEQ_GENERATION_DEFAULTS["coordinate_window"], default)):
        groups = codec.decode_groups(tokens, logits, coordinate_window=window)
        torch.testing.assert_close(output.detections.pred_boxes[:, :3], groups["boxes"][:, :3])
    assert not torch.allclose(written.detections.pred_boxes, default.detections.pred_boxes)
    # The model's generation config holds the option for `detect` (and the pipeline, and evaluation).
    model.generation_config.coordinate_window = 0
    try:
        detected = model.detect(pixels, **greedy)
    finally:
        model.generation_config.coordinate_window = PIX2SEQ_GENERATION_DEFAULTS["coordinate_window"]
    torch.testing.assert_close(detected.pred_boxes, written.detections.pred_boxes)
    with pytest.raises(ValueError, match="`coordinate_window` must be a non-negative int"):
        model.generate(pixels, coordinate_window=-2, **greedy)


def test_no_objects_gives_empty_detections(model):
    model.generation_config.eos_bias = 100.0
    try:
        outputs = model(make_pixels(2))
    finally:
        model.generation_config.eos_bias = 0.0
    assert outputs.sequences.shape == (2, 2)
    assert not outputs.object_mask.any()
    assert outputs.pred_boxes.shape == (2, 10, 4)
    assert (outputs.logits == torch.finfo(outputs.logits.dtype).min).all()


def test_detection_output_works_with_the_pipeline_idiom_and_post_processing(model):
    from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor

    torch.manual_seed(6)
    outputs = model(make_pixels(1))
    target_size = torch.IntTensor([[120, 80]])
    # What `ObjectDetectionPipeline._forward` does with the model output:
    rebuilt = outputs.__class__({"target_size": target_size, **outputs})
    assert torch.equal(rebuilt["target_size"], target_size)
    torch.testing.assert_close(rebuilt.pred_boxes, outputs.pred_boxes)

    results = Pix2SeqImageProcessor().post_process_object_detection(rebuilt, threshold=0.0, target_sizes=target_size)
    assert len(results) == 1
    # Every detection slot comes back, but those in the padding right of the 80 px wide image (dropped).
    starts = outputs.pred_boxes[0][outputs.object_mask[0]][:, :2] * 120
    assert len(results[0]["scores"]) == int(((starts[:, 0] < 80) & (starts[:, 1] < 120)).sum())
    boxes = results[0]["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 120).all()


def test_detections_keep_writing_order_stop_at_eos_and_grow_past_max_objects(model):
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    def obj(y0, x0, y1, x1, label):
        return [COORD + y0, COORD + x0, COORD + y1, COORD + x1, CLASS + label]

    rows = [
        obj(0, 0, 99, 99, 1) + obj(10, 20, 30, 40, 2) + [EOS] * 5 + obj(1, 1, 2, 2, 3),  # last object after EOS
        [EOS] * 20,  # nothing
        obj(5, 5, 9, 9, 4) * 4,
    ]
    sequences = torch.tensor([[BOS] + row for row in rows])
    logits = torch.randn(3, 20, VOCAB, generator=torch.Generator().manual_seed(0))
    output = GenerateEncoderDecoderOutput(sequences=sequences, logits=tuple(logits.unbind(1)))
    detections = model.detections_from_generation(output, coordinate_window=0)
    assert detections.object_mask.tolist() == [[True] * 2 + [False] * 8, [False] * 10, [True] * 4 + [False] * 6]
    torch.testing.assert_close(detections.pred_boxes[0, 1], torch.tensor([20, 10, 40, 30]) / 99)
    torch.testing.assert_close(detections.pred_boxes[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    class_probs = logits[0, 4].softmax(-1)[CLASS : CLASS + NUM_CLASSES]
    assert int(detections.labels[0, 0]) == int(class_probs.argmax())
    assert float(detections.scores[0, 0]) == pytest.approx(float(class_probs.max()), rel=1e-5)
    torch.testing.assert_close(detections.logits[0, 0].exp(), class_probs)

    # More objects than `config.max_objects` (generation allowed more tokens): the slots grow.
    many = torch.tensor([[BOS] + obj(1, 2, 3, 4, 0) * 12])
    output = GenerateEncoderDecoderOutput(sequences=many, logits=tuple(torch.zeros(1, 60, VOCAB).unbind(1)))
    detections = model.detections_from_generation(output)
    assert detections.pred_boxes.shape == (1, 12, 4) and detections.object_mask.all()

    with pytest.raises(ValueError, match="output_logits=True"):
        model.detections_from_generation(GenerateEncoderDecoderOutput(sequences=sequences))


def test_object_detection_pipeline():
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor

    torch.manual_seed(0)
    detector = Pix2SeqForObjectDetection(tiny_config(id2label={i: f"class_{i}" for i in range(NUM_CLASSES)})).eval()
    image_processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    object_detector = pipeline("object-detection", model=detector, image_processor=image_processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    torch.manual_seed(1)
    results = object_detector(image, threshold=0.0)
    assert 1 <= len(results) <= 10
    for result in results:
        assert result["label"].startswith("class_") and 0 < result["score"] <= 1
        box = result["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 70 and 0 <= box["ymin"] <= box["ymax"] <= 50


def test_generation_options_are_merged_in_one_place():
    from transformers import GenerationConfig

    from pix2seq_hf.generation_pix2seq import PIX2SEQ_GENERATION_DEFAULTS, pix2seq_generation_options

    call, model_config = GenerationConfig(), GenerationConfig()
    call.min_objects = 2
    model_config.min_objects, model_config.eos_bias = 5, -1.0
    options = pix2seq_generation_options(call, model_config, suppress_eos=True, top_p=0.3)
    assert list(options) == list(PIX2SEQ_GENERATION_DEFAULTS)  # only Pix2Seq options, every one
    assert options["suppress_eos"] is True  # the call's keyword arguments first
    assert options["min_objects"] == 2  # then the generation config
    assert options["eos_bias"] == -1.0  # then the fallback (the model's)
    assert options["early_stop_patience"] == PIX2SEQ_GENERATION_DEFAULTS["early_stop_patience"]  # then the default
    processor = Pix2SeqLogitsProcessor(LAYOUT)
    assert processor.token_grammar is PIX2SEQ_GENERATION_DEFAULTS["token_grammar"] and processor.is_active
    assert not Pix2SeqLogitsProcessor(LAYOUT, token_grammar=False).is_active


def test_generate_output_classes_live_beside_the_model(model):
    import pix2seq_hf.modeling_pix2seq as modeling
    from pix2seq_hf import Pix2SeqGenerateBeamOutput, Pix2SeqGenerateOutput

    assert Pix2SeqGenerateOutput.__module__ == Pix2SeqGenerateBeamOutput.__module__ == modeling.__name__
    torch.manual_seed(0)
    assert type(model.generate(make_pixels(1), max_new_tokens=5)) is Pix2SeqGenerateOutput
    assert type(model.generate(make_pixels(1), max_new_tokens=5, num_beams=2, do_sample=False)) is (
        Pix2SeqGenerateBeamOutput
    )


def test_processor_and_image_processor_post_process_alike(model):
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    from pix2seq_hf.processing_pix2seq import Pix2SeqProcessor

    processor = Pix2SeqProcessor.from_config(model.config)
    torch.manual_seed(3)
    generated = model.generate(make_pixels(2), max_new_tokens=20, min_objects=2)
    plain = GenerateEncoderDecoderOutput(sequences=generated.sequences, logits=generated.logits)
    sizes = [(64, 48), (30, 64)]
    expected = processor.post_process_object_detection(generated, threshold=0.0, target_sizes=sizes)
    assert sum(len(result["scores"]) for result in expected) > 0
    for outputs, post_process in (
        (generated, processor.image_processor.post_process_object_detection),
        (generated.detections, processor.image_processor.post_process_object_detection),
        (plain, processor.post_process_object_detection),  # no `detections`: read from the tokens
    ):
        for result, reference in zip(post_process(outputs, threshold=0.0, target_sizes=sizes), expected):
            for key in ("scores", "labels", "boxes"):
                torch.testing.assert_close(result[key], reference[key])
    with pytest.raises(TypeError, match="needs the token layout"):
        processor.image_processor.post_process_object_detection(plain)
