"""Closed-form oracles for Gaussian data x_0 ~ N(mu, s^2 I), where the optimal denoiser is known exactly."""

import math

import jax.numpy as jnp
import numpy as np


def gaussian_posterior_x0(schedule, x_t, t, mu, s):
    """E[x_0 | x_t] and Var[x_0 | x_t] for x_0 ~ N(mu, s^2), x_t = a x_0 + b eps (Gaussian conditioning)."""
    shape = (t.shape[0],) + (1,) * (x_t.ndim - 1)
    a = schedule.sqrt_alphas_cumprod[t].reshape(shape)
    b2 = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[t]).reshape(shape)
    var_xt = a**2 * s**2 + b2
    mean = mu + a * s**2 / var_xt * (x_t - a * mu)
    var = s**2 * b2 / var_xt
    return mean, var


def optimal_eps_fn(schedule, mu, s):
    """model_fn(x_t, t) = E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), the minimiser of L_simple."""

    def model_fn(x_t, t):
        shape = (t.shape[0],) + (1,) * (x_t.ndim - 1)
        a = schedule.sqrt_alphas_cumprod[t].reshape(shape)
        b = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(shape)
        return b * (x_t - a * mu) / (a**2 * s**2 + b**2)

    return model_fn


def exact_reverse_fn(schedule, mu, s):
    """[eps, log-variance] output (var_type 'learned') that makes p_theta(x_{t-1}|x_t) = q(x_{t-1}|x_t) exactly.

    For Gaussian data q(x_{t-1}|x_t) is Gaussian with mean coef1 E[x_0|x_t] + coef2 x_t and variance
    beta~_t + coef1^2 Var[x_0|x_t].
    """
    eps_fn = optimal_eps_fn(schedule, mu, s)

    def model_fn(x_t, t):
        shape = (t.shape[0],) + (1,) * (x_t.ndim - 1)
        _, var_x0 = gaussian_posterior_x0(schedule, x_t, t, mu, s)
        coef1 = schedule.posterior_mean_coef1[t].reshape(shape)
        variance = schedule.posterior_variance[t].reshape(shape) + coef1**2 * var_x0
        return jnp.concatenate([eps_fn(x_t, t), jnp.broadcast_to(jnp.log(variance), x_t.shape)], axis=-1)

    return model_fn


def discretized_gaussian_entropy_bits(mu, s):
    """Exact entropy (= NLL under the true distribution) in bits of N(mu, s^2) quantised to 256 bins in [-1, 1]."""
    from scipy.stats import norm

    centers = -1.0 + 2.0 * np.arange(256) / 255.0
    edges = np.concatenate([[-np.inf], centers[:-1] + 1.0 / 255.0, [np.inf]])
    p = np.diff(norm.cdf(edges, loc=mu, scale=s))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()), centers, np.diff(norm.cdf(edges, loc=mu, scale=s))


def ddim_quadratic_timesteps(T, num_steps):
    """DDIM's quadratic steps floor(c i^2), c = (T-1)/(num_steps-1)^2, a repeat moved one past its predecessor."""
    taus = []
    for i in range(num_steps):
        tau = math.floor((T - 1) * i * i / (num_steps - 1) ** 2)
        taus.append(tau if not taus or tau > taus[-1] else taus[-1] + 1)
    return np.array(taus[::-1])


def linear_chain_moments(betas, mu, s, *, sampler, var_type="fixedlarge", num_steps=None, eta=0.0,
                         spacing="linear", alphas_cumprod=None):
    """Exact mean and std of a sampler's output for Gaussian data with the optimal eps model, in float64.

    With x_0 ~ N(mu, s^2) every step is x_s = c x_t + d + sigma z, so the moments of N(0, 1) started chains
    follow a scalar recursion: an independent NumPy oracle for `ddpm_sample` and `ddim_sample`.
    ``alphas_cumprod`` replaces ``betas`` where 1 - beta rounds away (a step from alphas_cumprod 1e-18 to 1).
    """
    abar = np.cumprod(1 - np.asarray(betas, np.float64)) if alphas_cumprod is None else np.asarray(alphas_cumprod)
    T = len(abar)
    abar_prev = np.append(1.0, abar[:-1])
    alphas = abar / abar_prev
    betas = 1 - alphas
    if sampler == "ddpm":
        ts = np.arange(T - 1, -1, -1)
        prev = ts - 1
    else:
        if spacing == "linear":
            ts = np.round(np.linspace(T - 1, 0, num_steps)).astype(int)
        else:
            ts = ddim_quadratic_timesteps(T, num_steps)
        prev = np.append(ts[1:], -1)
    m, v = 0.0, 1.0
    for t, p in zip(ts, prev, strict=True):
        a, b = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        V = a * a * s * s + b * b
        ce, de = b / V, -b * a * mu / V  # eps_hat = ce x + de
        cx0, dx0 = (1 - b * ce) / a, -b * de / a  # x0_hat = cx0 x + dx0
        if sampler == "ddpm":
            coef1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
            coef2 = (1 - abar_prev[t]) * np.sqrt(alphas[t]) / (1 - abar[t])
            c, d = coef1 * cx0 + coef2, coef1 * dx0
            post = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
            if t == 0:
                var = 0.0
            elif var_type == "fixedsmall":
                var = post
            else:
                var = betas[t]
        else:
            abar_s = abar[p] if p >= 0 else 1.0
            var = eta**2 * (1 - abar_s) / (1 - abar[t]) * (1 - abar[t] / abar_s)
            k = np.sqrt(1 - abar_s - var)
            c, d = np.sqrt(abar_s) * cx0 + k * ce, np.sqrt(abar_s) * dx0 + k * de
        m, v = c * m + d, c * c * v + var
    return m, np.sqrt(v)
