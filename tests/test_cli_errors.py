"""One flag style and one error voice, through the real command lines (subprocesses).

Every entry point turns a user error — a bad flag value or unknown ``-o`` key, a missing or
damaged file, a held run lock — into exactly one ``error: …`` line on stderr (its last line) that
names the thing, exit status 2, no traceback. Every config-driven command has the same ``--help``
shape (``--preset`` where it has presets, ``-o``, ``--dry-run``), and ``--dry-run`` prints the
resolved config as JSON, exits 0 and leaves nothing behind. Old spellings still work, with one note.

Every case fails at argument or preflight time: no Ray, no training. Each runs in its own process,
forked from a server that has imported torch once (tests/forkrun.py; tests/test_cli.py keeps
plain subprocess runs of the same kind).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.forkrun import ForkRunner

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


_RUNNER: ForkRunner | None = None


@pytest.fixture(scope="module", autouse=True)
def _fork_servers():
    yield
    global _RUNNER
    if _RUNNER is not None:
        _RUNNER.close()
        _RUNNER = None


def run(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    """The command line ``python argv…`` (or ``python -m …``) in ``tmp``, in its own forked process
    (tests/forkrun.py: the torch import is paid once, not ~50 times)."""
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = ForkRunner(ENV, workers=max(2, os.cpu_count() or 2))
    return _RUNNER.run(tmp, *argv)


def assert_user_error(res: subprocess.CompletedProcess, needle: str) -> None:
    """Status 2, no traceback, exactly one ``error:`` line naming ``needle``; it is the last line,
    or only an indented detail block follows it (paper_fid lists each missing file with its command)."""
    err = res.stderr
    assert res.returncode == 2, (res.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.rstrip().splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(at) == 1 and not any(line.startswith("error") for line in lines[: at[0]]), err[-3000:]
    assert all(line[:1].isspace() for line in lines[at[0] + 1:]), err[-3000:]
    assert needle in lines[at[0]], (needle, lines[at[0]])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with what the cases point at: random bytes as weights, an image folder, caches."""
    from tests.test_train import make_cache

    root = tmp_path_factory.mktemp("cli") / "assets"
    root.mkdir()
    rng = np.random.default_rng(0)
    (root / "junk.pt").write_bytes(rng.bytes(4096))  # a "checkpoint" of random bytes
    (root / "junk.npz").write_bytes(rng.bytes(4096))
    (root / "junk.safetensors").write_bytes(rng.bytes(4096))
    (root / "imgs" / "a").mkdir(parents=True)
    (root / "not-a-cache").mkdir()
    (root / "not-a-cache" / "zarr.json").write_text("{ not json")
    (root / "empty-study").mkdir()
    (root / "a-file").write_text("x")
    make_cache(root / "cache")  # the trainer's tiny cache
    semvae_cache(root / "semvae-cache")
    # A SemVAE run whose only checkpoint is damaged (random bytes as the trainer state).
    ckpt = root / "semvae-run" / "checkpoints" / "0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(rng.bytes(4096))
    (ckpt / "state.pt").write_bytes(rng.bytes(4096))
    return root


def semvae_cache(path: Path) -> None:
    """The smallest cache the tiny SemVAE trains on: 64-wide DINO tokens, 4 semantic channels."""
    from sfd.data.cache import create_cache

    g = np.random.default_rng(0)
    rows = 16
    cache = create_cache(path, paths=[f"c0/{i}.png" for i in range(rows)], labels=np.zeros(rows, dtype=np.int64),
                         rows_per_shard=16, rows_per_chunk=16, texture_shape=(8, 2, 2), semantic_shape=(4, 2, 2),
                         store_dino=True, dino_shape=(4, 64), attrs={"num_classes": 1})
    both = g.standard_normal((rows, 2, 12, 2, 2)).astype(np.float32)
    cache.write_shard(0, both[:, :, :8], both[:, :, 8:], g.standard_normal((rows, 2, 4, 64)).astype(np.float32))


ENCODE = ["pipeline/encode.py", "--images", "imgs", "--out", "out-cache"]
GEN = ["eval/fid.py", "gen", "--out", "samples"]

# (case id, argv, the text the error line must name)
CASES = [
    # encode
    ("encode-unknown-key", [*ENCODE, "-o", "batchsize=8"], "batchsize"),
    ("encode-unknown-stage", [*ENCODE, "--random-encoders", "0", "--stages", "encode,bogus"], "bogus"),
    ("encode-repa-none-needs-semvae", [*ENCODE, "--random-encoders", "0", "-o", "repa_targets=none"], "--semvae"),
    ("encode-missing-images", ["pipeline/encode.py", "--images", "nope", "--out", "c", "--random-encoders", "0"], "nope"),
    ("encode-bad-weights", [*ENCODE, "--texture-vae", "junk.pt", "--dino", "junk.pt"], "junk.pt"),
    # verify_cache
    ("verify-missing", ["pipeline/verify_cache.py", "nope"], "nope"),
    ("verify-damaged", ["pipeline/verify_cache.py", "not-a-cache"], "not-a-cache"),
    ("verify-bad-flag", ["pipeline/verify_cache.py", "cache", "--deep"], "--deep"),
    # train_semvae
    ("semvae-bad-value", ["pipeline/train_semvae.py", "--cache", "semvae-cache", "--run-dir", "r", "-o", "lr=fast"], "lr"),
    ("semvae-bad-preset", ["pipeline/train_semvae.py", "--cache", "semvae-cache", "--run-dir", "r", "--preset", "huge"], "huge"),
    ("semvae-missing-cache", ["pipeline/train_semvae.py", "--cache", "nope", "--run-dir", "r"], "nope"),
    ("semvae-damaged-checkpoint", ["pipeline/train_semvae.py", "--cache", "semvae-cache", "--run-dir", "semvae-run",
                                   "--preset", "tiny", "-o", "device=cpu"], "state.pt"),
    # train
    ("train-bad-value", ["train/main.py", "--preset", "tiny", "-o", "lr=fast", "--dry-run"], "lr"),
    ("train-unknown-key", ["train/main.py", "--preset", "tiny", "-o", "learning_rate=1", "--dry-run"], "learning_rate"),
    ("train-missing-cache", ["train/main.py", "--preset", "tiny", "--cache", "nope"], "nope"),
    ("train-bad-weights", ["train/main.py", "--preset", "tiny", "--cache", "cache", "--out-dir", "run-w",
                           "--init-from", "junk.pt", "-o", "max_steps=1"], "junk.pt"),
    # grid
    ("grid-bad-value", ["sample/grid.py", "--ckpt", "junk.pt", "-o", "method=rk4"], "rk4"),
    ("grid-bad-flag-value", ["sample/grid.py", "--ckpt", "junk.pt", "--per-class", "many"], "per_class"),
    ("grid-missing", ["sample/grid.py", "--ckpt", "nope", "--guide", "gone.pt"], "--ckpt nope; --guide gone.pt"),
    ("grid-bad-weights", ["sample/grid.py", "--ckpt", "junk.pt", "--model", "tiny"], "junk.pt"),
    # fid gen / ref / calc
    ("gen-unknown-key", [*GEN, "--ckpt", "junk.pt", "-o", "bogus=1"], "bogus"),
    ("gen-missing", [*GEN, "--ckpt", "nope"], "--ckpt nope"),
    ("gen-bad-weights", [*GEN, "--ckpt", "junk.pt", "--model", "tiny", "-o", "device=cpu"], "junk.pt"),
    ("ref-bad-value", ["eval/fid.py", "ref", "imgs", "--out", "r.npz", "--detector", "vgg"], "vgg"),
    ("ref-missing", ["eval/fid.py", "ref", "nope", "--out", "r.npz", "--detector", "random"], "nope"),
    ("ref-bad-weights", ["eval/fid.py", "ref", "imgs", "--out", "r.npz", "--inception", "junk.pt"], "junk.pt"),
    ("calc-unknown-key", ["eval/fid.py", "calc", "junk.npz", "-o", "splits=10"], "splits"),
    ("calc-missing", ["eval/fid.py", "calc", "nope.npz", "--detector", "random", "--ref", "junk.npz"], "nope.npz"),
    ("calc-damaged-npz", ["eval/fid.py", "calc", "junk.npz", "--detector", "random", "--ref", "junk.npz"], "junk.npz"),
    ("fid-bad-command", ["eval/fid.py", "score"], "score"),
    # paper_fid
    ("paper-fid-bad-row", ["eval/paper_fid.py", "xl-9m"], "xl-9m"),
    ("paper-fid-missing", ["eval/paper_fid.py", "xl-4m", "--weights", "nope"], "file(s) missing"),
    # demo, demo_models, study
    ("demo-bad-value", ["pipeline/demo.py", "-o", "samples=7", "--dry-run"], "samples"),
    ("demo-out-is-a-file", ["pipeline/demo.py", "--out", "a-file"], "a-file"),
    ("demo-models-bad-value", ["pipeline/demo_models.py", "judge", "--train", "imgs", "--ref", "imgs", "--out", "j",
                               "--steps", "many"], "many"),
    ("demo-models-missing", ["pipeline/demo_models.py", "score", "--judge", "nope.safetensors", "--ref", "imgs", "imgs"],
     "nope.safetensors"),
    ("demo-models-bad-weights", ["pipeline/demo_models.py", "score", "--judge", "junk.safetensors", "--ref", "imgs", "imgs"],
     "junk.safetensors"),
    ("study-bad-value", ["pipeline/study.py", "-o", "variants=dt0,dt9", "--dry-run"], "dt9"),
    ("study-missing", ["pipeline/study.py", "--out", "empty-study", "--report-only"], "ceiling.json"),
    # plot, weights
    ("plot-missing", ["eval/plot.py", "nope"], "nope"),
    ("plot-bad-flag", ["eval/plot.py", "imgs", "--dpi", "3"], "--dpi"),
    ("weights-bad-key", ["-m", "sfd.weights", "--path", "bogus"], "bogus"),
    ("weights-not-a-dir", ["-m", "sfd.weights", "a-file"], "a-file"),
]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def outcomes(files: Path) -> dict[str, tuple[subprocess.CompletedProcess, list[str], list[str]]]:
    """Every case at once (one process per core): its own folder of links to the assets, the
    result, and the folder's listing before and after."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: tuple[str, list[str], str]):
        folder = files.parent / "cases" / case[0]
        folder.mkdir(parents=True)
        for p in files.iterdir():
            (folder / p.name).symlink_to(p)
        before = listing(folder)
        return case[0], (run(folder, *case[1]), before, listing(folder))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case, needle", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_with_status_2(outcomes: dict, case: str, needle: str) -> None:
    res, before, after = outcomes[case]
    assert_user_error(res, needle)
    assert after == before  # a refused run leaves nothing behind


@pytest.mark.parametrize("argv, lock", [
    ([*ENCODE, "--random-encoders", "0"], "out-cache.lock"),
    (["pipeline/train_semvae.py", "--cache", "semvae-cache", "--run-dir", "held-run"], "held-run/run.lock"),
    (["train/main.py", "--preset", "tiny", "--cache", "cache", "--out-dir", "held-train"], "held-train/run.lock"),
], ids=["encode", "train_semvae", "train"])
def test_held_run_lock_is_one_line_with_status_2(files: Path, argv: list[str], lock: str) -> None:
    from sfd.runlock import run_lock

    with run_lock(files / lock, "test"):  # held by this (live) process
        res = run(files, *argv)
    assert_user_error(res, lock)
    assert "held by" in res.stderr


# The commands with a typed config: their parser (module, sub-command) and a --dry-run command line.
CONFIG_COMMANDS = {
    "encode": ("pipeline.encode", None, [*ENCODE, "--dry-run"]),
    "train_semvae": ("pipeline.train_semvae", None, ["pipeline/train_semvae.py", "--cache", "c", "--run-dir", "r", "--dry-run"]),
    "train": ("train.main", None, ["train/main.py", "--preset", "tiny", "--cache", "nope", "--dry-run"]),
    "grid": ("sample.grid", None, ["sample/grid.py", "--ckpt", "nope", "--sampler", "heun", "--dry-run"]),
    "fid gen": ("eval.fid", "gen", [*GEN, "--ckpt", "nope", "--preset", "heun", "-o", "num_steps=4", "--dry-run"]),
    "fid ref": ("eval.fid", "ref", ["eval/fid.py", "ref", "nope", "--out", "r.npz", "--dry-run"]),
    "fid calc": ("eval.fid", "calc", ["eval/fid.py", "calc", "nope.npz", "--dry-run"]),
    "demo": ("pipeline.demo", None, ["pipeline/demo.py", "--quick", "--dry-run"]),
    "study": ("pipeline.study", None, ["pipeline/study.py", "--preset", "tiny", "--dry-run"]),
}


def sub_parser(module: str, sub: str | None):
    import argparse

    p = importlib.import_module(module).build_parser()
    if sub is None:
        return p
    (subs,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return subs.choices[sub]


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS))
def test_help_has_one_shape(name: str) -> None:
    if name == "study":
        sys.path.insert(0, str(REPO / "pipeline"))  # study.py imports demo.py beside it
    module, sub, _ = CONFIG_COMMANDS[name]
    text = sub_parser(module, sub).format_help()
    for piece in ("-o KEY=VALUE, --override KEY=VALUE", "--dry-run"):
        assert piece in text, f"{name} --help lacks {piece}"
    # Same order everywhere: options (preset, paths and flags, -o, --dry-run), old spellings, examples.
    marks = ("\noptions:\n", "\n  --preset ", "\n  -o KEY=VALUE", "\n  --dry-run ", "\nold spellings", "\nexample")
    order = [text.lower().index(m) for m in marks if m in text.lower()]
    assert order == sorted(order), (name, [m for m in marks if m in text.lower()])


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command's --dry-run at once (one process per core), each in an empty folder."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("dry")

    def one(name: str):
        folder = root / name.replace(" ", "-")
        folder.mkdir()
        return name, (run(folder, *CONFIG_COMMANDS[name][2]), folder)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, sorted(CONFIG_COMMANDS)))


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS))
def test_dry_run_prints_the_config_as_json(dry_runs: dict, name: str) -> None:
    res, folder = dry_runs[name]
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    cfg, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])  # the trainer adds derived numbers after it
    assert isinstance(cfg, dict) and cfg
    assert not any(folder.iterdir()), f"{name} --dry-run wrote {list(folder.iterdir())}"
    if name == "grid":  # an old spelling works, with one note naming the new one
        assert cfg["sampling"]["method"] == "heun"
        notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
        assert notes == ["note: --sampler is deprecated; use -o method=heun"], res.stderr
    if name == "fid gen":
        assert cfg["sampling"]["method"] == "heun" and cfg["sampling"]["num_steps"] == 4
    if name == "demo":
        assert cfg["quick"] is True and cfg["steps"] == 500  # --quick is the quick preset
