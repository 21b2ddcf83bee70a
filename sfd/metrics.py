"""Sample-quality metrics as the ADM evaluator computes them (docs/method.md §8).

The paper's FID, sFID, IS, precision and recall come from OpenAI guided-diffusion's
``evaluations/evaluator.py`` run against ``VIRTUAL_imagenet256_labeled.npz``. This module holds
the maths only; features come from :mod:`sfd.models.inception`:

- FID  = Fréchet distance between Gaussians fitted to ``pool_3`` features (2048-d);
- sFID = the same distance on the spatial features (first 7 channels of ``mixed_6/conv``,
  17×17, flattened to 2023-d);
- IS   = exp(E_x KL(p(y|x) || p(y))) on sequential splits of 5,000 samples, averaged;
- precision / recall = the k-NN manifold estimate (k = 3) of Kynkäänniemi et al. on ``pool_3``
  features, with the evaluator's batching and float16-first distances.

Everything that accumulates (means, covariances, traces, KL sums) runs in float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.special import xlogy

ArrayLike = np.ndarray | torch.Tensor

# ADM evaluator constants.
IS_SPLIT_SIZE = 5000  # compute_inception_score(split_size=5000): 10 sequential splits for 50K
PR_NEIGHBOURHOOD = 3  # ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH_SIZE = 10000  # ManifoldEstimator(row_batch_size=10000, col_batch_size=10000)


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Fréchet distance (FID, sFID)
# ---------------------------------------------------------------------------------------------


def feature_stats(features: ArrayLike, chunk_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov(features, rowvar=False)``) in float64.

    The evaluator's ``compute_statistics``. The centred Gram matrix is accumulated in chunks so
    50K×2048 float32 features never need a second full float64 copy.
    """
    x = (
        features.detach().cpu().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features)
    )
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    num, dim = x.shape
    mu = np.zeros(dim, dtype=np.float64)
    for i in range(0, num, chunk_size):
        mu += x[i : i + chunk_size].astype(np.float64).sum(axis=0)
    mu /= num
    sigma = np.zeros((dim, dim), dtype=np.float64)
    for i in range(0, num, chunk_size):
        xc = x[i : i + chunk_size].astype(np.float64) - mu
        sigma += xc.T @ xc
    sigma /= num - 1
    return mu, sigma


def _drop_rounding_eigvals(eigvals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues indistinguishable from 0 (below n·eps·max, numpy's matrix_rank tol).

    For a singular covariance (N <= D) eigh returns its null space as values of size ±eps·max;
    their square roots (≈1e-8 each, hundreds of them) would otherwise add up to a visible bias.
    """
    tol = np.abs(eigvals).max(initial=0.0) * eigvals.size * np.finfo(np.float64).eps
    return np.where(eigvals > tol, eigvals, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root from ``eigh``."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(_drop_rounding_eigvals(eigvals))) @ eigvecs.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 − mu2||² + tr(S1) + tr(S2) − 2·tr((S1·S2)^½), in float64.

    tr((S1·S2)^½) is the sum of square roots of the eigenvalues of S1·S2, which are those of the
    symmetric PSD matrix M = S1^½·S2·S1^½ (S1·S2 = S1^½·(S1^½·S2) and (S1^½·S2)·S1^½ share their
    spectrum). So we take S1^½ from ``eigh``, the eigenvalues of M from ``eigvalsh``, zero those
    at rounding level (negative or below n·eps·max; see :func:`_drop_rounding_eigvals`), and sum
    their square roots. Unlike ``scipy.linalg.sqrtm(S1 @ S2)`` (what the evaluator calls) this
    never iterates on a non-symmetric, near-singular matrix — N < D covariances or a set against
    itself are fine — and has no complex part to discard. On well-conditioned inputs both agree
    to rounding (2048-d, N = 6000: within 1e-11 of sqrtm's value, 3× faster).
    """
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if (
        mu1.shape != mu2.shape
        or sigma1.shape != sigma2.shape
        or sigma1.shape != (mu1.size, mu1.size)
    ):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    # Symmetrise: covariances read from files carry asymmetric rounding, which eigh would ignore.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    sqrt_sigma1 = _sqrt_psd(sigma1)
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eig_m = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(_drop_rounding_eigvals(eig_m)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # A squared 2-Wasserstein distance is >= 0; only rounding can push it below (≈1e-10 scale).
    return max(fd, 0.0)


def frechet_distance_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


# ---------------------------------------------------------------------------------------------
# Inception score
# ---------------------------------------------------------------------------------------------


def inception_score(probs: ArrayLike, split_size: int = IS_SPLIT_SIZE) -> float:
    """The ADM evaluator's IS: mean over sequential splits of exp(mean_x KL(p(y|x) || p_split(y))).

    ``probs`` (N, 1008) are the evaluator's class probabilities: softmax over all 1008 outputs of
    pool_3 @ W *without* the fc bias (it rebuilds the softmax from ``softmax/logits/MatMul``'s
    weight only) — ``InceptionOutputs.probs``. Splits are consecutive blocks of ``split_size``
    rows (the last one may be shorter), not a ``num_splits`` partition: for 50K samples that is
    10 splits of 5,000, and it is why the sample order must be shuffled (docs/method.md §8).

    Differences from the evaluator, both below its own float32 noise: float64 arithmetic, and
    0·log 0 = 0 where it would produce NaN for an exactly-zero probability.
    """
    p = _as_float64(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, classes), got shape {p.shape}")
    row_sums = p.sum(axis=1)
    if (p < 0).any() or not np.allclose(row_sums, 1.0, atol=1e-3):
        raise ValueError(
            "inception_score expects probabilities (rows >= 0 summing to 1); got row sums in "
            f"[{row_sums.min():.4g}, {row_sums.max():.4g}] — pass softmax outputs, not logits"
        )
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = xlogy(part, part) - xlogy(part, marginal)  # p·(log p − log p̄), with 0·log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------------

DistanceDType = Literal["float16", "float32", "float64"]


def _squared_distances(u: torch.Tensor, v: torch.Tensor, dtype: DistanceDType) -> torch.Tensor:
    """Pairwise squared Euclidean distances max(|u|² − 2u·v + |v|², 0): float32, or float64.

    "float16" reproduces the evaluator's DistanceBlock: the block is computed in half precision
    and recomputed in float32 only if any entry overflowed; ties at the radius therefore round as
    the evaluator's do (bitwise equality with TensorFlow's kernels is not guaranteed).
    """
    if dtype == "float16":
        d = _squared_distances_in(u.half(), v.half())
        if torch.isfinite(d).all():
            return d.float()
        dtype = "float32"
    return _squared_distances_in(u.to(getattr(torch, dtype)), v.to(getattr(torch, dtype)))


def _squared_distances_in(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(dim=1, keepdim=True)  # (Nu, 1)
    norm_v = (v * v).sum(dim=1, keepdim=True).T  # (1, Nv)
    # Same association as the evaluator: (|u|² − 2u·v) + |v|².
    return torch.clamp(norm_u - 2 * (u @ v.T) + norm_v, min=0)


def _to_device(
    x: ArrayLike, device: torch.device | str | None, distance_dtype: DistanceDType
) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    # The evaluator feeds float32 features; float64 is kept only for exact reference checks.
    dtype = torch.float64 if distance_dtype == "float64" else torch.float32
    return t.to(device=device if device is not None else t.device, dtype=dtype)


def manifold_radii(
    features: ArrayLike,
    k: int = PR_NEIGHBOURHOOD,
    *,
    batch_size: int = PR_BATCH_SIZE,
    distance_dtype: DistanceDType = "float16",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set, (N,).

    As the evaluator: the k-th entry (0-based) of the sorted distance row, which includes the
    point itself at distance 0, i.e. the k-th neighbour excluding self. The row is never held
    whole: a running top-(k+1) smallest is merged block by block, so memory is batch_size².
    Float32 (the evaluator stores radii in float32), float64 for ``distance_dtype="float64"``.
    """
    x = _to_device(features, device, distance_dtype)
    num = x.shape[0]
    if num <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {num}")
    out_dtype = torch.float64 if distance_dtype == "float64" else torch.float32
    radii = torch.empty(num, dtype=out_dtype, device=x.device)
    for r0 in range(0, num, batch_size):
        rows = x[r0 : r0 + batch_size]
        best = None  # (rows, <= k+1) smallest distances seen so far
        for c0 in range(0, num, batch_size):
            d = _squared_distances(rows, x[c0 : c0 + batch_size], distance_dtype)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + batch_size] = best[:, k]
    return radii


def precision_recall(
    ref_features: ArrayLike,
    sample_features: ArrayLike,
    k: int = PR_NEIGHBOURHOOD,
    *,
    batch_size: int = PR_BATCH_SIZE,
    distance_dtype: DistanceDType = "float16",
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """(precision, recall) by k-NN manifolds, as the ADM evaluator's ``compute_prec_recall``.

    precision = fraction of samples inside the reference manifold (some reference point i with
    d(ref_i, sample) <= radius_i); recall = fraction of reference points inside the sample
    manifold. Distances are squared Euclidean on pool_3 features; radii come from
    :func:`manifold_radii` of each set; the comparison is ``<=``. Works in
    ``batch_size × batch_size`` blocks on ``device`` (default: where the features are).
    """
    ref = _to_device(ref_features, device, distance_dtype)
    sample = _to_device(sample_features, device, distance_dtype)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature widths differ: ref {ref.shape[1]} vs sample {sample.shape[1]}")
    kw = dict(batch_size=batch_size, distance_dtype=distance_dtype)
    radii_ref = manifold_radii(ref, k, **kw)
    radii_sample = manifold_radii(sample, k, **kw)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(sample.shape[0], dtype=torch.bool, device=ref.device)
    for r0 in range(0, ref.shape[0], batch_size):
        r1 = r0 + batch_size
        for c0 in range(0, sample.shape[0], batch_size):
            c1 = c0 + batch_size
            d = _squared_distances(ref[r0:r1], sample[c0:c1], distance_dtype)  # (refs, samples)
            ref_in[r0:r1] |= (d <= radii_sample[None, c0:c1]).any(dim=1)
            sample_in[c0:c1] |= (d <= radii_ref[r0:r1, None]).any(dim=0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
