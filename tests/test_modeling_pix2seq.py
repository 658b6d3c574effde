"""Tests of the Pix2Seq model (`pix2seq_hf/modeling_pix2seq.py`): loss, outputs, loading, caching, backbones.

They follow the checks transformers runs on its own models (`tests/test_modeling_common.py`) on a tiny config.
"""

import json

import pytest
import torch
from transformers import CompileConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pix2seq_hf.modeling_pix2seq as modeling_pix2seq
from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig
from pix2seq_hf.modeling_pix2seq import (
    Pix2SeqForObjectDetection,
    Pix2SeqModel,
    build_2d_sincos_position_embedding,
    shift_tokens_right,
)
from helpers import tiny_config as shared_tiny_config


VOCAB, COORD, CLASS, NOISE, EOS, BOS = 300, 200, 40, 30, 0, 10


def tiny_config(**overrides) -> Pix2SeqConfig:
    """A model well under 1M parameters (see `helpers.tiny_config`)."""
    return shared_tiny_config(layers=2, **overrides)


def make_model(seed: int = 0, **overrides) -> Pix2SeqForObjectDetection:
    torch.manual_seed(seed)
    return Pix2SeqForObjectDetection(tiny_config(**overrides)).eval()


def make_pixels(batch_size: int = 2, seed: int = 1, size=(64, 64)) -> torch.Tensor:
    return torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed))


def make_labels(batch_size: int = 2, num_objects: int = 3, length: int = 25, seed: int = 2) -> torch.Tensor:
    """Targets: `num_objects` real objects, one noise object (coordinates ignored), then EOS padding."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((batch_size, length), EOS, dtype=torch.long)
    for b in range(batch_size):
        for i in range(num_objects):
            labels[b, 5 * i : 5 * i + 4] = COORD + torch.randint(0, 100, (4,), generator=generator)
            labels[b, 5 * i + 4] = CLASS + int(torch.randint(0, 5, (1,), generator=generator))
        labels[b, 5 * num_objects : 5 * num_objects + 4] = -100
        labels[b, 5 * num_objects + 4] = NOISE
    return labels


@pytest.fixture(scope="module")
def model():
    return make_model()


# ---------------------------------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------------------------------


def test_tiny_config_is_small(model):
    num_parameters = sum(p.numel() for p in model.parameters())
    assert num_parameters < 1_000_000


def test_r50_parameter_count():
    """The paper's ResNet-50 model (encoder 6x256, decoder 6x256, FFN 1024, 8 heads) has 36.6M parameters."""
    config = Pix2SeqConfig(backbone="resnet50")
    assert (config.encoder_layers, config.decoder_layers, config.encoder_hidden_size) == (6, 6, 256)
    assert (config.encoder_ffn_dim, config.encoder_attention_heads) == (1024, 8)
    with torch.device("meta"):
        r50 = Pix2SeqForObjectDetection(config)
    num_parameters = sum(p.numel() for p in r50.parameters())  # tied embedding counted once
    print(f"Pix2Seq R50 parameters: {num_parameters:,}")
    assert 36_000_000 < num_parameters < 38_000_000


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, eos_weight: float) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total, weight_sum = 0.0, 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == -100:
                continue
            weight = eos_weight if label == EOS else 1.0
            total += -weight * float(log_probs[b, t, label].detach())
            weight_sum += weight
    return torch.tensor(total / weight_sum, dtype=torch.float64)


def test_loss_matches_hand_computation_and_backward():
    model = make_model(eos_token_weight=0.1)
    pixels, labels = make_pixels(), make_labels()
    decoder_input_ids = shift_tokens_right(labels, EOS, BOS)
    outputs = model(pixels, decoder_input_ids=decoder_input_ids, labels=labels)
    assert outputs.logits.shape == (2, 25, VOCAB)
    assert torch.isfinite(outputs.loss)
    torch.testing.assert_close(
        outputs.loss.double(), hand_loss(outputs.logits.detach(), labels, 0.1), rtol=1e-5, atol=1e-6
    )

    outputs.loss.backward()
    for name in ("lm_head.bias", "model.decoder.embed_tokens.weight", "model.encoder.input_projection.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.encoder.backbone.parameters())


def test_eos_weight_and_ignored_targets_change_the_loss_as_expected():
    labels = make_labels()
    pixels = make_pixels()
    decoder_input_ids = shift_tokens_right(labels, EOS, BOS)
    losses = {}
    for weight in (0.1, 1.0, 0.0):
        model = make_model(eos_token_weight=weight)
        outputs = model(pixels, decoder_input_ids=decoder_input_ids, labels=labels)
        losses[weight] = outputs.loss
        torch.testing.assert_close(
            outputs.loss.double(), hand_loss(outputs.logits, labels, weight), rtol=1e-5, atol=1e-6
        )
    assert len({round(float(v.detach()), 6) for v in losses.values()}) == 3

    # Changing the model's input where the target is -100 changes nothing but the ignored target itself.
    model = make_model()
    other = labels.clone()
    other[labels == -100] = COORD + 7
    with_ignored = model(pixels, decoder_input_ids=decoder_input_ids, labels=labels).loss
    with_counted = model(pixels, decoder_input_ids=decoder_input_ids, labels=other).loss
    assert not torch.isclose(with_ignored, with_counted)
    logits = model(pixels, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(with_counted.double(), hand_loss(logits, other, 0.1), rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss(model):
    labels = torch.full((1, 10), -100)
    loss = model(make_pixels(1), labels=labels).loss
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(model.lm_head.bias.grad).all()
    model.zero_grad()


def test_labels_only_are_shifted_right(model):
    labels = make_labels()
    decoder_input_ids = shift_tokens_right(labels, EOS, BOS)
    assert (decoder_input_ids[:, 0] == BOS).all()
    assert (decoder_input_ids[:, 1:][labels[:, :-1] == -100] == EOS).all()
    from_labels = model(make_pixels(), labels=labels)
    explicit = model(make_pixels(), decoder_input_ids=decoder_input_ids, labels=labels)
    torch.testing.assert_close(from_labels.logits, explicit.logits)
    torch.testing.assert_close(from_labels.loss, explicit.loss)


@pytest.mark.parametrize("bad_id", [VOCAB, 3000, -5])
def test_label_outside_vocabulary_raises(model, bad_id):
    labels = make_labels()
    labels[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id}.*vocab_size={VOCAB}"):
        model(make_pixels(), labels=labels)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_tuple_and_dict_outputs_agree(model):
    pixels, labels = make_pixels(), make_labels()
    as_dict = model(pixels, labels=labels, output_hidden_states=True)
    as_tuple = model(pixels, labels=labels, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for a, b in zip(as_tuple, expected, strict=True):
        if isinstance(a, tuple):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y)
        else:
            torch.testing.assert_close(a, b)


def test_attentions_and_hidden_states_shapes():
    model = make_model(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    pixels = make_pixels(2)
    decoder_input_ids = torch.tensor([[BOS, COORD + 1, COORD + 2], [BOS, COORD + 3, COORD + 4]])
    outputs = model(pixels, decoder_input_ids=decoder_input_ids, output_attentions=True, output_hidden_states=True)
    memory = 4  # 2x2 feature map of test_resnet at 64x64
    assert len(outputs.encoder_attentions) == 2 and len(outputs.decoder_attentions) == 2
    assert len(outputs.cross_attentions) == 2
    for attention in outputs.encoder_attentions:
        assert attention.shape == (2, 4, memory, memory)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, memory))
    for attention in outputs.decoder_attentions:
        assert attention.shape == (2, 4, 3, 3)
        assert (attention.triu(diagonal=1) == 0).all()  # causal
    for attention in outputs.cross_attentions:
        assert attention.shape == (2, 4, 3, memory)
    assert len(outputs.encoder_hidden_states) == 3 and len(outputs.decoder_hidden_states) == 3
    assert all(h.shape == (2, memory, 32) for h in outputs.encoder_hidden_states)
    assert all(h.shape == (2, 3, 32) for h in outputs.decoder_hidden_states)
    assert outputs.encoder_last_hidden_state.shape == (2, memory, 32)
    # The last decoder hidden state is the one the output projection reads.
    torch.testing.assert_close(model.lm_head(outputs.decoder_hidden_states[-1]), outputs.logits)


def test_sdpa_matches_eager():
    sdpa = make_model()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = make_model(attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    pixels, labels = make_pixels(), make_labels()
    torch.testing.assert_close(
        sdpa(pixels, labels=labels).logits, eager(pixels, labels=labels).logits, rtol=1e-5, atol=1e-5
    )


def test_flex_attention_matches_sdpa_in_inference():
    sdpa = make_model()
    flex = make_model()
    # The backbone (timm) has no attention of its own to dispatch.
    flex.set_attn_implementation({"": "flex_attention", "backbone_config": "eager"})
    assert flex.config._attn_implementation == "flex_attention"
    pixels, labels = make_pixels(), make_labels()
    with torch.no_grad():  # flex attention has no backward on CPU
        torch.testing.assert_close(
            flex(pixels, labels=labels).logits, sdpa(pixels, labels=labels).logits, rtol=1e-5, atol=1e-5
        )


def test_the_decoder_compiles_as_one_graph_over_a_static_cache():
    model = make_model()
    pixels = make_pixels()
    kwargs = dict(do_sample=False, max_new_tokens=6, static_decoding=False)
    reference = model.generate(pixels, **kwargs)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    compiled = model.generate(pixels, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(compiled.sequences, reference.sequences)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixels, labels = make_pixels(), make_labels()

    def gradients(checkpointing: bool) -> dict:
        model = make_model(dropout=0.0, drop_path_rate=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
        model(pixels, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batch_equals_images_one_by_one(model):
    pixels = make_pixels(3)
    labels = make_labels(3)
    batched = model(pixels, labels=labels).logits
    for i in range(3):
        single = model(pixels[i : i + 1], labels=labels[i : i + 1]).logits
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)


def test_several_sequences_per_image_share_one_encoder_pass():
    """`k` sequences per image (rows `i * k ...`) give what the images repeated `k` times give, auxiliary loss included."""
    model = make_model(auxiliary_loss_weight=1.0)
    pixels, labels = make_pixels(2), make_labels(6)
    shared = model(pixels, labels=labels)
    repeated = model(pixels.repeat_interleave(3, dim=0), labels=labels)
    torch.testing.assert_close(shared.logits, repeated.logits, rtol=1e-5, atol=1e-5)
    # The sequences of one image hold its objects (in other orders): the auxiliary loss reads them once.
    same_objects = make_labels(2).repeat_interleave(3, dim=0)
    torch.testing.assert_close(
        model(pixels, labels=same_objects).loss,
        model(pixels.repeat_interleave(3, dim=0), labels=same_objects).loss,
        rtol=1e-5,
        atol=1e-5,
    )
    encoder_outputs = model.get_encoder()(pixels)
    torch.testing.assert_close(model(encoder_outputs=encoder_outputs, labels=labels).loss, shared.loss)
    with pytest.raises(ValueError, match="`labels` has 5 rows but `pixel_values` holds 2 images"):
        model(pixels, labels=labels[:5])


def test_dropout_and_drop_path_only_in_training():
    model = make_model(dropout=0.1, drop_path_rate=0.1)
    pixels, labels = make_pixels(), make_labels()
    torch.testing.assert_close(model(pixels, labels=labels).logits, model(pixels, labels=labels).logits)
    model.train()
    assert not torch.allclose(model(pixels, labels=labels).logits, model(pixels, labels=labels).logits)


def test_encoder_outputs_can_be_reused(model):
    pixels, labels = make_pixels(), make_labels()
    encoder = model.get_encoder()
    assert encoder is model.model.encoder
    encoder_outputs = encoder(pixels)
    torch.testing.assert_close(
        model(encoder_outputs=encoder_outputs, labels=labels).logits, model(pixels, labels=labels).logits
    )
    as_tuple = (encoder_outputs.last_hidden_state,)
    torch.testing.assert_close(
        model(encoder_outputs=as_tuple, labels=labels).logits, model(pixels, labels=labels).logits
    )


def test_the_backbone_reads_channels_last_images_on_a_cpu_with_the_same_features(model):
    pixels = make_pixels()
    backbone = model.model.encoder.backbone
    seen = {}

    def record(module, args, kwargs, output):
        seen["channels_last"] = args[0].is_contiguous(memory_format=torch.channels_last)
        seen["features"] = output.feature_maps[-1]

    handle = backbone.register_forward_hook(record, with_kwargs=True)
    try:
        model.model.encoder(pixels)
    finally:
        handle.remove()
    assert seen["channels_last"] and pixels.is_contiguous()
    # The backbone called on the images as given (the usual layout): the same features up to float rounding.
    torch.testing.assert_close(seen["features"], backbone(pixels).feature_maps[-1], rtol=1e-5, atol=1e-5)


def test_a_batch_goes_through_the_backbone_in_chunks_of_images_on_a_cpu_with_the_same_features(model, monkeypatch):
    pixels = make_pixels(batch_size=3)
    encoder = model.model.encoder
    at_once = encoder(pixels).last_hidden_state  # three 64 x 64 images are within one chunk's pixels
    calls = []
    forward = encoder.backbone.forward

    def counting_forward(pixel_values, **kwargs):
        calls.append(pixel_values.shape[0])
        return forward(pixel_values, **kwargs)

    monkeypatch.setattr(encoder.backbone, "forward", counting_forward)
    monkeypatch.setattr(modeling_pix2seq, "BACKBONE_CHUNK_PIXELS", 2 * 64 * 64)
    torch.testing.assert_close(encoder(pixels).last_hidden_state, at_once, rtol=1e-5, atol=1e-5)
    assert calls == [2, 1]

    # A training backbone normalises with the batch's statistics: it reads the batch at once.
    calls.clear()
    encoder.backbone.train()
    try:
        encoder(pixels)
    finally:
        encoder.backbone.eval()
    assert calls == [3]


def test_incremental_decoding_with_cache_matches_full_pass(model):
    """Decoding token by token with the cache (cross-attention keys/values reused) gives the full pass's logits."""
    pixels = make_pixels(2)
    tokens = torch.cat([torch.full((2, 1), BOS), make_labels(2)[:, :9].clamp(min=0)], dim=1)
    full = model(pixels, decoder_input_ids=tokens).logits
    encoder_outputs = model.get_encoder()(pixels)
    cache = None
    for t in range(tokens.shape[1]):
        outputs = model(
            encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True
        )
        cache = outputs.cache
        torch.testing.assert_close(outputs.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == tokens.shape[1]
    assert all(cache.is_updated[i] for i in range(model.config.decoder_layers))


def test_positions_beyond_max_position_embeddings_raise(model):
    tokens = torch.full((1, 65), COORD)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(make_pixels(1), decoder_input_ids=tokens)


def test_bad_pixel_values_raise(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 64, 64), decoder_input_ids=torch.tensor([[BOS]]))


def test_base_model_returns_hidden_states():
    torch.manual_seed(0)
    base = Pix2SeqModel(tiny_config()).eval()
    outputs = base(make_pixels(2), decoder_input_ids=torch.tensor([[BOS, COORD], [BOS, COORD + 1]]))
    assert outputs.last_hidden_state.shape == (2, 2, 32)
    assert outputs.encoder_last_hidden_state.shape == (2, 4, 32)


def test_2d_sincos_positions():
    embedding = build_2d_sincos_position_embedding(3, 5, 16)
    assert embedding.shape == (15, 16)
    # Row half: first row has position 0 -> sin 0, cos 1; last row position 2*pi.
    torch.testing.assert_close(embedding[0, :4], torch.zeros(4))
    torch.testing.assert_close(embedding[0, 4:8], torch.ones(4))
    torch.testing.assert_close(embedding[14, 4], torch.tensor(1.0))  # cos(2*pi * inv_freq[0] = 2*pi)
    # Column half of row-major entries: (row 0, col 4) has the last column position.
    torch.testing.assert_close(embedding[4, 8:16], embedding[14, 8:16])
    # A single row or column (n = 1) is position 0, not a division by zero.
    assert torch.isfinite(build_2d_sincos_position_embedding(1, 1, 8)).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        build_2d_sincos_position_embedding(2, 2, 10)


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation, tying, saving and loading
# ---------------------------------------------------------------------------------------------------------------------


def test_init_weights_covers_every_parameter():
    """With `init_std` ~ 0, every non-backbone weight initialised by `_init_weights` is 0 or 1 (LayerNorm)."""
    model = make_model(init_std=1e-10)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
        if name.startswith("model.encoder.backbone."):
            continue
        mean = float(parameter.detach().mean())
        assert abs(parameter).max() < 1e-8 or (parameter == 1).all(), f"{name} not initialised by _init_weights"
        assert mean in (0.0, 1.0) or abs(mean) < 1e-9, name
    for buffer_name, buffer in model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), buffer_name


def test_missing_weights_are_initialised_on_load(tmp_path):
    model = make_model(init_std=0.02)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key in ("lm_head.bias", "model.encoder.input_projection.weight", "model.decoder.layer_norm.weight"):
        del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    assert (loaded.lm_head.bias == 0).all()
    assert (loaded.model.decoder.layer_norm.weight == 1).all()
    weight = loaded.model.encoder.input_projection.weight.detach()
    assert torch.isfinite(weight).all() and 0.01 < float(weight.std()) < 0.03 and float(weight.abs().max()) <= 0.04
    torch.testing.assert_close(
        loaded.model.decoder.layers[0].mlp.fc1.weight, model.model.decoder.layers[0].mlp.fc1.weight
    )


def test_output_projection_is_tied_to_the_token_embedding(model):
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.model.decoder.embed_tokens
    assert model.lm_head.bias is not None


def test_save_and_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["top_p"] == 0.4 and generation["top_k"] == 0
    assert generation["max_new_tokens"] == 50 and generation["decoder_start_token_id"] == BOS
    assert generation["eos_token_id"] == EOS and generation["pad_token_id"] == EOS
    assert generation["return_dict_in_generate"] is True and generation["output_logits"] is True
    assert generation["token_grammar"] is True and generation["suppress_eos"] is False
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once

    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight
    assert loaded.generation_config.top_p == 0.4 and loaded.generation_config.token_grammar is True
    pixels, labels = make_pixels(), make_labels()
    expected = model(pixels, labels=labels)
    actual = loaded(pixels, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_without_generation_config_gets_pix2seq_defaults(tmp_path, model):
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    generation_config = loaded.generation_config
    assert generation_config.do_sample is True and generation_config.top_p == 0.4 and generation_config.top_k == 0
    assert generation_config.max_new_tokens == 50 and generation_config.output_logits is True
    assert generation_config.min_objects == 0 and generation_config.official_top_p is False


# ---------------------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------------------


def test_timm_vit_backbone_any_resolution():
    model = make_model(backbone="test_vit", backbone_model_kwargs={"dynamic_img_size": True}, encoder_layers=0)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    for size in ((64, 64), (48, 80)):
        outputs = model(make_pixels(1, size=size), labels=make_labels(1, num_objects=1, length=10))
        assert torch.isfinite(outputs.loss)
        # test_vit has stride 16.
        assert outputs.encoder_last_hidden_state.shape == (1, (size[0] // 16) * (size[1] // 16), 32)


def test_transformers_backbone():
    from transformers import ResNetConfig

    backbone_config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    model = make_model(backbone=None, backbone_config=backbone_config)
    outputs = model(make_pixels(1), labels=make_labels(1, num_objects=1, length=10))
    assert torch.isfinite(outputs.loss)
    assert outputs.encoder_last_hidden_state.shape == (1, 64, 32)  # stride 8 at 64x64
    with pytest.raises(ValueError, match="backbone_model_kwargs"):
        make_model(backbone=None, backbone_config=backbone_config, backbone_model_kwargs={"dynamic_img_size": True})


def test_decoder_input_outside_vocabulary_raises(model):
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 5}.*vocab_size={VOCAB}"):
        model(make_pixels(1), decoder_input_ids=torch.tensor([[BOS, VOCAB + 5]]))


def test_pretrained_timm_backbone_weights_survive_initialisation(tmp_path):
    """timm weights (here from a local file) are kept, BatchNorm statistics included; loading never refetches them."""
    import timm

    reference = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("running_mean"):
                buffer.fill_(0.5)
            elif name.endswith("running_var"):
                buffer.fill_(2.0)
        for parameter in reference.parameters():
            parameter.add_(0.123)
    weights = tmp_path / "test_resnet.pth"
    torch.save(reference.state_dict(), weights)

    model = make_model(
        use_pretrained_backbone=True, backbone_model_kwargs={"pretrained_cfg_overlay": {"file": str(weights)}}
    )
    backbone_state = model.model.encoder.backbone._backbone.state_dict()
    expected = reference.state_dict()
    shared = [key for key in backbone_state if key in expected]
    assert len(shared) == len(backbone_state)
    for key in shared:
        assert torch.equal(backbone_state[key], expected[key]), key

    model.save_pretrained(tmp_path / "checkpoint")
    weights.unlink()  # from_pretrained must take the backbone from the checkpoint, not from timm
    loaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path / "checkpoint")
    for key, value in loaded.model.encoder.backbone._backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
