"""Distances (SWD, MMD, Fréchet) against closed forms and NumPy/SciPy oracles; the shipped digits classifier."""

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from configs import digits
from ddpm_jax import generation
from ddpm_jax.config import sample_metrics_problem
from ddpm_jax.metrics import digits_classifier, distances


def test_swd_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 3))
    assert distances.sliced_wasserstein(x, x, 0) == pytest.approx(0.0, abs=1e-6)


def test_swd_one_dimensional_shift_is_exact():
    # In 1-D every direction is +-1, so SW_2 between x and x + m is |m| exactly.
    x = np.random.default_rng(1).normal(size=(800, 1))
    assert distances.sliced_wasserstein(x, x + 0.7, 0, num_projections=16) == pytest.approx(0.7, rel=1e-5)


def test_swd_unequal_sizes_is_exact_w2_between_empirical_distributions():
    # Oracle: x repeated m times and y repeated n times are sets of n m points with the same empirical
    # distributions, whose W_2 pairs sorted points (float64). In 1-D every direction is +-1, so SW_2 is W_2.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 1)), rng.normal(0.3, 2.0, size=(12, 1))
    expected = np.sqrt(np.mean((np.sort(np.repeat(x, 12, 0), 0) - np.sort(np.repeat(y, 7, 0), 0)) ** 2))
    assert distances.sliced_wasserstein(x, y, 0, num_projections=4) == pytest.approx(expected, rel=1e-5)
    # In 2-D, points on the x-axis project to u_1 x: SW_2 = W_2 sqrt(E u_1^2) = W_2 / sqrt(2) (not W_2 E|u_1|,
    # 10% less); 4096 directions, Monte-Carlo relative std about 1.1%, tolerance 4%.
    on_axis = lambda points: np.concatenate([points, np.zeros_like(points)], axis=1)  # noqa: E731
    assert distances.sliced_wasserstein(on_axis(x), on_axis(y), 1, num_projections=4096) == pytest.approx(
        expected / np.sqrt(2), rel=0.04)
    # One distribution at two sizes is at distance 0 in any dimension (linear interpolation gave 0.011 here).
    points = rng.normal(size=(500, 2))
    assert distances.sliced_wasserstein(points, np.repeat(points, 2, 0), 0) == pytest.approx(0.0, abs=1e-5)


def test_swd_shift_in_four_dimensions_matches_closed_form():
    # y = x + m shifts each projection by <u, m>; E_u <u, m>^2 = |m|^2 / d for u uniform on the sphere.
    # With 4096 directions in d = 4 the Monte-Carlo relative std of SW is about 0.8%; tolerance 3%.
    x = np.random.default_rng(2).normal(size=(300, 4))
    shift = np.array([1.0, -2.0, 0.5, 1.5])
    expected = np.linalg.norm(shift) / 2.0
    assert distances.sliced_wasserstein(x, x + shift, 3, num_projections=4096) == pytest.approx(expected, rel=0.03)


def test_mmd_matches_numpy_oracle_and_median_heuristic():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 3)), rng.normal(0.5, 1.0, size=(30, 3))
    pooled = np.concatenate([x, y])
    bandwidth = np.median(scipy.spatial.distance.pdist(pooled))

    def kernel(a, b):
        return np.exp(-scipy.spatial.distance.cdist(a, b, "sqeuclidean") / (2 * bandwidth**2))

    k_xx, k_yy = kernel(x, x), kernel(y, y)
    expected = (
        (k_xx.sum() - np.trace(k_xx)) / (40 * 39)
        + (k_yy.sum() - np.trace(k_yy)) / (30 * 29)
        - 2 * kernel(x, y).mean()
    )
    assert distances.mmd_rbf(x, y) == pytest.approx(expected, abs=1e-5)
    # The same sets far from the origin (a translation leaves the kernel unchanged): float32 squared norms
    # cancelled, -0.000263 against -0.000422 at 1000 in a run of 200-point sets.
    for offset in (100.0, 1000.0):
        assert distances.mmd_rbf(x + offset, y + offset, bandwidth) == pytest.approx(expected, abs=1e-5)
    # A NaN point scores NaN with the median heuristic too (it was refused as a NaN bandwidth); a heuristic
    # bandwidth of 0 says why.
    x[0, 0] = np.nan
    assert np.isnan(distances.mmd_rbf(x, y)) and np.isnan(distances.mmd_rbf(x, y, bandwidth=1.0))
    with pytest.raises(ValueError, match="most pooled points coincide"):
        distances.mmd_rbf(np.zeros((5, 2)), np.zeros((4, 2)))


def test_mmd_median_heuristic_of_many_points_spans_both_sets():
    """Above 2,000 pooled points the bandwidth is the median distance of 2,000 evenly spaced ones (SciPy here), so
    both sets count: the first 2,000 would be nearly all x's, which are 10 times tighter than the y's."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(1500, 2)), rng.normal(0.0, 10.0, size=(1000, 2))
    pooled = np.concatenate([x, y])
    bandwidth = np.median(scipy.spatial.distance.pdist(pooled[np.linspace(0, 2499, 2000).astype(int)]))
    assert distances.mmd_rbf(x, y) == pytest.approx(distances.mmd_rbf(x, y, bandwidth), rel=1e-4)
    first = np.median(scipy.spatial.distance.pdist(pooled[:2000]))
    assert distances.mmd_rbf(x, y, first) != pytest.approx(distances.mmd_rbf(x, y, bandwidth), rel=0.05)


def test_mmd_gaussian_closed_form_and_unbiased_zero():
    # For N(0, I) vs N(delta, I) in d dims with bandwidth h:
    # MMD^2 = 2 (h^2 / (h^2 + 2))^(d/2) (1 - exp(-|delta|^2 / (2 (h^2 + 2)))) = 0.1023 for d = 2, h = 1, |delta| = 1.
    # Measured std of the estimate at n = 2000: about 0.0045 (shifted) and 0.0003 (same distribution).
    rng = np.random.default_rng(5)
    x, x_again, y = rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2)), rng.normal(size=(2000, 2))
    y[:, 0] += 1.0
    expected = 2.0 * (1.0 / 3.0) * (1.0 - np.exp(-1.0 / 6.0))
    assert distances.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(expected, abs=0.02)
    assert abs(distances.mmd_rbf(x, x_again, bandwidth=1.0)) < 2e-3


def _frechet_oracle(mu1, sigma1, mu2, sigma2):
    """Float64 Fréchet distance via the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2) and eigenvalues."""
    root1 = scipy.linalg.sqrtm(sigma1).real
    eigenvalues = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(eigenvalues))


def test_frechet_matches_oracle_and_diagonal_closed_form():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    sigma1, sigma2 = a @ a.T / 20 + 0.1 * np.eye(20), b @ b.T / 20 + 0.1 * np.eye(20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    expected = _frechet_oracle(mu1, sigma1, mu2, sigma2)
    assert distances.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # pytorch-fid's route: the general matrix square root of the product.
    pytorch_fid = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert distances.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(pytorch_fid, rel=1e-9)
    assert distances.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)
    # Diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    closed_form = np.sum((mu1[:8] - mu2[:8]) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert distances.frechet_distance(mu1[:8], np.diag(v1), mu2[:8], np.diag(v2)) == pytest.approx(closed_form)


def test_frechet_of_rank_deficient_covariances_is_finite():
    # Fewer samples than dimensions: singular covariances, as with small FID sample sets.
    rng = np.random.default_rng(7)
    mu1, sigma1 = distances.gaussian_stats(rng.normal(size=(6, 12)))
    mu2, sigma2 = distances.gaussian_stats(rng.normal(size=(6, 12)))
    value = distances.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(value) and value == pytest.approx(_frechet_oracle(mu1, sigma1, mu2, sigma2), rel=1e-3)
    # Statistics of a set with a NaN sample give NaN (NumPy's eigensolvers would raise).
    assert np.isnan(distances.frechet_distance(mu1, np.where(np.eye(12), np.nan, sigma1), mu2, sigma2))


def test_frechet_of_singular_statistics_against_the_nuclear_norm_and_itself():
    # With centred rows A [n, d] and B [m, d], Tr (S1 S2)^(1/2) is the nuclear norm of A B^T / sqrt((n-1)(m-1)):
    # an oracle that never forms the singular d x d products. Fewer rows than dimensions, as in a small FID.
    rng = np.random.default_rng(11)
    scales = rng.uniform(0.1, 3.0, size=256)
    a, b = rng.normal(size=(20, 256)) * scales, rng.normal(size=(30, 256)) * scales + 0.3
    (mu1, sigma1), (mu2, sigma2) = distances.gaussian_stats(a), distances.gaussian_stats(b)
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    nuclear = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / np.sqrt(19 * 29)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * nuclear
    # The square roots of ~240 rounding-level eigenvalues had added up to 2.5e-8 of the value, and to a
    # distance of -1.1e-4 (out of traces of ~800) between a statistic and itself.
    assert distances.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)
    assert 0.0 <= distances.frechet_distance(mu1, sigma1, mu1, sigma1) < 1e-9 * np.trace(sigma1)

    # More rows than dimensions but ill-conditioned (a power-law spectrum, condition number 3e15): eigenvalues of
    # S1^(1/2) S2 S1^(1/2) fell below its rounding cut; 2.2e-4 of the distance was lost, and the distance of a
    # statistic to itself was 1.1e-4.
    mixing = rng.normal(size=(128, 128)) * np.arange(1, 129) ** -2.5
    a, b = rng.normal(size=(300, 128)) @ mixing.T, rng.normal(size=(300, 128)) @ mixing.T + 0.01
    (mu1, sigma1), (mu2, sigma2) = distances.gaussian_stats(a), distances.gaussian_stats(b)
    nuclear = np.linalg.svd((a - mu1) @ (b - mu2).T, compute_uv=False).sum() / 299
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * nuclear
    assert distances.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= distances.frechet_distance(mu1, sigma1, mu1, sigma1) < 1e-9 * np.trace(sigma1)


def test_gaussian_stats_and_errors():
    features = np.random.default_rng(8).normal(size=(50, 4))
    mu, sigma = distances.gaussian_stats(features)
    np.testing.assert_allclose(mu, features.mean(0))
    np.testing.assert_allclose(sigma, np.cov(features.T))
    # One feature: a [1, 1] covariance as RunningGaussianStats gives (np.cov's was 0-d).
    _, sigma_1d = distances.gaussian_stats(features[:, :1])
    assert sigma_1d.shape == (1, 1) and sigma_1d[0, 0] == pytest.approx(features[:, 0].var(ddof=1))
    with pytest.raises(ValueError, match="mismatched"):
        distances.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="same dim"):
        distances.sliced_wasserstein(features, features[:, :3], 0)
    with pytest.raises(ValueError, match="disjoint"):
        distances.split_disjoint(features, 30, 0)


@pytest.mark.parametrize("merge_rows", [1, 8, 2048])
def test_running_gaussian_stats_merge_batches_exactly(merge_rows):
    # Far from the origin (mean 1e6, spread 1) sums of raw squares would cancel away about 12 of float64's
    # 16 digits; the pairwise merge keeps the covariance to rounding. Uneven batches, single rows among them,
    # merged row by row, across batch boundaries, or all at the end.
    rng = np.random.default_rng(9)
    features = 1e6 + rng.normal(size=(69, 5)) @ rng.normal(size=(5, 5))
    running = distances.RunningGaussianStats(merge_rows)
    for rows in np.split(features, np.cumsum([1, 1, 5, 17, 3, 40])):
        running.update(rows)
    mu, sigma = running.stats()
    assert running.count == 69
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9 * np.abs(sigma).max())
    running.update(features[:3])  # more rows after stats(): the statistics of all 72
    np.testing.assert_allclose(running.stats()[1], np.cov(np.concatenate([features, features[:3]]), rowvar=False),
                               rtol=1e-9, atol=1e-9 * np.abs(sigma).max())
    with pytest.raises(ValueError, match=r"expected \[n >= 1, 5\] features"):
        running.update(features[:3, :4])
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        one = distances.RunningGaussianStats(merge_rows)
        one.update(features[:1])
        one.stats()


def test_lowdim_metrics_reports_data_baseline():
    rng = np.random.default_rng(9)
    data = rng.normal(size=(1200, 2))
    good, bad = rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + np.array([1.5, 0.0])
    good_metrics = distances.lowdim_metrics(good, data, 0)
    bad_metrics = distances.lowdim_metrics(bad, data, 0)
    # The data-vs-data row depends on the data alone: its MMD kernel too (a bandwidth from the samples moved it).
    assert good_metrics["swd_data"] == bad_metrics["swd_data"] < 0.15
    assert good_metrics["mmd_data"] == bad_metrics["mmd_data"]
    assert good_metrics["swd"] < 0.15 < 0.5 < bad_metrics["swd"]
    assert abs(good_metrics["mmd"]) < 0.01 and bad_metrics["mmd"] > 10 * abs(bad_metrics["mmd_data"])
    first, second = distances.split_disjoint(data, 500, 0)
    assert distances.data_baseline(distances.mmd_rbf, data, 500, 0) == distances.mmd_rbf(first, second)


@pytest.fixture(scope="module")
def held_out():
    return digits_classifier.load_digits_split("test")


def test_classifier_held_out_accuracy(held_out):
    images, labels = held_out
    assert images.shape == (297, 8, 8, 1) and images.min() == -1.0 and images.max() == 1.0
    accuracy = np.mean(digits_classifier.digits_class_probs(images).argmax(-1) == labels)
    assert accuracy >= 0.97


def test_class_agreement_counts_draws_in_their_sources_class(held_out):
    sources = held_out[0][:20]
    classes = digits_classifier.digits_class_probs(sources).argmax(-1)
    neighbours = np.roll(sources, 1, axis=0)  # draw 2 of source i is source i - 1
    samples = np.stack([sources, neighbours])
    samples[0, 3, 2, 2] = np.nan  # a diverged draw keeps nothing of its source
    expected = (19 + np.sum(np.roll(classes, 1) == classes)) / 40
    assert digits_classifier.digits_class_agreement(samples, sources) == pytest.approx(expected)
    assert expected < 0.75  # most neighbours are other digits, so a wrong pairing would show
    with pytest.raises(ValueError, match=r"must be draws for sources"):
        digits_classifier.digits_class_agreement(samples[:, :10], sources)


def test_class_entropy_of_held_out_and_single_class(held_out):
    images, labels = held_out
    probs = digits_classifier.digits_class_probs(images)
    label_histogram = np.bincount(labels, minlength=10) / len(labels)
    # Held-out classes are almost balanced: entropy of their histogram is within 0.01 of log(10).
    assert digits_classifier.class_entropy(probs) == pytest.approx(scipy.stats.entropy(label_histogram), abs=0.02)
    assert digits_classifier.class_entropy(probs) == pytest.approx(np.log(10), abs=0.03)
    sevens = probs[labels == 7]
    assert digits_classifier.class_entropy(sevens) < 0.15
    assert digits_classifier.class_entropy(np.eye(10)[[3] * 5]) == pytest.approx(0.0, abs=1e-12)
    # One [C] row gave 0.23, logits -2073.7; a NaN row (a diverged draw) still makes the entropy NaN.
    for not_rows in (np.eye(10)[3], [[-3.0, 2.0, 1.0]]):
        with pytest.raises(ValueError, match=r"expected \[N, C\] rows of probabilities"):
            digits_classifier.class_entropy(not_rows)
    assert np.isnan(digits_classifier.class_entropy(np.concatenate([probs[:5], np.full((1, 10), np.nan)])))


def test_digits_metrics_against_data_and_noise(held_out):
    images = held_out[0]
    same = digits_classifier.digits_metrics(images)
    assert same["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert same["class_entropy"] == same["class_entropy_data"]
    # 16x16 nearest-neighbour upsampled inputs are average-pooled back to the same 8x8 images.
    upsampled = images.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(
        digits_classifier.digits_features(upsampled), digits_classifier.digits_features(images), atol=1e-5
    )
    train_images = digits_classifier.load_digits_split("train")[0]
    real = digits_classifier.digits_metrics(train_images[-297:])
    noise = digits_classifier.digits_metrics(np.random.default_rng(10).uniform(-1, 1, size=(297, 8, 8, 1)))
    assert real["frechet"] < 2 * real["frechet_data"]
    assert noise["frechet"] > 5 * real["frechet_data"]
    # Samples from a diverged chain score NaN, not the numbers of some made-up images; the data's figures stand.
    diverged = images.copy()
    diverged[::2, 4, 4] = np.nan
    scores = digits_classifier.digits_metrics(diverged)
    assert all(np.isnan(scores[k]) for k in ("frechet", "class_entropy", "confidence"))
    assert scores["frechet_data"] == same["frechet_data"] and scores["confidence_data"] == same["confidence_data"]
    with pytest.raises(ValueError, match="8k, 8k, 1"):
        digits_classifier.digits_features(np.zeros((4, 28, 28, 1)))
    # 8-bit images are the same grid points; other integers are refused (they were taken as values in [-1, 1]).
    as_uint8 = np.round((images[:8].astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(
        digits_classifier.digits_features(as_uint8),
        digits_classifier.digits_features(as_uint8 / 127.5 - 1.0), rtol=1e-6, atol=1e-6,
    )
    with pytest.raises(ValueError, match="must be uint8"):
        digits_classifier.digits_features(as_uint8.astype(np.int64))
    # Any 8k x 8k size: the data pipeline's k-fold repetition is undone (a 24x24 digits run had crashed at its
    # first sample grid); sizes the pipeline resizes bicubically get no metrics.
    np.testing.assert_allclose(
        digits_classifier.digits_features(images[:8].repeat(3, axis=1).repeat(3, axis=2)),
        digits_classifier.digits_features(images[:8]), atol=1e-5,
    )
    config = digits.get_config()
    config.data.image_size = 12
    assert generation.sample_metrics(config, np.zeros((4, 12, 12, 1), np.float32)) == {}
    config.sampling.num_samples = 1  # nothing to score, so no minimum
    assert sample_metrics_problem(config) is None
