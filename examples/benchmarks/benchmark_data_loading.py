"""
Start-up cost of COCO-style annotations at Objects365's scale: the time until the training split is ready and the
peak resident memory of each process, the first time (the json is read, checked and written to the annotation cache)
and the following times (the cache is mapped), for 1 and 2 processes started together on one machine.

The jsons are generated with Objects365's shape: N images with about 15 boxes each (Poisson), 365 categories, no image
files (the split is read with `check_images="none"`).

    python examples/benchmarks/benchmark_data_loading.py --num_images 10000 100000
    python examples/benchmarks/benchmark_data_loading.py --objects365_size      # adds 1.7M images (3.4 GB of json)
    python examples/benchmarks/benchmark_data_loading.py --num_images 1700000 --first_processes 1
    python examples/benchmarks/benchmark_data_loading.py --num_images 200 --processes 1 2 --output_file loading.json

Every measurement runs in a fresh Python process (so that its peak memory is its own); the memory of a process that
only imports the package is printed too, as the baseline that loading adds to.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from pix2seq_hf.cli import HelpFormatter


OBJECTS365_IMAGES = 1_700_000
OBJECTS365_CATEGORIES = 365
ANNOTATION_FORMAT = (
    '{"id": %d, "image_id": %d, "category_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], "area": %.2f, "iscrowd": 0}'
)


def write_objects365_like_json(path: str, num_images: int, boxes_per_image: float = 15.0, seed: int = 0) -> int:
    """
    Writes a COCO detection json of Objects365's shape: `num_images` images of 640-1333 px, a Poisson number of boxes
    each (mean `boxes_per_image`) inside their image, 365 categories. Written in chunks, so memory stays small.

    Returns:
        the number of annotations.
    """
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": f"category_{i + 1}", "supercategory": "object"} for i in range(OBJECTS365_CATEGORIES)]
    num_annotations = 0
    chunk = 20_000

    def image_sizes(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The same sizes in both passes (images, then their boxes): one generator per chunk.
        ids = np.arange(start, min(start + chunk, num_images)) + 1
        sizes = np.random.default_rng([seed, start])
        return ids, sizes.integers(640, 1334, size=len(ids)), sizes.integers(480, 1001, size=len(ids))

    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"info": {"description": "generated, Objects365-shaped"}, "images": [')
        for start in range(0, num_images, chunk):
            ids, widths, heights = image_sizes(start)
            records = [
                {"id": int(i), "file_name": f"objects365_v2_{int(i):08d}.jpg", "width": int(w), "height": int(h)}
                for i, w, h in zip(ids, widths, heights)
            ]
            handle.write(("," if start else "") + json.dumps(records)[1:-1])
        handle.write('], "annotations": [')
        first = True
        for start in range(0, num_images, chunk):
            ids, widths, heights = image_sizes(start)
            counts = rng.poisson(boxes_per_image, size=len(ids))
            image_ids = np.repeat(ids, counts)
            w_img, h_img = np.repeat(widths, counts), np.repeat(heights, counts)
            x = rng.uniform(0, 0.7, size=len(image_ids)) * w_img
            y = rng.uniform(0, 0.7, size=len(image_ids)) * h_img
            w = rng.uniform(0.02, 0.3, size=len(image_ids)) * w_img
            h = rng.uniform(0.02, 0.3, size=len(image_ids)) * h_img
            labels = rng.integers(1, OBJECTS365_CATEGORIES + 1, size=len(image_ids))
            # One format per record over plain Python lists: 25M records are written in minutes, not an hour.
            columns = (
                range(num_annotations + 1, num_annotations + len(image_ids) + 1),
                image_ids.tolist(),
                labels.tolist(),
                *(values.tolist() for values in (x, y, w, h, w * h)),
            )
            num_annotations += len(image_ids)
            if len(image_ids):
                handle.write(("" if first else ",") + ",".join(map(ANNOTATION_FORMAT.__mod__, zip(*columns))))
                first = False
        handle.write('], "categories": ' + json.dumps(categories) + "}")
    return num_annotations


def peak_rss_mib() -> float:
    """Peak resident memory of this process, in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def worker(annotation_file: str, cache_dir: str | None) -> None:
    """One process: loads the training split (or only imports, without `annotation_file`) and prints a json line."""
    started = time.perf_counter()
    from pix2seq_hf.data import load_detection_splits

    imported = time.perf_counter()
    result = {"import_s": imported - started}
    if annotation_file:
        splits = load_detection_splits(
            coco_annotations=annotation_file,
            coco_images=os.path.dirname(annotation_file),
            check_images="none",
            validation_split="none",
            annotation_cache_dir=cache_dir,
        )
        # Read what training reads first: a random example's objects (the images are not there).
        example = splits.train.select_columns(["image_id", "objects"])[len(splits.train) // 2]
        result.update(
            startup_s=time.perf_counter() - imported,
            images=len(splits.train),
            objects=splits.stats["train"]["objects"],
            example_objects=len(example["objects"]["bbox"]),
        )
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result), flush=True)


def run_processes(count: int, annotation_file: str, cache_dir: str | None) -> list[dict]:
    """Starts `count` worker processes together and returns their results."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", annotation_file or "", "--cache_dir", cache_dir or ""]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    results = []
    for process in processes:
        output, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"A loading process failed with exit code {process.returncode}.")
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--num_images", type=int, nargs="+", default=[10_000, 100_000], help="Images of each generated json."
    )
    parser.add_argument("--objects365_size", action="store_true", help=f"Also {OBJECTS365_IMAGES} images.")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="Processes started together.")
    parser.add_argument(
        "--first_processes",
        type=int,
        nargs="+",
        default=None,
        help="Measure the first start-up (the build) only for these counts of --processes; the others measure the "
        "cached start-up on the cache the previous count built (the build's cost does not depend on how many "
        "processes wait for it; at 1.7M images it takes tens of minutes). Default: every count.",
    )
    parser.add_argument("--work_dir", default=None, help="Where the jsons and caches go (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated jsons and caches.")
    parser.add_argument("--output_file", default=None, help="Also write the results as json.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.cache_dir or None)
        return {}

    sizes = list(args.num_images) + ([OBJECTS365_IMAGES] if args.objects365_size else [])
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="pix2seq-loading-")
    os.makedirs(work_dir, exist_ok=True)
    baseline = run_processes(1, "", None)[0]
    print(f"baseline (import only): {baseline['peak_rss_mib']:.0f} MiB peak resident, import {baseline['import_s']:.1f} s")
    results = {"baseline_peak_rss_mib": baseline["peak_rss_mib"], "runs": []}
    header = f"{'images':>9} {'boxes':>10} {'json MB':>8} {'procs':>5} {'first s':>8} {'cached s':>9} {'first MiB':>10} {'cached MiB':>10}"
    rows = []
    try:
        for num_images in sizes:
            annotation_file = os.path.join(work_dir, f"objects365_like_{num_images}.json")
            started = time.perf_counter()
            num_boxes = write_objects365_like_json(annotation_file, num_images)
            size_mb = os.path.getsize(annotation_file) / 1e6
            print(f"{num_images} images, {num_boxes} boxes: json of {size_mb:.0f} MB written in {time.perf_counter() - started:.0f} s")
            built = None  # the cache of the last first start-up, for the counts measured cached only
            for count in args.processes:
                cache_dir = os.path.join(work_dir, f"cache_{num_images}_{count}")
                shutil.rmtree(cache_dir, ignore_errors=True)
                first = None
                if built is None or args.first_processes is None or count in args.first_processes:
                    first = run_processes(count, annotation_file, cache_dir)
                    built = cache_dir
                cached = run_processes(count, annotation_file, built)
                run = {
                    "images": num_images,
                    "boxes": num_boxes,
                    "json_mb": size_mb,
                    "processes": count,
                    # The slowest process sets when training can start.
                    "first_startup_s": max(r["startup_s"] for r in first) if first else None,
                    "cached_startup_s": max(r["startup_s"] for r in cached),
                    "first_peak_rss_mib": [r["peak_rss_mib"] for r in first] if first else None,
                    "cached_peak_rss_mib": [r["peak_rss_mib"] for r in cached],
                }
                results["runs"].append(run)
                first_s = f"{run['first_startup_s']:>8.1f}" if first else f"{'-':>8}"
                first_mib = f"{max(run['first_peak_rss_mib']):>10.0f}" if first else f"{'-':>10}"
                rows.append(
                    f"{num_images:>9} {num_boxes:>10} {size_mb:>8.0f} {count:>5} {first_s} "
                    f"{run['cached_startup_s']:>9.1f} {first_mib} {max(run['cached_peak_rss_mib']):>10.0f}"
                )
                print(rows[-1], flush=True)
            if not args.keep:
                os.remove(annotation_file)
                for count in args.processes:
                    shutil.rmtree(os.path.join(work_dir, f"cache_{num_images}_{count}"), ignore_errors=True)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print("\nStart-up (the slowest process) and peak resident memory per process (the largest):")
    print(header)
    print("\n".join(rows))
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
