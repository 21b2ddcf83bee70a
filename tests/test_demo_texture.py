"""The demo's texture autoencoder (sfd/demo/texture.py): its LDM-layout file declares its own
architecture, the encode job builds that architecture from ``--texture-vae FILE`` and caches its
posterior samples, and the cache's decoder is the same file's decoder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sfd.checkpoint import WeightsError, save_safetensors
from sfd.config import TEXTURE_VAE_PRESETS, ConfigError
from sfd.data.cache import LatentCache
from sfd.data.images import hflip, load_image, to_model_input
from sfd.demo.semantic import save_semantic_vit, train_semantic_vit
from sfd.demo.shapes import CLASSES, render_arrays, write_split
from sfd.demo.texture import (
    bilinear_baseline,
    demo_texture_config,
    evaluate_texture_vae,
    save_texture_vae,
    train_texture_vae,
)
from sfd.encoding import build_texture_encoder, row_generators, texture_spec
from sfd.loading import texture_decoder_for
from sfd.models.autoencoder import (
    AutoencoderKL,
    load_texture_vae,
    texture_vae_config_for_file,
    texture_vae_metadata,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def load_encode_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pipeline_encode", REPO / "pipeline" / "encode.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoencoderKL, Path]:
    torch.set_num_threads(1)
    x, _, _ = render_arrays(2, 24, seed=0)
    vae = train_texture_vae(x, cfg=demo_texture_config(4, 24), steps=3, batch_size=4, log_every=0)
    path = save_texture_vae(vae, tmp_path_factory.mktemp("tex") / "texture-vae.safetensors", record={"steps": 3})
    return vae, path


def test_configs_per_factor() -> None:
    f4, f8 = demo_texture_config(4, 24), demo_texture_config(8, 32)
    assert (f4.downsample_factor, f4.embed_dim, f8.downsample_factor, f8.embed_dim) == (4, 8, 8, 16)
    assert AutoencoderKL(f8).encode(torch.zeros(1, 3, 32, 32), sample=False).shape == (1, 16, 4, 4)
    with pytest.raises(ConfigError, match="factor"):
        demo_texture_config(16, 32)
    with pytest.raises(ConfigError, match="multiple"):
        demo_texture_config(8, 28)


def test_saved_file_round_trips(trained: tuple[AutoencoderKL, Path]) -> None:
    vae, path = trained
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # The LDM checkpoint layout: the four top-level modules, LDM's parameter names.
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert {"encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.1.norm2.weight", "decoder.mid.attn_1.q.weight"} <= keys
    assert json.loads(meta["ddconfig"])["ch_mult"] == [1, 1, 2] and meta["embed_dim"] == "8"
    assert "embed_dim" not in json.loads(meta["ddconfig"])  # LDM keeps it beside ddconfig
    assert json.loads(meta["record"]) == {"steps": 3}
    assert texture_vae_config_for_file(path) == vae.cfg
    # No cfg and the default preset name: the file's declaration wins, every tensor is identical.
    loaded = load_texture_vae(path)
    assert loaded.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # The encode job's resolution of --texture-vae FILE (any preset name, as --dino FILE).
    spec = texture_spec("f16d32", str(path), None, 24)
    assert spec["name"] == "file-config:texture-vae.safetensors" and spec["kind"] == "weights"
    assert spec["config"]["z_channels"] == 8 and "weights_sha256" in spec
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(build_texture_encoder(spec).encode(x, sample=False), vae.encode(x, sample=False))


def test_file_without_metadata_keeps_the_preset(tmp_path: Path) -> None:
    cfg = TEXTURE_VAE_PRESETS["tiny"]
    path = tmp_path / "plain.safetensors"
    save_safetensors(AutoencoderKL(cfg).state_dict(), path)
    assert texture_vae_config_for_file(path) is None
    assert texture_spec("tiny", str(path), None, 32)["name"] == "tiny"
    assert load_texture_vae(path, preset="tiny").cfg == cfg


def test_bad_metadata_is_a_clear_error(trained: tuple[AutoencoderKL, Path], tmp_path: Path) -> None:
    vae, _ = trained
    tensors = vae.state_dict()
    # A declaration that disagrees with the tensors (16 latent channels declared, 8 stored).
    lying = tmp_path / "lying.safetensors"
    save_safetensors(tensors, lying, texture_vae_metadata(demo_texture_config(4, 24, z_channels=16)))
    with pytest.raises(WeightsError, match=r"lying\.safetensors.*metadata ddconfig.*\n.*wrong shape"):
        texture_spec("f16d32", str(lying), None, 24)
    # Through the encode job's command line: one `error:` line naming the file, nothing created.
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "pipeline" / "encode.py"), "--images", str(tmp_path / "imgs"), "--out",
           str(tmp_path / "new" / "cache"), "--image-size", "24", "--texture-vae", str(lying), "--dino", str(lying)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "lying.safetensors" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    # Not JSON, and a field LDM's ddconfig does not have.
    for name, meta in (("garbled", {"ddconfig": "{ch: 32", "embed_dim": "8"}),
                       ("unknown", {"ddconfig": json.dumps({"ch": 32, "heads": 4}), "embed_dim": "8"})):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors", meta)
        with pytest.raises(WeightsError, match=rf"texture VAE '.*{name}\.safetensors'.*not a valid LDM autoencoder config"):
            load_texture_vae(tmp_path / f"{name}.safetensors")


def test_measurements_are_sane() -> None:
    x, _, _ = render_arrays(1, 24, seed=3)
    base = bilinear_baseline(x, 4)
    assert base.shape == x.shape and base.dtype == np.uint8
    report = evaluate_texture_vae(AutoencoderKL(demo_texture_config(4, 24)).eval(), x, 4)
    assert report["bilinear_f4_baseline"]["psnr_db"] > report["autoencoder_posterior_mean"]["psnr_db"]  # untrained
    assert len(report["latent"]["channel_std"]) == 8


def test_encode_job_caches_the_files_latents_and_decodes_with_it(trained: tuple[AutoencoderKL, Path], tmp_path: Path) -> None:
    import ray

    vae, path = trained
    images = write_split(tmp_path / "images", 1, 24, seed=5)  # one image per class
    x, _, _ = render_arrays(1, 24, seed=0)
    vit = save_semantic_vit(train_semantic_vit(x, steps=1, batch_size=4, log_every=0), tmp_path / "vit.safetensors")
    encode_mod = load_encode_script()
    out = tmp_path / "cache"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        # No --texture: the default preset's name, but the file declares its architecture.
        results = encode_mod.main([
            "--images", str(images), "--out", str(out), "--image-size", "24", "--texture-vae", str(path),
            "--dino", str(vit), "-o", "semvae_preset=tiny", "--stages", "encode", "-o", "rows_per_shard=4", "-o", "rows_per_chunk=2",
            "-o", "batch_size=4", "-o", "num_workers=1",
        ])
    finally:
        ray.shutdown()
    assert [(r.stage, r.status) for r in results][0] == ("encode", "done")
    cache = LatentCache.open(out)
    info = cache.attrs["texture_encoder"]
    assert info["name"] == "file-config:texture-vae.safetensors" and info["config"]["embed_dim"] == 8
    assert "path" not in info
    g = cache.group
    n = len(CLASSES)  # one image per class
    assert g["texture"].shape == (n, 2, 8, 6, 6)
    paths = cache.paths()
    for row in range(n):
        img, _ = load_image(Path(images) / paths[row], 24)
        for flip, view in ((0, img), (1, hflip(img))):
            with torch.no_grad():  # the posterior sample, with the job's per-(row, flip) noise
                z = vae.encode(to_model_input(np.array(view[None])), generator=row_generators(0, "texture", [row], [flip]))
            stored = torch.from_numpy(np.asarray(g["texture"][row, flip]).astype(np.float32))
            torch.testing.assert_close(stored, z[0].half().float(), rtol=1e-3, atol=1e-3)
    # The cache's decoder (what sample/grid.py, eval/fid.py and the trainer's grids build) is the
    # same file's decoder, checked against the SHA-256 the cache recorded.
    decoder, why = texture_decoder_for(dict(cache.attrs), str(path))
    assert decoder is not None and "file-config" in why
    z = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decoder.decode(z), vae.decode(z))
    other = tmp_path / "other.safetensors"
    save_texture_vae(AutoencoderKL(vae.cfg), other)
    with pytest.raises(WeightsError, match="SHA-256"):
        texture_decoder_for(dict(cache.attrs), str(other))
