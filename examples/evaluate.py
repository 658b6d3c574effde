"""COCO evaluation of a saved Pix2Seq model on a dataset split (pycocotools COCOeval, every prediction kept).

    python examples/evaluate.py --model outputs/pix2seq-synthetic                      # synthetic validation split
    python examples/evaluate.py --model outputs/pix2seq-synthetic --dtype bfloat16     # bf16 weights and activations
    python examples/evaluate.py --model my-model --dataset_name cppe-5 --validation_split test
    python examples/evaluate.py --model my-model --validation_coco_annotations instances_val2017.json \
        --validation_coco_images val2017

Prints the metrics and writes them, with every prediction in the COCO results format (the data's own category ids),
to `--output_file`. Several processes: `torchrun --nproc_per_node N examples/evaluate.py ...`.
"""

from __future__ import annotations

import argparse
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
from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits, undecoded_images
from pix2seq_hf.evaluation import evaluate_model


logger = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Folder (or Hub id) of a saved Pix2Seq model and processor.")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local path of a HF dataset (default: synthetic).")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--validation_split", default="validation", help="The split to evaluate.")
    parser.add_argument("--bbox_format", default="auto", choices=["auto", "xywh", "xyxy"])
    parser.add_argument("--validation_coco_annotations", default=None, help="COCO json of the images to evaluate.")
    parser.add_argument("--validation_coco_images", default=None, help="Folder of those images.")
    parser.add_argument("--synthetic_validation_size", type=int, default=200)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument(
        "--check_images",
        default=None,
        choices=["none", "exists", "decode"],
        help="Check the images first: 'exists' (the default for COCO json), 'decode' (reads them all), 'none'.",
    )
    parser.add_argument(
        "--on_bad_image",
        default="error",
        choices=["error", "skip"],
        help="A missing or undecodable image: stop with an error naming it, or leave it out of the evaluation "
        "(its ground truth too; counted in the report).",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the synthetic set and of the sampling.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--top_p", type=float, default=None, help="Sample with this mass (default: greedy decoding).")
    parser.add_argument("--output_file", default=None, help="JSON of metrics and predictions (default: <model>/eval_results.json).")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Weights and activations of the model (`from_pretrained(..., dtype=...)`); the token grammar, sampling "
        "and scores stay float32.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
    model_labels = {int(k): v for k, v in model.config.id2label.items()}
    if model_labels != splits.id2label:
        raise ValueError(f"The model's classes {model_labels} differ from the data's {splits.id2label}.")

    collator = Pix2SeqCollator(processor, training=False, return_sequences=False, on_bad_image=args.on_bad_image)
    # The collator decodes the images, so that a bad one is named by file and image id (or skipped).
    loader = DataLoader(undecoded_images(dataset), batch_size=args.batch_size, collate_fn=collator)
    dataloader = accelerator.prepare(loader)
    model = model.to(accelerator.device)
    generation_kwargs = {"do_sample": False} if args.top_p is None else {"do_sample": True, "top_p": args.top_p}
    torch.manual_seed(args.seed)
    start = time.time()
    metrics, predictions = evaluate_model(
        model,
        processor,
        dataloader,
        generation_kwargs=generation_kwargs,
        accelerator=accelerator,
        label2category_id=splits.label2category_id,
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
