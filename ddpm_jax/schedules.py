"""Variance schedules beta_1..beta_T and every quantity derived from them (Ho et al. 2020, Sec. 2).

Arrays are computed in float64 with NumPy and stored as float32, so that cumulative products over 1000 steps
do not accumulate float32 rounding. Index ``t`` in [0, T-1] stands for the paper's timestep t + 1.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid", "constant", "jsd")
BETA_DEFAULTS = {"beta_start": 1e-4, "beta_end": 0.02}  # the DDPM paper's, where a schedule takes them
SCHEDULE_ARGUMENTS = {  # the keyword arguments each schedule of `beta_schedule` takes
    "linear": {"beta_start", "beta_end"},
    "quadratic": {"beta_start", "beta_end"},
    "sigmoid": {"beta_start", "beta_end"},
    "constant": {"beta_end"},
    "cosine": {"s", "max_beta"},
    "jsd": {"max_beta"},
}


@flax.struct.dataclass
class Schedule:
    """Precomputed diffusion coefficients, each a float32 array of shape [T]."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    num_timesteps: int = flax.struct.field(pytree_node=False)


def check_integer(name: str, value) -> int:
    """``value`` (a Python, NumPy or 0-d JAX integer) as an int; a float or bool is refused, not truncated."""
    integer_array = getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.integer)
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) or integer_array):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_num_timesteps(num_timesteps) -> int:
    num_timesteps = check_integer("num_timesteps", num_timesteps)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return num_timesteps


def _cosine_betas(num_timesteps: int, s: float, max_beta: float) -> np.ndarray:
    """Improved DDPM Eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alphas_cumprod = f / f[0]
    return np.minimum(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def beta_schedule(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """float64 betas [T] of a named schedule.

    linear/quadratic/constant/jsd follow the DDPM code (beta_start=1e-4, beta_end=0.02); cosine is Improved
    DDPM's (s=0.008, betas clipped at max_beta=0.999); sigmoid spaces betas along sigmoid(-6..6).
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if name not in SCHEDULE_ARGUMENTS:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    unknown = set(kwargs) - SCHEDULE_ARGUMENTS[name]
    if unknown:
        raise ValueError(f"schedule {name!r} takes {sorted(SCHEDULE_ARGUMENTS[name])}, got unexpected "
                         f"{sorted(unknown)}")
    beta_start = float(kwargs.get("beta_start", BETA_DEFAULTS["beta_start"]))
    beta_end = float(kwargs.get("beta_end", BETA_DEFAULTS["beta_end"]))
    max_beta = float(kwargs.get("max_beta", 0.999))
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if name == "quadratic":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)))
        return sig * (beta_end - beta_start) + beta_start
    if name == "constant":
        return np.full(num_timesteps, beta_end, dtype=np.float64)
    if name == "cosine":
        return _cosine_betas(num_timesteps, float(kwargs.get("s", 0.008)), max_beta)
    # jsd: 1/T, 1/(T-1), ..., 1; the last beta = 1 makes q(x_T|x_0) = N(0, I) exactly but leaves
    # x_0 unrecoverable from eps at t = T, so it is clipped at max_beta like the cosine schedule.
    return np.minimum(1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64), max_beta)


def make_schedule_from_betas(betas) -> Schedule:
    """All coefficients of Ho et al. 2020 Eqs. 4, 6-7 from betas [T], computed in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)):
        raise ValueError("betas contain non-finite values (nan or inf)")
    if np.any(betas <= 0.0) or np.any(betas >= 1.0):
        bad = betas[(betas <= 0.0) | (betas >= 1.0)]
        raise ValueError(f"betas must lie in the open interval (0, 1); found {bad[:5].tolist()}")
    return _schedule_from_log_alphas(np.log1p(-betas))


def _schedule_from_log_alphas(log_alphas: np.ndarray) -> Schedule:
    """`make_schedule_from_betas` from log(1 - beta_t) [T] (negative, float64).

    From logs, alphas_cumprod keeps its relative precision where it is tiny: at the end of a long chain, and in a
    respaced chain's last step, whose alpha (e.g. 2.6e-18) is lost to rounding in 1 - beta.
    """
    betas = -np.expm1(log_alphas)
    log_alphas_cumprod = np.cumsum(log_alphas)
    alphas_cumprod = np.exp(log_alphas_cumprod)
    one_minus_alphas_cumprod = -np.expm1(log_alphas_cumprod)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus_alphas_cumprod_prev = np.append(0.0, one_minus_alphas_cumprod[:-1])
    posterior_variance = betas * one_minus_alphas_cumprod_prev / one_minus_alphas_cumprod
    # posterior_variance[0] is 0 (x_0 is known given x_1); its log is clipped to the next value as in the
    # DDPM code, which only matters for the learned_range interpolation at t = 0.
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if betas.shape[0] > 1 else betas
    arrays = dict(
        betas=betas,
        alphas=np.exp(log_alphas),
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.exp(0.5 * log_alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log1p(-alphas_cumprod),  # -abar where abar is tiny, not 0
        sqrt_recip_alphas_cumprod=np.exp(-0.5 * log_alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(np.expm1(-log_alphas_cumprod)),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus_alphas_cumprod,
        posterior_mean_coef2=one_minus_alphas_cumprod_prev * np.exp(0.5 * log_alphas) / one_minus_alphas_cumprod,
    )
    with np.errstate(over="ignore"):  # reported below
        stored = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    for key, value in stored.items():
        if not np.all(np.isfinite(value)):
            # Stored as float32: e.g. 1 / sqrt(alphas_cumprod) overflows once alphas_cumprod < 1e-76.
            raise ValueError(f"schedule quantity {key} is not finite in float32 (alphas_cumprod falls to "
                             f"{alphas_cumprod[-1]:.2g}); use fewer timesteps or smaller betas")
    return Schedule(**{k: jnp.asarray(v) for k, v in stored.items()}, num_timesteps=int(betas.shape[0]))


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """Schedule for a named beta schedule (see `beta_schedule`)."""
    return make_schedule_from_betas(beta_schedule(name, num_timesteps, **kwargs))


def respace_schedule(schedule: Schedule, timesteps) -> Schedule:
    """The schedule of a chain that visits only ``timesteps`` (increasing indices into ``schedule``), Nichol &
    Dhariwal 2021, Sec. 4: its alphas_cumprod are the original's at those steps, so its betas are
    beta_i = 1 - alphas_cumprod[t_i] / alphas_cumprod[t_{i-1}] (alphas_cumprod[t_{-1}] = 1).

    Computed in float64 from the schedule's float32 betas and alphas; they and ``timesteps`` must be concrete
    (not traced).
    """
    try:
        timesteps = np.asarray(timesteps)
        betas, alphas = np.asarray(schedule.betas, np.float64), np.asarray(schedule.alphas, np.float64)
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError("a respaced chain needs the values of the schedule and its timesteps: close over them "
                         "instead of passing them through jit") from err
    num_timesteps = schedule.num_timesteps
    if timesteps.ndim != 1 or not len(timesteps) or not np.issubdtype(timesteps.dtype, np.integer) \
            or timesteps[0] < 0 or timesteps[-1] >= num_timesteps or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"timesteps must be integers increasing strictly within [0, {num_timesteps - 1}], "
                         f"got {timesteps}")
    # log alpha from whichever float32 value holds it to ~1e-7 relative: 1 - beta for small betas, alpha for large.
    with np.errstate(divide="ignore"):  # log1p(-1) of a beta stored as 1.0 is not the branch taken
        log_alphas = np.where(betas < 0.5, np.log1p(-betas), np.log(alphas))
    log_alphas_cumprod = np.append(0.0, np.cumsum(log_alphas)[timesteps])
    return _schedule_from_log_alphas(np.diff(log_alphas_cumprod))
