"""COCO evaluation of a saved Pix2Seq model on a dataset split (pycocotools COCOeval, every prediction kept).

    python examples/evaluate.py --model_name_or_path outputs/pix2seq-synthetic          # synthetic validation split
    python examples/evaluate.py --model_name_or_path outputs/pix2seq-synthetic --dtype bfloat16  # bf16 weights
    python examples/evaluate.py --model_name_or_path my-model --dataset_name cppe-5 --validation_split test
    python examples/evaluate.py --model_name_or_path my-model --coco_annotations instances_val2017.json \\
        --coco_images val2017

The model's labels are either the data's labels (a model trained with this package on the same data) or the data's
category ids (a model converted from the official checkpoints: COCO's "person" is label 1); which one is read from the
model's `id2label`. `--official_protocol` decodes as the official evaluation (the published COCO AP of a converted
checkpoint). Prints the metrics and writes them, with every prediction in the COCO results format (the data's own
category ids), to `--output_file`. Several processes: `torchrun --nproc_per_node N examples/evaluate.py ...`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForObjectDetection, AutoProcessor

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits, undecoded_images
from pix2seq_hf.data.images import MAX_IMAGE_PIXELS_HELP, set_max_image_pixels
from pix2seq_hf.evaluation import evaluate_model
from pix2seq_hf.official_evaluation import official_detect


logger = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model",
        required=True,
        help="Folder (or Hub id) of a saved Pix2Seq model and processor, e.g. a converted official checkpoint.",
    )
    parser.add_argument(
        "--dataset_name", default=None, help="Hub id or local path of a HF dataset (none: the synthetic shapes set)."
    )
    parser.add_argument("--dataset_config", default=None, help="Configuration name of `--dataset_name`.")
    parser.add_argument("--validation_split", default="validation", help="The split to evaluate.")
    parser.add_argument(
        "--bbox_format",
        default="auto",
        choices=["auto", "xywh", "xyxy"],
        help="Box format of a HF dataset ('auto': read from its features or the data).",
    )
    parser.add_argument(
        "--coco_annotations",
        "--validation_coco_annotations",
        dest="validation_coco_annotations",
        default=None,
        help="COCO json of the images to evaluate (e.g. instances_val2017.json).",
    )
    parser.add_argument(
        "--coco_images",
        "--validation_coco_images",
        dest="validation_coco_images",
        default=None,
        help="Folder of those images (their `file_name` is relative to it).",
    )
    parser.add_argument(
        "--synthetic_validation_size", type=int, default=200, help="Images of the synthetic set (no dataset given)."
    )
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate only the first N images.")
    parser.add_argument(
        "--check_images",
        default=None,
        choices=["none", "exists", "decode"],
        help="Check the images first: 'exists' (what a COCO json gets when unset), 'decode' (reads them all), 'none'.",
    )
    parser.add_argument(
        "--on_bad_image",
        default="error",
        choices=["error", "skip"],
        help="A missing or undecodable image: stop with an error naming it, or leave it out of the evaluation "
        "(its ground truth too; counted in the report).",
    )
    parser.add_argument("--max_image_pixels", type=int, default=None, help=MAX_IMAGE_PIXELS_HELP)
    parser.add_argument("--seed", type=int, default=42, help="Seed of the synthetic set and of the sampling.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per batch and process.")
    parser.add_argument(
        "--top_p", type=float, default=None, help="Sample with this nucleus mass (unset: greedy decoding)."
    )
    parser.add_argument(
        "--official_protocol",
        action="store_true",
        help="Decode as the official COCO evaluation (`official_detect`: 500 sampled tokens, official top-p "
        "`--top_p` or 0.4, every five-token group read as a detection), as the published AP was measured.",
    )
    parser.add_argument(
        "--output_file", default=None, help="JSON of metrics and predictions (unset: <model>/eval_results.json)."
    )
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when a GPU is available.")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Weights and activations of the model (`from_pretrained(..., dtype=...)`); the token grammar, sampling "
        "and scores stay float32.",
    )
    return parser.parse_args(argv)


def label_space(model_id2label: dict, splits) -> str:
    """
    What the model's labels are: `"labels"` when they are the data's labels (same ids, same names), `"category_ids"`
    when they are the data's category ids (every category of the data is the model label of that id, under the same
    name, as in a converted official checkpoint).

    Raises:
        `ValueError` naming the classes of both when neither holds.
    """
    model_labels = {int(k): v for k, v in model_id2label.items()}
    if model_labels == splits.id2label:
        return "labels"
    by_category_id = {int(category): splits.id2label[label] for label, category in splits.label2category_id.items()}
    if all(str(model_labels.get(c, "")).casefold() == str(name).casefold() for c, name in by_category_id.items()):
        return "category_ids"
    raise ValueError(
        f"The model's classes {model_labels} are neither the data's labels {splits.id2label} nor its category ids "
        f"{by_category_id}."
    )


class CategoryIdTargets:
    """Wraps a collator so that the targets' labels are the data's category ids (the labels of the model)."""

    def __init__(self, collator, label2category_id: dict[int, int]):
        self.collator = collator
        self.lookup = torch.tensor([label2category_id[label] for label in range(len(label2category_id))])

    def __call__(self, examples):
        batch = self.collator(examples)
        for target in batch["targets"]:
            target["labels"] = self.lookup[torch.as_tensor(target["labels"], dtype=torch.long)]
        return batch


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    use_cpu = args.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    accelerator = Accelerator(cpu=use_cpu)
    model = AutoModelForObjectDetection.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    processor = AutoProcessor.from_pretrained(args.model)
    processor.check_model_compatible(model)

    # Only the evaluation split is loaded: the training options point at nothing and the synthetic train split is empty.
    splits = load_detection_splits(
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        train_split=args.validation_split,
        validation_split=args.validation_split,
        bbox_format=args.bbox_format,
        coco_annotations=args.validation_coco_annotations,
        coco_images=args.validation_coco_images,
        validation_coco_annotations=args.validation_coco_annotations,
        validation_coco_images=args.validation_coco_images,
        synthetic_train_size=1,
        synthetic_validation_size=args.synthetic_validation_size,
        max_eval_samples=args.max_eval_samples,
        check_images=args.check_images,
        on_bad_image=args.on_bad_image,
        seed=args.seed,
    )
    dataset = splits.validation
    if dataset is None:
        raise ValueError(f"No split {args.validation_split!r} to evaluate.")
    labels = label_space(model.config.id2label, splits)

    collator = Pix2SeqCollator(processor, training=False, return_sequences=False, on_bad_image=args.on_bad_image)
    # A model labelled by category id predicts the data's category ids: its ground truth is compared in those ids.
    collate = collator if labels == "labels" else CategoryIdTargets(collator, splits.label2category_id)
    # The collator decodes the images, so that a bad one is named by file and image id (or skipped).
    loader = DataLoader(undecoded_images(dataset), batch_size=args.batch_size, collate_fn=collate)
    dataloader = accelerator.prepare(loader)
    model = model.to(accelerator.device)
    if args.official_protocol:
        generation_kwargs = {"official_protocol": True, "top_p": 0.4 if args.top_p is None else args.top_p}
        detect = functools.partial(official_detect, top_p=generation_kwargs["top_p"])
    else:
        generation_kwargs = {"do_sample": False} if args.top_p is None else {"do_sample": True, "top_p": args.top_p}
        detect = None
    torch.manual_seed(args.seed)
    start = time.time()
    metrics, predictions = evaluate_model(
        model,
        processor,
        dataloader,
        generation_kwargs=None if detect else generation_kwargs,
        detect=detect,
        accelerator=accelerator,
        label2category_id=splits.label2category_id if labels == "labels" else None,
        return_predictions=True,
        progress_bar=True,
    )
    seconds = time.time() - start
    skipped = torch.tensor(collator.stats["skipped_bad_images"], device=accelerator.device)
    skipped = int(accelerator.reduce(skipped, "sum"))
    if accelerator.is_main_process:
        for key, value in metrics.items():
            print(f"{key:>10}: {value:.4f}")
        output_file = args.output_file or os.path.join(args.model, "eval_results.json")
        report = {
            "model": args.model,
            "num_images": len(dataset) - skipped,
            "skipped_bad_images": skipped,
            "seconds": round(seconds, 2),
            "generation": generation_kwargs,
            "labels": labels,
            "dtype": args.dtype,
            "metrics": metrics,
            "predictions": predictions,
        }
        with open(output_file, "w") as handle:
            json.dump(report, handle)
        logger.info("Wrote %s (%d images in %.1f s)", output_file, len(dataset), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
