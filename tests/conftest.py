"""Test-suite settings: offline, one torch thread per test process (pytest-xdist runs several)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402


torch.set_num_threads(1)
