"""XLA:CPU compile options that move convolutions from YNNPACK to Eigen: what they change and that results agree.
The U-Net's convolution with its gradient written out: values against float64 NumPy, and Eigen's layout in a loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import UNet
from ddpm_jax.models.conv import conv_general_dilated, convolutions_in_ynn_fusions, cpu_conv_compiler_options

# More than 16 channels: jaxlib 0.10 gives YNNPACK only convolutions that wide.
B, H, W, CIN, COUT = 2, 5, 6, 20, 24


def conv_then_dense(params, x):
    """3x3 SAME conv (as flax nn.Conv runs it) followed by a dense layer, so the program also has a dot."""
    y = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y + params["bias"]) @ params["dense"]


def loss(params, x, cotangent):
    return jnp.sum(conv_then_dense(params, x) * cotangent)


def strided_conv_reference(x, w, dy, stride, pad):
    """float64 y, dx, dw of a 2-D NHWC/HWIO convolution as sums of per-tap [.., Cin] @ [Cin, Cout] products."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    kh, kw = w.shape[:2]
    ho, wo = dy.shape[1:3]
    xp = np.pad(x, ((0, 0), *pad, (0, 0)))
    window = lambda i, j: np.s_[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
    taps = [(i, j, window(i, j)) for i in range(kh) for j in range(kw)]
    y = sum(xp[sl] @ w[i, j] for i, j, sl in taps)
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i, j, sl in taps:
        dxp[sl] += dy @ w[i, j].T
        dw[i, j] = np.einsum("bhwc,bhwd->cd", xp[sl], dy)
    return y, dxp[:, pad[0][0] : pad[0][0] + x.shape[1], pad[1][0] : pad[1][0] + x.shape[2]], dw


def numpy_reference(params, x, cotangent):
    """float64 loss, parameter gradients and input gradient."""
    k, bias, dense = (np.asarray(params[n], np.float64) for n in ("kernel", "bias", "dense"))
    cot = np.asarray(cotangent, np.float64)
    dy = cot @ dense.T
    conv, dx, dk = strided_conv_reference(x, k, dy, 1, ((1, 1), (1, 1)))
    y = conv + bias
    grads = {"kernel": dk, "bias": dy.sum((0, 1, 2)), "dense": np.einsum("bhwc,bhwd->cd", y, cot)}
    return np.sum((y @ dense) * cot), grads, dx


def standard_normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float32 draws from NumPy: each shape of an eager jax.random.normal compiles for about 1 s on this CPU."""
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {
        "kernel": standard_normal(rng, 3, 3, CIN, COUT) / np.float32(np.sqrt(9 * CIN)),
        "bias": standard_normal(rng, COUT),
        "dense": standard_normal(rng, COUT, 8) / np.float32(np.sqrt(COUT)),
    }
    x = standard_normal(rng, B, H, W, CIN)
    cotangent = standard_normal(rng, B, H, W, 8)
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


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [
        (6, 3, 1, "SAME"),  # the ResNet blocks' 3x3
        (8, 3, 2, ((0, 1), (0, 1))),  # Downsample's strided conv
        (7, 3, 2, ((0, 1), (0, 1))),  # an odd size: the last row and column are not read
        (5, 1, 1, "SAME"),  # the 1x1 shortcut
    ],
)
def test_unet_conv_and_its_written_out_gradients_match_float64(size, kernel, stride, padding):
    rng = np.random.default_rng(3)
    x, w = standard_normal(rng, 2, size, size, 3), standard_normal(rng, kernel, kernel, 3, 5)
    y, vjp = jax.vjp(
        lambda x, w: conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
        x, w,
    )
    dy = standard_normal(rng, *y.shape)
    dx, dw = vjp(dy)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), padding)
    for ours, ref in zip((y, dx, dw), strided_conv_reference(x, w, dy, stride, padding), strict=True):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the gradient is written out for XLA:CPU only")
def test_unet_training_steps_in_a_scan_keep_every_convolution_in_eigens_layout():
    """XLA:CPU runs a convolution in Eigen's NHWC/HWIO layout ("b01f_01io->b01f"); in a loop body it does not
    rewrite autodiff's gradient convolutions into that layout, and those run ~20x slower. Two SGD steps of a
    U-Net with every kind of conv it has (3x3, strided, 1x1 shortcut) under one lax.scan, as train.py runs them."""
    model = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
    x = jax.ShapeDtypeStruct((2, 2, 8, 8, 1), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x.update(shape=(2, 8, 8, 1)), jnp.zeros(2, jnp.int32))

    def sgd_steps(params, xs):
        def step(params, x):
            grads = jax.grad(lambda p: jnp.mean(model.apply(p, x, jnp.zeros(2, jnp.int32)) ** 2))(params)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), None

        return jax.lax.scan(step, params, xs)[0]

    text = jax.jit(sgd_steps).lower(params, x).compile().as_text()
    labels = re.findall(r" convolution\([^\n]*?dim_labels=([\w>-]+)", text)
    # forward, input gradient and kernel gradient of 3x3, strided and 1x1 convs, each in the loop body
    assert len(labels) >= 9 and "while(" in text
    assert set(labels) == {"b01f_01io->b01f"}, labels
