"""Samplers and the bound in bits/dim against the analytic oracle for Gaussian data x_0 ~ N(mu, s^2 I)."""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj
from tests.oracles import (
    ddim_quadratic_timesteps,
    discretized_gaussian_entropy_bits,
    exact_reverse_fn,
    gaussian_posterior_x0,
    linear_chain_moments,
    optimal_eps_fn,
)

T = 1000
SCHEDULE = dj.make_schedule("linear", T)
MU, S = 0.3, 0.25
N = 4096  # samples of a 4-dim vector: 16k draws per statistic


def _check_moments(x, mu, var, n, sigmas=6.0, extra=0.0):
    """Sample mean and variance within ``sigmas`` MC standard errors (plus ``extra`` model bias)."""
    assert abs(float(x.mean()) - mu) < sigmas * math.sqrt(var / n) + extra
    assert abs(float(x.var()) - var) < sigmas * var * math.sqrt(2 / n) + extra


def test_exact_reverse_process_reproduces_the_data():
    """p_theta = q(x_{t-1}|x_t) exactly ('learned' variance): ancestral samples are N(mu, s^2) up to MC error."""
    sample = jax.jit(
        lambda key: dj.ddpm_sample(
            exact_reverse_fn(SCHEDULE, MU, S), SCHEDULE, key, (N, 4), var_type="learned", clip_denoised=False
        )
    )
    x = sample(jax.random.PRNGKey(0))
    _check_moments(x, MU, S**2, x.size)


BETAS = np.linspace(1e-4, 0.02, T)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_optimal_eps_with_fixed_variances_matches_exact_chain_moments(var_type):
    """The L_simple-optimal eps model with fixed variances: the output moments of the linear-Gaussian chain."""
    x = jax.jit(
        lambda key: dj.ddpm_sample(
            optimal_eps_fn(SCHEDULE, MU, S), SCHEDULE, key, (N, 4), var_type=var_type, clip_denoised=False
        )
    )(jax.random.PRNGKey(1))
    mean, std = linear_chain_moments(BETAS, MU, S, sampler="ddpm", var_type=var_type)
    _check_moments(x, mean, std**2, x.size)
    assert abs(std - S) < 0.05 * S  # and the chain is within 5% of the data


@pytest.mark.parametrize("num_steps, eta, spacing", [(100, 0.0, "linear"), (20, 0.5, "linear"), (10, 0.0, "quadratic")])
def test_ddim_matches_exact_chain_moments(num_steps, eta, spacing):
    """DDIM with the exact eps model against the same recursion; eta = 0 at 100 steps reaches std 0.95 s.

    At 10 quadratic steps the oracle's std is 0.80 s against 0.55 s for 10 linear ones, so the quadratic case
    fails if the spacing is not passed on.
    """
    x = jax.jit(
        lambda key: dj.ddim_sample(
            optimal_eps_fn(SCHEDULE, MU, S), SCHEDULE, key, (N, 4), num_steps=num_steps, eta=eta, spacing=spacing,
            clip_denoised=False,
        )
    )(jax.random.PRNGKey(2))
    mean, std = linear_chain_moments(BETAS, MU, S, sampler="ddim", num_steps=num_steps, eta=eta, spacing=spacing)
    _check_moments(x, mean, std**2, x.size)


def test_ddim_on_a_schedule_whose_alphas_cumprod_underflow_float32():
    """T = 12000 linear steps: alphas_cumprod is 0 in float32 over the last 897 steps, where abar_t / abar_s was
    0 / 0 and DDIM returned NaN; from the square roots the chain follows the float64 recursion."""
    long = dj.make_schedule("linear", 12000)
    x = jax.jit(
        lambda key: dj.ddim_sample(optimal_eps_fn(long, MU, S), long, key, (N, 4), 1000, 0.5, clip_denoised=False)
    )(jax.random.PRNGKey(9))
    mean, std = linear_chain_moments(np.linspace(1e-4, 0.02, 12000), MU, S, sampler="ddim", num_steps=1000, eta=0.5)
    _check_moments(x, mean, std**2, x.size)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        dj.ddim_sample(optimal_eps_fn(long, MU, S), long, jax.random.PRNGKey(9), (2, 4), 10, 1.5)


def test_a_chain_respaced_to_one_or_two_steps_of_a_long_schedule():
    """T = 4000: one step goes from x_T straight to x_0 (beta = 1 - 2.6e-18, refused before); one and two steps
    of the exact model land where the float64 recursion says. (The model predicts x_0: its x_0 from eps would be
    (x_t - b eps) / 1.6e-9 at t = T, float32 rounding times 6e8.)"""
    long = dj.make_schedule("linear", 4000)
    x0_model = lambda x_t, t: gaussian_posterior_x0(long, x_t, t, MU, S)[0]  # noqa: E731
    for num_steps in (1, 2):
        x = dj.ddpm_sample(x0_model, long, jax.random.PRNGKey(num_steps), (N, 4), num_steps=num_steps,
                           mean_type="x0", var_type="fixedsmall", clip_denoised=False)
        kept = np.linspace(3999, 0, num_steps).round().astype(int)[::-1]  # from T - 1 down
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 4000))[kept]
        mean, std = linear_chain_moments(None, MU, S, sampler="ddpm", var_type="fixedsmall", alphas_cumprod=abar)
        _check_moments(x, mean, std**2, x.size, extra=1e-6)  # one step: x_0 = E[x_0 | x_T], var 1e-10


def _optimal_xprev_fn(schedule, mu, s):
    """The posterior mean of one original step, from the optimal eps: what a mean_type 'xprev' model predicts."""
    eps_fn = optimal_eps_fn(schedule, mu, s)

    def model_fn(x_t, t):
        x0 = dj.predict_x0_from_eps(schedule, x_t, t, eps_fn(x_t, t))
        return dj.q_posterior_mean_variance(schedule, x0, x_t, t)[0]

    return model_fn


@pytest.mark.parametrize("num_steps, spacing, var_type, mean_type",
                         [(100, "linear", "fixedlarge", "eps"), (20, "quadratic", "fixedsmall", "eps"),
                          (20, "linear", "fixedlarge", "xprev")])
def test_respaced_ancestral_chain_matches_exact_chain_moments(num_steps, spacing, var_type, mean_type):
    """ddpm_sample(num_steps=S): the ancestral chain on betas respaced from alphas_cumprod at S steps (written
    here in float64), with the model at the original t: 100 linear steps end at std 1.046 s, 20 quadratic ones at
    0.81 s (a model called at the respaced indices would be far off). An xprev model predicts one original step;
    taken as the mean of a respaced step it ended at mean 0.02 and std 2.3 for N(0.3, 0.2^2) data at 10 steps
    (fixedsmall; the eps model's chain: 0.30 and 0.086)."""
    model_fn = (_optimal_xprev_fn if mean_type == "xprev" else optimal_eps_fn)(SCHEDULE, MU, S)
    x = jax.jit(
        lambda key: dj.ddpm_sample(
            model_fn, SCHEDULE, key, (N, 4), var_type=var_type, clip_denoised=False, num_steps=num_steps,
            spacing=spacing, mean_type=mean_type,
        )
    )(jax.random.PRNGKey(5))
    kept = (np.linspace(0, T - 1, num_steps).round().astype(int) if spacing == "linear"
            else ddim_quadratic_timesteps(T, num_steps)[::-1])
    abar = np.cumprod(1 - BETAS)[kept]
    mean, std = linear_chain_moments(1 - abar / np.append(1.0, abar[:-1]), MU, S, sampler="ddpm", var_type=var_type)
    _check_moments(x, mean, std**2, x.size)


def test_quadratic_ddim_timesteps_match_the_formula():
    """floor(c i^2) from T-1 down to 0, each step distinct, for every step count of small T and a sweep of 1000."""
    for T, step_counts in [(2, range(2, 3)), (7, range(2, 8)), (100, range(2, 101)), (1000, range(2, 1001, 7))]:
        for num_steps in step_counts:
            taus = dj.ddim_timesteps(T, num_steps, "quadratic")
            np.testing.assert_array_equal(taus, ddim_quadratic_timesteps(T, num_steps))
            assert taus[0] == T - 1 and taus[-1] == 0 and np.all(np.diff(taus) < 0)
    # Past the first few steps no floor repeats, and the steps are the paper's floor(c i^2) themselves.
    taus = dj.ddim_timesteps(1000, 50, "quadratic")[::-1]
    i = np.arange(10, 50)
    np.testing.assert_array_equal(taus[10:], np.floor(999 * i**2 / 49**2))
    assert dj.ddim_timesteps(1000, 1, "quadratic").tolist() == [999]
    with pytest.raises(ValueError, match="spacing"):
        dj.ddim_timesteps(1000, 10, "cosine")


def test_linear_ddim_timesteps_are_rounded_even_steps():
    """round(linspace(T-1, 0, n)), numbers written out: floor gave 499 for the middle of 3 steps of 1000."""
    assert dj.ddim_timesteps(1000, 3).tolist() == [999, 500, 0]
    assert dj.ddim_timesteps(1000, 7).tolist() == [999, 832, 666, 500, 333, 166, 0]
    assert dj.ddim_timesteps(10, 4).tolist() == [9, 6, 3, 0]
    taus = dj.ddim_timesteps(1000, 50)
    assert taus[0] == 999 and taus[-1] == 0 and set(-np.diff(taus)) == {20, 21}  # 999 / 49 = 20.39


SMALL_T = 20
SMALL = dj.make_schedule("linear", SMALL_T, beta_start=1e-3, beta_end=0.3)


def _loop_sampler(model_fn, key, shape, var_type):
    """Reference: a Python loop of p_sample steps with the documented key derivation."""
    init_key, step_key = dj.sampling.chain_keys(key)
    x = jax.random.normal(init_key, shape)
    for t in range(SMALL_T - 1, -1, -1):
        x, _ = dj.p_sample(
            SMALL, model_fn, x, jnp.full((shape[0],), t), jax.random.fold_in(step_key, t), var_type=var_type
        )
    return x


@pytest.mark.parametrize("var_type", ["fixedlarge", "learned"])
def test_scan_sampler_equals_python_loop(var_type):
    model_fn = exact_reverse_fn(SMALL, MU, S) if var_type == "learned" else optimal_eps_fn(SMALL, MU, S)
    key = jax.random.PRNGKey(3)
    scanned = dj.ddpm_sample(model_fn, SMALL, key, (5, 2, 2, 1), var_type=var_type)
    looped = _loop_sampler(model_fn, key, (5, 2, 2, 1), var_type)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)


def test_all_t_steps_are_the_full_chain_whatever_the_spacing():
    """num_steps = T keeps every step under either spacing; a spacing without num_steps is refused."""
    model_fn = optimal_eps_fn(SMALL, MU, S)
    key = jax.random.PRNGKey(4)
    full = dj.ddpm_sample(model_fn, SMALL, key, (5, 3))
    for spacing in dj.sampling.TIMESTEP_SPACINGS:
        np.testing.assert_array_equal(
            dj.ddpm_sample(model_fn, SMALL, key, (5, 3), num_steps=SMALL_T, spacing=spacing), full)
    with pytest.raises(ValueError, match="give num_steps < T too"):
        dj.ddpm_sample(model_fn, SMALL, key, (5, 3), spacing="quadratic")


def test_chain_from_a_given_state_equals_the_loop_from_that_step():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    key, start_t = jax.random.PRNGKey(7), 8
    x_start = jax.random.normal(jax.random.PRNGKey(8), (5, 3))
    scanned = dj.ddpm_sample(model_fn, SMALL, key, (5, 3), x_start=x_start, start_t=start_t)
    _, step_key = dj.sampling.chain_keys(key)
    x = x_start
    for t in range(start_t, -1, -1):
        x, _ = dj.p_sample(SMALL, model_fn, x, jnp.full((5,), t), jax.random.fold_in(step_key, t))
    np.testing.assert_allclose(scanned, x, rtol=1e-5, atol=1e-5)
    # x_T given is the usual chain from that x_T.
    init_key, _ = dj.sampling.chain_keys(key)
    x_T = jax.random.normal(init_key, (5, 3))
    np.testing.assert_array_equal(dj.ddpm_sample(model_fn, SMALL, key, (5, 3), x_start=x_T),
                                  dj.ddpm_sample(model_fn, SMALL, key, (5, 3)))
    with pytest.raises(ValueError, match="pass it as x_start"):
        dj.ddpm_sample(model_fn, SMALL, key, (5, 3), start_t=start_t)
    with pytest.raises(ValueError, match=r"start_t must be in \[0, 19\]"):
        dj.ddpm_sample(model_fn, SMALL, key, (5, 3), x_start=x_start, start_t=SMALL_T)
    with pytest.raises(ValueError, match="start_t must be an integer, got 2.7"):  # was truncated to 2
        dj.ddpm_sample(model_fn, SMALL, key, (5, 3), x_start=x_start, start_t=2.7)
    np.testing.assert_array_equal(dj.ddpm_sample(model_fn, SMALL, key, (5, 3), x_start=x_start, start_t=jnp.int32(8)),
                                  scanned)


def test_interpolation_shares_its_noise_across_lambda():
    """With a linear eps model and no clipping, the reverse chain is affine in its start given its noise, so the
    decoded images are affine in lambda only if every lambda sees the same encoding and chain noise."""
    linear_model = lambda x, t: 0.3 * x  # noqa: E731
    x0_a, x0_b = (jax.random.uniform(jax.random.PRNGKey(i), (4, 3), minval=-1, maxval=1) for i in (9, 10))
    lambdas = jnp.array([0.0, 0.25, 0.5, 1.0])
    images = dj.interpolate(linear_model, SMALL, x0_a, x0_b, lambdas, 12, jax.random.PRNGKey(11), clip_denoised=False)
    assert images.shape == (4, 4, 3)
    for i, lam in enumerate(np.asarray(lambdas)):
        np.testing.assert_allclose(images[i], (1 - lam) * images[0] + lam * images[3], rtol=1e-4, atol=1e-5)
    # An endpoint is the chain from t = 12 of x0_a's own encoding, q(x_t | x_0) (Eq. 4).
    key_a, _, chain_key = jax.random.split(jax.random.PRNGKey(11), 3)
    x_t = dj.q_sample(SMALL, x0_a, jnp.full((4,), 12), jax.random.normal(key_a, (4, 3)))
    alone = dj.ddpm_sample(linear_model, SMALL, chain_key, (4, 3), x_start=x_t, start_t=12, clip_denoised=False)
    np.testing.assert_allclose(images[0], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(images[0], images[3], atol=0.1)
    with pytest.raises(ValueError, match=r"1-D array of L weights, got shape \(\)"):
        dj.interpolate(linear_model, SMALL, x0_a, x0_b, 0.5, 12, jax.random.PRNGKey(11))


def test_samples_from_a_frozen_latent_follow_the_true_posterior():
    """With the exact reverse process the chain from x_t samples q(x_0 | x_t), for Gaussian data N(mu, s^2) in
    closed form: the samples' mean and variance given each x_t, within 5 Monte-Carlo standard errors."""
    num_samples, t = 4000, 9
    x0 = jnp.array([[MU - 2 * S, MU, MU + 2 * S]])
    x_t, samples = jax.jit(
        lambda key: dj.sample_from_latent(exact_reverse_fn(SMALL, MU, S), SMALL, x0, t, key, num_samples,
                                          var_type="learned", clip_denoised=False)
    )(jax.random.PRNGKey(12))
    assert samples.shape == (num_samples, 1, 3)
    # x_t is x0's own encoding by Eq. 4, the same for every sample.
    encode_key, _ = jax.random.split(jax.random.PRNGKey(12))
    np.testing.assert_allclose(x_t, dj.q_sample(SMALL, x0, jnp.full((1,), t), jax.random.normal(encode_key, (1, 3))),
                               rtol=1e-6)
    mean, var = (np.asarray(v, np.float64) for v in gaussian_posterior_x0(SMALL, x_t, jnp.full((1,), t), MU, S))
    got = np.asarray(samples, np.float64)
    assert np.all(np.abs(got.mean(0) - mean) < 5 * np.sqrt(var / num_samples)), (got.mean(0), mean)
    assert np.all(np.abs(got.var(0) / var - 1) < 5 * np.sqrt(2 / num_samples)), (got.var(0), var)


def test_ddim_eta1_all_steps_equals_ancestral_fixedsmall():
    """Song et al. 2021: eta = 1 over all T steps is DDPM with sigma_t^2 = beta~_t, step for step."""
    model_fn = optimal_eps_fn(SMALL, MU, S)
    key = jax.random.PRNGKey(4)
    ddpm = dj.ddpm_sample(model_fn, SMALL, key, (6, 3), var_type="fixedsmall", clip_denoised=False)
    ddim = dj.ddim_sample(model_fn, SMALL, key, (6, 3), num_steps=SMALL_T, eta=1.0, clip_denoised=False)
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_trajectory_records_every_kth_step():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    key = jax.random.PRNGKey(5)
    plain = dj.ddpm_sample(model_fn, SMALL, key, (3, 2))
    x, traj = dj.ddpm_sample(model_fn, SMALL, key, (3, 2), trajectory_every=6)  # 20 = 2 unrecorded + 3 x 6
    np.testing.assert_allclose(x, plain, rtol=1e-6)
    np.testing.assert_array_equal(traj.timesteps, [12, 6, 0])
    assert traj.x.shape == (3, 3, 2) and traj.pred_x0.shape == (3, 3, 2)
    np.testing.assert_allclose(traj.x[-1], x, rtol=1e-6)
    np.testing.assert_allclose(traj.pred_x0[-1], x, rtol=1e-6)  # at t = 0 the step returns its x_0 prediction
    x_ddim, traj_ddim = dj.ddim_sample(model_fn, SMALL, key, (3, 2), num_steps=10, trajectory_every=5)
    np.testing.assert_array_equal(traj_ddim.timesteps, dj.ddim_timesteps(SMALL_T, 10)[[4, 9]])
    np.testing.assert_allclose(traj_ddim.x[-1], x_ddim, rtol=1e-6)


def test_sampler_reproducible_and_vmappable_over_keys():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    sample = jax.jit(lambda key: dj.ddpm_sample(model_fn, SMALL, key, (2, 3)))
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    batched = jax.vmap(sample)(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], sample(keys[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sample(keys[0]), sample(keys[0]))
    assert not np.allclose(batched[0], batched[1])


def test_sampler_errors():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    for num_steps in (5.0, True):
        with pytest.raises(ValueError, match=f"num_steps must be an integer, got {num_steps}"):
            dj.ddim_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=num_steps)
        with pytest.raises(ValueError, match=f"num_steps must be an integer, got {num_steps}"):
            dj.ddpm_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=num_steps)
    with pytest.raises(ValueError, match="t must be an integer, got 2.7"):
        dj.interpolate(model_fn, SMALL, jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.array([0.5]), 2.7,
                       jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_steps must be in"):
        dj.ddim_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=SMALL_T + 1)
    with pytest.raises(ValueError, match="xprev"):
        dj.ddim_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=5, mean_type="xprev")
    with pytest.raises(ValueError, match="trajectory_every"):
        dj.ddpm_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), trajectory_every=0)
    for every in (2.5, True):  # were truncated: records every 2 steps, or every step
        with pytest.raises(ValueError, match=f"trajectory_every must be an integer, got {every}"):
            dj.ddim_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=5, trajectory_every=every)
    # Out of range with x_start: the range is the problem, not x_start (it was blamed).
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, {SMALL_T}\] \(the schedule's T\), got 25"):
        dj.ddpm_sample(model_fn, SMALL, jax.random.PRNGKey(0), (2, 2), num_steps=25, x_start=jnp.zeros((2, 2)),
                       start_t=5)
    for sampler in (dj.ddpm_sample, partial(dj.ddim_sample, num_steps=5)):  # an IndexError before
        with pytest.raises(ValueError, match=r"shape must be \[batch, ...\], got \(\)"):
            sampler(model_fn, SMALL, jax.random.PRNGKey(0), ())
    with pytest.raises(ValueError, match="'learned' predicts the variance of one step"):
        dj.ddpm_sample(exact_reverse_fn(SMALL, MU, S), SMALL, jax.random.PRNGKey(0), (2, 2), var_type="learned",
                       num_steps=5)


def test_one_step_chain_is_the_x0_prediction():
    """Respaced to one step, the ancestral chain (fixedlarge too) is x_0-hat of x_T at t = T-1, without noise."""
    model_fn = optimal_eps_fn(SMALL, MU, S)
    key = jax.random.PRNGKey(7)
    for var_type in ("fixedlarge", "fixedsmall"):
        x = dj.ddpm_sample(model_fn, SMALL, key, (6, 2), var_type=var_type, num_steps=1, clip_denoised=False)
        x_T = jax.random.normal(dj.sampling.chain_keys(key)[0], (6, 2))
        t = jnp.full((6,), SMALL_T - 1)
        np.testing.assert_allclose(x, dj.predict_x0_from_eps(SMALL, x_T, t, model_fn(x_T, t)), rtol=1e-5, atol=1e-5)


def test_bpd_terms_and_rate_distortion_match_closed_form():
    """E[L_{t-1}] for the exact reverse model is 0.5 (log(v_p/v_q) - 1 + v_q/v_p + coef1^2 Var[x0|x_t]/v_p)."""
    batch, dim = 256, 16
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(7), (batch, dim))
    out = jax.jit(
        lambda x0, key: dj.calc_bpd_loop(
            SCHEDULE, exact_reverse_fn(SCHEDULE, MU, S), x0, key, var_type="learned", clip_denoised=False
        )
    )(x0, jax.random.PRNGKey(8))
    assert out.vb_terms.shape == (batch, T) and out.x0_mse.shape == (batch, T)
    sched = {
        k: np.asarray(getattr(SCHEDULE, k), np.float64)
        for k in ("alphas_cumprod", "posterior_variance", "posterior_mean_coef1")
    }
    abar = sched["alphas_cumprod"]
    var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    v_q = sched["posterior_variance"]
    v_p = v_q + sched["posterior_mean_coef1"] ** 2 * var_x0
    expected = 0.5 * (np.log(v_p[1:] / v_q[1:]) - 1 + v_q[1:] / v_p[1:] + (v_p[1:] - v_q[1:]) / v_p[1:]) / math.log(2)
    got = np.asarray(out.vb_terms[:, 1:]).mean(0)
    assert got.sum() == pytest.approx(expected.sum(), rel=0.03)
    # and per t over a band where each term is sizeable
    np.testing.assert_allclose(got[:50], expected[:50], rtol=0.15)
    # the x0 MSE at each t is Var[x0 | x_t] in expectation
    np.testing.assert_allclose(np.asarray(out.x0_mse).mean(0)[::100], var_x0[::100], rtol=0.1)

    # Rate and distortion (Sec. 4.3, Algorithm 3): send x_T (L_T bits), then x_t given x_{t+1} (L_t bits) for
    # t = T-1 .. 1, predicting x_0 after each step; in closed form the prediction's error is Var[x0 | x_t].
    rd = dj.rate_distortion(out.prior_bpd, out.vb_terms, out.x0_mse)
    closed_form_terms = {t: expected[t - 1] for t in range(1, T)}  # L_t, t = 1 .. T-1
    rates = [float(out.prior_bpd.mean())]
    for t in range(T - 1, 0, -1):
        rates.append(rates[-1] + closed_form_terms[t])
    distortions = [127.5 * math.sqrt(var_x0[T - step]) for step in range(1, T + 1)]  # x_0 from x_{T - step + 1}
    np.testing.assert_array_equal(rd.reverse_steps, np.arange(1, T + 1))
    np.testing.assert_allclose(rd.rate_bpd, rates, rtol=0.05, atol=0.03 * rates[-1])
    np.testing.assert_allclose(rd.distortion_rmse, distortions, rtol=0.06)
    # The ends exactly: L_T alone, and the whole bound but L_0 with the error of x_0 predicted from x_1.
    assert float(rd.rate_bpd[0]) == pytest.approx(float(out.prior_bpd.mean()), rel=1e-6)
    assert float(rd.rate_bpd[-1]) == pytest.approx(float((out.total_bpd - out.vb_terms[:, 0]).mean()), rel=1e-5)
    assert float(rd.distortion_rmse[-1]) == pytest.approx(127.5 * math.sqrt(float(out.x0_mse[:, 0].mean())), rel=1e-6)


def test_rates_beside_a_large_decoder_term_keep_float32_precision():
    # L_0 is the largest term of a bound: the rate after the last step is the sum of the small ones beside it.
    vb_terms = jnp.array([[1000.0, 1e-4, 2e-4, 3e-4]], jnp.float32)
    rd = dj.rate_distortion(jnp.array([0.5e-4], jnp.float32), vb_terms, jnp.zeros((1, 4)))
    terms = np.asarray(vb_terms, np.float64)[0]
    expected = 0.5e-4 + np.array([0.0, terms[3], terms[3] + terms[2], terms[3] + terms[2] + terms[1]])
    np.testing.assert_allclose(rd.rate_bpd, expected, rtol=1e-6)


def test_bpd_of_exact_model_matches_true_nll_of_8bit_data():
    """The bound with the exact reverse process lands on the entropy of 8-bit-quantised Gaussian data."""
    entropy_bits, centers, probs = discretized_gaussian_entropy_bits(MU, S)
    batch, dim = 512, 16
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.choice(centers, size=(batch, dim), p=probs / probs.sum()), jnp.float32)
    out = jax.jit(
        lambda x0, key: dj.calc_bpd_loop(
            SCHEDULE, exact_reverse_fn(SCHEDULE, MU, S), x0, key, var_type="learned", clip_denoised=False
        )
    )(x0, jax.random.PRNGKey(9))
    total = float(out.total_bpd.mean())
    mc_error = float(out.total_bpd.std()) / math.sqrt(batch)  # measured ~0.019 bits/dim
    # L_T for this data: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), per dim, averaged.
    assert float(out.prior_bpd.mean()) < 1e-4
    assert float(out.prior_bpd.mean()) == pytest.approx(float(dj.prior_bpd(SCHEDULE, x0).mean()), rel=1e-2)
    # A bound: not below the entropy beyond MC noise; the exact-for-continuous-data model is within
    # 0.03 bits/dim of it (measured over 4 seeds at batch 1024: +0.006 to +0.034).
    assert entropy_bits - 3 * mc_error < total < entropy_bits + 0.03 + 3 * mc_error, (total, entropy_bits)
    # A wrong model (mean off by 0.2) is clearly worse.
    shifted = jax.jit(
        lambda x0, key: dj.calc_bpd_loop(
            SCHEDULE, exact_reverse_fn(SCHEDULE, MU + 0.2, S), x0, key, var_type="learned", clip_denoised=False
        )
    )(x0, jax.random.PRNGKey(9))
    assert float(shifted.total_bpd.mean()) > total + 0.2


def test_gaussian_posterior_oracle_is_consistent():
    """Self-check of the oracle: E[x0|x_t] from the optimal eps agrees with direct conditioning."""
    x_t = jnp.linspace(-2, 2, 5)[:, None]
    t = jnp.array([0, 10, 100, 500, 999])
    eps = optimal_eps_fn(SCHEDULE, MU, S)(x_t, t)
    mean, _ = gaussian_posterior_x0(SCHEDULE, x_t, t, MU, S)
    np.testing.assert_allclose(dj.predict_x0_from_eps(SCHEDULE, x_t, t, eps), mean, rtol=1e-3, atol=1e-3)


def test_progress_callback_sees_every_step_in_order():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    seen = []
    key = jax.random.PRNGKey(8)
    x = dj.ddpm_sample(model_fn, SMALL, key, (2, 2), progress_fn=lambda t: seen.append(int(t)))
    jax.block_until_ready(x)
    assert seen == list(range(SMALL_T - 1, -1, -1))
    np.testing.assert_allclose(x, dj.ddpm_sample(model_fn, SMALL, key, (2, 2)), rtol=1e-6)
    for sampler in (dj.ddim_sample, dj.ddpm_sample):  # a respaced chain reports the original t too
        seen.clear()
        jax.block_until_ready(sampler(model_fn, SMALL, key, (2, 2), num_steps=5, progress_fn=seen.append))
        assert [int(t) for t in seen] == dj.ddim_timesteps(SMALL_T, 5).tolist()


def test_chains_keep_their_dtype_whatever_the_model_returns():
    """A bf16 x_0 model's trajectory and a float64 model's chain (jax_enable_x64) used to fail to scan."""
    half = lambda x, t: (0.5 * x).astype(jnp.bfloat16)  # noqa: E731
    x, traj = dj.ddpm_sample(half, SMALL, jax.random.PRNGKey(0), (3, 5), mean_type="x0", trajectory_every=2)
    assert x.dtype == traj.x.dtype == traj.pred_x0.dtype == jnp.float32
    np.testing.assert_array_equal(traj.x[-1], x)
    x, traj = dj.ddim_sample(half, SMALL, jax.random.PRNGKey(0), (3, 5), 5, mean_type="x0", trajectory_every=1)
    assert traj.pred_x0.dtype == jnp.float32
    with jax.enable_x64(True):
        schedule = dj.make_schedule("linear", SMALL_T, beta_start=1e-3, beta_end=0.3)
        model_fn = lambda x, t: 0.1 * x.astype(jnp.float64)  # noqa: E731
        for sample in (dj.ddpm_sample(model_fn, schedule, jax.random.PRNGKey(0), (3, 2)),
                       dj.ddpm_sample(model_fn, schedule, jax.random.PRNGKey(0), (3, 2), num_steps=5),
                       dj.ddim_sample(model_fn, schedule, jax.random.PRNGKey(0), (3, 2), 5)):
            assert sample.dtype == jnp.float64 and np.isfinite(sample).all()
        x_start = np.linspace(-1, 1, 6).reshape(3, 2)  # float64
        assert dj.ddpm_sample(model_fn, schedule, jax.random.PRNGKey(0), (3, 2), x_start=x_start,
                              start_t=4).dtype == jnp.float64


@pytest.mark.parametrize("name, num_timesteps", [("cosine", 1000), ("linear", 4000)])
def test_ddim_sigma_matches_float64_at_every_step(name, num_timesteps):
    # Eq. 16 from float32 abar lost digits where abar is near 1: sigma was up to 6.7e-4 off (cosine, T = 1000).
    schedule = dj.make_schedule(name, num_timesteps)
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    t = np.concatenate([np.arange(1, num_timesteps), [0, 999, 999], [num_timesteps - 1]])
    s = np.concatenate([np.arange(num_timesteps - 1), [num_timesteps, 0, 899], [0]])  # s = T: the step to x_0
    abar_s = np.append(abar, 1.0)[s]
    expected = 0.7 * np.sqrt((1 - abar_s) / (1 - abar[t]) * (1 - abar[t] / abar_s))
    sigma, one_minus_abar_s = jax.jit(dj.sampling.ddim_sigma)(schedule, jnp.asarray(t), jnp.asarray(s), 0.7)
    np.testing.assert_allclose(sigma, expected, rtol=5e-5)  # float32 1 - abar differenced: up to 3.9e-5
    np.testing.assert_allclose(one_minus_abar_s, 1 - abar_s, rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_is_differentiable_in_the_schedule(eta):
    # At the step to x_0, sigma's square root has a 0 argument: its infinite derivative made every gradient in
    # the schedule NaN (at eta = 0 too).
    model_fn = optimal_eps_fn(SMALL, MU, S)
    total = jax.jit(lambda schedule: jnp.sum(dj.ddim_sample(model_fn, schedule, jax.random.PRNGKey(4), (3, 2), 5, eta)))
    grads = jax.grad(total)(SMALL)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))
    index, h = 14, 1e-3  # a kept step of the 5 (19, 14, 10, 5, 0)
    leaf = SMALL.sqrt_one_minus_alphas_cumprod
    shifted = [dataclasses.replace(SMALL, sqrt_one_minus_alphas_cumprod=leaf.at[index].add(d)) for d in (h, -h)]
    central = (total(shifted[0]) - total(shifted[1])) / (2 * h)
    assert abs(float(central)) > 1e-2  # the leaf reaches the samples
    np.testing.assert_allclose(grads.sqrt_one_minus_alphas_cumprod[index], central, rtol=0.02)


def test_ddim_vmaps_over_eta():
    model_fn = optimal_eps_fn(SMALL, MU, S)
    sample = lambda eta: dj.ddim_sample(model_fn, SMALL, jax.random.PRNGKey(4), (3, 2), 5, eta)  # noqa: E731
    etas = jnp.array([0.0, 0.5, 1.0])
    mapped = jax.vmap(sample)(etas)
    np.testing.assert_allclose(mapped, jnp.stack([sample(float(e)) for e in etas]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mapped[0], mapped[2])  # eta reaches the chain
    # ... and is differentiable: the gradient was NaN (0 * inf from sqrt at the last step), not the
    # finite difference.
    total = jax.jit(lambda eta: jnp.sum(sample(eta)))
    for eta in (0.0, 0.5):
        central = (total(eta + 1e-2) - total(eta - 1e-2)) / 2e-2 if eta else (total(1e-2) - total(0.0)) / 1e-2
        np.testing.assert_allclose(jax.grad(total)(eta), central, rtol=0.05, atol=1e-3)


def test_clipped_ddim_steps_use_the_eps_of_the_clipped_x0():
    """With clip_denoised, each DDIM step is x_s = sqrt(abar_s) clip(x0_hat) + sqrt(1 - abar_s) eps, with eps
    recomputed from the clipped x0_hat (Song et al. 2021, Eq. 12): a float64 loop over a model whose x0_hat
    leaves [-1, 1] for most inputs."""
    model_fn = lambda x, t: 1.5 * x + 0.5  # noqa: E731  (an x_0 prediction)
    key, shape, num_steps = jax.random.PRNGKey(9), (8, 3), 5
    x, traj = dj.ddim_sample(model_fn, SMALL, key, shape, num_steps, mean_type="x0", clip_denoised=True,
                             trajectory_every=1)
    abar = np.append(np.asarray(SMALL.alphas_cumprod, np.float64), 1.0)  # index T: the step to x_0
    timesteps = dj.ddim_timesteps(SMALL_T, num_steps)
    expected = np.asarray(jax.random.normal(dj.sampling.chain_keys(key)[0], shape), np.float64)
    clipped = 0
    for i, (t, s) in enumerate(zip(timesteps, [*timesteps[1:], SMALL_T], strict=True)):
        x0_hat = np.clip(1.5 * expected + 0.5, -1.0, 1.0)
        clipped += np.sum(np.abs(1.5 * expected + 0.5) > 1)
        eps = (expected - np.sqrt(abar[t]) * x0_hat) / np.sqrt(1 - abar[t])
        expected = np.sqrt(abar[s]) * x0_hat + np.sqrt(1 - abar[s]) * eps
        np.testing.assert_allclose(traj.pred_x0[i], x0_hat, rtol=1e-5, atol=1e-5, err_msg=f"x0_hat {i} (t={t})")
        np.testing.assert_allclose(traj.x[i], expected, rtol=1e-5, atol=1e-5, err_msg=f"step {i} (t={t})")
    assert clipped > num_steps * x.size / 4
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_prior_term_matches_float64_closed_form():
    """L_T = KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)) / ln 2 per dim, on a 10-step schedule whose abar_T =
    0.82 makes it large (at T = 1000 it is ~1e-5 bits/dim and hid a reversed KL or the wrong t)."""
    schedule = dj.make_schedule("linear", 10)
    x0 = np.random.default_rng(3).uniform(-1, 1, size=(4, 6)).astype(np.float32)
    abar = np.cumprod(1 - np.asarray(schedule.betas, np.float64))[-1]
    kl = 0.5 * (-1.0 - np.log1p(-abar) + (1 - abar) + abar * x0.astype(np.float64) ** 2)
    got = dj.prior_bpd(schedule, jnp.asarray(x0))
    np.testing.assert_allclose(np.asarray(got, np.float64), kl.mean(axis=1) / np.log(2), rtol=1e-5)
    assert float(got.mean()) > 0.05


def test_bound_total_and_x0_errors_on_a_short_schedule():
    """calc_bpd_loop on T = 10, where the prior term is not negligible: total = L_T + sum of the terms; term t draws
    its eps from fold_in(key, t), so an x_0 model returning x_t has x0_mse[:, t] = (1 - abar_t) mean(eps_t^2); and
    clip_denoised reaches the x_0 errors (a model predicting 3 is scored as predicting 1)."""
    schedule = dj.make_schedule("linear", 10)
    x0 = jnp.zeros((3, 4))
    key = jax.random.PRNGKey(11)
    bound = partial(dj.calc_bpd_loop, schedule, x0=x0, key=key, mean_type="x0", var_type="fixedsmall")
    out = bound(lambda x, t: x, clip_denoised=False)
    assert float(out.prior_bpd.mean()) > 0.1
    np.testing.assert_allclose(out.total_bpd, out.prior_bpd + out.vb_terms.sum(axis=1), rtol=1e-6)
    one_minus_abar = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64) ** 2  # 1e-4 at t = 0
    for t in (0, 4, 9):
        eps = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape), np.float64)
        np.testing.assert_allclose(out.x0_mse[:, t], one_minus_abar[t] * np.mean(eps**2, axis=1), rtol=1e-5)
    clipped = bound(lambda x, t: jnp.full_like(x, 3.0), clip_denoised=True)
    np.testing.assert_allclose(clipped.x0_mse, 1.0, rtol=1e-6)


@pytest.mark.parametrize("mean_type", ["eps", "xprev"])
def test_respaced_chain_with_learned_range_variances(mean_type):
    """A respaced ancestral chain takes learned_range (it interpolates within each longer step): at v = -1 it is the
    respaced fixedsmall chain, for an eps model and for an xprev one, whose variance half is kept when its mean is
    turned into x_0."""
    eps_fn = optimal_eps_fn(SMALL, MU, S)
    if mean_type == "eps":
        mean_fn = eps_fn
    else:
        def mean_fn(x, t):
            x0_hat = dj.predict_x0_from_eps(SMALL, x, t, eps_fn(x, t))
            return dj.q_posterior_mean_variance(SMALL, x0_hat, x, t)[0]
    with_variance = lambda x, t: jnp.concatenate([mean_fn(x, t), -jnp.ones_like(x)], axis=-1)  # noqa: E731
    key, shape = jax.random.PRNGKey(12), (6, 3)
    sample = partial(dj.ddpm_sample, schedule=SMALL, key=key, shape=shape, mean_type=mean_type, num_steps=5,
                     clip_denoised=False)
    learned = sample(with_variance, var_type="learned_range")
    fixed = sample(mean_fn, var_type="fixedsmall")
    np.testing.assert_allclose(learned, fixed, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fixed, sample(mean_fn, var_type="fixedlarge"), atol=1e-3)
