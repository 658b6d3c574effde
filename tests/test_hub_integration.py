"""The Hugging Face entry points users call: Auto classes, the pipeline and push_to_hub (remote code: test_hub_publishing.py)."""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Pix2Seq model and processor saved with save_pretrained."""
    from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor

    torch.manual_seed(0)
    config = Pix2SeqConfig(
        backbone="test_resnet",
        use_pretrained_backbone=False,
        encoder_layers=1,
        decoder_layers=1,
        encoder_hidden_size=32,
        decoder_hidden_size=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_bins=100,
        vocab_size=300,
        coord_token_offset=200,
        class_token_offset=40,
        max_objects=10,
        max_position_embeddings=64,
        id2label={0: "cat", 1: "dog", 2: "bird"},
    )
    model = Pix2SeqForObjectDetection(config).eval()
    processor = Pix2SeqProcessor.from_config(config, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}))
    path = tmp_path_factory.mktemp("hub") / "tiny-pix2seq"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def image():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 80, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_save_pretrained_writes_safetensors(saved_model):
    files = set(os.listdir(saved_model))
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_auto_classes_load_the_pix2seq_classes(saved_model, image):
    import pix2seq_hf
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection, AutoProcessor

    assert isinstance(AutoConfig.from_pretrained(saved_model), pix2seq_hf.Pix2SeqConfig)
    assert isinstance(AutoModel.from_pretrained(saved_model), pix2seq_hf.Pix2SeqModel)
    model = AutoModelForObjectDetection.from_pretrained(saved_model)
    assert isinstance(model, pix2seq_hf.Pix2SeqForObjectDetection)
    assert isinstance(AutoImageProcessor.from_pretrained(saved_model), pix2seq_hf.Pix2SeqImageProcessor)
    processor = AutoProcessor.from_pretrained(saved_model)
    assert isinstance(processor, pix2seq_hf.Pix2SeqProcessor)

    # The user calls exactly as the README writes them.
    inputs = processor(images=image, return_tensors="pt")
    torch.manual_seed(0)
    outputs = model.generate(inputs.pixel_values, top_p=0.4)
    (detections,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(48, 80)])
    assert set(detections) == {"scores", "labels", "boxes"}
    assert detections["boxes"].shape[1] == 4 and len(detections["scores"]) == len(detections["labels"])
    boxes = detections["boxes"]
    assert ((boxes[:, 0] >= 0) & (boxes[:, 2] <= 80) & (boxes[:, 1] >= 0) & (boxes[:, 3] <= 48)).all()

    with torch.no_grad():
        forward_outputs = model(inputs.pixel_values)
    (from_forward,) = processor.post_process_object_detection(forward_outputs, threshold=0.0, target_sizes=[(48, 80)])
    assert set(from_forward) == {"scores", "labels", "boxes"}


def test_pipeline_object_detection(saved_model, image, caplog):
    import pix2seq_hf  # noqa: F401
    from transformers import pipeline

    detector = pipeline("object-detection", model=str(saved_model))
    assert "is not supported for object-detection" not in caplog.text
    torch.manual_seed(0)
    found = detector(image, threshold=0.0)
    assert isinstance(found, list) and found
    for detection in found:
        assert set(detection) == {"score", "label", "box"}
        assert detection["label"] in {"cat", "dog", "bird"}
        assert set(detection["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        assert 0 <= detection["box"]["xmin"] <= detection["box"]["xmax"] <= 80
    batch = detector([image, image.rotate(90, expand=True)], threshold=0.0)
    assert len(batch) == 2
    assert detector(image, threshold=1.01) == []


class _LocalHub:
    """Stands in for the Hub API: repositories are folders under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"local://{repo_id}")


def test_push_to_hub_uploads_a_loadable_model(saved_model, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, ModelCardData
    from transformers.utils import hub

    import pix2seq_hf
    from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqProcessor

    local_hub = _LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", local_hub)
    monkeypatch.setattr(
        hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData(tags=tags or [])),
    )
    model = Pix2SeqForObjectDetection.from_pretrained(saved_model)
    processor = Pix2SeqProcessor.from_pretrained(saved_model)
    model.push_to_hub("me/tiny-pix2seq")
    processor.push_to_hub("me/tiny-pix2seq")

    pushed = tmp_path / "hub" / "me" / "tiny-pix2seq"
    assert (pushed / "model.safetensors").is_file() and (pushed / "processor_config.json").is_file()
    reloaded = Pix2SeqForObjectDetection.from_pretrained(pushed)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, msg=name)
    assert isinstance(Pix2SeqProcessor.from_pretrained(pushed), pix2seq_hf.Pix2SeqProcessor)
