"""Shared test set-up: no network, CPU only, small thread counts, temporary run directories."""
import os

import pytest

from mdtrain.testing import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ["WANDB_MODE"] = "offline"

import torch  # noqa: E402

# Test tensors are tiny: one intra-op thread is faster, and immune to the 10-100x OpenMP slowdowns that two threads
# per process suffer when other processes (spawned ranks, subprocess runs) load the cores.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_dir(tmp_path):
    """A fresh, empty run directory."""
    d = tmp_path / "run"
    d.mkdir()
    return str(d)


@pytest.fixture
def repo_root():
    return REPO
