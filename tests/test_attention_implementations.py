"""Attention implementations a Pix2Seq model loads with: eager, sdpa and flex attention for its encoder and decoder,
while the backbone keeps one its class supports (timm backbones declare no flex attention)."""

import pytest
import torch
from transformers import ResNetConfig

from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection
from helpers import TINY_LAYOUT, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    Pix2SeqForObjectDetection(tiny_config()).save_pretrained(folder)
    return folder


def pixels() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_loads_and_detects_with_each_implementation(saved, implementation):
    model = Pix2SeqForObjectDetection.from_pretrained(saved, attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    backbone = model.model.encoder.backbone
    assert backbone.config._attn_implementation in ("eager", "sdpa")  # the timm backbone's own
    reference = Pix2SeqForObjectDetection.from_pretrained(saved, attn_implementation="eager").eval()
    with torch.no_grad():
        detections = model(pixels(), do_sample=False, max_new_tokens=10)
        # The same logits as eager attention, teacher-forced on the tokens it wrote. (Greedy tokens of a random model
        # can differ at near-ties, so they are not compared.)
        found = model(pixels(), decoder_input_ids=detections.sequences).logits
        expected = reference(pixels(), decoder_input_ids=detections.sequences).logits
    assert detections.sequences.shape == (2, 11)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_set_attn_implementation_to_flex_and_back(saved):
    model = Pix2SeqForObjectDetection.from_pretrained(saved).eval()
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    assert model.model.encoder.backbone.config._attn_implementation != "flex_attention"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_config_with_flex_attention_builds_with_a_transformers_resnet_backbone():
    backbone_config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    config = Pix2SeqConfig(
        backbone_config=backbone_config,
        encoder_hidden_size=32, decoder_hidden_size=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64,
        attn_implementation="flex_attention", **TINY_LAYOUT,
    )  # fmt: skip
    model = Pix2SeqForObjectDetection(config).eval()
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        assert model(pixels(), do_sample=False, max_new_tokens=5).sequences.shape == (2, 6)


def test_bfloat16_decoding_steps_match_the_teacher_forced_forward(saved):
    # A bf16 decoding step (one token over the static cache, its own attention path): the cached steps of `generate`
    # give the logits of the whole sequence run at once, to bf16 precision.
    model = Pix2SeqForObjectDetection.from_pretrained(saved).eval()
    with torch.no_grad():
        # Sharper attention than at initialisation, so that the logits depend on how each step attends.
        for layer in model.model.decoder.layers:
            for attention in (layer.self_attn, layer.encoder_attn):
                for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                    projection.weight.mul_(8)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        output = model.generate(
            pixels(), do_sample=False, max_new_tokens=10, output_logits=True, return_dict_in_generate=True
        )
        stepped = torch.stack(output.logits, dim=1)
        forward = model(pixels(), decoder_input_ids=output.sequences[:, :-1]).logits.float()
    assert stepped.dtype == torch.float32
    torch.testing.assert_close(stepped, forward, rtol=0, atol=0.01)
