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

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForObjectDetection, AutoProcessor, HfArgumentParser

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits, undecoded_images
from pix2seq_hf.data.images import set_max_image_pixels
from pix2seq_hf.evaluation import evaluate_model
from pix2seq_hf.official_evaluation import official_detect
from pix2seq_hf.training_options import DEFAULT_SEED, DataOptions, EvaluationOptions, option


logger = logging.getLogger("evaluate")


@dataclass
class EvaluateArguments:
    """What only this script has: the model, how it runs, the protocol and where the report goes."""

    _argument_group_name = "model and report"

    model_name_or_path: str = field(
        metadata={
            "help": "Folder (or Hub id) of a saved Pix2Seq model and processor, e.g. a converted official checkpoint.",
            "aliases": ["--model"],
        }
    )
    batch_size: int = option(32, help="Images per batch and process.")
    official_protocol: bool = option(
        False,
        help="Decode as the official COCO evaluation (`official_detect`: 500 sampled tokens, official top-p "
        "`--top_p` or 0.4, every five-token group read as a detection), as the published AP was measured.",
    )
    output_file: str | None = option(help="JSON of metrics and predictions (unset: <model>/eval_results.json).")
    cpu: bool = option(False, help="Run on the CPU even when a GPU is available.")
    dtype: str = option(
        "float32",
        help="Weights and activations of the model (`from_pretrained(..., dtype=...)`); the token grammar, sampling "
        "and scores stay float32.",
        choices=["float32", "bfloat16", "float16"],
    )
    seed: int = option(DEFAULT_SEED, help="Seed of the synthetic set and of the sampling.")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}.")


def parse_args(argv=None) -> tuple[DataOptions, EvaluationOptions, EvaluateArguments]:
    """
    The options of the evaluation: the data options of the training scripts (the split evaluated is
    `--validation_split` of a dataset, `--validation_coco_annotations` / `--validation_coco_images`, also spelled
    `--coco_annotations` / `--coco_images`, or the synthetic validation split), their evaluation options, and this
    script's own. A value an option refuses ends the script with an error naming the option.
    """
    parser = HfArgumentParser(
        (DataOptions, EvaluationOptions, EvaluateArguments), description=__doc__, formatter_class=HelpFormatter
    )
    for action in parser._actions:
        if action.dest in DataOptions.TRAINING_ONLY:
            action.help = argparse.SUPPRESS  # still parsed (a training command line can be reused), not listed
    try:
        data, evaluation, arguments = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    if data.streaming:
        parser.error("streaming reads a training split; the evaluation reads its split whole.")
    if data.validation_coco_annotations is None and data.coco_annotations is not None:
        # A single COCO json here is the one to evaluate.
        data = dataclasses.replace(
            data,
            validation_coco_annotations=data.coco_annotations,
            validation_coco_images=data.coco_images,
            coco_annotations=None,
            coco_images=None,
        )
    return data, evaluation, arguments


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
    data, evaluation, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if data.max_image_pixels is not None:
        set_max_image_pixels(data.max_image_pixels)
    use_cpu = args.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    accelerator = Accelerator(cpu=use_cpu)
    model = AutoModelForObjectDetection.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    processor.check_model_compatible(model)

    # Only the split to evaluate is loaded, as the validation split, with its own label map.
    splits = load_detection_splits(data, seed=args.seed, train=False)
    dataset = splits.validation
    labels = label_space(model.config.id2label, splits)

    collator = Pix2SeqCollator(processor, training=False, return_sequences=False, on_bad_image=data.on_bad_image)
    # A model labelled by category id predicts the data's category ids: its ground truth is compared in those ids.
    collate = collator if labels == "labels" else CategoryIdTargets(collator, splits.label2category_id)
    # The collator decodes the images, so that a bad one is named by file and image id (or skipped).
    loader = DataLoader(undecoded_images(dataset), batch_size=args.batch_size, collate_fn=collate)
    dataloader = accelerator.prepare(loader)
    model = model.to(accelerator.device)
    if args.official_protocol:
        top_p = 0.4 if evaluation.eval_top_p is None else evaluation.eval_top_p
        generation_kwargs = {"official_protocol": True, "top_p": top_p}
        detect = functools.partial(official_detect, top_p=top_p)
    else:
        generation_kwargs = evaluation.generation_kwargs()
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
        output_file = args.output_file or os.path.join(args.model_name_or_path, "eval_results.json")
        report = {
            "model": args.model_name_or_path,
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
