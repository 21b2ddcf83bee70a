"""Shared test fixtures. Every test runs on CPU, offline, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network, ever: hub libraries must fail instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI clones main with shared/ beside it); SFD_SHARED overrides.
SHARED = Path(os.environ.get("SFD_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"reference data not found at {path}: tests need the shared/ folder beside the "
            "checkout (or SFD_SHARED pointing at it)"
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _need(SHARED / "reference" / "golden")


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    return _need(SHARED / "reference" / "keys")


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    return _need(SHARED / "data" / "imagenet-sample")


def read_keys_file(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse ``reference/keys/*.txt``: ``name<TAB>(shape)<TAB>dtype`` lines, ``#`` comments."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        out[name] = (dims, dtype)
    return out


def random_state_dict(keys: dict[str, tuple[tuple[int, ...], str]], seed: int = 0):
    """Random tensors with the real names, shapes and dtypes (no real weights exist here)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (shape, dtype) in keys.items():
        dt = getattr(torch, dtype)
        if dt.is_floating_point:
            sd[name] = (torch.randn(shape, generator=g) * 0.02).to(dt)
        else:
            sd[name] = torch.zeros(shape, dtype=dt)
    return sd
