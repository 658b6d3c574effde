"""Tests of the decoding loop `generate` runs by default (`fast_generation.py`) and of the early-stop option."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

import pix2seq_hf.fast_generation as fast_generation
import pix2seq_hf.modeling_pix2seq as modeling_pix2seq
from pix2seq_hf.box_codec import Pix2SeqTokenLayout
from pix2seq_hf.fast_generation import Pix2SeqStaticDecoding, decoder_step
from pix2seq_hf.generation_pix2seq import Pix2SeqGenerationMixin
from pix2seq_hf.generation_pix2seq import Pix2SeqLogitsProcessor
from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection
from pix2seq_hf.presets import get_preset_config
from helpers import TINY_LAYOUT, tiny_config


EOS, BOS, CLASS, NUM_CLASSES, COORD = 0, 10, 40, 5, 200
LAYOUT = Pix2SeqTokenLayout(**TINY_LAYOUT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config())
    # Larger decoder weights than the default init, so that the images and the tokens matter to the logits.
    with torch.no_grad():
        for name, parameter in model.model.decoder.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def make_pixels(batch_size: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


class EndRowsAt(LogitsProcessor):
    """Test helper: forces EOS for row `i` at the object boundary after `objects[i]` objects."""

    def __init__(self, objects: list[int]):
        self.objects = objects

    def __call__(self, input_ids, scores):
        generated = input_ids.shape[1] - 1
        for row, count in enumerate(self.objects):
            if generated == 5 * count:
                scores[row] = -float("inf")
                scores[row, EOS] = 0.0
        return scores


STOCK = dict(static_decoding=False)  # transformers' own loop


def assert_same_generation(reference, fast, atol=1e-4):
    assert torch.equal(reference.sequences, fast.sequences)
    assert len(reference.logits) == len(fast.logits)
    ended = (reference.sequences[:, 1:] == EOS).cumsum(dim=1) > 0
    for step, (expected, actual) in enumerate(zip(reference.logits, fast.logits)):
        # Rows that finished before this step are not computed by the fast loop (zeros by design).
        live = ~ended[:, step - 1] if step > 0 else torch.ones(len(expected), dtype=torch.bool)
        torch.testing.assert_close(actual[live], expected[live], atol=atol, rtol=1e-4)
        assert torch.all(actual[~live] == 0)


def record_steps(monkeypatch) -> list[int]:
    """Records the batch size of every call of the static loop's decoder step."""
    batch_sizes = []

    def recording_step(model, token_ids, *args):
        batch_sizes.append(token_ids.shape[0])
        return decoder_step(model, token_ids, *args)

    monkeypatch.setattr(fast_generation, "decoder_step", recording_step)
    return batch_sizes


def test_generate_decodes_greedily_in_the_static_loop_with_the_stock_tokens_and_drops_finished_rows(model, monkeypatch):
    pixels = make_pixels()
    kwargs = dict(do_sample=False, max_new_tokens=40, logits_processor=LogitsProcessorList([EndRowsAt([2, 5, 3])]))
    batch_sizes = record_steps(monkeypatch)
    reference = model.generate(pixels, **STOCK, **kwargs)
    assert batch_sizes == []
    fast = model.generate(pixels, **kwargs)  # the default loop
    assert_same_generation(reference, fast)
    assert reference.sequences.shape[1] == 1 + 5 * 5 + 1
    # Row 0 ends after 2 objects, row 2 after 3, row 1 after 5: the decoder runs 3, then 2, then 1 rows.
    assert batch_sizes == [3] * 11 + [2] * 5 + [1] * 10


def test_sampling_draws_the_same_tokens_as_the_stock_loop(model):
    pixels = make_pixels()
    kwargs = dict(max_new_tokens=30, top_p=0.9, logits_processor=LogitsProcessorList([EndRowsAt([4, 1, 6])]))
    torch.manual_seed(3)
    reference = model.generate(pixels, **STOCK, **kwargs)
    torch.manual_seed(3)
    fast = model.generate(pixels, **kwargs)
    assert_same_generation(reference, fast)
    # The rows differ (the image and the sampling matter), so the comparison is not a trivial one.
    assert not torch.equal(reference.sequences[0, :5], reference.sequences[1, :5])


@pytest.mark.parametrize(
    "widths",
    [
        # R50 decoder: 6 layers of width 256, 8 heads, FFN 1024.
        dict(decoder_layers=6, decoder_hidden_size=256, decoder_attention_heads=8, decoder_ffn_dim=1024),
        # ViT-B-like: encoder 768 wide, decoder 512 wide with 16 heads, FFN 2048.
        dict(
            encoder_hidden_size=768,
            encoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_hidden_size=512,
            decoder_attention_heads=16,
            decoder_ffn_dim=2048,
        ),
    ],
    ids=["r50_widths", "vit_widths"],
)
def test_static_loop_equals_the_stock_loop_at_real_widths(widths):
    torch.manual_seed(0)
    wide = Pix2SeqForObjectDetection(tiny_config(layers=1, **widths)).eval()
    with torch.no_grad():
        for name, parameter in wide.model.decoder.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.1)
    pixels = make_pixels(2)
    kwargs = dict(max_new_tokens=25, min_objects=5)
    for sampling in (dict(do_sample=False), dict(do_sample=True, top_p=0.4)):
        torch.manual_seed(7)
        reference = wide.generate(pixels, **STOCK, **sampling, **kwargs)
        torch.manual_seed(7)
        fast = wide.generate(pixels, **sampling, **kwargs)
        assert_same_generation(reference, fast)
        # Without a cache every step runs the whole prefix (causal mask, no cache writes): the same tokens.
        torch.manual_seed(7)
        uncached = wide.generate(pixels, use_cache=False, **sampling, **kwargs)
        assert_same_generation(uncached, fast)


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run inside it."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_decoding_step_is_one_product_per_projection_group_no_mask_and_one_host_synchronisation(model, monkeypatch):
    masks = []
    create_causal_mask = modeling_pix2seq.create_causal_mask
    monkeypatch.setattr(
        modeling_pix2seq, "create_causal_mask", lambda *args, **kwargs: masks.append(1) or create_causal_mask(*args, **kwargs)
    )
    pixels = make_pixels(2)
    counts = {}
    for steps in (10, 15):
        with OpCounter() as counter:
            model.generate(pixels, do_sample=False, max_new_tokens=steps, suppress_eos=True)
        counts[steps] = counter.counts
    per_step = {name: (counts[15][name] - counts[10][name]) / 5 for name in counts[15]}
    layers = model.config.decoder_layers
    # Per layer: query/key/value, self-attention output, cross-attention query and output, two feed-forward
    # products; plus the output projection.
    assert per_step["aten.addmm"] + per_step.get("aten.mm", 0) + per_step.get("aten.baddbmm", 0) == 6 * layers + 1
    # The loop reads one number per step back to the host (how many images go on); the step builds no causal mask.
    assert per_step["aten._local_scalar_dense"] == 1
    assert masks == []
    # transformers' loop runs the same layers: one token over the cache builds no mask there either.
    model.generate(pixels, do_sample=False, max_new_tokens=5, suppress_eos=True, **STOCK)
    assert masks == []


def record_decoding_steps(monkeypatch) -> list[int]:
    """Records the batch size of every call of the decoder's decoding step (`Pix2SeqDecodingStep`), which must be
    one token per sequence."""
    batch_sizes = []
    original_call = modeling_pix2seq.Pix2SeqDecodingStep.__call__

    def recording_call(self, input_ids, *args):
        assert input_ids.shape[1] == 1
        batch_sizes.append(input_ids.shape[0])
        return original_call(self, input_ids, *args)

    monkeypatch.setattr(modeling_pix2seq.Pix2SeqDecodingStep, "__call__", recording_call)
    return batch_sizes


def test_every_token_after_the_prompt_runs_the_decoding_step_with_the_layers_results(model, monkeypatch):
    pixels = make_pixels()
    kwargs = dict(max_new_tokens=30, top_p=0.9, logits_processor=LogitsProcessorList([EndRowsAt([4, 1, 6])]))
    steps = record_decoding_steps(monkeypatch)
    torch.manual_seed(3)
    fast = model.generate(pixels, **kwargs)
    # Every call after the prompt, for the rows still running (row 1 ends after 1 object, row 0 after 4).
    assert steps == [3] * 5 + [2] * 15 + [1] * 9
    # The same generation through the layers themselves (the step refused), and through transformers' loop.
    monkeypatch.setattr(modeling_pix2seq.Pix2SeqDecodingStep, "applies_to", staticmethod(lambda decoder: False))
    torch.manual_seed(3)
    layers = model.generate(pixels, **kwargs)
    assert len(steps) == 29
    assert_same_generation(layers, fast, atol=1e-5)
    torch.manual_seed(3)
    assert_same_generation(model.generate(pixels, **STOCK, **kwargs), fast)


def test_several_sampled_sequences_per_image_run_the_decoding_step_with_the_stock_tokens(model, monkeypatch):
    pixels = make_pixels(2)
    kwargs = dict(max_new_tokens=15, top_p=0.9, num_return_sequences=3, suppress_eos=True)
    steps = record_decoding_steps(monkeypatch)
    torch.manual_seed(11)
    fast = model.generate(pixels, **kwargs)
    assert steps == [6] * 14
    torch.manual_seed(11)
    assert_same_generation(model.generate(pixels, **STOCK, **kwargs), fast)
    # Three different samples of each image.
    assert len({tuple(row) for row in fast.sequences[:3].tolist()}) > 1


@pytest.mark.parametrize("change", ["layer_norm_hook", "eager_attention"])
def test_the_decoding_step_steps_aside_where_it_would_differ(change, monkeypatch):
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    decoder = model.model.decoder
    assert modeling_pix2seq.Pix2SeqDecodingStep.applies_to(decoder)
    # Dropout acts in training mode, also when only one layer is in it.
    decoder.layers[1].mlp.train()
    assert not modeling_pix2seq.Pix2SeqDecodingStep.applies_to(decoder)
    decoder.eval()
    pixels = make_pixels(1)
    kwargs = dict(do_sample=False, max_new_tokens=10, suppress_eos=True)
    if change == "layer_norm_hook":
        # A hook on a module the step does not call as a module: the layers run, so that the hook acts.
        decoder.layers[0].final_layer_norm.register_forward_hook(lambda module, args, output: output * 0.0)
    else:
        model.set_attn_implementation("eager")
    assert not modeling_pix2seq.Pix2SeqDecodingStep.applies_to(decoder)
    steps = record_decoding_steps(monkeypatch)
    fast = model.generate(pixels, **kwargs)
    assert steps == []
    assert_same_generation(model.generate(pixels, **STOCK, **kwargs), fast, atol=1e-5)


def test_decoding_products_split_by_output_columns_equal_the_whole_product():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 8, generator=generator), torch.randn(48, generator=generator)
    blocks = modeling_pix2seq.decoding_column_blocks
    # A decoder whose decoding weights stay in a CPU's caches keeps whole products: the tiny and the 2-layer width-128
    # decoders; 2 layers of width 256 (9 MB) and the ResNet-50 preset's 6 (22 MB) are split.
    tiny, narrow = tiny_config(), tiny_config(decoder_hidden_size=128, decoder_ffn_dim=512, vocab_size=1128)
    wide, r50 = tiny_config(decoder_hidden_size=256, decoder_ffn_dim=1024, vocab_size=3000), get_preset_config("r50")
    assert [blocks(weight, config) for config in (tiny, narrow, wide, r50)] == [1, 1, 3, 3]
    # The most blocks of at least 16 columns: 48 -> 3, 300 -> 15 (20 columns each), fewer than 16 -> 1.
    assert [blocks(torch.empty(out, 8), r50) for out in (48, 300, 40, 16, 10)] == [3, 15, 2, 1, 1]
    # Only float32 on the CPU is split (bf16 products were slower split).
    assert blocks(weight.bfloat16(), r50) == 1
    for count in (1, 2, 3, 4):
        blocked = weight.t().reshape(8, count, -1).transpose(0, 1).contiguous()
        for rows in (1, 5):
            inputs = torch.randn(rows, 8, generator=generator)
            product = modeling_pix2seq.decoding_product(bias, blocked if count > 1 else blocked[0], inputs)
            torch.testing.assert_close(product, torch.nn.functional.linear(inputs, weight, bias))


def test_decoding_splits_the_products_into_column_blocks_with_the_unsplit_tokens(model, monkeypatch):
    pixels = make_pixels()
    kwargs = dict(max_new_tokens=30, top_p=0.9, logits_processor=LogitsProcessorList([EndRowsAt([4, 1, 6])]))
    layouts = collections.Counter()
    decoding_product = modeling_pix2seq.decoding_product

    def recording_product(bias, weight, inputs):
        layouts[tuple(weight.shape[:-2])] += 1
        return decoding_product(bias, weight, inputs)

    monkeypatch.setattr(modeling_pix2seq, "decoding_product", recording_product)
    torch.manual_seed(3)
    whole = model.generate(pixels, **kwargs)
    # The tiny decoder's weights stay in the caches: whole products, unless split for this test.
    assert set(layouts) == {()}
    monkeypatch.setattr(modeling_pix2seq, "DECODING_SPLIT_MIN_BYTES", 0)
    layouts.clear()
    torch.manual_seed(3)
    split = model.generate(pixels, **kwargs)
    # The layers' own decoding path (the flat step refused) splits them too.
    with monkeypatch.context() as patch:
        patch.setattr(modeling_pix2seq.Pix2SeqDecodingStep, "applies_to", staticmethod(lambda decoder: False))
        torch.manual_seed(3)
        split_layers = model.generate(pixels, **kwargs)
    # Per layer query/key/value (96 columns) in 6 blocks, the self- and cross-attention outputs, the cross-attention
    # query and the second feed-forward product (32) in 2, the first feed-forward product (64) in 4; the output
    # projection (300) in 15; in the 30 steps (the prompt's included) of both generations.
    steps, layers = 2 * 30, model.config.decoder_layers
    assert layouts == {(6,): steps * layers, (2,): steps * 4 * layers, (4,): steps * layers, (15,): steps}
    assert_same_generation(whole, split, atol=1e-5)
    assert_same_generation(whole, split_layers, atol=1e-5)


def test_stacked_projection_weights_follow_the_parameters_and_stay_out_of_the_state_dict(model):
    pixels = make_pixels(2)
    kwargs = dict(do_sample=False, max_new_tokens=15, min_objects=3)
    keys = list(Pix2SeqForObjectDetection(tiny_config()).state_dict())
    before = model.generate(pixels, **kwargs)
    assert list(model.state_dict()) == keys
    changed = Pix2SeqForObjectDetection(tiny_config()).eval()
    changed.load_state_dict(model.state_dict())
    changed.generate(pixels, **kwargs)  # builds its stacked weights
    with torch.no_grad():
        # In place (as an optimizer step does) and as a new tensor.
        changed.model.decoder.layers[0].self_attn.k_proj.weight.mul_(-1.0)
        changed.model.decoder.layers[1].encoder_attn.v_proj.bias.add_(0.5)
    changed.model.decoder.layers[1].self_attn.v_proj.weight = torch.nn.Parameter(
        changed.model.decoder.layers[1].self_attn.v_proj.weight.detach() * 2.0
    )
    after = changed.generate(pixels, **kwargs)
    fresh = Pix2SeqForObjectDetection(tiny_config()).eval()
    fresh.load_state_dict(changed.state_dict())
    assert_same_generation(fresh.generate(pixels, **kwargs), after, atol=1e-5)
    assert not torch.allclose(after.logits[1], before.logits[1])

    # A projection with a hook (as an adapter would have) is called as a module, by every loop: doubling its output
    # is doubling its weights.
    with torch.no_grad():
        changed.model.decoder.layers[0].mlp.fc1.weight.mul_(2.0)
        changed.model.decoder.layers[0].mlp.fc1.bias.mul_(2.0)
        changed.model.decoder.layers[1].encoder_attn.k_proj.weight.mul_(2.0)
        changed.model.decoder.layers[1].encoder_attn.k_proj.bias.mul_(2.0)
    expected = changed.generate(pixels, **kwargs)
    hooks = [
        module.register_forward_hook(lambda module, args, output: output * 2.0)
        for module in (fresh.model.decoder.layers[0].mlp.fc1, fresh.model.decoder.layers[1].encoder_attn.k_proj)
    ]
    try:
        for loop in ({}, STOCK):
            assert_same_generation(expected, fresh.generate(pixels, **kwargs, **loop), atol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()


def test_bfloat16_weights_decode_with_float32_grammar_and_scores(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = Pix2SeqForObjectDetection.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.model.decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    pixels = make_pixels(2)
    kwargs = dict(do_sample=False, max_new_tokens=30, suppress_eos=True, output_scores=True)
    output = half.generate(pixels, **kwargs)
    assert all(step.dtype == torch.float32 for step in (*output.logits, *output.scores))
    stock = half.generate(pixels, **STOCK, **kwargs)
    assert torch.equal(stock.sequences, output.sequences)
    torch.testing.assert_close(torch.stack(output.logits), torch.stack(stock.logits), atol=0.1, rtol=0.05)
    # The bf16 tokens against float32: the float32 model, fed the bf16 sequence, picks the same next token under the
    # grammar at most steps (rounding can swap near-ties), and its logits are close.
    reference = model(pixels, decoder_input_ids=output.sequences[:, :-1]).logits
    processed = torch.stack(output.scores, dim=1)
    allowed = torch.isfinite(processed)
    float32_choice = reference.masked_fill(~allowed, -float("inf")).argmax(-1)
    agreement = (float32_choice == output.sequences[:, 1:]).float().mean()
    assert agreement >= 0.9, agreement
    torch.testing.assert_close(torch.stack(output.logits, dim=1), reference, atol=0.1, rtol=0.05)
    detections = half.detect(pixels, max_new_tokens=10)
    assert detections.scores.dtype == detections.pred_boxes.dtype == torch.float32


def test_detections_and_output_formats_match(model):
    pixels = make_pixels(2)
    reference = model.detect(pixels, do_sample=False, min_objects=3, max_new_tokens=20, **STOCK)
    fast = model.detect(pixels, do_sample=False, min_objects=3, max_new_tokens=20)
    for name in ("pred_boxes", "labels", "object_mask", "sequences"):
        assert torch.equal(getattr(reference, name), getattr(fast, name)), name
    torch.testing.assert_close(fast.scores, reference.scores)
    # The detections are what the box codec reads out of the tokens.
    generated = model.generate(pixels, do_sample=False, min_objects=3, max_new_tokens=20)
    decoded = model.box_codec.decode(
        generated.sequences[:, 1:],
        torch.stack(generated.logits, dim=1),
        coordinate_window=model.generation_config.coordinate_window,
    )
    for index, objects in enumerate(decoded):
        count = int(fast.object_mask[index].sum())
        assert count == len(objects["labels"]) >= 3
        assert torch.equal(fast.labels[index, :count], objects["labels"])
        torch.testing.assert_close(fast.pred_boxes[index, :count], objects["boxes"])

    tokens = model.generate(pixels, do_sample=False, max_new_tokens=10, return_dict_in_generate=False)
    assert torch.equal(tokens, reference.sequences[:, :11])
    scored = model.generate(pixels, do_sample=False, max_new_tokens=10, output_scores=True)
    assert len(scored.scores) == 10 and torch.isinf(scored.scores[0]).any()  # processed: the grammar's -inf


def test_compiled_step_equals_the_eager_step_and_follows_weight_updates(model):
    pixels = make_pixels(2)
    kwargs = dict(do_sample=False, max_new_tokens=15, min_objects=3)
    eager = model.generate(pixels, **kwargs)
    decoding = Pix2SeqStaticDecoding(compile=True)  # weights frozen into the compiled step
    compiled = model.generate(pixels, custom_generate=decoding, **kwargs)
    assert_same_generation(eager, compiled, atol=1e-5)
    # A second call with the same shapes reuses the compiled step.
    again = model.generate(pixels, custom_generate=decoding, **kwargs)
    assert torch.equal(again.sequences, compiled.sequences)
    # Weights changed in place (as by an optimizer step): the frozen constants must not be stale.
    changed = Pix2SeqForObjectDetection(tiny_config()).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.model.decoder.layers[0].mlp.fc1.weight.mul_(-1.0)
    expected = changed.generate(pixels, **kwargs)
    updated = changed.generate(pixels, custom_generate=decoding, **kwargs)
    assert_same_generation(expected, updated, atol=1e-5)
    assert not torch.allclose(updated.logits[0], compiled.logits[0])


def test_static_decoding_rejects_what_it_cannot_do(model):
    pixels = make_pixels(1)
    decoding = Pix2SeqStaticDecoding()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(pixels, custom_generate=decoding, num_beams=2, do_sample=False, max_new_tokens=5)
    with pytest.raises(ValueError, match="attentions or hidden states"):
        model.generate(pixels, custom_generate=decoding, output_attentions=True, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.generate(pixels, max_new_tokens=80)
    with pytest.raises(TypeError, match="compile"):
        Pix2SeqStaticDecoding(compile="yes")


# ----- early stop ----------------------------------------------------------------------------------------------------


def class_logits(batch_size: int, best_probability: list[float]) -> torch.Tensor:
    """Raw logits at a class slot whose best real class has (about) the given probability in each row."""
    scores = torch.full((batch_size, LAYOUT.vocab_size), -30.0)
    for row, probability in enumerate(best_probability):
        scores[row, CLASS] = torch.log(torch.tensor(probability))
        scores[row, COORD] = torch.log(torch.tensor(1.0 - probability))
    return scores


def run_processor(processor, row_scores: list[list[float]]) -> list[torch.Tensor]:
    """
    Feeds one sequence per row, `row_scores[row][k]` being the class score of the row's object `k` (random logits at
    coordinate slots), then one more step; returns the processed scores of every step.
    """
    batch_size, num_objects = len(row_scores), len(row_scores[0])
    input_ids = torch.full((batch_size, 1), BOS)
    outputs = []
    for step in range(5 * num_objects + 1):
        slot, index = step % 5, step // 5
        if slot == 4:
            scores = class_logits(batch_size, [row[index] for row in row_scores])
        else:
            scores = torch.randn(batch_size, LAYOUT.vocab_size)
        outputs.append(processor(input_ids, scores))
        token = CLASS if slot == 4 else COORD
        input_ids = torch.cat([input_ids, torch.full((batch_size, 1), token)], dim=1)
    return outputs


def only_eos(scores: torch.Tensor) -> list[bool]:
    """Per row: whether EOS is the only token left."""
    return [torch.isfinite(row).nonzero().flatten().tolist() == [EOS] for row in scores]


def test_early_stop_forces_eos_after_a_run_of_low_scores():
    processor = Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=2, early_stop_threshold=0.5)
    rows = [
        [0.1, 0.2, 0.9, 0.9],  # two low objects first: ends after object 2
        [0.2, 0.9, 0.3, 0.4],  # its run restarts after object 2: ends after object 4
        [0.9, 0.9, 0.9, 0.9],  # never
    ]
    outputs = run_processor(processor, rows)
    at_boundary = {count: only_eos(outputs[5 * count]) for count in range(1, 5)}
    assert at_boundary[1] == [False, False, False]
    assert at_boundary[2] == [True, False, False]
    assert at_boundary[4][1:] == [True, False]
    # Inside an object nothing is forced.
    assert not any(only_eos(outputs[5 * 2 + 1])[1:])


def test_early_stop_waits_for_min_objects_and_is_off_by_default():
    rows = [[0.1, 0.1, 0.1, 0.1]]
    processor = Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=1, early_stop_threshold=0.5, min_objects=3)
    outputs = run_processor(processor, rows)
    assert [only_eos(outputs[5 * count])[0] for count in range(1, 5)] == [False, False, True, True]
    outputs = run_processor(Pix2SeqLogitsProcessor(LAYOUT), rows)
    assert not any(only_eos(outputs[5 * count])[0] for count in range(1, 5))


def test_early_stop_options_are_checked():
    with pytest.raises(ValueError, match="suppress_eos"):
        Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=2, suppress_eos=True)
    with pytest.raises(ValueError, match="early_stop_threshold"):
        Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=2, early_stop_threshold=1.5)
    with pytest.raises(TypeError, match="early_stop_patience"):
        Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=2.0)
    with pytest.raises(ValueError, match="early_stop_patience"):
        Pix2SeqLogitsProcessor(LAYOUT, early_stop_patience=-1)


def test_generate_stops_images_early_in_both_loops(model):
    pixels = make_pixels()
    kwargs = dict(do_sample=False, max_new_tokens=50, eos_bias=-float("inf"))
    full = model.generate(pixels, **kwargs)
    assert full.sequences.shape[1] == 51  # without early stop the model never ends
    # Every object scores below 1.0: each image ends after `patience` objects, or `min_objects`.
    stopped = model.generate(pixels, early_stop_patience=2, early_stop_threshold=1.0, **kwargs)
    assert stopped.sequences.shape[1] == 1 + 10 + 1
    assert torch.equal(stopped.sequences[:, :11], full.sequences[:, :11])
    assert torch.all(stopped.sequences[:, 11] == EOS)
    later = model.generate(pixels, early_stop_patience=2, early_stop_threshold=1.0, min_objects=4, **kwargs)
    assert later.sequences.shape[1] == 1 + 20 + 1
    # A threshold of 0 never stops; the static loop agrees with the stock one.
    never = model.generate(pixels, early_stop_patience=1, early_stop_threshold=0.0, **kwargs)
    assert torch.equal(never.sequences, full.sequences)
    stock = model.generate(pixels, early_stop_patience=2, early_stop_threshold=1.0, **STOCK, **kwargs)
    assert torch.equal(stock.sequences, stopped.sequences)


def test_drop_finished_off_keeps_every_rows_logits(model):
    pixels = make_pixels(2)
    decoding = Pix2SeqStaticDecoding(drop_finished=False)
    kwargs = dict(do_sample=False, max_new_tokens=15, logits_processor=LogitsProcessorList([EndRowsAt([1, 3])]))
    kept = model.generate(pixels, custom_generate=decoding, **kwargs)
    # Rows that finished are still computed: the logits equal the stock loop's everywhere.
    reference = model.generate(pixels, **STOCK, **kwargs)
    for expected, actual in zip(reference.logits, kept.logits, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# ----- which loop runs -----------------------------------------------------------------------------------------------


def test_every_entry_point_decodes_in_the_static_loop_by_default(model, monkeypatch):
    pixels = make_pixels(2)
    calls = []
    original_call = Pix2SeqStaticDecoding.__call__

    def recording_call(self, *args, **kwargs):
        calls.append(self)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(Pix2SeqStaticDecoding, "__call__", recording_call)
    torch.manual_seed(5)
    default = model.detect(pixels, max_new_tokens=20)
    assert len(calls) == 1
    torch.manual_seed(5)
    stock = model.detect(pixels, max_new_tokens=20, **STOCK)
    assert len(calls) == 1
    for name in ("pred_boxes", "labels", "object_mask", "sequences"):
        assert torch.equal(getattr(default, name), getattr(stock, name)), name
    torch.testing.assert_close(default.scores, stock.scores)
    # `model(pixel_values)` goes through `detect`, `generate` with nothing extra passed too; one loop per model.
    model(pixels)
    model.generate(pixels, top_p=0.4)
    assert len(calls) == 3 and calls[2] is calls[1] is calls[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_attentions": True},
        {"output_hidden_states": True},
        {"use_cache": False},
        {"static_decoding": False},
        {"num_beams": 2, "do_sample": False},
        "training",
    ],
)
def test_generate_falls_back_to_the_stock_loop_for_what_only_it_does(model, monkeypatch, kwargs):
    def fail(*args, **kwargs):
        raise AssertionError("the static loop was used")

    monkeypatch.setattr(Pix2SeqStaticDecoding, "__call__", fail)
    pixels = make_pixels(1)
    if kwargs == "training":
        model.train()
        try:
            model.generate(pixels, max_new_tokens=10)
        finally:
            model.eval()
    else:
        model.generate(pixels, max_new_tokens=10, **kwargs)


def test_detect_rejects_beam_search(model):
    with pytest.raises(ValueError, match="num_beams=2"):
        model.detect(make_pixels(1), max_new_tokens=10, num_beams=2, do_sample=False)


def test_the_model_takes_its_generation_from_the_mixin():
    assert issubclass(Pix2SeqForObjectDetection, Pix2SeqGenerationMixin)
    # The model class itself defines none of the generation plumbing.
    plumbing = ("_sample", "_get_logits_processor", "_prepare_generation_config", "detect", "default_generation_config")
    for name in plumbing:
        assert name not in vars(Pix2SeqForObjectDetection), name


def test_generation_after_a_fused_optimizer_step_uses_the_updated_weights(model):
    # Fused AdamW updates the parameters in place without bumping their version counters: nothing the decoding layers
    # stack may outlive a `generate` call (a training run's later evaluations read the trained weights).
    pixels = make_pixels(2)
    kwargs = dict(do_sample=False, max_new_tokens=15, min_objects=3)
    trained = Pix2SeqForObjectDetection(tiny_config()).eval()
    trained.load_state_dict(model.state_dict())
    trained.generate(pixels, **kwargs)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=0.05, fused=True)
    for parameter in trained.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    after = trained.generate(pixels, **kwargs)
    fresh = Pix2SeqForObjectDetection(tiny_config()).eval()
    fresh.load_state_dict(trained.state_dict())
    assert_same_generation(fresh.generate(pixels, **kwargs), after, atol=1e-5)
