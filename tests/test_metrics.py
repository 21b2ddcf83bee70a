"""FID/sFID, IS and precision/recall maths against references with known answers (docs/method.md §8)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sfd.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    manifold_radii,
    precision_recall,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gaussian_features(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def test_feature_stats_match_numpy_cov() -> None:
    x = _gaussian_features(np.random.default_rng(0), 203, 11).astype(np.float32)
    mu, sigma = feature_stats(x, chunk_size=17)  # several chunks, the last one partial
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    mu_t, sigma_t = feature_stats(torch.from_numpy(x))
    np.testing.assert_allclose(sigma_t, sigma, rtol=1e-10, atol=1e-12)


def test_frechet_matches_scipy_sqrtm_when_well_conditioned() -> None:
    rng = np.random.default_rng(1)
    mu1, s1 = feature_stats(_gaussian_features(rng, 400, 8))
    mu2, s2 = feature_stats(_gaussian_features(rng, 300, 8, shift=0.3))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(
        (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Symmetric in its two arguments, like the 2-Wasserstein distance it is.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, d", [(500, 64), (20, 64)])  # full-rank and rank-deficient (N < D)
def test_frechet_of_a_set_against_itself_is_zero(n: int, d: int) -> None:
    x = _gaussian_features(np.random.default_rng(3), n, d).astype(np.float32)
    assert 0.0 <= frechet_distance_from_features(x, x) < 1e-6


def test_frechet_rank_deficient_matches_exact_low_rank_value() -> None:
    # N < D: both covariances are singular, where sqrtm(S1 @ S2) iterates on a defective matrix.
    # Exact reference: with centred data A (n×D), B (m×D), S1 = AᵀA/(n−1), S2 = BᵀB/(m−1), the
    # eigenvalues of S1·S2 are the squared singular values of A·Bᵀ/√((n−1)(m−1)), so
    # tr((S1·S2)^½) is that matrix's nuclear norm.
    rng = np.random.default_rng(4)
    a = _gaussian_features(rng, 30, 128)
    b = _gaussian_features(rng, 25, 128, shift=0.1)
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    ac, bc = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(
        ac @ bc.T / np.sqrt((len(a) - 1) * (len(b) - 1)), compute_uv=False
    ).sum()
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got >= 0
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_rejects_mismatched_statistics() -> None:
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Inception score
# ---------------------------------------------------------------------------------------------


def _onehot(classes: list[int], num_classes: int = 1008) -> np.ndarray:
    p = np.zeros((len(classes), num_classes))
    p[np.arange(len(classes)), classes] = 1.0
    return p


def test_inception_score_uniform_is_one() -> None:
    assert inception_score(np.full((30, 1008), 1 / 1008), split_size=10) == pytest.approx(
        1.0, abs=1e-12
    )


def test_inception_score_onehot_counts_classes_per_split() -> None:
    # Split 1: 5 distinct classes, each twice → IS 5. Split 2: 2 classes → IS 2. Mean over
    # splits (not the IS of the pooled set, which would be 7): 3.5.
    split1 = [0, 1, 2, 3, 4] * 2
    split2 = [7, 8] * 5
    p = _onehot(split1 + split2)
    assert inception_score(p[:10], split_size=10) == pytest.approx(5.0, rel=1e-12)
    assert inception_score(p, split_size=10) == pytest.approx(3.5, rel=1e-12)
    # The splits are sequential blocks: interleaving the same rows changes the score.
    assert inception_score(np.concatenate([p[::2], p[1::2]]), split_size=10) != pytest.approx(3.5)


def test_inception_score_matches_evaluator_formula_with_partial_last_split() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(25, 1008)) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for i in range(0, 25, 10):  # splits of 10, 10 and 5 rows
        part = probs[i : i + 10]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert inception_score(probs, split_size=10) == pytest.approx(float(np.mean(scores)), rel=1e-12)
    assert inception_score(torch.from_numpy(probs).float(), split_size=10) == pytest.approx(
        np.mean(scores), rel=1e-5
    )


def test_inception_score_rejects_logits() -> None:
    with pytest.raises(ValueError, match="not logits"):
        inception_score(np.random.default_rng(6).normal(size=(10, 1008)), split_size=5)


# ---------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------


def _brute_force_pr(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Definition, in float64 with explicit differences: k-NN radii including self at 0."""

    def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    radii_ref = np.sort(sqdist(ref, ref), axis=1)[:, k]
    radii_sample = np.sort(sqdist(sample, sample), axis=1)[:, k]
    d = sqdist(ref, sample)
    precision = (d <= radii_ref[:, None]).any(axis=0).mean()
    recall = (d <= radii_sample[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_manifold_radii_hand_example() -> None:
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # k=1: squared distance to the nearest other point; k=3: to the third nearest.
    np.testing.assert_array_equal(
        manifold_radii(x, k=1, distance_dtype="float64").numpy(), [1, 1, 4, 9, 16]
    )
    np.testing.assert_array_equal(
        manifold_radii(x, k=3, distance_dtype="float64").numpy(), [36, 25, 9, 25, 81]
    )
    # Blocks smaller than k+1 columns still find the right neighbours.
    np.testing.assert_array_equal(
        manifold_radii(x, k=3, batch_size=2, distance_dtype="float64").numpy(), [36, 25, 9, 25, 81]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_precision_recall_matches_brute_force(device: str) -> None:
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(300, 16))
    sample = rng.normal(size=(260, 16)) + 0.6
    expected = _brute_force_pr(ref, sample)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case that can fail
    for dtype in ("float64", "float32"):
        for batch_size in (37, 10000):  # blocked and single-block paths agree
            got = precision_recall(
                ref, sample, batch_size=batch_size, distance_dtype=dtype, device=device
            )
            assert got == pytest.approx(expected, abs=1e-12), (dtype, batch_size)
    # The evaluator's float16 distances move only points within rounding of a radius.
    got16 = precision_recall(ref, sample, batch_size=64, device=device)
    assert got16 == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_precision_recall_identical_and_disjoint_sets(dtype: str) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(120, 32)).astype(np.float32)
    assert precision_recall(x, x.copy(), batch_size=50, distance_dtype=dtype) == (1.0, 1.0)
    far = x + 100.0
    assert precision_recall(x, far, batch_size=50, distance_dtype=dtype) == (0.0, 0.0)


def test_precision_recall_float16_overflow_falls_back_to_float32() -> None:
    # Norms of ~1e6 overflow float16 (max 65504): the evaluator then recomputes the block in
    # float32, and so must we — otherwise every distance would be inf or NaN.
    rng = np.random.default_rng(9)
    ref = rng.normal(size=(150, 8)) * 300.0
    sample = rng.normal(size=(140, 8)) * 360.0 + 100.0
    expected = _brute_force_pr(ref, sample)
    assert precision_recall(ref, sample, batch_size=64, distance_dtype="float16") == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_precision_counts_a_sample_exactly_on_a_radius(dtype: str) -> None:
    # k=1 reference radii (squared) are [1, 1, 4, 9, 16]; the sample at −1 lies at squared
    # distance exactly 1 from the point 0 and outside every other ball: the evaluator's `<=`
    # counts it. The far samples are outside all reference balls, while −1's own ball (radius
    # 441, to its neighbour 20) covers every reference point.
    ref = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    sample = np.array([[-1.0], [20.0], [21.0], [23.0]])
    assert precision_recall(ref, sample, k=1, distance_dtype=dtype) == (0.25, 1.0)
