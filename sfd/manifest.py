"""Checkpoint manifests: every file's size and SHA-256, written last, checked before resuming.

A training checkpoint directory (``checkpoints/<step>/``) gets ``manifest.json`` once all its
files are written (atomically: temporary file, fsync, rename). Resume verifies the newest
checkpoint against its manifest and, if a file is missing, truncated or altered, falls back to
the newest intact one with one warning naming what was wrong; the damaged directory is moved
aside (``<step>.damaged``) so it neither counts as a checkpoint nor gets pruned in place of a
good one. A checkpoint without a manifest (written before manifests existed, or a save killed
just before it) is checked by reading every file in full instead.

Kept apart from ``sfd.checkpoint`` so the trainer needs two calls: :func:`write_manifest` after
saving and :func:`usable_checkpoints` instead of ``list_checkpoints`` when resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
    """No intact checkpoint to resume from (each damaged one is named with its problem)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _payload_files(ckpt_dir: Path) -> list[Path]:
    # Temporary files of an interrupted atomic write start with a dot; they are not content.
    return sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(ckpt_dir: str | os.PathLike[str]) -> Path:
    """Record size and SHA-256 of every file of ``ckpt_dir``; the last write of a checkpoint."""
    d = Path(ckpt_dir)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _payload_files(d)}
    doc = {"version": MANIFEST_VERSION, "files": files}
    tmp = d / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    try:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return d / MANIFEST


def _write_doc(d: Path, files: dict[str, Any]) -> Path:
    tmp = d / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": MANIFEST_VERSION, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    return d / MANIFEST


def _listed(d: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((d / MANIFEST).read_text())["files"])
    except FileNotFoundError:
        return {}


def manifest_add(directory: str | os.PathLike[str], names: list[str]) -> Path:
    """Add (or refresh) the records of ``names`` in ``directory``'s manifest, hashing only those
    files: for a folder that grows one file at a time (a run's post-hoc EMA snapshots), where
    :func:`write_manifest` would re-hash its whole history at every addition."""
    d = Path(directory)
    files = _listed(d)
    for name in names:
        p = d / name
        files[name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return _write_doc(d, files)


def manifest_remove(directory: str | os.PathLike[str], names: list[str]) -> None:
    """Drop the records of ``names`` (before the files themselves are deleted)."""
    d = Path(directory)
    if (d / MANIFEST).is_file():
        files = _listed(d)
        _write_doc(d, {k: v for k, v in files.items() if k not in set(names)})


def _load_check(path: Path) -> str | None:
    """Read a file fully the way the trainer will; the problem, or None."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path), device="cpu")
        elif path.suffix in (".pt", ".pth"):
            import torch

            torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - SafetensorError, truncated zip, unpickling refusal ...
        return f"{path.name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    return None


def verify_checkpoint(ckpt_dir: str | os.PathLike[str], required: tuple[str, ...] = ("model.safetensors", "state.pt")) -> list[str]:
    """Problems of one checkpoint directory (empty = intact)."""
    d = Path(ckpt_dir)
    mf = d / MANIFEST
    problems: list[str] = []
    if mf.is_file():
        try:
            files: dict[str, Any] = json.loads(mf.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{MANIFEST} is unreadable ({type(e).__name__})"]
        for name in required:
            if name not in files:
                problems.append(f"{name} is not in the manifest")
        for name, want in sorted(files.items()):
            p = d / name
            if not p.is_file():
                problems.append(f"{name} is missing")
            elif p.stat().st_size != want["size"]:
                problems.append(f"{name} has {p.stat().st_size} bytes, the manifest says {want['size']}")
            elif _sha256(p) != want["sha256"]:
                problems.append(f"{name} does not match its SHA-256 in the manifest (altered or corrupted)")
        return problems
    # No manifest: an older checkpoint, or a save killed right before its manifest. Load everything.
    for name in required:
        if not (d / name).is_file():
            problems.append(f"{name} is missing")
    for p in _payload_files(d):
        if (why := _load_check(p)) is not None:
            problems.append(why)
    return problems


def usable_checkpoints(
    run_dir: str | os.PathLike[str],
    list_checkpoints: Callable[[str | os.PathLike[str]], list[tuple[int, Path]]],
    warn: Callable[[str], None],
    *,
    move_aside: bool = True,
) -> list[tuple[int, Path]]:
    """``list_checkpoints(run_dir)`` without the damaged newest ones.

    Verifies from the newest down to the first intact checkpoint; the damaged ones above it are
    reported in one ``warn`` line and (``move_aside``, rank 0) renamed ``<step>.damaged``.
    Raises :class:`CheckpointError` if checkpoints exist but none is intact: starting over
    silently would overwrite them.
    """
    ckpts = list_checkpoints(run_dir)
    damaged: list[tuple[Path, list[str]]] = []
    while ckpts:
        step, d = ckpts[-1]
        problems = verify_checkpoint(d)
        if not problems:
            break
        damaged.append((d, problems))
        ckpts = ckpts[:-1]
    if not damaged:
        return ckpts
    what = "; ".join(f"{d}: {', '.join(p[:3])}" for d, p in damaged)
    if not ckpts:
        raise CheckpointError(
            f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({what}). Restore the files from a copy, "
            "or move the checkpoints folder aside to start the run over"
        )
    moved = ""
    if move_aside:
        for d, _ in damaged:
            target = d.with_name(f"{d.name}.damaged")
            n = 1
            while target.exists():
                target, n = d.with_name(f"{d.name}.damaged{n}"), n + 1
            try:
                d.rename(target)
            except OSError:  # another rank moved it already, or read-only storage: keep going
                pass
        moved = " (moved aside as <step>.damaged)"
    warn(f"warning: damaged checkpoint(s) skipped{moved}: {what}; resuming from the newest intact one, {ckpts[-1][1]}")
    return ckpts
