"""
Builds an official Pix2Seq model (google-research/pix2seq, TensorFlow) with seeded random weights, saves it as the
official trainer does, and writes the official code's outputs for it, so that the conversion to PyTorch can be checked
against the official implementation rather than against itself.

Needs TensorFlow and the official code, which the test suite does not: run it in its own environment, e.g.

    python3.11 -m venv tfvenv && tfvenv/bin/pip install tensorflow-cpu==2.15.1 tensorflow-addons==0.23.0 \
        ml-collections einops absl-py matplotlib
    git clone https://github.com/google-research/pix2seq official   # tested at eabd4e9
    tfvenv/bin/python tests/make_official_reference.py --official_code official --variant tiny-r50 \
        --output_dir tests/fixtures/official_tiny_r50

Writes to `--output_dir`: the checkpoint (`checkpoint`, `ckpt-1.index`, `ckpt-1.data-00000-of-00001`: the `model`,
`optimizer` and `global_step` objects of the official trainer) and `reference.npz`:

- `image` (uint8 `[H, W, 3]`, a random test image) and `pixel_values` (`[1, S, S, 3]`, the official evaluation
  preprocessing of it: float in [0, 1], antialiased bilinear resize keeping the aspect ratio, pad to the canvas with
  0.3);
- `backbone_features` (ResNet: the last feature map `[1, h, w, C]`; ViT: the patch convolution's output),
  `encoder_output` (`[1, h*w, dim]`, the encoder after its output LayerNorm) and `encoded` (`[1, h*w, dim_dec]`, after
  the projection to the decoder: what the decoder attends to);
- `input_tokens` / `logits`: teacher-forced logits (`[1, T, vocab]`) for a random object sequence after the prompt;
- `greedy_tokens` (`[1, 500]`), `greedy_margin` (the smallest gap between the best and second-best logit over those
  steps) and `greedy_logits` at the steps `greedy_logit_steps`: the official decoding loop with `top_k=1`;
- `top_p` and `top_p_keep` (`[T, vocab]`, bool): which tokens the official top-p rule keeps for each row of `logits`.

`tests/official_parity.py` converts the checkpoint with `pix2seq_hf` and compares every array.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


# Model sizes: the tiny ones are the committed test fixtures (narrow and shallow, a few MB); the others are the
# released architectures, for the full-size comparison in the docs. The test images are resized down (tiny ResNets,
# R50-C4) or up (ViTs, R50, whose 333x500 image becomes 426.24 -> 426 x 640) onto the canvas.
VARIANTS = {
    "tiny-r50": dict(
        image_size=96, image_shape=(75, 120), arch=dict(
            resnet_variant="standard", resnet_depth=50, resnet_width_multiplier=0.0625, resnet_sk_ratio=0.0,
            num_encoder_layers=2, dim_att=64, dim_mlp=128, num_heads=4,
            num_decoder_layers=2, dim_att_dec=32, dim_mlp_dec=64, num_heads_dec=4,
        ),
    ),
    "tiny-r50-c4": dict(
        image_size=96, image_shape=(120, 75), arch=dict(
            resnet_variant="c4", resnet_depth=50, resnet_width_multiplier=0.0625, resnet_sk_ratio=0.0,
            num_encoder_layers=2, dim_att=64, dim_mlp=128, num_heads=4,
            num_decoder_layers=2, dim_att_dec=32, dim_mlp_dec=64, num_heads_dec=4,
        ),
    ),
    "tiny-vit": dict(
        image_size=64, image_shape=(40, 50), arch=dict(
            resnet_variant="c1", patch_size=16,
            num_encoder_layers=2, dim_att=64, dim_mlp=128, num_heads=4,
            num_decoder_layers=2, dim_att_dec=32, dim_mlp_dec=64, num_heads_dec=4,
        ),
    ),
    "r50": dict(image_size=640, image_shape=(333, 500), arch="resnet"),
    "r50-c4": dict(image_size=640, image_shape=(853, 640), arch="resnet-c"),
    "vit-b": dict(image_size=640, image_shape=(480, 640), arch="vit-b"),
}

TEACHER_FORCED_OBJECTS = 10
GREEDY_TOKENS = 500
# Steps of the greedy decoding whose logits are recorded (the cached decoding path, checked along the way).
GREEDY_LOGIT_STEPS = (0, 1, 2, 3, 4, 5, 10, 50, 100, 250, 499)
TOP_P = 0.4


def build_config(variant: dict):
    """The official detection config (`configs/config_det_finetune.py`) with the variant's architecture and size."""
    from configs import config_det_finetune
    from configs.config_base import architecture_config_map

    config = config_det_finetune.get_config()
    arch = variant["arch"]
    arch = dict(architecture_config_map[arch]) if isinstance(arch, str) else arch
    for key, value in arch.items():
        config.model[key] = value
    size = variant["image_size"]
    config.model.image_size = (size, size)
    config.task.image_size = (size, size)
    config.model.pretrained_ckpt = ""
    return config


def randomize(model, seed: int) -> None:
    """
    Gives every variable seeded random values: He-normal kernels, small random biases, BatchNorm statistics and
    LayerNorm/BatchNorm affine parameters away from identity, and unit-scale token embeddings.
    """
    rng = np.random.default_rng(seed)
    for variable in sorted(model.variables, key=lambda v: v.name):
        name, shape = variable.name, tuple(variable.shape)
        if name.endswith("moving_mean:0"):
            value = rng.normal(0.0, 0.1, shape)
        elif name.endswith("moving_variance:0"):
            value = rng.uniform(0.5, 1.5, shape)
        elif "ar_decoder" in name and name.endswith("ouput_ln/gamma:0"):  # the decoder's output LayerNorm
            value = rng.uniform(0.5, 1.5, shape) * 2.0 / np.sqrt(shape[-1])
        elif name.endswith("gamma:0"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("beta:0") or name.endswith("bias:0"):
            value = rng.normal(0.0, 0.1, shape)
        elif "token_embedding" in name:
            # Unit-scale embeddings, so that the decoder's input token weighs as much as its other inputs (greedy
            # decoding then follows the tokens rather than repeating one); the decoder's output LayerNorm gets a small
            # gain (above) that keeps the logits' spread at about 2.
            value = rng.normal(0.0, 1.0, shape)
        elif "pos_embedding" in name:  # as large as the token embeddings: each step sees a different input
            value = rng.normal(0.0, 1.0, shape)
        elif len(shape) == 4:  # conv kernel [kh, kw, in, out]
            value = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[2])), shape)
        elif len(shape) >= 2:  # dense / attention kernels
            fan_in = shape[0] if "output_dense" not in name else int(np.prod(shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        variable.assign(value.astype(np.float32))


def official_preprocess(image: np.ndarray, image_size: int):
    """The official evaluation preprocessing (decode to float, then the eval transforms up to padding)."""
    import tensorflow as tf
    from configs import transform_configs
    from data import transforms

    example = {
        "image": tf.image.convert_image_dtype(tf.constant(image), tf.float32),
        "bbox": tf.zeros([1, 4]),
        "label": tf.zeros([1], tf.int64),
        "area": tf.zeros([1]),
        "is_crowd": tf.zeros([1], tf.int64),
    }
    for transform_config in transform_configs.get_object_detection_eval_transforms((image_size, image_size), 100):
        example = transforms.TransformRegistry.lookup(transform_config.name)(transform_config).process_example(example)
    return example["image"][None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_code", required=True, help="Checkout of google-research/pix2seq.")
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.abspath(args.official_code))
    import tensorflow as tf
    from architectures.transformers import top_logits
    from models import ar_model

    tf.random.set_seed(args.seed)
    variant = VARIANTS[args.variant]
    config = build_config(variant)
    size = variant["image_size"]
    rng = np.random.default_rng(args.seed)

    model = ar_model.Model(config)
    # Build every variable with one call, as the trainer's first step does.
    model(tf.zeros([1, size, size, 3]), tf.zeros([1, 2], tf.int64), training=False)
    randomize(model, args.seed)

    os.makedirs(args.output_dir, exist_ok=True)
    optimizer = tf.keras.optimizers.legacy.Adam()
    checkpoint = tf.train.Checkpoint(model=model, global_step=optimizer.iterations, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, args.output_dir, max_to_keep=1)
    manager.save()

    # A smooth random image (so that resizing matters) of the variant's shape.
    height, width = variant["image_shape"]
    coarse = rng.uniform(0, 255, (height // 4 + 2, width // 4 + 2, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], (height, width), method="bicubic")[0].numpy()
    image = np.clip(np.round(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)
    pixel_values = official_preprocess(image, size)

    encoder = model.encoder
    if config.model.resnet_variant == "c1":
        backbone_features = encoder.stem_conv(pixel_values)
    else:
        backbone_features = encoder.resnet(pixel_values, training=False)[0][-1]
    encoder_output = encoder(pixel_values, training=False)
    encoded = model._encode_images(pixel_values, training=False)

    # A random object sequence: 4 coordinate tokens and a class token per object, the prompt first.
    objects = []
    for _ in range(TEACHER_FORCED_OBJECTS):
        objects += list(rng.integers(1000, 2000, 4)) + [int(rng.integers(100, 1000))]
    input_tokens = np.array([[10] + objects[:-1]], dtype=np.int64)
    logits = model.decoder(tf.constant(input_tokens), encoded, training=False)
    keep = top_logits(logits[0], k=0, p=TOP_P).numpy() > -1e9

    greedy_tokens, greedy_logits, _ = model.infer(
        pixel_values, tf.constant([[10]], tf.int64), max_seq_len=GREEDY_TOKENS + 1, top_k=1
    )
    top2 = tf.math.top_k(greedy_logits[0], k=2).values.numpy()
    greedy_logit_steps = np.array(GREEDY_LOGIT_STEPS)

    np.savez_compressed(
        os.path.join(args.output_dir, "reference.npz"),
        image=image,
        pixel_values=pixel_values.numpy(),
        backbone_features=backbone_features.numpy(),
        encoder_output=encoder_output.numpy(),
        encoded=encoded.numpy(),
        input_tokens=input_tokens,
        logits=logits.numpy(),
        top_p=np.float32(TOP_P),
        top_p_keep=keep,
        greedy_tokens=greedy_tokens.numpy(),
        greedy_margin=np.float32((top2[:, 0] - top2[:, 1]).min()),
        greedy_logit_steps=greedy_logit_steps,
        greedy_logits=greedy_logits.numpy()[:, greedy_logit_steps],
    )
    info = {
        "variant": args.variant,
        "seed": args.seed,
        "image_size": size,
        "model": {key: value for key, value in config.model.items() if not isinstance(value, (list, tuple))},
        "num_parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "tensorflow": tf.__version__,
    }
    with open(os.path.join(args.output_dir, "reference.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True, default=str)
    print(json.dumps({k: info[k] for k in ("variant", "num_parameters")}), "->", args.output_dir)


if __name__ == "__main__":
    main()
