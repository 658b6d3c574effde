"""Speed and memory of Pix2Seq detection and training, side by side with transformers' DETR, in one run.

    python examples/benchmarks/benchmark.py               # full run (CPU; CUDA too when there is one), ~11 min, 2 cores
    python examples/benchmarks/benchmark.py --quick        # batch 1 only, one repeat, no compile: ~1-2 minutes
    python examples/benchmarks/benchmark.py --early_stop_model outputs/pix2seq-synthetic  # + early stop's effect on mAP
    python examples/benchmarks/benchmark.py --early_stop_model outputs/pix2seq-synthetic --skip_speed   # that alone
    python examples/benchmarks/benchmark.py --draft outputs/pix2seq-synthetic --skip_speed  # draft="auxiliary"

Both models have the paper's R50 sizes with random weights: timm ResNet-50, a 6-layer encoder and a 6-layer decoder of
width 256 with 8 heads and FFN 1024 (DETR's FFN follows `--detr_ffn_dim`, by default Pix2Seq's 1024 so that the two
transformers are the same size), 100 DETR queries, images of `--image_size` (640) pixels. Pix2Seq decodes exactly
`5 * K` tokens for K in `--objects` (EOS is masked until K objects are written: `min_objects=K`,
`max_new_tokens=5*K`), with the model's sampling (top-p 0.4), so that runs are comparable.

Measured, each as the median over `--repeats` interleaved rounds (every configuration once per round, so that changes
in the machine's load hit all of them alike):

- detection latency per image, the first call's latency and images/s at each batch size: DETR's forward; Pix2Seq's
  `detect` (= `generate` + reading the detections) as a user calls it ("generate": the default static-cache loop),
  with transformers' loop ("stock": `static_decoding=False`, dynamic KV cache), compiled (`--compile`, the default:
  `generate(..., compile_config=CompileConfig(fullgraph=True, dynamic=False))`), and without KV cache
  (`use_cache=False`, batch 1); Pix2Seq's encoder alone (batch 1);
- the decoder alone (encoder outputs given): ms per step and tokens/s of each loop, also transformers' own static-cache
  route (`cache_implementation="static"`, eager and compiled) and eager attention instead of sdpa, and a batch whose
  images end at different lengths, with and without dropping finished images;
- where a decoded token's time goes (torch profiler over the default loop: linear layers, attention, the rest; per
  layer; the compiled step against the loop around it), against the floor set by the bytes a step must read and the
  machine's measured memory bandwidth (`--skip_profile` to leave it out);
- a training step (forward + backward + AdamW step) at `--train_batch_size` for both models: images/s;
- the peak memory of each (CPU: growth of the resident set, from `/proc/self/status` `VmHWM` after resetting it;
  CUDA: `max_memory_allocated`), and whether the KV cache of 100 objects more than doubles the inference peak.

Prints a table and writes everything, with the settings, versions and machine load, to `--output` (JSON).

`--omp_wait_policy PASSIVE` (sets `OMP_WAIT_POLICY` before torch loads OpenMP) is for machines whose cores are all
busy with other work: there, with OpenMP's default spinning, each multi-threaded operator can wait a scheduler tick for
a descheduled worker (a decoding step measured 145 ms instead of 6 ms with 2 threads on 2 cores shared with three
other processes). With a core to spare the default is faster (passive waiting costs a thread wake-up per operator).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Read by OpenMP when torch loads it, so it must be set before the import.
_policy = argparse.ArgumentParser(add_help=False)
_policy.add_argument("--omp_wait_policy", choices=["PASSIVE", "ACTIVE"], default=None)
if _policy.parse_known_args()[0].omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = _policy.parse_known_args()[0].omp_wait_policy

import torch  # noqa: E402
from timm.utils.model import freeze_batch_norm_2d  # noqa: E402

import transformers  # noqa: E402
from transformers import CompileConfig, DetrConfig, DetrForObjectDetection  # noqa: E402
from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402

import pix2seq_hf  # noqa: E402, F401
from pix2seq_hf.cli import HelpFormatter  # noqa: E402
from pix2seq_hf.configuration_pix2seq import TOKENS_PER_OBJECT  # noqa: E402
from pix2seq_hf.fast_generation import Pix2SeqStaticDecoding  # noqa: E402
from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection, shift_tokens_right  # noqa: E402
from pix2seq_hf.presets import get_preset_config  # noqa: E402


logger = logging.getLogger("benchmark")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CPU, then CUDA if there is one."
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--image_size", type=int, default=640, help="Canvas of the random test images, in pixels.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="Detection batch sizes to time.")
    parser.add_argument("--objects", type=int, nargs="+", default=[10, 100], help="Objects decoded per image.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds (median), after one warm-up round.")
    parser.add_argument("--large_batch_repeats", type=int, default=2, help="Timed rounds for batch sizes > 1.")
    parser.add_argument("--train_batch_size", type=int, default=4, help="Images per timed training step.")
    parser.add_argument("--train_steps", type=int, default=2, help="Timed training steps (median), after one warm-up.")
    parser.add_argument("--detr_ffn_dim", type=int, default=1024, help="DETR's FFN width (its own default is 2048).")
    parser.add_argument("--detr_targets", type=int, default=10, help="Ground-truth objects per image for DETR's loss.")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="Time the compiled loop too."
    )
    parser.add_argument("--uncached_objects", type=int, default=None, help="K of the no-cache run (default: max K).")
    parser.add_argument("--skip_training", action="store_true", help="No training-step measurement.")
    parser.add_argument("--skip_profile", action="store_true", help="No torch-profiler breakdown of a token.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Only the per-token breakdown of the default loop (batch 1, K = the largest of --objects; with --bf16 "
        "also the bf16 model), after timing it over --repeats rounds: a table of ms and operators per token by kind.",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="Also time the model with bfloat16 weights (`model.to(torch.bfloat16)`)."
    )
    parser.add_argument(
        "--first_call",
        action="store_true",
        help="Only the first call of `detect` in a new process against a warm call (batch 1, each K of --objects): the "
        "default loop, and with --compile the compiled one, in two new processes (the first compiles and fills "
        "torch's on-disk caches, the second starts from them).",
    )
    parser.add_argument("--first_call_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip_speed", action="store_true", help="Only the early-stop and draft measurements.")
    parser.add_argument("--quick", action="store_true", help="Batch 1, one round, no compile, uncached at min K.")
    parser.add_argument(
        "--early_stop_model", default=None, help="A trained model folder: measure early stop's effect on mAP."
    )
    parser.add_argument("--early_stop_settings", default="2:0.05,3:0.1,3:0.3", help="patience:threshold pairs.")
    parser.add_argument("--early_stop_images", type=int, default=200, help="Synthetic images to evaluate on.")
    parser.add_argument(
        "--early_stop_split",
        default="validation",
        choices=["validation", "train"],
        help="Synthetic split to evaluate on ('train' with `--early_stop_seed 0 --early_stop_images 32`: the images "
        "of `examples/benchmarks/overfit_check.py`).",
    )
    parser.add_argument("--early_stop_seed", type=int, default=42, help="Seed of the synthetic set (train.py: 42).")
    parser.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="A trained model folder whose model has an auxiliary dense head: time `detect` at batch 1 on its "
        "synthetic validation images (--early_stop_images, --early_stop_seed) with and without `draft='auxiliary'` "
        "(speculative decoding), greedy and with the model's sampling, and count decoder passes per image.",
    )
    parser.add_argument(
        "--draft_objects_per_pass",
        type=int,
        nargs="*",
        default=[],
        help="With --draft, also time drafters of these `objects_per_pass` (besides the default of each mode).",
    )
    parser.add_argument(
        "--draft_batch_size", type=int, default=1, help="With --draft, images per `detect` call (default: 1)."
    )
    parser.add_argument("--omp_wait_policy", choices=["PASSIVE", "ACTIVE"], default=None,
                        help="OpenMP waiting (see above); default: OpenMP's own.")
    parser.add_argument("--output", default="benchmark_results.json", help="Where the results go (JSON).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and images.")
    args = parser.parse_args(argv)
    if args.profile or args.first_call:
        args.skip_training = True
    if args.quick:
        args.batch_sizes, args.repeats, args.train_steps, args.compile = [1], 1, 1, False
        args.uncached_objects = args.uncached_objects or min(args.objects)
    args.uncached_objects = args.uncached_objects or max(args.objects)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> None:
    """Hands freed heap memory back to the OS (glibc), so that the resident set starts from what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"No {field} in /proc/self/status")


class PeakMemory:
    """
    Peak memory added by the code inside the `with` block, in MiB (`self.mib`).

    CUDA: `max_memory_allocated` minus what was allocated before. CPU: the resident set's high-water mark (`VmHWM`,
    reset by writing 5 to `/proc/self/clear_refs`) minus the resident set before, after freeing what can be freed;
    `None` where `/proc` does not allow it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.start = _status_kib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            self.mib = (_status_kib("VmHWM") - self.start) / 1024
        return False


def timed(fn, device: torch.device, memory: bool = False) -> tuple[float, float | None]:
    """Runs `fn()` once; returns (seconds, peak MiB or None)."""
    if memory:
        with PeakMemory(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds = time.perf_counter() - start
        return seconds, peak.mib
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start, None


def interleaved(configs: dict, device: torch.device, rounds: int, warmup) -> dict:
    """
    Times every configuration once per round, in the same order each round, after a warm-up call of the
    configurations in `warmup` (`True`: all of them; a collection of names; `False`: none).

    Returns:
        `{name: {"seconds": [...], "median_s": float, "peak_mib": float | None, "warmup_s": float}}`; the peak memory
        is taken in the first timed round; `warmup_s` (the first call: compilation included) for warmed-up ones.
    """
    results = {name: {"seconds": [], "peak_mib": None} for name in configs}
    for name, fn in configs.items():
        if warmup is True or (warmup and name in warmup):
            logger.info("warm-up: %s", name)
            results[name]["warmup_s"] = timed(fn, device)[0]
    for round_index in range(rounds):
        for name, fn in configs.items():
            seconds, peak = timed(fn, device, memory=round_index == 0)
            results[name]["seconds"].append(seconds)
            if round_index == 0:
                results[name]["peak_mib"] = peak
            logger.info("round %d: %-45s %.3f s", round_index + 1, name, seconds)
    for entry in results.values():
        entry["median_s"] = statistics.median(entry["seconds"])
    return results


def read_bandwidth_gbs(device: torch.device, mib: int = 256) -> float:
    """Read bandwidth (GB/s, best of 5) summing a buffer of `mib` MiB: the bound of a step that streams its weights."""
    source = torch.empty(mib * 2**18, dtype=torch.float32, device=device).uniform_()
    best = float("inf")
    for _ in range(5):
        seconds, _ = timed(lambda: source.sum(), device)
        best = min(best, seconds)
    return source.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------------


def build_models(args, device):
    torch.manual_seed(args.seed)
    pix2seq = Pix2SeqForObjectDetection(get_preset_config("r50", use_pretrained_backbone=False)).to(device).eval()
    pix2seq_config = pix2seq.config
    detr_config = DetrConfig(
        encoder_layers=pix2seq_config.encoder_layers,
        decoder_layers=pix2seq_config.decoder_layers,
        d_model=pix2seq_config.encoder_hidden_size,
        encoder_attention_heads=pix2seq_config.encoder_attention_heads,
        decoder_attention_heads=pix2seq_config.decoder_attention_heads,
        encoder_ffn_dim=args.detr_ffn_dim,
        decoder_ffn_dim=args.detr_ffn_dim,
        num_queries=100,
        num_labels=pix2seq_config.num_classes,
    )
    detr = DetrForObjectDetection(detr_config).to(device).eval()
    return pix2seq, detr


def count_parameters(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def pix2seq_training_batch(config, batch_size: int, device, generator) -> dict:
    """Random but well-formed sequences of `max_objects` objects (the length sequence augmentation always gives)."""
    layout = config.token_layout
    num_objects = config.max_objects
    coordinates = torch.randint(
        layout.coord_token_offset, layout.coord_token_end, (batch_size, num_objects, 4), generator=generator
    )
    classes = torch.randint(
        layout.class_token_offset, layout.class_token_end, (batch_size, num_objects, 1), generator=generator
    )
    labels = torch.cat([coordinates, classes], dim=-1).view(batch_size, TOKENS_PER_OBJECT * num_objects)
    labels = torch.cat([labels, torch.full((batch_size, 1), layout.eos_token_id)], dim=1)
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    return {"labels": labels.to(device), "decoder_input_ids": decoder_input_ids.to(device)}


def detr_training_labels(batch_size: int, num_targets: int, num_labels: int, device, generator) -> list[dict]:
    labels = []
    for _ in range(batch_size):
        centers = torch.rand(num_targets, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(num_targets, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, num_labels, (num_targets,), generator=generator).to(device),
                "boxes": torch.cat([centers, sizes], dim=1).to(device),
            }
        )
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


# The kinds of operator a decoded token's time is split into (`token_breakdown`).
TOKEN_CATEGORIES = (
    "linear layers",
    "attention",
    "norms and GELU",
    "other layer ops (residuals, cache writes, embeddings)",
    "logits processors (grammar, top-p)",
    "sampling",
    "loop bookkeeping (stopping criteria, token writes)",
)
_LINEAR_OPS = {"aten::linear", "aten::addmm", "aten::baddbmm", "aten::mm", "aten::matmul"}
_ATTENTION_OPS = {"aten::scaled_dot_product_attention", "aten::bmm", "aten::_softmax", "aten::softmax"}
_NORM_OPS = {"aten::layer_norm", "aten::native_layer_norm", "aten::gelu"}
_SAMPLING_OPS = {"aten::softmax", "aten::_softmax", "aten::multinomial", "aten::argmax"}


DECODER_STEP_RANGE, PROCESSORS_RANGE = "pix2seq decoder step", "pix2seq logits processors"


class _LabelledProcessor:
    """A logits processor called inside a profiler range (`PROCESSORS_RANGE`)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, input_ids, scores):
        with torch.profiler.record_function(PROCESSORS_RANGE):
            return self.processor(input_ids, scores)


@contextlib.contextmanager
def labelled_decoding(model):
    """
    Inside it, the static loop's decoder steps and `model`'s logits processors run inside profiler ranges
    (`DECODER_STEP_RANGE`, `PROCESSORS_RANGE`), which `token_breakdown` reads.
    """
    import pix2seq_hf.fast_generation as fast_generation
    from transformers.generation.logits_process import LogitsProcessorList

    decoder_step = fast_generation.decoder_step
    get_logits_processor = model._get_logits_processor

    def labelled_step(*args):
        with torch.profiler.record_function(DECODER_STEP_RANGE):
            return decoder_step(*args)

    def labelled_processors(*args, **kwargs):
        return LogitsProcessorList(_LabelledProcessor(p) for p in get_logits_processor(*args, **kwargs))

    fast_generation.decoder_step = labelled_step
    model._get_logits_processor = labelled_processors
    try:
        yield
    finally:
        fast_generation.decoder_step = decoder_step
        del model._get_logits_processor


def token_breakdown(prof, steps: int, vocab_size: int) -> dict:
    """
    Splits a decoding run profiled under `labelled_decoding` into `TOKEN_CATEGORIES`: every outermost aten operator
    (with the time of the operators it calls) goes to the logits processors when called in their range, by its name
    to the linear layers, attention, norms and GELU or the layers' other operators when called in a decoder step,
    else to the sampling (softmax, multinomial, argmax) or the loop's bookkeeping (stopping criteria, token writes).

    Returns:
        `{"categories": {name: {"us": self time per token, "ops": operators per token}}, "lm_head_us": ...}`.
    """
    categories = {name: {"us": 0.0, "ops": 0.0} for name in TOKEN_CATEGORIES}
    lm_head_us = 0.0
    for event in prof.events():
        name = event.name
        if not name.startswith("aten::"):
            continue
        ranges, parent = [], event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            ranges.append(parent.name)
            parent = parent.cpu_parent
        if parent is not None:
            continue  # called by another aten operator, whose time includes it
        if PROCESSORS_RANGE in ranges:
            category = "logits processors (grammar, top-p)"
        elif DECODER_STEP_RANGE in ranges:
            if name in _LINEAR_OPS:
                category = "linear layers"
                if any(vocab_size in shape for shape in (event.input_shapes or []) if isinstance(shape, list)):
                    lm_head_us += event.cpu_time_total
            elif name in _ATTENTION_OPS or "attention" in name:
                category = "attention"
            elif name in _NORM_OPS:
                category = "norms and GELU"
            else:
                category = "other layer ops (residuals, cache writes, embeddings)"
        elif name in _SAMPLING_OPS:
            category = "sampling"
        else:
            category = "loop bookkeeping (stopping criteria, token writes)"
        categories[category]["us"] += event.cpu_time_total / steps
        categories[category]["ops"] += 1 / steps
    return {"categories": categories, "lm_head_us": lm_head_us / steps}


class Runner:
    def __init__(self, args, device: torch.device, pix2seq, detr):
        self.args = args
        self.device = device
        self.pix2seq = pix2seq
        self.detr = detr
        # `--bf16`: the same model with bfloat16 weights (`model.to(torch.bfloat16)`), for the "bf16" loops.
        self.pix2seq_bf16 = copy.deepcopy(pix2seq).to(torch.bfloat16) if args.bf16 else None
        # DETR with bf16 weights too, so that the bf16 ratio compares models run with the same speed settings.
        self.detr_bf16 = copy.deepcopy(detr).to(torch.bfloat16) if args.bf16 else None
        self.autocast_dtype = None
        if device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # On CPU transformers compiles nothing unless asked: a `compile_config` is the ask.
        compile_config = CompileConfig(fullgraph=True, dynamic=False)
        if device.type != "cuda":
            compile_config._compile_all_devices = True  # for transformers' own static route
        self.loops = {
            # `generate` as a user calls it: nothing extra (the static-cache loop, eager on CPU).
            "generate": {},
            "generate bf16": {},
            "compiled": {"compile_config": compile_config},
            "stock": {"static_decoding": False},
            "stock eager attention": {"static_decoding": False},
            "transformers static cache": {"static_decoding": False, "cache_implementation": "static"},
            "transformers static cache compiled": {
                "static_decoding": False, "cache_implementation": "static", "compile_config": compile_config},
            "static, finished rows kept": {"custom_generate": Pix2SeqStaticDecoding(drop_finished=False)},
            "uncached": {"use_cache": False},
        }

    def autocast(self, loop: str | None = None):
        if self.autocast_dtype is None or (loop is not None and loop.endswith("bf16")):
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def model_for(self, loop: str):
        """The Pix2Seq model a loop runs: the bf16 copy for the "bf16" loops, else the float32 model."""
        if loop.endswith("bf16"):
            if self.pix2seq_bf16 is None:
                raise ValueError(f"The {loop!r} loop needs `--bf16`.")
            return self.pix2seq_bf16
        return self.pix2seq

    def _loop_kwargs(self, loop: str) -> dict:
        """`generate` arguments of a decoding loop (`self.loops`)."""
        if loop not in self.loops:
            raise ValueError(f"Unknown loop {loop!r}")
        return dict(self.loops[loop])

    @contextlib.contextmanager
    def _attention(self, loop: str):
        if loop != "stock eager attention":
            yield
            return
        self.pix2seq.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.pix2seq.set_attn_implementation("sdpa")

    def detect(self, pixel_values, num_objects: int, loop: str):
        kwargs = {
            "max_new_tokens": TOKENS_PER_OBJECT * num_objects,
            "min_objects": num_objects,
            **self._loop_kwargs(loop),
        }
        with torch.inference_mode(), self.autocast(loop), self._attention(loop):
            output = self.model_for(loop).detect(pixel_values, **kwargs)
        if output.sequences.shape[1] != 1 + TOKENS_PER_OBJECT * num_objects:
            raise RuntimeError(
                f"Expected {TOKENS_PER_OBJECT * num_objects} tokens, got {output.sequences.shape[1] - 1}."
            )
        return output

    def decode(self, encoder_hidden_states, num_objects: int, loop: str, **kwargs):
        """The decoder alone: `generate` from given encoder outputs, exactly `5 * num_objects` tokens unless
        `kwargs` say otherwise."""
        kwargs = {
            "max_new_tokens": TOKENS_PER_OBJECT * num_objects,
            "min_objects": num_objects,
            **kwargs,
            **self._loop_kwargs(loop),
        }
        model = self.model_for(loop)
        with torch.inference_mode(), self.autocast(loop), self._attention(loop):
            output = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states.to(model.dtype)), **kwargs
            )
        if "logits_processor" not in kwargs and output.sequences.shape[1] != 1 + TOKENS_PER_OBJECT * num_objects:
            raise RuntimeError(
                f"Expected {TOKENS_PER_OBJECT * num_objects} tokens, got {output.sequences.shape[1] - 1}."
            )
        return output

    def encode(self, pixel_values):
        with torch.inference_mode(), self.autocast():
            return self.pix2seq.model.encoder(pixel_values).last_hidden_state

    def detr_forward(self, pixel_values, bf16: bool = False):
        if bf16:
            with torch.inference_mode():
                return self.detr_bf16(pixel_values=pixel_values.to(torch.bfloat16))
        with torch.inference_mode(), self.autocast():
            return self.detr(pixel_values=pixel_values)

    # ----- detection latency -----------------------------------------------------------------------------------------

    def detection(self, batch_size: int, first: bool) -> dict:
        args = self.args
        generator = torch.Generator().manual_seed(args.seed + batch_size)
        pixel_values = torch.rand(batch_size, 3, args.image_size, args.image_size, generator=generator).to(self.device)
        configs = {
            "detr": lambda: self.detr_forward(pixel_values),
            "pix2seq encoder": lambda: self.encode(pixel_values),
        }
        if batch_size > 1:
            del configs["pix2seq encoder"]
        if self.device.type == "cpu":
            # On a CPU Pix2Seq's encoder hands its backbone channels-last images; DETR gets the same layout here.
            channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
            configs["detr channels-last"] = lambda: self.detr_forward(channels_last)
        loops = ["generate", "stock"]
        if args.compile:
            loops.append("compiled")
        if args.bf16:
            loops.append("generate bf16")
            configs["detr bf16"] = lambda: self.detr_forward(pixel_values, bf16=True)
            if self.device.type == "cpu":
                configs["detr bf16 channels-last"] = lambda: self.detr_forward(channels_last, bf16=True)
        for num_objects in args.objects:
            for loop in loops:
                configs[f"pix2seq {loop} K={num_objects}"] = lambda k=num_objects, l=loop: self.detect(
                    pixel_values, k, l
                )
        if batch_size == 1 and min(args.objects) != args.uncached_objects:
            configs[f"pix2seq uncached K={min(args.objects)}"] = lambda: self.detect(
                pixel_values, min(args.objects), "uncached"
            )
        rounds = args.repeats if batch_size == 1 else min(args.repeats, args.large_batch_repeats)
        # A warm-up round on the first batch size (later ones reuse the warm kernels); the compiled loop compiles for
        # every new batch size and length, so it is warmed up (and its compile time recorded) at each.
        warmup = True if first else {name for name in configs if "compiled" in name}
        results = interleaved(configs, self.device, rounds, warmup=warmup)
        if batch_size == 1:
            # Without a cache every step runs the decoder over the whole prefix: one run is all the budget allows.
            name = f"pix2seq uncached K={args.uncached_objects}"
            logger.info("%s (one run)", name)
            seconds, peak = timed(
                lambda: self.detect(pixel_values, args.uncached_objects, "uncached"), self.device, memory=True
            )
            results[name] = {"seconds": [seconds], "median_s": seconds, "peak_mib": peak}
        for entry in results.values():
            entry["latency_per_image_s"] = entry["median_s"] / batch_size
            entry["images_per_s"] = batch_size / entry["median_s"]
        return results

    # ----- decoder alone ---------------------------------------------------------------------------------------------

    def decoder(self, batch_size: int, detection: dict) -> dict:
        """Tokens/s of the decoder alone (encoder outputs given), K = max objects, for each decoding loop."""
        args = self.args
        generator = torch.Generator().manual_seed(args.seed + 100 + batch_size)
        pixel_values = torch.rand(batch_size, 3, args.image_size, args.image_size, generator=generator).to(self.device)
        encoder_hidden_states = self.encode(pixel_values)
        results = {}
        num_objects = max(args.objects)
        loops = ["generate", "stock", "transformers static cache"]
        if args.bf16:
            loops.append("generate bf16")
        if batch_size == 1:
            loops.append("stock eager attention")
        if args.compile:
            # Compiled for this batch size and length by the detection timings already.
            loops.append("compiled")
            if batch_size == 1:
                loops.append("transformers static cache compiled")
        configs = {loop: (lambda l=loop: self.decode(encoder_hidden_states, num_objects, l)) for loop in loops}
        rounds = args.repeats if batch_size == 1 else min(args.repeats, args.large_batch_repeats)
        timings = interleaved(configs, self.device, rounds, warmup={loop for loop in loops if "compiled" in loop})
        uncached = detection.get(f"pix2seq uncached K={args.uncached_objects}")
        if uncached is not None and "pix2seq encoder" in detection:
            # From the detection run: its time less the encoder's (the rest is the uncached decoding).
            seconds = uncached["median_s"] - detection["pix2seq encoder"]["median_s"]
            timings["uncached (detection less encoder)"] = {
                "seconds": [seconds],
                "median_s": seconds,
                "objects": args.uncached_objects,
            }
        for loop, entry in timings.items():
            objects = entry.get("objects", num_objects)
            entry["objects"] = objects
            entry["tokens_per_s"] = batch_size * TOKENS_PER_OBJECT * objects / entry["median_s"]
            entry["ms_per_step"] = 1000 * entry["median_s"] / (TOKENS_PER_OBJECT * objects)
        results["loops"] = timings
        if batch_size > 1:
            results["finished_rows"] = self.finished_rows(encoder_hidden_states, rounds)
        return results

    def finished_rows(self, encoder_hidden_states, rounds: int) -> dict:
        """
        A batch whose images end at different lengths (image i after `K_i` objects, `K_i` spread evenly from min to
        max objects; EOS forced, natural EOS banned): the stock loop, the static loop computing finished rows anyway,
        and the static loop dropping them.
        """
        from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

        batch_size = encoder_hidden_states.shape[0]
        low, high = min(self.args.objects), max(self.args.objects)
        ends = [round(low + (high - low) * i / max(batch_size - 1, 1)) for i in range(batch_size)]
        eos = self.pix2seq.config.eos_token_id

        class EndAt(LogitsProcessor):
            def __call__(self, input_ids, scores):
                generated = input_ids.shape[1] - 1
                for row, count in enumerate(ends):
                    if generated >= TOKENS_PER_OBJECT * count:
                        scores[row] = -float("inf")
                        scores[row, eos] = 0.0
                return scores

        kwargs = {"eos_bias": -float("inf"), "min_objects": 0, "logits_processor": LogitsProcessorList([EndAt()])}
        configs = {
            loop: (lambda l=loop: self.decode(encoder_hidden_states, high, l, **kwargs))
            for loop in ("stock", "static, finished rows kept", "generate")
        }
        timings = interleaved(configs, self.device, rounds, warmup=False)
        for entry in timings.values():
            entry["images_per_s"] = batch_size / entry["median_s"]
        return {"objects_per_image": ends, "loops": timings}

    # ----- per-token profile -----------------------------------------------------------------------------------------

    def profile(self, num_objects: int, unprofiled_ms_per_token: float | None, loop: str = "generate") -> dict:
        """
        Where the time of a decoded token goes, in the static loop at batch 1: the operators' own time under the torch
        profiler, by kind (`token_breakdown`), as shares of the unprofiled time per token (`unprofiled_ms_per_token`,
        from the decoder timings), with the operator counts per token. The profiler's own cost inflates every
        operator, so Python/dispatch overhead is spread over the operators here: the compiled loop (fused operators,
        no dispatch between them) bounds it.
        """
        args = self.args
        pixel_values = torch.rand(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(7))
        encoder_hidden_states = self.encode(pixel_values.to(self.device))
        config = self.pix2seq.config
        self.decode(encoder_hidden_states, num_objects, loop)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        start = time.perf_counter()
        # The profile holds every operator: a few objects are enough. The cache keeps the length of K objects (a step
        # attends over the whole static cache), EOS is forced after `profiled` objects.
        from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

        profiled = min(num_objects, 20)
        eos = config.eos_token_id

        class EndAfter(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[1] - 1 == TOKENS_PER_OBJECT * profiled:
                    scores = torch.full_like(scores, -float("inf"))
                    scores[:, eos] = 0.0
                return scores

        with labelled_decoding(self.model_for(loop)), profile(activities=activities, record_shapes=True) as prof:
            self.decode(
                encoder_hidden_states,
                num_objects,
                loop,
                min_objects=profiled,
                logits_processor=LogitsProcessorList([EndAfter()]),
            )
        wall = time.perf_counter() - start
        steps = TOKENS_PER_OBJECT * profiled + 1
        breakdown = token_breakdown(prof, steps, config.vocab_size)
        op_total = sum(entry["us"] for entry in breakdown["categories"].values())
        reference_ms = unprofiled_ms_per_token if unprofiled_ms_per_token is not None else wall * 1000 / steps
        per_token_ms = {key: reference_ms * entry["us"] / op_total for key, entry in breakdown["categories"].items()}
        ops_per_token = {key: entry["ops"] for key, entry in breakdown["categories"].items()}
        lm_head_ms = reference_ms * breakdown["lm_head_us"] / op_total
        layers = config.decoder_layers
        model = self.model_for(loop)
        dtype_bytes = 2 if (self.autocast_dtype or model.dtype != torch.float32) else 4
        # Weights a step reads: every decoder layer's but the cross-attention key/value projections (used once per
        # image), and the output projection.
        decoder = model.model.decoder
        read_parameters = sum(p.numel() for p in decoder.layers.parameters()) - sum(
            p.numel()
            for layer in decoder.layers
            for p in (*layer.encoder_attn.k_proj.parameters(), *layer.encoder_attn.v_proj.parameters())
        )
        weight_bytes = (read_parameters + model.lm_head.weight.numel()) * dtype_bytes
        memory_length = encoder_hidden_states.shape[1]
        cross_bytes = 2 * layers * memory_length * config.decoder_hidden_size * dtype_bytes
        bandwidth = read_bandwidth_gbs(self.device)
        cache_bandwidth = read_bandwidth_gbs(self.device, mib=16)  # fits the last-level cache of most CPUs
        floor_ms = (weight_bytes + cross_bytes) / (bandwidth * 1e9) * 1000

        # What computing the cross-attention keys/values costs (one product for all layers): once per image here, at
        # every step without the cache.
        def cross_keys_values():
            decoder.fill_cross_attention_cache(
                EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config)),
                encoder_hidden_states.to(model.dtype),
            )

        with torch.inference_mode():
            cross_kv_s = statistics.median(timed(cross_keys_values, self.device)[0] for _ in range(5))
        compiled = {}
        for compiled_loop in ("compiled",) if args.compile and loop == "generate" else ():
            # The compiled step is one region in the profile: the rest of a token's time is the loop around it
            # (logits processors, sampling, stopping criteria, bookkeeping).
            self.decode(encoder_hidden_states, num_objects, compiled_loop)
            with profile(activities=activities) as prof:
                self.decode(encoder_hidden_states, num_objects, compiled_loop)
            region_us = sum(
                event.cpu_time_total for event in prof.key_averages() if event.key.startswith("Torch-Compiled Region")
            )
            # That decoding writes all `5 * num_objects` tokens (the breakdown above stops after `profiled` objects).
            compiled_steps = TOKENS_PER_OBJECT * num_objects
            compiled[compiled_loop] = {"compiled_step_ms": region_us / 1000 / compiled_steps}
        linear_ms = per_token_ms.get("linear layers", 0.0)
        return {
            "loop": loop,
            "batch_size": 1,
            "objects": num_objects,
            "compiled": compiled,
            "wall_ms_per_token": reference_ms,
            "profiled_wall_ms_per_token": wall * 1000 / steps,
            "per_token_ms": per_token_ms,
            "ops_per_token": ops_per_token,
            "per_layer_ms": (linear_ms - lm_head_ms + per_token_ms.get("attention", 0.0)) / layers,
            "lm_head_ms": lm_head_ms,
            "bytes_read_per_token_mb": (weight_bytes + cross_bytes) / 1e6,
            "read_bandwidth_gbs": bandwidth,
            "read_bandwidth_16mib_gbs": cache_bandwidth,
            "bandwidth_floor_ms_per_token": floor_ms,
            "cross_kv_projection_ms_per_image": cross_kv_s * 1000,
        }

    # ----- training --------------------------------------------------------------------------------------------------

    def training(self) -> dict:
        args = self.args
        batch_size = args.train_batch_size
        generator = torch.Generator().manual_seed(args.seed + 1000)
        pixel_values = torch.rand(batch_size, 3, args.image_size, args.image_size, generator=generator).to(self.device)
        pix2seq_batch = pix2seq_training_batch(self.pix2seq.config, batch_size, self.device, generator)
        detr_labels = detr_training_labels(
            batch_size, args.detr_targets, self.detr.config.num_labels, self.device, generator
        )
        results = {}
        # DETR always freezes its backbone's BatchNorm; Pix2Seq trains it. The same Pix2Seq with frozen BatchNorm
        # (timm's `freeze_batch_norm_2d`) tells the two apart.
        frozen = copy.deepcopy(self.pix2seq)
        frozen.model.encoder.backbone._backbone = freeze_batch_norm_2d(frozen.model.encoder.backbone._backbone)
        models = {
            "pix2seq": (self.pix2seq, lambda: self.pix2seq(pixel_values, **pix2seq_batch).loss),
            "pix2seq, frozen backbone BatchNorm": (frozen, lambda: frozen(pixel_values, **pix2seq_batch).loss),
            "detr": (self.detr, lambda: self.detr(pixel_values=pixel_values, labels=detr_labels).loss),
        }

        def make_step(model, loss_fn):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

            def step():
                optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = loss_fn()
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()

            return step

        for model, _ in models.values():
            model.train()
        steps = {name: make_step(model, loss_fn) for name, (model, loss_fn) in models.items()}
        # Interleaved like the inference timings; the warm-up round also creates the optimizer states.
        timings = interleaved(steps, self.device, args.train_steps, warmup=True)
        for name, (model, _) in models.items():
            model.eval()
            model.zero_grad(set_to_none=True)
            entry = timings[name]
            results[name] = {
                "seconds": entry["seconds"],
                "median_s": entry["median_s"],
                "images_per_s": batch_size / entry["median_s"],
                "peak_mib": entry["peak_mib"],
                "trainable_parameters_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            }
        del steps, frozen
        results["batch_size"] = batch_size
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Early stop on the synthetic set
# ---------------------------------------------------------------------------------------------------------------------


def early_stop_effect(args, device) -> dict:
    """COCO mAP and decoding cost of a trained model on the synthetic validation set, with and without early stop."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForObjectDetection, AutoProcessor

    from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits
    from pix2seq_hf.evaluation import evaluate_model

    model = AutoModelForObjectDetection.from_pretrained(args.early_stop_model).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.early_stop_model)
    if args.early_stop_split == "train":
        splits = load_detection_splits(
            synthetic_train_size=args.early_stop_images, validation_split="none", seed=args.early_stop_seed
        )
        dataset = splits.train
    else:
        splits = load_detection_splits(
            synthetic_validation_size=args.early_stop_images, seed=args.early_stop_seed, train=False
        )
        dataset = splits.validation
    collator = Pix2SeqCollator(processor, training=False, return_sequences=False)
    dataloader = DataLoader(dataset, batch_size=16, collate_fn=collator)
    settings = [("off", {})]
    for pair in args.early_stop_settings.split(","):
        patience, threshold = pair.split(":")
        settings.append((pair, {"early_stop_patience": int(patience), "early_stop_threshold": float(threshold)}))

    class CountingDecoding(Pix2SeqStaticDecoding):
        """The static loop, counting the tokens each image really decodes (until EOS)."""

        tokens = 0

        def __call__(self, model, input_ids, *args, **kwargs):
            output = super().__call__(model, input_ids, *args, **kwargs)
            generated = output.sequences[:, input_ids.shape[1] :]
            ended = (generated == model.config.eos_token_id).cumsum(dim=1) > 0
            self.tokens += int((~ended).sum()) + int(ended.any(dim=1).sum())
            return output

    results = {
        "model": args.early_stop_model,
        "split": args.early_stop_split,
        "seed": args.early_stop_seed,
        "images": len(dataset),
        "settings": {},
    }
    for name, options in settings:
        decoding = CountingDecoding()
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        metrics = evaluate_model(
            model,
            processor,
            dataloader,
            generation_kwargs={"do_sample": False, "custom_generate": decoding, **options},
        )
        seconds = time.perf_counter() - start
        results["settings"][name] = {
            "options": options,
            "map": metrics["map"],
            "map_50": metrics["map_50"],
            "tokens_per_image": decoding.tokens / len(dataset),
            "seconds": seconds,
        }
        logger.info(
            "early stop %s: mAP %.4f, %.1f tokens/image, %.1f s",
            name,
            metrics["map"],
            decoding.tokens / len(dataset),
            seconds,
        )
    return results


def draft_effect(args, device) -> dict:
    """`--draft`: `detect` latency (batches of `--draft_batch_size`) with and without `draft="auxiliary"` (verified in
    the static-cache loop, and in transformers' assisted loop with `static_decoding=False`; with the default draft
    length and those of `--draft_objects_per_pass`) and `draft="lookahead"` on a trained model's synthetic validation
    images, interleaved per batch, and the decoder passes per image of each drafted configuration."""
    from transformers import AutoModelForObjectDetection, AutoProcessor

    from pix2seq_hf.data import Pix2SeqCollator, load_detection_splits
    from pix2seq_hf.speculative_decoding import (
        Pix2SeqAuxiliaryDrafter,
        Pix2SeqLookaheadDrafter,
        acceptance_statistics,
    )

    model = AutoModelForObjectDetection.from_pretrained(args.draft).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.draft)
    splits = load_detection_splits(
        synthetic_validation_size=args.early_stop_images, seed=args.early_stop_seed, train=False
    )
    collator = Pix2SeqCollator(processor, training=False, return_sequences=False)
    examples, size = list(splits.validation), args.draft_batch_size
    batches = [collator(examples[i : i + size])["pixel_values"].to(device) for i in range(0, len(examples), size)]
    drafter = Pix2SeqAuxiliaryDrafter(object_order=processor.object_order)
    configurations = {
        "no draft": {},
        "draft": {"draft": drafter},
        "draft, assisted loop": {"draft": drafter, "static_decoding": False},
        "lookahead draft (no head needed)": {"draft": Pix2SeqLookaheadDrafter()},
    }
    for objects in args.draft_objects_per_pass:
        sized = Pix2SeqAuxiliaryDrafter(object_order=processor.object_order, objects_per_pass=objects)
        configurations[f"draft, {objects} objects per pass"] = {"draft": sized}
    results = {
        "model": args.draft,
        "images": len(examples),
        "batch_size": size,
        "draft": repr(drafter),
        "modes": {},
    }
    for mode, options in (("greedy", {"do_sample": False}), ("sampling", {})):
        seconds = {name: [] for name in configurations}
        counts = {name: [0, 0] for name in configurations}  # passes, tokens written
        for round_index in range(-1, args.repeats):  # round -1: warm-up
            for pixel_values in batches if round_index >= 0 else batches[:1]:
                for name, extra in configurations.items():
                    with torch.inference_mode(), acceptance_statistics() as statistics:
                        elapsed, _ = timed(lambda: model.detect(pixel_values, **options, **extra), device)
                    if round_index >= 0:
                        seconds[name].append((elapsed, len(pixel_values)))
                        counts[name][0] += statistics.passes
                        counts[name][1] += statistics.generated_tokens
        entry = {}
        reference = sum(elapsed for elapsed, _ in seconds["no draft"])
        for name, values in seconds.items():
            (passes, tokens), elapsed = counts[name], sum(elapsed for elapsed, _ in values)
            num_images = sum(count for _, count in values)
            entry[name] = {
                "seconds_per_image": elapsed / num_images,
                "speed_up": reference / elapsed,
                "passes_per_image": passes / num_images if passes else None,
                "tokens_per_pass": tokens / passes if passes else None,
            }
        results["modes"][mode] = entry
        logger.info("draft %s: %s", mode, entry)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def run_device(args, device: torch.device) -> dict:
    pix2seq, detr = build_models(args, device)
    runner = Runner(args, device, pix2seq, detr)
    report = {
        "device": str(device),
        "autocast_dtype": str(runner.autocast_dtype) if runner.autocast_dtype else None,
        "parameters_m": {"pix2seq": count_parameters(pix2seq), "detr": count_parameters(detr)},
        "detection": {},
        "decoder": {},
        "load_average": {},
    }
    for index, batch_size in enumerate(args.batch_sizes):
        report["load_average"][f"detection batch {batch_size}"] = load_average()
        report["detection"][str(batch_size)] = runner.detection(batch_size, first=index == 0)
        report["load_average"][f"decoder batch {batch_size}"] = load_average()
        report["decoder"][str(batch_size)] = runner.decoder(batch_size, report["detection"][str(batch_size)])
    report["load_average"]["profile"] = load_average()
    loops = report["decoder"].get("1", {}).get("loops", {})
    default = loops.get("generate")
    report["profile"] = (
        None if args.skip_profile else runner.profile(max(args.objects), default["ms_per_step"] if default else None)
    )
    for loop, entry in (report["profile"] or {}).get("compiled", {}).items():
        if loop in loops:
            entry["ms_per_token"] = loops[loop]["ms_per_step"]
            entry["loop_ms"] = entry["ms_per_token"] - entry["compiled_step_ms"]
    if not args.skip_training:
        report["load_average"]["training"] = load_average()
        report["training"] = runner.training()
    report["load_average"]["end"] = load_average()
    report["targets"] = check_targets(args, report)
    return report


def profile_only(args, device: torch.device) -> dict:
    """`--profile`: the decoder alone at batch 1, K = the largest of `--objects`, timed, then profiled."""
    pix2seq, detr = build_models(args, device)
    runner = Runner(args, device, pix2seq, detr)
    num_objects = max(args.objects)
    generator = torch.Generator().manual_seed(args.seed + 101)
    pixel_values = torch.rand(1, 3, args.image_size, args.image_size, generator=generator).to(device)
    encoder_hidden_states = runner.encode(pixel_values)
    loops = ["generate"] + (["generate bf16"] if args.bf16 else []) + (["compiled"] if args.compile else [])
    configs = {loop: (lambda l=loop: runner.decode(encoder_hidden_states, num_objects, l)) for loop in loops}
    timings = interleaved(configs, device, args.repeats, warmup=True)
    ms_per_token = {
        loop: 1000 * entry["median_s"] / (TOKENS_PER_OBJECT * num_objects) for loop, entry in timings.items()
    }
    profiles = {}
    for loop in loops:
        if loop != "compiled":
            profiles[loop] = runner.profile(num_objects, ms_per_token[loop], loop)
    for loop, entry in profiles.get("generate", {}).get("compiled", {}).items():
        entry["ms_per_token"] = ms_per_token[loop]
        entry["loop_ms"] = entry["ms_per_token"] - entry["compiled_step_ms"]
    return {"device": str(device), "objects": num_objects, "ms_per_token": ms_per_token, "profiles": profiles}


def format_profile(profile: dict) -> str:
    """A profile (`Runner.profile`) as a table: ms, share and aten operators per token, by kind."""
    total = sum(profile["per_token_ms"].values())
    lines = [
        f"{profile['loop']}, batch 1, K={profile['objects']}: {profile['wall_ms_per_token']:.2f} ms per token",
        "",
        "| kind | ms per token | share | aten operators per token |",
        "|---|---:|---:|---:|",
    ]
    for name, ms in profile["per_token_ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {ms / total:.0%} | {profile['ops_per_token'][name]:.0f} |")
    lines.append(f"| total | {total:.2f} | 100% | {sum(profile['ops_per_token'].values()):.0f} |")
    lines.append("")
    lines.append(
        f"Per decoder layer {profile['per_layer_ms']:.2f} ms (linear + attention), output projection "
        f"{profile['lm_head_ms']:.2f} ms. A step reads {profile['bytes_read_per_token_mb']:.1f} MB (weights + "
        f"cross-attention K/V); at the measured read bandwidth of {profile['read_bandwidth_gbs']:.1f} GB/s (256 MiB; "
        f"{profile['read_bandwidth_16mib_gbs']:.1f} GB/s for 16 MiB) that is >= "
        f"{profile['bandwidth_floor_ms_per_token']:.2f} ms per token. The cross-attention K/V of an image (all layers, "
        f"one product) take {profile['cross_kv_projection_ms_per_image']:.1f} ms, once per image."
        + "".join(
            f" {loop}: {entry['ms_per_token']:.2f} ms per token, of which the compiled step "
            f"{entry['compiled_step_ms']:.2f} ms and the loop around it (processors, sampling) "
            f"{entry['loop_ms']:.2f} ms."
            for loop, entry in profile["compiled"].items()
            if "ms_per_token" in entry
        )
    )
    return "\n".join(lines)


FIRST_CALL_MARK = "FIRST_CALL_JSON "


def first_call_child(args, device: torch.device) -> dict:
    """In a new process: the first `detect` call of the loop `--first_call_child` and the best of two warm calls."""
    loop = args.first_call_child
    pix2seq, detr = build_models(args, device)
    del detr
    runner = Runner(args, device, pix2seq, None)
    generator = torch.Generator().manual_seed(args.seed + 1)
    pixel_values = torch.rand(1, 3, args.image_size, args.image_size, generator=generator).to(device)
    results = {}
    for num_objects in args.objects:
        first, _ = timed(lambda: runner.detect(pixel_values, num_objects, loop), device)
        warm = min(timed(lambda: runner.detect(pixel_values, num_objects, loop), device)[0] for _ in range(2))
        results[str(num_objects)] = {"first_s": first, "warm_s": warm, "ratio": first / warm}
    return results


def first_call_in_new_processes(args) -> dict:
    """
    `--first_call`: `first_call_child` in new processes: the default loop; with `--compile`, the compiled loop twice
    with torch's on-disk compile caches in a new folder (`TORCHINDUCTOR_CACHE_DIR`): the first process compiles and
    fills them, the second starts from them (a machine that compiled once).
    """
    import subprocess
    import tempfile

    runs = [("generate", "new process")]
    if args.bf16:
        runs.append(("generate bf16", "new process"))
    if args.compile:
        runs += [("compiled", "new process, empty compile caches"), ("compiled", "new process, compile caches filled")]
    common = [
        "--device",
        args.device if args.device != "auto" else "cpu",
        "--threads",
        str(args.threads),
        "--image_size",
        str(args.image_size),
        "--seed",
        str(args.seed),
        "--objects",
        *map(str, args.objects),
    ]
    if args.omp_wait_policy:
        common += ["--omp_wait_policy", args.omp_wait_policy]
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        for loop, name in runs:
            logger.info("first call: %s (%s)", loop, name)
            command = [sys.executable, os.path.abspath(__file__), "--first_call_child", loop, *common]
            if loop.endswith("bf16"):
                command.append("--bf16")
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            line = next(line for line in output.splitlines() if line.startswith(FIRST_CALL_MARK))
            results[f"{loop}, {name}"] = json.loads(line[len(FIRST_CALL_MARK) :])
    return results


def format_first_call(results: dict) -> str:
    lines = ["| loop | K | first call (s) | warm call (s) | first / warm |", "|---|---:|---:|---:|---:|"]
    for name, per_k in results.items():
        for num_objects, entry in per_k.items():
            lines.append(
                f"| {name} | {num_objects} | {entry['first_s']:.2f} | {entry['warm_s']:.2f} | {entry['ratio']:.2f} |"
            )
    return "\n".join(lines)


def check_targets(args, report: dict) -> dict:
    """The issue's targets, each a ratio within this run."""
    targets = {}
    decoder = report["decoder"].get("1", {}).get("loops", {})
    uncached = decoder.get("uncached (detection less encoder)")
    if uncached is not None and uncached["objects"] == max(args.objects):
        for loop in ("stock", "generate", "compiled"):
            if loop in decoder:
                ratio = uncached["ms_per_step"] / decoder[loop]["ms_per_step"]
                targets[f"cached ({loop}) vs uncached decoding at K={max(args.objects)}"] = {
                    "ratio": ratio,
                    "target": ">= 10",
                    "met": ratio >= 10,
                }
    for batch_size, num_objects, limit, loops, detr in (
        (1, 10, 1.0, ("generate", "stock", "compiled"), "detr"),
        (1, 100, 2.5, ("generate", "stock", "compiled"), "detr"),
        (8, 100, 1.2, ("generate", "stock", "compiled"), "detr"),
        (1, 100, 2.0, ("generate bf16",), "detr"),
        (1, 100, 2.0, ("generate bf16",), "detr bf16"),
    ):
        detection = report["detection"].get(str(batch_size), {})
        # Against DETR as it runs by default and, on a CPU, given the channels-last images Pix2Seq's backbone gets.
        for reference in (detr, f"{detr} channels-last"):
            for loop in loops:
                name = f"pix2seq {loop} K={num_objects}"
                if name in detection and reference in detection:
                    ratio = detection[name]["median_s"] / detection[reference]["median_s"]
                    label = reference.replace("detr", "DETR")
                    targets[f"detection {loop} K={num_objects} / {label}, batch {batch_size}"] = {
                        "ratio": ratio,
                        "target": f"<= {limit}",
                        "met": ratio <= limit,
                    }
    detection = report["detection"].get("1", {})
    training = report.get("training")
    if training:
        for name in ("pix2seq", "pix2seq, frozen backbone BatchNorm"):
            ratio = training[name]["images_per_s"] / training["detr"]["images_per_s"]
            targets[f"training throughput {name} / DETR"] = {"ratio": ratio, "target": ">= 1", "met": ratio >= 1}
    if detection and f"pix2seq stock K={max(args.objects)}" in detection:
        small, large = f"pix2seq stock K={min(args.objects)}", f"pix2seq stock K={max(args.objects)}"
        base = detection["pix2seq encoder"]["peak_mib"]
        for loop in ("stock", "generate", "compiled"):
            if f"pix2seq {loop} K={max(args.objects)}" not in detection:
                continue
            peak = detection[f"pix2seq {loop} K={max(args.objects)}"]["peak_mib"]
            if peak and base:
                targets[f"inference peak {loop} K={max(args.objects)} / encoder alone"] = {
                    "ratio": peak / base,
                    "target": "<= 2",
                    "met": peak / base <= 2,
                }
        if detection[large]["peak_mib"] and detection[small]["peak_mib"]:
            ratio = detection[large]["peak_mib"] / detection[small]["peak_mib"]
            targets[f"inference peak stock K={max(args.objects)} / K={min(args.objects)}"] = {
                "ratio": ratio,
                "target": "<= 2",
                "met": ratio <= 2,
            }
    return targets


def format_report(report: dict) -> str:
    autocast = f" (autocast {report['autocast_dtype']})" if report["autocast_dtype"] else ""
    lines = [f"## {report['device']}{autocast}"]
    lines.append("")
    lines.append("| batch | model / loop | latency per image (s) | first call (s) | images/s | vs DETR | peak MiB |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|")
    for batch_size, results in report["detection"].items():
        detr = results["detr"]["median_s"]
        for name, entry in results.items():
            peak = f"{entry['peak_mib']:.0f}" if entry.get("peak_mib") is not None else "-"
            first = f"{entry['warmup_s']:.2f}" if "warmup_s" in entry else "-"
            lines.append(
                f"| {batch_size} | {name} | {entry['latency_per_image_s']:.3f} | {first} | "
                f"{entry['images_per_s']:.2f} | {entry['median_s'] / detr:.2f} | {peak} |"
            )
    lines.append("")
    lines.append("| batch | decoder loop | K | ms per step | tokens/s |")
    lines.append("|---:|---|---:|---:|---:|")
    for batch_size, results in report["decoder"].items():
        for loop, entry in results["loops"].items():
            lines.append(
                f"| {batch_size} | {loop} | {entry['objects']} | {entry['ms_per_step']:.2f} | "
                f"{entry['tokens_per_s']:.0f} |"
            )
    for batch_size, results in report["decoder"].items():
        if "finished_rows" in results:
            finished = results["finished_rows"]
            lines.append("")
            lines.append(
                f"Batch {batch_size}, images ending after {finished['objects_per_image']} objects (decoder alone):"
            )
            lines.append("")
            lines.append("| loop | s per batch | images/s |")
            lines.append("|---|---:|---:|")
            for loop, entry in finished["loops"].items():
                lines.append(f"| {loop} | {entry['median_s']:.2f} | {entry['images_per_s']:.2f} |")
    profile = report["profile"]
    if profile is not None:
        lines.append("")
        lines.append(format_profile(profile))
    if "training" in report:
        training = report["training"]
        lines.append("")
        lines.append(f"| training, batch {training['batch_size']} | s per step | images/s | peak MiB |")
        lines.append("|---|---:|---:|---:|")
        for name in ("pix2seq", "pix2seq, frozen backbone BatchNorm", "detr"):
            entry = training[name]
            peak = f"{entry['peak_mib']:.0f}" if entry.get("peak_mib") is not None else "-"
            lines.append(f"| {name} | {entry['median_s']:.2f} | {entry['images_per_s']:.2f} | {peak} |")
    lines.append("")
    lines.append("| target | ratio | wanted | met |")
    lines.append("|---|---:|---|---|")
    for name, entry in report["targets"].items():
        lines.append(f"| {name} | {entry['ratio']:.2f} | {entry['target']} | {'yes' if entry['met'] else 'no'} |")
    return "\n".join(lines)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (`uptime`), or `None` where the OS has none."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(value, 2) for value in os.getloadavg()]
    return None


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16 instruction sets (`avx512_bf16`, `amx_bf16`) as torch detects them (`training_setup` reads the
    same capabilities to choose bf16 autocast)."""
    capabilities = torch.cpu.get_capabilities()
    return sorted(flag for flag in ("avx512_bf16", "amx_bf16") if capabilities.get(flag, False))


def machine_info(args) -> dict:
    info = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Whether bf16 products run natively (AVX512-BF16, AMX) or emulated decides what `--bf16` measures.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "settings": vars(args),
    }
    with contextlib.suppress(OSError):
        info["load_average_start"] = os.getloadavg()
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.first_call_child:
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        print(FIRST_CALL_MARK + json.dumps(first_call_child(args, device)), flush=True)
        return 0
    report = {"machine": machine_info(args), "results": []}
    start = time.perf_counter()
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    if args.profile:
        report["profile"] = [profile_only(args, device) for device in devices]
        for entry in report["profile"]:
            print(
                f"## {entry['device']}: ms per token "
                + ", ".join(f"{loop} {ms:.2f}" for loop, ms in entry["ms_per_token"].items())
            )
            for profile in entry["profiles"].values():
                print("\n" + format_profile(profile), flush=True)
        args.skip_speed = True
    if args.first_call:
        report["first_call"] = first_call_in_new_processes(args)
        print(format_first_call(report["first_call"]), flush=True)
        args.skip_speed = True
    for device in [] if args.skip_speed else devices:
        logger.info("benchmarking on %s", device)
        device_report = run_device(args, device)
        report["results"].append(device_report)
        print(format_report(device_report), flush=True)
    if args.early_stop_model:
        device = devices[-1]
        report["early_stop"] = early_stop_effect(args, device)
        print("\n| early stop (patience:threshold) | mAP | mAP@50 | tokens/image | seconds |")
        print("|---|---:|---:|---:|---:|")
        for name, entry in report["early_stop"]["settings"].items():
            print(
                f"| {name} | {entry['map']:.4f} | {entry['map_50']:.4f} | {entry['tokens_per_image']:.1f} | "
                f"{entry['seconds']:.1f} |"
            )
    if args.draft:
        report["draft"] = draft_effect(args, devices[-1])
        print("\n| decoding | configuration | s per image | speed-up | passes/image | tokens/pass |")
        print("|---|---|---:|---:|---:|---:|")
        for mode, entries in report["draft"]["modes"].items():
            for name, entry in entries.items():
                passes, tokens = entry["passes_per_image"], entry["tokens_per_pass"]
                print(
                    f"| {mode} | {name} | {entry['seconds_per_image']:.4f} | {entry['speed_up']:.2f} | "
                    f"{'' if passes is None else f'{passes:.1f}'} | {'' if tokens is None else f'{tokens:.2f}'} |"
                )
    with contextlib.suppress(OSError):
        report["machine"]["load_average_end"] = os.getloadavg()
    report["machine"]["total_seconds"] = time.perf_counter() - start
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"\nWrote {args.output} ({report['machine']['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
