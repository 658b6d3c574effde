"""Side-by-side training benchmark: Pix2Seq (this project's default run), transformers' DETR and torchvision's FCOS
trained from scratch on the same data, with the same budget and the same COCO evaluation.

    python examples/benchmarks/benchmark_training.py       # all three, 3000 steps each, mAP every 500
    python examples/benchmarks/benchmark_training.py --detectors fcos detr --max_train_steps 2000 --num_threads 1

Data: the synthetic shapes set of `examples/train.py` (4000 training and 200 validation images of 128 px, seed 42),
the same augmentation for every detector (seeded per epoch and image; none on the synthetic sets, Pix2Seq's default
there), batch 8. Every detector starts from random weights (a ResNet-18 backbone, at half width in Pix2Seq's `tiny`
preset) and is evaluated on the validation split with pycocotools (`CocoDetectionEvaluator`) every `--eval_steps` steps
and at the end. `--max_train_minutes` is wall time for every detector, the evaluations along the run included, as
`examples/train.py` counts it; the minutes reported count training, batch loading and augmentation included, and leave
the evaluations out.

`--dataset coins` trains and evaluates on real photographs instead: 48 training and 16 validation images of 384 px with
16 to 27 coins each (seed 42), mosaics of crops of scikit-image's coins photograph with boxes from a classical
segmentation (`pix2seq_hf.data.real_images.build_coins_dataset`; validation shows coins never trained on), all
detectors with the `light` augmentation (scale jitter [0.8, 1.25], flips). `--canvas` sets the side every detector
trains and evaluates at (the augmentation scales the images to it; boxes are scored on the 384 px images):

    python examples/benchmarks/benchmark_training.py --dataset coins --canvas 128 --detectors pix2seq fcos \\
        --max_train_steps 100000 --max_train_minutes 15 --eval_steps 500 --num_threads 2

`--dataset dense` uses the synthetic set's dense variant (384 px, 20 to 60 objects of 12 to 38 pixels; `--image_size
256` draws it at 256 px, objects of 8 to 26 pixels). On both, `examples/train.py` sizes Pix2Seq's sequences for the
fullest training image (32 objects on the coins, 64 on the dense set; `training_plan.plan_max_objects`).

Every detector gets the same CPU speed settings: channels-last convolutions, fused optimizer steps, and bf16 autocast
where `examples/train.py` chooses it (CPUs with AMX; float32 elsewhere).

- `pix2seq`: `examples/train.py` with its defaults (the tiny preset and the from-scratch recipe), in this process.
- `detr`: `transformers.DetrForObjectDetection`, d_model 128, 2+2 layers, 4 heads, FFN 512, 20 queries (the tiny
  preset's size), AdamW 1e-4 (backbone 1e-5), weight decay 1e-4, gradient clipping 0.1 (DETR's recipe).
- `fcos`: `torchvision.models.detection.FCOS` on a ResNet-18 + FPN (P3-P7), SGD 0.01 with momentum 0.9, weight
  decay 1e-4, linear warm-up over 100 steps (torchvision's reference recipe at this batch size), score threshold
  0.05 and 100 detections per image at evaluation.

Prints each detector's mAP against steps and minutes, and writes them to `--output_file` (JSON).
DETR needs scipy (the `benchmark` extra: `pip install -e .[benchmark]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train as pix2seq_train  # noqa: E402  (examples/train.py)
from pix2seq_hf.cli import HelpFormatter  # noqa: E402
from pix2seq_hf.data import build_train_transforms, derive_seed, load_detection_splits  # noqa: E402
from pix2seq_hf.data.images import open_image  # noqa: E402
from pix2seq_hf.data.real_images import build_coins_dataset  # noqa: E402
from pix2seq_hf.data.transforms import apply_transforms  # noqa: E402
from pix2seq_hf.evaluation import METRIC_KEYS, CocoDetectionEvaluator  # noqa: E402
from pix2seq_hf.training_options import SYNTHETIC_AUGMENTATION  # noqa: E402
from pix2seq_hf.training_setup import default_mixed_precision  # noqa: E402


DETECTORS = ("pix2seq", "detr", "fcos")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--detectors", nargs="+", default=list(DETECTORS), choices=DETECTORS, help="The detectors to train."
    )
    parser.add_argument(
        "--dataset",
        default="synthetic",
        choices=["synthetic", "dense", "coins"],
        help="'synthetic': the synthetic shapes set; 'dense': its dense variant (384 px, 20 to 60 small objects); "
        "'coins': real photographs with about 16 coins each, built from scikit-image's coins photograph "
        "(`pix2seq_hf.data.real_images`; needs scikit-image).",
    )
    parser.add_argument("--coins_train_size", type=int, default=48, help="Training images of the coins set.")
    parser.add_argument("--coins_validation_size", type=int, default=16, help="Validation images of the coins set.")
    parser.add_argument("--max_train_steps", type=int, default=3000, help="Training steps of each detector.")
    parser.add_argument("--max_train_minutes", type=float, default=None, help="Also stop after this many minutes.")
    parser.add_argument("--eval_steps", type=int, default=500, help="Evaluate every N steps (and at the end).")
    parser.add_argument("--batch_size", type=int, default=8, help="Training images per step.")
    parser.add_argument("--synthetic_train_size", type=int, default=4000, help="Images of the synthetic train split.")
    parser.add_argument(
        "--synthetic_validation_size", type=int, default=200, help="Images of the synthetic validation split."
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Side of the data's images (default: 128 on the synthetic set, 384 on the others).",
    )
    parser.add_argument(
        "--canvas", type=int, default=None, help="Every detector's canvas (default: --image_size)."
    )
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the data, the weights and the data order.")
    parser.add_argument("--output_file", default="benchmark_training.json", help="Where the results go (JSON).")
    args = parser.parse_args(argv)
    if args.max_train_steps < 1 or args.eval_steps < 1 or args.batch_size < 1:
        parser.error("--max_train_steps, --eval_steps and --batch_size must be positive")
    if args.image_size is None:
        args.image_size = 128 if args.dataset == "synthetic" else 384
    if args.canvas is None:
        args.canvas = args.image_size
    args.coco = None  # the coins set's files, once built
    # One augmentation for every detector: Pix2Seq's default on the synthetic sets, `light` on the coins.
    args.augmentation = "light" if args.dataset == "coins" else SYNTHETIC_AUGMENTATION
    if args.canvas != args.image_size and args.augmentation != "light":
        parser.error("--canvas other than --image_size needs --dataset coins (the synthetic sets train unaugmented)")
    args.mixed_precision = default_mixed_precision(on_cpu=True)  # what examples/train.py chooses on this CPU
    return args


# ----- data shared by DETR and FCOS ------------------------------------------------------------------------------------


class AugmentedBatches:
    """Collates examples into `(images, targets)`: float images in [0, 1] augmented like Pix2Seq's (same transforms,
    seeded with `(seed, epoch, image_id)`) and padded at the bottom/right onto the `canvas` square as Pix2Seq's are,
    and per image `boxes` (xyxy pixels), `labels` and `mask` (1 on the image, 0 on the padding)."""

    def __init__(self, transforms, seed: int, canvas: int):
        self.transforms, self.seed, self.canvas, self.epoch = transforms, seed, canvas, 0

    def __call__(self, examples):
        images, targets = [], []
        for example in examples:
            image_id = int(example["image_id"])
            pixels = torch.from_numpy(np.array(open_image(example["image"], f"image_id {image_id}").convert("RGB")))
            objects = example["objects"]
            boxes = torch.as_tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(objects["category"], dtype=torch.int64)
            image = pixels.permute(2, 0, 1)
            if self.transforms is not None:
                seed = derive_seed(self.seed, self.epoch, image_id, 0)
                image, boxes, labels = apply_transforms(self.transforms, image, boxes, labels, seed=seed)
            height, width = image.shape[-2:]
            padded = torch.zeros(3, self.canvas, self.canvas)
            padded[:, :height, :width] = image.float() / 255
            mask = torch.zeros(self.canvas, self.canvas, dtype=torch.long)
            mask[:height, :width] = 1
            images.append(padded)
            boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
            targets.append({"boxes": boxes, "labels": labels, "mask": mask})
        return images, targets


def validation_examples(dataset):
    """`(image_id, image [3, H, W] float in [0, 1], objects)` of every validation example."""
    for example in dataset:
        image = open_image(example["image"], f"image_id {example['image_id']}").convert("RGB")
        yield int(example["image_id"]), torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255, example["objects"]


def coco_metrics(predict, dataset, id2label, batch_size: int = 32) -> dict:
    """COCO metrics of `predict(list of images) -> list of {boxes (xyxy pixels), labels, scores}` on `dataset`."""
    evaluator = CocoDetectionEvaluator(id2label)
    examples = list(validation_examples(dataset))
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            found = predict([image for _, image, _ in chunk])
            for (image_id, image, objects), detections in zip(chunk, found):
                boxes = torch.as_tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
                evaluator.add_ground_truth(
                    image_id,
                    image.shape[1],
                    image.shape[2],
                    torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1),
                    objects["category"],
                    iscrowd=objects.get("iscrowd"),
                    areas=objects.get("area"),
                )
                evaluator.add_predictions(image_id, detections["boxes"], detections["labels"], detections["scores"])
    metrics = evaluator.compute()
    return {key: float(metrics[key]) for key in METRIC_KEYS}


# ----- the detectors ---------------------------------------------------------------------------------------------------


def build_detr(num_classes: int, id2label: dict, autocast):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    config = DetrConfig(
        backbone="resnet18",
        use_timm_backbone=True,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        num_queries=20,
        num_labels=num_classes,
        id2label=id2label,
    )
    model = DetrForObjectDetection(config)
    backbone = [p for n, p in model.named_parameters() if "backbone" in n]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4, fused=True
    )
    post = DetrImageProcessor()

    def step(images, targets):
        pixel_values = torch.stack([(image - IMAGENET_MEAN) / IMAGENET_STD for image in images])
        size = pixel_values.shape[-1]
        labels = []
        for target in targets:
            xyxy = target["boxes"] / size
            cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            labels.append({"class_labels": target["labels"], "boxes": cxcywh})
        pixel_mask = torch.stack([target["mask"] for target in targets])
        with autocast():
            loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        return loss.item()

    def predict(images):
        pixel_values = torch.stack([(image - IMAGENET_MEAN) / IMAGENET_STD for image in images])
        outputs = model(pixel_values=pixel_values)
        sizes = [tuple(image.shape[1:]) for image in images]
        return post.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)

    return model, step, predict


def build_fcos(num_classes: int, image_size: int, autocast):
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = FCOS(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size, score_thresh=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))

    def step(images, targets):
        with autocast():
            losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    def predict(images):
        return model(images)

    return model, step, predict


def train_baseline(name: str, args, splits) -> list[dict]:
    """Trains DETR or FCOS; returns the evaluations (step, minutes of training, loss, metrics)."""
    torch.manual_seed(args.seed)
    num_classes = len(splits.id2label)
    # Pix2Seq's CPU speed settings (`training_setup`): bf16 autocast where it trains in bf16, channels-last kernels,
    # fused optimizer steps.
    bf16 = args.mixed_precision == "bf16"
    autocast = partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16, enabled=bf16)
    if name == "detr":
        model, step, predict = build_detr(num_classes, splits.id2label, autocast)
    else:
        model, step, predict = build_fcos(num_classes, args.canvas, autocast)
    model.to(memory_format=torch.channels_last)
    collate = AugmentedBatches(build_train_transforms(args.augmentation, args.canvas), args.seed, args.canvas)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    history, steps, eval_seconds, losses, epoch = [], 0, 0.0, [], 0
    # As in examples/train.py: the budget is wall time (loading and augmenting the batches, the evaluations along the
    # run), the reported minutes leave the evaluations out.
    start = time.perf_counter()

    def evaluate():
        nonlocal eval_seconds
        eval_start = time.perf_counter()
        model.eval()
        metrics = coco_metrics(predict, splits.validation, splits.id2label)
        model.train()
        now = time.perf_counter()
        eval_seconds += now - eval_start
        minutes = (now - start - eval_seconds) / 60
        loss = sum(losses) / max(1, len(losses))
        history.append({"step": steps, "minutes": round(minutes, 2), "loss": loss, **metrics})
        losses.clear()
        print(f"{name} step {steps} ({minutes:.1f} min): mAP {metrics['map']:.4f} mAP@50 {metrics['map_50']:.4f}", flush=True)

    model.train()
    while steps < args.max_train_steps:
        collate.epoch = epoch
        for images, targets in loader:
            losses.append(step(images, targets))
            steps += 1
            wall_minutes = (time.perf_counter() - start) / 60
            out_of_time = args.max_train_minutes is not None and wall_minutes >= args.max_train_minutes
            last_step = steps >= args.max_train_steps or out_of_time
            if steps % args.eval_steps == 0 or last_step:
                evaluate()
            if last_step:
                return history
        epoch += 1
    return history


def train_pix2seq(args) -> list[dict]:
    """Runs `examples/train.py` with its defaults for the budget; returns its evaluations."""
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [
            "--output_dir", output_dir,
            "--max_train_steps", str(args.max_train_steps),
            "--eval_steps", str(args.eval_steps),
            "--per_device_train_batch_size", str(args.batch_size),
            "--seed", str(args.seed),
            "--image_size", str(args.canvas),
            "--num_visualizations", "0",
            "--augmentation", args.augmentation,
        ]  # fmt: skip
        if args.coco:
            argv += coco_arguments(args.coco)
        else:
            argv += ["--synthetic_train_size", str(args.synthetic_train_size)]
            argv += ["--synthetic_validation_size", str(args.synthetic_validation_size)]
            argv += ["--synthetic_image_size", str(args.image_size)]
        if args.dataset == "dense":
            argv += ["--synthetic_variant", "dense"]
        if args.max_train_minutes is not None:
            argv += ["--max_train_minutes", str(args.max_train_minutes)]
        if args.num_threads:
            argv += ["--num_threads", str(args.num_threads)]
        pix2seq_train.main(argv)
        results = json.loads((Path(output_dir) / "all_results.json").read_text())
    return [
        {"step": h["step"], "minutes": round(h["train_minutes"], 2), "loss": h["loss"], **{k: h[k] for k in METRIC_KEYS}}
        for h in results["history"]
    ]


def coco_arguments(files: dict) -> list[str]:
    """`examples/train.py`'s options for the COCO jsons and image folder of `real_images.build_coins_dataset`."""
    return [
        "--coco_annotations", files["train_annotations"], "--coco_images", files["images"],
        "--validation_coco_annotations", files["validation_annotations"], "--validation_coco_images", files["images"],
    ]  # fmt: skip


def format_table(report: dict) -> str:
    lines = ["| detector | step | training minutes | mAP | mAP@50 | mAP@75 | mAR@100 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, history in report["detectors"].items():
        for h in history:
            lines.append(
                f"| {name} | {h['step']} | {h['minutes']:.1f} | {h['map']:.3f} | {h['map_50']:.3f} | {h['map_75']:.3f} "
                f"| {h['mar_100']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    splits = None
    data_dir = tempfile.TemporaryDirectory()
    if args.dataset == "coins":
        args.coco = build_coins_dataset(
            data_dir.name, args.coins_train_size, args.coins_validation_size, args.image_size, args.seed
        )
    settings = {key: value for key, value in vars(args).items() if key != "coco"}
    report = {"settings": settings, "threads": torch.get_num_threads(), "detectors": {}}
    for name in args.detectors:
        if name == "pix2seq":
            report["detectors"][name] = train_pix2seq(args)
            continue
        if splits is None and args.coco:
            splits = load_detection_splits(
                coco_annotations=args.coco["train_annotations"],
                coco_images=args.coco["images"],
                validation_coco_annotations=args.coco["validation_annotations"],
                validation_coco_images=args.coco["images"],
            )
        elif splits is None:
            splits = load_detection_splits(
                synthetic_train_size=args.synthetic_train_size,
                synthetic_validation_size=args.synthetic_validation_size,
                synthetic_image_size=args.image_size,
                synthetic_variant="dense" if args.dataset == "dense" else "shapes",
                seed=args.seed,
            )
        report["detectors"][name] = train_baseline(name, args, splits)
    data_dir.cleanup()
    Path(args.output_file).write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"Wrote {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
