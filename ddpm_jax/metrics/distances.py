"""Distances between sample sets: sliced Wasserstein, MMD (RBF), Fréchet distance of Gaussian fits.

Every metric here is only meaningful beside its data-vs-data baseline (two disjoint draws of real data of the
same size), because all of them are biased upwards at finite sample size; `lowdim_metrics` and
`data_baseline` return that baseline next to the model's value.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RunningGaussianStats",
    "data_baseline",
    "frechet_distance",
    "gaussian_stats",
    "lowdim_metrics",
    "mmd_rbf",
    "sliced_wasserstein",
    "split_disjoint",
]


def _as_key(key_or_seed) -> jax.Array:
    """A PRNG key from an int seed or an existing key."""
    if isinstance(key_or_seed, int | np.integer):
        return jax.random.key(int(key_or_seed))
    return key_or_seed


def _check_vectors(x, y) -> tuple[jax.Array, jax.Array]:
    """Both sets as float32 [n, dim] arrays with the same dim."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two [n, dim] arrays with the same dim, got {x.shape} and {y.shape}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"need at least 2 points per set, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _quantile_pieces(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of [0, 1] on which the empirical quantile functions of n and of m sorted points are both constant.

    Returns the index into each sorted set and the width of every piece [k], from the breakpoints i / n and
    j / m merged in integer units of 1 / (n m): the quantile at level u is point ceil(u n) (1-based).
    """
    ends = np.union1d(np.arange(1, n + 1, dtype=np.int64) * m, np.arange(1, m + 1, dtype=np.int64) * n)
    widths = np.diff(ends, prepend=0) / (n * m)
    return -(-ends // m) - 1, -(-ends // n) - 1, widths.astype(np.float32)


@functools.partial(jax.jit, static_argnames="num_projections")
def _sliced_wasserstein(x: jax.Array, y: jax.Array, key: jax.Array, num_projections: int) -> jax.Array:
    directions = jax.random.normal(key, (x.shape[1], num_projections))
    directions = directions / jnp.linalg.norm(directions, axis=0, keepdims=True)
    x_proj = jnp.sort(x @ directions, axis=0)
    y_proj = jnp.sort(y @ directions, axis=0)
    if x.shape[0] == y.shape[0]:
        return jnp.sqrt(jnp.mean((x_proj - y_proj) ** 2))
    x_index, y_index, widths = _quantile_pieces(x.shape[0], y.shape[0])
    squared = jnp.sum(widths[:, None] * (x_proj[x_index] - y_proj[y_index]) ** 2, axis=0)
    return jnp.sqrt(jnp.mean(squared))


def sliced_wasserstein(x, y, key_or_seed, num_projections: int = 256) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_u W_2^2(u.x, u.y)) between [n, d] and [m, d] point sets.

    Directions u are uniform on the unit sphere. Each 1-D W_2 is exact between the empirical distributions:
    sorted projections paired (equal sizes), or both quantile functions compared piece by piece (unequal sizes,
    so x and x repeated twice are at distance 0).
    For y = x + m (a shift) the exact value is |m| / sqrt(d) in expectation over u.
    """
    x, y = _check_vectors(x, y)
    return float(_sliced_wasserstein(x, y, _as_key(key_or_seed), num_projections))


@jax.jit
def _median_distance(z: jax.Array) -> jax.Array:
    rows, cols = np.triu_indices(z.shape[0], k=1)
    return jnp.sqrt(jnp.median(jnp.sum((z[rows] - z[cols]) ** 2, axis=-1)))


def _median_heuristic(pooled) -> float:
    """Median pairwise distance of pooled [n, d] points, on at most 2,000 evenly spaced ones (O(2000^2))."""
    pooled = jnp.asarray(pooled, jnp.float32)
    if pooled.shape[0] > 2000:
        pooled = pooled[np.linspace(0, pooled.shape[0] - 1, 2000).astype(np.int64)]
    return float(_median_distance(pooled))


@jax.jit
def _mmd_rbf(x: jax.Array, y: jax.Array, bandwidth: jax.Array) -> jax.Array:
    def kernel(a, b):
        sq = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
        return jnp.exp(-jnp.maximum(sq, 0.0) / (2.0 * bandwidth**2))

    # Centred: |a|^2 + |b|^2 - 2 a.b cancels in float32 far from the origin (38% off for sets around 1000).
    centre = jnp.mean(jnp.concatenate([x, y]), axis=0)
    x, y = x - centre, y - centre
    n, m = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    # Unbiased U-statistic (Gretton et al. 2012, eq. 3): drop the i == j terms, whose kernel value is 1.
    term_xx = (jnp.sum(k_xx) - jnp.trace(k_xx)) / (n * (n - 1))
    term_yy = (jnp.sum(k_yy) - jnp.trace(k_yy)) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * jnp.mean(k_xy)


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with kernel exp(-|a - b|^2 / (2 h^2)) between [n, d] and [m, d] sets.

    bandwidth None: the median heuristic, h = median pairwise distance of the pooled set (computed on at most
    2,000 pooled points). Unbiased, so it can be slightly negative when both sets come from one distribution.
    Memory is O((n + m)^2).
    """
    x, y = _check_vectors(x, y)
    if bandwidth is None:
        bandwidth = _median_heuristic(jnp.concatenate([x, y]))
        if not np.isfinite(bandwidth):  # NaN or inf points (a diverged model) score NaN, as with a given bandwidth
            return float("nan")
        if bandwidth == 0:
            raise ValueError("the median heuristic's bandwidth is 0: most pooled points coincide; pass a bandwidth")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return float(_mmd_rbf(x, y, jnp.float32(bandwidth)))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (float64) of [n, d] features, as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected [n >= 2, dim] features, got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))  # [1, 1], not 0-d, for d = 1


class RunningGaussianStats:
    """gaussian_stats of feature batches seen one at a time, holding O(d^2) numbers instead of every row.

    Rows are buffered and merged ``merge_rows`` at a time into a mean and a centred sum of squares by Chan, Golub
    & LeVeque's pairwise update (1979), in float64: the result equals gaussian_stats of all the rows at once up
    to rounding, without the cancellation of sums of raw squares. Merging a few thousand rows at once keeps the
    products as fast as np.cov's single one (benchmarks/NOTES.md: merging every batch of 100 was 4.8x slower).
    """

    def __init__(self, merge_rows: int = 2048) -> None:
        if merge_rows < 1:
            raise ValueError(f"merge_rows must be positive, got {merge_rows}")
        self.merge_rows = merge_rows
        self.count = 0  # rows merged, not counting the buffer
        self.mean: np.ndarray | None = None
        self.centered_squares: np.ndarray | None = None  # sum over merged rows of (x - mean)(x - mean)^T
        self._buffer: np.ndarray | None = None
        self._buffered = 0

    def update(self, features) -> None:
        """Add the rows of ``features`` [n, d] (n >= 1)."""
        features = np.asarray(features, dtype=np.float64)
        dim = "dim" if self._buffer is None else self._buffer.shape[1]
        if features.ndim != 2 or features.shape[0] < 1 or (self._buffer is not None and features.shape[1] != dim):
            raise ValueError(f"expected [n >= 1, {dim}] features, got shape {features.shape}")
        if self._buffer is None:
            self._buffer = np.empty((self.merge_rows, features.shape[1]))
        while len(features):
            take = min(len(features), self.merge_rows - self._buffered)
            self._buffer[self._buffered : self._buffered + take] = features[:take]
            self._buffered, features = self._buffered + take, features[take:]
            if self._buffered == self.merge_rows:
                self._merge_buffer()

    def _merge_buffer(self) -> None:
        rows, self._buffered = self._buffer[: self._buffered], 0
        if not len(rows):
            return
        batch_mean = rows.mean(axis=0)
        rows -= batch_mean  # the buffer is ours to overwrite
        batch_squares = rows.T @ rows
        if self.count == 0:
            self.count, self.mean, self.centered_squares = len(rows), batch_mean, batch_squares
            return
        total = self.count + len(rows)
        delta = batch_mean - self.mean
        batch_squares += np.outer(delta, delta * (self.count * len(rows) / total))
        self.centered_squares += batch_squares
        self.mean = self.mean + delta * (len(rows) / total)
        self.count = total

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [d] and unbiased covariance [d, d] of all rows added."""
        if self._buffer is not None:
            self._merge_buffer()
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.mean.copy(), self.centered_squares / (self.count - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance; eigenvalues within rounding of 0 (below 16 eps times the
    largest: the zero ones of a singular covariance) count as 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    rounding = 16 * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    return (eigenvectors * np.sqrt(np.where(eigenvalues > rounding, eigenvalues, 0.0))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians (Dowson & Landau 1982).

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2) (similar matrices), which is the sum of the singular values of
    S1^(1/2) S2^(1/2): two symmetric square roots and one SVD in float64 instead of pytorch-fid's general
    `sqrtm(S1 @ S2)`, the same value for full-rank covariances and finite for the singular covariances of fewer
    samples than dimensions. Only the square roots' eigenvalues are cut at rounding level, so a covariance
    conditioned up to 2.8e14 keeps all of its own. The eigenvalues of S1^(1/2) S2 S1^(1/2), used before, square
    the condition number: the same cut there also dropped the real small eigenvalues of ill-conditioned
    covariances (the FID of such a statistic with itself was 5e-4 at d = 256, not 0).
    NaN where a statistic is not finite (from a NaN or infinite sample).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        return float("nan")  # NumPy's eigensolvers raise on NaN
    diff = mu1 - mu2
    trace_covmean = np.linalg.svd(_psd_sqrt(sigma1) @ _psd_sqrt(sigma2), compute_uv=False).sum()
    # A distance: what rounding leaves below 0 is 0.
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean), 0.0)


def split_disjoint(data, num_samples: int, key_or_seed) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random draws of num_samples rows each from data [N, ...] (needs N >= 2 * num_samples)."""
    data = np.asarray(data)
    if data.shape[0] < 2 * num_samples:
        raise ValueError(
            f"need at least 2 * {num_samples} data points for two disjoint draws, got {data.shape[0]}: "
            "lower the number of samples or pass more data"
        )
    order = np.asarray(jax.random.permutation(_as_key(key_or_seed), data.shape[0]))
    return data[order[:num_samples]], data[order[num_samples : 2 * num_samples]]


def data_baseline(metric: Callable, data, num_samples: int, key_or_seed) -> float:
    """metric(a, b) between two disjoint draws of num_samples real points: the value a perfect model gets."""
    first, second = split_disjoint(data, num_samples, key_or_seed)
    return metric(first, second)


def lowdim_metrics(samples, data, key_or_seed=0, num_projections: int = 256) -> dict[str, float]:
    """SWD and MMD of samples [n, d] vs n held-out data points, beside the same metrics data-vs-data.

    data needs at least 2n points: draw A is the reference for both rows, draw B plays a perfect model.
    Returns swd, swd_data, mmd, mmd_data (mmd is the unbiased squared MMD, median-heuristic bandwidth
    fixed from the reference and draw B so both rows use the same kernel).
    """
    samples = np.asarray(samples, np.float32)
    key = _as_key(key_or_seed)
    split_key, projection_key = jax.random.split(key)
    reference, data_draw = split_disjoint(data, samples.shape[0], split_key)
    bandwidth = _median_heuristic(np.concatenate([reference, data_draw]))
    return {
        "swd": sliced_wasserstein(samples, reference, projection_key, num_projections),
        "swd_data": sliced_wasserstein(data_draw, reference, projection_key, num_projections),
        "mmd": mmd_rbf(samples, reference, bandwidth),
        "mmd_data": mmd_rbf(data_draw, reference, bandwidth),
    }
