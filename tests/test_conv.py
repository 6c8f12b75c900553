"""XLA:CPU compile options that move convolutions from YNNPACK to Eigen: what they change and that results agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.conv import convolutions_in_ynn_fusions, cpu_conv_compiler_options

# More than 16 channels: jaxlib 0.10 gives YNNPACK only convolutions that wide.
B, H, W, CIN, COUT = 2, 5, 6, 20, 24


def conv_then_dense(params, x):
    """3x3 SAME conv (as flax nn.Conv runs it) followed by a dense layer, so the program also has a dot."""
    y = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y + params["bias"]) @ params["dense"]


def loss(params, x, cotangent):
    return jnp.sum(conv_then_dense(params, x) * cotangent)


def numpy_reference(params, x, cotangent):
    """float64 loss and gradients: the conv as a sum of 9 shifted [.., Cin] @ [Cin, Cout] products."""
    k, bias, dense = (np.asarray(params[n], np.float64) for n in ("kernel", "bias", "dense"))
    x, cot = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(xp[:, i : i + H, j : j + W] @ k[i, j] for i in range(3) for j in range(3)) + bias
    dy = cot @ dense.T
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(k)
    for i in range(3):
        for j in range(3):
            dxp[:, i : i + H, j : j + W] += dy @ k[i, j].T
            dk[i, j] = np.einsum("bhwc,bhwd->cd", xp[:, i : i + H, j : j + W], dy)
    grads = {"kernel": dk, "bias": dy.sum((0, 1, 2)), "dense": np.einsum("bhwc,bhwd->cd", y, cot)}
    return np.sum((y @ dense) * cot), grads, dxp[:, 1:-1, 1:-1]


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "kernel": jax.random.normal(keys[0], (3, 3, CIN, COUT)) / np.sqrt(9 * CIN),
        "bias": jax.random.normal(keys[1], (COUT,)),
        "dense": jax.random.normal(keys[2], (COUT, 8)) / np.sqrt(COUT),
    }
    x = jax.random.normal(keys[3], (B, H, W, CIN))
    cotangent = jax.random.normal(keys[4], (B, H, W, 8))
    return params, x, cotangent


@pytest.fixture(scope="module")
def compiled(problem):
    """The value-and-gradient program compiled with XLA's default options and with ours."""
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*problem)
    return {"default": lowered.compile(), "eigen": lowered.compile(compiler_options=cpu_conv_compiler_options())}


def test_no_options_off_cpu():
    assert cpu_conv_compiler_options("gpu") == {}
    assert cpu_conv_compiler_options("tpu") == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU option")
def test_options_take_convolutions_off_ynnpack_and_keep_its_dots(compiled):
    assert cpu_conv_compiler_options(), "this jaxlib rejected the option: the CPU speed-up is lost"
    default, eigen = (compiled[k].as_text() for k in ("default", "eigen"))
    # forward, input-gradient and kernel-gradient convolutions, none of them in a YNNPACK fusion
    assert convolutions_in_ynn_fusions(eigen) == (3, 0)
    if convolutions_in_ynn_fusions(default)[1] == 0:
        pytest.skip("this jaxlib does not give convolutions to YNNPACK: the option has nothing to change")
    # YNNPACK's dots are not turned off with the convolutions.
    assert eigen.count('"__ynn_fusion"') > 0


@pytest.mark.parametrize("which", ["default", "eigen"])
def test_value_and_gradients_match_float64_reference(problem, compiled, which):
    (value, (grads, dx)) = compiled[which](*problem)
    ref_value, ref_grads, ref_dx = numpy_reference(*problem)

    def rel_err(a, b):
        return np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))

    assert abs(float(value) - ref_value) / abs(ref_value) <= 1e-5
    assert rel_err(dx, ref_dx) <= 1e-5
    for name in ("kernel", "bias", "dense"):
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


def test_default_and_eigen_agree(problem, compiled):
    a = jax.tree.leaves(compiled["default"](*problem))
    b = jax.tree.leaves(compiled["eigen"](*problem))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(v))))
