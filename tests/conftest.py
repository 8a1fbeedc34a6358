"""Shared fixtures: where the real data is, and tiny synthetic datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The shared data folder: $METALDEFECT_DATA, else ../shared/data beside the repo."""
    return Path(os.environ.get("METALDEFECT_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models: on one thread they are far faster than on two busy cores,
    where OpenMP's spinning threads can make a call hundreds of times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def neu_root() -> Path:
    root = data_root() / "NEU-DET"
    if not (root / "ANNOTATIONS").is_dir():
        pytest.skip(f"NEU-DET not found at {root} (set METALDEFECT_DATA to the folder holding NEU-DET)")
    return root


@pytest.fixture(scope="session")
def gc10_labels() -> Path:
    labels = data_root() / "GC10-DET" / "lable"
    if not labels.is_dir():
        pytest.skip(f"GC10-DET labels not found at {labels} (set METALDEFECT_DATA to the folder holding GC10-DET)")
    return labels
