"""The speed benchmark's targets: each ratio is read from the run's own timings, against the DETR of the same
settings."""

import argparse

import pytest

from helpers import load_example


@pytest.fixture(scope="module")
def speed_benchmark():
    return load_example("benchmarks/benchmark")


def detection_report(seconds: dict[str, float]) -> dict:
    return {"detection": {"1": {name: {"median_s": value} for name, value in seconds.items()}}, "decoder": {}}


def test_bf16_detection_is_compared_with_float32_and_bf16_detr(speed_benchmark):
    args = argparse.Namespace(objects=[10, 100])
    report = detection_report(
        {"detr": 0.6, "detr bf16": 0.3, "pix2seq generate K=100": 3.0, "pix2seq generate bf16 K=100": 1.2}
    )
    targets = speed_benchmark.check_targets(args, report)

    assert targets["detection generate K=100 / DETR, batch 1"]["ratio"] == pytest.approx(5.0)
    assert targets["detection generate bf16 K=100 / DETR, batch 1"] == {
        "ratio": pytest.approx(2.0),
        "target": "<= 2.0",
        "met": True,
    }
    assert targets["detection generate bf16 K=100 / DETR bf16, batch 1"] == {
        "ratio": pytest.approx(4.0),
        "target": "<= 2.0",
        "met": False,
    }


def test_without_bf16_models_there_is_no_bf16_target(speed_benchmark):
    args = argparse.Namespace(objects=[10, 100])
    targets = speed_benchmark.check_targets(args, detection_report({"detr": 0.6, "pix2seq generate K=10": 0.9}))

    assert list(targets) == ["detection generate K=10 / DETR, batch 1"]
    assert targets["detection generate K=10 / DETR, batch 1"]["met"] is False


def test_detection_is_also_compared_with_detr_given_channels_last_images(speed_benchmark):
    args = argparse.Namespace(objects=[10, 100])
    report = detection_report({"detr": 0.6, "detr channels-last": 0.5, "pix2seq generate K=10": 0.55})
    targets = speed_benchmark.check_targets(args, report)

    assert targets["detection generate K=10 / DETR, batch 1"]["met"] is True
    assert targets["detection generate K=10 / DETR channels-last, batch 1"] == {
        "ratio": pytest.approx(1.1),
        "target": "<= 1.0",
        "met": False,
    }


def test_machine_info_says_whether_bf16_is_native(speed_benchmark):
    info = speed_benchmark.machine_info(argparse.Namespace(threads=2))

    assert set(info["cpu_bf16_flags"]) <= {"avx512_bf16", "amx_bf16"}
    assert isinstance(info["cpu_capability"], str) and info["cpu_capability"]
