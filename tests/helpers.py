"""Shared test fixtures-as-functions: the tiny token layout and model config every test file builds on, the
example scripts as modules, a free port for multi-process tests."""

import importlib.util
import socket
from pathlib import Path

from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Imports `examples/<name>.py` (a script, not a package module) as a fresh module and returns it."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A small vocabulary: pad/EOS 0, prompt 10, noise 30, classes 40..44, coordinate bins 200..299.
TINY_LAYOUT = dict(
    num_bins=100,
    num_classes=5,
    vocab_size=300,
    pad_token_id=0,
    eos_token_id=0,
    bos_token_id=10,
    noise_token_id=30,
    class_token_offset=40,
    coord_token_offset=200,
    max_objects=10,
)


def tiny_config(layers: int = 2, **overrides) -> Pix2SeqConfig:
    """
    A model well under 1M parameters: timm `test_resnet` (96 channels at stride 32, so 2x2 features at 64x64),
    `layers` encoder and decoder layers of width 32, and the `TINY_LAYOUT` vocabulary. `overrides` replace any field.
    """
    kwargs = dict(
        backbone="test_resnet",
        use_pretrained_backbone=False,
        encoder_hidden_size=32,
        decoder_hidden_size=32,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        max_position_embeddings=64,
        **TINY_LAYOUT,
    )
    kwargs.update(overrides)
    return Pix2SeqConfig(**kwargs)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now, for the rendezvous of a multi-process test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
