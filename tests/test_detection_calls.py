"""Tests of what `model(pixel_values)`, `detect` and the pipeline promise a transformers user: `generate`'s options
are honoured or refused by name, detection is deterministic by default while `generate` samples as the paper, and a
model saves with any valid choice of generation options."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, pipeline

from pix2seq_hf.generation_pix2seq import PIX2SEQ_SAMPLING_DEFAULTS
from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor
from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection
from helpers import tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Pix2SeqForObjectDetection(tiny_config(id2label={i: f"class_{i}" for i in range(5)})).eval()


def pixels(batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def assert_same_detections(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(a.scores, b.scores)


# ----- forward passes `generate`'s options on, or refuses them by name ----------------------------------------------


def test_forward_passes_generate_options_on(model):
    greedy = model.generate(pixels(), do_sample=False, max_new_tokens=15)
    first = model(pixels(), do_sample=False, max_new_tokens=15)
    second = model(pixels(), do_sample=False, max_new_tokens=15)
    assert_same_detections(first, second)
    assert torch.equal(first.sequences, greedy.sequences)
    assert first.sequences.shape[1] <= 16
    # A Pix2Seq decoding option reaches the logits processor: EOS masked, every image writes 3 objects.
    forced = model(pixels(), do_sample=False, max_new_tokens=15, suppress_eos=True)
    assert forced.object_mask.sum(dim=1).tolist() == [3, 3]


@pytest.mark.parametrize(
    "option",
    [
        {"num_beams": 2},
        {"num_return_sequences": 2, "do_sample": True},
        {"output_attentions": True},
        {"output_hidden_states": True},
        {"output_scores": True},
        {"output_logits": False},
        {"return_dict_in_generate": False},
    ],
)
def test_forward_refuses_options_the_detection_output_cannot_hold(model, option):
    (name, value), *_ = option.items()
    with pytest.raises(ValueError, match=f"cannot honour `{name}={value!r}`"):
        model(pixels(), **option)
    with pytest.raises(ValueError, match=f"cannot honour `{name}={value!r}`"):
        model.detect(pixels(), **option)


def test_forward_refuses_decoder_arguments_without_decoder_inputs(model):
    with pytest.raises(ValueError, match="decoder_attention_mask only apply with `decoder_input_ids`"):
        model(pixels(), decoder_attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_forward_refuses_an_unknown_option_by_name(model):
    with pytest.raises(ValueError, match="not_an_option"):
        model(pixels(), not_an_option=3)


# ----- deterministic detection, paper sampling in generate -----------------------------------------------------------


def test_detect_is_deterministic_and_leaves_the_global_random_state_alone(model):
    assert model.generation_config.do_sample  # the default samples
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = model(pixels())
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: same detections
    second = model.detect(pixels())
    assert_same_detections(first, second)
    # Another seed samples other tokens.
    other = model.detect(pixels(), detect_seed=1, top_p=1.0, temperature=3.0)
    again = model.detect(pixels(), detect_seed=1, top_p=1.0, temperature=3.0)
    assert_same_detections(other, again)
    assert not torch.equal(other.sequences, model.detect(pixels(), top_p=1.0, temperature=3.0).sequences)


def test_detect_seed_none_and_generate_draw_from_the_global_random_state(model):
    options = dict(top_p=1.0, temperature=3.0)
    sampled = [model.detect(pixels(), detect_seed=None, **options).sequences for _ in range(2)]
    assert not torch.equal(*sampled)
    generated = [model.generate(pixels(), **options).sequences for _ in range(2)]
    assert not torch.equal(*generated)
    # `generate` consumes the global random state like any sampling in transformers.
    torch.manual_seed(5)
    a = model.generate(pixels(), **options).sequences
    torch.manual_seed(5)
    assert torch.equal(a, model.generate(pixels(), **options).sequences)
    with pytest.raises(ValueError, match="detect_seed"):
        model.detect(pixels(), detect_seed=-1)


def test_pipeline_gives_the_same_detections_on_every_call(model):
    detector = pipeline(
        "object-detection", model=model, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64})
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    first = detector(image, threshold=0.0)
    assert first
    for _ in range(2):
        assert detector(image, threshold=0.0) == first


# ----- saving with any valid choice of generation options ------------------------------------------------------------


def test_greedy_model_saves_and_loads(model, tmp_path):
    model.generation_config.do_sample = False
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.do_sample is False and saved.top_p is None and saved.top_k is None
    # The live model keeps its config.
    assert model.generation_config.top_p == PIX2SEQ_SAMPLING_DEFAULTS["top_p"]

    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.do_sample is False
    assert_same_detections(model(pixels()), loaded(pixels()))
    loaded.save_pretrained(tmp_path / "again")  # and saves again

    # Sampling turned back on: the paper's top-p 0.4 and no top-k, not transformers' top-k 50.
    loaded.generation_config.do_sample = True
    prepared, _ = loaded._prepare_generation_config(None)
    assert (prepared.top_p, prepared.top_k) == (0.4, 0)
    prepared, _ = loaded._prepare_generation_config(None, top_k=5)
    assert (prepared.top_p, prepared.top_k) == (0.4, 5)


def test_greedy_model_generates_without_warnings_about_sampling_flags(model, caplog, monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(transformers_logging._get_library_root_logger(), "propagate", True)
    transformers_logging.warning_once.cache_clear()
    model.generation_config.do_sample = False
    with caplog.at_level(logging.WARNING):
        greedy = model.generate(pixels(), max_new_tokens=10)
        # Sampling asked for in the call: the paper's settings, read from the logits processors built for it.
        prepared, _ = model._prepare_generation_config(None, do_sample=True)
    assert "top_p" not in caplog.text and "top_k" not in caplog.text
    assert torch.equal(greedy.sequences, model.generate(pixels(), max_new_tokens=10, do_sample=False).sequences)
    assert (prepared.top_p, prepared.top_k) == (0.4, 0)
    assert model.generation_config.top_p == 0.4  # the model's config is left as the user set it


def test_sampling_model_saves_its_settings(model, tmp_path):
    model.generation_config.top_p = 0.7
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert (saved.do_sample, saved.top_p, saved.top_k) == (True, 0.7, 0)


def test_plain_tensor_output_does_not_warn_about_output_logits(model, caplog, monkeypatch):
    from transformers.utils import logging as transformers_logging

    # transformers' logs reach caplog through propagation; `warning_once` must not remember an earlier test's warning.
    monkeypatch.setattr(transformers_logging._get_library_root_logger(), "propagate", True)
    transformers_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        tokens = model.generate(pixels(), return_dict_in_generate=False, max_new_tokens=5)
        model.generate(pixels(), max_new_tokens=5, output_attentions=True, return_dict_in_generate=False)
    assert isinstance(tokens, torch.Tensor)
    assert "output_logits" not in caplog.text
    # The capture works: an option that is ignored still gets transformers' warning.
    assert "output_attentions" in caplog.text


# ----- post-processing: the image processor and the processor read the same outputs ----------------------------------


def test_image_processor_post_processes_generate_outputs_as_the_processor(model):
    from pix2seq_hf import Pix2SeqProcessor

    image_processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    processor = Pix2SeqProcessor.from_config(model, image_processor=image_processor)
    sizes = [(48, 64), (64, 40)]
    torch.manual_seed(0)
    generated = model.generate(pixels())
    assert generated.detections.pred_boxes.shape[0] == 2
    from_image_processor = image_processor.post_process_object_detection(generated, threshold=0.0, target_sizes=sizes)
    from_processor = processor.post_process_object_detection(generated, threshold=0.0, target_sizes=sizes)
    # The processor's own reading of the tokens (its box codec), from the sequences and logits alone:
    from_tokens = processor.post_process_object_detection(
        {"sequences": generated.sequences, "logits": generated.logits}, threshold=0.0, target_sizes=sizes
    )
    for a, b, c in zip(from_image_processor, from_processor, from_tokens, strict=True):
        assert len(a["scores"]) > 0
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(a[key], b[key])
            torch.testing.assert_close(a[key], c[key].to(a[key].dtype))


def test_beam_search_output_carries_the_detections_of_each_returned_sequence(model):
    from pix2seq_hf import Pix2SeqProcessor

    processor = Pix2SeqProcessor.from_config(model, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}))
    generated = model.generate(pixels(), num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=15)
    assert generated.detections.scores.shape[0] == 4
    from_image_processor = processor.image_processor.post_process_object_detection(generated, threshold=0.0)
    from_tokens = processor.post_process_object_detection(
        {"sequences": generated.sequences, "logits": generated.logits, "beam_indices": generated.beam_indices},
        threshold=0.0,
    )
    for a, b in zip(from_image_processor, from_tokens, strict=True):
        torch.testing.assert_close(a["scores"], b["scores"].to(a["scores"].dtype))
        assert a["labels"].tolist() == b["labels"].tolist()
