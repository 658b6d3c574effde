"""Bad inputs get clear errors naming the argument and the value (or a documented warning), not a crash deep inside."""

import json
import logging

import numpy as np
import pytest
import torch
from helpers import load_example, tiny_config
from PIL import Image
from transformers.utils import logging as hf_logging

from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor




@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Pix2SeqForObjectDetection(tiny_config()).eval()


@pytest.fixture(scope="module")
def processor(model):
    return Pix2SeqProcessor.from_config(model.config, image_processor=Pix2SeqImageProcessor(size=64))


def _pixels(batch_size: int = 1) -> torch.Tensor:
    return torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----- NaN / inf pixels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_image_processor_refuses_non_finite_pixels(processor, value):
    images = [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32)]
    images[1][2, 3, 0] = value
    with pytest.raises(ValueError, match=r"Image 1 of the batch has 1 NaN or infinite"):
        processor.image_processor(images)


@pytest.mark.parametrize("call", ["forward_detect", "forward_loss", "generate_greedy"])
def test_model_refuses_non_finite_pixels(model, call):
    pixels = _pixels(2)
    pixels[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"`pixel_values` contain NaN or infinite values \(images \[1\]"):
        with torch.no_grad():
            if call == "forward_detect":
                model(pixels)
            elif call == "forward_loss":
                model(pixels, labels=torch.zeros(2, 10, dtype=torch.long))
            else:
                model.generate(pixels, do_sample=False, max_new_tokens=5)


# ----- empty batches, mismatched batches, dtypes ----------------------------------------------------------------------


def test_model_refuses_a_batch_of_no_images(model):
    with pytest.raises(ValueError, match="holds no images"):
        with torch.no_grad():
            model(torch.zeros(0, 3, 64, 64))


@pytest.mark.parametrize("images", [[], [[]]])
def test_processors_refuse_an_empty_image_list(processor, images):
    with pytest.raises(ValueError, match="`images` is empty"):
        processor(images=images)
    with pytest.raises(ValueError, match="`images` is empty"):
        processor.image_processor(images)


def test_model_refuses_labels_for_another_number_of_images(model):
    labels = torch.zeros(3, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="`labels` has 3 rows but `pixel_values` holds 2 images"):
        model(_pixels(2), labels=labels)
    with pytest.raises(ValueError, match="`decoder_input_ids` has 3 rows but `pixel_values` holds 2 images"):
        model(_pixels(2), decoder_input_ids=torch.full((3, 3), 10))
    with pytest.raises(ValueError, match=r"`labels` \(1, 10\) and `decoder_input_ids` \(1, 4\)"):
        model(_pixels(1), labels=labels[:1], decoder_input_ids=torch.full((1, 4), 10))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_model_refuses_integer_pixels(model, dtype):
    with pytest.raises(TypeError, match=f"must be floating point, got {dtype}.*Pix2SeqImageProcessor"):
        with torch.no_grad():
            model((_pixels() * 255).to(dtype))


def test_model_casts_float64_pixels_to_its_dtype(model):
    pixels = _pixels()
    decoder_input_ids = torch.full((1, 3), model.config.bos_token_id)
    with torch.no_grad():
        expected = model(pixels, decoder_input_ids=decoder_input_ids).logits
        got = model(pixels.double(), decoder_input_ids=decoder_input_ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# ----- generation options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_top_p_outside_zero_one_is_refused(model, top_p):
    with pytest.raises(ValueError, match=rf"`top_p` is the probability mass .* in \(0, 1\]; got {top_p}"):
        model.generate(_pixels(), top_p=top_p, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"`top_p` .* in \(0, 1\]"):
        model.detect(_pixels(), top_p=top_p, max_new_tokens=5)


def test_top_p_of_one_is_accepted(model):
    output = model.generate(_pixels(), top_p=1.0, max_new_tokens=5)
    assert output.sequences.shape == (1, 6)


# ----- beam search ----------------------------------------------------------------------------------------------------


def test_beam_search_output_is_post_processed_with_the_logits_of_each_returned_beam(model, processor):
    """
    Each returned sequence is scored with the raw logits of the beam that wrote each token: the same logits as the
    model gives the sequence teacher-forced.
    """
    pixels = _pixels(2)
    output = model.generate(
        pixels, num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=10, suppress_eos=True
    )
    assert output.sequences.shape == (4, 11)
    results = processor.post_process_object_detection(output, threshold=0.0)
    assert len(results) == 4

    with torch.no_grad():
        forced = model(pixels.repeat_interleave(2, dim=0), decoder_input_ids=output.sequences[:, :-1]).logits
    expected = processor.batch_decode(output.sequences, forced)
    for got, want in zip(results, expected):
        assert len(got["scores"]) == len(want["scores"]) == 2
        order = torch.sort(want["scores"], descending=True, stable=True).indices
        torch.testing.assert_close(got["scores"], want["scores"][order], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["labels"], want["labels"][order])


# ----- float images already in [0, 1] ---------------------------------------------------------------------------------


def test_float_images_in_unit_range_warn_that_they_are_rescaled(processor, caplog):
    image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    hf_logging.warning_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pix2seq_hf.image_processing_pix2seq"):
            rescaled = processor.image_processor(image, size=8)["pixel_values"]
        assert "pass `do_rescale=False`" in caplog.text
        caplog.clear()
        hf_logging.warning_once.cache_clear()
        with caplog.at_level(logging.WARNING, logger="pix2seq_hf.image_processing_pix2seq"):
            kept = processor.image_processor(image, size=8, do_rescale=False)["pixel_values"]
            processor.image_processor((image * 255).astype(np.uint8), size=8)
        assert "do_rescale" not in caplog.text
    finally:
        hf_logging.warning_once.cache_clear()
    torch.testing.assert_close(rescaled * 255, kept)


# ----- config fields --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value", [("num_bins", "128"), ("num_bins", 128.0), ("max_objects", True), ("dropout", "0.1")]
)
def test_config_refuses_a_value_of_the_wrong_type_naming_the_field(field, value):
    with pytest.raises(Exception, match=rf"field '{field}'") as error:
        Pix2SeqConfig(**{field: value})
    assert repr(value) in str(error.value)


def test_config_accepts_ints_for_float_fields():
    config = Pix2SeqConfig(layer_norm_eps=1, init_std=1, dropout=0, eos_token_weight=1)
    assert config.layer_norm_eps == 1


# ----- examples/detect.py picture names -------------------------------------------------------------------------------


def _load_detect():
    return load_example("detect")


def test_detect_picture_names_are_distinct_and_never_an_input(tmp_path):
    detect = _load_detect()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    files = [a / "cat.jpg", b / "cat.jpg", a / "cat.png", a / "dog.jpg"]
    names = detect.picture_names(files, tmp_path / "out")
    assert names == ["a__cat.jpg.png", "b__cat.jpg.png", "a__cat.png.png", "dog.png"]
    # The same file twice, and an output folder that holds an input of the same name.
    assert detect.picture_names([files[3], files[3]], tmp_path / "out") == ["dog.jpg.png", "dog.jpg-2.png"]
    assert detect.picture_names([tmp_path / "a" / "dog.png"], tmp_path / "a") == ["dog-2.png"]


def test_detect_script_keeps_pictures_of_same_named_images_apart(tmp_path, model, processor):
    detect = _load_detect()
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    colours = {"a": (200, 10, 10), "b": (10, 10, 200)}
    for folder, colour in colours.items():
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / folder / "img.png")
    out = tmp_path / "out"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(saved), "--output_dir", str(out), "--greedy"]
    assert detect.main(argv) == 0
    report = json.loads((out / "detections.json").read_text())
    assert [entry["picture"] for entry in report["images"]] == ["a__img.png.png", "b__img.png.png"]
    for entry, colour in zip(report["images"], colours.values()):
        picture = np.asarray(Image.open(out / entry["picture"]).convert("RGB"))
        assert np.mean(np.all(picture == colour, axis=-1)) > 0.5
    # A second run into the same folder is refused unless asked.
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        detect.main(argv)
    assert detect.main(argv + ["--overwrite_output_dir"]) == 0
