"""The Zarr v3 latent cache: one directory holding every encoded image of a dataset (docs/conventions.md: The latent cache).

Long on purpose (~850 lines): the layout, the writers, the completion records and the integrity
checks (checksums, file records, repair) of one on-disk format belong together; split, each half
would have to know the other's file layout.

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
``shard_files``    [num_shards]                string   1: the shard's completion record (below)
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

Latents are stored raw (the posterior samples, docs/method.md §2.1, §3.4) in float16 — zarr 3 has no
bfloat16 — and normalised at load time from the per-channel statistics stored here (docs/method.md
§2.4), so changing the normalisation never forces a re-encode.

Semantic latents can come later: a cache created with ``semantic_pass=True`` is encoded without
a Semantic VAE (``semantic`` holds zeros and ``dino`` must be stored), the SemVAE is then trained
on the cached DINO features, and :meth:`LatentCache.write_semantic` fills ``semantic`` shard by
shard, setting its own ``semantic_done[shard]`` flag last (the same one-writer-per-shard rule).
Such a cache counts as complete only when both flags are set for every shard.

Integrity (format version 2): every chunk file of every array (and every inner chunk and the
index of a ``dino`` zarr shard) ends with a CRC32C checksum (zarr v3's ``crc32c`` codec), so a
truncated or bit-flipped file fails to decode instead of being read as other numbers. zarr reads
a *missing* chunk file as the fill value, silently, so the cache also says which files must
exist: before setting ``shard_done[s]`` a writer stores in ``shard_files[s]`` a JSON record
``{file: size}`` of every chunk file the shard wrote (texture, semantic, dino, valid, reason);
the creator records the files of ``paths`` and ``labels`` in the group attributes (key
``sfd_integrity``). :meth:`LatentCache.find_damage` checks them (``deep=False``: every file
exists with its recorded size, a few stat calls per shard; ``deep=True``: every file also decodes,
i.e. reads the whole cache), and :meth:`LatentCache.mark_for_redo` clears the flags of the damaged
shards so the encode job re-encodes exactly those (byte-identical, as above).

Group attributes hold the layout (key ``sfd_latent_cache``: format version, shapes, shard sizes,
a hash of the file index) next to the caller's attributes (encoder names and checkpoint hashes,
image size, class names, ...); ``created_by`` is informational and never compared.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from sfd.checkpoint import same_weights

# An array's runtime config is not stored with it: a re-opened array would skip writing chunks
# equal to the fill value, so that a missing file could mean "all fill" as well as "lost". This
# process-wide setting keeps every chunk a real file (the cache's rule: missing = damaged).
zarr.config.set({"array.write_empty_chunks": True})

# 2: every chunk carries a CRC32C checksum and every finished shard a record of its files. A
# version-1 cache has neither; it cannot be upgraded in place (the checksums change the bytes).
FORMAT_VERSION = 2
LAYOUT_KEY = "sfd_latent_cache"
INFO_KEY = "created_by"  # never compared: who/when/where created the cache
INTEGRITY_KEY = "sfd_integrity"  # never compared: the creator's file record (paths, labels)
RESERVED_KEYS = (LAYOUT_KEY, INFO_KEY, INTEGRITY_KEY)
STATS_KEYS = ("texture_mean", "texture_std", "semantic_mean", "semantic_std")
SHARD_ARRAYS = ("texture", "semantic", "dino", "valid", "reason")  # what write_shard writes
FIX_HINT = (
    "re-run the same encode command: it checks every shard's files first and re-encodes exactly the "
    "damaged ones (add --verify to also decode every file); `just verify-cache CACHE` lists the damage"
)
# Model fields fixed by the data, not by the architecture: a trainer takes them from the cache.
DATA_SHAPED = ("in_channels", "semantic_chans", "input_size", "num_classes", "repa_target_dim")
NUM_FLIPS = 2  # index 0 = plain image, 1 = horizontally flipped (docs/method.md §2.5)
DEFAULT_DINO_SHAPE = (256, 768)  # DINOv2-B/14 patch tokens of a 224² input (docs/method.md §11)


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


def _is_weights_record(v: Any) -> bool:
    return isinstance(v, dict) and v.get("kind") == "weights"


def _same(have: Any, want: Any) -> bool:
    # An encoder loaded from a file is the same encoder when its weights are (the record's file
    # name, path and file hash aside): sfd.checkpoint.same_weights, which also accepts the older
    # records holding only a file hash.
    if _is_weights_record(have) and _is_weights_record(want):
        return same_weights(have, want)
    return have == want


def attr_diffs(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys of ``want`` whose value differs in ``have`` (missing keys included)."""
    have, want = _jsonable(dict(have)), _jsonable(dict(want))
    return {k: (have.get(k, _MISSING), v) for k, v in want.items() if not _same(have.get(k, _MISSING), v)}


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
    # The only "compressor" is the CRC32C checksum appended to every chunk (4 bytes).
    # write_empty_chunks everywhere: a chunk equal to the fill value (all-False ``valid``, all-''
    # ``reason``, zeros of invalid rows) is a real file too, so "missing" always means damage.
    crc = dict(compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
    raw = dict(fill_value=0, **crc)
    group.create_array("labels", shape=(n,), dtype="int32", chunks=(min(n, rs),), fill_value=-1, **crc)
    group.create_array("paths", shape=(n,), dtype=str, chunks=(min(n, 1 << 16),), **crc)
    group.create_array("valid", shape=(n,), dtype="bool", chunks=(min(n, rs),), fill_value=False, **crc)
    group.create_array("reason", shape=(n,), dtype=str, chunks=(min(n, rs),), **crc)
    ns = layout.num_shards
    group.create_array("shard_done", shape=(ns,), dtype="bool", chunks=(1,), fill_value=False, **crc)
    group.create_array("shard_files", shape=(ns,), dtype=str, chunks=(1,), **crc)
    if layout.semantic_pass:
        group.create_array("semantic_done", shape=(ns,), dtype="bool", chunks=(1,), fill_value=False, **crc)
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
    reserved = set(RESERVED_KEYS) & set(user_attrs)
    if reserved:
        raise ValueError(f"attribute names {sorted(reserved)} are reserved by the cache format")
    identity = {LAYOUT_KEY: layout.to_attrs(), **user_attrs}

    if path.exists():
        return _reopen_identical(path, identity, list(paths), labels_np)

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
        LatentCache(tmp, group)._record_index()
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():  # another driver won the race: use (and check) its cache
                return _reopen_identical(path, identity, list(paths), labels_np)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return LatentCache.open(path, mode="r+")


def _why(e: BaseException) -> str:
    msg = str(e).split("\n")[0]
    return f"{type(e).__name__}: {msg[:200]}"


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def _reopen_identical(
    path: Path, identity: Mapping[str, Any], paths: list[str], labels: np.ndarray
) -> LatentCache:
    cache = LatentCache.open(path, mode="r+")
    have = cache.identity_attrs()
    # Compare both ways, so an attribute present only on disk is a mismatch too.
    diffs = attr_diffs(have, identity)
    diffs.update({k: (v, _MISSING) for k, v in have.items() if k not in identity})
    if diffs:
        raise CacheMismatchError(path, diffs)
    # The index is known here (its hash matched): rewrite it if its files were damaged.
    if cache.index_damage(deep=True):
        cache.group["paths"][:] = np.asarray(paths, dtype=object)
        cache.group["labels"][:] = labels.astype(np.int32)
        cache._record_index()
    return cache


class LatentCache:
    """An opened latent cache. Writers call :meth:`write_shard`; readers use ``sfd.data.reader``."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        all_attrs = dict(group.attrs)
        if LAYOUT_KEY not in all_attrs:
            raise CacheError(f"{path} is a zarr group but not an SFD latent cache (no '{LAYOUT_KEY}')")
        version = int(all_attrs[LAYOUT_KEY].get("format_version", 0))
        if version != FORMAT_VERSION:
            why = " (no per-chunk checksums, no file records)" if version < FORMAT_VERSION else ""
            raise CacheError(
                f"{path} has cache format version {version}{why}; this code reads version {FORMAT_VERSION}. "
                f"Re-encode it: move it aside (or pass another --out) and run the same encode command"
                + (" with the code that wrote it, or upgrade this code" if version > FORMAT_VERSION else "")
            )
        self.layout = CacheLayout.from_attrs(all_attrs[LAYOUT_KEY])
        self.attrs: dict[str, Any] = {k: v for k, v in all_attrs.items() if k not in RESERVED_KEYS}
        self.created_by: dict[str, Any] = dict(all_attrs.get(INFO_KEY, {}))

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> LatentCache:
        """Open an existing cache; ``mode='r+'`` for writers."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise CacheError(f"no latent cache at {path} (missing zarr.json)")
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as e:  # noqa: BLE001 - unreadable metadata: say which cache and why
            raise CacheError(f"cannot open the latent cache at {path}: {type(e).__name__}: {e}") from e
        return cls(path, group)

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
        return [str(p) for p in self._read_all("paths")]

    def labels(self) -> np.ndarray:
        return np.asarray(self._read_all("labels"), dtype=np.int64)

    def valid(self) -> np.ndarray:
        """[N] bool; rows of unfinished shards read as False."""
        return np.asarray(self._read_all("valid"), dtype=bool)

    def _flags(self, name: str) -> np.ndarray:
        """A flag array; a damaged flag reads as False (its shard is then simply redone)."""
        arr = self.group[name]
        try:
            return np.asarray(arr[:], dtype=bool)
        except Exception:  # noqa: BLE001 - one bad flag file: read the others one by one
            out = np.zeros(arr.shape, dtype=bool)
            for i in range(arr.shape[0]):
                with contextlib.suppress(Exception):
                    out[i] = bool(arr[i])
            return out

    def _read_all(self, name: str) -> np.ndarray:
        if name in SHARD_ARRAYS:  # files of unfinished shards may not exist yet: fill values
            done = self.shard_done()
            for s in np.flatnonzero(done):
                for f in self.files_of_rows(name, *self.layout.shard_rows(int(s))):
                    if not f.is_file():
                        raise CacheError(
                            f"cache {self.path}: array '{name}' chunk file {f} is missing. Fix: {FIX_HINT}"
                        )
            rows = (0, 0)  # existence checked above
        else:
            rows = (0, self.num_rows)
        return self.checked_read(name, slice(None), rows)

    def shard_done(self) -> np.ndarray:
        return self._flags("shard_done")

    def pending_shards(self) -> list[int]:
        """Shards not yet encoded (``shard_done`` False)."""
        return [int(s) for s in np.flatnonzero(~self.shard_done())]

    def semantic_done(self) -> np.ndarray:
        """[num_shards] bool: semantic latents present (always True without a semantic pass)."""
        if not self.layout.semantic_pass:
            return self.shard_done()
        return self._flags("semantic_done")

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
        paths, labels, reasons = self._read_all("paths"), self.labels(), self._read_all("reason")
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
        self._record_shard(shard_id)  # which files must exist, before the flag
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
        self._record_shard(shard_id)
        flags[shard_id] = True

    # ---- statistics ------------------------------------------------------------------------------

    def compute_stats(self, seed: int = 0, num_samples: int = 10_000) -> dict[str, np.ndarray]:
        """Per-channel mean and unbiased std of each part, stored in the cache (docs/method.md §2.4).

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
            arr = self.group.create_array(
                key, shape=value.shape, dtype="float32", chunks=value.shape, overwrite=True,
                compressors=[Crc32cCodec()], config={"write_empty_chunks": True},
            )
            arr[:] = value
            arr.attrs.update(info)
        self.stats()  # what a reader will check: files present, finite, std > 0
        return stats

    def stats(self) -> dict[str, np.ndarray]:
        """The stored statistics, checked: every file present and decodable, every value finite,
        every std > 0 (a zero std would make every normalised batch non-finite).

        :class:`CacheError` if :meth:`compute_stats` has not run or the statistics are damaged.
        """
        missing = [k for k in STATS_KEYS if k not in self.group]
        if missing:
            raise CacheError(
                f"cache {self.path} has no statistics ({', '.join(missing)}); run the encode command's "
                "stats stage (the same encode command computes them)"
            )
        problems = self.stats_damage()
        if problems:
            raise CacheError(
                f"the statistics of cache {self.path} are damaged: {'; '.join(problems)}. Fix: re-run the "
                "same encode command (its stats stage recomputes them, same values)"
            )
        return {k: np.asarray(self.group[k][:], dtype=np.float32) for k in STATS_KEYS}

    def stats_damage(self) -> list[str]:
        """Problems of the stored statistics (empty when absent: that is "not computed yet")."""
        out: list[str] = []
        for k in STATS_KEYS:
            if k not in self.group:
                continue
            arr = self.group[k]
            f = self.path / k / arr.metadata.encode_chunk_key((0,))
            if not f.is_file():
                out.append(f"{k}: chunk file {f} is missing")
                continue
            try:
                v = np.asarray(arr[:], dtype=np.float64)
            except Exception as e:  # noqa: BLE001 - checksum mismatch, truncated file, ...
                out.append(f"{k}: chunk file {f} does not decode ({_why(e)})")
                continue
            if not np.isfinite(v).all():
                out.append(f"{k}: non-finite values in {f}")
            elif k.endswith("_std") and not (v > 0).all():
                out.append(f"{k}: std <= 0 for channels {np.flatnonzero(~(v > 0)).tolist()[:8]} ({f})")
        return out

    def drop_stats(self) -> None:
        """Delete the statistics (the encode job's stats stage then recomputes them)."""
        for k in STATS_KEYS:
            if k in self.group:
                del self.group[k]

    # ---- the model this cache trains ------------------------------------------------------------

    def data_shaped_fields(self, use_semantic: bool = True) -> dict[str, int]:
        """The model fields the data fixes (:data:`DATA_SHAPED`), as this cache has them: latent
        channels (texture only when ``use_semantic`` is False) and size, classes, REPA width."""
        (ct, h, _), (cs, _, _) = self.layout.texture_shape, self.layout.semantic_shape
        want: dict[str, int] = {"in_channels": ct + cs if use_semantic else ct, "input_size": h}
        if use_semantic:
            want["semantic_chans"] = cs
        if "class_names" in self.attrs:
            want["num_classes"] = len(self.attrs["class_names"])
        elif "num_classes" in self.attrs:
            want["num_classes"] = int(self.attrs["num_classes"])
        if self.has_dino:
            want["repa_target_dim"] = int(self.layout.dino_shape[1])
        return want

    def fit_model(self, model: Any, use_semantic: bool = True, given: Sequence[str] = ()) -> tuple[Any, list[str]]:
        """``model`` (a ModelConfig) with its data-shaped fields taken from this cache, except
        those set explicitly (``given``, e.g. ``model.num_classes``), and a note per change. The
        architecture (depth, width, patch size) is untouched: one preset trains on any cache."""
        want = self.data_shaped_fields(use_semantic)
        changes = {k: v for k, v in want.items() if f"model.{k}" not in given and getattr(model, k) != v}
        notes = [f"model.{k}: {getattr(model, k)} -> {v} (from the cache)" for k, v in changes.items()]
        return (replace(model, **changes) if changes else model), notes

    def model_problems(self, model: Any, use_semantic: bool = True, stored_targets: bool = False) -> list[str]:
        """Every way ``model`` (a ModelConfig) does not fit this cache's latents, classes and
        (``stored_targets``: the model reads the stored DINO tokens as REPA targets) targets."""
        m = model
        (ct, h, w), (cs, hs, ws) = self.layout.texture_shape, self.layout.semantic_shape
        problems = []
        if not use_semantic:
            # The texture channels come first in every cache row; the semantic ones are left unread.
            if ct != m.in_channels:
                problems.append(f"use_semantic=false: cache latents have {ct} texture channels, model.in_channels={m.in_channels}")
        elif ct + cs != m.in_channels:
            problems.append(f"cache latents have {ct} texture + {cs} semantic = {ct + cs} channels, model.in_channels={m.in_channels}")
        if use_semantic and cs != m.semantic_chans:
            problems.append(f"cache has {cs} semantic channels, model.semantic_chans={m.semantic_chans}")
        if (h, w) != (hs, ws) or (h, w) != (m.input_size, m.input_size):
            problems.append(f"cache latents are {h}x{w} (texture) / {hs}x{ws} (semantic), model.input_size={m.input_size}")
        labels, valid = self.labels(), self.valid()
        top = int(labels[valid].max()) if valid.any() else -1
        if top >= m.num_classes:
            problems.append(f"cache labels reach {top}, but model.num_classes={m.num_classes}")
        for key in ("class_names", "num_classes"):
            if key in self.attrs:
                n = len(self.attrs[key]) if key == "class_names" else int(self.attrs[key])
                if n != m.num_classes:
                    problems.append(f"cache has {n} classes ({key}), model.num_classes={m.num_classes}")
        tokens = (m.input_size // m.patch_size) ** 2
        if stored_targets and self.has_dino and tuple(self.layout.dino_shape) != (tokens, m.repa_target_dim):
            problems.append(
                f"cache REPA targets are {tuple(self.layout.dino_shape)} (tokens, dim), the model needs "
                f"({tokens}, {m.repa_target_dim}) (tokens = (input_size/patch_size)², model.repa_target_dim)"
            )
        return problems

    def checkpoint_stats(self) -> dict[str, Any]:
        """What a sampler needs from this cache, stored with every checkpoint (``latent_stats``)."""
        from sfd.checkpoint import latent_stats_metadata

        encoder = self.attrs.get("texture_encoder")
        return latent_stats_metadata(
            self.stats(), source=f"cache {self.layout.index_sha256[:16]}",
            texture_encoder=encoder if isinstance(encoder, dict) else None,
        )

    # ---- integrity -------------------------------------------------------------------------------

    def _unit_rows(self, name: str) -> int:
        """Rows per storage file of array ``name`` (the zarr shard for ``dino``, else the chunk)."""
        arr = self.group[name]
        shards = getattr(arr, "shards", None)
        return int((shards or arr.chunks)[0])

    def chunk_file(self, name: str, row: int) -> Path:
        """The file holding row ``row`` of array ``name``."""
        arr = self.group[name]
        coords = (row // self._unit_rows(name),) + (0,) * (arr.ndim - 1)
        return self.path / name / arr.metadata.encode_chunk_key(coords)

    def files_of_rows(self, name: str, start: int, stop: int) -> list[Path]:
        per = self._unit_rows(name)
        return [self.chunk_file(name, r) for r in range(start - start % per, stop, per)]

    def _files_record(self, names: Sequence[str], start: int, stop: int) -> dict[str, int]:
        rec = {}
        for name in names:
            if name in self.group:
                for f in self.files_of_rows(name, start, stop):
                    rec[f.relative_to(self.path).as_posix()] = f.stat().st_size
        return rec

    def _record_shard(self, shard_id: int) -> None:
        start, stop = self.layout.shard_rows(shard_id)
        record = self._files_record(SHARD_ARRAYS, start, stop)
        self.group["shard_files"][shard_id] = json.dumps(record, sort_keys=True)

    def _record_index(self) -> None:
        record = self._files_record(("paths", "labels"), 0, self.num_rows)
        self.group.attrs[INTEGRITY_KEY] = {"checksum": "crc32c", "index_files": record}

    def _check_files(self, record: Mapping[str, int]) -> list[str]:
        out = []
        for rel, size in record.items():
            f = self.path / rel
            try:
                have = f.stat().st_size
            except FileNotFoundError:
                out.append(f"chunk file {f} is missing")
                continue
            if have != size:
                out.append(f"chunk file {f} has {have} bytes, the shard's record says {size}")
        return out

    def _decode_check(self, names: Sequence[str], start: int, stop: int) -> list[str]:
        out = []
        for name in names:
            if name not in self.group:
                continue
            arr, per = self.group[name], self._unit_rows(name)
            for r0 in range(start, stop, per):
                try:
                    arr[r0 : min(r0 + per, stop)]
                except Exception as e:  # noqa: BLE001 - checksum mismatch, truncation, ...
                    out.append(f"chunk file {self.chunk_file(name, r0)} does not decode ({_why(e)})")
        return out

    def shard_damage(self, shard_id: int, deep: bool = False) -> list[str]:
        """Problems of one finished shard: record missing, a file missing or of the wrong size,
        and with ``deep`` a file that does not decode (checksum)."""
        try:
            text = str(self.group["shard_files"][shard_id])
            record = json.loads(text) if text else None
        except Exception as e:  # noqa: BLE001
            return [f"the file record of shard {shard_id} does not decode ({_why(e)})"]
        if not record:
            return [f"shard {shard_id} has no file record (shard_files/{shard_id} missing)"]
        out = self._check_files(record)
        if deep and not out:
            out = self._decode_check(SHARD_ARRAYS, *self.layout.shard_rows(shard_id))
        return out

    def index_damage(self, deep: bool = False) -> list[str]:
        """Problems of the file index (``paths``, ``labels``), written by the creator."""
        record = dict(self.group.attrs.get(INTEGRITY_KEY, {})).get("index_files")
        if not record:
            return ["the cache records no index files"]
        out = self._check_files(record)
        if deep and not out:
            out = self._decode_check(("paths", "labels"), 0, self.num_rows)
            if not out and index_hash(self.paths(), self.labels()) != self.layout.index_sha256:
                out.append("paths/labels do not match the index hash recorded at creation")
        return out

    def find_damage(self, deep: bool = False, progress: bool = False) -> dict[str, list[str]]:
        """Every problem of the cache, by part: ``"index"``, ``"stats"``, ``"shard <s>"``.

        Only finished shards are checked (unfinished ones are redone anyway). ``deep=False``
        checks that every recorded file exists with its recorded size (cheap: one stat per file);
        ``deep=True`` also decodes every file, verifying its checksums (reads the whole cache).
        """
        damage: dict[str, list[str]] = {}
        if problems := self.index_damage(deep):
            damage["index"] = problems
        if problems := self.stats_damage():
            damage["stats"] = problems
        done = np.flatnonzero(self.shard_done())
        it = done
        if progress:
            from tqdm import tqdm

            it = tqdm(done, desc="verify" + (" (decode)" if deep else ""), unit="shard")
        for s in it:
            if problems := self.shard_damage(int(s), deep):
                damage[f"shard {int(s)}"] = problems
        return damage

    def mark_for_redo(self, damage: Mapping[str, list[str]]) -> list[int]:
        """Clear the flags of the damaged shards (and drop damaged statistics) so the encode job
        redoes exactly those; returns the shard ids. Index damage is repaired by the encode job
        (:func:`create_cache` rewrites the index it knows)."""
        shards = sorted(int(k.split()[1]) for k in damage if k.startswith("shard "))
        for s in shards:
            self.group["shard_done"][s] = False
            if self.layout.semantic_pass:
                self.group["semantic_done"][s] = False
        if "stats" in damage:
            self.drop_stats()
        return shards

    def checked_read(self, name: str, sel: Any, rows: tuple[int, int]) -> np.ndarray:
        """``group[name][sel]`` where ``rows`` = (first, stop) are the rows read; a missing file
        or a read error raises :class:`CacheError` naming the array, the file and the fix."""
        arr = self.group[name]
        files = self.files_of_rows(name, *rows)
        for f in files:
            if not f.is_file():
                raise CacheError(f"cache {self.path}: array '{name}' chunk file {f} is missing. Fix: {FIX_HINT}")
        try:
            return np.asarray(arr[sel])
        except Exception as e:  # noqa: BLE001
            where = files[0] if len(files) == 1 else f"one of {files[0]} ... {files[-1]}"
            raise CacheError(
                f"cache {self.path}: array '{name}' chunk file {where} does not decode ({_why(e)}). Fix: {FIX_HINT}"
            ) from e

    def _read_rows_plain(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Non-flipped copies of sorted ``rows``, reading each touched chunk once."""
        out = np.empty((len(rows), *self.group[name].shape[2:]), dtype=np.float16)
        chunk_of = rows // self.layout.rows_per_chunk
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for sel in np.split(np.arange(len(rows)), bounds):
            c0, c1 = self.layout.chunk_rows(int(chunk_of[sel[0]]))
            block = self.checked_read(name, (slice(c0, c1), 0), (c0, c1))
            out[sel] = block[rows[sel] - c0]
        return out
