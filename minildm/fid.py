"""Quality metrics for samples of the real datasets: domain FID and KID, PSNR, prompt accuracy and its interval.

FID (Heusel et al. 2017, arXiv:1706.08500) fits a Gaussian to the features of real images and one to
the features of generated images, and measures the Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2):

    d² = ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½)

KID (Bińkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401) is the squared maximum mean
discrepancy between the two sets of features, with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³,
estimated without bias (Gretton et al. 2012, "A Kernel Two-Sample Test", JMLR 13, Lemma 6):

    MMD²_u = 1/(m(m-1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i, y_j) - 2/(mn) Σ_{i,j} k(x_i, y_j)

Which to use. FID needs the covariance of the 64-dimensional features, so it wants a few thousand images
per set, and its expected value falls as the sets grow: two FIDs are only comparable at the same number
of images. KID has no such bias: its expected value is the same for 200 images as for 20000, it is 0 on
average for two samples of one distribution (and can come out slightly negative), and it comes with
a standard deviation, so a few hundred samples give a number with an honest error bar. Use KID when
samples are expensive (a CPU sampler, a quick comparison); report FID to compare with a longer run.

    symbol   code                 meaning
    x_i, y_j features_a, _b rows  classifier features of one real / one generated image, (d,) each
    d        features.shape[1]    feature width (64 for `dataset_classifier`)
    m, n     subset_size          images per subset from each set (KID uses equal sizes)

The features come from a classifier trained on the dataset itself ("domain FID"), not from
Inception-v3; `fid` says why. `dataset_classifier` trains that classifier once and caches it:

    image (B, 1, 32, 32) -> SmallClassifier convolutions -> (B, 2w, 8, 8) -> flatten -> linear -> features (B, F)

Depends on classifier.py, atomic.py, data.py and mnist.py.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import torch

from .atomic import atomic_write_json
from .checks import check_images
from .classifier import ClassifierConfig, SmallClassifier, train_classifier
from .data import cache_root
from .mnist import FASHION_MNIST_CLASS_NAMES, MNIST_CLASS_NAMES, load_fashion_mnist, load_mnist

DATASET_LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist}
DATASET_CLASS_NAMES = {"mnist": MNIST_CLASS_NAMES, "fashion_mnist": FASHION_MNIST_CLASS_NAMES}
DEFAULT_STEPS = {"mnist": 2000, "fashion_mnist": 3000}  # batches of 128; results in `dataset_classifier`


def dataset_classifier(
    name: str = "mnist",
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    size: int = 32,
    progress: bool = True,
) -> SmallClassifier:
    """The classifier behind the domain FID of `name` ("mnist" or "fashion_mnist"), trained once.

    Loaded from <cache_dir>/<name>_<size>/ (cache_dir defaults to $MINILDM_CACHE/classifiers or
    ~/.cache/minildm/classifiers) if it is there; otherwise trained on the train split, evaluated on the
    test split, and saved there, with its test accuracy and training time in training.json. `steps` only
    matters when training; delete the folder to train again. `root` is passed on to the data loader.

    A `SmallClassifier` with an 8x8 pooling grid (see classifier.py) and width 16 instead of the default
    32: five times faster to train, and a 64-dimensional feature space, whose covariance is estimated
    well from a few thousand samples.
    Measured (32x32, default steps, one thread of a shared 2-core machine): MNIST 99.2% test accuracy
    in 160 s, Fashion-MNIST 91.9% in 250 s.
    """
    if name not in DATASET_LOADERS:
        raise ValueError(f"name must be one of {sorted(DATASET_LOADERS)}, got {name!r}")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "classifiers"
    folder = folder / f"{name}_{size}"
    if (folder / "classifier.json").is_file() and (folder / "classifier.safetensors").is_file():
        return SmallClassifier.load(folder)

    steps = steps if steps is not None else DEFAULT_STEPS[name]
    train = DATASET_LOADERS[name]("train", root=root, size=size, progress=progress)
    test = DATASET_LOADERS[name]("test", root=root, size=size, progress=progress)
    config = ClassifierConfig(width=16, feature_dim=64, class_names=list(DATASET_CLASS_NAMES[name]), pool_grid=8)
    model = SmallClassifier(config)
    start = time.perf_counter()
    train_classifier(model, train.images, train.labels, steps=steps, progress=progress)
    seconds = time.perf_counter() - start
    accuracy = model.accuracy(test.images, test.labels)
    model.save(folder)
    report = {"dataset": name, "size": size, "steps": steps, "test_accuracy": accuracy, "seconds": seconds}
    atomic_write_json(folder / "training.json", report)
    if progress:
        print(f"{name} classifier: test accuracy {accuracy:.2%} after {steps} steps ({seconds:.0f} s), in {folder}")
    return model


def _as_float64(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return x


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: V diag(√λ) Vᵀ."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Rounding can make a zero eigenvalue -1e-17; its square root would be NaN. Clamp it to zero.
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), for mu (d,) and sigma (d, d).

        d² = ||μ1 - μ2||² + Tr(Σ1) + Tr(Σ2) - 2 Tr((Σ1^½ Σ2 Σ1^½)^½)

    Why this form: the usual code takes scipy's sqrtm(Σ1 Σ2). Σ1 Σ2 is not symmetric, so its square root
    is computed by a general (Schur) method that can return complex numbers and is unstable when the
    covariances are near-singular, as they are when there are fewer samples than features. Σ1^½ Σ2 Σ1^½
    has the same eigenvalues as Σ1 Σ2 (they are BA and AB for A = Σ1^½, B = Σ1^½ Σ2) but is symmetric
    positive semi-definite, so a symmetric eigendecomposition, which is backward stable and has real
    eigenvalues, gives both square roots; Tr(M^½) is simply Σ √λ_i(M). All in float64, with
    rounding-level negative eigenvalues set to 0.
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1 and mu2 must be vectors of the same length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}"
        )
    d = mu1.shape[0]
    for what, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{what} must have shape ({d}, {d}) to match the means, got {tuple(sigma.shape)}")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2  # symmetric up to rounding anyway
    sqrt_sigma1 = _sqrtm_psd(sigma1)  # Σ1^½
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # Σ1^½ Σ2 Σ1^½
    middle = (middle + middle.T) / 2
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()  # Tr((Σ1^½ Σ2 Σ1^½)^½)
    diff = mu1 - mu2
    distance = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # the true value is >= 0; rounding can give -1e-13


def _check_images(images, classifier: SmallClassifier, what: str, min_count: int = 1) -> None:
    check_images(images, what, classifier.config.in_channels)  # a float tensor (N, C, H, W), in [-1, 1]
    if len(images) < min_count:
        raise ValueError(f"{what} must hold at least {min_count} images, got {len(images)}")
    low, high = images.min().item(), images.max().item()
    if low < -1.5 or high > 1.5:  # some slack for unclamped samples; [0, 255] is a mistake
        raise ValueError(
            f"{what} must be in [-1, 1] like the training data, got values in [{low:.3g}, {high:.3g}]; "
            f"clamp samples with .clamp(-1, 1), convert uint8 pixels with x / 127.5 - 1"
        )


def _check_pair(real_images, generated_images, classifier: SmallClassifier) -> None:
    _check_images(real_images, classifier, "real_images", min_count=2)
    _check_images(generated_images, classifier, "generated_images", min_count=2)
    if real_images.shape[1:] != generated_images.shape[1:]:
        raise ValueError(
            f"real and generated images must have the same (C, H, W), got {tuple(real_images.shape[1:])} "
            f"and {tuple(generated_images.shape[1:])}"
        )


@torch.no_grad()
def _features(images: torch.Tensor, classifier: SmallClassifier, batch_size: int) -> torch.Tensor:
    """`classifier.features` of images (N, C, H, W), in batches, in eval mode: (N, F) float64 on the CPU."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    features = torch.cat(
        [classifier.features(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    ).double()  # (N, F)
    classifier.train(was_training)
    return features


def feature_statistics(images: torch.Tensor, classifier: SmallClassifier, batch_size: int = 256):
    """Mean (F,) and covariance (F, F), float64, of `classifier.features` over images (N, C, H, W)."""
    _check_images(images, classifier, "images", min_count=2)
    features = _features(images, classifier, batch_size)  # (N, F)
    return features.mean(dim=0), torch.cov(features.T)  # (F,), (F, F) with the unbiased 1 / (N - 1)


def fid(real_images: torch.Tensor, generated_images: torch.Tensor, classifier: SmallClassifier) -> float:
    """Domain FID: the Fréchet distance between real and generated images in `classifier`'s features.

    Why not Inception-v3, the network of the published FID numbers: its weights cannot be downloaded
    here, and an ImageNet network sees 28x28 grayscale digits, upsampled to 299x299, as nothing like its
    training data, so its features say little about them. A small classifier trained on the dataset
    itself measures what matters there (is it a recognisable seven, with the right stroke variety).

    The numbers are only comparable within one classifier (same weights, same image size), and FID is
    biased upward for few samples: compare models with the same number of images (a few thousand).
    Take a random subset of the real images: the MNIST test set is ordered (its first and last 5000
    come from different writers, FID 74 between them, against 4 between two random halves).
    """
    _check_pair(real_images, generated_images, classifier)
    mu1, sigma1 = feature_statistics(real_images, classifier)
    mu2, sigma2 = feature_statistics(generated_images, classifier)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


class KIDResult(NamedTuple):
    """A KID estimate: `mean`, the average MMD²_u over random subsets, and `std`, their standard deviation."""

    mean: float
    std: float


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for every pair of rows of x (m, d) and y (n, d): (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD²_u of the module docstring (Gretton et al. 2012, Lemma 6) for x (m, d), y (n, d), m, n >= 2."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    # Σ_{i≠j}: the full sum less the diagonal, the k(x_i, x_i) terms that make the plain mean biased.
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.sum() / (m * n)


def kernel_inception_distance(
    features_a,
    features_b,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
) -> KIDResult:
    """KID between two sets of features (N_a, d) and (N_b, d): MMD²_u, cubic kernel, averaged over subsets.

    Each of `num_subsets` rounds draws `subset_size` rows from each set (without replacement, seeded by
    `seed`, so a call is reproducible) and computes MMD²_u on them (module docstring). Returns the
    mean and the (population) standard deviation of those values, in squared feature units, as
    torch-fidelity does. The mean is unbiased at any size: it is about 0 (positive or negative) for two
    samples of one distribution, and positive otherwise.

    subset_size defaults to min(1000, N_a // 2, N_b // 2). torch-fidelity and clean-fid use 1000 (and
    clean-fid the whole set when it is smaller), but subsets that hold the whole set are all the same
    set, and their standard deviation is 0, however uncertain the estimate. Subsets of half the data
    vary about as much as a whole-set estimate does from one draw of the data to the next. Measured on
    Gaussian features (d = 64, N = 300, 60 draws): the std of half-size subsets was 1.0-1.2x the spread
    of the whole-set estimate when the distributions differed, and 1.8x (on the safe side) when they
    were the same; so `mean ± 2 std` is a fair error bar. Passing subset_size = N is allowed (std 0).
    Time: about 6 s for 100 subsets of 1000 (64-dim features, one CPU thread), 0.2 s for 500 samples.

    Raises ValueError for inputs that are not (N, d) with the same d, that contain NaN or infinity, for
    fewer than 4 rows (2 per half-size subset) when subset_size is None, and for a subset_size outside
    [2, min(N_a, N_b)] or num_subsets < 1.
    """
    x, y = _as_float64(features_a, "features_a"), _as_float64(features_b, "features_b")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"features_a and features_b must be (N, d) with the same width d, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    smaller = min(len(x), len(y))
    if subset_size is None:
        if smaller < 4:
            raise ValueError(
                f"KID needs at least 4 samples in each set (subsets of half of them, at least 2 each), got "
                f"{len(x)} and {len(y)}"
            )
        subset_size = min(1000, smaller // 2)
    if not isinstance(subset_size, int) or not 2 <= subset_size <= smaller:
        raise ValueError(
            f"subset_size must be an integer between 2 and the smaller set's size {smaller}, got {subset_size!r}"
        )
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        rows_x = torch.randperm(len(x), generator=generator)[:subset_size]
        rows_y = torch.randperm(len(y), generator=generator)[:subset_size]
        values[i] = _mmd2_unbiased(x[rows_x], y[rows_y])
    return KIDResult(mean=values.mean().item(), std=values.std(correction=0).item())


def kid(
    real_images: torch.Tensor,
    generated_images: torch.Tensor,
    classifier: SmallClassifier,
    subset_size: int | None = None,
    num_subsets: int = 100,
    seed: int = 0,
) -> KIDResult:
    """Domain KID: `kernel_inception_distance` between real and generated images in `classifier`'s features.

    The same features as `fid` (images (N, C, H, W) in [-1, 1]), both sets divided by one number: the root
    mean square of the real features, s = sqrt(mean(x²)). The cubic kernel (xᵀy / d + 1)³ was made for
    Inception features, where xᵀy / d is below 1; the classifier's features are tens (measured on MNIST:
    RMS 8.4), which puts k in the hundreds of thousands and KID in the millions, with the same error bars
    relative to the mean. Divided by s, xᵀx / d is 1 on average over the real set; the scale comes from the
    real images alone, so every model is scored on the same kernel. The mean is unbiased, so a few hundred
    images per set are enough to see a large difference: measured on 200 MNIST test digits against 2000
    others, 0.025 ± 0.053 for real digits, 0.33 ± 0.10 for digits 0-4 only. Like FID, values are only
    comparable within one classifier; report them as they are or times 1000, saying which.
    Raises the errors of `fid` and of `kernel_inception_distance`.
    """
    _check_pair(real_images, generated_images, classifier)
    real_features = _features(real_images, classifier, batch_size=256)  # (N_real, F)
    generated_features = _features(generated_images, classifier, batch_size=256)  # (N_generated, F)
    scale = real_features.pow(2).mean().sqrt().clamp_min(1e-12)  # s: one number, from the real set
    return kernel_inception_distance(real_features / scale, generated_features / scale, subset_size, num_subsets,
                                     seed)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and then averaged over the batch.

    PSNR_i = 10 log10(R² / MSE_i), where R = data_range is max - min of the pixel range (2 for [-1, 1]).
    The first dimension is the batch: pass one image as (1, C, H, W). Averaging per-image values (not the
    PSNR of the pooled MSE) weighs every image equally. An exact copy gives inf.
    """
    reference, reconstruction = torch.as_tensor(reference), torch.as_tensor(reconstruction)
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"shapes differ: reference {tuple(reference.shape)}, reconstruction {tuple(reconstruction.shape)}"
        )
    if reference.ndim < 2 or len(reference) == 0:
        raise ValueError(f"expected a batch (N, ...) with N >= 1, got shape {tuple(reference.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    squared_error = (reference.double() - reconstruction.double()).pow(2)
    mse = squared_error.flatten(1).mean(dim=1)  # (N, ...) -> (N,)
    return (10 * torch.log10(data_range**2 / mse)).mean().item()


def label_accuracy(images: torch.Tensor, labels, classifier: SmallClassifier) -> float:
    """Prompt accuracy: the fraction of images that `classifier` reads as the label they were prompted with.

    E.g. generate 100 samples for "a handwritten digit k" for every k and pass labels k.
    """
    _check_images(images, classifier, "images")
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"expected labels of shape ({len(images)},), one per image, got {tuple(labels.shape)}")
    num_classes = classifier.config.num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    device = next(classifier.parameters()).device
    return classifier.accuracy(images.to(device), labels.to(device))


def _count(value, what: str) -> int:
    """`value` as an int if it is a whole number (int, integral float, 0-d tensor); TypeError otherwise."""
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise TypeError(
            f"{what} must be a whole number of images, got {value!r}; from an accuracy, pass round(accuracy * n)"
        )
    return int(value)


def proportion_ci(successes, n, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927, JASA 22:209) for a proportion: `successes` out of `n`.

    With p̂ = successes / n and z the two-sided normal quantile of `confidence` (1.96 for 0.95), the
    interval holds every p for which p̂ lies within z standard errors of p, (p̂ - p)² = z² p (1 - p) / n:

        (p̂ + z²/(2n) ± z sqrt(p̂ (1 - p̂) / n + z²/(4n²))) / (1 + z²/n)

    Unlike p̂ ± z sqrt(p̂ (1 - p̂) / n), it stays inside [0, 1], is not zero-width at 0/n or n/n (0 of 10
    gives [0, 0.28] at 95%), and covers the true p about as often as it says, even for small n.
    Use it with `label_accuracy`: 49 of 50 right is (0.895, 0.996), 98 of 100 is (0.930, 0.994).

    Returns (low, high), floats in [0, 1]. Raises TypeError for counts that are not whole numbers, and
    ValueError for n < 1, successes outside [0, n], or confidence outside (0, 1).
    """
    successes, n = _count(successes, "successes"), _count(n, "n")
    if n < 1:
        raise ValueError(f"n must be at least 1 (the number of images scored), got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n = {n}, got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)  # 1.96 for 0.95
    p_hat = successes / n
    center = (p_hat + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z * math.sqrt(p_hat * (1 - p_hat) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    # At 0/n and n/n one end is exactly 0 or 1; rounding would leave it 1e-17 off.
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == n else min(1.0, center + half_width)
    return low, high
