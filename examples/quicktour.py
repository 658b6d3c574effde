"""Quick tour: detect the objects of one photo with a saved Pix2Seq model, print them and draw them.

    python examples/quicktour.py --model pix2seq-r50-640          # a converted official checkpoint (docs/pretrained.md)
    python examples/quicktour.py --model outputs/pix2seq-synthetic --image my_photo.jpg --output my_detections.png

Runs the calls of docs/quicktour.md: the processor prepares the image, `model.generate` samples the object sequence
(nucleus sampling with top-p 0.4, as the paper), the processor reads the detections out of the tokens and maps their
boxes back to the photo, and `pix2seq_hf.visualization.draw_detections` draws those above `--threshold` into
`--output`. The photo defaults to docs/images/coffee.jpg (CC0, shipped with the repository).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForObjectDetection, AutoProcessor

import pix2seq_hf  # noqa: F401  (registers the Pix2Seq classes with the Auto factories)
from pix2seq_hf.visualization import draw_detections


DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "coffee.jpg"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="outputs/pix2seq-synthetic",
        help="Folder (or Hub id) of a saved Pix2Seq model and processor (default: %(default)s, the README's run).",
    )
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="The photo (default: docs/images/coffee.jpg).")
    parser.add_argument("--output", default="detections.png", help="Where the picture goes (default: %(default)s).")
    parser.add_argument("--threshold", type=float, default=0.3, help="Lowest score kept (default: %(default)s).")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of the paper's sampling.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling (default: %(default)s).")
    return parser.parse_args(argv)


def detect(model, processor, image: Image.Image, threshold: float, greedy: bool = False) -> dict:
    """
    Detects the objects of one image.

    Returns:
        `dict` with `scores` [n], `labels` [n] and `boxes` [n, 4] (absolute `(x_min, y_min, x_max, y_max)` in the
        pixels of `image`), best score first.
    """
    inputs = processor(images=image, return_tensors="pt")
    generate_kwargs = {"do_sample": False} if greedy else {"top_p": 0.4}
    with torch.no_grad():
        outputs = model.generate(inputs.pixel_values, **generate_kwargs)
    return processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(image.height, image.width)]
    )[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = AutoModelForObjectDetection.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")

    detections = detect(model, processor, image, args.threshold, greedy=args.greedy)
    for score, label, box in zip(detections["scores"], detections["labels"], detections["boxes"]):
        name = model.config.id2label.get(int(label), str(int(label)))
        print(f"{name}: {float(score):.2f} {[round(float(v), 1) for v in box]}")
    print(f"{len(detections['scores'])} objects above {args.threshold}")

    picture = draw_detections(image, detections, id2label=model.config.id2label)
    picture.save(args.output)
    print(f"Wrote {args.output}")
    return detections


if __name__ == "__main__":
    main()
