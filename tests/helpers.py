"""Shared test fixtures-as-functions: the tiny token layout and model config every test file builds on, the
example scripts as modules, a free port for multi-process tests."""

import importlib.util
import socket
from pathlib import Path

from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Imports `examples/<name>.py` (a script, not a package module) as a fresh module and returns it."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A small vocabulary: pad/EOS 0, prompt 10, noise 30, classes 40..44, coordinate bins 200..299.
TINY_LAYOUT = dict(
    num_bins=100,
    num_classes=5,
    vocab_size=300,
    pad_token_id=0,
    eos_token_id=0,
    bos_token_id=10,
    noise_token_id=30,
    class_token_offset=40,
    coord_token_offset=200,
    max_objects=10,
)


def tiny_config(layers: int = 2, **overrides) -> Pix2SeqConfig:
    """
    A model well under 1M parameters: timm `test_resnet` (96 channels at stride 32, so 2x2 features at 64x64),
    `layers` encoder and decoder layers of width 32, and the `TINY_LAYOUT` vocabulary. `overrides` replace any field.
    """
    kwargs = dict(
        backbone="test_resnet",
        use_pretrained_backbone=False,
        encoder_hidden_size=32,
        decoder_hidden_size=32,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        max_position_embeddings=64,
        **TINY_LAYOUT,
    )
    kwargs.update(overrides)
    return Pix2SeqConfig(**kwargs)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now, for the rendezvous of a multi-process test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_coco_set(folder: Path, num_images: int, size: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """
    A small COCO-style set in `folder`: `num_images` PNG images of `size` px, each with 1 to 3 filled rectangles on a
    grey background, a red "square" (category id 3) or a blue "bar" (category id 7), and their json.

    Returns:
        `(annotation_file, image_folder)`.
    """
    import json
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            category = rng.choice((3, 7))
            width = rng.randint(size // 6, size // 3)
            height = width if category == 3 else max(2, width // 3)
            x, y = rng.randint(0, size - width - 1), rng.randint(0, size - height - 1)
            draw.rectangle((x, y, x + width - 1, y + height - 1), fill=(220, 30, 30) if category == 3 else (30, 30, 220))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [x, y, width, height], "area": width * height, "iscrowd": 0}
            )  # fmt: skip
        name = f"{image_id:03d}.png"
        image.save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    categories = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]
    annotation_file = folder / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file, images_dir
