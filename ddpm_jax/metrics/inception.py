"""FID and Inception Score with the standard FID Inception-v3 network, in Flax.

The network is the 2015-12-05 TensorFlow Inception graph as ported by pytorch-fid (its FIDInceptionA/C/E
blocks: average pools that do not count padding, a max pool in the last block's pool branch; BatchNorm eps
1e-3 in inference mode; 1008 logits). Images are resized to 299x299 exactly as torch's
`F.interpolate(mode='bilinear', align_corners=False)` does, on [-1, 1] inputs (resize commutes with
pytorch-fid's [0, 1] -> [-1, 1] map). Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(read with torch when installed) or an `.npz` of the same state dict; `load_fid_inception()` downloads the
file once where the internet is reachable. Statistics files are pytorch-fid compatible `.npz` (`mu`, `sigma`).
"""

import functools
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from ddpm_jax.data.images import to_uint8
from ddpm_jax.metrics.distances import RunningGaussianStats, frechet_distance
from ddpm_jax.models.conv import cpu_conv_compiler_options
from ddpm_jax.parts import write_atomically

__all__ = [
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "RunningInceptionScore",
    "compute_features",
    "compute_stats",
    "convert_state_dict",
    "download_fid_weights",
    "fid_from_samples",
    "fid_from_stats",
    "inception_forward",
    "inception_metrics",
    "inception_score",
    "load_fid_inception",
    "load_stats",
    "resize_bilinear",
    "save_stats",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
# torch.hub convention: the hex after the last '-' of the file name is a prefix of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
OUTPUTS = ("pool", "logits", "logits_unbiased")  # inception_forward's
_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, running statistics) and ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])]
        x = nn.Conv(
            self.features, self.kernel_size, self.strides, pad, use_bias=False, precision=_HIGHEST, name="conv"
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average that ignores the padding (FID blocks' count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3)
        branch3x3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3)
        branch_pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average-pool branch, FIDInceptionE_1) and Mixed_7c (max-pool branch, FIDInceptionE_2)."""

    max_pool_branch: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        branch3x3dbl = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
            ],
            axis=-1,
        )
        if self.max_pool_branch:
            # The TF graph's last block uses a max pool here (pytorch-fid's FIDInceptionE_2).
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDLogits(nn.Module):
    """The 2048 -> 1008 softmax layer: logits with its bias, and without (what the original IS code used)."""

    @nn.compact
    def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], 1008))
        bias = self.param("bias", nn.initializers.zeros, (1008,))
        logits_unbiased = jnp.dot(pool, kernel, precision=_HIGHEST)
        return logits_unbiased + bias, logits_unbiased


class FIDInceptionV3(nn.Module):
    """NHWC images in [-1, 1] (299x299 for the standard numbers; >= 75x75 works) -> pool3 features and logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits, logits_unbiased = FIDLogits(name="fc")(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": logits_unbiased}


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's bilinear interpolation with align_corners=False along one axis."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    fraction = source - lower
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - fraction)
    np.add.at(matrix, (np.arange(out_size), upper), fraction)
    return matrix


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[N, H, W, C] -> [N, size, size, C] as torch F.interpolate(mode='bilinear', align_corners=False), no antialias."""
    images = images.astype(jnp.promote_types(images.dtype, jnp.float32))
    rows = jnp.asarray(_bilinear_matrix(images.shape[1], size), images.dtype)
    cols = jnp.asarray(_bilinear_matrix(images.shape[2], size), images.dtype)
    images = jnp.einsum("oh,nhwc->nowc", rows, images, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", cols, images, precision=_HIGHEST)


def inception_forward(
    variables: dict, images: jax.Array, resize: bool = True, quantize: bool = True
) -> dict[str, jax.Array]:
    """Images [N, H, W, 1|3] in [-1, 1] -> {'pool': [N, 2048], 'logits', 'logits_unbiased': [N, 1008]}; jitted.

    quantize rounds to 8-bit levels first, so samples are scored like the PNGs reference statistics come
    from; it rounds in float32, where a few values in a million land one level off the PNGs' (float64)
    levels, which `compute_features` and the statistics avoid by quantising on the host. resize=False skips
    the 299x299 resize (tests run the network at small sizes). Integer images are refused (`compute_features`
    takes uint8).
    """
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):  # 0..255 read as [-1, 1]: every pixel above 0 white
        raise ValueError(f"inception_forward takes float images in [-1, 1], got {jnp.result_type(images)}; "
                         "compute_features also takes uint8")
    return _jitted_forward(resize, quantize)(variables, images)


@functools.cache
def _jitted_forward(resize: bool, quantize: bool):
    # Made at the first call, when the backend is known: on XLA:CPU the convolutions run on Eigen (2x faster
    # than YNNPACK for this network on the 2-core CPU, benchmarks/NOTES.md).
    forward = functools.partial(_forward, resize=resize, quantize=quantize)
    return jax.jit(forward, compiler_options=cpu_conv_compiler_options())


def _forward(variables: dict, images: jax.Array, resize: bool, quantize: bool) -> dict[str, jax.Array]:
    # Compute in the weights' dtype (float32 normally; float64 in the parity test).
    images = images.astype(variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"].dtype)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if quantize:
        images = jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    if resize:
        images = resize_bilinear(images)
    return FIDInceptionV3().apply(variables, images)


def _feature_batches(
    images, variables: dict, batch_size: int, resize: bool, quantize: bool, names: tuple[str, ...],
) -> Iterator[dict[str, np.ndarray]]:
    """inception_forward's outputs ``names`` for consecutive batches of ``images``, as float64 NumPy arrays.

    Each batch is dispatched before the previous one's outputs are copied to the host, so the device computes
    while the caller digests them.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    if np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8:
        raise ValueError(f"integer images must be uint8 (0-255), got {images.dtype}; or pass floats in [-1, 1]")
    batch_size = max(1, min(batch_size, images.shape[0]))  # a few images are not padded to a full batch
    pending = None
    for start in range(0, images.shape[0], batch_size):
        batch = np.asarray(images[start : start + batch_size])
        count = batch.shape[0]
        # Quantising clips infinities to the range: their rows are made NaN below instead, as NaN rows come out.
        finite = np.isfinite(batch).reshape(count, -1).all(axis=1)
        if quantize:  # the 8-bit values of the saved PNGs (rounded in float64; in float32 some fell one level off)
            batch = to_uint8(batch)
        if batch.dtype == np.uint8:  # the 8-bit grid as `quantize` computes it, so both give the same inputs
            batch = batch.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        # Pad the last batch so one compiled shape serves every batch.
        batch = np.pad(batch, ((0, batch_size - count), (0, 0), (0, 0), (0, 0)))
        outputs = inception_forward(variables, batch, resize=resize, quantize=quantize)
        if pending is not None:
            yield _to_host(*pending)
        pending = ({name: outputs[name] for name in names}, finite)
    if pending is not None:
        yield _to_host(*pending)


def _to_host(outputs: dict[str, jax.Array], finite: np.ndarray) -> dict[str, np.ndarray]:
    """The first len(finite) rows of each output as float64 NumPy, NaN in the rows of non-finite images."""
    host = {}
    for name, value in outputs.items():
        value = np.asarray(value[: len(finite)], np.float64)
        host[name] = np.where(finite.reshape(-1, *[1] * (value.ndim - 1)), value, np.nan)
    return host


def compute_features(
    images, variables: dict, batch_size: int = 100, resize: bool = True, quantize: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """inception_forward over [N, H, W, 1|3] images (uint8, or floats in [-1, 1]) in fixed-size batches ->
    float64 NumPy 'pool' [N, 2048], 'logits', 'logits_unbiased' [N, 1008]; NaN in the rows of images with a NaN
    or infinite pixel, so that their FID and Inception Score are NaN.

    ``on_batch(count)`` is called with the number of images after each batch (e.g. a progress bar's update).
    """
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in _feature_batches(images, variables, batch_size, resize, quantize, OUTPUTS):
        for name, value in batch.items():
            outputs.setdefault(name, []).append(value)
        if on_batch is not None:
            on_batch(len(batch["pool"]))
    return {name: np.concatenate(values) for name, values in outputs.items()}


def compute_stats(
    images, variables: dict, batch_size: int = 100, on_batch: Callable[[int], None] | None = None,
    resize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu [2048], sigma [2048, 2048], float64) of [N, H, W, 1|3] images (uint8, or floats in
    [-1, 1]), merged batch by batch: the N feature vectors are never held at once."""
    return _running_metrics(images, variables, batch_size, on_batch, resize, with_score=False)[0]


def _running_metrics(
    images, variables: dict, batch_size: int, on_batch: Callable[[int], None] | None, resize: bool,
    with_score: bool,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[float, float] | None]:
    """((mu, sigma) of the pool features, the Inception Score if ``with_score``) from one pass of the network."""
    stats = RunningGaussianStats()
    score = RunningInceptionScore(len(images)) if with_score else None
    names = ("pool", "logits_unbiased") if with_score else ("pool",)
    for batch in _feature_batches(images, variables, batch_size, resize, True, names):
        stats.update(batch["pool"])
        if score is not None:
            score.update(batch["logits_unbiased"])
        if on_batch is not None:
            on_batch(len(batch["pool"]))
    return stats.stats(), score.score() if score is not None else None


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write a pytorch-fid compatible statistics file (.npz with 'mu' and 'sigma'), atomically."""
    write_atomically(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid style .npz statistics file."""
    try:
        stats = np.load(path)
        if not isinstance(stats, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not an FID statistics file: it holds one array, not 'mu' and 'sigma'")
        with stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"{path} is not an FID statistics file: it needs arrays 'mu' and 'sigma'")
            return stats["mu"], stats["sigma"]
    except (EOFError, OSError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, FileNotFoundError) or str(err).startswith(str(path)):
            raise
        # Damaged (a cut or corrupted zip, a bad member), empty, or not NumPy's (np.load's pickle refusal).
        reason = "not a NumPy file" if "pickle" in str(err) else f"{type(err).__name__}: {err}"
        raise ValueError(
            f"{path} is not a readable FID statistics .npz ({reason}); a cached one is recomputed once deleted"
        ) from err


def _as_stats(stats) -> tuple[np.ndarray, np.ndarray]:
    return load_stats(stats) if isinstance(stats, str | os.PathLike) else stats


def fid_from_stats(stats1, stats2) -> float:
    """FID between two statistics, each a path to a pytorch-fid .npz or a (mu, sigma) pair."""
    return frechet_distance(*_as_stats(stats1), *_as_stats(stats2))


def fid_from_samples(samples, reference_stats, variables: dict, batch_size: int = 100) -> float:
    """FID of [N, H, W, 1|3] samples (uint8, or floats in [-1, 1]) against reference statistics (path or
    (mu, sigma))."""
    return fid_from_stats(compute_stats(samples, variables, batch_size), reference_stats)


def inception_metrics(
    samples, reference_stats, variables: dict, batch_size: int = 100, on_batch: Callable[[int], None] | None = None,
    resize: bool = True,
) -> dict[str, float]:
    """FID against ``reference_stats`` (path or (mu, sigma)) and Inception Score (10 splits; from 10 samples) of
    [N, H, W, 1|3] samples (uint8, or floats in [-1, 1]), from one pass of the network that keeps no per-sample
    output. FID is biased upwards for small N: papers report it for N = 50,000."""
    with_score = len(samples) >= 10
    stats, score = _running_metrics(samples, variables, batch_size, on_batch, resize, with_score)
    metrics = {"fid": fid_from_stats(stats, reference_stats), "fid_samples": len(samples)}
    if with_score:
        metrics["inception_score"], metrics["inception_score_std"] = score
    return metrics


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) of logits [N, classes]: mean and std over
    ``splits`` consecutive parts (as np.array_split cuts them).

    Pass 'logits_unbiased' to match the original TF implementation (it multiplied by the softmax weights
    without the bias).
    """
    logits = np.asarray(logits, np.float64)
    score = RunningInceptionScore(len(logits), splits)
    score.update(logits)
    return score.score()


class RunningInceptionScore:
    """inception_score of logits that arrive a batch at a time, for a known number of samples.

    E_x KL(p(y|x) || p(y)) = E_x sum_y p log p - sum_y p(y) log p(y), so each split needs only the sum of its
    probabilities and of sum_y p log p: O(splits x classes) numbers instead of every row.
    """

    def __init__(self, num_samples: int, splits: int = 10):
        if num_samples < splits:
            raise ValueError(f"need at least {splits} images for {splits} splits, got {num_samples}")
        sizes = [len(part) for part in np.array_split(np.arange(num_samples), splits)]
        self.boundaries = np.cumsum([0, *sizes])
        self.seen = 0
        self.prob_sums: np.ndarray | None = None  # [splits, classes]
        self.neg_entropy_sums = np.zeros(splits)

    def update(self, logits) -> None:
        logits = np.asarray(logits, np.float64)
        if self.seen + len(logits) > self.boundaries[-1]:
            raise ValueError(f"more than the {self.boundaries[-1]} samples announced")
        log_probs = scipy.special.log_softmax(logits, axis=-1)
        probs = np.exp(log_probs)
        split = np.searchsorted(self.boundaries, self.seen + np.arange(len(logits)), side="right") - 1
        if self.prob_sums is None:
            self.prob_sums = np.zeros((len(self.neg_entropy_sums), logits.shape[-1]))
        for part in np.unique(split):  # consecutive rows: one split, or two where a batch straddles them
            rows = split == part
            self.prob_sums[part] += probs[rows].sum(axis=0)
            self.neg_entropy_sums[part] += np.sum(probs[rows] * log_probs[rows])
        self.seen += len(logits)

    def score(self) -> tuple[float, float]:
        """Mean and std of the splits' scores."""
        if self.seen != self.boundaries[-1]:
            raise ValueError(f"{self.seen} of the {self.boundaries[-1]} samples announced were given")
        sizes = np.diff(self.boundaries)
        marginals = self.prob_sums / sizes[:, None]
        marginal_neg_entropy = np.sum(marginals * np.log(np.clip(marginals, 1e-300, None)), axis=-1)
        scores = np.exp(self.neg_entropy_sums / sizes - marginal_neg_entropy)
        return float(scores.mean()), float(scores.std())


@functools.cache  # tracing the network's init takes seconds
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every Flax variable of FIDInceptionV3, keyed by (collection, module path..., name)."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(entry.key for entry in path): leaf.shape for path, leaf in flat}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], dtype=jnp.float32) -> dict:
    """pytorch-fid's FIDInceptionV3 state dict (torch layout, e.g. 'Mixed_5b.branch1x1.conv.weight') ->
    Flax variables {'params', 'batch_stats'} of dtype; checks every variable is present with the right shape."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        *module, name = key.split(".")
        value = np.asarray(value)
        if name == "num_batches_tracked" or module[:1] == ["AuxLogits"]:
            continue  # training-only bookkeeping and the auxiliary classifier play no part in FID
        if module == ["fc"]:
            flat["params", "fc", {"weight": "kernel", "bias": "bias"}.get(name, name)] = (
                value.T if name == "weight" else value
            )
        elif module[-1:] == ["conv"] and name == "weight":
            flat[("params", *module, "kernel")] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif module[-1:] == ["bn"] and name in ("weight", "bias", "running_mean", "running_var"):
            collection = "params" if name in ("weight", "bias") else "batch_stats"
            flax_name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[name]
            flat[(collection, *module, flax_name)] = value
        else:
            raise ValueError(f"unexpected key {key!r}: not an FID Inception-v3 state dict")
    expected = _expected_shapes()
    missing = sorted(".".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted(".".join(k) for k in flat.keys() - expected.keys())
    wrong = sorted(".".join(k) for k in expected.keys() & flat.keys() if flat[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"state dict does not fit FIDInceptionV3: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    variables: dict = {}
    for path, value in flat.items():
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, dtype)
    return variables


def _default_cache_dir() -> str:
    return os.environ.get("DDPM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ddpm_jax"))


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_matches(path: str) -> bool:
    return file_sha256(path).startswith(FID_WEIGHTS_SHA256_PREFIX)


def download_fid_weights(cache_dir: str | None = None) -> str:
    """Path of pytorch-fid's weights in cache_dir (default $DDPM_JAX_CACHE or ~/.cache/ddpm_jax), downloading
    and sha256-checking them on first use."""
    cache_dir = cache_dir or _default_cache_dir()
    path = os.path.join(cache_dir, os.path.basename(FID_WEIGHTS_URL))
    if os.path.exists(path):
        if _sha256_matches(path):
            return path
        raise ValueError(f"{path} fails its sha256 check ({FID_WEIGHTS_SHA256_PREFIX}...): delete it to re-download")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = None
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=30) as response:
            with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(chunk)
    except (urllib.error.URLError, OSError) as error:
        if tmp is not None and os.path.exists(tmp.name):
            os.remove(tmp.name)  # a partial download
        raise ValueError(
            f"could not download the FID Inception weights ({error}). Without internet, fetch {FID_WEIGHTS_URL} "
            f"elsewhere and pass its path (or an .npz of its state dict), or put it in {cache_dir}"
        ) from error
    if not _sha256_matches(tmp.name):
        os.remove(tmp.name)
        raise ValueError(f"downloaded FID weights fail their sha256 check ({FID_WEIGHTS_SHA256_PREFIX}...)")
    os.replace(tmp.name, path)
    return path


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch state dict as NumPy arrays from a .pth (needs torch) or an .npz with the same keys."""
    not_weights = (f"{path} is not a readable copy of pytorch-fid's FID Inception weights "
                   f"({os.path.basename(FID_WEIGHTS_URL)}, or an .npz of its state dict)")
    if path.endswith(".npz"):
        try:
            with np.load(path) as arrays:
                return dict(arrays)
        except (EOFError, OSError, ValueError, AttributeError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"{not_weights}: {type(error).__name__}: {error}") from error
    try:
        import torch
    except ImportError as error:
        raise ValueError(
            f"reading {path} needs torch (pip install torch), or convert it to an .npz of its state dict"
        ) from error
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return {key: value.numpy() for key, value in state_dict.items()}
    except Exception as error:  # torch's unpickler raises many kinds (RuntimeError, UnpicklingError, EOFError, ...)
        # Not its message: for a file that is no checkpoint it advises loading it with weights_only=False.
        raise ValueError(f"{not_weights}: torch.load raised {type(error).__name__}") from error


def load_fid_inception(path: str | None = None, cache_dir: str | None = None) -> dict:
    """Flax variables of the FID Inception-v3 from path (.pth or .npz); None downloads them once into the cache."""
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"no FID Inception weights at {path}: pytorch-fid's {os.path.basename(FID_WEIGHTS_URL)} "
                         "or an .npz of its state dict")
    return convert_state_dict(_read_state_dict(path or download_fid_weights(cache_dir)))
