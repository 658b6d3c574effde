"""Pix2SeqConfig accepts the backbone and width arguments the way DetrConfig users pass them."""

import pytest
import torch
from transformers import ResNetConfig
from transformers.models.timm_backbone import TimmBackboneConfig

from helpers import tiny_config
from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection


def _tiny_resnet(**kwargs):
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"], **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_timm_backbone": False},
        {"use_timm_backbone": False, "backbone_kwargs": {"out_features": ["stage2"]}},
    ],
)
def test_backbone_config_with_use_timm_backbone_false_builds_a_transformers_backbone(kwargs):
    backbone_config = _tiny_resnet()
    config = tiny_config(backbone=None, backbone_config=backbone_config, **kwargs)
    assert isinstance(config.backbone_config, ResNetConfig)
    model = Pix2SeqForObjectDetection(config).eval()
    torch.manual_seed(0)
    logits = model(torch.rand(1, 3, 64, 64), decoder_input_ids=torch.tensor([[10, 201]])).logits
    assert logits.shape == (1, 2, config.vocab_size)


def test_backbone_config_as_dict_with_use_timm_backbone_false():
    config = tiny_config(backbone=None, backbone_config=_tiny_resnet().to_dict(), use_timm_backbone=False)
    assert isinstance(config.backbone_config, ResNetConfig) and config.backbone_config.out_features == ["stage2"]


def test_use_timm_backbone_false_without_backbone_is_detr_default_resnet50():
    config = Pix2SeqConfig(use_timm_backbone=False)
    assert isinstance(config.backbone_config, ResNetConfig)
    assert list(config.backbone_config.depths) == [3, 4, 6, 3] and config.backbone_config.out_features == ["stage4"]


def test_timm_backbone_config_with_arguments_that_repeat_it():
    backbone_config = TimmBackboneConfig(backbone="test_resnet", out_indices=(3,))
    config = tiny_config(
        backbone="test_resnet", backbone_config=backbone_config, use_timm_backbone=True, backbone_kwargs={"out_indices": [3]}
    )
    assert config.backbone_config.backbone == "test_resnet"
    reloaded = Pix2SeqConfig.from_dict(config.to_dict())
    assert reloaded.backbone_config.backbone == "test_resnet" and list(reloaded.backbone_config.out_indices) == [3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone_config": _tiny_resnet(), "use_timm_backbone": True}, "use_timm_backbone=True` contradicts"),
        (
            {"backbone_config": TimmBackboneConfig(backbone="test_resnet"), "use_timm_backbone": False},
            "use_timm_backbone=False` contradicts",
        ),
        ({"backbone_config": TimmBackboneConfig(backbone="test_resnet"), "backbone": "resnet50"}, "describes 'test_resnet'"),
        (
            {"backbone_config": TimmBackboneConfig(backbone="test_resnet", out_indices=[3]), "backbone_kwargs": {"out_indices": [4]}},
            r"backbone_kwargs\['out_indices'\]=\[4\]` contradicts",
        ),
    ],
)
def test_contradictions_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pix2SeqConfig(**kwargs)


def test_d_model_sets_both_widths_unless_the_encoder_width_is_given():
    config = Pix2SeqConfig(d_model=512)
    assert (config.encoder_hidden_size, config.decoder_hidden_size, config.d_model) == (512, 512, 512)
    config = Pix2SeqConfig(hidden_size=128)
    assert (config.encoder_hidden_size, config.decoder_hidden_size) == (128, 128)
    config = Pix2SeqConfig(d_model=512, encoder_hidden_size=768, encoder_attention_heads=12)
    assert (config.encoder_hidden_size, config.decoder_hidden_size) == (768, 512)
    # Saved and loaded, the widths stay as they were (d_model is not a saved field).
    reloaded = Pix2SeqConfig.from_dict(config.to_dict())
    assert (reloaded.encoder_hidden_size, reloaded.decoder_hidden_size) == (768, 512)
    with pytest.raises(ValueError, match="disagree"):
        Pix2SeqConfig(d_model=512, hidden_size=256)
