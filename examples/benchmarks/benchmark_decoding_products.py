"""Decoding speed with the decoder's products whole or split into column blocks, for several decoder sizes.

A decoding step multiplies one row per sequence by each projection's weight. On a CPU, float32 decoders with at least
8 MB of decoding weights split each product by output columns into blocks of 16 or more, run as one batched product
(`decoding_column_blocks` in `pix2seq_hf/modeling_pix2seq.py`); smaller decoders and bf16 keep whole products. This
script times the decoder alone (encoder outputs given, random weights, the ResNet-50 preset with the decoder sizes of
`--decoders`) decoding exactly `5 * --objects` tokens with top-p 0.4, with the products whole and in blocks of each
width of `--widths` (forced, whatever the decoder's size), each configuration once per round, rounds interleaved, and
prints the median ms per token.

    python examples/benchmarks/benchmark_decoding_products.py                       # about 2 minutes on 2 cores
    python examples/benchmarks/benchmark_decoding_products.py --decoders 256x6 --widths 4 8 16 32 64 --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pix2seq_hf.modeling_pix2seq as modeling_pix2seq
from pix2seq_hf import Pix2SeqForObjectDetection
from pix2seq_hf.cli import HelpFormatter, require_at_least_one
from pix2seq_hf.presets import get_preset_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "--decoders",
        nargs="+",
        default=["128x2", "128x6", "256x2", "256x6"],
        help="Decoder sizes as WIDTHxLAYERS (FFN 4 x width, the preset's 3000-token vocabulary).",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[16], help="Block widths (output columns) to time.")
    parser.add_argument("--objects", type=int, default=40, help="Objects decoded per image (5 tokens each).")
    parser.add_argument("--batch_size", type=int, default=1, help="Images decoded together.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (the median is printed).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: the usable cores).")
    parser.add_argument("--output_file", default=None, help="Write the timings here (JSON).")
    args = parser.parse_args(argv)
    for text in args.decoders:
        width, _, layers = text.partition("x")
        if not (width.isdigit() and layers.isdigit()):
            parser.error(f"--decoders takes WIDTHxLAYERS such as 256x6, got {text!r}")
    require_at_least_one(parser, args, "objects", "batch_size", "rounds")
    if min(args.widths) < 1:
        parser.error(f"--widths must be at least 1, got {args.widths}")
    return args


def blocks_of_width(width: int):
    """A `decoding_column_blocks` that splits every float32 product into the most blocks of at least `width`
    columns, whatever the decoder's size (`None`: whole products)."""

    def column_blocks(weight: torch.Tensor, config) -> int:
        if width is None or weight.dtype != torch.float32:
            return 1
        return modeling_pix2seq.column_blocks(weight.shape[0], width)

    return column_blocks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    variants = {"whole": None, **{f"{width} columns": width for width in args.widths}}
    column_blocks = modeling_pix2seq.decoding_column_blocks
    results = {}
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {5 * args.objects} tokens per image")
    print("\n| decoder | decoding weights (MB) | " + " | ".join(variants) + " |")
    print("|---|---:|" + "---:|" * len(variants))
    try:
        for text in args.decoders:
            width, layers = (int(part) for part in text.split("x"))
            torch.manual_seed(0)
            config = get_preset_config(
                "r50",
                use_pretrained_backbone=False,
                decoder_hidden_size=width,
                decoder_ffn_dim=4 * width,
                decoder_layers=layers,
                encoder_layers=1,
            )
            model = Pix2SeqForObjectDetection(config).eval()
            pixel_values = torch.randn(args.batch_size, 3, 640, 640, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                encoder_outputs = model.get_encoder()(pixel_values)

            def decode() -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    model.generate(
                        pixel_values=pixel_values,
                        encoder_outputs=encoder_outputs,
                        top_p=0.4,
                        min_objects=args.objects,
                        max_new_tokens=5 * args.objects,
                    )
                return (time.perf_counter() - start) / (5 * args.objects) * 1000

            timings = {name: [] for name in variants}
            for round_index in range(args.rounds + 1):  # the first round warms up
                for name, block_width in variants.items():
                    modeling_pix2seq.decoding_column_blocks = blocks_of_width(block_width)
                    milliseconds = decode()
                    if round_index:
                        timings[name].append(milliseconds)
            megabytes = modeling_pix2seq.decoding_weight_bytes(config) / 1e6
            medians = {name: statistics.median(values) for name, values in timings.items()}
            results[text] = {"decoding_weight_mb": megabytes, "ms_per_token": medians, "rounds": timings}
            print(f"| {text} | {megabytes:.1f} | " + " | ".join(f"{value:.2f}" for value in medians.values()) + " |")
    finally:
        modeling_pix2seq.decoding_column_blocks = column_blocks
    if args.output_file:
        settings = {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
        with open(args.output_file, "w") as handle:
            json.dump({"settings": settings, "results": results}, handle, indent=2)
        print(f"\nWrote {args.output_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
