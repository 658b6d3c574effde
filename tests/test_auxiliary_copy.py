"""Coordinate and class tokens copied from the auxiliary head (`config.auxiliary_copy`): the mixture itself, and the
same logits and tokens on every path that turns decoder outputs into logits."""

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection
from pix2seq_hf.auxiliary_copy import cell_box_bins, gaussian_mixture_over_bins

from helpers import tiny_config


def copy_model(seed=0, **overrides):
    """A tiny model with the copy, its gate and head opened up so that the copy weighs on every coordinate."""
    torch.manual_seed(seed)
    config = tiny_config(
        auxiliary_loss_weight=1.0, auxiliary_copy=True, encoder_stem="patch", patch_size=16, **overrides
    )
    model = Pix2SeqForObjectDetection(config).eval()
    with torch.no_grad():
        model.auxiliary_copy.gate.weight.normal_(0.0, 1.0)
        model.model.encoder.auxiliary_head.box_head.weight.normal_(0.0, 0.3)
        model.model.encoder.auxiliary_head.box_head.bias.fill_(-2.0)
    return model


def test_mixture_over_bins_is_a_distribution_centred_on_each_component():
    weights = torch.tensor([[0.25, 0.75]])
    centres = torch.tensor([[3.0, 10.4]])
    mixture = gaussian_mixture_over_bins(weights, centres, num_bins=16, sigma=1.0)
    assert mixture.shape == (1, 16)
    torch.testing.assert_close(mixture.sum(-1), torch.ones(1))
    assert mixture[0, :7].sum().item() == pytest.approx(0.25, abs=1e-3)
    assert mixture[0, 10] > mixture[0, 11] > mixture[0, 9]  # 10.4 is nearer 11 than 9
    # At the edge the Gaussian keeps its mass on the bins that exist.
    edge = gaussian_mixture_over_bins(torch.ones(1, 1), torch.zeros(1, 1), num_bins=16, sigma=1.0)
    torch.testing.assert_close(edge.sum(-1), torch.ones(1))
    assert edge[0].argmax() == 0


def test_cell_boxes_are_the_head_distances_around_the_cell_centres():
    distances = torch.zeros(1, 4, 4)
    distances[0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.1])  # left, top, right, bottom of cell (0, 0), centre (.25, .25)
    boxes = cell_box_bins(distances, num_bins=101)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([5.0, 15.0, 35.0, 55.0]))  # ymin xmin ymax xmax
    torch.testing.assert_close(boxes[0, 3], torch.tensor([75.0, 75.0, 75.0, 75.0]))


def test_copy_needs_an_auxiliary_head():
    with pytest.raises(ValueError, match=r"auxiliary_copy=True.*auxiliary_loss_weight > 0"):
        tiny_config(auxiliary_copy=True)


def test_copy_starts_even_and_mixes_the_head_into_coordinates_and_classes():
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config(auxiliary_loss_weight=1.0, auxiliary_copy=True)).eval()
    gate = model.auxiliary_copy.gate
    assert gate.weight.abs().sum() == 0 and gate.bias.abs().sum() == 0
    config = model.config
    pixel_values = torch.rand(2, 3, 64, 64)
    decoder_input_ids = torch.full((2, 11), config.coord_token_offset + 3)
    decoder_input_ids[:, 0] = config.bos_token_id
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
        copy, model.auxiliary_copy = model.auxiliary_copy, None
        plain = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits.float()
        model.auxiliary_copy = copy
    # Log-probabilities: half the decoder's distribution, half the copy.
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(2, 11))
    copied = logits.exp() - plain.softmax(-1) / 2
    assert bool((copied > -1e-6).all())
    # Positions 4 and 9 predict class tokens: the copy lies on the classes there, on the bins elsewhere.
    is_class = torch.tensor([t % 5 == 4 for t in range(11)])
    bins = slice(config.coord_token_offset, config.coord_token_offset + config.num_bins)
    classes = slice(config.class_token_offset, config.class_token_offset + config.num_classes)
    torch.testing.assert_close(copied[:, ~is_class][..., bins].sum(-1), torch.full((2, 9), 0.5))
    torch.testing.assert_close(copied[:, is_class][..., classes].sum(-1), torch.full((2, 2), 0.5))


def test_every_decoding_path_gives_the_teacher_forced_logits_and_tokens():
    model = copy_model()
    pixel_values = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    options = dict(do_sample=False, min_objects=3, max_new_tokens=20)
    with torch.no_grad():
        reference = model.generate(pixel_values, output_logits=True, return_dict_in_generate=True, **options)
        forced = model(pixel_values=pixel_values, decoder_input_ids=reference.sequences[:, :-1]).logits
    generated = torch.stack(reference.logits, 1)
    torch.testing.assert_close(generated.log_softmax(-1), forced.log_softmax(-1), atol=1e-4, rtol=1e-4)
    # The copy moves the tokens: without it the model writes others.
    plain = model.generate(pixel_values, **options).sequences
    model.auxiliary_copy.gate.bias.data.fill_(-30.0)
    assert not torch.equal(model.generate(pixel_values, **options).sequences, reference.sequences)
    model.auxiliary_copy.gate.bias.data.fill_(0.0)
    assert torch.equal(plain, reference.sequences)
    for extra in (dict(static_decoding=False), dict(draft="auxiliary"), dict(draft="lookahead")):
        assert torch.equal(model.generate(pixel_values, **options, **extra).sequences, reference.sequences), extra


class EndFirstRowAfterOneObject(LogitsProcessor):
    """Forces EOS in row 0 after its first object, so that the static loop drops that row."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - 1 == 5:
            scores[0] = -float("inf")
            scores[0, 0] = 0.0
        return scores


def test_decoding_reads_the_head_once_per_set_of_running_images_with_the_same_tokens():
    model = copy_model()
    pixel_values = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    end_first_row = LogitsProcessorList([EndFirstRowAfterOneObject()])
    options = dict(do_sample=False, max_new_tokens=20, logits_processor=end_first_row)
    calls = []
    hook = model.model.encoder.auxiliary_head.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with torch.no_grad():
            fast = model.generate(pixel_values, **options)
            head_calls, calls[:] = len(calls), []
            stock = model.generate(pixel_values, static_decoding=False, **options)
    finally:
        hook.remove()
    assert fast.sequences[0, 6] == 0 and (fast.sequences[1:, 6] != 0).all()
    assert torch.equal(fast.sequences, stock.sequences)
    # The encoder's own call, then the three images, then the two still running; transformers' loop keeps every
    # image in its batch to the end: once.
    assert head_calls == 1 + 2
    assert len(calls) == 1 + 1


def test_copy_trains_its_pointer_and_survives_save_and_load(tmp_path):
    model = copy_model().train()
    config = model.config
    labels = torch.tensor([[config.coord_token_offset + b for b in (2, 3, 9, 10)] + [config.class_token_offset + 1]])
    labels = torch.cat([labels, torch.full((1, 2), config.eos_token_id)], dim=1).repeat(2, 1)
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    for parameter in model.auxiliary_copy.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path)
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.auxiliary_copy is True
    assert Pix2SeqConfig.from_pretrained(tmp_path).auxiliary_copy is True
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, labels=labels).logits
        torch.testing.assert_close(loaded(pixel_values=pixel_values, labels=labels).logits, expected)


def test_copy_with_several_sequences_per_image():
    """One encoder pass serves `k` sequences per image: each reads its own image's cells."""
    model = copy_model()
    config = model.config
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    decoder_input_ids = torch.full((4, 6), config.coord_token_offset + 5)
    decoder_input_ids[:, 0] = config.bos_token_id
    with torch.no_grad():
        shared = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
        repeated = model(
            pixel_values=pixel_values.repeat_interleave(2, dim=0), decoder_input_ids=decoder_input_ids
        ).logits
    torch.testing.assert_close(shared, repeated)


def test_the_copy_refuses_images_that_are_not_square():
    model = copy_model()
    # 64 x 48 pixels are 4 x 3 cells, which the copy would read as a 3 x 4 grid.
    with pytest.raises(ValueError, match=r"auxiliary_copy.*\(64, 48\) pixels give 4 x 3 cells.*square canvas"):
        model.generate(torch.randn(1, 3, 64, 48), max_new_tokens=5)
    model.generate(torch.randn(1, 3, 64, 64), max_new_tokens=5)
