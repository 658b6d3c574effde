"""
How much speculative decoding of whole objects saves on a trained model: decoder passes per image and tokens accepted
per pass, with the model's auxiliary dense head as drafter (`generate(..., draft="auxiliary")`), on the synthetic
validation set `examples/train.py` evaluates on. Also checks that greedy decoding gives the same tokens with and
without the draft.

Drafters a model without the head can use: `--drafter lookahead` (`draft="lookahead"`: the model's own predictions
from the last pass, no drafted objects) and `--drafter batch_mate` (the objects the model wrote for the previous image
of the set, as a batch-mate's or the previous video frame's detections would be, then as `lookahead`).

    python examples/benchmarks/draft_acceptance.py --model runs/my-model --images 100
    python examples/benchmarks/draft_acceptance.py --model runs/my-model --drafter batch_mate
    python examples/benchmarks/draft_acceptance.py --model runs/coins-model --coco_annotations validation.json \\
        --coco_images images    # a COCO json's images instead of the synthetic set

It also times both calls of every image but the first (a warm-up): seconds per image with and without the draft and
their ratio, meaningful on a quiet machine only (`examples/benchmarks/benchmark.py --draft` times more settings on
the synthetic set).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForObjectDetection, AutoProcessor

from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits
from pix2seq_hf.speculative_decoding import (
    Pix2SeqAuxiliaryDrafter,
    Pix2SeqLookaheadDrafter,
    acceptance_statistics,
)


logger = logging.getLogger(__name__)


class FixedDrafter(Pix2SeqLookaheadDrafter):
    """A drafter that proposes given objects (`(num_objects, 5)` tokens) for the one image of a `generate` call."""

    def __init__(self, objects: torch.Tensor, objects_per_pass: int):
        super().__init__(objects_per_pass=objects_per_pass)
        self.objects = objects

    def draft_objects(self, encoder_outputs, config, image_size=None):
        return [self.objects]


def written_objects(sequence: torch.Tensor, config) -> torch.Tensor:
    """The complete objects of a generated sequence (prompt first), up to its first EOS: `(num_objects, 5)`."""
    generated = sequence[1:].tolist()
    if config.eos_token_id in generated:
        generated = generated[: generated.index(config.eos_token_id)]
    generated = generated[: len(generated) // 5 * 5]
    return torch.tensor(generated, dtype=torch.long).view(-1, 5)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="A saved model and processor (e.g. train.py's output_dir).")
    parser.add_argument("--images", type=int, default=100, help="Validation images (the first N of a COCO json).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the synthetic set (train.py's default: 42).")
    parser.add_argument("--synthetic_variant", default="shapes", help="Synthetic set: shapes or dense.")
    parser.add_argument("--coco_annotations", default=None, help="A COCO json to take the images from instead.")
    parser.add_argument("--coco_images", default=None, help="The folder of the COCO json's images.")
    parser.add_argument(
        "--drafter",
        choices=["auxiliary", "lookahead", "batch_mate"],
        default="auxiliary",
        help="The model's auxiliary dense head, no drafted objects, or the objects written for the previous image.",
    )
    parser.add_argument(
        "--objects_per_pass",
        type=int,
        default=None,
        help="Objects verified per decoder pass at most (default: 4 for greedy decoding, 2 for sampling).",
    )
    parser.add_argument("--score_threshold", type=float, default=0.3, help="Auxiliary drafter's score threshold.")
    parser.add_argument("--top_p", type=float, default=0.4, help="Top-p of the sampling run.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--output", default=None, help="Write the results here (JSON).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = AutoModelForObjectDetection.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    # The COCO json's first `--images` images when one is given, otherwise that many synthetic validation images.
    splits = load_detection_splits(
        validation_coco_annotations=args.coco_annotations,
        validation_coco_images=args.coco_images,
        max_eval_samples=args.images,
        synthetic_validation_size=args.images,
        synthetic_variant=args.synthetic_variant,
        seed=args.seed,
        train=False,
    )
    dataloader = DataLoader(
        splits.validation, batch_size=1, collate_fn=Pix2SeqCollator(processor, training=False, return_sequences=False)
    )
    auxiliary = Pix2SeqAuxiliaryDrafter(
        object_order=processor.object_order,
        score_threshold=args.score_threshold,
        objects_per_pass=args.objects_per_pass,
    )
    results = {"model": args.model, "images": len(splits.validation), "drafter": args.drafter}
    results["draft"] = repr(auxiliary)
    for mode, options in (("greedy", {"do_sample": False}), ("sampling", {"do_sample": True, "top_p": args.top_p})):
        torch.manual_seed(0)
        tokens = mismatches = 0
        seconds = {"without_draft": 0.0, "with_draft": 0.0}
        previous = torch.zeros(0, 5, dtype=torch.long)
        with acceptance_statistics() as statistics:
            for index, batch in enumerate(dataloader):
                pixel_values = batch["pixel_values"]
                start = time.perf_counter()
                reference = model.generate(pixel_values, **options).sequences[0]
                without_draft = time.perf_counter() - start
                objects = written_objects(reference, model.config)
                tokens += len(reference) - 1  # a batch of one ends at its EOS: one pass per token
                if args.drafter == "auxiliary":
                    draft = auxiliary
                elif args.drafter == "lookahead":
                    draft = Pix2SeqLookaheadDrafter(args.objects_per_pass)
                else:
                    draft = FixedDrafter(previous, args.objects_per_pass)
                    previous = objects
                start = time.perf_counter()
                drafted = model.generate(pixel_values, draft=draft, **options).sequences[0]
                if index > 0:  # the first image warms both paths up
                    seconds["without_draft"] += without_draft
                    seconds["with_draft"] += time.perf_counter() - start
                if mode == "greedy" and not torch.equal(drafted, reference):
                    mismatches += 1
        timed = max(1, len(dataloader) - 1)
        results[mode] = {
            **statistics.to_dict(),
            "tokens_per_image_without_draft": tokens / len(dataloader),
            "images_with_other_tokens": mismatches if mode == "greedy" else None,
            "seconds_per_image_without_draft": seconds["without_draft"] / timed,
            "seconds_per_image_with_draft": seconds["with_draft"] / timed,
            "speed_up": seconds["without_draft"] / seconds["with_draft"] if seconds["with_draft"] else None,
        }
        logger.info("%s: %s", mode, json.dumps(results[mode]))
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
