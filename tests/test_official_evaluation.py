"""The official evaluation protocol: 500 tokens whatever is sampled, official top-p, every group read."""

import os

import numpy as np
import torch

from pix2seq_hf.box_codec import Pix2SeqTokenLayout
from pix2seq_hf.configuration_pix2seq import Pix2SeqConfig
from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import convert_pix2seq_checkpoint
from pix2seq_hf.generation_pix2seq import (
    Pix2SeqLogitsProcessor,
    Pix2SeqTopPLogitsWarper,
    pix2seq_generation_options,
)
from pix2seq_hf.official_evaluation import (
    official_detect,
    official_detections,
    official_evaluation_generation_config,
)


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_tiny_vit")


def test_official_decoding_always_writes_500_tokens_and_feeds_eos_back():
    model, processor = convert_pix2seq_checkpoint(FIXTURE, image_size=64)
    with torch.no_grad():
        model.lm_head.bias[0] = 8.0  # EOS becomes likely (without stopping decoding here)
    reference = np.load(os.path.join(FIXTURE, "reference.npz"))
    pixel_values = processor.image_processor(reference["image"], return_tensors="pt")["pixel_values"]

    config = official_evaluation_generation_config(model.config)
    processors = model._get_logits_processor(config, input_ids_seq_length=1, device="cpu")
    assert not any(isinstance(p, Pix2SeqLogitsProcessor) for p in processors)
    assert any(isinstance(p, Pix2SeqTopPLogitsWarper) for p in processors)

    torch.manual_seed(0)
    outputs = official_detect(model, pixel_values)
    generated = outputs.sequences[0, 1:]
    assert generated.shape[0] == 500
    eos = (generated == 0).nonzero().flatten()
    assert len(eos) > 0 and (generated[eos[0] :] != 0).any()  # decoding went on after an EOS, with other tokens
    assert outputs.scores.shape == (1, 100) and outputs.pred_boxes.shape == (1, 100, 4)


def test_official_detections_read_every_group():
    layout = Pix2SeqTokenLayout(num_classes=91)  # official layout: classes from 100, bins from 1000, vocab 3000
    tokens = torch.tensor([[10, 1000, 1999, 500, 2500, 101, 0, 0, 0, 0, 0]])
    logits = torch.zeros(1, 10, 3000)
    logits[0, 4, 101] = 5.0  # group 1: COCO person
    logits[0, 9, 600] = 5.0  # group 2: token 600, no such category
    outputs = official_detections(tokens, logits, layout)
    assert outputs.object_mask.tolist() == [[True, False]]
    assert outputs.labels.tolist() == [[1, -1]]
    probability = torch.softmax(logits[0, 4], dim=-1)[101]
    torch.testing.assert_close(outputs.scores[0, 0], probability)
    # Official box: (ymin, xmin, ymax, xmax) from tokens - 1000, dequantised, clipped to [0, 1]; output is xyxy.
    torch.testing.assert_close(outputs.pred_boxes[0, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_official_detections_leave_out_inverted_boxes():
    layout = Pix2SeqTokenLayout(num_classes=91)
    # Group 1: ymax < ymin (COCO's evaluation ignores its negative area); group 2: a proper box.
    tokens = torch.tensor([[10, 1600, 1000, 1200, 1500, 101, 1100, 1100, 1300, 1300, 103]])
    logits = torch.zeros(1, 10, 3000)
    logits[0, [4, 9], 103] = 5.0
    outputs = official_detections(tokens, logits, layout)
    assert outputs.object_mask.tolist() == [[False, True]]
    assert outputs.labels.tolist() == [[-1, 3]]


def test_official_protocol_is_a_plain_generation_config():
    config = official_evaluation_generation_config(Pix2SeqConfig(num_classes=91))
    assert config.eos_token_id == [] and config.max_new_tokens == 500
    assert not hasattr(config, "official_evaluation")
    # Its Pix2Seq options leave the grammar processor nothing to do: it is left out.
    options = pix2seq_generation_options(config)
    assert options["token_grammar"] is False and options["official_top_p"] is True
    assert not Pix2SeqLogitsProcessor.from_generation_options(Pix2SeqTokenLayout(), options).is_active
