"""REPA targets decoded by the Semantic VAE (sfd/repa_targets.py) against the stored ones, and a
training run that uses them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfd.config import SemVAEConfig, to_dict
from sfd.data.cache import CacheError, LatentCache, create_cache
from sfd.data.reader import LatentCacheReader
from sfd.models.semvae import SemVAE, latent_to_tokens, tokens_to_latent
from sfd.repa_targets import (
    DECODER_FILE,
    RepaTargets,
    check_repa_targets,
    load_semvae_decoder,
    write_semvae_decoder,
)

REPO = Path(__file__).resolve().parents[1]
ROWS, HW, TEX, CLASSES = 48, 8, 12, 10
CFG = SemVAEConfig(input_dim=32, bottleneck_dim=4, hidden_dim=32, transformer_heads=2, transformer_blocks=1)
IDENTITY = {"kind": "weights", "name": "semvae-test", "config": to_dict(CFG), "sha256": "0" * 64}


def _tokens(g: np.random.Generator, n: int, basis: np.ndarray) -> np.ndarray:
    """DINO-like tokens of rank 4 (what a 4-channel bottleneck can carry), plus a little noise."""
    codes = g.standard_normal((n, HW * HW, 4)).astype(np.float32)
    return codes @ basis + 0.05 * g.standard_normal((n, HW * HW, CFG.input_dim)).astype(np.float32)


def _train_semvae(basis: np.ndarray) -> SemVAE:
    # One thread: on a shared 2-core machine the intra-op pool made this ~15x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(basis)
    finally:
        torch.set_num_threads(threads)


def _fit(basis: np.ndarray) -> SemVAE:
    torch.manual_seed(0)
    model = SemVAE(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = np.random.default_rng(1)
    for _ in range(120):
        x = torch.from_numpy(_tokens(g, 8, basis))
        recon, mean, logvar = model(x)
        loss = (recon - x).pow(2).mean() + 1e-4 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def semvae_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatentCache, SemVAE]:
    """A tiny cache whose semantic latents are SemVAE posterior samples of its stored DINO tokens."""
    g = np.random.default_rng(0)
    basis = g.standard_normal((4, CFG.input_dim)).astype(np.float32)
    semvae = _train_semvae(basis)
    labels = np.arange(ROWS) % CLASSES
    cache = create_cache(
        tmp_path_factory.mktemp("semvae") / "c.zarr", paths=[f"c{y}/{i}.png" for i, y in enumerate(labels)],
        labels=labels, rows_per_shard=16, rows_per_chunk=8, texture_shape=(TEX, HW, HW), semantic_shape=(4, HW, HW),
        store_dino=True, dino_shape=(HW * HW, CFG.input_dim), attrs={"num_classes": CLASSES, "semantic_encoder": IDENTITY},
    )
    gen = torch.Generator().manual_seed(0)
    for s in cache.pending_shards():
        a, b = cache.layout.shard_rows(s)
        tokens = torch.from_numpy(_tokens(g, 2 * (b - a), basis))
        sem = tokens_to_latent(semvae.encode(tokens, generator=gen)).view(b - a, 2, 4, HW, HW)
        tex = g.standard_normal((b - a, 2, TEX, HW, HW)).astype(np.float32)
        cache.write_shard(s, tex, sem, tokens.view(b - a, 2, HW * HW, CFG.input_dim))
    cache.compute_stats()
    return cache, semvae


def test_semvae_targets_match_the_decoder_and_the_stored_tokens(semvae_cache) -> None:
    cache, semvae = semvae_cache
    with pytest.raises(CacheError, match=f"no {DECODER_FILE}.*python -m sfd.repa_targets"):
        load_semvae_decoder(cache)
    other = {**IDENTITY, "sha256": "1" * 64}
    with pytest.raises(CacheError, match="another SemVAE"):
        write_semvae_decoder(cache, semvae, other)
    write_semvae_decoder(cache, semvae, IDENTITY)
    assert check_repa_targets("semvae", cache, HW * HW, CFG.input_dim) == []
    assert "needs (64, 16)" in check_repa_targets("semvae", cache, HW * HW, 16)[0]

    reader = LatentCacheReader(cache, seed=0, load_dino=True)
    batch = next(reader.batches(32))
    targets = RepaTargets("semvae", cache)
    decoded = targets(batch)
    assert decoded.shape == (32, HW * HW, CFG.input_dim) and decoded.dtype == torch.float32
    # The same as decoding the raw cached latent of each (row, flip) directly.
    raw = torch.from_numpy(np.stack([np.asarray(cache.group["semantic"][r, f]) for r, f in zip(batch.rows, batch.flips)])).float()
    torch.testing.assert_close(decoded, semvae.decode(latent_to_tokens(raw)), atol=2e-3, rtol=1e-3)
    # Fidelity: per-token cosine to the stored targets of the same item is high, and drops for
    # another item's targets (so rows and flips are paired right).
    stored = RepaTargets("stored", cache)(batch)
    assert stored.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(decoded, stored, dim=-1)
    wrong = torch.nn.functional.cosine_similarity(decoded, stored.roll(1, dims=0), dim=-1)
    assert cos.mean() > 0.9 and wrong.mean().abs() < 0.3, (cos.mean(), wrong.mean())
    assert RepaTargets("none", cache)(batch) is None
    reader.close()


def test_trainer_runs_with_semvae_targets(semvae_cache, tmp_path: Path) -> None:
    cache, semvae = semvae_cache
    write_semvae_decoder(cache, semvae, IDENTITY)
    spec = importlib.util.spec_from_file_location("sfd_train_main_repa", REPO / "train" / "main.py")
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer
    spec.loader.exec_module(trainer)
    base = [
        "--preset", "tiny", "-o", f"model.in_channels={TEX + 4}", "-o", "model.semantic_chans=4",
        "-o", f"model.repa_target_dim={CFG.input_dim}", "-o", "log_every=1", "-o", "max_steps=2",
        "--cache", str(cache.path),
    ]
    trainer.main([*base, "--out-dir", str(tmp_path / "semvae"), "-o", "repa_targets=semvae"])
    trainer.main([*base, "--out-dir", str(tmp_path / "none"), "-o", "repa_targets=none"])
    import json

    def repa(run: str) -> list[float]:
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["repa"] for r in lines if r["event"] == "train"]

    assert len(repa("semvae")) == 2 and all(v > 0 for v in repa("semvae"))
    assert all(v == 0 for v in repa("none"))


def test_stored_targets_take_the_raw_path_with_per_item_checksums(tmp_path) -> None:
    """The cache's DINO shards carry a CRC32C per inner chunk (docs/reliability.md); the reader
    still reads them raw (strided), never item by item through zarr, and gets zarr's values."""
    import numpy as np

    from sfd.data.reader import LatentCacheReader
    from tests.test_train import make_cache

    cache = make_cache(tmp_path / "c.zarr")
    for mode in ("pagecache", "memory"):
        reader = LatentCacheReader(cache, seed=0, load_dino=True, mode=mode)
        assert all(items.raw for items in reader._items.values()), mode
        assert reader._items["dino"].stored_bytes == reader._items["dino"].item_bytes + 4
        batch = next(reader.batches(8))
        expected = np.stack([np.asarray(cache.group["dino"][int(r), int(f)]) for r, f in zip(batch.rows, batch.flips)])
        np.testing.assert_array_equal(batch.repa.numpy(), expected)
        reader.close()
