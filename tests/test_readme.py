"""The README's "Using a model" snippet runs as written, on a tiny saved model and a small image file."""

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from helpers import tiny_config


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(section: str) -> str:
    """The first python block after the heading `## {section}`."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def test_using_a_model_snippet_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(id2label={i: f"shape_{i}" for i in range(5)})
    model = Pix2SeqForObjectDetection(config).eval()
    processor = Pix2SeqProcessor.from_config(config, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}))
    (tmp_path / "outputs").mkdir()
    model.save_pretrained(tmp_path / "outputs" / "pix2seq-synthetic")
    processor.save_pretrained(tmp_path / "outputs" / "pix2seq-synthetic")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "image.png")

    code = readme_snippet("Using a model")
    assert 'from_pretrained("outputs/pix2seq-synthetic")' in code and 'Image.open("image.png")' in code
    # One way of writing the image size throughout.
    assert "image.size[::-1]" not in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)

    detections = namespace["detections"]
    assert set(detections) == {"scores", "labels", "boxes"}
    boxes = detections["boxes"]
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    assert ((boxes[:, 0] >= 0) & (boxes[:, 2] <= 80) & (boxes[:, 3] <= 48)).all()
    assert (detections["scores"] > 0.3).all()
    # The last line's pipeline call, as the snippet's comment describes it.
    results = namespace["detector"](namespace["image"], threshold=0.0)
    assert results and set(results[0]) == {"score", "label", "box"}
    assert set(results[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"} and results[0]["label"].startswith("shape_")
