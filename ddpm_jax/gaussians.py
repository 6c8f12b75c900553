"""Gaussian log-densities and divergences used by the variational bound (Ho et al. 2020, Sec. 3.3)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import log_ndtr


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_diff_exp(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """log(exp(a) - exp(b)) for a >= b; 1 - exp(b - a) is floored at 1e-12, a floor relative to exp(a)."""
    return a + jnp.log(jnp.maximum(-jnp.expm1(b - a), 1e-12))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, *, means: jnp.ndarray, log_scales: jnp.ndarray) -> jnp.ndarray:
    """Elementwise log p(x_0 | x_1) of the discretized Gaussian decoder, Eq. 13.

    ``x`` holds 8-bit data rescaled to [-1, 1] (bins of width 2/255); the edge bins extend to -inf and +inf.
    Uses the exact normal CDF in log space; the tail nearer to the bin is used for precision. 16-bit inputs are
    computed in float32.
    """
    dtype = jnp.promote_types(jnp.result_type(x, means, log_scales), jnp.float32)
    x, means, log_scales = (jnp.asarray(a, dtype) for a in (x, means, log_scales))
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    upper = inv_stdv * (centered + 1.0 / 255.0)
    lower = inv_stdv * (centered - 1.0 / 255.0)
    # Phi(upper) - Phi(lower) == Phi(-lower) - Phi(-upper): take the form whose CDFs are away from 1.
    flip = (upper + lower) > 0
    hi = jnp.where(flip, -lower, upper)
    lo = jnp.where(flip, -upper, lower)
    log_mid = _log_diff_exp(log_ndtr(hi), log_ndtr(lo))
    log_cdf_upper = log_ndtr(upper)  # bin (-inf, -1 + 1/255]
    log_one_minus_cdf_lower = log_ndtr(-lower)  # bin [1 - 1/255, inf)
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_mid))
