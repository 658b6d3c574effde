"""
What the training scripts (`examples/train.py` with Accelerate, `examples/run_object_detection.py` with the `Trainer`)
build the same way: the model and processor of a run, and the optimizer's parameter groups.
"""

from __future__ import annotations

import logging

import torch

from .image_processing_pix2seq import Pix2SeqImageProcessor
from .modeling_pix2seq import Pix2SeqForObjectDetection
from .presets import get_preset_config, get_preset_image_processor_kwargs
from .processing_pix2seq import Pix2SeqProcessor


logger = logging.getLogger(__name__)

# Learning-rate factor of the Transformer encoder when training from scratch: at the full rate the encoder drowns the
# image in a growing image-independent component and the decoder learns only the sequence prior (docs/training.md).
SCRATCH_ENCODER_LR_SCALE = 0.1


def build_model_and_processor(
    id2label: dict[int, str],
    model_name_or_path: str | None = None,
    config_preset: str = "tiny",
    pretrained_backbone: bool = False,
    image_size: int | None = None,
    max_objects: int | None = None,
    num_bins: int | None = None,
    object_order: str = "random",
    sequence_augmentation: bool = True,
) -> tuple[Pix2SeqForObjectDetection, Pix2SeqProcessor]:
    """
    The model of a training run and a processor whose token layout matches it.

    Args:
        id2label (`dict[int, str]`): the classes of the data (contiguous labels).
        model_name_or_path (`str`, *optional*): a saved Pix2Seq model to fine-tune (its classes must be `id2label`);
            otherwise a new model of `config_preset`.
        config_preset (`str`, *optional*, defaults to `"tiny"`): a name of `presets.PRESETS`.
        pretrained_backbone (`bool`, *optional*): start a new model from ImageNet timm weights (needs the Hub).
        image_size (`int`, *optional*): the canvas (default: the preset's, or the saved processor's).
        max_objects / num_bins (`int`, *optional*): override the preset's (vocabulary and positions grow to fit).
        object_order (`str`, *optional*, defaults to `"random"`): order of objects in training sequences.
        sequence_augmentation (`bool`, *optional*, defaults to `True`): noise objects in training sequences.

    Returns:
        `(Pix2SeqForObjectDetection, Pix2SeqProcessor)`.
    """
    if model_name_or_path:
        model = Pix2SeqForObjectDetection.from_pretrained(model_name_or_path)
        if dict(model.config.id2label) != dict(id2label):
            raise ValueError(
                f"{model_name_or_path} was trained on classes {model.config.id2label}, but the data has {id2label}; "
                "train from a preset (--config_preset) for a new label set."
            )
        processor = Pix2SeqProcessor.from_pretrained(model_name_or_path)
        if image_size:
            processor.image_processor.size = {"longest_edge": image_size}
    else:
        overrides = {"id2label": id2label, "use_pretrained_backbone": pretrained_backbone}
        if max_objects:
            overrides["max_objects"] = max_objects
            overrides["max_position_embeddings"] = max(512, 5 * max_objects + 1)
        if num_bins:
            overrides["num_bins"] = num_bins
            overrides["vocab_size"] = max(3000, 1000 + num_bins)
        config = get_preset_config(config_preset, **overrides)
        model = Pix2SeqForObjectDetection(config)
        # The weights now live in the model: a saved config must not download the backbone again when loaded.
        model.config.use_pretrained_backbone = False
        image_processor = Pix2SeqImageProcessor(**get_preset_image_processor_kwargs(config_preset, image_size))
        processor = Pix2SeqProcessor.from_config(
            model.config,
            image_processor=image_processor,
            object_order=object_order,
            sequence_augmentation=sequence_augmentation,
        )
    processor.check_model_compatible(model)
    return model, processor


def default_encoder_lr_scale(model_name_or_path: str | None) -> float:
    """The encoder's learning-rate factor when none is given: 1 to fine-tune, `SCRATCH_ENCODER_LR_SCALE` from scratch."""
    return 1.0 if model_name_or_path else SCRATCH_ENCODER_LR_SCALE


def optimizer_param_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, encoder_lr_scale: float = 1.0
) -> list[dict]:
    """
    Parameter groups for AdamW: weight decay on weight matrices and kernels only (not on biases, norms or position
    embeddings), `learning_rate` everywhere except the Transformer encoder (the parameters of `model.model.encoder`
    outside its backbone), which learns at `learning_rate * encoder_lr_scale`.

    Returns:
        `list[dict]` with `params`, `weight_decay` and `lr` per group (trainable parameters only).
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not (parameter.ndim < 2 or "norm" in name.lower() or "position" in name.lower())
        encoder = name.startswith("model.encoder.") and not name.startswith("model.encoder.backbone.")
        groups.setdefault((decay, encoder), []).append(parameter)
    return [
        {
            "params": parameters,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": learning_rate * (encoder_lr_scale if encoder else 1.0),
        }
        for (decay, encoder), parameters in groups.items()
    ]


__all__ = [
    "SCRATCH_ENCODER_LR_SCALE",
    "build_model_and_processor",
    "default_encoder_lr_scale",
    "optimizer_param_groups",
]
