"""Weight loading is safe and explicit: no pickle execution, clear errors, atomic writes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from sfd.checkpoint import (
    KNOWN_WEIGHTS,
    WeightsError,
    atomic_path,
    load_state_dict_strict,
    load_tensors,
    read_safetensors_metadata,
    resolve_weights,
    save_safetensors,
    unwrap_state_dict,
)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_missing_file_message_names_file_location_and_publisher(tmp_path):
    with pytest.raises(WeightsError) as e:
        resolve_weights("semvae", tmp_path / "nope.pt")
    msg = str(e.value)
    assert "semantic_ae_final.pt" in msg and "SFD-Project/SFD" in msg and str(tmp_path / "nope.pt") in msg
    assert "downloaded" in msg  # says nothing is fetched behind the user's back
    for kind, info in KNOWN_WEIGHTS.items():
        with pytest.raises(WeightsError, match=info.filename):
            resolve_weights(kind, tmp_path / "absent")


def test_pickle_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(WeightsError, match="weights_only"):
        load_tensors(path)


def test_unwrap_prefers_ema_and_strips_wrappers():
    a, b = torch.zeros(2), torch.ones(2)
    ckpt = {"model": {"module.w": a}, "ema": {"_orig_mod.module.w": b}, "opt": {}, "config": {}}
    sd = unwrap_state_dict(ckpt)
    assert list(sd) == ["w"] and torch.equal(sd["w"], b)
    assert torch.equal(unwrap_state_dict(ckpt, prefer=("model",))["w"], a)
    with pytest.raises(WeightsError, match="no state dict"):
        unwrap_state_dict({"epoch": 3})


def test_strict_load_lists_every_problem():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    del sd["1.bias"]
    sd["0.weight"] = torch.zeros(5, 3)
    sd["2.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as e:
        load_state_dict_strict(m, sd, source="file.pt")
    msg = str(e.value)
    assert "file.pt" in msg and "missing (1): 1.bias" in msg and "unexpected (1): 2.weight" in msg
    assert "0.weight: file (5, 3) vs model (4, 3)" in msg


def test_optional_buffers_may_be_absent():
    m = nn.Linear(2, 2)
    m.register_buffer("freqs", torch.arange(3.0))
    sd = {k: v for k, v in m.state_dict().items() if k != "freqs"}
    load_state_dict_strict(m, sd, optional=("freqs",))
    assert torch.equal(m.freqs, torch.arange(3.0))


def test_safetensors_round_trip_with_metadata_is_atomic(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.arange(4.0)}, path, {"config": {"x": 1}, "step": "7"})
    assert read_safetensors_metadata(path) == {"config": '{"x": 1}', "step": "7"}
    assert torch.equal(load_tensors(path)["a"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    dst = tmp_path / "ckpt.bin"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dst) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("killed")
    assert dst.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]


class _CallbackState:  # stands for a class an old trainer pickled beside its weights
    def __init__(self):
        self.best = 1.0


def test_inert_objects_loads_tensors_without_running_pickled_code(tmp_path):
    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": _CallbackState()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        load_tensors(path)  # refused by default
    obj = load_tensors(path, inert_objects=True)
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert not isinstance(obj["callbacks"], _CallbackState)  # became an inert stand-in
    # A pickle that calls a system function stays refused (torch blocks such modules outright).
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(WeightsError):
        load_tensors(evil, inert_objects=True)


# ---- the checkpoint contract (format 2) and the files of earlier versions -----------------------

V1 = Path(__file__).parent / "data" / "checkpoint-v1"  # written by the v1 code, see the script there


def test_v1_checkpoints_of_this_project_still_load():
    from sfd.checkpoint import read_checkpoint
    from sfd.models.lightningdit import build_lightningdit

    run = read_checkpoint(V1 / "run")  # a run directory: its latest checkpoint, EMA first
    assert run.format == "sfd-1" and run.path.name == "ema.safetensors" and run.step == 2
    m = run.model_config
    assert (m.hidden_size, m.depth, m.in_channels, m.semantic_chans, m.input_size) == (16, 2, 6, 2, 2)
    assert run.delta_t == 0.3 and "delta_t" not in run.run_config and "model" not in run.run_config
    assert run.run_config["out_dir"] == "runs/old" and run.latent_stats is None
    model = build_lightningdit(run)
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], run.state_dict["final_layer.linear.weight"])
    export = read_checkpoint(V1 / "model.safetensors")  # save_lightningdit's v1 export: a bare ModelConfig
    assert export.format == "sfd-1" and export.model_config == m and export.run_config is None
    raw = read_checkpoint(V1 / "run", prefer_ema=False, model_config=m)
    assert raw.path.name == "model.safetensors"


def test_format2_round_trip_keeps_configs_apart(tmp_path):
    import json

    from sfd.checkpoint import read_checkpoint, save_checkpoint
    from sfd.config import SEMVAE_PRESETS, model_preset

    cfg = model_preset("tiny", "semfirst_delta_t=0.5")
    stats = {"source": "cache x", "texture_mean": [0.1, 0.2], "texture_std": [1.5, 2.5]}
    save_checkpoint(tmp_path / "w.safetensors", {"a": torch.ones(2)}, "lightningdit", cfg, {"lr": 1e-4}, latent_stats=stats, step=7)
    meta = read_safetensors_metadata(tmp_path / "w.safetensors")
    assert meta["format_version"] == "2" and meta["kind"] == "lightningdit" and "config" not in meta
    assert json.loads(meta["model_config"])["semfirst_delta_t"] == 0.5 and json.loads(meta["run_config"]) == {"lr": 1e-4}
    ck = read_checkpoint(tmp_path / "w.safetensors")
    assert (ck.format, ck.model_config, ck.run_config, ck.latent_stats, ck.step, ck.delta_t) == ("sfd-2", cfg, {"lr": 1e-4}, stats, 7, 0.5)
    with pytest.raises(WeightsError, match="lightningdit weights, not semvae"):
        read_checkpoint(tmp_path / "w.safetensors", kind="semvae")
    with pytest.raises(ValueError, match="must not repeat the model"):
        save_checkpoint(tmp_path / "x.safetensors", {}, "lightningdit", cfg, {"model": {}})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.safetensors", {}, "semvae", cfg)
    save_checkpoint(tmp_path / "s.safetensors", {"a": torch.ones(2)}, "semvae", SEMVAE_PRESETS["tiny"])
    assert read_checkpoint(tmp_path / "s.safetensors", kind="semvae").model_config == SEMVAE_PRESETS["tiny"]


def test_authors_yaml_container_infers_the_model_config(tmp_path):
    from sfd.checkpoint import read_checkpoint
    from sfd.config import model_preset

    yaml = {
        "model": {"model_type": "LightningDiT-B/1", "in_chans": 48, "use_qknorm": True, "use_swiglu": True,
                  "use_rope": True, "use_rmsnorm": True, "use_repa": True, "semantic_chans": 16, "semfirst_delta_t": 0.3},
        "data": {"image_size": 256, "num_classes": 1000},
    }
    torch.save({"ema": {"w": torch.ones(1)}, "model": {"w": torch.zeros(1)}, "config": yaml, "steps": 60000}, tmp_path / "g.pt")
    ck = read_checkpoint(tmp_path / "g.pt")
    assert ck.format == "authors" and ck.model_config == model_preset("B/1") and ck.step == 60000
    assert ck.run_config == yaml and float(ck.state_dict["w"]) == 1.0
    torch.save({"w": torch.ones(1)}, tmp_path / "bare.pt")
    with pytest.raises(WeightsError, match="carries no model config"):
        read_checkpoint(tmp_path / "bare.pt")


def test_weights_identity_is_the_weights_not_the_file(tmp_path: Path) -> None:
    """The identity of a model file hashes its tensors and config: other metadata (a run's paths,
    key order) or another format give the same identity; a changed byte, dtype or config does not."""
    from sfd.checkpoint import file_sha256, file_weights_identity, same_weights, weights_identity

    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g), "step": torch.tensor(7)}
    cfg = {"dim": 4, "arch": "mlp"}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"run": "/here", "other": "1"})
    save_safetensors(tensors, tmp_path / "y.safetensors", metadata={"run": "/elsewhere"})
    x, y = (file_weights_identity(tmp_path / f, cfg) for f in ("x.safetensors", "y.safetensors"))
    assert x == y == weights_identity(dict(reversed(list(tensors.items()))), {"arch": "mlp", "dim": 4})
    assert file_sha256(tmp_path / "x.safetensors") != file_sha256(tmp_path / "y.safetensors")
    torch.save(tensors, tmp_path / "z.pt")
    assert file_weights_identity(tmp_path / "z.pt", cfg) is None  # pickles: the file hash identifies them
    flipped = {**tensors, "a.bias": tensors["a.bias"].clone()}
    flipped["a.bias"].view(torch.int32)[0] ^= 1  # one bit
    assert weights_identity(flipped, cfg) != x
    assert weights_identity({**tensors, "step": torch.tensor(7, dtype=torch.int32)}, cfg) != x
    assert weights_identity(tensors, {**cfg, "dim": 5}) != x

    new = {"kind": "weights", "name": "semvae.safetensors", "config": cfg, "file": "x.safetensors", "sha256": "0" * 64, "weights_sha256": x}
    assert same_weights(new, {**new, "name": "copy", "file": "y.safetensors", "sha256": "1" * 64, "path": "/y"})
    assert not same_weights(new, {**new, "weights_sha256": "2" * 64})
    assert not same_weights(new, {**new, "config": {**cfg, "dim": 5}})
    old = {k: v for k, v in new.items() if k != "weights_sha256"}  # a cache written before: file hash only
    assert same_weights(old, {**new, "path": "/y"}) and not same_weights(old, {**new, "sha256": "1" * 64})
