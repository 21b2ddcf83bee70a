"""Where the REPA targets of a training step come from: ``stored``, ``semvae`` or ``none``.

Each source is one :class:`RepaTargetSource` subclass registered in :data:`REPA_TARGET_SOURCES`
under its ``repa_targets`` name: what the reader must load, its checks against the cache, and the
per-run callable ``targets(batch)``. The trainer asks the class; a plugin (``SFD_PLUGINS``,
sfd/registry.py) adds a source with :func:`repa_target_source`.

REPA aligns a projection of an early DiT block with DINOv2 patch tokens (docs/method.md §4.6).
The authors store those tokens in the cache (docs/method.md §11: ~0.8 MB per image, >1 TB for
ImageNet-1k). This module offers the choice:

``stored``
    The cache's ``dino`` array (the authors' targets), read by the reader as float16 and cast to
    float32 on the device.
``semvae``
    Decoded, inside the training step, from the batch's own semantic latent by the Semantic VAE
    decoder (docs/method.md §3.2): un-normalise the semantic channels with the cache statistics
    (docs/method.md §2.4), read the ``[Cs, h, w]`` map as ``h·w`` tokens, decode — on the device,
    batched, without gradients, in bf16 autocast on CUDA. The cache then needs only the 49 KB per
    image of texture + semantic latents. The targets are the SemVAE's *reconstruction* of the
    DINO tokens from a posterior sample, not the tokens themselves: their fidelity is the SemVAE's
    (``bench/cache_reader.py`` measures the cosine similarity to stored targets).
``none``
    No targets: REPA is off whatever ``repa_weight`` says.

The decoder travels with the cache: ``<cache>/semvae_decoder.safetensors`` holds the decoder
half of the SemVAE whose samples fill the cache, with the SemVAE config and the identity of that
SemVAE (as the cache records it) in its metadata; :func:`load_semvae_decoder` refuses a file
that names another SemVAE. The encode job writes it (``pipeline/encode.py``); for an older cache,
``python -m sfd.repa_targets CACHE SEMVAE_WEIGHTS`` attaches it. A cache encoded with a random-init
test SemVAE needs no file: its decoder is rebuilt from the recorded seed.

The whole SemVAE travels too (``<cache>/semvae.safetensors``, :func:`write_cache_semvae`): the
encode job redoes damaged shards' semantic latents with it, so a cache copied alone repairs itself
(docs/reliability.md). SemVAEs are compared by their weights' identity
(``sfd.checkpoint.same_weights``), not their files' hashes.
"""

from __future__ import annotations

import argparse
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sfd import runtime
from sfd.checkpoint import (
    WeightsError,
    file_sha256,
    load_state_dict_strict,
    load_tensors,
    read_safetensors_metadata,
    same_weights,
    save_safetensors,
    weights_identity,
)
from sfd.config import SemVAEConfig, from_dict, to_dict
from sfd.data.cache import CacheError, LatentCache, attr_diffs
from sfd.registry import Registry

DECODER_FILE = "semvae_decoder.safetensors"
SEMVAE_FILE = "semvae.safetensors"  # the whole SemVAE, in the cache: repair re-encodes with it
_PREFIX = "decoder."
_SEMVAE_KEY = "sfd_cache_semvae"


def cache_semvae_identity(cache: LatentCache) -> dict[str, Any]:
    """The SemVAE that produced the cache's semantic latents, as the cache records it."""
    enc = cache.attrs.get("semantic_encoder")
    if not isinstance(enc, dict):
        raise CacheError(f"cache {cache.path} records no semantic encoder (attribute 'semantic_encoder')")
    if enc.get("kind") == "trained-on-this-cache":
        source = cache.semantic_source()
        if not source:
            raise CacheError(f"cache {cache.path}: its SemVAE was trained after encoding, but no semantic source is recorded")
        return source
    return enc


def write_semvae_decoder(cache: LatentCache, semvae: nn.Module, semvae_identity: Mapping[str, Any]) -> Path:
    """Write the decoder of ``semvae`` beside the cache's arrays (atomic); returns the file."""
    cfg: SemVAEConfig = semvae.cfg  # type: ignore[assignment]
    want = cache_semvae_identity(cache)
    if not same_weights(want, semvae_identity):
        diffs = attr_diffs(dict(semvae_identity), want)
        raise CacheError(f"cache {cache.path} was encoded with another SemVAE than the one given (differs in {sorted(diffs)})")
    tensors = {_PREFIX + k: v for k, v in semvae.decoder.state_dict().items()}
    path = Path(cache.path) / DECODER_FILE
    # One metadata key holding canonical JSON: the file lives in the cache, whose files must be
    # byte-identical when a job is redone, and safetensors writes several metadata keys in a
    # per-process hash order.
    meta = {"semvae_decoder": json.dumps({"config": to_dict(cfg), "semantic_encoder": dict(semvae_identity)}, sort_keys=True)}
    save_safetensors(tensors, path, metadata=meta)
    return path


def load_semvae_decoder(cache: LatentCache) -> tuple[nn.Module, SemVAEConfig, str]:
    """(decoder tower in eval mode without gradients, its config, where it came from)."""
    from sfd.models.semvae import SemVAE

    want = cache_semvae_identity(cache)
    path = Path(cache.path) / DECODER_FILE
    if path.is_file():
        meta = read_safetensors_metadata(path)
        record = json.loads(meta.get("semvae_decoder", "{}"))
        have = record.get("semantic_encoder")
        if not isinstance(have, dict) or not same_weights(want, have):
            raise CacheError(
                f"{path} is the decoder of another SemVAE than the one that encoded {cache.path}; "
                f"attach the right one: python -m sfd.repa_targets {cache.path} SEMVAE_WEIGHTS"
            )
        cfg = from_dict(SemVAEConfig, record["config"], where=f"{path} metadata 'semvae_decoder'")
        model = SemVAE(cfg)
        state = {k[len(_PREFIX):]: v for k, v in load_tensors(path).items() if k.startswith(_PREFIX)}
        load_state_dict_strict(model.decoder, state, source=str(path))
        how = f"{DECODER_FILE} in the cache ({want.get('name', want.get('kind'))})"
    elif want.get("kind") == "random-init":
        from sfd.encoding import build_semvae

        model = build_semvae(want)  # the same weights, rebuilt from the recorded seed
        cfg = model.cfg
        how = f"random-init SemVAE rebuilt from seed {want.get('seed')}"
    else:
        raise CacheError(
            f"cache {cache.path} has no {DECODER_FILE} (needed by repa_targets=semvae): attach the SemVAE "
            f"that encoded it with: python -m sfd.repa_targets {cache.path} SEMVAE_WEIGHTS, "
            "or use repa_targets=stored"
        )
    return model.decoder.eval().requires_grad_(False), cfg, how


def write_cache_semvae(cache: LatentCache, spec: Mapping[str, Any]) -> Path:
    """Store the whole SemVAE of ``spec`` (an ``sfd.encoding`` spec whose samples fill the cache) in
    the cache as ``semvae.safetensors``, so that the cache, copied anywhere on its own, can redo
    damaged shards with it. Its metadata is one key of canonical JSON (config and the SemVAE's
    record), so that every run writes the same bytes. Returns the file."""
    from sfd.encoding import build_semvae, identity

    # The cache's own record of its SemVAE, so that the bytes do not depend on which copy of the
    # weights (trained here, retrained bit-identically, restored) the file was written from.
    record = cache_semvae_identity(cache)
    if not same_weights(record, identity(dict(spec)) or {}):
        raise CacheError(f"cache {cache.path} was encoded with another SemVAE than {spec.get('path')}")
    model = build_semvae(dict(spec))
    meta = {_SEMVAE_KEY: json.dumps({"config": to_dict(model.cfg), "semantic_encoder": record}, sort_keys=True)}
    path = Path(cache.path) / SEMVAE_FILE
    save_safetensors(model.state_dict(), path, metadata=meta)
    return path


def cache_semvae_spec(cache: LatentCache) -> dict[str, Any] | None:
    """The spec (``sfd.encoding``) of the SemVAE stored in the cache, or None if it stores none.

    Its weights are checked against the record stored with them (sfd.checkpoint.weights_identity),
    so a damaged file is an error naming it, never a silently different SemVAE. The spec keeps
    the stored record's name, so it compares equal to the cache's record of that SemVAE."""
    path = Path(cache.path) / SEMVAE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(read_safetensors_metadata(path)[_SEMVAE_KEY])
        config, original = dict(record["config"]), dict(record["semantic_encoder"])
        tensors = load_tensors(path)
    except (KeyError, ValueError, TypeError, WeightsError) as e:
        raise CacheError(f"{path} is not a SemVAE stored by the encode job ({type(e).__name__}: {e}); delete it "
                         "and pass the SemVAE that encoded the cache") from e
    weights_id = weights_identity(tensors, config)
    if original.get("weights_sha256") not in (None, weights_id):
        raise CacheError(f"{path} is damaged (its weights do not hash to the recorded identity); delete it and "
                         "pass the SemVAE that encoded the cache")
    return {**original, "config": config, "file": SEMVAE_FILE, "sha256": file_sha256(path),
            "weights_sha256": weights_id, "path": str(path.resolve())}


class RepaTargetSource(ABC):
    """One way to get a step's REPA targets. The class answers before the run (``needs_dino_in_reader``,
    ``gives_targets``, :meth:`check`); an instance, built once per run, answers ``targets(batch) ->
    [B, tokens, dim] float32`` on the device (None when the source gives none)."""

    name: ClassVar[str] = ""  # its ``repa_targets`` value (set by :func:`repa_target_source`)
    needs_dino_in_reader: ClassVar[bool] = False  # the reader must load the cache's stored DINO tokens
    gives_targets: ClassVar[bool] = True  # False: REPA is off whatever ``repa_weight`` says

    def __init__(self, cache: LatentCache, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> None:
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype
        self.how = self.name  # one line for the run log

    @classmethod
    def check(cls, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        """Problems (empty if none) with producing ``(tokens, dim)`` targets for ``cache``."""
        return []

    def problems(self, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        """:meth:`check` for this run's instance (a source that loaded a model checks the one it loaded)."""
        return type(self).check(cache, tokens, dim)

    @abstractmethod
    def __call__(self, batch: Any) -> Tensor | None:
        """Targets of a :class:`sfd.data.reader.LatentBatch`, on the device, float32."""


REPA_TARGET_SOURCES: Registry[type[RepaTargetSource]] = Registry("REPA target source")


def repa_target_source(name: str) -> Callable[[type[RepaTargetSource]], type[RepaTargetSource]]:
    """Class decorator: register a :class:`RepaTargetSource` as ``repa_targets=name``."""

    def add(cls: type[RepaTargetSource]) -> type[RepaTargetSource]:
        cls.name = name
        return REPA_TARGET_SOURCES.register(name, cls)

    return add


@repa_target_source("stored")
class StoredTargets(RepaTargetSource):
    """The cache's ``dino`` array (the authors' targets), read by the reader as float16."""

    needs_dino_in_reader = True

    def __init__(self, cache: LatentCache, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(cache, device, autocast_dtype)
        self.how = "the cache's stored DINO tokens"

    @classmethod
    def check(cls, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        if cache.layout.dino_shape is None:
            return [
                f"REPA needs targets, but the cache at {cache.path} has none (encoded without DINO targets): "
                "set repa_weight=0 (-o repa_weight=0), decode them from the semantic latents "
                "(-o repa_targets=semvae) or re-encode with targets"
            ]
        have = tuple(cache.layout.dino_shape)
        if have == (tokens, dim):
            return []
        return [
            f"cache REPA targets are {have} (tokens, dim), the model needs ({tokens}, {dim}) "
            "(tokens = (input_size/patch_size)², model.repa_target_dim)"
        ]

    def __call__(self, batch: Any) -> Tensor:
        if batch.repa is None:
            raise CacheError(f"repa_targets={self.name} but the reader delivers no targets (load_dino=False)")
        return batch.repa.to(self.device, non_blocking=True).float()


@repa_target_source("semvae")
class SemVAETargets(RepaTargetSource):
    """Decoded from the batch's own semantic latent by the cache's SemVAE decoder (module docstring)."""

    def __init__(
        self,
        cache: LatentCache,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        chunk: int = 256,
    ) -> None:
        super().__init__(cache, device, autocast_dtype)
        self.chunk = chunk
        decoder, cfg, self.how = load_semvae_decoder(cache)
        self.decoder = decoder.to(self.device)
        self.cfg = cfg
        stats = cache.stats()
        self.ct = cache.layout.texture_shape[0]
        self.mean = torch.from_numpy(stats["semantic_mean"]).to(self.device).view(1, -1, 1, 1)
        self.std = torch.from_numpy(stats["semantic_std"]).to(self.device).view(1, -1, 1, 1)
        cs = cache.layout.semantic_shape[0]
        if cs != cfg.bottleneck_dim:
            raise CacheError(f"cache {cache.path} has {cs} semantic channels, its SemVAE decoder expects {cfg.bottleneck_dim}")

    @classmethod
    def check(cls, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        try:
            _, cfg, _ = load_semvae_decoder(cache)
        except (CacheError, WeightsError) as e:
            return [str(e)]
        return cls._fit(cfg, cache, tokens, dim)

    def problems(self, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        return self._fit(self.cfg, cache, tokens, dim)  # the decoder this run loaded, not a second read

    @staticmethod
    def _fit(cfg: SemVAEConfig, cache: LatentCache, tokens: int, dim: int) -> list[str]:
        cs, h, w = cache.layout.semantic_shape
        problems = []
        if cs != cfg.bottleneck_dim:
            problems.append(f"cache has {cs} semantic channels, its SemVAE decoder takes {cfg.bottleneck_dim}")
        if (h * w, cfg.input_dim) != (tokens, dim):
            problems.append(
                f"repa_targets=semvae decodes ({h * w}, {cfg.input_dim}) (tokens, dim) targets, the model needs ({tokens}, {dim})"
            )
        return problems

    @torch.no_grad()
    def decode(self, semantic: Tensor) -> Tensor:
        """Normalised semantic latents ``[B, Cs, h, w]`` (on the device) → targets ``[B, h·w, dim]`` float32."""
        from sfd.models.semvae import latent_to_tokens

        z = latent_to_tokens(semantic.float() * self.std + self.mean)  # raw posterior sample, (B, h·w, Cs)
        out = []
        for i in range(0, len(z), self.chunk):  # bounds the activations of a large per-rank batch
            with runtime.autocast(self.device, self.autocast_dtype):  # the trainer's policy
                out.append(self.decoder(z[i : i + self.chunk]).float())
        return torch.cat(out)

    def __call__(self, batch: Any) -> Tensor:
        return self.decode(batch.x[:, self.ct :].to(self.device, non_blocking=True))


@repa_target_source("none")
class NoTargets(RepaTargetSource):
    """No targets: REPA is off whatever ``repa_weight`` says."""

    gives_targets = False

    def __init__(self, cache: LatentCache, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(cache, device, autocast_dtype)
        self.how = "none (REPA off)"

    def __call__(self, batch: Any) -> None:
        return None


def check_repa_targets(source: str, cache: LatentCache, tokens: int, dim: int) -> list[str]:
    """Problems (empty if none) with producing ``(tokens, dim)`` REPA targets from ``source`` for ``cache``."""
    return REPA_TARGET_SOURCES[source].check(cache, tokens, dim)


def RepaTargets(  # the former class name, kept for its callers (tests, bench/cache_reader.py)
    source: str, cache: LatentCache, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None
) -> RepaTargetSource:
    """The per-run targets of the source named ``source``: ``targets(batch) -> [B, tokens, dim] float32 | None``."""
    return REPA_TARGET_SOURCES[source](cache, device, autocast_dtype)


def main(argv: list[str] | None = None) -> int:
    """``python -m sfd.repa_targets CACHE SEMVAE_WEIGHTS``: attach the SemVAE decoder to a cache."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("cache", help="latent cache directory")
    ap.add_argument("semvae", help="the SemVAE weights that encoded the cache (ours or the authors' .pt)")
    ap.add_argument("--preset", default="transformer_ch16", help="architecture of an authors' .pt file")
    args = ap.parse_args(argv)
    from sfd.encoding import build_semvae, identity, semvae_spec

    try:
        cache = LatentCache.open(args.cache, mode="r")
        spec = semvae_spec(args.semvae, args.preset, None)
        path = write_semvae_decoder(cache, build_semvae(spec), identity(spec) or {})
    except (CacheError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
