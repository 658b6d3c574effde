"""Measures a training recipe from scratch: mAP against steps, and how much the model uses the image.

Takes the options of `examples/train.py` (data, model, recipe, optimiser), trains in one process with a plain
float32 loop (no Accelerate, no checkpoints) and every `--eval_steps` steps prints and records:

- the COCO metrics of greedy decoding on the first `--max_eval_samples` validation images (200 by default);
- a teacher-forced diagnostic on `--diagnostic_images` validation images: the cross-entropy of the real objects'
  coordinate and class tokens, once with each image and once with the images rolled by one in the batch (every
  sequence paired with another image). While the two are equal the model writes the sequence prior and ignores the
  image; the gap is how much it reads;
- with an auxiliary dense head, the mAP of that head read as a one-level FCOS detector (`auxiliary_head_map`): what
  the encoder knows, against what the decoder writes.

    python examples/benchmarks/recipe_ablation.py --num_threads 1 --max_train_steps 1500 --eval_steps 500 \\
        --output_file run.json
    python examples/benchmarks/recipe_ablation.py --auxiliary_loss_weight 0 --coordinate_label_sigma 0 \\
        --coordinate_embedding_init normal --max_train_steps 1500 --eval_steps 500     # the paper's losses and init

examples/benchmarks/RESULTS.md tabulates what these runs gave.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.ops import batched_nms
from transformers import get_scheduler


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train as pix2seq_train  # noqa: E402  (examples/train.py)
from pix2seq_hf import training_plan, training_setup  # noqa: E402
from pix2seq_hf.cli import HelpFormatter  # noqa: E402
from pix2seq_hf.auxiliary_dense_head import cell_boxes, object_groups  # noqa: E402
from pix2seq_hf.data import (  # noqa: E402
    Pix2SeqCollator,
    load_detection_splits,
    objects_per_image,
    undecoded_images,
)
from pix2seq_hf.evaluation import CocoDetectionEvaluator, evaluate_model  # noqa: E402
from pix2seq_hf.training_options import DataOptions, RecipeOptions  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's options, then `examples/train.py`'s (every other argument)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " Every other option is examples/train.py's.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--diagnostic_images", type=int, default=64, help="Validation images of the diagnostic.")
    parser.add_argument("--output_file", default=None, help="Write the evaluations here (JSON).")
    own, rest = parser.parse_known_args(argv)
    args = pix2seq_train.parse_args(rest)
    if args.eval_steps is None:
        args.eval_steps = 500
    if args.max_train_steps is None:
        args.max_train_steps = 1500
    if args.max_eval_samples is None:
        args.max_eval_samples = 200
    if args.num_warmup_steps is None:
        args.num_warmup_steps = training_plan.MAX_WARMUP_STEPS  # the warm-up of the measured ablations
    return own, args


@torch.no_grad()
def auxiliary_head_map(model, eval_loader, max_detections: int = 100, iou_threshold: float = 0.6) -> float:
    """
    COCO mAP of the auxiliary dense head read as a one-level FCOS detector (what the encoder knows, whatever the
    decoder makes of it): every cell and class is a candidate box scored by the head's sigmoid, the best
    `max_detections` of an image after class-wise NMS are kept.

    Returns:
        `float`: the mAP on the images of `eval_loader`.
    """
    was_training = model.training
    model.eval()
    evaluator = CocoDetectionEvaluator(model.config.id2label)
    for batch in eval_loader:
        encoded = model.model.encoder(batch["pixel_values"])
        all_boxes = cell_boxes(encoded.auxiliary_distances, tuple(batch["pixel_values"].shape[-2:]))
        for logits, boxes, target in zip(encoded.auxiliary_logits, all_boxes, batch["targets"]):
            height, width = (int(v) for v in target["orig_size"])
            # Normalised to the padded square canvas, which the longer side of the image fills.
            boxes = boxes * max(height, width)
            scores, index = logits.sigmoid().flatten().topk(min(10 * max_detections, logits.numel()))
            cells, labels = index // logits.shape[1], index % logits.shape[1]
            keep = batched_nms(boxes[cells], scores, labels, iou_threshold)[:max_detections]
            image_id = int(target["image_id"])
            evaluator.add_ground_truth(
                image_id, height, width, target["boxes"], target["labels"], target.get("iscrowd"), target.get("area")
            )
            evaluator.add_predictions(image_id, boxes[cells[keep]], labels[keep], scores[keep])
    model.train(was_training)
    return evaluator.compute()["map"]


@torch.no_grad()
def image_use(model, batch) -> dict[str, float]:
    """
    Teacher-forced cross-entropy of the real objects' coordinate and class tokens of `batch`, with the right images
    and with the images rolled by one.

    Returns:
        `dict` with `coordinate_loss`, `class_loss`, `coordinate_loss_other_image`, `class_loss_other_image`.
    """
    was_training = model.training
    model.eval()
    labels = batch["labels"]
    _, _, real = object_groups(labels, model.config)
    length = real.shape[1] * 5
    results = {}
    for suffix, pixel_values in (("", batch["pixel_values"]), ("_other_image", batch["pixel_values"].roll(1, 0))):
        logits = model(pixel_values=pixel_values, decoder_input_ids=batch["decoder_input_ids"]).logits
        cross_entropy = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        groups = cross_entropy[:, :length].reshape(labels.shape[0], -1, 5)
        results[f"coordinate_loss{suffix}"] = round(groups[..., :4][real].mean().item(), 3)
        results[f"class_loss{suffix}"] = round(groups[..., 4][real].mean().item(), 3)
    model.train(was_training)
    return results


def main(argv=None) -> int:
    own, args = parse_args(argv)
    torch.set_num_threads(args.num_threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    data = pix2seq_train.options(DataOptions, args)
    splits = load_detection_splits(data, seed=args.seed)
    # As examples/train.py: a new model's sequences hold the fullest training image, the augmentation is the data's.
    model, processor = pix2seq_train.build_model_and_processor(args, splits.id2label, objects_per_image(splits.train))
    args.augmentation = data.training_augmentation
    args.per_device_train_batch_size = args.per_device_train_batch_size or 8
    recipe = pix2seq_train.options(RecipeOptions, args).resolved(True, bool(args.model_name_or_path))
    learning_rate, encoder_lr_scale = recipe.learning_rate, recipe.encoder_lr_scale

    collator = pix2seq_train.build_train_collator(args, processor)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        undecoded_images(splits.train),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        generator=generator,
    )
    validation = undecoded_images(splits.validation)
    eval_loader = DataLoader(
        validation, batch_size=args.per_device_eval_batch_size, collate_fn=Pix2SeqCollator(processor, training=False)
    )
    count = min(own.diagnostic_images, len(validation))
    diagnostic_batch = Pix2SeqCollator(processor, training=True, seed=7)([validation[i] for i in range(count)])

    groups = training_setup.optimizer_param_groups(model, learning_rate, args.weight_decay, encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2))
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    history, losses, step, epoch = [], [], 0, 0
    train_seconds, start = 0.0, time.perf_counter()
    model.train()
    while step < args.max_train_steps:
        collator.set_epoch(epoch)
        for batch in loader:
            outputs = model(
                pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]
            )
            outputs.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(outputs.loss.item())
            step += 1
            train_seconds += time.perf_counter() - start
            if step % args.eval_steps == 0 or step >= args.max_train_steps:
                metrics = evaluate_model(model, processor, eval_loader, generation_kwargs={"do_sample": False})
                record = {
                    "step": step,
                    "train_minutes": round(train_seconds / 60, 2),
                    "loss": round(sum(losses) / len(losses), 4),
                    **{key: round(float(metrics[key]), 4) for key in ("map", "map_50", "map_75", "mar_100")},
                    **image_use(model, diagnostic_batch),
                }
                if model.model.encoder.auxiliary_head is not None:
                    record["auxiliary_head_map"] = round(float(auxiliary_head_map(model, eval_loader)), 4)
                losses.clear()
                history.append(record)
                print(json.dumps(record), flush=True)
            if step >= args.max_train_steps:
                break
            start = time.perf_counter()
        epoch += 1
    if own.output_file:
        report = {"arguments": vars(args), "max_objects": model.config.max_objects, "history": history}
        Path(own.output_file).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
