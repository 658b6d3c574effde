"""examples/quicktour.py: the quick tour's calls on the photo the repository ships, with a tiny saved model."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import load_example, tiny_config


PHOTO = Path(__file__).resolve().parents[1] / "docs" / "images" / "coffee.jpg"


def test_shipped_photo_is_small_and_readable():
    assert PHOTO.stat().st_size < 300_000
    with Image.open(PHOTO) as photo:
        assert photo.format == "JPEG" and photo.size == (600, 400)


def test_quicktour_detects_and_draws(tmp_path, capsys):
    from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor

    torch.manual_seed(0)
    config = tiny_config(id2label={0: "cup", 1: "spoon", 2: "saucer", 3: "table", 4: "bean"})
    model = Pix2SeqForObjectDetection(config).eval()
    model.generation_config.min_objects = 3  # a random model may end at once; the picture needs boxes to draw
    processor = Pix2SeqProcessor.from_config(config, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    quicktour = load_example("quicktour")
    output = tmp_path / "detections.png"
    detections = quicktour.main(["--model", str(tmp_path / "model"), "--threshold", "0", "--output", str(output)])

    assert len(detections["scores"]) >= 3
    boxes = detections["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 600).all() and (boxes[:, 3] <= 400).all()
    assert (boxes[:, :2] <= boxes[:, 2:]).all()
    printed = capsys.readouterr().out
    assert f"{len(detections['scores'])} objects above 0.0" in printed
    assert any(name in printed for name in ("cup:", "spoon:", "saucer:", "table:", "bean:"))
    with Image.open(output) as picture, Image.open(PHOTO) as photo:
        # draw_detections enlarges the 600 x 400 photo until its shorter side is 512 pixels, then draws the boxes.
        assert picture.size == (768, 512)
        plain = photo.convert("RGB").resize((768, 512), Image.Resampling.BILINEAR)
        changed = (np.asarray(picture.convert("RGB")) != np.asarray(plain)).any(-1)
        assert 0 < changed.mean() < 0.5
