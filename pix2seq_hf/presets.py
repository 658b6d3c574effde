"""Named model sizes: the paper's models and a small one that trains on a CPU in minutes."""

from __future__ import annotations

from .configuration_pix2seq import Pix2SeqConfig


# Sizes from the paper and the official release (see docs/model.md). `image_size` is the canvas the preset is meant
# for; `normalize` says whether pixels get ImageNet mean/std (pretrained timm backbones) or stay in [0, 1] (official).
PRESETS: dict[str, dict] = {
    # A small model for the synthetic shapes set and for CPU experiments: ResNet-18 at half width (stages of 32, 64
    # and 128 channels, random weights only) cut at stride 16, 128 px canvas, 10 objects, 128 bins (one bin per pixel).
    # Half width makes a CPU training step 1.7-2.1x faster than the full ResNet-18, with the same mAP per step on
    # the synthetic set.
    "tiny": {
        "config": {
            "backbone": "resnet18",
            "backbone_kwargs": {"out_indices": [3]},
            "backbone_model_kwargs": {"channels": [32, 64, 128, 256]},
            "encoder_layers": 2,
            "encoder_hidden_size": 128,
            "encoder_ffn_dim": 512,
            "encoder_attention_heads": 4,
            "decoder_layers": 2,
            "decoder_hidden_size": 128,
            "decoder_ffn_dim": 512,
            "decoder_attention_heads": 4,
            "num_bins": 128,
            "vocab_size": 1128,
            "max_objects": 10,
            "max_position_embeddings": 64,
            "dropout": 0.0,
            "drop_path_rate": 0.0,
        },
        "image_size": 128,
        "normalize": False,
    },
    # The paper's ResNet-50 model: encoder 6x256 (ffn 1024, 8 heads), decoder 6x256 (36.6M parameters).
    "r50": {
        "config": {"backbone": "resnet50"},
        "image_size": 640,
        "normalize": True,
    },
    # ResNet-50 cut at C4 (stride 16), encoder 12x512, decoder 8x512.
    "r50-c4": {
        "config": {
            "backbone": "resnet50",
            "backbone_kwargs": {"out_indices": [3]},
            "encoder_layers": 12,
            "encoder_hidden_size": 512,
            "encoder_ffn_dim": 2048,
            "encoder_attention_heads": 16,
            "decoder_layers": 8,
            "decoder_hidden_size": 512,
            "decoder_ffn_dim": 2048,
            "decoder_attention_heads": 16,
        },
        "image_size": 640,
        "normalize": True,
    },
    # ViT-B/16 as the encoder (its 12 layers of width 768 are the encoder), decoder 6x512.
    "vit-b": {
        "config": {
            "backbone": "vit_base_patch16_224",
            "backbone_model_kwargs": {"dynamic_img_size": True},
            "encoder_layers": 0,
            "encoder_hidden_size": 768,
            "encoder_ffn_dim": 3072,
            "encoder_attention_heads": 12,
            "decoder_layers": 6,
            "decoder_hidden_size": 512,
            "decoder_ffn_dim": 2048,
            "decoder_attention_heads": 16,
        },
        "image_size": 640,
        "normalize": True,
    },
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preset_config_fields(name: str, **overrides) -> dict:
    """
    The config fields of a named preset (`tiny`, `r50`, `r50-c4`, `vit-b`) with `overrides` applied.

    Args:
        name (`str`): the preset.
        overrides: config fields that replace the preset's (e.g. `id2label`, `use_pretrained_backbone`). A different
            `backbone` starts without the preset's `backbone_model_kwargs` (they are the preset backbone's
            `timm.create_model` arguments) unless `overrides` gives its own.

    Returns:
        `dict`: keyword arguments of `Pix2SeqConfig`.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    fields = dict(PRESETS[name]["config"])
    if overrides.get("backbone", fields.get("backbone")) != fields.get("backbone"):
        fields.pop("backbone_model_kwargs", None)
    return {**fields, **overrides}


def get_preset_config(name: str, **overrides) -> Pix2SeqConfig:
    """
    Builds the `Pix2SeqConfig` of a named preset (`preset_config_fields`: the preset's fields with `overrides`).

    Returns:
        `Pix2SeqConfig`
    """
    return Pix2SeqConfig(**preset_config_fields(name, **overrides))


def get_preset_image_processor_kwargs(name: str, image_size: int | None = None) -> dict:
    """Image-processor settings that go with a preset: canvas size and pixel normalisation."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    preset = PRESETS[name]
    kwargs = {"size": {"longest_edge": image_size or preset["image_size"]}}
    if preset["normalize"]:
        kwargs.update(do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return kwargs
