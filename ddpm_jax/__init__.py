"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) as pure JAX functions."""

from ddpm_jax.diffusion import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    PMeanVariance,
    p_mean_variance,
    p_sample,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_v,
    predict_x0_from_eps,
    predict_x0_from_v,
    predict_x0_from_xprev,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    q_step,
    training_losses,
    vb_terms_bpd,
)
from ddpm_jax.gaussians import discretized_gaussian_log_likelihood, normal_kl
from ddpm_jax.likelihood import BpdResult, RateDistortion, calc_bpd_loop, prior_bpd, rate_distortion
from ddpm_jax.sampling import Trajectory, ddim_sample, ddim_timesteps, ddpm_sample, interpolate, sample_from_latent
from ddpm_jax.schedules import SCHEDULES, Schedule, beta_schedule, make_schedule, make_schedule_from_betas

__version__ = "0.1.0"

__all__ = [
    "LOSS_TYPES",
    "MEAN_TYPES",
    "SCHEDULES",
    "VAR_TYPES",
    "BpdResult",
    "PMeanVariance",
    "RateDistortion",
    "Schedule",
    "Trajectory",
    "beta_schedule",
    "calc_bpd_loop",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "interpolate",
    "make_schedule",
    "make_schedule_from_betas",
    "normal_kl",
    "p_mean_variance",
    "p_sample",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "predict_x0_from_xprev",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "q_step",
    "rate_distortion",
    "sample_from_latent",
    "training_losses",
    "vb_terms_bpd",
]
