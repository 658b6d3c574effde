"""Time of one training step of the default run on the CPU, setting by setting.

Builds what `accelerate launch examples/train.py` trains by default (the `tiny` preset from scratch, the synthetic
shapes at batch 8, 128 px, the recipe from scratch) and times its training step (forward, backward, gradient clipping,
AdamW) on real collated batches with the CPU settings of `examples/train.py` added one at a time:

- `float32`: float32, torch's fused attention kernel (sdpa), AdamW's per-tensor loop (the settings before these);
- `+ fused AdamW`: `torch.optim.AdamW(..., fused=True)`;
- `+ channels-last`: convolution weights in channels-last layout;
- `+ bf16 autocast`: `torch.autocast("cpu", dtype=torch.bfloat16)` (Accelerate's `mixed_precision="bf16"`);
- `+ eager attention`: `train.py`'s default on a CPU with AMX (`training_setup.speed_up_cpu_training`);

and `bf16 autocast alone` for reference. Every other argument is `examples/train.py`'s (data, model, recipe), so
other models and data can be timed the same way. Each configuration is timed once per round, rounds interleaved, and
the median over rounds printed, so that a change in the machine's load hits all of them alike.

    python examples/benchmarks/benchmark_training_step.py  # 3 rounds of 20 steps each, about 2 minutes on 2 cores
    python examples/benchmarks/benchmark_training_step.py --num_threads 2 --rounds 5 --steps 30 --output_file step.json
    python examples/benchmarks/benchmark_training_step.py --synthetic_variant dense --image_size 384
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train as pix2seq_train  # noqa: E402  (examples/train.py)
from pix2seq_hf import training_setup  # noqa: E402
from pix2seq_hf.cli import HelpFormatter, require_at_least_one  # noqa: E402
from pix2seq_hf.data import (  # noqa: E402
    load_detection_splits,
    objects_per_image,
    undecoded_images,
)
from pix2seq_hf.training_options import DataOptions, RecipeOptions  # noqa: E402


# name: (fused AdamW, channels-last, bf16 autocast, eager attention)
CONFIGURATIONS = {
    "float32": (False, False, False, False),
    "+ fused AdamW": (True, False, False, False),
    "+ channels-last": (True, True, False, False),
    "+ bf16 autocast": (True, True, True, False),
    "+ eager attention (train.py's default with AMX)": (True, True, True, True),
    "bf16 autocast alone": (False, False, True, False),
}


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's options, then `examples/train.py`'s (every other argument: data, model, recipe)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " Every other option is examples/train.py's.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: the usable cores).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds (the median is printed).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per configuration and round.")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps before each timing.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per timed step.")
    parser.add_argument("--output_file", default=None, help="Write the timings here (JSON).")
    args, rest = parser.parse_known_args(argv)
    require_at_least_one(parser, args, "rounds", "steps", "batch_size")
    return args, pix2seq_train.parse_args(rest)


def build_trainer(base_model, settings: tuple[bool, bool, bool, bool], train_args, learning_rate, encoder_lr_scale):
    """
    A copy of `base_model` with one configuration's settings and its optimizer (`examples/train.py`'s, from
    `train_args`).

    Returns:
        `step(batch)`, which runs one training step and returns the loss.
    """
    fused, channels_last, bf16, eager = settings
    model = copy.deepcopy(base_model).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if eager:
        model.set_attn_implementation("eager")
    groups = training_setup.optimizer_param_groups(model, learning_rate, train_args.weight_decay, encoder_lr_scale)
    betas = (train_args.adam_beta1, train_args.adam_beta2)
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def step(batch: dict) -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(
                pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def main(argv=None) -> int:
    args, train_args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    data = pix2seq_train.options(DataOptions, train_args)
    splits = load_detection_splits(data, seed=train_args.seed)
    # As examples/train.py: a new model's sequences hold the fullest training image.
    base_model, processor = pix2seq_train.build_model_and_processor(
        train_args, splits.id2label, objects_per_image(splits.train)
    )
    collator = pix2seq_train.build_train_collator(train_args, processor)
    images = undecoded_images(splits.train)
    count = args.warmup_steps + args.steps
    indices = [[(b * args.batch_size + i) % len(images) for i in range(args.batch_size)] for b in range(count)]
    batches = [collator([images[i] for i in batch]) for batch in indices]
    recipe = pix2seq_train.options(RecipeOptions, train_args).resolved(True, bool(train_args.model_name_or_path))
    learning_rate, encoder_lr_scale = recipe.learning_rate, recipe.encoder_lr_scale
    trainers = {
        name: build_trainer(base_model, settings, train_args, learning_rate, encoder_lr_scale)
        for name, settings in CONFIGURATIONS.items()
    }
    timings: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    for round_index in range(args.rounds):
        for name, step in trainers.items():
            for batch in batches[: args.warmup_steps]:
                step(batch)
            start = time.perf_counter()
            for batch in batches[args.warmup_steps :]:
                step(batch)
            timings[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    baseline = statistics.median(timings["float32"])
    print(f"\n| configuration | s per step | steps/s | speed-up over float32 |\n|---|---:|---:|---:|")
    results = {}
    for name, values in timings.items():
        seconds = statistics.median(values)
        results[name] = {"seconds_per_step": seconds, "rounds": values}
        print(f"| {name} | {seconds:.3f} | {1 / seconds:.2f} | {baseline / seconds:.2f}x |")
    if args.output_file:
        report = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps, **results}
        Path(args.output_file).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
