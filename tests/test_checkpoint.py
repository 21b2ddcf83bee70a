"""Weight loading is safe and explicit: no pickle execution, clear errors, atomic writes."""

from __future__ import annotations

import os
import pickle

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
