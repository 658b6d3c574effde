"""The official Pix2Seq evaluation protocol: how the paper's COCO numbers were decoded and read."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .modeling_pix2seq import Pix2SeqObjectDetectionOutput


def official_evaluation_generation_config(config, top_p: float = 0.4) -> GenerationConfig:
    """
    The generation config of the official COCO evaluation (`configs/config_det_finetune.py` and
    `AutoregressiveDecoder.infer` of google-research/pix2seq): nucleus sampling at temperature 1 with no top-k and
    top-p 0.4 under the official rule (keep the largest set of tokens whose probability stays <= p), no token grammar,
    and always `5 * max_objects` (500) tokens: EOS does not stop decoding, it is fed back like any other token.

    Args:
        config (`Pix2SeqConfig`): the model's config.
        top_p (`float`, *optional*, defaults to 0.4): the nucleus mass.

    Returns:
        `GenerationConfig` for `model.generate` (with the Pix2Seq options `official_evaluation=True` and
        `official_top_p=True`).
    """
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=top_p,
        max_new_tokens=5 * config.max_objects,
        min_new_tokens=0,
        bos_token_id=config.bos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        pad_token_id=config.pad_token_id,
        eos_token_id=None,  # never stop early
        return_dict_in_generate=True,
        output_logits=True,
    )
    generation_config.official_evaluation = True
    generation_config.official_top_p = True
    generation_config.token_grammar = False
    return generation_config


def official_detections(sequences: torch.Tensor, logits: torch.Tensor, token_layout) -> Pix2SeqObjectDetectionOutput:
    """
    Reads detections from generated tokens as the official evaluation does (`decode_object_seq_to_bbox`): every group
    of five tokens is an object; its box is the four coordinate slots dequantised and clipped to [0, 1] whatever token
    they hold; at the class slot the softmax over the whole vocabulary is taken, the class is its argmax over
    `[class_token_offset, coord_token_offset)` and the score that class's probability. Nothing is thresholded or
    sorted.

    A group whose argmax lands on a class token beyond the model's classes (no such category: the official COCO
    evaluation cannot match it and ignores it) is marked absent in `object_mask`, and so is a group whose box has its
    maximum below its minimum on an axis (COCO's evaluation gives it a negative area, outside every area range, and
    ignores it; no box format can hold it); every other group is kept.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, 1 + T)`): generated tokens, prompt first.
        logits (`torch.FloatTensor` of shape `(batch_size, T, vocab_size)`): the raw logits of each step.
        token_layout (`Pix2SeqTokenLayout`): the model's token layout.

    Returns:
        [`Pix2SeqObjectDetectionOutput`] with `T // 5` slots per image.
    """
    batch_size, num_steps, vocab_size = logits.shape
    num_groups = num_steps // 5
    tokens = sequences[:, sequences.shape[1] - num_steps :][:, : 5 * num_groups].reshape(batch_size, num_groups, 5)
    class_probs = torch.softmax(logits[:, 4 : 5 * num_groups : 5].float(), dim=-1)
    candidates = class_probs[..., token_layout.class_token_offset : token_layout.coord_token_offset]
    scores, best = candidates.max(dim=-1)
    labels = best
    coordinates = (tokens[..., :4] - token_layout.coord_token_offset).float() / (token_layout.num_bins - 1)
    ymin, xmin, ymax, xmax = coordinates.clamp(0.0, 1.0).unbind(-1)
    real = (labels < token_layout.num_classes) & (xmin <= xmax) & (ymin <= ymax)
    class_log_probs = torch.log(
        class_probs[..., token_layout.class_token_offset : token_layout.class_token_end].clamp_min(1e-38)
    )
    return Pix2SeqObjectDetectionOutput(
        logits=class_log_probs,
        pred_boxes=torch.stack([xmin, ymin, xmax, ymax], dim=-1),
        scores=torch.where(real, scores, torch.zeros_like(scores)),
        labels=torch.where(real, labels, torch.full_like(labels, -1)),
        object_mask=real,
        sequences=sequences,
    )


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
    logits = torch.stack(tuple(output["logits"]), dim=1)
    return official_detections(output["sequences"], logits, model.config.token_layout)


__all__ = ["official_detect", "official_detections", "official_evaluation_generation_config"]
