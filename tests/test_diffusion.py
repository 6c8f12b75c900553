"""Forward process, posterior, parameterizations and losses against independent oracles."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj
from tests.oracles import optimal_eps_fn

T = 1000
SCHEDULE = dj.make_schedule("linear", T)


def test_closed_form_matches_markov_chain():
    """q(x_t|x_0) (Eq. 4) against the simulated chain of q_step (Eq. 2), 20k chains, 5-sigma MC tolerance."""
    n, x0_values = 20_000, jnp.array([1.5, -0.7, 0.0])
    x0 = jnp.broadcast_to(x0_values, (n, 3))
    checkpoints = [0, 9, 249, 999]

    @jax.jit
    def simulate(key):
        def body(x, t):
            noise = jax.random.normal(jax.random.fold_in(key, t), x.shape)
            x = dj.q_step(SCHEDULE, x, jnp.full((n,), t), noise)
            return x, x

        _, xs = jax.lax.scan(body, x0, jnp.arange(T))
        return xs[jnp.array(checkpoints)]

    xs = simulate(jax.random.PRNGKey(0))
    for x_t, t in zip(xs, checkpoints, strict=True):
        mean, var, log_var = dj.q_mean_variance(SCHEDULE, x0[:1], jnp.array([t]))
        var = float(var.squeeze())
        assert math.exp(float(log_var.squeeze())) == pytest.approx(var, rel=1e-5)
        np.testing.assert_allclose(x_t.mean(0), mean[0], atol=5 * math.sqrt(var / n))
        # var of a sample variance ~ 2 var^2 / n
        np.testing.assert_allclose(x_t.var(0), var, atol=5 * var * math.sqrt(2 / n))
        # q_sample draws from the same distribution
        noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
        direct = dj.q_sample(SCHEDULE, x0, jnp.full((n,), t), noise)
        np.testing.assert_allclose(direct.mean(0), mean[0], atol=5 * math.sqrt(var / n))
        np.testing.assert_allclose(direct.var(0), var, atol=5 * var * math.sqrt(2 / n))


def test_q_sample_exact_formula_and_dtype():
    x0 = jnp.linspace(-1, 1, 24).reshape(2, 2, 2, 3)
    noise = jnp.cos(jnp.arange(24.0)).reshape(2, 2, 2, 3)
    t = jnp.array([3, 700])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[np.array([3, 700])].reshape(2, 1, 1, 1)
    expected = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(noise)
    np.testing.assert_allclose(dj.q_sample(SCHEDULE, x0, t, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_posterior_matches_gaussian_conditioning(t):
    """q(x_{t-1}|x_t,x_0) (Eqs. 6-7) against conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    x0, x_t = 0.37, -1.21
    # x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) e
    m1, v1 = math.sqrt(abar_prev) * x0, 1 - abar_prev
    m2, v2 = math.sqrt(1 - betas[t]) * m1, (1 - betas[t]) * v1 + betas[t]
    cov = math.sqrt(1 - betas[t]) * v1
    expected_mean = m1 + cov / v2 * (x_t - m2)
    expected_var = v1 - cov**2 / v2
    mean, var, _ = dj.q_posterior_mean_variance(SCHEDULE, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t]))
    assert float(mean.squeeze()) == pytest.approx(expected_mean, rel=1e-5, abs=1e-6)
    assert float(var.squeeze()) == pytest.approx(expected_var, rel=1e-4, abs=1e-12)


def _batch(shape=(4, 3, 3, 2)):
    rng = np.random.default_rng(3)  # NumPy: an eager 4-D jax.random draw compiles for about 1 s on this CPU
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = jnp.array([0, 17, 500, 999])
    return x0, noise, t, dj.q_sample(SCHEDULE, x0, t, noise)


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (4, 5)])
def test_parameterization_round_trips(shape):
    x0, noise, t, x_t = _batch(shape)
    np.testing.assert_allclose(dj.predict_x0_from_eps(SCHEDULE, x_t, t, noise), x0, atol=2e-3)
    np.testing.assert_allclose(dj.predict_eps_from_x0(SCHEDULE, x_t, t, x0), noise, atol=2e-3)
    v = dj.predict_v(SCHEDULE, x0, t, noise)
    np.testing.assert_allclose(dj.predict_x0_from_v(SCHEDULE, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(dj.predict_eps_from_v(SCHEDULE, x_t, t, v), noise, atol=1e-5)
    mean, _, _ = dj.q_posterior_mean_variance(SCHEDULE, x0, x_t, t)
    np.testing.assert_allclose(dj.predict_x0_from_xprev(SCHEDULE, x_t, t, mean), x0, atol=5e-3)


@pytest.mark.parametrize("mean_type", dj.MEAN_TYPES)
@pytest.mark.parametrize("var_type", dj.VAR_TYPES)
def test_p_mean_variance_recovers_truth_for_every_type(mean_type, var_type):
    """Fed the exact target of its parameterization, p_mean_variance returns x_0 and the true posterior mean."""
    x0, noise, t, x_t = _batch()
    post_mean, _, post_log_var = dj.q_posterior_mean_variance(SCHEDULE, x0, x_t, t)
    target = {
        "eps": noise,
        "x0": x0,
        "v": dj.predict_v(SCHEDULE, x0, t, noise),
        "xprev": post_mean,
    }[mean_type]
    # learned: log-variance output; learned_range: v = -1 picks the posterior variance beta~_t.
    if var_type == "learned":
        target = jnp.concatenate([target, post_log_var * jnp.ones_like(x0)], axis=-1)
    elif var_type == "learned_range":
        target = jnp.concatenate([target, -jnp.ones_like(x0)], axis=-1)
    out = dj.p_mean_variance(SCHEDULE, target, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False)
    np.testing.assert_allclose(out.pred_x0, x0, atol=5e-3)
    np.testing.assert_allclose(out.mean, post_mean, atol=1e-4)
    expected_var = {
        "fixedsmall": np.exp(np.asarray(post_log_var)),
        "learned": np.exp(np.asarray(post_log_var)),
        "learned_range": np.exp(np.asarray(post_log_var)),
        # beta_t, except beta~_1 at t = 0
        "fixedlarge": np.where(
            np.asarray(t) == 0, float(SCHEDULE.posterior_variance[1]), np.asarray(SCHEDULE.betas)[np.asarray(t)]
        ).reshape(4, 1, 1, 1),
    }[var_type]
    np.testing.assert_allclose(out.variance, np.broadcast_to(expected_var, x0.shape), rtol=1e-5)
    assert out.log_variance.shape == x0.shape


def test_learned_range_interpolates_in_log_space():
    x0, noise, t, x_t = _batch((4, 2))
    out = dj.p_mean_variance(
        SCHEDULE, jnp.concatenate([noise, jnp.ones_like(x0)], -1), x_t, t, var_type="learned_range"
    )
    np.testing.assert_allclose(
        out.log_variance, np.log(np.asarray(SCHEDULE.betas)[np.asarray(t)])[:, None] * np.ones((1, 2)), rtol=1e-5
    )
    half = dj.p_mean_variance(
        SCHEDULE, jnp.concatenate([noise, jnp.zeros_like(x0)], -1), x_t, t, var_type="learned_range"
    )
    lo = np.asarray(SCHEDULE.posterior_log_variance_clipped)[np.asarray(t)]
    hi = np.log(np.asarray(SCHEDULE.betas)[np.asarray(t)])
    np.testing.assert_allclose(half.log_variance[:, 0], 0.5 * (lo + hi), rtol=1e-5)


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_learned_variances_of_a_bf16_output_are_computed_in_float32(var_type):
    # (v + 1) / 2 with v = 0.3 in bf16 is 0.6484375, not 0.650390625; exp(-log_variance) rounds the same way.
    x0, noise, t, x_t = _batch((4, 2))
    variance_part = 0.3 + 0.4 * jnp.cos(3.0 * x_t) if var_type == "learned_range" else -9.21 + jnp.cos(3.0 * x_t)
    output = jnp.concatenate([noise, variance_part], -1).astype(jnp.bfloat16)
    low = dj.p_mean_variance(SCHEDULE, output, x_t, t, var_type=var_type)
    full = dj.p_mean_variance(SCHEDULE, output.astype(jnp.float32), x_t, t, var_type=var_type)
    assert low.log_variance.dtype == jnp.float32
    np.testing.assert_array_equal(low.log_variance, full.log_variance)
    np.testing.assert_array_equal(low.variance, full.variance)
    np.testing.assert_array_equal(low.mean, full.mean)


def test_clip_denoised_clips_pred_x0_before_the_mean_is_formed():
    """The posterior mean (Eq. 7) is formed from the clipped x_0, and an xprev model's x_0 (Eq. 7 inverted) is
    clipped too: float64 against x_0 predictions far outside [-1, 1]."""
    x0, noise, t, x_t = _batch((4, 2))
    out = dj.p_mean_variance(SCHEDULE, 10 * noise + 3, x_t, t, mean_type="x0", clip_denoised=True)
    assert float(jnp.max(jnp.abs(out.pred_x0))) == 1.0
    coef1, coef2 = (np.asarray(getattr(SCHEDULE, name), np.float64)[np.asarray(t)][:, None]
                    for name in ("posterior_mean_coef1", "posterior_mean_coef2"))
    clipped = np.clip(10 * np.asarray(noise, np.float64) + 3, -1, 1)
    np.testing.assert_allclose(out.mean, coef1 * clipped + coef2 * np.asarray(x_t, np.float64), rtol=1e-5, atol=1e-6)
    prev = dj.p_mean_variance(SCHEDULE, 10 * noise + 3, x_t, t, mean_type="xprev", clip_denoised=True)
    implied_x0 = (10 * np.asarray(noise, np.float64) + 3 - coef2 * np.asarray(x_t, np.float64)) / coef1
    assert np.abs(implied_x0).max() > 1
    np.testing.assert_allclose(prev.pred_x0, np.clip(implied_x0, -1, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(prev.mean, 10 * noise + 3)  # the mean is the model's own


def test_p_sample_step_statistics_and_no_noise_at_t0():
    """x_{t-1} = mu + sigma z: the step's mean/variance over 20k draws, and exactly the mean at t = 0."""
    n = 20_000
    x_t = jnp.full((n, 1), 0.4)
    model_fn = lambda x, t: jnp.full_like(x, 0.25)  # noqa: E731
    for t_val in (0, 300):
        t = jnp.full((n,), t_val)
        out = dj.p_mean_variance(SCHEDULE, model_fn(x_t, t), x_t, t, var_type="fixedsmall", clip_denoised=False)
        x_prev, _ = dj.p_sample(
            SCHEDULE, model_fn, x_t, t, jax.random.PRNGKey(4), var_type="fixedsmall", clip_denoised=False
        )
        if t_val == 0:
            np.testing.assert_array_equal(x_prev, out.mean)
        else:
            var = float(out.variance[0, 0])
            assert float(x_prev.mean()) == pytest.approx(float(out.mean[0, 0]), abs=5 * math.sqrt(var / n))
            assert float(x_prev.var()) == pytest.approx(var, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("mean_type", dj.MEAN_TYPES)
def test_mse_loss_is_zero_for_the_exact_denoiser(mean_type):
    """With a single data point the denoiser is exact; L_simple vanishes for every parameterization."""
    x0 = jnp.broadcast_to(jnp.array([0.3, -0.5, 0.9]), (6, 3))
    t = jnp.array([0, 1, 10, 400, 800, 999])
    x0_point = x0[:1]

    def exact(x_t, t):
        eps = dj.predict_eps_from_x0(SCHEDULE, x_t, t, jnp.broadcast_to(x0_point, x_t.shape))
        x0b = jnp.broadcast_to(x0_point, x_t.shape)
        return {
            "eps": eps,
            "x0": x0b,
            "v": dj.predict_v(SCHEDULE, x0b, t, eps),
            "xprev": dj.q_posterior_mean_variance(SCHEDULE, x0b, x_t, t)[0],
        }[mean_type]

    losses = dj.training_losses(SCHEDULE, exact, x0, t, jax.random.PRNGKey(0), mean_type=mean_type)
    assert losses["loss"].shape == (6,)
    np.testing.assert_allclose(losses["loss"], 0.0, atol=1e-4)
    # and a wrong denoiser is penalised by exactly mean((target - 0)^2)
    zero = dj.training_losses(
        SCHEDULE, lambda x, t: jnp.zeros_like(x), x0, t, jax.random.PRNGKey(0), mean_type=mean_type
    )
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    x_t = dj.q_sample(SCHEDULE, x0, t, noise)
    target = exact(x_t, t)
    np.testing.assert_allclose(zero["loss"], jnp.mean(target**2, axis=1), rtol=2e-3)


def test_l1_and_huber_losses():
    x0 = jnp.zeros((3, 4))
    t = jnp.array([5, 5, 5])
    key = jax.random.PRNGKey(7)
    noise = jax.random.normal(key, x0.shape)
    offset = jnp.array([0.0, 0.5, 3.0])[:, None]
    model_fn = lambda x, t: noise + offset  # noqa: E731
    l1 = dj.training_losses(SCHEDULE, model_fn, x0, t, key, loss_type="l1")["loss"]
    huber = dj.training_losses(SCHEDULE, model_fn, x0, t, key, loss_type="huber")["loss"]
    np.testing.assert_allclose(l1, [0.0, 0.5, 3.0], atol=1e-5)
    np.testing.assert_allclose(huber, [0.0, 0.125, 2.5], atol=1e-5)
    # Errors that differ within an example: the mean of the elementwise losses (not the loss of the mean error,
    # nor a branch chosen per example).
    offset = jnp.array([0.5, -3.0, 1.0, -0.2])
    model_fn = lambda x, t: noise + offset  # noqa: E731
    l1 = dj.training_losses(SCHEDULE, model_fn, x0, t, key, loss_type="l1")["loss"]
    huber = dj.training_losses(SCHEDULE, model_fn, x0, t, key, loss_type="huber")["loss"]
    np.testing.assert_allclose(l1, (0.5 + 3.0 + 1.0 + 0.2) / 4, rtol=1e-5)
    np.testing.assert_allclose(huber, (0.125 + 2.5 + 0.5 + 0.02) / 4, rtol=1e-5)


def test_kl_loss_zero_for_exact_mean_and_variance_and_decoder_at_t0():
    x0 = jnp.broadcast_to(jnp.array([0.3, -0.5]), (3, 2))
    t = jnp.array([1, 50, 999])
    eps_exact = lambda x_t, t: dj.predict_eps_from_x0(SCHEDULE, x_t, t, jnp.broadcast_to(x0[:1], x_t.shape))  # noqa: E731
    # Jitted: op by op, the three losses compiled ~100 small programs.
    losses = jax.jit(dj.training_losses, static_argnums=1, static_argnames=("var_type", "loss_type"))
    kl = losses(SCHEDULE, eps_exact, x0, t, jax.random.PRNGKey(1), var_type="fixedsmall", loss_type="kl")
    np.testing.assert_allclose(kl["loss"], 0.0, atol=1e-4)
    # t = 0: the decoder -log2 P(bin) of N(x_0, sigma_1^2) centred on an 8-bit grid value is
    # -log2(Phi(h/sigma) - Phi(-h/sigma)) with h = 1/255, an interior bin.
    from scipy.stats import norm

    grid = jnp.broadcast_to(jnp.array([-0.2 + 2 / 255, 128 / 127.5 - 1]), (3, 2))
    eps_grid = lambda x_t, t: dj.predict_eps_from_x0(SCHEDULE, x_t, t, grid)  # noqa: E731
    t0 = jnp.zeros((3,), jnp.int32)
    dec = losses(SCHEDULE, eps_grid, grid, t0, jax.random.PRNGKey(1), var_type="fixedsmall", loss_type="kl")
    sigma = math.exp(0.5 * float(SCHEDULE.posterior_log_variance_clipped[0]))
    expected = -math.log2(norm.cdf(1 / 255 / sigma) - norm.cdf(-1 / 255 / sigma))
    np.testing.assert_allclose(dec["loss"], expected, rtol=1e-3)
    bad = losses(SCHEDULE, lambda x, t: jnp.full_like(x, -5.0), grid, t0, jax.random.PRNGKey(1),
                 var_type="fixedsmall", loss_type="kl")
    assert float(jnp.min(bad["loss"])) > 10.0


def test_hybrid_loss_stops_mean_gradient_through_vb():
    """L_hybrid = L_simple + lambda T L_t: the vb term's gradient reaches only the variance half."""
    x0 = jax.random.uniform(jax.random.PRNGKey(2), (4, 3), minval=-1, maxval=1)
    t = jnp.array([0, 3, 100, 999])
    key = jax.random.PRNGKey(5)

    def loss_of(params, which):
        def model_fn(x, t):
            return jnp.concatenate([x * params["mean"], jnp.tanh(x * 0 + params["var"])], axis=-1)

        terms = dj.training_losses(SCHEDULE, model_fn, x0, t, key, var_type="learned_range", loss_type="hybrid")
        return jnp.mean(terms[which])

    params = {"mean": jnp.float32(0.7), "var": jnp.float32(0.1)}
    # One program: op by op, the three gradients compiled ~180 small ones.
    g_loss, g_mse, g_vb = jax.jit(lambda p: [jax.grad(loss_of)(p, which) for which in ("loss", "mse", "vb")])(params)
    np.testing.assert_allclose(g_loss["mean"], g_mse["mean"], rtol=1e-5)  # vb adds nothing to the mean
    assert float(g_mse["var"]) == 0.0
    assert abs(float(g_vb["var"])) > 0
    np.testing.assert_allclose(g_loss["var"], 0.001 * T * g_vb["var"], rtol=1e-4)
    # The factor is the schedule's own T (here 100; the test above has T = 1000).
    short = dj.make_schedule("linear", 100)
    model_fn = lambda x, t: jnp.concatenate([0.7 * x, jnp.full_like(x, 0.1)], axis=-1)  # noqa: E731
    hybrid = jax.jit(lambda x0, t: dj.training_losses(short, model_fn, x0, t, key, var_type="learned_range",
                                                      loss_type="hybrid", vlb_weight=0.01))
    terms = hybrid(x0, jnp.array([0, 3, 50, 99]))
    np.testing.assert_allclose(terms["loss"] - terms["mse"], 0.01 * 100 * terms["vb"], rtol=1e-4)


def test_composes_with_jit_vmap_grad():
    x0, _, t, _ = _batch((4, 3))
    model_fn = optimal_eps_fn(SCHEDULE, 0.0, 0.5)

    def loss(scale, key):
        return jnp.mean(dj.training_losses(SCHEDULE, lambda x, t: scale * model_fn(x, t), x0, t, key)["loss"])

    g = jax.jit(jax.grad(loss))(1.0, jax.random.PRNGKey(0))
    assert np.isfinite(float(g))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    per_key = jax.vmap(lambda k: loss(1.0, k))(keys)
    np.testing.assert_allclose(per_key, [loss(1.0, k) for k in keys], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mean_type="score"), "unknown mean_type 'score'"),
        (dict(var_type="big"), "unknown var_type 'big'"),
        (dict(loss_type="l2"), "unknown loss_type 'l2'"),
        (dict(var_type="learned", loss_type="mse"), "hybrid' or 'kl'"),
        (dict(var_type="fixedlarge", loss_type="hybrid"), "needs a learned variance"),
    ],
)
def test_bad_loss_configs_raise(kwargs, match):
    x0 = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=match):
        dj.training_losses(
            SCHEDULE, lambda x, t: jnp.concatenate([x, x], -1), x0, jnp.array([0, 1]), jax.random.PRNGKey(0), **kwargs
        )


def test_model_output_shape_mismatch_raises():
    x_t = jnp.zeros((2, 4))
    for output in (jnp.zeros((2, 3)), jnp.zeros((2, 4))):  # an even count of channels, but not twice the data's
        with pytest.raises(ValueError, match=re.escape("should have shape (2, 8): the data's (2, 4) with twice")):
            dj.p_mean_variance(SCHEDULE, output, x_t, jnp.array([0, 1]), var_type="learned")
    with pytest.raises(ValueError, match=re.escape("model output (2, 8) for var_type='fixedlarge' should have shape "
                                                   "(2, 4)")):
        dj.p_mean_variance(SCHEDULE, jnp.zeros((2, 8)), x_t, jnp.array([0, 1]), var_type="fixedlarge")
    # The samplers that do not go through p_mean_variance check too: a one-channel output for RGB data would be
    # broadcast over the channels, and sample nonsense.
    one_channel = lambda x, t: 0.5 * x[..., :1]  # noqa: E731
    with pytest.raises(ValueError, match=re.escape("(1, 4, 4, 1) for var_type='fixedlarge' should have shape")):
        dj.ddim_sample(one_channel, SCHEDULE, jax.random.PRNGKey(0), (1, 4, 4, 3), 5)
    with pytest.raises(ValueError, match=re.escape("(1, 2) for var_type='learned' should have shape (1, 4)")):
        dj.ddim_sample(lambda x, t: 0.5 * x, SCHEDULE, jax.random.PRNGKey(0), (1, 2), 5, var_type="learned")
    with pytest.raises(ValueError, match=re.escape("(1, 1) for var_type='fixedlarge' should have shape (1, 4)")):
        dj.ddpm_sample(lambda x, t: x[:, :1], SCHEDULE, jax.random.PRNGKey(0), (1, 4), num_steps=5, mean_type="xprev")


def test_a_scalar_t_is_the_same_t_for_every_example():
    x0, noise, _, _ = _batch((4, 3))
    t = jnp.full((4,), 250)
    np.testing.assert_array_equal(dj.q_sample(SCHEDULE, x0, 250, noise), dj.q_sample(SCHEDULE, x0, t, noise))
    optimal = optimal_eps_fn(SCHEDULE, 0.0, 0.5)
    model_fn = lambda x, t: optimal(x, jnp.broadcast_to(t, x.shape[:1]))  # noqa: E731  (as the U-Net and MLP do)
    key = jax.random.PRNGKey(0)
    for scalar in (jnp.asarray(0), jnp.asarray(250)):  # t = 0 too: there p_sample adds no noise
        np.testing.assert_array_equal(dj.p_sample(SCHEDULE, model_fn, x0, scalar, key)[0],
                                      dj.p_sample(SCHEDULE, model_fn, x0, jnp.full((4,), scalar), key)[0])


def test_timesteps_outside_the_schedule_raise_or_give_nan():
    """JAX's indexing clamps: the paper's 1-based t = T would silently read T - 1, and -1 would wrap to it."""
    x0, noise, _, _ = _batch((4, 3))
    for bad in (T, -1, 5000):
        with pytest.raises(ValueError, match=rf"timesteps must lie in \[0, {T - 1}\], got"):
            dj.q_sample(SCHEDULE, x0, jnp.array([0, bad, 3, 4]), noise)
    traced = jax.jit(lambda t: dj.q_sample(SCHEDULE, x0, t, noise))(jnp.array([T - 1, T, -1, 0]))
    assert np.isfinite(traced[::3]).all() and np.isnan(traced[1:3]).all()


def test_shapes_that_would_broadcast_into_wrong_values_are_refused():
    """A t of shape [B, 1] made the KL loss [B, B] (row i chose decoder or KL by t[i] for every example), and an x0
    or noise of another shape broadcast silently; a float t or uint8 data failed deep inside JAX."""
    x0, noise, _, _ = _batch((4, 3))
    column = jnp.array([[0], [1], [500], [999]])
    model_fn = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=re.escape("t must be a scalar or of shape [batch] = (4,) for x of shape "
                                                   "(4, 3), got shape (4, 1)")):
        dj.training_losses(SCHEDULE, model_fn, x0, column, jax.random.PRNGKey(0), loss_type="kl")
    with pytest.raises(ValueError, match=re.escape("got shape (4, 1)")):
        dj.vb_terms_bpd(SCHEDULE, x0, x0, x0, column, mean_type="eps", var_type="fixedlarge")
    with pytest.raises(ValueError, match=re.escape("got shape (3,)")):
        dj.p_sample(SCHEDULE, model_fn, x0, jnp.array([1, 2, 3]), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=re.escape("noise of shape (1, 3) must have the shape of x, (4, 3)")):
        dj.q_sample(SCHEDULE, x0, 5, noise[:1])
    with pytest.raises(ValueError, match=re.escape("x0 of shape (4, 1) must have the shape of x, (4, 3)")):
        dj.vb_terms_bpd(SCHEDULE, x0, x0[:, :1], x0, jnp.arange(4), mean_type="eps", var_type="fixedlarge")
    with pytest.raises(ValueError, match="timesteps t must be integers, got float32"):
        dj.q_sample(SCHEDULE, x0, jnp.full((4,), 2.0), noise)
    with pytest.raises(ValueError, match=r"x0 must be floats in \[-1, 1\], got uint8"):
        dj.training_losses(SCHEDULE, model_fn, jnp.zeros((4, 3), jnp.uint8), jnp.arange(4), jax.random.PRNGKey(0))
    # The bound's functions too: the prior term of 0..255 was 728 bits/dim, and the loop failed inside JAX.
    with pytest.raises(ValueError, match=r"x0 must be floats in \[-1, 1\], got uint8"):
        dj.prior_bpd(SCHEDULE, jnp.zeros((4, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"x0 must be floats in \[-1, 1\], got uint8"):
        dj.calc_bpd_loop(SCHEDULE, model_fn, jnp.zeros((4, 3), jnp.uint8), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=re.escape("got shapes (4,), (4, 10), (4, 9)")):
        dj.rate_distortion(jnp.zeros(4), jnp.zeros((4, 10)), jnp.zeros((4, 9)))
    # The forward step and the parameterizations too: one noise row for the batch, a t[None] read per feature.
    with pytest.raises(ValueError, match=re.escape("noise of shape (1, 3) must have the shape of x, (4, 3)")):
        dj.q_step(SCHEDULE, x0, 5, noise[:1])
    for function in (dj.q_step, dj.predict_x0_from_eps, dj.predict_eps_from_x0, dj.predict_v, dj.predict_x0_from_v,
                     dj.predict_eps_from_v, dj.predict_x0_from_xprev):
        with pytest.raises(ValueError, match=re.escape("got shape (1, 4)")):
            function(SCHEDULE, x0, jnp.arange(4)[None], noise)
        with pytest.raises(ValueError, match=re.escape("of shape (4, 1) must have the shape of x, (4, 3)")):
            function(SCHEDULE, x0, jnp.arange(4), noise[:, :1])
    with pytest.raises(ValueError, match=re.escape("got shape (1, 4)")):
        dj.q_mean_variance(SCHEDULE, x0, jnp.arange(4)[None])
    for function in (dj.q_sample, dj.q_step):
        with pytest.raises(ValueError, match=r"x0 must be floats in \[-1, 1\], got uint8"):
            function(SCHEDULE, jnp.zeros((4, 3), jnp.uint8), 5, noise)
    with pytest.raises(ValueError, match=r"x0 must be floats in \[-1, 1\], got uint8"):
        dj.q_mean_variance(SCHEDULE, jnp.zeros((4, 3), jnp.uint8), 5)
    # A scalar t, and t [B] as a Python list, are timesteps as before.
    np.testing.assert_array_equal(dj.q_sample(SCHEDULE, x0, [5, 5, 5, 5], noise), dj.q_sample(SCHEDULE, x0, 5, noise))


def test_decoder_likelihood_of_16_bit_inputs_is_computed_in_float32():
    x = jnp.linspace(-1.0, 1.0, 256).astype(jnp.bfloat16)
    means, log_scales = jnp.full(256, 0.1, jnp.bfloat16), jnp.full(256, -3.0, jnp.bfloat16)
    log_likelihood = jax.jit(dj.discretized_gaussian_log_likelihood)  # one program where op by op compiled ~70
    low = log_likelihood(x, means=means, log_scales=log_scales)
    full = log_likelihood(
        x.astype(jnp.float32), means=means.astype(jnp.float32), log_scales=log_scales.astype(jnp.float32)
    )
    assert low.dtype == jnp.float32
    np.testing.assert_array_equal(low, full)


def test_decoder_likelihood_matches_mpmath_in_every_bin_and_far_tail():
    """log p(x_0 | x_1) (Eq. 13) of all 256 levels against 40-digit mpmath, for means inside and beyond the edges
    (+-1.02) and scales 0.01..1: the edge bins extend to infinity, and bins far in a tail (x - mean = 0.1 with
    scale 0.01: -49.35) keep their digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    levels = np.arange(256) / 127.5 - 1.0
    x, means, scales = (a.ravel() for a in np.meshgrid(levels, [-1.02, -0.5, 0.0, 0.3, 1.02], [0.01, 0.1, 1.0],
                                                        indexing="ij"))

    def exact(x, mean, scale):
        upper, lower = (mpmath.mpf(x - mean + 1 / 255) / scale, mpmath.mpf(x - mean - 1 / 255) / scale)
        if x < -0.999:
            p = mpmath.ncdf(upper)
        elif x > 0.999:
            p = mpmath.ncdf(-lower)  # 1 - Phi(lower), without the cancellation
        elif upper + lower <= 0:
            p = mpmath.ncdf(upper) - mpmath.ncdf(lower)
        else:
            p = mpmath.ncdf(-lower) - mpmath.ncdf(-upper)
        return float(mpmath.log(p))

    expected = np.array([exact(*args) for args in zip(x, means, scales, strict=True)])
    got = jax.jit(dj.discretized_gaussian_log_likelihood)(
        jnp.asarray(x, jnp.float32), means=jnp.asarray(means, jnp.float32),
        log_scales=jnp.asarray(np.log(scales), jnp.float32),
    )
    assert expected.min() < -1e4 and expected.max() > -0.01  # far tails and near-certain edge bins are covered
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=5e-5, atol=1e-6)
