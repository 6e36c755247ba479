"""Shared pytest fixtures: where the read-only shared fixtures live, and the repository root."""

import os
from pathlib import Path

import pytest

# Without a GPU, Triton kernels run in its CPU interpreter; it must be chosen before any test imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    return Path(os.environ.get("MEGAPHI_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared/ folder beside the checkout (or $MEGAPHI_SHARED); a missing one is an error, not a skip."""
    path = _shared_dir()
    if not (path / "fixtures" / "megatron" / "code_sample.jsonl").is_file():
        pytest.fail(f"shared fixtures not found at {path}: set MEGAPHI_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def megatron_fixtures(shared_dir: Path) -> Path:
    """shared/fixtures/megatron: the code corpus, tokenizers and Megatron-LM's own .bin/.idx outputs."""
    return shared_dir / "fixtures" / "megatron"


@pytest.fixture
def write_token_dataset(tmp_path: Path):
    """Writes an indexed dataset of random documents (8 to 59 tokens, ids < 500) and returns its prefix."""
    import numpy as np

    from megaphi.data.indexed_dataset import IndexedDatasetBuilder

    def write(num_documents: int, name: str = "data", seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        prefix = tmp_path / name
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
            for _ in range(num_documents):
                builder.add_document([rng.integers(0, 500, size=int(rng.integers(8, 60)))])
        return str(prefix)

    return write
