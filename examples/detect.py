"""Detect objects with a saved Pix2Seq model: images in, detections out as JSON and as pictures.

    python examples/detect.py --model outputs/pix2seq-synthetic --output_dir detections image1.jpg images_folder/

Writes `<output_dir>/detections.json` (one entry per image: file, size, picture, and each detection's label, score and
absolute xyxy box) and one picture per image with the boxes, labels and scores drawn: `<output_dir>/<image name>.png`,
or, when images share a name (`a/cat.jpg` and `b/cat.jpg`, `cat.jpg` and `cat.png`), their path from the folder they
have in common with `__` between the parts (`a__cat.jpg.png`). No picture is written over an input image, and an
output folder that already holds a `detections.json` is refused unless `--overwrite_output_dir` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForObjectDetection, AutoProcessor

import pix2seq_hf  # noqa: F401  (registers the Pix2Seq classes with the Auto factories)
from pix2seq_hf.data.images import MAX_IMAGE_PIXELS_HELP, ImageReadError, decode_image, set_max_image_pixels, to_rgb
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.visualization import draw_detections


logger = logging.getLogger("detect")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+", help="Image files and/or folders of images.")
    parser.add_argument("--model", required=True, help="Folder (or Hub id) of a saved Pix2Seq model and processor.")
    parser.add_argument("--output_dir", default="detections", help="Where the JSON and the pictures go.")
    parser.add_argument("--threshold", type=float, default=0.3, help="Lowest score kept.")
    parser.add_argument("--top_p", type=float, default=None, help="Nucleus sampling mass (the model's default: 0.4).")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling, for repeatable detections.")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where the model runs ('cuda', 'cpu').",
    )
    parser.add_argument("--no_pictures", action="store_true", help="Write the JSON only.")
    parser.add_argument(
        "--on_bad_image",
        default="skip",
        choices=["skip", "error"],
        help="A file that is not a readable image (truncated, not an image, a decompression bomb, a mode without an "
        "RGB conversion): skip it (listed under 'skipped' in detections.json) or stop with an error naming it.",
    )
    parser.add_argument("--max_image_pixels", type=int, default=None, help=MAX_IMAGE_PIXELS_HELP)
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write into an --output_dir that already holds detections.json (replacing it and same-named pictures).",
    )
    return parser.parse_args(argv)


def collect_images(paths: list[str]) -> list[Path]:
    """Expands folders into their image files (sorted); raises `FileNotFoundError` for a path that does not exist."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No image file or folder at {path}")
    if not files:
        raise FileNotFoundError(f"No images found in {paths}")
    return files


def picture_names(files: list[Path], output_dir: Path) -> list[str]:
    """
    One distinct PNG file name in `output_dir` per image, in the order of `files`: `<stem>.png` when no other image
    has the same stem, else the image's path relative to the folder all images share, parts joined by `__`
    (`a__cat.jpg.png`); a number is appended when that is still taken (the same file given twice) or is an input.
    """
    stems = Counter(path.stem for path in files)
    resolved = [path.resolve() for path in files]
    common = Path(os.path.commonpath([str(path.parent) for path in resolved]))
    names, used = [], set()
    for path, full in zip(files, resolved):
        base = path.stem if stems[path.stem] == 1 else "__".join(full.relative_to(common).parts)
        name, number = f"{base}.png", 2
        while name in used or (output_dir / name).resolve() in resolved:  # never draw over an input image
            name, number = f"{base}-{number}.png", number + 1
        used.add(name)
        names.append(name)
    return names


def load_image(path: Path, on_bad_image: str = "skip") -> Image.Image | None:
    """
    The image as it is shown (EXIF orientation applied, as the pipeline reads it) in 8-bit RGB, or `None` (with a
    warning) for a file that is not a readable image when `on_bad_image="skip"`; with "error", `ImageReadError`.
    """
    try:
        return to_rgb(decode_image(path, "input image"), "input image")
    except ImageReadError as error:
        if on_bad_image == "error":
            raise ImageReadError(f"{error} (--on_bad_image skip skips such files)", missing=error.missing) from None
        logger.warning("Skipping %s: %s", path, error)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = AutoModelForObjectDetection.from_pretrained(args.model).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    processor.check_model_compatible(model)
    generation_kwargs = {"do_sample": False} if args.greedy else {}
    if args.top_p is not None and not args.greedy:
        generation_kwargs["top_p"] = args.top_p

    output_dir = Path(args.output_dir)
    if (output_dir / "detections.json").exists() and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{output_dir} already holds detections.json (and perhaps pictures) of an earlier run; pass "
            "--overwrite_output_dir to replace them, or choose another --output_dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    files = collect_images(args.images)
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    names = picture_names(files, output_dir)
    loaded = [(path, name, load_image(path, args.on_bad_image)) for path, name in zip(files, names)]
    skipped = [str(path) for path, _, image in loaded if image is None]
    loaded = [entry for entry in loaded if entry[2] is not None]
    torch.manual_seed(args.seed)

    results = []
    for start in range(0, len(loaded), args.batch_size):
        batch = loaded[start : start + args.batch_size]
        images = [image for _, _, image in batch]
        inputs = processor(images=images, return_tensors="pt").to(args.device)
        with torch.no_grad():
            outputs = model.generate(inputs["pixel_values"], **generation_kwargs)
        detections = processor.post_process_object_detection(
            outputs, threshold=args.threshold, target_sizes=[(image.height, image.width) for image in images]
        )
        for (path, name, image), found in zip(batch, detections):
            found = {key: value.cpu() for key, value in found.items()}
            results.append(
                {
                    "file": str(path),
                    "picture": None if args.no_pictures else name,
                    "width": image.width,
                    "height": image.height,
                    "detections": [
                        {
                            "label": model.config.id2label.get(int(label), str(int(label))),
                            "label_id": int(label),
                            "score": round(float(score), 4),
                            "box": [round(float(v), 2) for v in box],
                        }
                        for score, label, box in zip(found["scores"], found["labels"], found["boxes"])
                    ],
                }
            )
            if not args.no_pictures:
                picture = draw_detections(image, found, model.config.id2label)
                picture.save(output_dir / name)
            logger.info("%s: %d detections", path, len(found["scores"]))

    with open(output_dir / "detections.json", "w") as handle:
        json.dump({"model": args.model, "threshold": args.threshold, "skipped": skipped, "images": results}, handle, indent=2)
    logger.info("Wrote %s (%d images, %d skipped)", output_dir / "detections.json", len(results), len(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
