"""A small CNN classifier of scikit-learn's 8x8 digits, used as a feature space for sample quality.

Data: `sklearn.datasets.load_digits` (1,797 images shipped inside scikit-learn), pixel values 0..16 scaled
to [-1, 1] by pixel / 16 * 2 - 1. (The diffusion model's data pipeline first stores them as 8-bit
round(pixel * 255 / 16), so its values differ from these by at most 1/255.) Split: the first 1,500 images in
scikit-learn's order are the training split, the last 297 the held-out split (no shuffling, so anyone can
rebuild it). Inputs may be 8k x 8k (NHWC with one channel, or NHW; uint8 or floats in [-1, 1]): they are
average-pooled k x k back to 8x8, which exactly undoes the data pipeline's nearest-neighbour k-fold upsampling.

Weights: `digits_classifier.msgpack` beside this file, written by `scripts/train_digits_classifier.py`.
"""

import functools
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ddpm_jax.metrics.distances import frechet_distance, gaussian_stats

__all__ = [
    "NUM_TRAIN",
    "WEIGHTS_PATH",
    "DigitsCNN",
    "class_entropy",
    "digits_class_probs",
    "digits_features",
    "digits_metrics",
    "load_digits_classifier",
    "load_digits_split",
]

NUM_TRAIN = 1500
WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.msgpack")


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 8, 8, 1] float32 in [-1, 1] and labels [N] int32 of the 'train' (1,500) or 'test' (297) split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    part = slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
    return images[part], labels[part]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, 2x2 average pool, a 64-unit hidden layer (the feature space) and 10 logits."""

    num_features: int = 64

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [N, 8, 8, 1] in [-1, 1] -> (features [N, 64] before the ReLU, logits [N, 10])."""
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(images))
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.Dense(self.num_features)(x.reshape(x.shape[0], -1))
        return features, nn.Dense(10)(nn.relu(features))


def _to_8x8(images) -> jax.Array:
    """[N, 8k, 8k(, 1)] images in [-1, 1] (or uint8 0-255) as [N, 8, 8, 1] float32: k x k means undo the data
    pipeline's k-fold pixel repetition."""
    dtype = np.asarray(images).dtype
    if dtype == np.uint8:
        images = np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)
    elif np.issubdtype(dtype, np.integer):
        raise ValueError(f"integer images must be uint8 (0-255), got {dtype}; or pass floats in [-1, 1]")
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
        images = images[..., None]
    if (images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]
            or images.shape[1] % 8 or not images.shape[1]):
        raise ValueError(
            f"digits classifier takes [N, 8k, 8k, 1] images (8 x 8, 16 x 16, ...; or without the channel axis), "
            f"got shape {images.shape}"
        )
    k = images.shape[1] // 8
    if k > 1:
        images = images.reshape(images.shape[0], 8, k, 8, k, 1).mean(axis=(2, 4))
    return images


@functools.lru_cache(maxsize=4)
def load_digits_classifier(path: str = WEIGHTS_PATH) -> dict:
    """The classifier's Flax variables from a msgpack file written by `flax.serialization.to_bytes`."""
    if not os.path.exists(path):
        raise ValueError(f"no digits classifier weights at {path}: run scripts/train_digits_classifier.py")
    with open(path, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    return jax.tree.map(jnp.asarray, variables)


@jax.jit
def _apply(variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return DigitsCNN().apply(variables, images)


def _batched_apply(images, variables, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) as float64 NumPy, in batches of ``batch_size`` (the last padded when there are several).

    The rows of images with a NaN or infinite pixel are NaN.
    """
    images = _to_8x8(images)
    # On XLA:CPU a ReLU fused into a reduction drops NaN (jaxlib 0.10.2): a diverged chain would score as finite.
    finite = np.isfinite(np.asarray(images)).reshape(images.shape[0], -1).all(axis=1)[:, None]
    variables = load_digits_classifier() if variables is None else variables
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - batch.shape[0] if images.shape[0] > batch_size else 0
        out_features, out_logits = _apply(variables, jnp.pad(batch, ((0, pad), (0, 0), (0, 0), (0, 0))))
        features.append(np.asarray(out_features[: batch.shape[0]], np.float64))
        logits.append(np.asarray(out_logits[: batch.shape[0]], np.float64))
    return np.where(finite, np.concatenate(features), np.nan), np.where(finite, np.concatenate(logits), np.nan)


def digits_features(images, variables: dict | None = None) -> np.ndarray:
    """Penultimate (64-d, pre-ReLU) features [N, 64] float64 of [N, 8|16, 8|16(, 1)] images in [-1, 1]."""
    return _batched_apply(images, variables)[0]


def digits_class_probs(images, variables: dict | None = None) -> np.ndarray:
    """Predicted class probabilities [N, 10] float64 of [N, 8|16, 8|16(, 1)] images in [-1, 1]."""
    return scipy.special.softmax(_batched_apply(images, variables)[1], axis=-1)


def digits_class_agreement(samples, sources, variables: dict | None = None) -> float:
    """The fraction of samples [K, B, 8|16, 8|16(, 1)] that the classifier puts in the class it gives their source
    (sources [B, ...]): how much of each source a set of stochastic reconstructions keeps."""
    samples, sources = np.asarray(samples), np.asarray(sources)
    if samples.shape[1:] != sources.shape:
        raise ValueError(f"samples [K, B, ...] must be draws for sources [B, ...]; got {samples.shape} and "
                         f"{sources.shape}")
    variables = load_digits_classifier() if variables is None else variables
    source_class = _batched_apply(sources, variables)[1].argmax(axis=-1)
    sample_logits = _batched_apply(samples.reshape(-1, *sources.shape[1:]), variables)[1]
    # A non-finite sample keeps nothing of its source: its logits are NaN, which argmax would count as class 0.
    sample_class = np.where(np.isfinite(sample_logits).all(axis=-1), sample_logits.argmax(axis=-1), -1)
    return float(np.mean(sample_class.reshape(samples.shape[:2]) == source_class))


def class_entropy(probs: np.ndarray) -> float:
    """Entropy (nats) of the mean predicted class distribution: log(10) = 2.303 when all classes are equally
    present, 0 when every image is one class (mode collapse). probs: [N, C] rows of class probabilities."""
    probs = np.asarray(probs, np.float64)
    finite = probs[np.isfinite(probs).all(axis=-1)] if probs.ndim == 2 else probs
    if probs.ndim != 2 or (finite < 0).any() or not np.allclose(finite.sum(axis=-1), 1.0, atol=1e-4):
        raise ValueError(f"expected [N, C] rows of probabilities (softmax of the logits), got shape {probs.shape}")
    mean = probs.mean(axis=0)
    return float(-np.sum(mean * np.log(np.clip(mean, 1e-300, None))))


def digits_metrics(
    samples,
    reference_images=None,
    baseline_images=None,
    variables: dict | None = None,
) -> dict[str, float]:
    """Fréchet distance in the classifier's feature space and class entropy of samples, beside the data's own.

    samples: [N, 8|16, 8|16(, 1)] in [-1, 1]. reference_images: what samples are compared with (default:
    the 297 held-out digits). baseline_images: real images that play a perfect model (default: min(N, 1500)
    training-split digits in a fixed random order), so `frechet_data` has the same finite-sample bias as
    `frechet`. Both Fréchet values are noisy below ~1,000 samples (64-d features, 297 references); at 1,000 the
    default draw gives 30.6, and 30 other draws of 1,000 gave 27.1 +- 1.8.
    Returns frechet, frechet_data, class_entropy, class_entropy_data (the reference's), confidence,
    confidence_data (mean max class probability) and num_samples.
    """
    variables = load_digits_classifier() if variables is None else variables
    if reference_images is None:
        reference_images = load_digits_split("test")[0]
    if baseline_images is None:
        train_images = load_digits_split("train")[0]
        baseline_images = train_images[np.random.default_rng(0).permutation(NUM_TRAIN)[: len(samples)]]
    if len(samples) < 2:
        raise ValueError(f"need at least 2 samples for a Fréchet distance, got {len(samples)}")
    sample_features, sample_logits = _batched_apply(samples, variables)
    reference_features, reference_logits = _batched_apply(reference_images, variables)
    baseline_features = _batched_apply(baseline_images, variables)[0]
    sample_probs = scipy.special.softmax(sample_logits, axis=-1)
    reference_probs = scipy.special.softmax(reference_logits, axis=-1)
    reference_stats = gaussian_stats(reference_features)
    return {
        "frechet": frechet_distance(*gaussian_stats(sample_features), *reference_stats),
        "frechet_data": frechet_distance(*gaussian_stats(baseline_features), *reference_stats),
        "class_entropy": class_entropy(sample_probs),
        "class_entropy_data": class_entropy(reference_probs),
        "confidence": float(sample_probs.max(axis=-1).mean()),
        "confidence_data": float(reference_probs.max(axis=-1).mean()),
        "num_samples": int(len(samples)),
    }
