"""Tests of inference through a backbone with its BatchNorms folded into its convolutions
(`pix2seq_hf/batch_norm_folding.py`, used by `Pix2SeqEncoder.backbone_features`)."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from transformers import AutoBackbone, ResNetConfig

import pix2seq_hf.batch_norm_folding as batch_norm_folding
from pix2seq_hf.batch_norm_folding import BatchNormFoldedConv2d, batch_norm_folded, conv_batch_norm_pairs
from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection
from helpers import tiny_config


def randomise_batch_norms(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from the identity they are initialised to."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.BatchNorm2d):
                size = norm.num_features
                norm.running_mean.copy_(torch.randn(size, generator=generator))
                norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(size, generator=generator))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    randomise_batch_norms(model.model.encoder.backbone)
    return model


def pixels(batch_size: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))


def unfolded_features(model, images) -> torch.Tensor:
    return model.model.encoder.backbone(images).feature_maps[-1]


def test_the_encoder_folds_the_early_batch_norms_in_inference_with_the_same_features(model, monkeypatch):
    folded = []
    forward = BatchNormFoldedConv2d.forward

    def recording_forward(self, hidden_states):
        output = forward(self, hidden_states)
        folded.append(bool(batch_norm_folding.FOLDED_WEIGHTS.get()[self]))
        return output

    monkeypatch.setattr(BatchNormFoldedConv2d, "forward", recording_forward)
    images = pixels()
    with torch.no_grad():
        features = model.model.encoder.backbone_features(images)
        expected = unfolded_features(model, images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    # The stem's convolution (large output, small weight) folds; the last stage's (2 x 2 outputs) does not.
    assert folded[0] and not folded[-1]
    # Outside the encoder's call nothing is kept: the backbone's modules and state dict are as they were.
    assert batch_norm_folding.FOLDED_WEIGHTS.get() is None
    assert not any(isinstance(module, BatchNormFoldedConv2d) for module in model.modules())
    assert set(model.state_dict()) == set(Pix2SeqForObjectDetection(tiny_config()).state_dict())


def test_changed_weights_and_replaced_modules_are_seen_by_the_next_call(model):
    encoder = model.model.encoder
    images = pixels()
    with torch.no_grad():
        encoder.backbone_features(images)  # builds the view
        randomise_batch_norms(encoder.backbone, seed=5)
        torch.testing.assert_close(
            encoder.backbone_features(images), unfolded_features(model, images), rtol=1e-5, atol=1e-5
        )
        stem = encoder.backbone._backbone.conv1  # timm's deep stem: convolution, BatchNorm, ReLU, ...
        first = stem[0]
        stem[0] = nn.Conv2d(first.in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
        torch.testing.assert_close(
            encoder.backbone_features(images), unfolded_features(model, images), rtol=1e-5, atol=1e-5
        )


def test_with_gradients_nothing_is_folded_and_the_convolutions_get_gradients(model):
    encoder = model.model.encoder
    features = encoder.backbone_features(pixels())
    features.sum().backward()
    assert encoder.backbone._backbone.conv1[0].weight.grad is not None


def test_generate_gives_the_tokens_of_the_unfolded_backbone(model, monkeypatch):
    images = pixels(size=96)
    folded = model.generate(images, do_sample=False, max_new_tokens=10).sequences
    monkeypatch.setattr(batch_norm_folding, "FOLD_MIN_OUTPUTS_PER_WEIGHT", float("inf"))
    torch.testing.assert_close(model.generate(images, do_sample=False, max_new_tokens=10).sequences, folded)


class ConvBatchNormPatterns(nn.Module):
    """A pair to fold, and three that must not be: a convolution whose output is also added back, a BatchNorm before
    its convolution (pre-activation), and a BatchNorm subclass with more in its forward."""

    class NormAndAct(nn.BatchNorm2d):
        def forward(self, hidden_states):
            return torch.relu(super().forward(hidden_states))

    def __init__(self):
        super().__init__()
        self.conv_a, self.norm_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.norm_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.norm_c, self.conv_c = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.conv_d, self.norm_d = nn.Conv2d(4, 4, 1), self.NormAndAct(4)

    def forward(self, hidden_states):
        hidden_states = self.norm_a(self.conv_a(hidden_states))
        convolved = self.conv_b(hidden_states)
        hidden_states = self.norm_b(convolved) + convolved
        hidden_states = self.conv_c(self.norm_c(hidden_states))
        return self.norm_d(self.conv_d(hidden_states))


class Untraceable(nn.Module):
    """Control flow on its input's shape: fx cannot trace it, but its child can be."""

    def __init__(self):
        super().__init__()
        self.inner = ConvBatchNormPatterns()

    def forward(self, hidden_states):
        if hidden_states.shape[1] != 3:
            raise ValueError("three channels")
        return self.inner(hidden_states)


def test_only_a_convolution_feeding_a_plain_batch_norm_alone_is_a_pair():
    assert conv_batch_norm_pairs(ConvBatchNormPatterns()) == [("conv_a", "norm_a")]
    assert conv_batch_norm_pairs(Untraceable()) == [("inner.conv_a", "inner.norm_a")]
    module = Untraceable().eval()
    randomise_batch_norms(module)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), batch_norm_folded(module) as view:
        assert isinstance(view.inner.conv_a, BatchNormFoldedConv2d)
        torch.testing.assert_close(view(images), module(images), rtol=1e-5, atol=1e-5)
    # A BatchNorm put back in training mode normalises with the batch's statistics, folded view or not.
    module.inner.norm_a.train()
    expected = copy.deepcopy(module)(images)
    with torch.no_grad(), batch_norm_folded(module) as view:
        torch.testing.assert_close(view(images), expected, rtol=1e-5, atol=1e-5)


def test_a_transformers_resnet_backbone_folds_its_pairs_with_the_same_features():
    torch.manual_seed(0)
    backbone = AutoBackbone.from_config(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    ).eval()
    randomise_batch_norms(backbone)
    assert len(conv_batch_norm_pairs(backbone)) >= 5  # stem and the bottlenecks' convolutions, found in its children
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), batch_norm_folded(backbone) as view:
        torch.testing.assert_close(
            view(images).feature_maps[-1], backbone(images).feature_maps[-1], rtol=1e-5, atol=1e-5
        )


def test_a_bf16_backbone_folded_is_as_close_to_float32_as_with_its_own_batch_norms(model):
    images = pixels()
    with torch.no_grad():
        reference = model.model.encoder.backbone_features(images)
        encoder = model.model.encoder.to(torch.bfloat16)
        features = encoder.backbone_features(images.to(torch.bfloat16))
        unfolded = unfolded_features(model, images.to(torch.bfloat16))
    assert features.dtype == torch.bfloat16
    error, unfolded_error = ((values.float() - reference).abs().mean() for values in (features, unfolded))
    assert error <= 1.25 * unfolded_error, (error, unfolded_error)


@pytest.mark.parametrize("with_pairs", [True, False])
def test_a_backbone_that_was_run_folded_is_freed_with_its_model(with_pairs):
    module = (Untraceable() if with_pairs else nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())).eval()
    with torch.no_grad(), batch_norm_folded(module) as view:
        view(torch.randn(1, 3, 8, 8))
    assert (view is not module) == with_pairs
    reference = weakref.ref(module)
    del module, view
    gc.collect()
    assert reference() is None
