"""Tests for minildm/fid.py: the Fréchet distance, feature statistics, KID, PSNR, prompt accuracy, Wilson intervals."""

import copy
import math

import numpy as np
import pytest
import torch

from minildm.classifier import ClassifierConfig, SmallClassifier, train_classifier
from minildm.fid import (
    KIDResult,
    dataset_classifier,
    feature_statistics,
    fid,
    frechet_distance,
    kernel_inception_distance,
    kid,
    label_accuracy,
    proportion_ci,
    psnr,
)


def random_covariance(d: int, rank: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, rank))
    return a @ a.T / rank  # symmetric positive semi-definite, singular when rank < d


@pytest.fixture(scope="module")
def tiny_classifier() -> SmallClassifier:
    torch.manual_seed(0)
    names = [str(k) for k in range(10)]
    model = SmallClassifier(ClassifierConfig(width=4, feature_dim=8, class_names=names, pool_grid=8))
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    train_classifier(model, images, torch.arange(64) % 10, steps=3, batch_size=16, progress=False)
    return model


# ------------------------------------------------------------------------------------- Fréchet distance


def test_same_gaussian_is_zero():
    sigma = random_covariance(6, 6, seed=0)
    mu = np.arange(6.0)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    singular = random_covariance(6, 2, seed=1)  # fewer samples than features: the hard case for sqrtm
    assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_gaussians_match_closed_form():
    # Diagonal covariances commute, so (Σ1^½ Σ2 Σ1^½)^½ = diag(√(a b)) and d² = ||Δμ||² + Σ (√a - √b)².
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_computation(seed):
    # Independently: Tr((Σ1 Σ2)^½) = Σ √λ_i(Σ1 Σ2), with a general (non-symmetric) eigenvalue solver.
    d = 7
    s1, s2 = random_covariance(d, d + 3, seed), random_covariance(d, d + 1, seed + 100)
    mu1, mu2 = np.random.default_rng(seed).normal(size=(2, d))
    eigenvalues = np.linalg.eigvals(s1 @ s2)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues.real, 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_symmetric_and_non_negative(seed):
    s1, s2 = random_covariance(5, 3, seed), random_covariance(5, 8, seed + 1)
    mu1, mu2 = np.zeros(5), np.full(5, 0.1 * seed)
    forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    # Σ1 is singular: a zero eigenvalue is known only to ~1e-16, and its square root to ~1e-8 (√ε).
    assert forward == pytest.approx(backward, rel=1e-6)
    assert forward >= 0 and backward >= 0


def test_accepts_torch_and_rejects_bad_shapes():
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(torch.zeros(3), sigma, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
        frechet_distance(mu, sigma, mu, torch.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma * float("nan"), mu, sigma)


# ------------------------------------------------------------------------------------ features and FID


def test_layout_classifier_shapes(tiny_classifier):
    for side in (28, 32):
        features = tiny_classifier.features(torch.zeros(3, 1, side, side))
        assert features.shape == (3, 8) and tiny_classifier(torch.zeros(3, 1, side, side)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        tiny_classifier.features(torch.zeros(3, 3, 32, 32))


def test_feature_statistics_match_manual(tiny_classifier):
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    mu, sigma = feature_statistics(images, tiny_classifier, batch_size=7)
    with torch.no_grad():
        features = tiny_classifier.features(images).double().numpy()
    np.testing.assert_allclose(mu.numpy(), features.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(features, rowvar=False), rtol=1e-5, atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero(tiny_classifier):
    images = torch.rand(50, 1, 32, 32) * 2 - 1
    assert fid(images, images, tiny_classifier) == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(50, 1, 32, 32) * 2 - 1
    assert fid(images, -other.abs(), tiny_classifier) > fid(images, other, tiny_classifier)


def test_fid_input_errors(tiny_classifier):
    images = torch.rand(10, 1, 32, 32)
    with pytest.raises(ValueError, match="same \\(C, H, W\\)"):
        fid(images, torch.rand(10, 1, 8, 8), tiny_classifier)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid(images * 255, images, tiny_classifier)
    with pytest.raises(TypeError, match="floating-point tensor"):
        fid(images.to(torch.uint8), images, tiny_classifier)
    with pytest.raises(ValueError, match="at least 2"):
        fid(images[:1], images, tiny_classifier)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        fid(images.expand(10, 3, 32, 32), images, tiny_classifier)


def test_label_accuracy(tiny_classifier):
    images = torch.rand(30, 1, 32, 32) * 2 - 1
    predicted = tiny_classifier.predict(images)
    assert label_accuracy(images, predicted, tiny_classifier) == 1.0
    wrong = (predicted + 1) % 10
    wrong[:6] = predicted[:6]
    assert label_accuracy(images, wrong, tiny_classifier) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one per image"):
        label_accuracy(images, predicted[:5], tiny_classifier)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        label_accuracy(images, predicted + 10, tiny_classifier)


# ------------------------------------------------------------------------------------------------ PSNR


# ------------------------------------------------------------------------------------------------- KID


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²_u (Gretton et al. 2012, Lemma 6) with k(a, b) = (a·b / d + 1)³, written out as explicit sums."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(a, b):
        return (sum(a[c] * b[c] for c in range(d)) / d + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * between


@pytest.mark.parametrize("seed", range(3))
def test_kid_matches_the_unbiased_mmd_formula_written_as_loops(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(7, 3)), rng.normal(loc=0.5, size=(7, 3))
    # One subset holding every row is a permutation of the whole set, and MMD²_u ignores the order.
    result = kernel_inception_distance(x, y, subset_size=7, num_subsets=1)
    assert result.mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-10)
    assert result.std == 0.0


def test_kid_mean_of_subsets_equals_the_whole_set_estimate_on_average():
    # The average of MMD²_u over all subsets of size m is MMD²_u of the whole set (both are U-statistics),
    # so the mean over many random subsets comes within a few standard errors of the loops on all 40 rows.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(scale=1.3, size=(40, 5))
    whole = mmd2_by_loops(x, y)
    result = kernel_inception_distance(x, y, subset_size=20, num_subsets=2000)
    assert result.mean == pytest.approx(whole, abs=4 * result.std / math.sqrt(2000))


def test_kid_is_zero_on_average_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    same = kernel_inception_distance(real, rng.normal(size=(300, 16)))
    assert isinstance(same, KIDResult) and same.std > 0
    assert abs(same.mean) < 2 * same.std  # unbiased: no systematic positive value
    means = [kernel_inception_distance(real, rng.normal(loc=shift, size=(300, 16))).mean for shift in (0.2, 0.4, 0.8)]
    assert means[0] > 3 * same.std and means[0] < means[1] < means[2]


def test_kid_unbiased_where_fid_is_not():
    # Same distribution, small sets: the FID of the fitted Gaussians is far above 0, KID is not.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 16)), rng.normal(size=(100, 16))
    fitted = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    result = kernel_inception_distance(a, b)
    assert fitted > 1.0 and abs(result.mean) < 2 * result.std


def test_kid_is_seeded_and_the_default_subset_is_half():
    rng = np.random.default_rng(2)
    x, y = torch.from_numpy(rng.normal(size=(50, 4))), torch.from_numpy(rng.normal(size=(30, 4)))
    assert kernel_inception_distance(x, y, seed=3) == kernel_inception_distance(x, y, seed=3)
    assert kernel_inception_distance(x, y, seed=3) != kernel_inception_distance(x, y, seed=4)
    assert kernel_inception_distance(x, y) == kernel_inception_distance(x, y, subset_size=15)


def test_kid_errors():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="same width"):
        kernel_inception_distance(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        kernel_inception_distance(np.zeros(10), x)
    with pytest.raises(ValueError, match="at least 4 samples"):
        kernel_inception_distance(x, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="between 2 and the smaller set's size 10"):
        kernel_inception_distance(x, x, subset_size=11)
    with pytest.raises(ValueError, match="between 2"):
        kernel_inception_distance(x, x, subset_size=1)
    with pytest.raises(ValueError, match="num_subsets"):
        kernel_inception_distance(x, x, num_subsets=0)
    with pytest.raises(ValueError, match="NaN"):
        kernel_inception_distance(x * float("nan"), x)


def test_kid_on_images_uses_the_fid_features(tiny_classifier):
    images = torch.rand(40, 1, 32, 32) * 2 - 1
    other = torch.rand(40, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        real, generated = tiny_classifier.features(images).double(), tiny_classifier.features(other).double()
    scale = real.pow(2).mean().sqrt()  # one number from the real features: the kernel's dot products near 1
    expected = kernel_inception_distance(real / scale, generated / scale)
    result = kid(images, other, tiny_classifier)
    assert result.mean == pytest.approx(expected.mean, rel=1e-5, abs=1e-9)
    assert result.std == pytest.approx(expected.std, rel=1e-5, abs=1e-9)
    # The same classifier with its features scaled by 10 gives the same KID: the scale is divided out.
    scaled = copy.deepcopy(tiny_classifier)
    original_features = scaled.features
    scaled.features = lambda x: 10 * original_features(x)
    assert kid(images, other, scaled).mean == pytest.approx(result.mean, rel=1e-4, abs=1e-9)
    assert kid(images, -other.abs(), tiny_classifier).mean > result.mean + 2 * result.std
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        kid(images * 255, other, tiny_classifier)
    with pytest.raises(ValueError, match="same \\(C, H, W\\)"):
        kid(images, torch.rand(10, 1, 8, 8), tiny_classifier)


def test_psnr_by_hand():
    reference = torch.zeros(2, 1, 4, 4)
    reconstruction = reference.clone()
    reconstruction[0] += 0.1  # MSE 0.01 -> 10 log10(2² / 0.01) = 10 log10(400)
    reconstruction[1] += 0.2  # MSE 0.04 -> 10 log10(100) = 20
    expected = (10 * math.log10(400) + 20.0) / 2  # the mean of per-image values, not of the pooled MSE
    assert psnr(reference, reconstruction) == pytest.approx(expected, rel=1e-6)
    assert psnr(reference[:1], reconstruction[:1], data_range=1.0) == pytest.approx(20.0, rel=1e-6)
    assert psnr(reference, reference) == math.inf


def test_psnr_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(2, 3), torch.zeros(2, 3), data_range=0)


# ----------------------------------------------------------------------------------- saving and caching


def test_save_load_round_trip(tiny_classifier, tmp_path):
    tiny_classifier.save(tmp_path / "clf")
    loaded = SmallClassifier.load(tmp_path / "clf")
    images = torch.rand(20, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), tiny_classifier(images), rtol=0, atol=0)
    mu1, sigma1 = feature_statistics(images, tiny_classifier)
    mu2, sigma2 = feature_statistics(images, loaded)
    assert torch.equal(mu1, mu2) and torch.equal(sigma1, sigma2)


def test_dataset_classifier_reads_cache(tiny_classifier, tmp_path, monkeypatch):
    # A classifier already in the cache is loaded, not trained (root points nowhere, so training would fail).
    tiny_classifier.save(tmp_path / "explicit" / "mnist_32")
    loaded = dataset_classifier("mnist", root=tmp_path / "nowhere", cache_dir=tmp_path / "explicit")
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny_classifier(images))
    monkeypatch.setenv("MINILDM_CACHE", str(tmp_path / "env"))
    tiny_classifier.save(tmp_path / "env" / "classifiers" / "fashion_mnist_32")
    assert isinstance(dataset_classifier("fashion_mnist", root=tmp_path / "nowhere"), SmallClassifier)
    with pytest.raises(ValueError, match="name must be one of"):
        dataset_classifier("cifar10")


# ------------------------------------------------------------------------------ Wilson score interval


def wilson_by_quadratic(k: int, n: int, z: float) -> tuple[float, float]:
    """The two roots p of (k/n - p)² = z² p (1 - p) / n, Wilson's definition, by numpy's polynomial roots."""
    p_hat = k / n
    # (1 + z²/n) p² - (2 p̂ + z²/n) p + p̂² = 0
    roots = np.roots([1 + z**2 / n, -(2 * p_hat + z**2 / n), p_hat**2]).real
    return float(roots.min()), float(roots.max())


@pytest.mark.parametrize("k, n", [(1, 10), (5, 10), (49, 50), (81, 263), (300, 1000)])
def test_proportion_ci_solves_wilsons_quadratic(k, n):
    low, high = proportion_ci(k, n)
    expected = wilson_by_quadratic(k, n, z=1.959963984540054)  # the 97.5% normal quantile
    assert (low, high) == pytest.approx(expected, abs=1e-12)
    assert 0 < low < k / n < high < 1


def test_proportion_ci_known_values():
    # Published/hand-computed 95% Wilson intervals; 81 of 263 is the example of Newcombe (1998) and Wikipedia.
    assert proportion_ci(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert proportion_ci(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)
    # At 0/n the upper end is z²/(n + z²): 3.8415 / 13.8415 for n = 10.
    assert proportion_ci(0, 10) == (0.0, pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2)))
    low, high = proportion_ci(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + 1.959963984540054**2))


def test_proportion_ci_narrows_with_n_and_widens_with_confidence():
    widths = [np.subtract(*proportion_ci(n // 2, n)[::-1]) for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]
    assert np.subtract(*proportion_ci(50, 100, 0.99)[::-1]) > np.subtract(*proportion_ci(50, 100, 0.9)[::-1])
    assert proportion_ci(torch.tensor(7), 20.0) == proportion_ci(7, 20)  # whole numbers in any type


def test_proportion_ci_errors():
    with pytest.raises(ValueError, match="between 0 and n = 10"):
        proportion_ci(11, 10)
    with pytest.raises(ValueError, match="between 0 and n"):
        proportion_ci(-1, 10)
    with pytest.raises(ValueError, match="at least 1"):
        proportion_ci(0, 0)
    with pytest.raises(ValueError, match="confidence"):
        proportion_ci(5, 10, confidence=95)
    with pytest.raises(TypeError, match=r"round\(accuracy \* n\)"):
        proportion_ci(0.98, 100)  # an accuracy passed where the count goes
    with pytest.raises(TypeError, match="whole number"):
        proportion_ci(True, 10)

