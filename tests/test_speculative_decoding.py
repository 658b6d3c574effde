"""Speculative decoding of whole objects (`generate(..., draft=...)`): the same tokens as without a draft for greedy
decoding, the same distribution for sampling, fewer decoder passes when the draft is right."""

import math

import pytest
import torch

from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from pix2seq_hf.modeling_pix2seq import decoding_column_blocks
from pix2seq_hf.speculative_decoding import (
    Pix2SeqAuxiliaryDrafter,
    Pix2SeqObjectCandidateGenerator,
    acceptance_statistics,
)

from helpers import TINY_LAYOUT, load_example, tiny_config, write_coco_set


class GivenDrafter(Pix2SeqAuxiliaryDrafter):
    """Drafts given objects (one `(num_objects, 5)` token tensor per image, in batch order)."""

    def __init__(self, objects, objects_per_pass=4):
        super().__init__(objects_per_pass=objects_per_pass)
        self.objects = list(objects)

    def draft_objects(self, encoder_outputs, config, image_size=None):
        return [self.objects.pop(0) for _ in range(encoder_outputs[0].shape[0])]


def head_model(seed=0, **overrides):
    """A tiny model with an auxiliary dense head that predicts objects: every cell's best class scores above the
    drafter's threshold and its boxes have random sizes."""
    torch.manual_seed(seed)
    config = tiny_config(auxiliary_loss_weight=1.0, encoder_stem="patch", patch_size=16, **overrides)
    model = Pix2SeqForObjectDetection(config).eval()
    with torch.no_grad():
        head = model.model.encoder.auxiliary_head
        head.class_head.weight.normal_(0.0, 1.0)
        head.class_head.bias.fill_(1.0)
        head.box_head.weight.normal_(0.0, 0.3)
        head.box_head.bias.fill_(-2.0)
    return model


def written_objects(sequence, config):
    generated = sequence[1:].tolist()
    if config.eos_token_id in generated:
        generated = generated[: generated.index(config.eos_token_id)]
    return torch.tensor(generated[: len(generated) // 5 * 5], dtype=torch.long).view(-1, 5)


@pytest.mark.parametrize(
    ("static_decoding", "attn_implementation"), [(True, "sdpa"), (True, "eager"), (False, "sdpa")]
)
def test_auxiliary_draft_gives_the_greedy_tokens_and_logits(static_decoding, attn_implementation):
    """Verified over the static cache (the default) with either attention, or by transformers' assisted decoding."""
    model = head_model(attn_implementation=attn_implementation)
    pixel_values = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    options = dict(do_sample=False, min_objects=4, max_new_tokens=40)
    reference = model.generate(pixel_values, **options)
    (draft,) = Pix2SeqAuxiliaryDrafter().draft_objects(model.model.encoder(pixel_values[:1]), model.config)
    assert len(draft) > 0  # the head drafts objects
    assisted = []
    model._assisted_decoding = lambda *args, **kwargs: assisted.append(1) or type(model)._assisted_decoding(
        model, *args, **kwargs
    )
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, draft="auxiliary", static_decoding=static_decoding, **options)
    assert len(assisted) == (0 if static_decoding else 3)
    torch.testing.assert_close(drafted.sequences, reference.sequences, rtol=0, atol=0)
    steps = reference.sequences.shape[1] - 1
    for step in range(steps):
        ended = (reference.sequences[:, 1 : step + 1] == model.config.eos_token_id).any(dim=1)
        torch.testing.assert_close(drafted.logits[step][~ended], reference.logits[step][~ended], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(drafted.detections.pred_boxes, reference.detections.pred_boxes)
    assert statistics.sequences == 3 and statistics.drafted_tokens > 0
    # Each image's tokens up to its EOS (included), in fewer passes than tokens.
    eos_seen = (reference.sequences[:, 1:] == model.config.eos_token_id).cumsum(dim=1)
    assert statistics.generated_tokens == int((eos_seen == 0).sum() + (eos_seen[:, -1] > 0).sum())
    assert statistics.passes < statistics.generated_tokens


def test_auxiliary_draft_gives_the_greedy_tokens_at_r50_decoder_widths():
    """At the ResNet-50 preset's decoder widths (6 layers of 256, FFN 1024) the decoding products are split into
    column blocks, for the passes' few rows too (their output projection included): the same greedy tokens."""
    r50_widths = dict(decoder_layers=6, decoder_hidden_size=256, decoder_attention_heads=8, decoder_ffn_dim=1024)
    model = head_model(**r50_widths)
    assert decoding_column_blocks(model.lm_head.weight, model.config) > 1
    with torch.no_grad():
        for parameter in model.model.decoder.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.1)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    options = dict(do_sample=False, min_objects=4, max_new_tokens=40)
    reference = model.generate(pixel_values, **options)
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, draft="auxiliary", **options)
    torch.testing.assert_close(drafted.sequences, reference.sequences, rtol=0, atol=0)
    assert statistics.passes < statistics.generated_tokens


@pytest.mark.parametrize("shift", [0, 1, 7])
def test_drafted_objects_are_verified(shift):
    """A right draft is accepted (few passes), a shifted one rejected where wrong: the tokens are the greedy ones."""
    model = head_model(seed=2)
    pixel_values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    options = dict(do_sample=False, min_objects=6, max_new_tokens=30)
    reference = model.generate(pixel_values, **options).sequences
    objects = written_objects(reference[0], model.config)
    draft = objects.clone()
    draft[:, :4] = (draft[:, :4] + shift).clamp(max=model.config.coord_token_offset + model.config.num_bins - 1)
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, draft=GivenDrafter([draft]), **options).sequences
    assert torch.equal(drafted, reference)
    assert statistics.generated_tokens == reference.shape[1] - 1
    if shift == 0:
        # The prompt pass verifies the first objects_per_pass objects; every pass accepts all it is given.
        assert statistics.passes <= math.ceil(30 / 20) + 1
        assert statistics.acceptance_rate == 1.0
    else:
        assert statistics.passes > 2


def test_candidates_follow_the_written_objects():
    draft = torch.tensor([[200, 200, 210, 210, 40], [230, 230, 240, 240, 41], [260, 260, 270, 270, 42]])
    generator = Pix2SeqObjectCandidateGenerator(
        draft, prompt_length=1, max_length=41, objects_per_pass=2, num_bins=100
    )
    prompt = torch.tensor([[10]])
    candidates, logits = generator.get_candidates(prompt)
    assert logits is None and candidates[0, 1:].tolist() == draft[:2].flatten().tolist()
    # The model wrote the first object slightly differently and started the second: the draft completes the second
    # object (matched by its first coordinates), goes on with the third and fills up two objects' worth of tokens with
    # a copy of the last.
    written = torch.tensor([[10, 201, 200, 210, 211, 40, 231]])
    candidates, _ = generator.get_candidates(written)
    assert candidates[0, 7:].tolist() == [230, 240, 240, 41, 260, 260, 270, 270, 42, 260]
    # Near the maximum length the draft is cut so that the verification stays within it.
    generator = Pix2SeqObjectCandidateGenerator(draft, prompt_length=1, max_length=5, objects_per_pass=2, num_bins=100)
    candidates, _ = generator.get_candidates(prompt)
    assert candidates[0, 1:].tolist() == [200, 200, 210]


def chi_square_critical(degrees: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with `degrees` degrees of freedom (z=3.29: 0.9995)."""
    return degrees * (1 - 2 / (9 * degrees) + z * math.sqrt(2 / (9 * degrees))) ** 3


@pytest.mark.parametrize("static_decoding", [True, False])
def test_sampling_with_a_draft_keeps_the_distribution(static_decoding):
    """
    The first two tokens of top-p samples drafted with a fixed (deterministic) object, against their exact
    distribution under the model's processed logits: a chi-square goodness-of-fit test over the pairs. Verified over
    the static cache (the default) and by transformers' assisted decoding.
    """
    model = head_model(seed=4)
    with torch.no_grad():
        # A peaked distribution over a few coordinates, so that few pairs hold the mass.
        model.lm_head.bias[200:204] += torch.tensor([6.0, 5.5, 5.0, 4.5])
    pixel_values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    options = dict(do_sample=True, top_p=0.9, min_objects=1, max_new_tokens=3)

    def step_probabilities(prefix):
        out = model.generate(
            pixel_values,
            decoder_input_ids=torch.tensor([prefix]),
            **{**options, "max_new_tokens": 1},
            output_scores=True,
        )
        return out.scores[0][0].softmax(-1)

    first = step_probabilities([10])
    exact = {}
    for t1 in first.nonzero().flatten().tolist():
        second = step_probabilities([10, t1])
        for t2 in second.nonzero().flatten().tolist():
            exact[(t1, t2)] = float(first[t1] * second[t2])
    assert 3 <= len(exact) <= 40

    draft = torch.tensor([[201, 200, 250, 250, 40]])  # a likely first token, a plausible second
    batch_size, num_batches = 200, 3
    num_samples = batch_size * num_batches
    counts = {}
    torch.manual_seed(0)
    with acceptance_statistics() as statistics:
        for _ in range(num_batches):
            # Every image of the batch gets the same draft.
            drafter = GivenDrafter([draft] * batch_size)
            sequences = model.generate(
                pixel_values.expand(batch_size, -1, -1, -1), draft=drafter, static_decoding=static_decoding, **options
            ).sequences
            for pair in map(tuple, sequences[:, 1:3].tolist()):
                counts[pair] = counts.get(pair, 0) + 1
    assert statistics.accepted_tokens > 0  # the draft was accepted at times
    assert set(counts) <= set(exact)
    # Pool the rare pairs (expected count < 5) into one cell.
    rare = [pair for pair, p in exact.items() if p * num_samples < 5]
    cells = [([pair], p) for pair, p in exact.items() if pair not in rare]
    if rare:
        cells.append((rare, sum(exact[pair] for pair in rare)))
    chi_square = sum(
        (sum(counts.get(pair, 0) for pair in pairs) - p * num_samples) ** 2 / (p * num_samples) for pairs, p in cells
    )
    assert chi_square < chi_square_critical(len(cells) - 1), (chi_square, counts, exact)


def test_draft_needs_a_head_and_a_known_name():
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    pixel_values = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="auxiliary dense head"):
        model.generate(pixel_values, draft="auxiliary", max_new_tokens=5)
    with pytest.raises(ValueError, match=r"`draft` must be None, one of \['auxiliary', 'lookahead'\]"):
        head_model().generate(pixel_values, draft="aux", max_new_tokens=5)
    with pytest.raises(ValueError, match="early_stop_patience"):
        head_model().generate(pixel_values, draft="auxiliary", early_stop_patience=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="object_order"):
        Pix2SeqAuxiliaryDrafter(object_order="size")


def test_detect_with_a_draft_gives_the_same_detections():
    model = head_model(seed=6)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    reference = model.detect(pixel_values, do_sample=False, min_objects=3)
    drafted = model.detect(pixel_values, do_sample=False, min_objects=3, draft="auxiliary")
    torch.testing.assert_close(drafted.pred_boxes, reference.pred_boxes)
    torch.testing.assert_close(drafted.scores, reference.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(drafted.labels, reference.labels)


def test_draft_acceptance_script_counts_and_times_a_coco_set(tmp_path):
    head_model(seed=10).save_pretrained(tmp_path / "model")
    Pix2SeqProcessor(Pix2SeqImageProcessor(size=64), **TINY_LAYOUT).save_pretrained(tmp_path / "model")
    annotations, images = write_coco_set(tmp_path / "coco", num_images=3, size=64)
    script = load_example("benchmarks/draft_acceptance")
    argv = ["--model", str(tmp_path / "model"), "--coco_annotations", str(annotations), "--coco_images", str(images)]
    results = script.main([*argv, "--output", str(tmp_path / "results.json")])
    assert results["images"] == 3 and (tmp_path / "results.json").exists()
    assert results["greedy"]["images_with_other_tokens"] == 0  # the draft never changes greedy tokens
    for mode in ("greedy", "sampling"):
        report = results[mode]
        assert report["sequences"] == 3 and report["tokens_per_pass"] >= 1
        assert report["seconds_per_image_with_draft"] > 0 and report["seconds_per_image_without_draft"] > 0
        assert report["speed_up"] > 0


def test_draft_in_the_generation_config_is_saved_and_used(tmp_path):
    model = head_model(seed=8)
    pixel_values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    reference = model.generate(pixel_values, do_sample=False, max_new_tokens=20).sequences
    model.generation_config.draft = "auxiliary"
    model.save_pretrained(tmp_path)
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.draft == "auxiliary"
    with acceptance_statistics() as statistics:
        sequences = loaded.generate(pixel_values, do_sample=False, max_new_tokens=20).sequences
    assert statistics.sequences == 1 and torch.equal(sequences, reference)
    assert loaded.generation_config.draft == "auxiliary"  # the call's resolved drafter stays in the call


def test_lookahead_draft_needs_no_head_and_gives_the_greedy_tokens():
    torch.manual_seed(10)
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    options = dict(do_sample=False, min_objects=5, max_new_tokens=40)
    reference = model.generate(pixel_values, **options).sequences
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, draft="lookahead", **options).sequences
    assert torch.equal(drafted, reference)
    assert statistics.drafted_tokens > 0


def test_filler_repeats_the_last_written_object():
    generator = Pix2SeqObjectCandidateGenerator(
        torch.zeros(0, 5, dtype=torch.long), prompt_length=1, max_length=41, objects_per_pass=2, num_bins=100
    )
    assert generator.get_candidates(torch.tensor([[10, 201]]))[0].shape[1] == 2  # nothing written to repeat yet
    candidates, _ = generator.get_candidates(torch.tensor([[10, 201, 202, 203, 204, 40, 230]]))
    assert candidates[0, 7:].tolist() == [202, 203, 204, 40, 201, 202, 203, 204, 40, 201]  # two objects' worth


def test_processors_are_called_without_signature_checks_only_when_all_take_two_arguments():
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper

    from pix2seq_hf.speculative_decoding import _TwoArgumentProcessors, _without_signature_checks

    plain = LogitsProcessorList([TemperatureLogitsWarper(2.0)])
    fast = _without_signature_checks(plain)
    assert isinstance(fast, _TwoArgumentProcessors)
    scores = torch.tensor([[2.0, 4.0]])
    assert torch.equal(
        fast(torch.zeros(1, 1, dtype=torch.long), scores), plain(torch.zeros(1, 1, dtype=torch.long), scores)
    )

    class NeedsLength:
        def __call__(self, input_ids, scores, length):
            return scores

    with_kwargs = LogitsProcessorList([NeedsLength()])
    assert _without_signature_checks(with_kwargs) is with_kwargs


def test_rows_are_sampled_from_their_distribution():
    """`sample_probabilities` draws each row's token from it, unnormalised rows too (chi-square test), never a token
    of probability zero."""
    from pix2seq_hf.speculative_decoding import sample_probabilities

    probabilities = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.1, 0.0, 0.9]], dtype=torch.float64)
    weights = probabilities * torch.tensor([[2.0], [0.5]], dtype=torch.float64)
    torch.manual_seed(0)
    draws = torch.stack([sample_probabilities(weights) for _ in range(4000)])
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=4).double()
        assert counts[probabilities[row] == 0].sum() == 0
        expected = probabilities[row] * 4000
        kept = expected > 0
        chi_square = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        assert chi_square < chi_square_critical(int(kept.sum()) - 1), (row, counts)


def test_row_wise_warpers_process_all_positions_at_once():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    from pix2seq_hf.generation_pix2seq import Pix2SeqTopPLogitsWarper
    from pix2seq_hf.speculative_decoding import split_row_wise_processors

    grammar, penalty = object(), RepetitionPenaltyLogitsProcessor(1.5)
    warpers = [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.4), Pix2SeqTopPLogitsWarper(0.4)]
    assert split_row_wise_processors(LogitsProcessorList([grammar, *warpers])) == ([grammar], warpers)
    # A processor that reads the tokens after a warper: the warpers before it go per position too.
    processors = [grammar, warpers[0], penalty, warpers[1]]
    assert split_row_wise_processors(LogitsProcessorList(processors)) == (processors[:3], [warpers[1]])


def test_draft_length_defaults_to_the_decoding_mode():
    drafter = Pix2SeqAuxiliaryDrafter()
    assert drafter.objects_per_pass_for(do_sample=False) == 4 and drafter.objects_per_pass_for(do_sample=True) == 2
    assert Pix2SeqAuxiliaryDrafter(objects_per_pass=3).objects_per_pass_for(do_sample=True) == 3
    with pytest.raises(ValueError, match="objects_per_pass"):
        Pix2SeqAuxiliaryDrafter(objects_per_pass=0)


def test_processors_that_read_the_tokens_are_applied_position_by_position():
    """A processor without a batched form (repetition penalty) runs once per drafted position: greedy tokens kept."""
    model = head_model(seed=12)
    pixel_values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    options = {"do_sample": False, "min_objects": 4, "max_new_tokens": 30, "repetition_penalty": 1.3}
    reference = model.generate(pixel_values, **options).sequences
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, draft="auxiliary", **options).sequences
    assert torch.equal(drafted, reference)
    assert statistics.passes < reference.shape[1] - 1


class EndAfterSomeObjects:
    """Ends each sequence (EOS) after 1 to 4 objects, as many as its first coordinate token says (mod 4)."""

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        generated = input_ids.shape[1] - 1
        if generated == 0 or generated % 5:
            return scores
        wanted = 1 + input_ids[:, 1] % 4
        scores = scores.clone()
        scores[generated >= 5 * wanted, self.eos_token_id] = 1e4
        return scores


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_batch_is_verified_together_and_images_that_end_drop_out(attn_implementation):
    """Images ending after different numbers of objects, drafted together: the tokens, logits and detections of
    decoding without a draft, in fewer passes than tokens."""
    model = head_model(seed=6, attn_implementation=attn_implementation)
    with torch.no_grad():  # a decoder that reads the image, so that the images' first objects differ
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(8.0)
    pixel_values = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(15))
    options = {"do_sample": False, "max_new_tokens": 40}
    ending = [EndAfterSomeObjects(model.config.eos_token_id)]
    reference = model.generate(pixel_values, logits_processor=ending, **options)
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, logits_processor=ending, draft="auxiliary", **options)
    ends = (reference.sequences == model.config.eos_token_id).int().argmax(dim=1)
    assert len(set(ends.tolist())) > 1 and (ends > 0).all()  # the images end at different lengths
    assert torch.equal(drafted.sequences, reference.sequences)
    for step, (got, expected) in enumerate(zip(drafted.logits, reference.logits, strict=True)):
        running = step + 1 <= ends  # up to each image's EOS (included)
        torch.testing.assert_close(got[running], expected[running], rtol=1e-4, atol=1e-4)
        assert not got[~running].any()  # zeros after an image's end
    torch.testing.assert_close(drafted.detections.pred_boxes, reference.detections.pred_boxes)
    assert statistics.sequences == 6 and statistics.passes < int(ends.sum())
    # Right drafts that go on past each image's end: rejected at the EOS, nothing of them left in the sequences.
    drafts = [written_objects(row, model.config).repeat(2, 1) for row in reference.sequences]
    with acceptance_statistics() as statistics:
        drafted = model.generate(pixel_values, logits_processor=ending, draft=GivenDrafter(drafts), **options)
    assert torch.equal(drafted.sequences, reference.sequences)
    assert statistics.acceptance_rate < 1.0 and statistics.passes <= 2 * 6


def test_verification_passes_run_the_decoding_step_with_the_layers_results(monkeypatch):
    """With sdpa, a verification pass over the filled cache (each image's tokens at its own positions, padded drafts
    in the spare slot) runs as the decoder's `Pix2SeqDecodingStep`: the tokens and logits of the layers themselves."""
    import pix2seq_hf.modeling_pix2seq as modeling_pix2seq

    model = head_model(seed=6)
    with torch.no_grad():  # a decoder that reads the image, so that the images end after different objects
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.mul_(8.0)
    pixel_values = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(15))
    options = {"do_sample": False, "max_new_tokens": 40, "draft": "auxiliary"}
    ending = [EndAfterSomeObjects(model.config.eos_token_id)]
    shapes = []
    original_call = modeling_pix2seq.Pix2SeqDecodingStep.__call__

    def recording_call(self, input_ids, cache, key_length, positions=None):
        shapes.append(tuple(input_ids.shape))
        return original_call(self, input_ids, cache, key_length, positions)

    monkeypatch.setattr(modeling_pix2seq.Pix2SeqDecodingStep, "__call__", recording_call)
    drafted = model.generate(pixel_values, logits_processor=ending, **options)
    # Every pass after the first (the prompts and first drafts fill the cache through the layers).
    assert shapes and all(length > 1 for _, length in shapes)
    assert len({rows for rows, _ in shapes}) > 1  # images that ended left the batch
    monkeypatch.setattr(modeling_pix2seq.Pix2SeqDecodingStep, "applies_to", staticmethod(lambda decoder: False))
    layers = model.generate(pixel_values, logits_processor=ending, **options)
    assert torch.equal(drafted.sequences, layers.sequences)
    for got, expected in zip(drafted.logits, layers.logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_drafted_image_streams_its_tokens_and_a_batch_is_refused():
    class Collect:
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    model = head_model(seed=16)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(17))
    options = {"do_sample": False, "min_objects": 2, "max_new_tokens": 20, "draft": "auxiliary"}
    streamer = Collect()
    sequences = model.generate(pixel_values[:1], streamer=streamer, **options).sequences
    assert streamer.tokens == [*sequences[0].tolist(), "end"]  # the prompt (put by `generate`), then the tokens
    with pytest.raises(ValueError, match="cannot stream a batch"):
        model.generate(pixel_values, streamer=Collect(), **options)


def test_per_sequence_positions_need_a_static_cache_and_key_length():
    model = head_model(seed=18)
    decoder = model.model.decoder
    tokens, memory = torch.tensor([[10, 200]]), torch.zeros(1, 16, model.config.decoder_hidden_size)
    positions = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="need a static `cache` and `key_length`"):
        decoder.decode(tokens, memory, positions=positions)


def test_a_draft_drawn_from_other_distributions_writes_the_models_tokens():
    """`accept_sampled_draft` with drafted tokens drawn from distributions `q` that differ from the model's `p`: the
    first written token follows `p[0]` and the second `p[1]` (chi-square tests), and tokens are kept where `q` agrees
    with `p`."""
    from pix2seq_hf.speculative_decoding import accept_sampled_draft, sample_probabilities

    p = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.2, 0.3, 0.3], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    torch.manual_seed(0)
    trials = 6000
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(trials):
        draft = sample_probabilities(q)
        accepted, token = accept_sampled_draft(draft, q, p)
        written = draft[:accepted].tolist() + [token]
        first[written[0]] += 1
        if accepted >= 1:
            second[written[1]] += 1
    for counts, expected in ((first, p[0]), (second, p[1])):
        kept = expected > 0
        assert counts[~kept].sum() == 0
        expected = expected * counts.sum()
        chi_square = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        assert chi_square < chi_square_critical(int(kept.sum()) - 1), (counts, expected)
    # A draft drawn from the model's own distributions is always kept.
    assert all(accept_sampled_draft(torch.tensor([0, 3]), p[:2], p)[0] == 2 for _ in range(50))
