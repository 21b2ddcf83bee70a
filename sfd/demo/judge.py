"""The demo's judge: a small CNN classifier of the demo shapes, and what it says about samples.

A distance in a random-init Inception space says little about whether samples are right. On
the demo domain there is a better referee: a classifier trained on the real training images.
For a set of generated images it gives two numbers:

- ``accuracy``: the fraction of samples the judge assigns to their conditioning label;
- ``FD_judge``: the Fréchet distance between the judge's penultimate features (the 128-d input
  of its last linear layer) of the samples and of held-out real images (sfd.metrics, float64).
  This is *not* FID: another network, another feature space, another scale; only numbers from
  the same judge file are comparable.

The same two numbers for real held-out images (the ceiling) come with every report, so a
reader sees how far samples are from real data in the judge's eyes.

Weights are a safetensors file with the config and the training record in its metadata.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd.checkpoint import WeightsError, load_tensors, read_safetensors_metadata, save_safetensors
from sfd.demo.shapes import CLASSES, IMAGE_SIZE
from sfd.metrics import feature_stats, frechet_distance

METRIC_ACCURACY = "judge_accuracy"
METRIC_FD = "FD_judge"


@dataclass(frozen=True)
class JudgeConfig:
    num_classes: int = len(CLASSES)
    image_size: int = IMAGE_SIZE
    width: int = 32  # channels of the first stage; doubled at each of the 3 stages
    feature_dim: int = 128  # the penultimate features FD_judge is computed on


class Judge(nn.Module):
    """conv-BN-ReLU stages at full, 1/2 and 1/4 resolution → global average pool → 128-d → classes."""

    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate((w, 2 * w, 4 * w)):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    @staticmethod
    def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"judge input must be uint8 (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(self.body(x).mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips and 90° turns: every demo class is invariant to them, so they cost the judge nothing.

    The shapes are drawn at any angle already; these exact, lossless turns multiply the angles
    the judge sees by 8 without the resampling blur an arbitrary-angle rotation would add.
    """
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(3)
    k = int(torch.randint(4, (), generator=g))
    return torch.rot90(x, k, (2, 3))


def train_judge(
    images: np.ndarray, labels: np.ndarray, cfg: JudgeConfig, *, steps: int = 400, batch_size: int = 64,
    lr: float = 3e-3, seed: int = 0, log_every: int = 100,
) -> Judge:
    """Adam with a cosine decay on the real training images; deterministic for a given seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Judge(cfg)
    x_all, y_all = Judge.prepare(images), torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        logits = model(_augment(x_all[idx], g))
        loss = F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            acc = (logits.argmax(1) == y_all[idx]).float().mean().item()
            print(f"judge step {step + 1}/{steps}: loss {loss.item():.4f} batch accuracy {acc:.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def judge_outputs(model: Judge, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), penultimate features (N, feature_dim) as float64)."""
    model.eval()
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        x = Judge.prepare(images[i : i + batch_size])
        f = model.features(x)
        preds.append(model.head(f).argmax(1).numpy())
        feats.append(f.double().numpy())
    return np.concatenate(preds), np.concatenate(feats)


def judge_report(model: Judge, images: np.ndarray, labels: np.ndarray, ref_features: np.ndarray) -> dict[str, Any]:
    """Class accuracy of ``images`` w.r.t. ``labels`` and FD_judge against ``ref_features``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < 2:
        raise ValueError("FD_judge needs at least 2 images")
    preds, feats = judge_outputs(model, images)
    mu, sigma = feature_stats(feats)
    mu_r, sigma_r = feature_stats(ref_features)
    per_class = {int(c): float((preds[labels == c] == c).mean()) for c in np.unique(labels)}
    return {
        METRIC_ACCURACY: float((preds == labels).mean()),
        METRIC_FD: float(frechet_distance(mu, sigma, mu_r, sigma_r)),
        "per_class_accuracy": per_class,
        "num_images": len(images),
        "num_reference": len(ref_features),
    }


def save_judge(model: Judge, path: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Path:
    meta = {"format": "sfd-demo-judge", "config": json.dumps(asdict(model.cfg)), "record": json.dumps(record or {})}
    save_safetensors(model.state_dict(), Path(path), meta)
    return Path(path)


def load_judge(path: str | os.PathLike[str]) -> Judge:
    """A judge written by ``save_judge`` (safetensors; nothing executes on load), eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no judge weights at '{path}': train one with `python pipeline/demo.py` (stage 'judge')")
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sfd-demo-judge":
        raise WeightsError(f"'{path}' is not a demo judge file (metadata format {meta.get('format')!r})")
    model = Judge(JudgeConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_tensors(path), strict=True)
    return model.eval()


def read_sample_folder(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images and conditioning labels of an ``eval/fid.py gen`` folder (labels from its gen.json rule)."""
    from PIL import Image

    folder = Path(folder)
    settings_file = folder / "gen.json"
    if not settings_file.is_file():
        raise FileNotFoundError(f"{settings_file} missing: {folder} is not an `eval/fid.py gen` output folder")
    settings = json.loads(settings_file.read_text())
    n, k = int(settings["num_samples"]), int(settings["num_classes"])
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"))
    if len(files) != n:
        raise ValueError(f"{folder} holds {len(files)} of its {n} samples: finish it with the same `eval/fid.py gen` command")
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.arange(n) // (n // k)  # eval/fid.py gen: label(i) = i // (N/K)
    return images, labels


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


__all__ = [
    "JudgeConfig", "Judge", "train_judge", "judge_outputs", "judge_report", "save_judge", "load_judge",
    "read_sample_folder", "METRIC_ACCURACY", "METRIC_FD",
]
