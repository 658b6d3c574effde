"""Named model sizes (`pix2seq_hf.presets`)."""

import pytest

from pix2seq_hf.presets import get_preset_config


def test_tiny_is_a_half_width_resnet18_that_builds():
    from pix2seq_hf import Pix2SeqForObjectDetection

    config = get_preset_config("tiny", use_pretrained_backbone=False)
    assert config.backbone_model_kwargs == {"channels": [32, 64, 128, 256]}
    backbone = Pix2SeqForObjectDetection(config).model.encoder.backbone._backbone
    assert backbone.layer3[-1].conv2.out_channels == 128  # stride 16, half of ResNet-18's 256


def test_the_preset_backbone_arguments_go_with_the_preset_backbone_only():
    assert get_preset_config("tiny", backbone="test_resnet").backbone_model_kwargs is None
    assert get_preset_config("tiny", backbone="resnet18").backbone_model_kwargs == {"channels": [32, 64, 128, 256]}
    assert get_preset_config("tiny", backbone_model_kwargs=None).backbone_model_kwargs is None
    own = {"channels": [16, 32, 64, 128]}
    assert get_preset_config("tiny", backbone="resnet34", backbone_model_kwargs=own).backbone_model_kwargs == own
    assert get_preset_config("vit-b", backbone="test_vit").backbone_model_kwargs is None


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        get_preset_config("huge")
