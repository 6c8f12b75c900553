"""How XLA:CPU runs the U-Net's convolutions: on Eigen instead of YNNPACK (jaxlib 0.10).

jaxlib 0.10 hands float32 convolutions with more than 16 channels to YNNPACK. On the 2-core Xeon this project
is developed on, a 3x3 convolution's forward + backward at the U-Net's shapes ran 1.0-2.4x faster on Eigen
(benchmarks/cpu_ops.py; YNNPACK's kernel gradient is the slow part), and a whole training step 1.4-1.5x
faster (benchmarks/NOTES.md). Reformulating the convolution in JAX (im2col, per-tap dots) was slower than Eigen.
The option changes no model code and no parameters; results differ from the default by float32 rounding.
For a whole process, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution does the same; it
must come before any bare `name=value` token in XLA_FLAGS, after which XLA's flag parser reads nothing.
"""

import functools
import re

import jax
import jax.numpy as jnp

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
