"""The training losses beyond the paper (soft coordinate targets, auxiliary dense head), a learning test on a fixed
batch, the dense synthetic variant and fine-tuning a saved model onto a new label set with examples/train.py."""

import json

import pytest
import torch
from helpers import TINY_LAYOUT, load_example, tiny_config

from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from pix2seq_hf.auxiliary_dense_head import objects_from_labels
from pix2seq_hf.data import Pix2SeqCollator
from pix2seq_hf.modeling_pix2seq import pix2seq_sequence_loss
from pix2seq_hf.training_options import SYNTHETIC_AUGMENTATION


COORD, BINS = TINY_LAYOUT["coord_token_offset"], TINY_LAYOUT["num_bins"]


# ----- learning-rate schedule ---------------------------------------------------------------------------------------


def test_linear_decay_ends_at_whichever_budget_ends_first_and_resumes_its_clock():
    from pix2seq_hf.training_setup import LinearDecayToBudget

    schedule = LinearDecayToBudget(num_warmup_steps=10, num_training_steps=110, budget_seconds=100.0)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5) and schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)  # the steps bound it
    schedule.set_elapsed(75.0)
    assert schedule(60) == pytest.approx(0.25)  # the time bounds it
    schedule.set_elapsed(150.0)
    assert schedule(60) == 0.0

    # LambdaLR saves the callable's attributes: a loaded scheduler continues the clock where the saved one was.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule).state_dict()
    fresh = LinearDecayToBudget(10, 110, 100.0)
    torch.optim.lr_scheduler.LambdaLR(optimizer, fresh).load_state_dict(saved)
    assert fresh.elapsed_seconds == 150.0
    with pytest.raises(ValueError, match="budget_seconds"):
        LinearDecayToBudget(10, 110, 0.0)


def test_decay_fraction_keeps_the_full_rate_until_the_last_share_of_either_budget():
    from pix2seq_hf.training_plan import plan_training
    from pix2seq_hf.training_setup import LinearDecayToBudget

    plan = plan_training(4000, per_device_batch_size=8, max_train_steps=110, num_warmup_steps=10, decay_fraction=0.2)
    assert "full rate for 80% of the budget and linear decay to 0 at step 110" in plan.describe()
    schedule = LinearDecayToBudget.for_plan(plan)
    assert schedule(5) == pytest.approx(0.5)  # the warm-up is unchanged
    assert schedule(10) == schedule(90) == 1.0  # full rate until 80% of the steps after the warm-up
    assert schedule(100) == pytest.approx(0.5) and schedule(110) == 0.0
    timed = LinearDecayToBudget(10, None, budget_seconds=100.0, decay_fraction=0.2)
    timed.set_elapsed(70.0)
    assert timed(50) == 1.0
    timed.set_elapsed(90.0)
    assert timed(50) == pytest.approx(0.5)  # the minutes bound it the same way
    with pytest.raises(ValueError, match="decay_fraction"):
        LinearDecayToBudget(10, 110, decay_fraction=0.0)


# ----- soft coordinate targets -------------------------------------------------------------------------------------


def _peaked_logits(predicted_bin: int, vocab_size: int = 300) -> torch.Tensor:
    logits = torch.zeros(1, 1, vocab_size)
    logits[0, 0, COORD + predicted_bin] = 8.0
    return logits


def test_soft_coordinate_targets_credit_neighbouring_bins():
    labels = torch.tensor([[COORD + 50]])

    def loss(predicted_bin, sigma):
        return float(pix2seq_sequence_loss(_peaked_logits(predicted_bin), labels, 0, 0.1, sigma, COORD, BINS))

    # One-hot: a neighbour is as wrong as a far bin.
    assert loss(51, 0.0) == pytest.approx(loss(80, 0.0))
    # Soft: the neighbour costs less than the far bin, and the right bin least.
    assert loss(50, 2.0) < loss(51, 2.0) < loss(80, 2.0)
    # A very narrow Gaussian is the one-hot target.
    assert loss(51, 1e-3) == pytest.approx(loss(51, 0.0), rel=1e-5)


def test_soft_coordinate_targets_leave_class_and_ignored_tokens_alone():
    logits = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[41, 0, -100, 30, 42], [43, 44, 0, -100, 41]])  # classes, EOS, noise, ignored: no coordinate
    hard = pix2seq_sequence_loss(logits, labels, 0, 0.1)
    soft = pix2seq_sequence_loss(logits, labels, 0, 0.1, 3.0, COORD, BINS)
    torch.testing.assert_close(hard, soft)
    with pytest.raises(ValueError, match="coord_token_offset"):
        pix2seq_sequence_loss(logits, labels, 0, 0.1, 3.0)


def test_config_refuses_negative_loss_options():
    with pytest.raises(ValueError, match="coordinate_label_sigma"):
        tiny_config(coordinate_label_sigma=-1.0)
    with pytest.raises(ValueError, match="auxiliary_loss_weight"):
        tiny_config(auxiliary_loss_weight=-0.5)


# ----- coordinate embeddings starting as position codes --------------------------------------------------------------


def test_sincos_coordinate_embeddings_start_ordered_and_load_unchanged(tmp_path):
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config(coordinate_embedding_init="sincos"))
    weight = model.get_input_embeddings().weight.detach()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    coordinates = weight[COORD : COORD + BINS]
    similarity = torch.nn.functional.cosine_similarity(coordinates[BINS // 2], coordinates, dim=-1)
    # Neighbouring bins start alike and far ones unlike; the other tokens keep the normal init, at the same scale.
    assert similarity[BINS // 2 + 1] > 0.9 and similarity[BINS // 2 + 1] > similarity[BINS // 2 + 8]
    assert coordinates.std().item() == pytest.approx(model.config.init_std, rel=0.05)
    torch.manual_seed(0)
    normal = Pix2SeqForObjectDetection(tiny_config())
    torch.testing.assert_close(weight[:COORD], normal.get_input_embeddings().weight.detach()[:COORD])
    model.save_pretrained(tmp_path)
    reloaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="coordinate_embedding_init"):
        tiny_config(coordinate_embedding_init="uniform")


# ----- auxiliary dense head ------------------------------------------------------------------------------------------


def _sequence(boxes_and_classes, noise: int = 0) -> list[int]:
    """Tokens `ymin xmin ymax xmax class` of xyxy boxes in [0, 1], then `noise` noise objects (coordinates ignored)."""
    tokens = []
    for (x0, y0, x1, y1), label in boxes_and_classes:
        tokens += [COORD + round(v * (BINS - 1)) for v in (y0, x0, y1, x1)] + [TINY_LAYOUT["class_token_offset"] + label]
    for _ in range(noise):
        tokens += [-100] * 4 + [TINY_LAYOUT["noise_token_id"]]
    return tokens


def test_objects_are_read_back_from_the_training_targets():
    config = tiny_config()
    first = _sequence([((0.1, 0.2, 0.5, 0.6), 3), ((0.0, 0.0, 1.0, 1.0), 0)], noise=1)
    second = _sequence([((0.7, 0.1, 0.9, 0.3), 4)], noise=2)
    labels = torch.tensor([first, second])
    (boxes_a, classes_a), (boxes_b, classes_b) = objects_from_labels(labels, config)
    torch.testing.assert_close(boxes_a, torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), atol=0.006, rtol=0)
    assert classes_a.tolist() == [3, 0] and classes_b.tolist() == [4]
    torch.testing.assert_close(boxes_b, torch.tensor([[0.7, 0.1, 0.9, 0.3]]), atol=0.006, rtol=0)


def test_auxiliary_head_assigns_the_cells_near_each_centre_one_to_many():
    from pix2seq_hf.auxiliary_dense_head import assign_cells

    # 8x8 grid (cells of 1/8): a large box centred at (0.5, 0.5) claims the 4x4 cells whose centres lie within 1.5
    # cells of its centre.
    large = torch.tensor([[0.1, 0.1, 0.9, 0.9]])
    positive, _ = assign_cells(large, 8, 8)
    rows, columns = torch.nonzero(positive.view(8, 8), as_tuple=True)
    assert sorted(set(rows.tolist())) == [2, 3, 4, 5] and sorted(set(columns.tolist())) == [2, 3, 4, 5]
    # A box smaller than a cell claims only the cells whose centres it covers; none here.
    assert not assign_cells(torch.tensor([[0.0, 0.0, 0.05, 0.05]]), 8, 8)[0].any()
    # Where two objects claim a cell, the smaller keeps it.
    both = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.4, 0.4, 0.6, 0.6]])
    positive, assigned = assign_cells(both, 8, 8)
    centre_cells = [3 * 8 + 3, 3 * 8 + 4, 4 * 8 + 3, 4 * 8 + 4]
    assert positive[centre_cells].all() and (assigned[centre_cells] == 1).all()
    assert positive.sum() == 16 and (assigned[positive] == 0).sum() == 12


def test_auxiliary_head_trains_the_encoder_and_stays_out_of_detection(tmp_path):
    torch.manual_seed(0)
    with_head = Pix2SeqForObjectDetection(tiny_config(auxiliary_loss_weight=1.0))
    without = Pix2SeqForObjectDetection(tiny_config())
    assert without.model.encoder.auxiliary_head is None and with_head.model.encoder.auxiliary_head is not None
    # The head is the only difference in the weights.
    extra = set(with_head.state_dict()) - set(without.state_dict())
    assert extra and all(name.startswith("model.encoder.auxiliary_head.") for name in extra)

    pixel_values = torch.rand(2, 3, 64, 64)
    labels = torch.tensor([_sequence([((0.1, 0.2, 0.5, 0.6), 3)], noise=1), _sequence([((0.6, 0.6, 0.9, 0.9), 1)], noise=1)])
    without.load_state_dict({k: v for k, v in with_head.state_dict().items() if k in without.state_dict()})
    loss_with = with_head(pixel_values=pixel_values, labels=labels).loss
    loss_without = without(pixel_values=pixel_values, labels=labels).loss
    assert loss_with.item() > loss_without.item()  # the auxiliary term is added
    loss_with.backward()
    assert with_head.model.encoder.auxiliary_head.box_head.weight.grad.abs().sum() > 0
    assert with_head.model.encoder.bridge.projection.weight.grad.abs().sum() > 0

    # Detection never uses the head: the same tokens with and without it, and it survives save/load.
    with_head.eval(), without.eval()
    kwargs = {"do_sample": False, "max_new_tokens": 10}
    torch.testing.assert_close(
        with_head.generate(pixel_values, **kwargs).sequences, without.generate(pixel_values, **kwargs).sequences
    )
    with_head.save_pretrained(tmp_path)
    reloaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    torch.testing.assert_close(
        reloaded.model.encoder.auxiliary_head.class_head.weight, with_head.model.encoder.auxiliary_head.class_head.weight
    )


def test_a_config_saved_with_removed_research_options_loads_without_them(tmp_path, caplog):
    """`auxiliary_hints` and `cross_attention_loss_weight` are no longer options: a saved config that has them loads,
    with a warning when one was on, and the model is the one without them."""
    config = tiny_config(auxiliary_loss_weight=1.0)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**saved, "auxiliary_hints": True, "cross_attention_loss_weight": 0.0})
    )
    with caplog.at_level("WARNING"):
        loaded = Pix2SeqConfig.from_pretrained(tmp_path)
    assert "`auxiliary_hints` is no longer a Pix2Seq training option" in caplog.text
    assert "cross_attention_loss_weight" not in caplog.text  # it was off: nothing to say
    for name in ("auxiliary_hints", "cross_attention_loss_weight"):
        assert not hasattr(loaded, name) and name not in loaded.to_dict()
    model = Pix2SeqForObjectDetection(loaded)
    assert not hasattr(model.model.encoder, "auxiliary_hints")
    assert model.model.encoder.auxiliary_head is not None


# ----- learning test -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_few_steps_on_a_fixed_batch_learn_to_detect_it(mixed_precision):
    """
    Training on one fixed batch lowers the loss markedly, and greedy decoding then finds its objects; also with bf16
    autocast and the CPU speed settings that `examples/train.py` uses on a CPU with AMX.
    """
    from pix2seq_hf.data import Pix2SeqCollator, make_synthetic_detection_dataset
    from pix2seq_hf.training_setup import speed_up_cpu_training

    torch.manual_seed(0)
    config = tiny_config(num_classes=None, id2label={i: str(i) for i in range(5)}, max_objects=2, dropout=0.0,
                         drop_path_rate=0.0)  # fmt: skip
    model = Pix2SeqForObjectDetection(config)
    if mixed_precision == "bf16":
        speed_up_cpu_training(model, mixed_precision)
    processor = Pix2SeqProcessor.from_config(
        config, image_processor=Pix2SeqImageProcessor(size={"longest_edge": 64}), sequence_augmentation=False,
        object_order="dist2ori",
    )  # fmt: skip
    dataset = make_synthetic_detection_dataset(4, seed=5, image_size=64, max_objects=2, min_object_size=0.3)
    batch = Pix2SeqCollator(processor, training=True, seed=0, return_targets=True)([dataset[i] for i in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses[::10]

    model.eval()
    with torch.no_grad():
        outputs = model.generate(batch["pixel_values"], do_sample=False)
    sizes = [tuple(int(v) for v in target["orig_size"]) for target in batch["targets"]]
    found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    from torchvision.ops import box_iou

    hits, total = 0, 0
    for target, detections in zip(batch["targets"], found):
        for box, label in zip(target["boxes"], target["labels"]):
            total += 1
            same_class = detections["labels"] == label
            if same_class.any() and box_iou(box[None], detections["boxes"][same_class]).max() > 0.5:
                hits += 1
    assert hits >= 0.75 * total, (hits, total)


# ----- training speed on the CPU ------------------------------------------------------------------------------------


def test_bf16_is_the_default_only_on_cpus_with_bf16_matrix_units(monkeypatch):
    from pix2seq_hf.training_setup import default_mixed_precision

    for capabilities, on_cpu, expected in (
        ({"amx_bf16": True}, True, "bf16"),
        ({"amx_bf16": True}, False, "no"),
        ({"amx_bf16": False, "avx512_bf16": True}, True, "no"),
        ({}, True, "no"),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        assert default_mixed_precision(on_cpu) == expected, (capabilities, on_cpu)


def test_cpu_speed_settings_change_layouts_and_kernels_not_results(tmp_path):
    from pix2seq_hf.training_setup import speed_up_cpu_training

    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config()).eval()
    pixel_values = torch.rand(2, 3, 64, 64)
    labels = torch.randint(COORD, COORD + BINS, (2, 10))
    expected = model(pixel_values=pixel_values, labels=labels).loss

    assert speed_up_cpu_training(model, "bf16") is model
    assert model.config._attn_implementation == "eager"
    kernels = [p for p in model.parameters() if p.ndim == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    torch.testing.assert_close(model(pixel_values=pixel_values, labels=labels).loss, expected, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded = Pix2SeqForObjectDetection.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert speed_up_cpu_training(Pix2SeqForObjectDetection(tiny_config()), "no").config._attn_implementation != "eager"


# ----- fine-tuning onto a new label set ------------------------------------------------------------------------------


TINY_RUN = [
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--num_warmup_steps", "1",
    "--max_train_steps", "2",
    "--num_visualizations", "0",
    "--seed", "3",
    "--num_threads", "1",
]  # fmt: skip


def test_a_saved_model_fine_tunes_onto_a_new_label_set(tmp_path, caplog):
    """Pretrain on the five shapes, fine-tune on a set with three other class names: the classes are mapped onto class
    tokens, the fine-tuning learning rate is the default, and the result loads and detects with the new names."""
    import datasets

    from pix2seq_hf.data import detection_features, make_synthetic_detection_dataset

    train = load_example("train")
    pretrained = tmp_path / "pretrained"
    synthetic = ["--synthetic_train_size", "8", "--synthetic_validation_size", "4"]
    assert train.main(TINY_RUN + synthetic + ["--output_dir", str(pretrained)]) == 0

    names = ["dot", "block", "peak"]
    other = {
        split: make_synthetic_detection_dataset(
            size, seed=7, image_size=64, num_classes=3, max_objects=3, split=split
        ).cast(detection_features(names))
        for split, size in (("train", 8), ("validation", 4))
    }
    datasets.DatasetDict(other).save_to_disk(str(tmp_path / "other"))

    finetuned = tmp_path / "finetuned"
    argv = TINY_RUN + ["--model_name_or_path", str(pretrained), "--dataset_name", str(tmp_path / "other")]
    with caplog.at_level("INFO"):
        assert train.main(argv + ["--output_dir", str(finetuned)]) == 0
    log = caplog.text
    assert "Fine-tuning onto a new label set" in log and "dot -> 100, block -> 101, peak -> 102" in log
    assert "learning rate 3e-05" in log

    model = Pix2SeqForObjectDetection.from_pretrained(finetuned)
    processor = Pix2SeqProcessor.from_pretrained(finetuned)
    processor.check_model_compatible(model)
    assert model.config.id2label == {0: "dot", 1: "block", 2: "peak"} and model.config.num_classes == 3
    results = json.loads((finetuned / "all_results.json").read_text())
    assert results["train_steps"] == 2 and isinstance(results["map"], float)
    # The fine-tuned weights started from the pretrained ones (same shapes, changed by training).
    before = Pix2SeqForObjectDetection.from_pretrained(pretrained).state_dict()
    after = model.state_dict()
    # Only the part sized per class (the auxiliary head) was rebuilt.
    rebuilt = ("model.encoder.auxiliary_head.",)
    assert all(before[name].shape == after[name].shape for name in before if not name.startswith(rebuilt))
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_fine_tuning_refuses_a_label_set_larger_than_the_class_token_range():
    from pix2seq_hf.training_setup import relabel_model

    model = Pix2SeqForObjectDetection(tiny_config())  # class tokens 40..199: room for 160 classes
    with pytest.raises(ValueError, match="room for 160 class tokens"):
        relabel_model(model, {i: f"c{i}" for i in range(161)})


# ----- the dense synthetic variant and the training benchmark --------------------------------------------------------


def test_dense_synthetic_variant_has_many_small_objects_on_a_large_canvas():
    from pix2seq_hf.data import load_detection_splits

    splits = load_detection_splits(
        synthetic_variant="dense", synthetic_train_size=2, synthetic_validation_size=1, seed=0
    )
    for example in list(splits.train) + list(splits.validation):
        assert (example["width"], example["height"]) == (384, 384)
        assert 20 <= len(example["objects"]["bbox"]) <= 60
        # sides of at most 10 % of the image, stretched by an aspect ratio of up to 1.25
        assert max(max(w, h) for _, _, w, h in example["objects"]["bbox"]) <= 0.1 * 384 * 1.25**0.5 + 1
    with pytest.raises(ValueError, match=r"synthetic_variant must be one of \['dense', 'shapes'\], got 'sparse'"):
        load_detection_splits(synthetic_variant="sparse", synthetic_train_size=1, validation_split="none")


def test_training_benchmark_runs_all_three_detectors(tmp_path):
    benchmark = load_example("benchmarks/benchmark_training")
    output = tmp_path / "report.json"
    argv = [
        "--max_train_steps", "2", "--eval_steps", "1", "--batch_size", "2", "--image_size", "64",
        "--synthetic_train_size", "4", "--synthetic_validation_size", "2", "--num_threads", "1",
        "--output_file", str(output),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    report = json.loads(output.read_text())
    assert set(report["detectors"]) == {"pix2seq", "detr", "fcos"}
    assert report["settings"]["augmentation"] == SYNTHETIC_AUGMENTATION  # the baselines' is Pix2Seq's default
    for history in report["detectors"].values():
        assert [entry["step"] for entry in history] == [1, 2]
        assert all(isinstance(entry["map"], float) and entry["minutes"] >= 0 for entry in history)


def test_training_benchmark_runs_on_the_dense_scenes(tmp_path):
    benchmark = load_example("benchmarks/benchmark_training")
    output = tmp_path / "report.json"
    argv = [
        "--dataset", "dense", "--detectors", "pix2seq", "fcos", "--max_train_steps", "1", "--batch_size", "2",
        "--image_size", "96", "--synthetic_train_size", "2", "--synthetic_validation_size", "2", "--num_threads", "1",
        "--output_file", str(output),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["settings"]["dataset"] == "dense" and report["settings"]["mixed_precision"] in ("no", "bf16")
    assert set(report["detectors"]) == {"pix2seq", "fcos"}
    assert all([entry["step"] for entry in history] == [1] for history in report["detectors"].values())


def test_training_step_benchmark_times_every_cpu_setting(tmp_path, capsys):
    benchmark = load_example("benchmarks/benchmark_training_step")
    output = tmp_path / "steps.json"
    argv = [
        "--rounds", "2", "--steps", "1", "--warmup_steps", "0", "--batch_size", "2", "--num_threads", "1",
        "--image_size", "64", "--synthetic_train_size", "4", "--synthetic_validation_size", "1",
        "--output_file", str(output),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    report, printed = json.loads(output.read_text()), capsys.readouterr().out
    for name in benchmark.CONFIGURATIONS:
        assert len(report[name]["rounds"]) == 2 and report[name]["seconds_per_step"] > 0
        assert f"| {name} | " in printed


def test_recipe_ablation_reports_metrics_and_image_use(tmp_path, monkeypatch):
    ablation = load_example("benchmarks/recipe_ablation")
    output = tmp_path / "run.json"
    collators = []

    def recording_collator(*args, **kwargs):
        collator = Pix2SeqCollator(*args, **kwargs)
        collators.append(collator)
        return collator

    monkeypatch.setattr(ablation.pix2seq_train, "Pix2SeqCollator", recording_collator)  # train.py's, which it uses
    argv = [
        "--max_train_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "2", "--image_size", "64",
        "--synthetic_train_size", "4", "--synthetic_validation_size", "3", "--num_threads", "1",
        "--diagnostic_images", "3", "--config_overrides", '{"decoder_layers": 1}', "--output_file", str(output),
        "--synthetic_variant", "dense", "--sequences_per_image", "2",
    ]  # fmt: skip
    assert ablation.main(argv) == 0
    assert collators[0].training and collators[0].sequences_per_image == 2
    report = json.loads(output.read_text())
    assert report["arguments"]["config_overrides"] == {"decoder_layers": 1}
    # train.py's data-driven defaults: sequences for the fullest (20+ objects) image, the synthetic set's augmentation.
    assert report["max_objects"] >= 20 and report["arguments"]["augmentation"] == "none"
    assert [entry["step"] for entry in report["history"]] == [1, 2]
    for entry in report["history"]:
        assert {"map", "coordinate_loss", "coordinate_loss_other_image", "class_loss"} <= set(entry)
        assert entry["coordinate_loss"] > 0 and 0 <= entry["auxiliary_head_map"] <= 1


def test_config_overrides_reach_a_new_model_only(tmp_path):
    train = load_example("train")
    with pytest.raises(SystemExit):
        train.parse_args(["--config_overrides", "[1, 2]"])
    with pytest.raises(SystemExit):
        train.parse_args(["--config_overrides", "{decoder_layers: 1}"])
    args = train.parse_args(["--config_overrides", '{"decoder_layers": 1, "encoder_layers": 3}'])
    model, _ = train.build_model_and_processor(args, {0: "a", 1: "b"})
    assert model.config.decoder_layers == 1 and len(model.model.encoder.layers) == 3
    model.save_pretrained(tmp_path)
    Pix2SeqProcessor.from_config(model.config, image_processor=Pix2SeqImageProcessor()).save_pretrained(tmp_path)
    args = train.parse_args(["--config_overrides", '{"decoder_layers": 2}', "--model_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match="new model only"):
        train.build_model_and_processor(args, {0: "a", 1: "b"})


def test_the_recipe_copies_from_the_auxiliary_head_where_there_is_one(tmp_path):
    """`--auxiliary_copy` defaults to on with the auxiliary head and off without it; asked for without the head it is
    refused; a saved model keeps its own."""
    train = load_example("train")
    small = ["--config_overrides", '{"backbone": "test_resnet", "encoder_hidden_size": 32, "decoder_hidden_size": 32}']
    labels = {0: "a", 1: "b"}
    model, processor = train.build_model_and_processor(train.parse_args(small), labels)
    assert model.config.auxiliary_copy is True and model.auxiliary_copy is not None
    plain, _ = train.build_model_and_processor(train.parse_args([*small, "--auxiliary_loss_weight", "0"]), labels)
    assert plain.config.auxiliary_copy is False and plain.auxiliary_copy is None
    off, _ = train.build_model_and_processor(train.parse_args([*small, "--auxiliary_copy", "false"]), labels)
    assert off.config.auxiliary_copy is False and off.model.encoder.auxiliary_head is not None
    with pytest.raises(ValueError, match="auxiliary_copy=True.*auxiliary_loss_weight > 0"):
        train.build_model_and_processor(
            train.parse_args([*small, "--auxiliary_loss_weight", "0", "--auxiliary_copy", "true"]), labels
        )
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = ["--model_name_or_path", str(tmp_path)]
    assert train.build_model_and_processor(train.parse_args(saved), labels)[0].config.auxiliary_copy is True
    with pytest.raises(ValueError, match="auxiliary_copy False differs from the saved model's True"):
        train.build_model_and_processor(train.parse_args([*saved, "--auxiliary_copy", "false"]), labels)
