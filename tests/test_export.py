"""Export (torch.export and ONNX) of the encoder and the cached decoder, run with examples/export.py and
ExportedPix2Seq: the same greedy tokens and detections as PyTorch."""

import json

import pytest
import torch
from helpers import load_example
from PIL import Image


pytest.importorskip("onnxruntime", reason="the export tests need the `export` extra")
pytest.importorskip("onnxscript", reason="the export tests need the `export` extra")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny saved model exported in both formats by examples/export.py (checked on 2 images, one detected)."""
    from helpers import tiny_config

    from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config(layers=1, id2label={i: f"class{i}" for i in range(5)}))
    model.generation_config.max_new_tokens = 20
    processor = Pix2SeqProcessor.from_config(model.config, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    image = root / "image.png"
    Image.new("RGB", (90, 60), (30, 200, 90)).save(image)

    script = load_example("export")
    argv = ["--model", str(root / "model"), "--output_dir", str(root / "out"), "--check", "2", "--no_optimize",
            "--images", str(image), "--threshold", "0"]  # fmt: skip
    assert script.main(argv) == 0
    return root, script, argv


def test_example_exports_both_formats_and_decodes_the_same_tokens(exported):
    root, _, _ = exported
    out = root / "out"
    for name in ("encoder", "decoder", "decoder_with_past"):
        assert (out / f"{name}.onnx").is_file() and (out / f"{name}.pt2").is_file()
    assert (out / "processor_config.json").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["tokens"] == 20
    for backend in ("onnx", "torch"):
        assert report["check"][backend]["same_tokens"] is True
        assert report["check"][backend]["max_logit_difference"] < 1e-4
    (detections,) = report["detections"].values()
    for detection in detections:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= 90 and 0 <= y0 <= y1 <= 60 and detection["label"].startswith("class")


def test_example_refuses_to_overwrite_graphs(exported):
    _, script, argv = exported
    with pytest.raises(FileExistsError, match="--overwrite"):
        script.main(argv)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_exported_graphs_match_pytorch_for_any_batch_size(exported, backend):
    from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqProcessor
    from pix2seq_hf.export import ExportedPix2Seq

    root, _, _ = exported
    model = Pix2SeqForObjectDetection.from_pretrained(root / "model").eval()
    processor = Pix2SeqProcessor.from_pretrained(root / "out")
    if backend == "onnx":
        runner = ExportedPix2Seq.from_onnx(root / "out")
    else:
        runner = ExportedPix2Seq.from_torch_export(root / "out", trusted_source=True)
    for batch_size in (1, 3):
        pixel_values = torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            reference = model.generate(pixel_values, do_sample=False, return_dict_in_generate=True, output_logits=True)
        outputs = runner.generate(pixel_values)
        torch.testing.assert_close(outputs.sequences, reference.sequences, rtol=0, atol=0)
        sizes = [(60, 90)] * batch_size
        expected = processor.post_process_object_detection(reference, threshold=0.0, target_sizes=sizes)
        found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        for mine, theirs in zip(found, expected):
            torch.testing.assert_close(mine["boxes"], theirs["boxes"])
            torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=1e-4, atol=1e-5)
            assert torch.equal(mine["labels"], theirs["labels"])
        # The runner's detections are read as the model reads them (its `coordinate_window`).
        torch.testing.assert_close(outputs.detections.pred_boxes, reference.detections.pred_boxes)
    assert runner.config["coordinate_window"] == model.generation_config.coordinate_window
    runner.config["coordinate_window"] = 0
    with torch.no_grad():
        reference = model.generate(pixel_values, do_sample=False, coordinate_window=0)
    written_bins = runner.generate(pixel_values).detections
    torch.testing.assert_close(written_bins.pred_boxes, reference.detections.pred_boxes)
    torch.testing.assert_close(written_bins.scores, reference.detections.scores, rtol=1e-4, atol=1e-5)
    # The grammar options of the model's generation config can be changed per call, as with `generate`.
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = model.generate(pixel_values, do_sample=False, suppress_eos=True, max_new_tokens=10).sequences
    assert torch.equal(runner.generate(pixel_values, suppress_eos=True, max_new_tokens=10).sequences, reference)
    # Images that end at different steps: the same decoding loop as `generate`, which stops computing the images
    # that ended (their logits are zeros from then on).
    pixel_values = torch.stack([torch.full((3, 64, 64), value) for value in (-2.0, 0.0, 2.0)])
    options = dict(eos_bias=0.16, min_objects=1)
    with torch.no_grad():
        reference = model.generate(pixel_values, do_sample=False, **options)
    outputs = runner.generate(pixel_values, **options)
    ends = [int((row[1:] == 0).nonzero()[0]) for row in reference.sequences]
    assert len(set(ends)) > 1, ends
    assert torch.equal(outputs.sequences, reference.sequences)
    torch.testing.assert_close(
        torch.stack(outputs.logits, dim=1), torch.stack(reference.logits, dim=1), rtol=1e-4, atol=1e-4
    )


def test_too_many_new_tokens_for_the_positions_is_refused(exported):
    from pix2seq_hf.export import ExportedPix2Seq

    root, _, _ = exported
    runner = ExportedPix2Seq.from_onnx(root / "out")
    with pytest.raises(ValueError, match="max_new_tokens=64"):
        runner.generate(torch.rand(1, 3, 64, 64), max_new_tokens=64)


def test_torch_export_graphs_are_loaded_only_from_a_trusted_source(exported):
    from pix2seq_hf.export import ExportedPix2Seq

    root, _, _ = exported
    # torch.export.load unpickles: without the caller's word that the folder is trusted, nothing is read.
    with pytest.raises(ValueError, match="trusted_source=True"):
        ExportedPix2Seq.from_torch_export(root / "out")
    assert ExportedPix2Seq.from_torch_export(root / "out", trusted_source=True).backend == "torch"


def test_a_model_with_the_auxiliary_copy_exports_with_its_head(tmp_path):
    """The decoder graphs of a model with `auxiliary_copy` hold the auxiliary head, whose predictions its logits mix
    in at every step: the same greedy tokens as PyTorch in both formats."""
    from helpers import tiny_config

    from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor

    torch.manual_seed(0)
    labels = {i: f"c{i}" for i in range(5)}
    model = Pix2SeqForObjectDetection(
        tiny_config(layers=1, auxiliary_loss_weight=1.0, auxiliary_copy=True, id2label=labels)
    )
    with torch.no_grad():
        model.auxiliary_copy.gate.weight.normal_(0.0, 1.0)
    model.generation_config.max_new_tokens = 20
    image_processor = Pix2SeqImageProcessor(size={"longest_edge": 64})
    processor = Pix2SeqProcessor.from_config(model.config, image_processor=image_processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), "--check", "2", "--no_optimize"]
    assert load_example("export").main(argv) == 0
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    for backend in ("onnx", "torch"):
        assert report["check"][backend]["same_tokens"] is True
        assert report["check"][backend]["max_logit_difference"] < 1e-3
