"""Sample-quality metrics: SWD/MMD for low-dimensional data, a digits-classifier Fréchet distance and class
entropy, and FID/IS with the standard FID Inception-v3. Each is meant to be reported beside its data-vs-data
baseline."""

from ddpm_jax.metrics.digits_classifier import (
    class_entropy,
    digits_class_agreement,
    digits_class_probs,
    digits_features,
    digits_metrics,
    load_digits_classifier,
    load_digits_split,
)
from ddpm_jax.metrics.distances import (
    RunningGaussianStats,
    data_baseline,
    frechet_distance,
    gaussian_stats,
    lowdim_metrics,
    mmd_rbf,
    sliced_wasserstein,
    split_disjoint,
)
from ddpm_jax.metrics.inception import (
    RunningInceptionScore,
    compute_features,
    compute_stats,
    fid_from_samples,
    fid_from_stats,
    inception_metrics,
    inception_score,
    load_fid_inception,
    load_stats,
    save_stats,
)

__all__ = [
    "RunningGaussianStats",
    "RunningInceptionScore",
    "class_entropy",
    "compute_features",
    "compute_stats",
    "data_baseline",
    "digits_class_agreement",
    "digits_class_probs",
    "digits_features",
    "digits_metrics",
    "fid_from_samples",
    "fid_from_stats",
    "frechet_distance",
    "gaussian_stats",
    "inception_metrics",
    "inception_score",
    "load_digits_classifier",
    "load_digits_split",
    "load_fid_inception",
    "load_stats",
    "lowdim_metrics",
    "mmd_rbf",
    "save_stats",
    "sliced_wasserstein",
    "split_disjoint",
]
