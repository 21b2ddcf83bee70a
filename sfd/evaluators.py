"""Quality measured during training: class-balanced samples of a model, scored by an evaluator.

``-o eval_every=N -o eval_samples=K`` makes the trainer call :func:`evaluate` every N steps on its
EMA weights. Sample i has label ⌊i / (K / classes)⌋ (the 50K protocol's balanced order) and noise
from (seed, i) alone, so the numbers of two evaluations differ only through the weights; rank r
samples indices r, r + W, …, the per-image features are summed into one zero-padded table over
the ranks, and rank 0 scores it. An evaluator (:data:`EVALUATORS`, ``-o eval_metric=``) turns
images into per-image feature rows and a table of rows into numbers:

- ``fid``: InceptionV3 pool features against ``eval_ref`` (an ``eval/fid.py ref`` .npz with
  ``mu``/``sigma``); the key is ``fid`` only with the verified Inception weights
  (``FD_<detector>`` otherwise, as everywhere in the project);
- ``judge`` (the CPU demo): the demo judge's accuracy on the conditioning labels and FD_judge
  against the judge features of the real images in ``eval_judge_ref``.

What this must never do is change training: it runs under ``torch.no_grad`` inside
``torch.random.fork_rng`` (no global RNG stream moves), on the EMA module, which is always in eval
mode and never compiled, and reads nothing the step reads.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfd.registry import Registry

__all__ = ["EVALUATORS", "Evaluator", "evaluate", "balanced_labels"]

#: ``TrainConfig.eval_metric``: what scores the samples of a periodic evaluation.
EVALUATORS: Registry[type[Evaluator]] = Registry("eval metric")


def balanced_labels(indices: list[int], n: int, num_classes: int) -> list[int]:
    """Label ⌊i / (n / K)⌋ of each index (n a multiple of K): the class-balanced protocol order."""
    per = n // num_classes
    return [i // per for i in indices]


class Evaluator(ABC):
    """Images → per-image feature rows (every rank) → metrics (rank 0). ``dim``: row width."""

    dim: int

    @staticmethod
    @abstractmethod
    def problems(cfg: Any) -> list[str]:
        """What is missing in the run config for this evaluator (checked before step 1)."""

    @abstractmethod
    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) → float64 (B, dim)."""

    @abstractmethod
    def score(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics of all samples' rows (in index order) with their conditioning labels."""


@EVALUATORS.register("fid")
class InceptionFD(Evaluator):
    """Fréchet distance of InceptionV3 pool features to a reference's (mu, sigma)."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        from sfd.models.inception import is_fid_detector, load_inception, random_inception

        self.device = device
        # "random": an untrained network, for tests and smoke runs; its name says it is not FID's.
        self.net = (random_inception(seed=0) if cfg.eval_inception == "random"
                    else load_inception(cfg.eval_inception or None, device=device)).to(device)
        self.key = "fid" if is_fid_detector(self.net) else f"FD_{self.net.detector_name.split(' (')[0]}"
        with np.load(cfg.eval_ref) as ref:  # plain arrays: np.load refuses pickles by default
            self.mu, self.sigma = ref["mu"], ref["sigma"]
        self.dim = int(self.mu.shape[0])

    @staticmethod
    def problems(cfg: Any) -> list[str]:
        if not cfg.eval_ref or not Path(cfg.eval_ref).is_file():
            return [f"eval_metric=fid needs eval_ref=FILE.npz (reference statistics from `eval/fid.py ref`); got {cfg.eval_ref!r}"]
        return []

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        out = self.net(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        return out.pool.double().cpu().numpy()

    def score(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from sfd.metrics import feature_stats, frechet_distance

        mu, sigma = feature_stats(rows)
        return {self.key: float(frechet_distance(mu, sigma, self.mu, self.sigma))}


@EVALUATORS.register("judge")
class DemoJudge(Evaluator):
    """The CPU demo's judge: class accuracy and FD_judge against real images' judge features."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        from sfd.demo.judge import judge_outputs, load_judge

        self.judge = load_judge(cfg.eval_judge)  # on the CPU, as the demo's evaluations run it
        self.dim = 1 + self.judge.cfg.feature_dim  # the predicted class, then the features
        self.ref = judge_outputs(self.judge, _read_images(Path(cfg.eval_judge_ref)))[1]

    @staticmethod
    def problems(cfg: Any) -> list[str]:
        out = []
        if not cfg.eval_judge or not Path(cfg.eval_judge).is_file():
            out.append(f"eval_metric=judge needs eval_judge=FILE (a demo judge .safetensors); got {cfg.eval_judge!r}")
        if not cfg.eval_judge_ref or not Path(cfg.eval_judge_ref).is_dir():
            out.append(f"eval_metric=judge needs eval_judge_ref=DIR (real images, e.g. the demo's held-out split); got {cfg.eval_judge_ref!r}")
        return out

    def features(self, images: np.ndarray) -> np.ndarray:
        from sfd.demo.judge import judge_outputs

        preds, feats = judge_outputs(self.judge, images)
        return np.concatenate([preds[:, None].astype(np.float64), feats], axis=1)

    def score(self, rows: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from sfd.demo.judge import METRIC_ACCURACY, METRIC_FD
        from sfd.metrics import feature_stats, frechet_distance

        mu, sigma = feature_stats(rows[:, 1:])
        mu_r, sigma_r = feature_stats(self.ref)
        return {
            METRIC_ACCURACY: float((rows[:, 0].round().astype(np.int64) == labels).mean()),
            METRIC_FD: float(frechet_distance(mu, sigma, mu_r, sigma_r)),
        }


def _read_images(folder: Path) -> np.ndarray:
    """Every image under ``folder`` (class subfolders or flat), sorted by path, as uint8 RGB."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and not p.name.startswith("."))
    if len(files) < 2:
        raise FileNotFoundError(2, f"fewer than 2 images under {folder}", str(folder))
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


@torch.no_grad()
def evaluate(
    model: nn.Module, evaluator: Evaluator, num_samples: int, sampling: Any, stats: Any, decoder: nn.Module,
    d: Any, batch_size: int = 64,
) -> dict[str, Any]:
    """Sample ``num_samples`` class-balanced images from ``model`` (eval mode) across the ranks of
    ``d`` and score them; every rank returns the record (metrics, seconds)."""
    from sfd.pixels import latents_to_images
    from sfd.samplers import generate_latents

    if model.training:
        raise ValueError("evaluate() samples an eval-mode model (the EMA); training mode drops labels")
    t0 = time.perf_counter()
    k = model.cfg.num_classes
    mine = list(range(d.rank, num_samples, d.world_size))
    table = torch.zeros(num_samples, evaluator.dim, dtype=torch.float64, device=d.device)
    devices = [d.device] if d.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the training streams stay where they were
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            latents, _ = generate_latents(model, balanced_labels(idx, num_samples, k), idx, sampling)
            images = latents_to_images(latents, stats, decoder, model.cfg.texture_chans).numpy()
            table[torch.tensor(idx, device=d.device)] = torch.from_numpy(evaluator.features(images)).to(d.device)
    d.sum(table)  # every row is non-zero on exactly one rank
    labels = np.asarray(balanced_labels(list(range(num_samples)), num_samples, k))
    record: dict[str, Any] = {}
    if d.is_main:
        record = evaluator.score(table.cpu().numpy(), labels)
    return record | {"num_samples": num_samples, "seconds": round(time.perf_counter() - t0, 3)}
