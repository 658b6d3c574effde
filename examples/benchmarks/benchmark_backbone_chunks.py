"""The backbone's time per image on a CPU by image layout, by how many images it reads at once and by the BatchNorms
folded into its convolutions.

`Pix2SeqEncoder.backbone_features` hands the backbone channels-last images on a CPU and, in inference, splits a batch
into chunks of at most `BACKBONE_CHUNK_PIXELS` pixels (one 640 x 640 image) so that the activations stay nearer the
CPU's caches, and folds the BatchNorms after its early convolutions into them (`batch_norm_folding`). This script
times the backbone of a preset (random weights, eval mode) on a batch of random images, through `backbone_features`
with the chunk budget set to 1, 2 and 4 images, to the default and to the whole batch; at the default chunks with no
BatchNorm folded and with every one folded; and with the images as given to the backbone directly (no conversion, no
chunks, no folding), each configuration once per round, rounds interleaved, and prints the median ms per image.

    python examples/benchmarks/benchmark_backbone_chunks.py                 # ResNet-50 at 640 px, 8 images: ~2 minutes
    python examples/benchmarks/benchmark_backbone_chunks.py --preset tiny --image_size 256 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pix2seq_hf.batch_norm_folding as batch_norm_folding
import pix2seq_hf.modeling_pix2seq as modeling_pix2seq
from pix2seq_hf import Pix2SeqForObjectDetection
from pix2seq_hf.cli import HelpFormatter, require_at_least_one
from pix2seq_hf.presets import get_preset_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--preset", default="r50", help="Model preset whose backbone is timed (random weights).")
    parser.add_argument("--image_size", type=int, default=640, help="Side of the square random images, in pixels.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per call.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds (the median is printed).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: the usable cores).")
    parser.add_argument("--output_file", default=None, help="Write the timings here (JSON).")
    args = parser.parse_args(argv)
    require_at_least_one(parser, args, "image_size", "batch_size", "rounds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(get_preset_config(args.preset, use_pretrained_backbone=False)).eval()
    encoder = model.model.encoder
    if encoder.backbone is None:
        raise SystemExit(f"The {args.preset!r} preset has no convolutional backbone (a ViT patch embedding).")
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    pixels = args.image_size * args.image_size
    default = max(1, modeling_pix2seq.BACKBONE_CHUNK_PIXELS // pixels)
    sizes = sorted({1, 2, 4, default, args.batch_size} & set(range(1, args.batch_size + 1)))

    def chunked(per_chunk: int):
        def run():
            budget = modeling_pix2seq.BACKBONE_CHUNK_PIXELS
            modeling_pix2seq.BACKBONE_CHUNK_PIXELS = per_chunk * pixels
            try:
                return encoder.backbone_features(images)
            finally:
                modeling_pix2seq.BACKBONE_CHUNK_PIXELS = budget

        return run

    def folding(min_outputs_per_weight: float):
        def run():
            default_rule = batch_norm_folding.FOLD_MIN_OUTPUTS_PER_WEIGHT
            batch_norm_folding.FOLD_MIN_OUTPUTS_PER_WEIGHT = min_outputs_per_weight
            try:
                return encoder.backbone_features(images)
            finally:
                batch_norm_folding.FOLD_MIN_OUTPUTS_PER_WEIGHT = default_rule

        return run

    configs = {"images as given, whole batch": lambda: encoder.backbone(images, return_dict=True).feature_maps[-1]}
    configs.update({f"channels-last, {size} per chunk": chunked(size) for size in sizes})
    per_default_chunk = min(default, args.batch_size)
    configs[f"channels-last, {per_default_chunk} per chunk, no BatchNorm folded"] = folding(float("inf"))
    configs[f"channels-last, {per_default_chunk} per chunk, every BatchNorm folded"] = folding(0)
    timings = {name: [] for name in configs}
    with torch.inference_mode():
        for run in configs.values():
            run()  # warm-up
        for _ in range(args.rounds):
            for name, run in configs.items():
                start = time.perf_counter()
                run()
                timings[name].append((time.perf_counter() - start) / args.batch_size)
    print(
        f"{args.preset} backbone, {args.image_size} px, {args.batch_size} images, {torch.get_num_threads()} threads; "
        f"the default budget reads {min(default, args.batch_size)} per chunk"
    )
    print("\n| configuration | ms per image |\n|---|---:|")
    results = {}
    for name, values in timings.items():
        results[name] = {"ms_per_image": 1000 * statistics.median(values), "rounds_ms": [1000 * v for v in values]}
        print(f"| {name} | {results[name]['ms_per_image']:.1f} |")
    if args.output_file:
        with open(args.output_file, "w") as handle:
            json.dump({"settings": vars(args), "default_per_chunk": default, "results": results}, handle, indent=2)
        print(f"\nWrote {args.output_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
