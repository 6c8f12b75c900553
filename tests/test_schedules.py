"""Schedules against float64 NumPy references written from the papers' formulas (loops, not vector tricks)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax as dj


def reference_betas(name, T):
    """Betas written element by element from Ho et al. 2020 / Nichol & Dhariwal 2021."""
    out = []
    for i in range(T):
        if name == "linear":
            out.append(1e-4 + (0.02 - 1e-4) * i / (T - 1))
        elif name == "quadratic":
            out.append((math.sqrt(1e-4) + (math.sqrt(0.02) - math.sqrt(1e-4)) * i / (T - 1)) ** 2)
        elif name == "cosine":

            def f(t):
                return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

            out.append(min(1 - (f(i + 1) / f(0)) / (f(i) / f(0)), 0.999))
        elif name == "sigmoid":
            x = -6 + 12 * i / (T - 1)
            out.append(1e-4 + (0.02 - 1e-4) / (1 + math.exp(-x)))
        elif name == "constant":
            out.append(0.02)
        elif name == "jsd":
            out.append(min(1.0 / (T - i), 0.999))  # paper's t = i + 1: 1 / (T - t + 1)
    return np.array(out)


def reference_schedule(betas):
    """Every derived quantity by direct products and the posterior formulas, Eqs. 4, 6-7."""
    T = len(betas)
    ref = {"betas": betas, "alphas": 1 - betas}
    abar = np.array([np.prod(1 - betas[: i + 1]) for i in range(T)])
    abar_prev = np.array([1.0] + [abar[i - 1] for i in range(1, T)])
    ref.update(
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=abar**0.5,
        sqrt_one_minus_alphas_cumprod=(1 - abar) ** 0.5,
        log_one_minus_alphas_cumprod=np.log(1 - abar),
        sqrt_recip_alphas_cumprod=abar**-0.5,
        sqrt_recipm1_alphas_cumprod=(1 / abar - 1) ** 0.5,
        posterior_variance=(1 - abar_prev) / (1 - abar) * betas,
        posterior_mean_coef1=abar_prev**0.5 * betas / (1 - abar),
        posterior_mean_coef2=(1 - betas) ** 0.5 * (1 - abar_prev) / (1 - abar),
    )
    pv = ref["posterior_variance"]
    ref["posterior_log_variance_clipped"] = np.log(np.concatenate([[pv[1]], pv[1:]]))
    return ref


@pytest.mark.parametrize("name", dj.SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000])
def test_schedule_matches_reference(name, T):
    schedule = dj.make_schedule(name, T)
    betas = reference_betas(name, T)
    assert schedule.num_timesteps == T
    for key, expected in reference_schedule(betas).items():
        got = np.asarray(getattr(schedule, key))
        assert got.dtype == np.float32, key
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-12, err_msg=f"{name} {key}")


def test_linear_schedule_paper_values():
    schedule = dj.make_schedule("linear", 1000)
    assert float(schedule.betas[0]) == pytest.approx(1e-4)
    assert float(schedule.betas[-1]) == pytest.approx(0.02)
    # Ho et al. 2020, Sec. 4: L_T = KL(q(x_T|x_0) || N(0,I)) ~ 1e-5 bits/dim; abar_T ~ 4e-5.
    assert 3e-5 < float(schedule.alphas_cumprod[-1]) < 5e-5


def test_cosine_alphas_cumprod_follows_closed_form():
    T = 1000
    schedule = dj.make_schedule("cosine", T)
    t = np.arange(1, T + 1)
    f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    unclipped = slice(0, T - 5)  # the last betas are clipped at 0.999
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod)[unclipped], f[unclipped], rtol=1e-4, atol=1e-7)


def test_schedule_from_betas_and_pytree():
    import jax

    betas = np.linspace(0.01, 0.2, 7)
    schedule = dj.make_schedule_from_betas(betas)
    leaves = jax.tree_util.tree_leaves(schedule)
    assert len(leaves) == 13
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, schedule)
    assert doubled.num_timesteps == 7
    np.testing.assert_allclose(np.asarray(doubled.betas), 2 * betas, rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dj.make_schedule("linear", 0), "num_timesteps must be >= 1"),
        (lambda: dj.make_schedule("linear", 2.5), "must be an integer"),
        (lambda: dj.make_schedule("cosinus", 10), "unknown beta schedule 'cosinus'.*linear"),
        (lambda: dj.make_schedule("linear", 10, beta_end=1.5), r"open interval \(0, 1\)"),
        (lambda: dj.make_schedule("linear", 10, beta_start=0.0), r"open interval \(0, 1\)"),
        (lambda: dj.make_schedule("cosine", 10, beta_end=0.1), "unexpected"),
        (lambda: dj.make_schedule_from_betas([0.1, np.nan]), "non-finite"),
        (lambda: dj.make_schedule_from_betas([0.1, np.inf]), "non-finite"),
        (lambda: dj.make_schedule_from_betas([[0.1]]), "1-D"),
        (lambda: dj.make_schedule_from_betas([0.1, 1.0]), r"open interval"),
    ],
)
def test_bad_schedules_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_respaced_schedule_keeps_alphas_cumprod_at_the_kept_steps():
    """Nichol & Dhariwal's respacing: alphas_cumprod at the kept steps are the original's; all steps kept give the
    original schedule back."""
    schedule = dj.make_schedule("cosine", 1000)
    kept = np.array([0, 1, 5, 100, 400, 999])
    respaced = dj.respace_schedule(schedule, kept)
    assert respaced.num_timesteps == len(kept)
    np.testing.assert_allclose(respaced.alphas_cumprod, np.asarray(schedule.alphas_cumprod)[kept], rtol=1e-6)
    np.testing.assert_allclose(respaced.betas[3], 1 - schedule.alphas_cumprod[100] / schedule.alphas_cumprod[5],
                               rtol=1e-5)
    same = dj.respace_schedule(schedule, np.arange(1000))
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(same, name), getattr(schedule, name), rtol=1e-5, err_msg=name)
    for bad in (np.array([5, 5]), np.array([3, 1]), np.array([0, 1000]), np.array([-1, 5]), np.array([], int),
                np.array([0.0, 5.0])):
        with pytest.raises(ValueError, match="timesteps must be integers increasing strictly"):
            dj.respace_schedule(schedule, bad)
    with pytest.raises(ValueError, match="close over them instead of passing them through jit"):
        jax.jit(lambda kept: dj.respace_schedule(schedule, kept))(jnp.arange(3))


def test_respacing_keeps_the_tiny_alphas_cumprod_of_a_long_schedule():
    """At T = 4000 alphas_cumprod ends at 2.6e-18: the last step of a chain respaced to few steps has
    1 - beta = 2.6e-18 / alphas_cumprod[t_prev], which rounds away in float64. Respacing from logs keeps it to
    float32 precision (it was 5e-4 off with 3 steps, and 1 or 2 steps were refused as beta = 1)."""
    schedule = dj.make_schedule("linear", 4000)
    exact = np.cumprod(1 - np.linspace(1e-4, 0.02, 4000))
    # log(1 - abar) is -abar where abar is tiny (it was log(1.0) = 0 below abar ~ 1e-16).
    np.testing.assert_allclose(schedule.log_one_minus_alphas_cumprod, np.log1p(-exact), rtol=1e-6)
    for kept in ([3999], [0, 3999], [0, 2000, 3999], [5, 17, 1000, 3998, 3999]):
        respaced = dj.respace_schedule(schedule, np.array(kept))
        np.testing.assert_allclose(respaced.alphas_cumprod, exact[kept], rtol=2e-6, err_msg=str(kept))
        np.testing.assert_allclose(respaced.sqrt_recip_alphas_cumprod, exact[kept] ** -0.5, rtol=2e-6)
        np.testing.assert_allclose(respaced.posterior_mean_coef2[-1],  # (1 - abar_prev) sqrt(alpha) / (1 - abar)
                                   (1 - np.append(1, exact[kept])[-2]) * np.sqrt(exact[kept][-1] / np.append(
                                       1, exact[kept])[-2]) / (1 - exact[kept][-1]), rtol=2e-6)


def test_a_schedule_that_float32_cannot_hold_is_refused():
    """T = 12000 linear steps: alphas_cumprod falls to 1.9e-53 (0 in float32) while its square root and every
    coefficient stay finite. At T = 20000 1 / sqrt(alphas_cumprod) (1e53) overflows float32: a message, not a
    schedule holding inf (samplers returned NaN)."""
    exact = np.cumprod(1 - np.linspace(1e-4, 0.02, 12000))
    schedule = dj.make_schedule("linear", 12000)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod, np.sqrt(exact), rtol=1e-6)
    np.testing.assert_allclose(schedule.sqrt_recip_alphas_cumprod, exact**-0.5, rtol=1e-6)
    with pytest.raises(ValueError, match=r"sqrt_recip_alphas_cumprod is not finite in float32 .*use fewer timesteps"):
        dj.make_schedule("linear", 20000)
