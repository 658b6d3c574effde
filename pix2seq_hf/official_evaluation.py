"""The official Pix2Seq evaluation protocol: how the paper's COCO numbers were decoded and read."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .box_codec import Pix2SeqBoxCodec
from .generation_pix2seq import generated_tokens_and_logits, pix2seq_generation_options
from .modeling_pix2seq import Pix2SeqObjectDetectionOutput


def official_evaluation_generation_config(config, top_p: float = 0.4) -> GenerationConfig:
    """
    The generation config of the official COCO evaluation (`configs/config_det_finetune.py` and
    `AutoregressiveDecoder.infer` of google-research/pix2seq): nucleus sampling at temperature 1 with no top-k and
    top-p 0.4 under the official rule (keep the largest set of tokens whose probability stays <= p), no token grammar,
    and always `5 * max_objects` (500) tokens: EOS does not stop decoding (`eos_token_id=[]`), it is fed back like any
    other token.

    Args:
        config (`Pix2SeqConfig`): the model's config.
        top_p (`float`, *optional*, defaults to 0.4): the nucleus mass.

    Returns:
        `GenerationConfig` for `model.generate` (with the Pix2Seq options `token_grammar=False` and
        `official_top_p=True`, which leave no Pix2Seq logits processor but the official top-p).
    """
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=top_p,
        max_new_tokens=config.token_layout.max_sequence_length,
        min_new_tokens=0,
        bos_token_id=config.bos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        pad_token_id=config.pad_token_id,
        eos_token_id=[],  # no stop token (`None` would be filled in with the model's EOS)
        return_dict_in_generate=True,
        output_logits=True,
    )
    for name, value in pix2seq_generation_options(None, token_grammar=False, official_top_p=True).items():
        setattr(generation_config, name, value)
    return generation_config


def official_detections(sequences: torch.Tensor, logits: torch.Tensor, token_layout) -> Pix2SeqObjectDetectionOutput:
    """
    Reads detections from generated tokens as the official evaluation does (`decode_object_seq_to_bbox`), with
    [`Pix2SeqBoxCodec.decode_groups`] in its official mode: every group of five tokens is an object, its box the four
    coordinate slots dequantised and clipped to [0, 1] whatever token they hold, its class the argmax of the softmax
    over the whole vocabulary restricted to `[class_token_offset, coord_token_offset)` and its score that class's
    probability. Nothing is thresholded or sorted. A group whose class lies beyond the model's classes, or whose box
    has its maximum below its minimum on an axis, is marked absent in `object_mask` (COCO's evaluation ignores both).

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, 1 + T)`): generated tokens, prompt first.
        logits (`torch.FloatTensor` of shape `(batch_size, T, vocab_size)`): the raw logits of each step.
        token_layout (`Pix2SeqTokenLayout`): the model's token layout.

    Returns:
        [`Pix2SeqObjectDetectionOutput`] with `T // 5` slots per image, one per group where it was read.
    """
    decoded = Pix2SeqBoxCodec(token_layout).decode_groups(
        sequences[:, sequences.shape[1] - logits.shape[1] :], logits, mode="official"
    )
    return Pix2SeqObjectDetectionOutput.from_decoded(decoded, sequences)


@torch.no_grad()
def official_detect(model, pixel_values: torch.Tensor, top_p: float = 0.4, **generate_kwargs):
    """
    Detects objects exactly as the official COCO evaluation: [`official_evaluation_generation_config`], then
    [`official_detections`]. Post-process with `threshold=0.0` to keep every detection, as the official evaluation.

    Example:

    ```python
    >>> outputs = official_detect(model, inputs.pixel_values)
    >>> processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    ```

    Args:
        model (`Pix2SeqForObjectDetection`)
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`)
        top_p (`float`, *optional*, defaults to 0.4)
        generate_kwargs: further `generate` options (e.g. `max_new_tokens`).

    Returns:
        [`Pix2SeqObjectDetectionOutput`].
    """
    generation_config = official_evaluation_generation_config(model.config, top_p=top_p)
    output = model.generate(pixel_values, generation_config=generation_config, custom_generate=None, **generate_kwargs)
    _, logits = generated_tokens_and_logits(output)
    return official_detections(output["sequences"], logits, model.config.token_layout)


__all__ = ["official_detect", "official_detections", "official_evaluation_generation_config"]
