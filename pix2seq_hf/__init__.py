"""Pix2Seq object detection as a Hugging Face Transformers model."""

from .box_codec import Pix2SeqTokenLayout
from .configuration_pix2seq import Pix2SeqConfig
