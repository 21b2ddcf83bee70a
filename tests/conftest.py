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
# Reference data the tests need lives in the repository (tests/data/README.md says where it came
# from); images are generated (sfd.data.synthetic). Nothing outside the checkout is read.
DATA = Path(__file__).resolve().parent / "data"


# The longest test files first (measured on the 2-core CI machine): under `pytest -n 2 --dist
# loadfile --no-loadscope-reorder` (the justfile's `test`) each worker starts on one of them and the
# many short files fill in around them, instead of one worker finishing alone on the demo.
LONGEST_FIRST = ("test_demo.py", "test_study.py", "test_cli_errors.py", "test_train_kernels.py",
                 "test_train.py", "test_integrity.py", "test_demo_evidence.py", "test_ray_cluster.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture
def one_thread():
    """torch on one thread for the test: bitwise comparisons with subprocesses (started with
    OMP_NUM_THREADS=1) need the same thread count in this process. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return DATA / "golden"


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    return DATA / "keys"


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-like folder of 30 classes × 1 synthetic photo at real ImageNet sizes (read-only by
    convention: tests that damage files copy them first)."""
    from sfd.data.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("sample-images")
    write_image_folder(root, num_classes=30, per_class=1, seed=0)
    return root


def read_keys_file(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse ``tests/data/keys/*.txt``: ``name<TAB>(shape)<TAB>dtype`` lines, ``#`` comments."""
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
