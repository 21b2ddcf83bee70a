"""The Zarr v3 latent cache: one directory holding every encoded image of a dataset (DESIGN.md §4).

Layout (N rows = images in the fixed order chosen before encoding, F = 2 = [plain, h-flip]):

=================  ==========================  =======  ===========================================
array              shape                       dtype    zarr chunking (N axis)
=================  ==========================  =======  ===========================================
``paths``          [N]                         string   written once by the creator
``labels``         [N]                         int32    written once by the creator
``texture``        [N, 2, Ct, h, w]            float16  ``rows_per_chunk`` rows per chunk file
``semantic``       [N, 2, Cs, h, w]            float16  ``rows_per_chunk`` rows per chunk file
``dino``           [N, 2, 256, 768] (opt.)     float16  zarr shard of ``rows_per_chunk`` rows, inner
                                                        chunk = one (row, flip) so a random REPA
                                                        target read touches 393 KB, not 50 MB
``valid``          [N]                         bool     ``rows_per_shard``
``reason``         [N]                         string   ``rows_per_shard`` ('' for valid rows)
``shard_done``     [num_shards]                bool     1 (each work unit owns its flag)
``semantic_done``  [num_shards] (opt.)         bool     1; only with ``semantic_pass=True`` (below)
``texture_mean``   [Ct] (+ ``_std``)           float32  written by :meth:`LatentCache.compute_stats`
``semantic_mean``  [Cs] (+ ``_std``)           float32  idem
=================  ==========================  =======  ===========================================

A *shard* here is the unit of work of the encode job: ``rows_per_shard`` contiguous rows. Every
zarr chunk (or zarr shard, for ``dino``) lies inside exactly one work shard, so concurrent
writers never touch the same file (zarr silently loses data when two writers share one). A work
shard writes all of its arrays and sets ``shard_done[shard]`` last, so a killed job resumes by
redoing the shards whose flag is still False; the data are stored uncompressed, so a shard
redone from the same inputs rewrites exactly the same bytes.

Latents are stored raw (the posterior samples, method.md §2.1, §3.4) in float16 — zarr 3 has no
bfloat16 — and normalised at load time from the per-channel statistics stored here (method.md
§2.4), so changing the normalisation never forces a re-encode.

Semantic latents can come later: a cache created with ``semantic_pass=True`` is encoded without
a Semantic VAE (``semantic`` holds zeros and ``dino`` must be stored), the SemVAE is then trained
on the cached DINO features, and :meth:`LatentCache.write_semantic` fills ``semantic`` shard by
shard, setting its own ``semantic_done[shard]`` flag last (the same one-writer-per-shard rule).
Such a cache counts as complete only when both flags are set for every shard.

Group attributes hold the layout (key ``sfd_latent_cache``: format version, shapes, shard sizes,
a hash of the file index) next to the caller's attributes (encoder names and checkpoint hashes,
image size, class names, ...); ``created_by`` is informational and never compared.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

FORMAT_VERSION = 1
LAYOUT_KEY = "sfd_latent_cache"
INFO_KEY = "created_by"  # never compared: who/when/where created the cache
NUM_FLIPS = 2  # index 0 = plain image, 1 = horizontally flipped (method.md §2.5)
DEFAULT_DINO_SHAPE = (256, 768)  # DINOv2-B/14 patch tokens of a 224² input (method.md §11)


class CacheError(RuntimeError):
    """The cache cannot be used as asked (incomplete, not a cache, bad shard data, ...)."""


class CacheMismatchError(CacheError):
    """The cache on disk was made with different settings than the caller expects."""

    def __init__(self, path: str | os.PathLike[str], diffs: dict[str, tuple[Any, Any]]):
        self.diffs = diffs
        lines = [
            f"  {k}: cache has {_short(have)}, expected {_short(want)}" for k, (have, want) in diffs.items()
        ]
        super().__init__(
            f"latent cache at {path} does not match the expected attributes "
            f"({', '.join(diffs)}):\n" + "\n".join(lines)
        )


def _short(v: Any, limit: int = 120) -> str:
    s = "<missing>" if v is _MISSING else json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_MISSING = object()


def _jsonable(obj: Any) -> Any:
    # Attributes go through JSON on disk; compare in the same form (tuples → lists, ...).
    return json.loads(json.dumps(obj))


def attr_diffs(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys of ``want`` whose value differs in ``have`` (missing keys included)."""
    have, want = _jsonable(dict(have)), _jsonable(dict(want))
    return {k: (have.get(k, _MISSING), v) for k, v in want.items() if have.get(k, _MISSING) != v}


@dataclass(frozen=True)
class CacheLayout:
    num_rows: int
    rows_per_shard: int
    rows_per_chunk: int
    texture_shape: tuple[int, int, int]  # (Ct, h, w)
    semantic_shape: tuple[int, int, int]  # (Cs, h, w)
    dino_shape: tuple[int, int] | None  # (tokens, dim) or None when REPA targets are not stored
    index_sha256: str  # hash of (paths, labels): the row order is part of the cache's identity
    format_version: int = FORMAT_VERSION
    semantic_pass: bool = False  # semantic latents written by a later pass (write_semantic)

    def __post_init__(self) -> None:
        if self.num_rows <= 0:
            raise ValueError("a cache needs at least one row")
        if self.rows_per_shard <= 0 or self.rows_per_chunk <= 0:
            raise ValueError("rows_per_shard and rows_per_chunk must be positive")
        if self.rows_per_shard % self.rows_per_chunk:
            # A zarr chunk straddling two work shards would have two concurrent writers.
            raise ValueError(
                f"rows_per_chunk={self.rows_per_chunk} must divide rows_per_shard={self.rows_per_shard}"
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.rows_per_chunk)

    def shard_rows(self, shard_id: int) -> tuple[int, int]:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard {shard_id} out of range [0, {self.num_shards})")
        start = shard_id * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_rows)

    def chunk_rows(self, chunk_id: int) -> tuple[int, int]:
        start = chunk_id * self.rows_per_chunk
        return start, min(start + self.rows_per_chunk, self.num_rows)

    def to_attrs(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_attrs(cls, d: Mapping[str, Any]) -> CacheLayout:
        return cls(
            num_rows=int(d["num_rows"]),
            rows_per_shard=int(d["rows_per_shard"]),
            rows_per_chunk=int(d["rows_per_chunk"]),
            texture_shape=tuple(d["texture_shape"]),  # type: ignore[arg-type]
            semantic_shape=tuple(d["semantic_shape"]),  # type: ignore[arg-type]
            dino_shape=None if d["dino_shape"] is None else tuple(d["dino_shape"]),  # type: ignore[arg-type]
            index_sha256=str(d["index_sha256"]),
            format_version=int(d["format_version"]),
            semantic_pass=bool(d.get("semantic_pass", False)),
        )


def index_hash(paths: Sequence[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(paths)).encode())
    h.update(np.asarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()  # bf16 tensors have no numpy view
    return np.asarray(x)


def _create_layout_arrays(group: zarr.Group, layout: CacheLayout) -> None:
    n, rs, rc = layout.num_rows, layout.rows_per_shard, layout.rows_per_chunk
    # Uncompressed: latents barely compress, raw chunks read at memory speed, and a redone shard
    # is byte-identical. write_empty_chunks keeps all-zero chunks (invalid rows) as real files.
    raw = dict(compressors=None, fill_value=0, config={"write_empty_chunks": True})
    group.create_array("labels", shape=(n,), dtype="int32", chunks=(min(n, rs),), fill_value=-1)
    group.create_array("paths", shape=(n,), dtype=str, chunks=(min(n, 1 << 16),))
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(min(n, rs),), fill_value=False)
    group.create_array("reason", shape=(n,), dtype=str, chunks=(min(n, rs),))
    group.create_array(
        "shard_done", shape=(layout.num_shards,), dtype="bool", chunks=(1,), fill_value=False
    )
    if layout.semantic_pass:
        group.create_array(
            "semantic_done", shape=(layout.num_shards,), dtype="bool", chunks=(1,), fill_value=False
        )
    for name, shape in (("texture", layout.texture_shape), ("semantic", layout.semantic_shape)):
        full = (n, NUM_FLIPS, *shape)
        group.create_array(name, shape=full, dtype="float16", chunks=(min(n, rc), *full[1:]), **raw)
    if layout.dino_shape is not None:
        full = (n, NUM_FLIPS, *layout.dino_shape)
        group.create_array(
            "dino",
            shape=full,
            dtype="float16",
            shards=(min(n, rc), *full[1:]),
            chunks=(1, 1, *layout.dino_shape),
            **raw,
        )


def create_cache(
    path: str | os.PathLike[str],
    *,
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    rows_per_shard: int,
    texture_shape: Sequence[int],
    semantic_shape: Sequence[int],
    store_dino: bool = False,
    dino_shape: Sequence[int] = DEFAULT_DINO_SHAPE,
    rows_per_chunk: int = 64,
    attrs: Mapping[str, Any] | None = None,
    semantic_pass: bool = False,
) -> LatentCache:
    """Create an empty cache for ``len(paths)`` rows, or re-open an identical one to resume.

    Call it from one process (the job driver) before the workers start. ``paths`` and ``labels``
    are the fixed file index (e.g. from :func:`sfd.data.images.discover`); ``attrs`` are the
    caller's identity attributes (encoders and checkpoint hashes, image size, class names, ...).
    If ``path`` already holds a cache with the same layout, index and attributes it is returned
    as is (its finished shards are kept); any difference raises :class:`CacheMismatchError`
    naming the differing keys. ``semantic_pass=True`` makes a cache whose semantic latents are
    written later by :meth:`LatentCache.write_semantic` (it needs ``store_dino``: the pass
    encodes the stored DINO features). The cache is built in a temporary sibling directory and renamed
    into place, so a killed creation never leaves a half-made cache behind.
    """
    path = Path(path)
    labels_np = np.asarray(labels, dtype=np.int64)
    if len(labels_np) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(labels_np)} labels")
    rows_per_chunk = min(rows_per_chunk, rows_per_shard)
    if semantic_pass and not store_dino:
        raise ValueError("semantic_pass=True needs store_dino=True: the later pass encodes the stored DINO features")
    layout = CacheLayout(
        num_rows=len(paths),
        rows_per_shard=rows_per_shard,
        rows_per_chunk=rows_per_chunk,
        texture_shape=tuple(int(s) for s in texture_shape),  # type: ignore[arg-type]
        semantic_shape=tuple(int(s) for s in semantic_shape),  # type: ignore[arg-type]
        dino_shape=tuple(int(s) for s in dino_shape) if store_dino else None,  # type: ignore[arg-type]
        index_sha256=index_hash(paths, labels_np),
        semantic_pass=bool(semantic_pass),
    )
    user_attrs = _jsonable(dict(attrs or {}))
    reserved = {LAYOUT_KEY, INFO_KEY} & set(user_attrs)
    if reserved:
        raise ValueError(f"attribute names {sorted(reserved)} are reserved by the cache format")
    identity = {LAYOUT_KEY: layout.to_attrs(), **user_attrs}

    if path.exists():
        return _reopen_identical(path, identity)

    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w-")
        _create_layout_arrays(group, layout)
        group["paths"][:] = np.asarray(list(paths), dtype=object)
        group["labels"][:] = labels_np.astype(np.int32)
        info = {
            "user": _safe_user(),
            "host": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "zarr": zarr.__version__,
        }
        group.attrs.update({**identity, INFO_KEY: info})
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():  # another driver won the race: use (and check) its cache
                return _reopen_identical(path, identity)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return LatentCache.open(path, mode="r+")


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def _reopen_identical(path: Path, identity: Mapping[str, Any]) -> LatentCache:
    cache = LatentCache.open(path, mode="r+")
    have = cache.identity_attrs()
    # Compare both ways, so an attribute present only on disk is a mismatch too.
    diffs = attr_diffs(have, identity)
    diffs.update({k: (v, _MISSING) for k, v in have.items() if k not in identity})
    if diffs:
        raise CacheMismatchError(path, diffs)
    return cache


class LatentCache:
    """An opened latent cache. Writers call :meth:`write_shard`; readers use ``sfd.data.reader``."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        all_attrs = dict(group.attrs)
        if LAYOUT_KEY not in all_attrs:
            raise CacheError(f"{path} is a zarr group but not an SFD latent cache (no '{LAYOUT_KEY}')")
        self.layout = CacheLayout.from_attrs(all_attrs[LAYOUT_KEY])
        if self.layout.format_version != FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format version {self.layout.format_version}; "
                f"this code reads version {FORMAT_VERSION}"
            )
        self.attrs: dict[str, Any] = {k: v for k, v in all_attrs.items() if k not in (LAYOUT_KEY, INFO_KEY)}
        self.created_by: dict[str, Any] = dict(all_attrs.get(INFO_KEY, {}))

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> LatentCache:
        """Open an existing cache; ``mode='r+'`` for writers."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise CacheError(f"no latent cache at {path} (missing zarr.json)")
        return cls(path, zarr.open_group(path, mode=mode))

    # ---- description -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def has_dino(self) -> bool:
        return self.layout.dino_shape is not None

    def identity_attrs(self) -> dict[str, Any]:
        """Everything that defines the cache's content (layout + caller attributes)."""
        return {LAYOUT_KEY: self.layout.to_attrs(), **self.attrs}

    def check_compatible(self, expected_attrs: Mapping[str, Any]) -> None:
        """Raise :class:`CacheMismatchError` if any of ``expected_attrs`` differs from the cache's.

        Only the given keys are compared, so a trainer can pin what matters to it (encoder
        hashes, image size, latent shapes, ...). Layout fields may be given by their own names
        (``texture_shape``, ``semantic_shape``, ``dino_shape``, ...).
        """
        have = {**self.layout.to_attrs(), **self.attrs}
        diffs = attr_diffs(have, expected_attrs)
        if diffs:
            raise CacheMismatchError(self.path, diffs)

    def paths(self) -> list[str]:
        return [str(p) for p in self.group["paths"][:]]

    def labels(self) -> np.ndarray:
        return np.asarray(self.group["labels"][:], dtype=np.int64)

    def valid(self) -> np.ndarray:
        """[N] bool; rows of unfinished shards read as False."""
        return np.asarray(self.group["valid"][:], dtype=bool)

    def shard_done(self) -> np.ndarray:
        return np.asarray(self.group["shard_done"][:], dtype=bool)

    def pending_shards(self) -> list[int]:
        """Shards not yet encoded (``shard_done`` False)."""
        return [int(s) for s in np.flatnonzero(~self.shard_done())]

    def semantic_done(self) -> np.ndarray:
        """[num_shards] bool: semantic latents present (always True without a semantic pass)."""
        if not self.layout.semantic_pass:
            return self.shard_done()
        return np.asarray(self.group["semantic_done"][:], dtype=bool)

    def pending_semantic_shards(self) -> list[int]:
        """Encoded shards still waiting for :meth:`write_semantic` (empty without a semantic pass)."""
        if not self.layout.semantic_pass:
            return []
        return [int(s) for s in np.flatnonzero(~self.semantic_done())]

    def is_encoded(self) -> bool:
        """Every shard went through the encode job (``write_shard``)."""
        return bool(self.shard_done().all())

    def is_complete(self) -> bool:
        """Encoded and, for a ``semantic_pass`` cache, every semantic latent written."""
        return self.is_encoded() and bool(self.semantic_done().all())

    def semantic_source(self) -> dict[str, Any]:
        """What :meth:`set_semantic_source` recorded (the SemVAE of the semantic pass), or {}."""
        if not self.layout.semantic_pass:
            return {}
        return dict(self.group["semantic_done"].attrs)

    def set_semantic_source(self, info: Mapping[str, Any]) -> None:
        """Record which SemVAE the semantic pass uses (kept beside its flags, not in the identity
        attributes, because the SemVAE is trained after the cache is created)."""
        if not self.layout.semantic_pass:
            raise CacheError(f"cache {self.path} has no semantic pass")
        arr = self.group["semantic_done"]
        for k in list(arr.attrs):
            del arr.attrs[k]
        arr.attrs.update(_jsonable(dict(info)))

    def invalid_report(self) -> list[dict[str, Any]]:
        """One entry ``{row, path, label, reason}`` per invalid row of the finished shards."""
        done_rows = np.repeat(self.shard_done(), self.layout.rows_per_shard)[: self.num_rows]
        bad = np.flatnonzero(done_rows & ~self.valid())
        if len(bad) == 0:
            return []
        # Whole-array reads: one zarr call per array instead of one per row.
        paths, labels, reasons = self.group["paths"][:], self.labels(), self.group["reason"][:]
        return [
            {"row": int(r), "path": str(paths[r]), "label": int(labels[r]), "reason": str(reasons[r])}
            for r in bad
        ]

    # ---- writing -------------------------------------------------------------------------------

    def write_shard(
        self,
        shard_id: int,
        texture: Any,
        semantic: Any | None,
        dino: Any | None = None,
        valid: Sequence[bool] | np.ndarray | None = None,
        reasons: Sequence[str | None] | None = None,
    ) -> None:
        """Write the rows of one work shard, then mark it done (the flag is written last).

        ``texture`` ``[n, 2, Ct, h, w]``, ``semantic`` ``[n, 2, Cs, h, w]`` and ``dino``
        ``[n, 2, 256, 768]`` (required iff the cache stores REPA targets) are numpy arrays or
        tensors of any float dtype, flip index 0 = plain image, 1 = flipped. ``valid[i]`` False
        marks a row whose image could not be decoded; ``reasons[i]`` says why. Invalid rows are
        stored as zeros whatever the input holds, and rows whose values are not finite after the
        float16 cast (encoder blow-up or fp16 overflow) are marked invalid with that reason.
        Re-writing a shard (after a kill, or by a retried worker) is allowed and, for the same
        inputs, byte-identical; the encoder must seed its posterior noise per row for that.
        In a ``semantic_pass`` cache ``semantic`` may be None (zeros are written) and a rewrite
        also clears the shard's ``semantic_done`` flag: its semantic latents must be redone.
        """
        start, stop = self.layout.shard_rows(shard_id)
        n = stop - start
        valid_np = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).copy()
        reasons_list = [""] * n if reasons is None else ["" if r is None else str(r) for r in reasons]
        if valid_np.shape != (n,) or len(reasons_list) != n:
            raise CacheError(f"shard {shard_id} has {n} rows; got valid {valid_np.shape}, {len(reasons_list)} reasons")

        if semantic is None:
            if not self.layout.semantic_pass:
                raise CacheError(f"cache {self.path} has no semantic pass: write_shard needs semantic")
            semantic = np.zeros((n, NUM_FLIPS, *self.layout.semantic_shape), dtype=np.float16)

        parts: dict[str, np.ndarray] = {}
        specs = [("texture", texture, self.layout.texture_shape), ("semantic", semantic, self.layout.semantic_shape)]
        if self.has_dino:
            if dino is None:
                raise CacheError(f"cache {self.path} stores DINO targets: write_shard needs dino")
            specs.append(("dino", dino, self.layout.dino_shape))
        elif dino is not None:
            raise CacheError(f"cache {self.path} was created without DINO targets (store_dino=False)")
        for name, value, shape in specs:
            arr = _to_numpy(value)
            expected = (n, NUM_FLIPS, *shape)  # type: ignore[misc]
            if arr.shape != expected:
                raise CacheError(f"shard {shard_id}: {name} has shape {arr.shape}, expected {expected}")
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected just below
                arr16 = arr.astype(np.float16)
            finite = np.isfinite(arr16.reshape(n, -1)).all(axis=1)
            for i in np.flatnonzero(valid_np & ~finite):
                valid_np[i] = False
                reasons_list[i] = f"non-finite {name} values (encoder output or fp16 overflow)"
            parts[name] = arr16

        for i in np.flatnonzero(~valid_np):
            reasons_list[i] = reasons_list[i] or "invalid (no reason given)"
        for i in np.flatnonzero(valid_np):
            reasons_list[i] = ""
        for arr16 in parts.values():
            arr16[~valid_np] = 0  # same bytes whatever garbage an invalid row carried

        done = self.group["shard_done"]
        if done[shard_id]:
            done[shard_id] = False  # a kill during the rewrite must not leave a "done" shard
        if self.layout.semantic_pass and self.group["semantic_done"][shard_id]:
            self.group["semantic_done"][shard_id] = False  # derived from the old features
        for name, arr16 in parts.items():
            self.group[name][start:stop] = arr16
        self.group["valid"][start:stop] = valid_np
        self.group["reason"][start:stop] = np.asarray(reasons_list, dtype=object)
        done[shard_id] = True

    def write_semantic(self, shard_id: int, semantic: Any) -> None:
        """Write the semantic latents ``[n, 2, Cs, h, w]`` of one encoded shard, flag last.

        For ``semantic_pass`` caches only, after :meth:`write_shard` finished the shard. Invalid
        rows stay zeros; valid rows whose values are not finite in float16 become invalid, with
        the reason recorded (the same rule as :meth:`write_shard`). Re-running is byte-identical
        for the same inputs.
        """
        if not self.layout.semantic_pass:
            raise CacheError(f"cache {self.path} was created without semantic_pass: semantic latents come from write_shard")
        if not self.group["shard_done"][shard_id]:
            raise CacheError(f"shard {shard_id} of {self.path} is not encoded yet; write_shard comes first")
        start, stop = self.layout.shard_rows(shard_id)
        n = stop - start
        arr = _to_numpy(semantic)
        expected = (n, NUM_FLIPS, *self.layout.semantic_shape)
        if arr.shape != expected:
            raise CacheError(f"shard {shard_id}: semantic has shape {arr.shape}, expected {expected}")
        with np.errstate(over="ignore", invalid="ignore"):
            arr16 = arr.astype(np.float16)
        valid_np = np.asarray(self.group["valid"][start:stop], dtype=bool)
        finite = np.isfinite(arr16.reshape(n, -1)).all(axis=1)
        newly_bad = valid_np & ~finite
        arr16[~valid_np | newly_bad] = 0

        flags = self.group["semantic_done"]
        if flags[shard_id]:
            flags[shard_id] = False
        if newly_bad.any():
            reasons = np.asarray(self.group["reason"][start:stop], dtype=object)
            reasons[newly_bad] = "non-finite semantic values (SemVAE output or fp16 overflow)"
            self.group["valid"][start:stop] = valid_np & ~newly_bad
            self.group["reason"][start:stop] = reasons
        self.group["semantic"][start:stop] = arr16
        flags[shard_id] = True

    # ---- statistics ------------------------------------------------------------------------------

    def compute_stats(self, seed: int = 0, num_samples: int = 10_000) -> dict[str, np.ndarray]:
        """Per-channel mean and unbiased std of each part, stored in the cache (method.md §2.4).

        As the authors: ``num_samples`` rows drawn without replacement (here from a fixed
        ``seed``, and among valid rows only), the non-flipped copy only, statistics over the N, H
        and W axes, std with Bessel's correction. Accumulated in float64.
        """
        if not self.is_complete():
            raise CacheError(
                f"cache {self.path} is incomplete ({len(self.pending_shards())} shards to encode, "
                f"{len(self.pending_semantic_shards())} waiting for semantic latents)"
            )
        valid_rows = np.flatnonzero(self.valid())
        if len(valid_rows) < 2:
            raise CacheError(f"cache {self.path} has {len(valid_rows)} valid rows; stats need at least 2")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(valid_rows, size=min(num_samples, len(valid_rows)), replace=False))
        stats: dict[str, np.ndarray] = {}
        for name in ("texture", "semantic"):
            x = self._read_rows_plain(name, rows).astype(np.float64)  # [n, C, h, w]
            stats[f"{name}_mean"] = x.mean(axis=(0, 2, 3)).astype(np.float32)
            stats[f"{name}_std"] = x.std(axis=(0, 2, 3), ddof=1).astype(np.float32)
        info = {"seed": int(seed), "num_samples": int(len(rows)), "flip": 0, "ddof": 1}
        for key, value in stats.items():
            arr = self.group.create_array(key, shape=value.shape, dtype="float32", chunks=value.shape, overwrite=True)
            arr[:] = value
            arr.attrs.update(info)
        return stats

    def stats(self) -> dict[str, np.ndarray]:
        """The stored statistics; :class:`CacheError` if :meth:`compute_stats` has not run."""
        keys = ("texture_mean", "texture_std", "semantic_mean", "semantic_std")
        missing = [k for k in keys if k not in self.group]
        if missing:
            raise CacheError(f"cache {self.path} has no statistics ({missing}); run compute_stats first")
        return {k: np.asarray(self.group[k][:], dtype=np.float32) for k in keys}

    def _read_rows_plain(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Non-flipped copies of sorted ``rows``, reading each touched chunk once."""
        arr = self.group[name]
        out = np.empty((len(rows), *arr.shape[2:]), dtype=np.float16)
        chunk_of = rows // self.layout.rows_per_chunk
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for sel in np.split(np.arange(len(rows)), bounds):
            c0, c1 = self.layout.chunk_rows(int(chunk_of[sel[0]]))
            block = arr[c0:c1, 0]
            out[sel] = block[rows[sel] - c0]
        return out
