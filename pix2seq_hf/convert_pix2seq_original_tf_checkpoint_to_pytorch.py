"""
Converts an official Pix2Seq checkpoint (google-research/pix2seq, TensorFlow 2) into a `pix2seq_hf` model folder that
`from_pretrained`, the `Auto*` classes and the object-detection pipeline load.

    python -m pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch \\
        --checkpoint_path coco_det_finetune/resnet_640x640 --pytorch_dump_folder_path pix2seq-r50-640

The checkpoint is read without TensorFlow. Only the `model/` variables are used (optimizer state, step counters and
the object graph are dropped); the architecture (ResNet-50 or ResNet-50-C4 with its width, or the ViT with its patch
size; every width and depth) is read from their names and shapes, and every variable must map onto exactly one
parameter of the same size, with no parameter left without a value.

The converted model reproduces the official one: the stem max-pool pads as TensorFlow's `'SAME'`, class tokens are
`100 + dataset category id` (`id2label` is indexed by category id, COCO's "person" is label 1, token 101, with
"N/A" for unused ids as DETR's COCO checkpoints), and the image processor resizes the [0, 1] float image with
antialiasing, pads with 0.3 and does not normalise, as the official evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import torch
from transformers.utils import logging

from transformers import ResNetConfig

from .cli import HelpFormatter
from .configuration_pix2seq import Pix2SeqConfig
from .tf_checkpoint import TFCheckpointReader


logger = logging.get_logger(__name__)

VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MODEL_PREFIX = "model/"

# COCO 2017 detection categories: {category id: name}; ids absent here are unused ("N/A").
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

# The official token layout (`vocab.py`, `configs/config_det_finetune.py`).
OFFICIAL_CLASS_TOKEN_OFFSET = 100
OFFICIAL_COORD_TOKEN_OFFSET = 1000
OFFICIAL_NUM_BINS = 1000


class ConversionError(ValueError):
    """The checkpoint cannot be converted: not Pix2Seq, an unknown architecture, or variables that do not fit."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_official_variables(checkpoint_path: str) -> dict[str, np.ndarray]:
    """
    The model variables of an official checkpoint, `{name: array}`, names without the `model/` prefix and the
    `/.ATTRIBUTES/VARIABLE_VALUE` suffix (e.g. `encoder/stem_ln/gamma`).

    Raises:
        [`ConversionError`] when the checkpoint holds no `model/` variables (not a Pix2Seq trainer checkpoint).
    """
    reader = TFCheckpointReader(checkpoint_path)
    names = [
        key for key in reader.shapes() if key.startswith(MODEL_PREFIX) and key.endswith(VARIABLE_SUFFIX)
    ]
    if not names:
        sample = ", ".join(reader.keys()[:5])
        raise ConversionError(
            f"{reader.prefix} has no `model/...` variables (found e.g. {sample}): it is not a checkpoint written by "
            "the official Pix2Seq trainer."
        )
    return {name[len(MODEL_PREFIX) : -len(VARIABLE_SUFFIX)]: reader.read(name) for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------------------------------


def _count(variables: dict, pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (a regex with one group) over the variable names."""
    found = {int(m.group(1)) for name in variables if (m := re.fullmatch(pattern, name))}
    if found and found != set(range(len(found))):
        raise ConversionError(f"Variables matching {pattern!r} have indices {sorted(found)}, not 0..{len(found) - 1}.")
    return len(found)


def _require(variables: dict, name: str) -> np.ndarray:
    if name not in variables:
        raise ConversionError(
            f"The checkpoint has no variable `model/{name}`, which every Pix2Seq model of this kind has."
        )
    return variables[name]


def _transformer_sizes(variables: dict, prefix: str, layers_name: str, attention_name: str) -> dict:
    """Depth, width, heads and feed-forward width of the Transformer stack under `prefix`."""
    num_layers = _count(variables, rf"{prefix}/{layers_name}/(\d+)/.*")
    if num_layers == 0:
        return {"layers": 0}
    hidden, heads, _ = _require(variables, f"{prefix}/{layers_name}/0/{attention_name}/_query_dense/kernel").shape
    ffn = _require(variables, f"{prefix}/{layers_name}/0/mlp/mlp_layers/0/dense1/kernel").shape[1]
    return {"layers": num_layers, "hidden": hidden, "heads": heads, "ffn": ffn}


def infer_architecture(variables: dict[str, np.ndarray]) -> dict:
    """
    Reads the architecture of an official model from its variables' names and shapes.

    Returns:
        `dict` with `kind` (`"resnet"`, `"resnet-c4"` or `"vit"`), `config` (the `Pix2SeqConfig` fields of the
        architecture) and `description` (e.g. `"ResNet-50 (C5), encoder 6x256, decoder 6x256"`).

    Raises:
        [`ConversionError`] for a model that is neither of the released architectures.
    """
    if not any(name.startswith("decoder/ar_decoder.S") for name in variables):
        raise ConversionError(
            "The checkpoint's model has no `decoder/ar_decoder.*` embeddings: it is not a Pix2Seq encoder-decoder "
            "(`encoder_ar_decoder`) model."
        )
    token_embedding = _require(variables, "decoder/ar_decoder.Stoken_embedding")
    vocab_size, decoder_hidden = token_embedding.shape
    max_positions = _require(variables, "decoder/ar_decoder.Sseq_pos_embedding").shape[0]
    decoder = _transformer_sizes(variables, "decoder/decoder", "dec_layers", "self_mha")
    if decoder["layers"] == 0:
        raise ConversionError("The checkpoint's decoder has no layers (`decoder/decoder/dec_layers/...`).")
    config = {
        "vocab_size": int(vocab_size),
        "max_position_embeddings": int(max_positions),
        "decoder_layers": decoder["layers"],
        "decoder_hidden_size": int(decoder_hidden),
        "decoder_attention_heads": int(decoder["heads"]),
        "decoder_ffn_dim": int(decoder["ffn"]),
    }

    if "encoder/stem_conv/kernel" in variables:
        patch, _, channels, hidden = variables["encoder/stem_conv/kernel"].shape
        if patch != variables["encoder/stem_conv/kernel"].shape[1]:
            raise ConversionError(f"Non-square ViT patches {variables['encoder/stem_conv/kernel'].shape[:2]}.")
        if any(name.startswith("encoder/") and "cls_token" in name for name in variables):
            raise ConversionError("ViT with a class token: the released Pix2Seq ViTs have none; not supported.")
        encoder = _transformer_sizes(variables, "encoder/transformer_encoder", "enc_layers", "mha")
        config.update(encoder_stem="patch", patch_size=int(patch), num_channels=int(channels))
        kind = "vit"
        description = f"ViT (patch {patch})"
    elif any(name.startswith("encoder/resnet/") for name in variables):
        prefix = "encoder/resnet"
        stem_pattern = rf"{prefix}/initial_conv_relu_max_pool/\d+/conv2d/kernel"
        stem_kernels = [n for n in variables if re.fullmatch(stem_pattern, n)]
        if stem_kernels != [f"{prefix}/initial_conv_relu_max_pool/0/conv2d/kernel"]:
            raise ConversionError(
                f"ResNet stem with convolutions {sorted(stem_kernels)}: only the standard 7x7 stem is supported (not "
                "the ResNet-D / selective-kernel variants)."
            )
        stem_kernel = variables[stem_kernels[0]]
        if stem_kernel.shape[:2] != (7, 7):
            raise ConversionError(f"ResNet stem kernel {stem_kernel.shape[:2]}: only 7x7 stems are supported.")
        num_groups = _count(variables, rf"{prefix}/block_groups/(\d+)/.*")
        blocks = [_count(variables, rf"{prefix}/block_groups/{g}/layers/(\d+)/.*") for g in range(num_groups)]
        if not all(
            f"{prefix}/block_groups/{g}/layers/0/conv_relu_dropblock_layers/6/conv2d/kernel" in variables
            for g in range(num_groups)
        ):
            raise ConversionError("ResNet without bottleneck blocks (ResNet-18/34): not supported.")
        depths = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
        full = tuple(blocks) + (3,) if num_groups == 3 else tuple(blocks)
        if num_groups not in (3, 4) or full not in depths:
            raise ConversionError(f"ResNet with block groups {blocks}: not a ResNet-50/101/152 (C4 or C5).")
        depth = depths[full]
        last_conv = "conv_relu_dropblock_layers/6/conv2d/kernel"
        stem_width = int(stem_kernel.shape[3])
        width = stem_width / 64
        # transformers' ResNet (any width; timm's fixes the stem at 64 channels), cut after the last block group.
        backbone_config = ResNetConfig(
            num_channels=int(stem_kernel.shape[2]),
            embedding_size=stem_width,
            hidden_sizes=[
                int(variables[f"{prefix}/block_groups/{g}/layers/0/{last_conv}"].shape[3]) for g in range(num_groups)
            ],
            depths=blocks,
            layer_type="bottleneck",
            hidden_act="relu",
            downsample_in_first_stage=False,
            downsample_in_bottleneck=False,
            out_features=[f"stage{num_groups}"],
        )
        encoder = _transformer_sizes(variables, "encoder/transformer_encoder", "enc_layers", "mha")
        hidden = int(_require(variables, "encoder/stem_projection/kernel").shape[1])
        config.update(
            backbone_config=backbone_config,
            stem_pool_padding="same",
            num_channels=int(stem_kernel.shape[2]),
        )
        kind = "resnet-c4" if num_groups == 3 else "resnet"
        description = f"ResNet-{depth}{'-C4' if num_groups == 3 else ''}"
        description += f" (width x{width:g})" if width != 1 else ""
    else:
        raise ConversionError(
            "Unknown encoder: the checkpoint has neither `encoder/resnet/...` (ResNet) nor `encoder/stem_conv` (ViT) "
            "variables."
        )

    if encoder["layers"] and encoder["hidden"] != hidden:
        raise ConversionError(f"Encoder layers of width {encoder['hidden']} after a stem of width {hidden}.")
    config.update(
        encoder_layers=encoder["layers"],
        encoder_hidden_size=int(hidden),
        encoder_attention_heads=int(encoder.get("heads", 1)),
        encoder_ffn_dim=int(encoder.get("ffn", 4 * hidden)),
    )
    bridge_ffn = _require(variables, "proj_mlp/mlp_layers/0/dense1/kernel").shape[1]
    if bridge_ffn != config["decoder_ffn_dim"]:
        raise ConversionError(
            f"The projection block's feed-forward width {bridge_ffn} differs from the decoder's "
            f"{config['decoder_ffn_dim']}; this model gives both the same width."
        )
    description += (
        f", encoder {config['encoder_layers']}x{config['encoder_hidden_size']}, decoder "
        f"{config['decoder_layers']}x{config['decoder_hidden_size']}"
    )
    return {"kind": kind, "config": config, "description": description}


def id2label_for(label_set: str | None, categories_path: str | None) -> dict[int, str]:
    """
    `id2label` indexed by dataset category id (label `i` is token `100 + i`), every id from 0 to the largest one named;
    ids without a name are `"N/A"`.

    Args:
        label_set (`str`): `"coco"` (the 80 COCO categories, ids 1..90) when `categories_path` is not given.
        categories_path (`str`, *optional*): a COCO-format annotation file (its `categories`) or a JSON `{id: name}`.
    """
    if categories_path is not None:
        with open(categories_path, encoding="utf-8") as handle:
            data = json.load(handle)
        if isinstance(data, dict) and "categories" in data:
            try:
                named = {int(c["id"]): str(c["name"]) for c in data["categories"]}
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{categories_path}: every entry of `categories` needs an int `id` and a `name`.")
        elif isinstance(data, dict):
            try:
                named = {int(k): str(v) for k, v in data.items()}
            except ValueError:
                raise ConversionError(f"{categories_path}: keys of an id -> name map must be ints.")
        else:
            raise ConversionError(f"{categories_path}: expected a COCO annotation file or a JSON {{id: name}} map.")
    elif label_set == "coco":
        named = dict(COCO_CATEGORIES)
    else:
        raise ConversionError(f"Unknown label set {label_set!r}; use `coco` or pass `--categories_path`.")
    if not named or min(named) < 0:
        raise ConversionError(f"Category ids must be non-negative, got {sorted(named)[:5]}.")
    largest = max(named)
    if OFFICIAL_CLASS_TOKEN_OFFSET + largest >= OFFICIAL_COORD_TOKEN_OFFSET:
        raise ConversionError(
            f"Category id {largest} would be token {OFFICIAL_CLASS_TOKEN_OFFSET + largest}, inside the coordinate "
            f"tokens (from {OFFICIAL_COORD_TOKEN_OFFSET})."
        )
    return {i: named.get(i, "N/A") for i in range(largest + 1)}


def build_config(variables: dict[str, np.ndarray], id2label: dict[int, str]) -> Pix2SeqConfig:
    """The `Pix2SeqConfig` of an official model: its architecture, the official token layout, no dropout at all."""
    architecture = infer_architecture(variables)
    return Pix2SeqConfig(
        **architecture["config"],
        id2label=id2label,
        num_bins=OFFICIAL_NUM_BINS,
        class_token_offset=OFFICIAL_CLASS_TOKEN_OFFSET,
        coord_token_offset=OFFICIAL_COORD_TOKEN_OFFSET,
        use_pretrained_backbone=False,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Mapping
# ---------------------------------------------------------------------------------------------------------------------

_BATCH_NORM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_LAYER_NORM = {"gamma": "weight", "beta": "bias"}
_ATTENTION = {"_query_dense": "q_proj", "_key_dense": "k_proj", "_value_dense": "v_proj", "_output_dense": "out_proj"}
_BACKBONE = "model.encoder.backbone."


def _dense(array: np.ndarray, leaf: str) -> np.ndarray:
    """Keras dense kernels are `[in, out]`, torch `[out, in]`."""
    return array.T if leaf == "kernel" else array


def _attention(array: np.ndarray, projection: str, leaf: str) -> np.ndarray:
    """Keras `MultiHeadAttention` kernels `[d, heads, head_dim]` / `[heads, head_dim, d]` -> torch linear layers."""
    if leaf == "bias":
        return array.reshape(-1)
    if projection == "_output_dense":
        return array.reshape(-1, array.shape[-1]).T
    return array.reshape(array.shape[0], -1).T


def _conv(array: np.ndarray) -> np.ndarray:
    """Keras conv kernels `[kh, kw, in, out]` -> torch `[out, in, kh, kw]`."""
    return array.transpose(3, 2, 0, 1)


def _map_transformer_layer(rest: str, prefix: str, attention_names: dict[str, str], norm_names: dict[str, str]):
    """Maps the variables of one official Transformer layer; `None` when `rest` is not one."""
    if m := re.fullmatch(r"(\w+)/(_query_dense|_key_dense|_value_dense|_output_dense)/(kernel|bias)", rest):
        if m.group(1) in attention_names:
            leaf = "weight" if m.group(3) == "kernel" else "bias"
            name = f"{prefix}.{attention_names[m.group(1)]}.{_ATTENTION[m.group(2)]}.{leaf}"
            return name, lambda a, p=m.group(2), l=m.group(3): _attention(a, p, l)
    if m := re.fullmatch(r"(\w+)/(gamma|beta)", rest):
        if m.group(1) in norm_names:
            return f"{prefix}.{norm_names[m.group(1)]}.{_LAYER_NORM[m.group(2)]}", None
    if m := re.fullmatch(r"mlp/layernorms/0/(gamma|beta)", rest):
        return f"{prefix}.final_layer_norm.{_LAYER_NORM[m.group(1)]}", None
    if m := re.fullmatch(r"mlp/mlp_layers/0/dense([12])/(kernel|bias)", rest):
        name = f"{prefix}.mlp.fc{m.group(1)}.{'weight' if m.group(2) == 'kernel' else 'bias'}"
        return name, lambda a, l=m.group(2): _dense(a, l)
    return None


def map_variable(name: str) -> tuple[str, object] | None:
    """
    The parameter (or buffer) of `Pix2SeqForObjectDetection` that the official variable `name` (without `model/`)
    becomes, and the function that turns its array into that tensor's layout (`None`: as is). `None` when the
    variable has no place in this model.
    """
    if name == "encoder/resnet/initial_conv_relu_max_pool/0/conv2d/kernel":
        return _BACKBONE + "embedder.embedder.convolution.weight", _conv
    if m := re.fullmatch(r"encoder/resnet/initial_conv_relu_max_pool/2/bn/(\w+)", name):
        if m.group(1) in _BATCH_NORM:
            return _BACKBONE + f"embedder.embedder.normalization.{_BATCH_NORM[m.group(1)]}", None
        return None
    if m := re.fullmatch(r"encoder/resnet/block_groups/(\d+)/layers/(\d+)/(.+)", name):
        block = _BACKBONE + f"encoder.stages.{m.group(1)}.layers.{m.group(2)}."
        rest = m.group(3)
        # Bottleneck: official layers 0/3/6 are the 1x1, 3x3 and 1x1 convolutions, 1/4/7 their BatchNorms.
        if c := re.fullmatch(r"conv_relu_dropblock_layers/([036])/conv2d/kernel", rest):
            return block + f"layer.{int(c.group(1)) // 3}.convolution.weight", _conv
        if c := re.fullmatch(r"conv_relu_dropblock_layers/([147])/bn/(\w+)", rest):
            if c.group(2) in _BATCH_NORM:
                return block + f"layer.{int(c.group(1)) // 3}.normalization.{_BATCH_NORM[c.group(2)]}", None
        if rest == "projection_layers/0/conv2d/kernel":
            return block + "shortcut.convolution.weight", _conv
        if c := re.fullmatch(r"projection_layers/1/bn/(\w+)", rest):
            if c.group(1) in _BATCH_NORM:
                return block + f"shortcut.normalization.{_BATCH_NORM[c.group(1)]}", None
        return None
    if m := re.fullmatch(r"encoder/stem_conv/(kernel|bias)", name):
        return f"model.encoder.patch_embedding.{'weight' if m.group(1) == 'kernel' else 'bias'}", (
            _conv if m.group(1) == "kernel" else None
        )
    if m := re.fullmatch(r"encoder/stem_projection/(kernel|bias)", name):
        return f"model.encoder.input_projection.{'weight' if m.group(1) == 'kernel' else 'bias'}", (
            lambda a, l=m.group(1): _dense(a, l)
        )
    if m := re.fullmatch(r"encoder/(stem_ln|output_ln)/(gamma|beta)", name):
        module = "input_layer_norm" if m.group(1) == "stem_ln" else "layer_norm"
        return f"model.encoder.{module}.{_LAYER_NORM[m.group(2)]}", None
    if m := re.fullmatch(r"encoder/transformer_encoder/enc_layers/(\d+)/(.+)", name):
        return _map_transformer_layer(
            m.group(2), f"model.encoder.layers.{m.group(1)}", {"mha": "self_attn"}, {"mha_ln": "self_attn_layer_norm"}
        )
    if m := re.fullmatch(r"proj/(kernel|bias)", name):
        return f"model.encoder.bridge.projection.{'weight' if m.group(1) == 'kernel' else 'bias'}", (
            lambda a, l=m.group(1): _dense(a, l)
        )
    if m := re.fullmatch(r"proj_ln/(gamma|beta)", name):
        return f"model.encoder.bridge.layer_norm.{_LAYER_NORM[m.group(1)]}", None
    if m := re.fullmatch(r"proj_mlp/layernorms/0/(gamma|beta)", name):
        return f"model.encoder.bridge.mlp_layer_norm.{_LAYER_NORM[m.group(1)]}", None
    if m := re.fullmatch(r"proj_mlp/mlp_layers/0/dense([12])/(kernel|bias)", name):
        return f"model.encoder.bridge.mlp.fc{m.group(1)}.{'weight' if m.group(2) == 'kernel' else 'bias'}", (
            lambda a, l=m.group(2): _dense(a, l)
        )
    if name == "decoder/ar_decoder.Stoken_embedding":
        return "model.decoder.embed_tokens.weight", None
    if name == "decoder/ar_decoder.Sseq_pos_embedding":
        return "model.decoder.embed_positions.weight", None
    if name == "decoder/ar_decoder.Soutp_bias":
        return "lm_head.bias", None
    if m := re.fullmatch(r"decoder/decoder/dec_layers/(\d+)/(.+)", name):
        return _map_transformer_layer(
            m.group(2),
            f"model.decoder.layers.{m.group(1)}",
            {"self_mha": "self_attn", "cross_mha": "encoder_attn"},
            {"self_ln": "self_attn_layer_norm", "cross_ln": "encoder_attn_layer_norm"},
        )
    if m := re.fullmatch(r"decoder/output_ln/(gamma|beta)", name):
        return f"model.decoder.layer_norm.{_LAYER_NORM[m.group(1)]}", None
    return None


def convert_state_dict(variables: dict[str, np.ndarray], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """
    The state dict of `model` from the official variables.

    Raises:
        [`ConversionError`] listing the variables with no place in the model, the model tensors left without a value
        (other than BatchNorm's `num_batches_tracked` and the output projection tied to the token embedding), and
        every shape mismatch.
    """
    expected = model.state_dict()
    tied = {"lm_head.weight"}
    state_dict, unplaced, mismatched, seen = {}, [], [], {}
    for name in sorted(variables):
        mapped = map_variable(name)
        if mapped is None or mapped[0] not in expected:
            unplaced.append(f"model/{name} {tuple(variables[name].shape)}")
            continue
        target, transform = mapped
        if target in seen:
            raise ConversionError(f"model/{name} and model/{seen[target]} both map onto {target}.")
        seen[target] = name
        array = transform(variables[name]) if transform is not None else variables[name]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(expected[target].dtype)
        if tuple(tensor.shape) != tuple(expected[target].shape):
            mismatched.append(
                f"model/{name} {tuple(variables[name].shape)} -> {target} needs {tuple(expected[target].shape)}, got "
                f"{tuple(tensor.shape)}"
            )
            continue
        state_dict[target] = tensor
    missing = [
        name
        for name in expected
        if name not in state_dict and name not in tied and not name.endswith("num_batches_tracked")
    ]
    problems = []
    if unplaced:
        problems.append(f"{len(unplaced)} variable(s) with no place in the model: " + "; ".join(unplaced[:20]))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]))
    if missing:
        problems.append(f"{len(missing)} model tensor(s) without a value: " + ", ".join(missing[:20]))
    if problems:
        raise ConversionError("Cannot convert the checkpoint. " + " ".join(problems))
    for name in expected:
        if name.endswith("num_batches_tracked"):
            state_dict[name] = torch.zeros_like(expected[name])
    state_dict["lm_head.weight"] = state_dict["model.decoder.embed_tokens.weight"]
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def official_image_processor(image_size: int):
    """The image processor of the official evaluation: float resize with antialiasing, pad 0.3, no mean/std."""
    from .image_processing_pix2seq import Pix2SeqImageProcessor

    return Pix2SeqImageProcessor(
        size={"longest_edge": image_size}, do_normalize=False, pad_value=0.3, official_resize=True
    )


def convert_pix2seq_checkpoint(
    checkpoint_path: str,
    pytorch_dump_folder_path: str | None = None,
    image_size: int = 640,
    label_set: str = "coco",
    categories_path: str | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
):
    """
    Converts an official checkpoint and, with `pytorch_dump_folder_path`, saves model, processor and generation
    config there (refusing a non-empty folder unless `overwrite`).

    Args:
        checkpoint_path (`str`): a checkpoint directory (its latest checkpoint is used) or prefix (`.../ckpt-10`).
        pytorch_dump_folder_path (`str`, *optional*): where to save.
        image_size (`int`, *optional*, defaults to 640): the canvas the checkpoint was trained for (640, 1024, 1333).
        label_set (`str`, *optional*, defaults to `"coco"`): class names when `categories_path` is not given.
        categories_path (`str`, *optional*): COCO-format annotation file or JSON `{id: name}` (e.g. Objects365).
        push_to_hub (`str`, *optional*): a Hub repository to push model and processor to.
        overwrite (`bool`, *optional*): allow writing into a non-empty `pytorch_dump_folder_path`.

    Returns:
        `(model, processor)`: the converted `Pix2SeqForObjectDetection` (eval mode) and its `Pix2SeqProcessor`.
    """
    from .modeling_pix2seq import Pix2SeqForObjectDetection
    from .processing_pix2seq import Pix2SeqProcessor

    if pytorch_dump_folder_path and os.path.isdir(pytorch_dump_folder_path) and os.listdir(pytorch_dump_folder_path):
        if not overwrite:
            raise FileExistsError(
                f"{pytorch_dump_folder_path} is not empty; choose another folder or pass `--overwrite`."
            )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"`image_size` must be an int of at least 32, got {image_size!r}.")

    variables = read_official_variables(checkpoint_path)
    logger.info(f"Converting {infer_architecture(variables)['description']} from {checkpoint_path}.")
    id2label = id2label_for(label_set if categories_path is None else None, categories_path)
    config = build_config(variables, id2label)
    model = Pix2SeqForObjectDetection(config)
    model.load_state_dict(convert_state_dict(variables, model), strict=True)
    model.tie_weights()
    model.eval()
    # The official reading of the coordinates (the written bins, the class probability as the score), with which the
    # published numbers were measured.
    model.generation_config.coordinate_window = 0
    processor = Pix2SeqProcessor.from_config(config, image_processor=official_image_processor(image_size))

    if pytorch_dump_folder_path:
        os.makedirs(pytorch_dump_folder_path, exist_ok=True)
        model.save_pretrained(pytorch_dump_folder_path)
        processor.save_pretrained(pytorch_dump_folder_path)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
    return model, processor


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert an official Pix2Seq TensorFlow checkpoint to a pix2seq_hf model folder.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--checkpoint_path", required=True, help="Checkpoint directory (latest checkpoint used) or prefix (ckpt-N)."
    )
    parser.add_argument("--pytorch_dump_folder_path", required=True, help="Output folder (must be empty or new).")
    parser.add_argument(
        "--image_size", type=int, default=640, help="Canvas the checkpoint was trained for: 640, 1024 or 1333."
    )
    parser.add_argument("--label_set", default="coco", choices=["coco"], help="Class names (COCO's built in).")
    parser.add_argument(
        "--categories_path",
        default=None,
        help="COCO-format annotation file (its `categories`) or JSON {id: name}, e.g. for Objects365 checkpoints.",
    )
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="Also push to this Hub repository.")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty output folder.")
    args = parser.parse_args(argv)
    model, _ = convert_pix2seq_checkpoint(
        args.checkpoint_path,
        args.pytorch_dump_folder_path,
        image_size=args.image_size,
        label_set=args.label_set,
        categories_path=args.categories_path,
        push_to_hub=args.push_to_hub,
        overwrite=args.overwrite,
    )
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"Converted {args.checkpoint_path} ({num_parameters:,} parameters) to {args.pytorch_dump_folder_path}")


if __name__ == "__main__":
    main()
