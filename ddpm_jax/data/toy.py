"""2-D toy distributions as pure NumPy samplers, each centred and scaled so the mean per-axis variance is 1.

Every set is scaled by one isotropic factor (shapes are not distorted), chosen in closed form where the
variance has one, otherwise measured once on 4 million samples and written down here.
"""

from collections.abc import Callable

import numpy as np

__all__ = ["TOY_SETS", "sample_toy"]

_SWISSROLL_CENTER = np.array([2.0, 0.21])
_SWISSROLL_SCALE = 6.81  # sqrt of the mean per-axis variance (6.64^2 + 6.97^2) / 2, measured
_MOONS_CENTER = np.array([0.5, 0.25])
_MOONS_SCALE = 0.712  # sqrt((0.872^2 + 0.504^2) / 2), measured
_GAUSSIANS_STD = 0.1
# Per-axis variance of 8 equal-weight points on a circle of radius r is r^2 / 2, plus the component variance.
_GAUSSIANS_RADIUS = float(np.sqrt(2.0 * (1.0 - _GAUSSIANS_STD**2)))
_CIRCLES_NOISE = 0.05
# Radii 1 and 0.5 in equal parts: per-axis variance (1 + 0.25) / 4 plus the noise variance.
_CIRCLES_SCALE = float(np.sqrt((1.0 + 0.25) / 4.0 + _CIRCLES_NOISE**2))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    """A 2-D swiss roll (angle t in [1.5 pi, 4.5 pi], point t (cos t, sin t)) with Gaussian noise 0.5."""
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + 0.5 * rng.standard_normal((n, 2))
    return (points - _SWISSROLL_CENTER) / _SWISSROLL_SCALE


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaving half circles with Gaussian noise 0.1."""
    angle = np.pi * rng.random(n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return (points - _MOONS_CENTER) / _MOONS_SCALE


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """Eight equally weighted Gaussians (std 0.1) on a circle, per-axis variance exactly 1."""
    angle = rng.integers(0, 8, size=n) * (np.pi / 4.0)
    centers = _GAUSSIANS_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return centers + _GAUSSIANS_STD * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 'black' unit squares of a 4x4 board on [-2, 2]^2, scaled to unit per-axis variance."""
    x = rng.uniform(-2.0, 2.0, size=n)
    column = np.floor(x)
    # In each column the filled squares are the two rows whose index has the column's parity.
    row = 2.0 * rng.integers(0, 2, size=n) - 2.0 + np.mod(column, 2.0)
    y = row + rng.random(n)
    # Both marginals are uniform on [-2, 2], variance 16 / 12.
    return np.stack([x, y], axis=1) / np.sqrt(4.0 / 3.0)


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two concentric circles (radii 1 and 0.5, equal parts) with Gaussian noise 0.05."""
    angle = 2.0 * np.pi * rng.random(n)
    radius = np.where(rng.random(n) < 0.5, 1.0, 0.5)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (points + _CIRCLES_NOISE * rng.standard_normal((n, 2))) / _CIRCLES_SCALE


TOY_SETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "swissroll": _swissroll,
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
}


def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points float32 [n, 2] of the 2-D set `name`, drawn with the NumPy generator `rng`."""
    if name not in TOY_SETS:
        raise ValueError(f"unknown 2-D data set {name!r}; choose one of {sorted(TOY_SETS)}")
    if n < 0:
        raise ValueError(f"number of points must be >= 0, got {n}")
    return TOY_SETS[name](n, rng).astype(np.float32)
