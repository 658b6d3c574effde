"""Test-suite settings: offline, one torch thread per test process (pytest-xdist runs several), a fresh Accelerate
state per test."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Prepared datasets (e.g. the annotation cache of COCO jsons) go to a throw-away folder, not the user's cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="pix2seq-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """
    Accelerate keeps one state per process (device, mixed precision) and refuses an `Accelerator` that asks for
    another; after each test it is cleared, so that every training run in the suite starts as in a new process.
    """
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
