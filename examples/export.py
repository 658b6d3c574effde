"""
Export a Pix2Seq model to ONNX and/or `torch.export` (encoder, first decoder step, cached decoder step), check that
the exported graphs decode the same tokens as PyTorch, time both, and detect objects in images with the exported graphs.

    # export a trained model, check it on 4 images, and detect with onnxruntime
    python examples/export.py --model outputs/pix2seq-synthetic --output_dir exported --check 4 --images img1.png img2.png

    # the speed of the exported path beside PyTorch's, for the paper's R50 size (random weights; speed only)
    python examples/export.py --config_preset r50 --output_dir exported-r50 --check 1 --benchmark 3 --max_new_tokens 100

It writes `{encoder,decoder,decoder_with_past}.onnx` / `.pt2`, `export_config.json`, the processor (so that the folder
preprocesses its own images) and `export_report.json` (export times, token agreement, timings).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from pix2seq_hf.data.images import decode_image, to_rgb
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.export import ExportedPix2Seq, export_onnx, export_programs, save_programs
from pix2seq_hf.presets import PRESETS, get_preset_config, get_preset_image_processor_kwargs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A saved Pix2Seq model (folder or Hub id).")
    source.add_argument(
        "--config_preset", choices=sorted(PRESETS), help="A preset with random weights (to measure speed only)."
    )
    parser.add_argument("--output_dir", required=True, help="Where the exported graphs go.")
    parser.add_argument(
        "--format",
        default="both",
        choices=["onnx", "torch", "both"],
        help="ONNX graphs (onnxruntime), torch.export programs, or both.",
    )
    parser.add_argument("--image_size", type=int, default=None, help="Canvas (default: the processor's).")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Default: the model's (5 * max_objects).")
    parser.add_argument("--check", type=int, default=0, help="Compare the greedy tokens of N random images with PyTorch.")
    parser.add_argument(
        "--benchmark", type=int, default=0, help="Time N detections of one image (fixed length: EOS suppressed)."
    )
    parser.add_argument("--num_threads", type=int, default=None, help="torch and onnxruntime threads.")
    parser.add_argument("--images", nargs="*", default=[], help="Images to detect objects in with the exported graphs.")
    parser.add_argument("--threshold", type=float, default=0.3, help="Score threshold of the printed detections.")
    parser.add_argument("--no_optimize", action="store_true", help="Skip the ONNX graph optimiser (faster export).")
    parser.add_argument("--overwrite", action="store_true", help="Replace graphs already in --output_dir.")
    parser.add_argument(
        "--skip_export", action="store_true", help="Use the graphs already in --output_dir (to check or time them again)."
    )
    parser.add_argument(
        "--trust_torch_export",
        action="store_true",
        help="With --skip_export: load the .pt2 graphs already in --output_dir (they are unpickled, which runs any "
        "code they hold: only for graphs from a source you trust).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (presets) and test images.")
    return parser.parse_args(argv)


def load(args) -> tuple[Pix2SeqForObjectDetection, Pix2SeqProcessor]:
    if args.model:
        model = Pix2SeqForObjectDetection.from_pretrained(args.model)
        processor = Pix2SeqProcessor.from_pretrained(args.model)
    else:
        torch.manual_seed(args.seed)
        model = Pix2SeqForObjectDetection(get_preset_config(args.config_preset))
        image_processor = Pix2SeqImageProcessor(**get_preset_image_processor_kwargs(args.config_preset))
        processor = Pix2SeqProcessor.from_config(model.config, image_processor=image_processor)
    if args.image_size:
        processor.image_processor.size = {"longest_edge": args.image_size}
    return model.eval(), processor


def _timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    formats = ["onnx", "torch"] if args.format == "both" else [args.format]
    suffixes = {"onnx": ".onnx", "torch": ".pt2"}
    existing = [p.name for f in formats for p in output_dir.glob(f"*{suffixes[f]}")]
    if existing and not (args.overwrite or args.skip_export):
        raise FileExistsError(f"{output_dir} already holds {sorted(existing)}; pass --overwrite to replace them.")

    model, processor = load(args)
    image_size = processor.image_processor.size["longest_edge"]
    report = {"image_size": image_size, "parameters": sum(p.numel() for p in model.parameters())}

    if not args.skip_export:
        start = time.perf_counter()
        programs = export_programs(model, image_size)
        report["torch_export_seconds"] = round(time.perf_counter() - start, 2)
        if "torch" in formats:
            save_programs(programs, model, image_size, output_dir)
        if "onnx" in formats:
            start = time.perf_counter()
            export_onnx(model, image_size, output_dir, programs=programs, optimize=not args.no_optimize)
            report["onnx_export_seconds"] = round(time.perf_counter() - start, 2)
        processor.save_pretrained(output_dir)
    runners = {}
    if "torch" in formats:
        # Graphs this run exported are trusted; graphs found in the folder only when the user says so.
        trusted = not args.skip_export or args.trust_torch_export
        runners["torch"] = ExportedPix2Seq.from_torch_export(output_dir, trusted_source=trusted)
    if "onnx" in formats:
        runners["onnx"] = ExportedPix2Seq.from_onnx(output_dir, num_threads=args.num_threads)

    max_new_tokens = args.max_new_tokens or model.generation_config.max_new_tokens
    generator = torch.Generator().manual_seed(args.seed)
    if args.check:
        pixel_values = torch.rand(args.check, model.config.num_channels, image_size, image_size, generator=generator)
        with torch.no_grad():
            reference = model.generate(
                pixel_values, do_sample=False, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                output_logits=True,
            )  # fmt: skip
        report["check"] = {"images": args.check, "tokens": int(reference.sequences.shape[1] - 1)}
        for name, runner in runners.items():
            exported = runner.generate(pixel_values, max_new_tokens=max_new_tokens)
            same = exported.sequences.shape == reference.sequences.shape and torch.equal(
                exported.sequences, reference.sequences
            )
            difference = max((a - b).abs().max().item() for a, b in zip(exported.logits, reference.logits))
            report["check"][name] = {"same_tokens": bool(same), "max_logit_difference": difference}
    if args.benchmark:
        pixel_values = torch.rand(1, model.config.num_channels, image_size, image_size, generator=generator)
        fixed = {"suppress_eos": True, "max_new_tokens": max_new_tokens}

        def pytorch_generate():  # transformers' decoding loop
            with torch.no_grad():
                model.generate(pixel_values, do_sample=False, **fixed)

        def pytorch_detect():  # the model's default detection path (its own static-cache loop)
            with torch.no_grad():
                model.detect(pixel_values, do_sample=False, **fixed)

        timings = {
            "tokens": max_new_tokens,
            "pytorch_generate_seconds": _timed(pytorch_generate, args.benchmark),
            "pytorch_detect_seconds": _timed(pytorch_detect, args.benchmark),
        }
        for name, runner in runners.items():
            timings[f"{name}_seconds"] = _timed(lambda runner=runner: runner.generate(pixel_values, **fixed), args.benchmark)
        timings["threads"] = torch.get_num_threads()
        report["benchmark"] = timings

    if args.images:
        runner = runners.get("onnx") or runners["torch"]
        report["detections"] = {}
        for path in args.images:
            image = to_rgb(decode_image(path, "--images"), "--images")  # as shown: EXIF orientation applied
            inputs = processor(images=image, return_tensors="pt")
            outputs = runner.generate(inputs["pixel_values"], max_new_tokens=max_new_tokens)
            found = processor.post_process_object_detection(
                outputs, threshold=args.threshold, target_sizes=[(image.height, image.width)]
            )[0]
            report["detections"][path] = [
                {"label": model.config.id2label[int(label)], "score": round(float(score), 4), "box": [round(float(v), 1) for v in box]}
                for score, label, box in zip(found["scores"], found["labels"], found["boxes"])
            ]
    (output_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.check and not all(report["check"][name]["same_tokens"] for name in runners):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
