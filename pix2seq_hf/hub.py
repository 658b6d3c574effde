"""
Making a saved Pix2Seq model Hub-ready: remote-code registration (so that `from_pretrained(..., trust_remote_code=True)`
works where `pix2seq_hf` is not installed), a model card, and the upload of a saved folder.

Used by `examples/train.py`, `examples/run_object_detection.py` and the checkpoint converter; uploads go through
transformers' Hub client (`transformers.utils.hub.hf_api()`), like `Trainer.push_to_hub`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_pix2seq import Pix2SeqConfig
from .image_processing_pix2seq import Pix2SeqImageProcessor
from .modeling_pix2seq import Pix2SeqForObjectDetection, Pix2SeqModel
from .processing_pix2seq import Pix2SeqProcessor


logger = logging.getLogger(__name__)

# Each class and the `Auto*` factory that loads it from remote code (the `auto_map` of the saved configs).
REMOTE_CODE_CLASSES = (
    (Pix2SeqConfig, "AutoConfig"),
    (Pix2SeqModel, "AutoModel"),
    (Pix2SeqForObjectDetection, "AutoModelForObjectDetection"),
    (Pix2SeqImageProcessor, "AutoImageProcessor"),
    (Pix2SeqProcessor, "AutoProcessor"),
)

# What a training run leaves in its output folder that does not belong on the Hub.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "step_*", "step_*/**", "logs/**", "runs/**", "_*"]

METRIC_NAMES = {
    "map": "mAP",
    "map_50": "mAP@0.50",
    "map_75": "mAP@0.75",
    "map_small": "mAP (small)",
    "map_medium": "mAP (medium)",
    "map_large": "mAP (large)",
    "mar_1": "mAR@1",
    "mar_10": "mAR@10",
    "mar_100": "mAR@100",
}

# The training arguments a card lists when it is given a full `TrainingArguments` dict.
CARD_TRAINING_ARGUMENTS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_train_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "num_warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "encoder_lr_scale",
    "optim",
    "seed",
    "augmentation",
    "num_augmentations",
    "sequences_per_image",
    "mixed_precision",
    "bf16",
    "fp16",
)


def register_for_remote_code() -> None:
    """
    Registers the Pix2Seq classes for remote code: from now on `save_pretrained` writes their source files next to the
    weights and an `auto_map` into the configs, so the folder loads with `trust_remote_code=True` and no `pix2seq_hf`.
    """
    for cls, auto_class in REMOTE_CODE_CLASSES:
        cls.register_for_auto_class(auto_class)


def unregister_for_remote_code() -> None:
    """Undoes `register_for_remote_code` (later saves are plain again)."""
    for cls, _ in REMOTE_CODE_CLASSES:
        cls._auto_class = None


@contextlib.contextmanager
def remote_code() -> Iterator[None]:
    """`register_for_remote_code` for the duration of a `with` block."""
    register_for_remote_code()
    try:
        yield
    finally:
        unregister_for_remote_code()


def save_for_hub(model, processor, folder: str | Path) -> Path:
    """Saves `model` and `processor` into `folder` with their source code and `auto_map` (see `remote_code`)."""
    folder = Path(folder)
    with remote_code():
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
    return folder


def _describe_model(config: Pix2SeqConfig, num_parameters: int | None) -> str:
    backbone = getattr(config.backbone_config, "backbone", None) or config.backbone_config.model_type
    size = f" ({num_parameters / 1e6:.1f}M parameters)" if num_parameters else ""
    encoder = (
        f"a {config.encoder_layers}-layer Transformer encoder of width {config.encoder_hidden_size}"
        if config.encoder_layers
        else f"its features used directly (width {config.encoder_hidden_size})"
    )
    return (
        f"A [Pix2Seq](https://arxiv.org/abs/2109.10852) object detector{size}: a `{backbone}` backbone, {encoder}, and "
        f"a {config.decoder_layers}-layer causal Transformer decoder of width {config.decoder_hidden_size} that writes "
        f"each object as five tokens (`ymin xmin ymax xmax class`; {config.num_bins} coordinate bins), up to "
        f"{config.max_objects} objects per image, for {config.num_classes} classes."
    )


def _markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _metric_rows(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    rows = []
    for key, value in metrics.items():
        name = key[len("eval_") :] if key.startswith("eval_") else key
        if name in METRIC_NAMES and isinstance(value, (int, float)):
            rows.append((METRIC_NAMES[name], f"{float(value):.4f}"))
    return rows


def write_model_card(
    folder: str | Path,
    model=None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    dataset_description: str | None = None,
    base_model: str | None = None,
    training_arguments: Mapping | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
) -> ModelCard:
    """
    Writes `folder/README.md`: the model card of a saved Pix2Seq model.

    Args:
        folder (`str` or `Path`): the saved model; its `config.json` describes the model when `model` is not given.
        model (`Pix2SeqForObjectDetection`, *optional*): the model (for its config and parameter count).
        metrics (`dict`, *optional*): COCO metrics (`map`, `map_50`, ... or `eval_map`, ...); a table and the
            card's `model-index`.
        dataset (`str`, *optional*): the Hub id of the training data (card metadata and the `model-index`).
        dataset_description (`str`, *optional*): where the data came from, in words (defaults to `dataset`).
        base_model (`str`, *optional*): the Hub id or path of the model this one was fine-tuned from.
        training_arguments (`dict`, *optional*): the run's arguments; the card lists those of
            `CARD_TRAINING_ARGUMENTS` that are set.
        license (`str`, *optional*, defaults to `"apache-2.0"`): the card's license.
        repo_id (`str`, *optional*): the Hub repository, for the usage snippet (defaults to the folder name).

    Returns:
        `huggingface_hub.ModelCard` (also saved as `folder/README.md`).
    """
    folder = Path(folder)
    config = model.config if model is not None else Pix2SeqConfig.from_pretrained(folder)
    num_parameters = sum(p.numel() for p in model.parameters()) if model is not None else None
    repo_id = repo_id or folder.resolve().name
    metric_rows = _metric_rows(metrics or {})

    eval_results = None
    if dataset and metric_rows:
        eval_results = [
            EvalResult(
                task_type="object-detection",
                task_name="Object Detection",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=name,
                metric_name=name,
                metric_value=float(value),
            )
            for name, value in metric_rows
        ]
    base_model_id = base_model if base_model and not Path(base_model).exists() and "/" in base_model else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="object-detection",
        license=license,
        tags=["object-detection", "vision", "pix2seq"],
        datasets=[dataset] if dataset else None,
        base_model=base_model_id,
        model_name=repo_id,
        eval_results=eval_results,
        metrics=["mAP"] if metric_rows else None,
    )

    sections = [f"# {repo_id}", _describe_model(config, num_parameters)]
    labels = ", ".join(f"`{name}`" for _, name in sorted(config.id2label.items())[:20])
    more = f" and {len(config.id2label) - 20} more" if len(config.id2label) > 20 else ""
    sections.append(f"Classes: {labels}{more}.")
    sections.append(
        "## Usage\n\n"
        "The repository carries the model's code, so only `transformers` (with `timm` for timm backbones) is needed:\n\n"
        "```python\n"
        "from transformers import pipeline\n\n"
        f'detector = pipeline("object-detection", model="{repo_id}", trust_remote_code=True)\n'
        'detector("image.jpg", threshold=0.3)  # [{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...]\n'
        "```\n\n"
        "or, for batches and the decoding options (`top_p`, greedy decoding):\n\n"
        "```python\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForObjectDetection, AutoProcessor\n\n"
        f'model = AutoModelForObjectDetection.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        'image = Image.open("image.jpg")\n'
        'inputs = processor(images=image, return_tensors="pt")\n'
        "outputs = model.generate(inputs.pixel_values, top_p=0.4)\n"
        "detections = processor.post_process_object_detection(\n"
        "    outputs, threshold=0.3, target_sizes=[(image.height, image.width)]\n"
        ")[0]  # scores, labels, boxes (absolute xyxy)\n"
        "```"
    )
    if metric_rows:
        sections.append(
            "## Evaluation\n\nCOCO metrics (pycocotools) on the validation data, every decoded object kept:\n\n"
            + _markdown_table(("metric", "value"), metric_rows)
        )
    data = dataset_description or dataset
    training = []
    if data:
        training.append(f"Trained on {data}.")
    if base_model:
        training.append(f"Fine-tuned from `{base_model}`.")
    if training_arguments:
        rows = [
            (f"`{name}`", f"`{json.dumps(training_arguments[name])}`")
            for name in CARD_TRAINING_ARGUMENTS
            if training_arguments.get(name) not in (None, False)
        ]
        if rows:
            training.append("Training arguments:\n\n" + _markdown_table(("argument", "value"), rows))
    if training:
        sections.append("## Training\n\n" + "\n\n".join(training))
    sections.append(
        "## Citation\n\n```bibtex\n@inproceedings{chen2022pix2seq,\n"
        "  title={Pix2seq: A Language Modeling Framework for Object Detection},\n"
        "  author={Chen, Ting and Saxena, Saurabh and Li, Lala and Fleet, David J. and Hinton, Geoffrey},\n"
        "  booktitle={International Conference on Learning Representations},\n  year={2022}\n}\n```"
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card.save(folder / "README.md")
    return card


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    commit_message: str = "Upload Pix2Seq model",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
):
    """
    Uploads a saved folder (model, processor, code, card) to the Hub repository `repo_id` (created if needed),
    leaving out training checkpoints and logs (`HUB_IGNORE_PATTERNS`).

    Returns:
        The `CommitInfo` of the upload.
    """
    from transformers.utils.hub import hf_api

    api = hf_api()
    api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )


def push_model(
    model,
    processor,
    folder: str | Path,
    repo_id: str,
    commit_message: str = "Upload Pix2Seq model",
    private: bool | None = None,
    token: str | None = None,
    **card_kwargs,
):
    """
    Saves `model` and `processor` into `folder` with their code (`save_for_hub`), writes the model card
    (`write_model_card(folder, model=model, repo_id=repo_id, **card_kwargs)`: metrics, dataset, base_model,
    training_arguments, license...) and uploads the folder (`push_folder_to_hub`).

    Returns:
        The `CommitInfo` of the upload.
    """
    save_for_hub(model, processor, folder)
    write_model_card(folder, model=model, repo_id=repo_id, **card_kwargs)
    return push_folder_to_hub(folder, repo_id, commit_message=commit_message, private=private, token=token)


__all__ = [
    "HUB_IGNORE_PATTERNS",
    "REMOTE_CODE_CLASSES",
    "push_folder_to_hub",
    "push_model",
    "register_for_remote_code",
    "remote_code",
    "save_for_hub",
    "unregister_for_remote_code",
    "write_model_card",
]
