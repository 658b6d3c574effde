"""
Compares a converted official Pix2Seq checkpoint with the official implementation's own outputs.

`tests/make_official_reference.py` (TensorFlow + the official code) writes a checkpoint and `reference.npz` into a
folder; this module (PyTorch only) converts that checkpoint with `pix2seq_hf` and measures, on the official
preprocessed input:

- `pixels`: max |processor pixels - official preprocessing| for the same uint8 image;
- `backbone_features`, `encoder_output`, `encoded`: max abs difference of the ResNet's last feature map (or the ViT's
  patch embedding), of the Transformer encoder's output and of the decoder's memory;
- `logits`: max abs difference of the teacher-forced logits;
- `greedy_mismatches`: tokens that differ in 500 steps of greedy decoding (the converted model decodes with its cache),
  and `greedy_logits`: max abs difference of the logits along that path at the recorded steps;
- `top_p_mask_mismatches`: tokens kept by the official top-p rule (official logits) but not by
  `Pix2SeqTopPLogitsWarper` on the converted model's logits, or the other way round.

    python tests/official_parity.py tests/fixtures/official_tiny_r50 [more folders]
    python tests/official_parity.py --stem_pool_ablation tests/fixtures/official_tiny_r50   # symmetric stem pool
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch


def _max_diff(ours: torch.Tensor, reference: np.ndarray) -> float:
    ours = ours.detach().float().cpu().numpy()
    if ours.shape != reference.shape:
        raise AssertionError(f"Shape {ours.shape} vs the official {reference.shape}.")
    return float(np.abs(ours - reference).max())


@torch.no_grad()
def greedy_decode(model, pixel_values: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `num_tokens` tokens of plain greedy decoding (argmax of the full vocabulary, EOS fed back), with the cache.

    Returns:
        `(tokens, logits)` of shapes `(batch_size, num_tokens)` and `(batch_size, num_tokens, vocab_size)`.
    """
    encoder_outputs = model.get_encoder()(pixel_values)
    tokens = torch.full((pixel_values.shape[0], 1), model.config.bos_token_id, dtype=torch.long)
    step_input, cache, step_logits = tokens, None, []
    for _ in range(num_tokens):
        outputs = model(
            encoder_outputs=encoder_outputs, decoder_input_ids=step_input, cache=cache, use_cache=True
        )
        cache = outputs.cache
        step_logits.append(outputs.logits[:, -1])
        step_input = outputs.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, step_input], dim=1)
    return tokens[:, 1:], torch.stack(step_logits, dim=1)


@torch.no_grad()
def compare(reference_dir: str) -> dict:
    """
    Converts the checkpoint in `reference_dir` and measures it against `reference.npz` (see the module docstring).

    Returns:
        `dict` of the measurements, plus `architecture`, `num_parameters` and `greedy_margin` (the official decoding's
        smallest gap between the two best logits: how close greedy decoding came to a tie).
    """
    from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import (
        convert_pix2seq_checkpoint,
        infer_architecture,
        read_official_variables,
    )
    from pix2seq_hf.generation_pix2seq import Pix2SeqTopPLogitsWarper

    reference = np.load(os.path.join(reference_dir, "reference.npz"))
    with open(os.path.join(reference_dir, "reference.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    model, processor = convert_pix2seq_checkpoint(reference_dir, image_size=info["image_size"])
    results = {
        "architecture": infer_architecture(read_official_variables(reference_dir))["description"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }

    ours = processor.image_processor(reference["image"], return_tensors="pt")["pixel_values"]
    official_pixels = reference["pixel_values"]
    results["pixels"] = _max_diff(ours.permute(0, 2, 3, 1), official_pixels)

    pixel_values = torch.from_numpy(official_pixels).permute(0, 3, 1, 2).contiguous()
    encoder = model.get_encoder()
    if encoder.backbone is None:
        features = encoder.patch_embedding(pixel_values)
    else:
        features = encoder.backbone(pixel_values).feature_maps[-1]
    results["backbone_features"] = _max_diff(features.permute(0, 2, 3, 1), reference["backbone_features"])
    encoded = encoder(pixel_values, output_hidden_states=True)
    # The official encoder output is the last layer after the final LayerNorm (`hidden_states` stop before it).
    results["encoder_output"] = _max_diff(encoder.layer_norm(encoded.hidden_states[-1]), reference["encoder_output"])
    results["encoded"] = _max_diff(encoded.last_hidden_state, reference["encoded"])

    input_tokens = torch.from_numpy(reference["input_tokens"])
    logits = model(pixel_values=pixel_values, decoder_input_ids=input_tokens).logits
    results["logits"] = _max_diff(logits, reference["logits"])

    warper = Pix2SeqTopPLogitsWarper(float(reference["top_p"]))
    keep = torch.isfinite(warper(input_tokens, logits[0])).numpy()
    results["top_p_mask_mismatches"] = int((keep != reference["top_p_keep"]).sum())
    results["top_p_kept_tokens"] = int(reference["top_p_keep"].sum())

    greedy, greedy_logits = greedy_decode(model, pixel_values, reference["greedy_tokens"].shape[1])
    results["greedy_tokens"] = int(greedy.numel())
    results["greedy_mismatches"] = int((greedy.numpy() != reference["greedy_tokens"]).sum())
    results["greedy_logits"] = _max_diff(greedy_logits[:, reference["greedy_logit_steps"]], reference["greedy_logits"])
    results["greedy_distinct_tokens"] = int(np.unique(reference["greedy_tokens"]).size)
    results["greedy_margin"] = float(reference["greedy_margin"])
    return results


@torch.no_grad()
def stem_pool_ablation(reference_dir: str) -> dict:
    """
    What TensorFlow's `'SAME'` stem max-pool is worth for a ResNet: the share of pooled values that change, and the
    max abs change of the teacher-forced logits, when the converted model pads its stem pool symmetrically instead.
    """
    from pix2seq_hf import Pix2SeqForObjectDetection
    from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import convert_pix2seq_checkpoint

    reference = np.load(os.path.join(reference_dir, "reference.npz"))
    with open(os.path.join(reference_dir, "reference.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    model, _ = convert_pix2seq_checkpoint(reference_dir, image_size=info["image_size"])
    config = model.config.to_dict()
    config["stem_pool_padding"] = "symmetric"
    symmetric = Pix2SeqForObjectDetection(type(model.config).from_dict(config)).eval()
    symmetric.load_state_dict(model.state_dict())
    pixel_values = torch.from_numpy(reference["pixel_values"]).permute(0, 3, 1, 2).contiguous()
    input_tokens = torch.from_numpy(reference["input_tokens"])

    def pooled(m):
        embedder = m.get_encoder().backbone.embedder
        return embedder.pooler(embedder.embedder(pixel_values))

    logits = [m(pixel_values=pixel_values, decoder_input_ids=input_tokens).logits for m in (model, symmetric)]
    return {
        "pooled_values_changed": float((pooled(model) != pooled(symmetric)).float().mean()),
        "logits_change": float((logits[0] - logits[1]).abs().max()),
    }


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    folders = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    for folder in folders:
        if "--stem_pool_ablation" in sys.argv:
            print(folder, "stem pool ablation", json.dumps(stem_pool_ablation(folder)))
        else:
            print(folder, json.dumps(compare(folder)))
