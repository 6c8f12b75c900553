"""How XLA:CPU runs the U-Net's convolutions: on Eigen instead of YNNPACK (jaxlib 0.10), and in a loop.

jaxlib 0.10 hands float32 convolutions with more than 16 channels to YNNPACK. On the 2-core Xeon this project
is developed on, a 3x3 convolution's forward + backward at the U-Net's shapes ran 1.0-2.4x faster on Eigen
(benchmarks/cpu_ops.py; YNNPACK's kernel gradient is the slow part), and a whole training step 1.4-1.5x
faster (benchmarks/NOTES.md). Reformulating the convolution in JAX (im2col, per-tap dots) was slower than Eigen.
The option changes no model code and no parameters; results differ from the default by float32 rounding.
For a whole process, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution does the same; it
must come before any bare `name=value` token in XLA_FLAGS, after which XLA's flag parser reads nothing.

`conv_general_dilated` is what the U-Net's `nn.Conv` layers call. On XLA:CPU its gradient is written out as
convolutions in Eigen's one layout (NHWC input, HWIO kernel). Autodiff's gradient convolutions have other dimension
numbers, which XLA:CPU rewrites to that layout in straight-line code but not inside a `lax.scan` body, where they
fall back to a naive loop (digits U-Net training step, 4 steps in one scan: ~5 s per step against 0.25 s).
"""

import functools
import re

import jax
import jax.numpy as jnp
from jax import lax

_YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10.2's default YNNPACK list is individual dots, reductions and individual convolutions;
# compile options take the whole list, so this is the default minus convolutions.
_YNN_FUSIONS_WITHOUT_CONV = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def cpu_conv_compiler_options(backend: str | None = None) -> dict[str, str]:
    """`jax.jit(..., compiler_options=...)` that run convolutions on Eigen, on XLA:CPU only.

    backend defaults to jax.default_backend(); returns {} off CPU and where this jaxlib has no such option.
    """
    if (backend or jax.default_backend()) != "cpu" or not _cpu_option_supported():
        return {}
    return {_YNN_FUSION_OPTION: _YNN_FUSIONS_WITHOUT_CONV}


@functools.cache
def _cpu_option_supported() -> bool:
    """Whether this jaxlib's CPU compiler accepts the option (older ones have no YNNPACK and reject it)."""
    options = {_YNN_FUSION_OPTION: _YNN_FUSIONS_WITHOUT_CONV}
    try:
        jax.jit(jnp.negative, compiler_options=options).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # jaxlib raises its own error types for an unknown option or enum value
        return False
    return True


def convolutions_in_ynn_fusions(compiled_hlo_text: str) -> tuple[int, int]:
    """(convolutions, of which inside a YNNPACK fusion) in the text of a compiled XLA:CPU executable."""
    computations = {}
    for block in re.split(r"\n\n+", compiled_hlo_text):
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)", block)
        if head:
            computations[head.group(1)] = block
    ynn_bodies = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", compiled_hlo_text)
    inside = sum(len(re.findall(r" convolution\(", computations.get(name, ""))) for name in ynn_bodies)
    return len(re.findall(r" convolution\(", compiled_hlo_text)), inside


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
    feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated`, with the gradient below for 2-D NHWC/HWIO convolutions traced for XLA:CPU.

    Pass it to `nn.Conv(conv_general_dilated=...)`. Anything else (other backends, dilations, groups, layouts)
    goes to `lax.conv_general_dilated` as it is.
    """
    if (
        jax.default_backend() != "cpu" or lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1
        or preferred_element_type is not None or tuple(lhs_dilation or (1, 1)) != (1, 1)
        or tuple(rhs_dilation or (1, 1)) != (1, 1)
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
    ):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, precision, preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _conv2d(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in padding), precision)


def _nhwc_conv(x, w, padding, strides=(1, 1), lhs_dilation=(1, 1), rhs_dilation=(1, 1), precision=None):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation, _NHWC_HWIO, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding, precision) -> jax.Array:
    """x [B, H, W, Cin], w [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout]."""
    return _nhwc_conv(x, w, padding, strides, precision=precision)


def _conv2d_fwd(x, w, strides, padding, precision):
    return _conv2d(x, w, strides, padding, precision), (x, w)


def _conv2d_bwd(strides, padding, precision, residuals, dy):
    """Both gradients as NHWC/HWIO convolutions; dy [B, Ho, Wo, Cout]."""
    x, w = residuals
    sizes = tuple(zip(w.shape[:2], x.shape[1:3], dy.shape[1:3], strides, (lo for lo, _ in padding), strict=True))
    # dx: dy dilated by the stride, convolved with the spatially flipped kernel, its in/out channels swapped.
    dx_padding = [(k - 1 - lo, n - (no - 1) * s - 1 + lo) for k, n, no, s, lo in sizes]
    w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _nhwc_conv(dy, w_flipped, dx_padding, lhs_dilation=strides, precision=precision)
    # dw: a convolution over the batch, x as [Cin, H, W, B] images and dy as a [Ho, Wo, B, Cout] kernel dilated by
    # the stride; the result [Cin, kh, kw, Cout] is the kernel's gradient transposed.
    dw_padding = [(lo, k + (no - 1) * s - n - lo) for k, n, no, s, lo in sizes]
    dw = _nhwc_conv(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), dw_padding, rhs_dilation=strides, precision=precision
    )
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
