"""One load of each weight file per command: the trainer's --init-from and resume, and
sample/grid.py on a run directory, each open a checkpoint file (and parse its header) once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from sfd.config import train_preset
from sfd.models.lightningdit import LightningDiT, save_lightningdit
from tests.test_train import TINY, argv, make_cache
from train import main as trainer

STANDIN = {"kind": "standin", "name": "standin-f2", "factor": 2, "scale": 2.0}  # 12 channels = 3·2²


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts, per file, every way a weight file gets opened and parsed: safetensors' safe_open
    (header + tensors) and load_file, and torch.load."""
    counts: Counter = Counter()

    def counting(real):
        def wrapper(path, *args, **kwargs):
            counts[Path(path).resolve()] += 1
            return real(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(safetensors, "safe_open", counting(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "load_file", counting(safetensors.torch.load_file))
    monkeypatch.setattr(torch, "load", counting(torch.load))
    return counts


def test_each_weight_file_is_read_once_per_command(tmp_path: Path, opens: Counter) -> None:
    torch.set_num_threads(1)
    cache = make_cache(tmp_path / "c.zarr", texture_encoder=STANDIN).path
    cfg = train_preset("tiny", *[o for o in TINY[2:] if o != "-o"])
    torch.manual_seed(3)
    init = tmp_path / "init.safetensors"
    save_lightningdit(LightningDiT(cfg.model), init)
    run = tmp_path / "run"

    # The trainer starting from a weight file: the model and its EMA both come from one read.
    trainer.main(argv(cache, run, "max_steps=2", f"init_from={init}"))
    assert opens[init.resolve()] == 1, opens
    # Resuming: each file of the checkpoint once (configs, check and weights from the same read).
    opens.clear()
    trainer.main(argv(cache, run, "max_steps=3"))
    ckpt = run / "checkpoints" / "0000002"
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        assert opens[(ckpt / name).resolve()] == 1, (name, opens)

    # sample/grid.py on the run: the model, its latent statistics and its decoder record come
    # from one read of the latest EMA file (it used to parse that header three times).
    from sample import grid

    opens.clear()
    grid.main(["--ckpt", str(run), "--classes", "0,1", "--per-class", "1", "--sampler", "euler",
               "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    latest = (run / "checkpoints" / "0000003" / "ema.safetensors").resolve()
    assert opens[latest] == 1 and sum(opens.values()) == 1, opens
    assert (tmp_path / "g.png").is_file()
