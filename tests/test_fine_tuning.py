"""Fine-tuning from pretrained weights with examples/train.py onto a COCO json of one's own: from a converted official
checkpoint (the tiny official fixtures stand in for the released ones) and from a local file of timm backbone weights."""

import json
import os

import pytest
import torch
from helpers import load_example, write_coco_set

from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqProcessor
from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import convert_pix2seq_checkpoint
from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits, undecoded_images
from pix2seq_hf.training_setup import build_model_and_processor


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NEW_LABELS = {0: "square", 1: "bar"}  # the json's category ids 3 and 7, in id order


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    return write_coco_set(tmp_path_factory.mktemp("coco"), 30, size=48, seed=1)


def _training_images(coco_set):
    annotations, images = coco_set
    return load_detection_splits(coco_annotations=str(annotations), coco_images=str(images)).train


def _mean_loss(model, processor, dataset) -> float:
    """The training loss over all of `dataset`, with the same sequences (seeded noise, no image augmentation) each time."""
    collator = Pix2SeqCollator(processor, training=True, seed=0)
    examples = undecoded_images(dataset)
    model.eval()  # no dropout: the same model gives the same number
    losses = []
    with torch.no_grad():
        for start in range(0, len(examples), 10):
            batch = collator([examples[i] for i in range(start, min(start + 10, len(examples)))])
            loss = model(
                pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]
            ).loss
            losses.append(float(loss))
    return sum(losses) / len(losses)


def _train(coco_set, output_dir, *extra) -> dict:
    annotations, images = coco_set
    argv = [
        "--coco_annotations", str(annotations), "--coco_images", str(images), "--max_train_steps", "12",
        "--num_threads", "1", "--seed", "0", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    assert load_example("train").main(argv) == 0
    return json.loads((output_dir / "all_results.json").read_text())


def test_a_converted_official_checkpoint_fine_tunes_onto_a_coco_json(coco_set, tmp_path, caplog):
    converted = tmp_path / "converted"
    convert_pix2seq_checkpoint(os.path.join(FIXTURES, "official_tiny_r50"), str(converted), image_size=64)
    assert len(Pix2SeqForObjectDetection.from_pretrained(converted).config.id2label) == 91  # COCO's ids

    finetuned = tmp_path / "finetuned"
    # A higher rate than the default 3e-5, so that a dozen steps move the loss clearly.
    with caplog.at_level("INFO"):
        results = _train(coco_set, finetuned, "--model_name_or_path", str(converted), "--learning_rate", "1e-3")
    assert "Fine-tuning onto a new label set" in caplog.text and "square -> 100, bar -> 101" in caplog.text
    assert results["train_steps"] == 12

    model = Pix2SeqForObjectDetection.from_pretrained(finetuned)
    processor = Pix2SeqProcessor.from_pretrained(finetuned)
    processor.check_model_compatible(model)
    assert model.config.id2label == NEW_LABELS and model.config.num_classes == 2
    assert model.config.stem_pool_padding == "same"  # still the official architecture

    # The loss on the training images fell from the converted weights (moved onto the new labels) to the fine-tuned.
    dataset = _training_images(coco_set)
    start, start_processor = build_model_and_processor(NEW_LABELS, model_name_or_path=str(converted))
    before, after = _mean_loss(start, start_processor, dataset), _mean_loss(model, processor, dataset)
    assert after < 0.9 * before, (before, after)

    # It detects with the new names.
    inputs = processor(images=[dataset[0]["image"].convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        outputs = model.generate(inputs["pixel_values"], do_sample=False)
    found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(48, 48)])[0]
    assert all(int(label) in NEW_LABELS for label in found["labels"])


# The tiny preset with timm's test ResNet as the backbone, so that its weights file is small.
SMALL_MODEL = {
    "backbone": "test_resnet", "encoder_hidden_size": 32, "decoder_hidden_size": 32, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}  # fmt: skip


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_new_model_starts_from_a_local_timm_backbone_file(coco_set, tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    reference = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("running_var"):
                buffer.fill_(1.5)  # not the initial 1: the statistics must come from the file too
    weights = tmp_path / f"test_resnet{suffix}"
    state = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    save_file(state, weights) if suffix == ".safetensors" else torch.save(state, weights)

    # The model the run starts from: the file's backbone weights, and a config that does not name the file.
    train = load_example("train")
    argv = ["--config_overrides", json.dumps(SMALL_MODEL), "--backbone_checkpoint", str(weights), "--image_size", "48"]
    start, start_processor = train.build_model_and_processor(train.parse_args(argv), NEW_LABELS)
    backbone = start.model.encoder.backbone._backbone.state_dict()
    assert backbone and all(torch.equal(value, state[name]) for name, value in backbone.items())
    assert start.config.backbone_model_kwargs is None and not start.config.use_pretrained_backbone

    output_dir = tmp_path / "trained"
    results = _train(coco_set, output_dir, *argv)
    assert results["train_steps"] == 12

    weights.unlink()  # the saved model has the weights: loading it never needs the file
    model = Pix2SeqForObjectDetection.from_pretrained(output_dir)
    processor = Pix2SeqProcessor.from_pretrained(output_dir)
    assert model.config.id2label == NEW_LABELS
    dataset = _training_images(coco_set)
    before, after = _mean_loss(start, start_processor, dataset), _mean_loss(model, processor, dataset)
    assert after < 0.9 * before, (before, after)


def test_a_backbone_checkpoint_is_refused_where_it_cannot_apply(tmp_path):
    train = load_example("train")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        train.build_model_and_processor(train.parse_args(["--backbone_checkpoint", str(missing)]), NEW_LABELS)
    args = train.parse_args(["--backbone_checkpoint", str(missing), "--model_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match="has its own weights"):
        train.build_model_and_processor(args, NEW_LABELS)


def test_full_width_resnet18_weights_are_refused_by_the_half_width_tiny_preset(tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, weights)
    train = load_example("train")
    with pytest.raises(ValueError, match=r"resnet18.safetensors' does not fit the backbone of preset 'tiny'.*null"):
        train.build_model_and_processor(train.parse_args(["--backbone_checkpoint", str(weights)]), NEW_LABELS)
