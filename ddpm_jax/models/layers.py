"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B): time embedding, ResNet block, attention."""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Fan-average uniform variance scaling, the initialiser of the paper's code (scale 1e-10 ~ zero init)."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of parameters of a denoiser `model(x, t)` for inputs x of input_shape, without running init."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    t = jax.ShapeDtypeStruct(tuple(input_shape[:1]), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [B, dim] float32 of t [B]: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/(half-1))."""
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4 (got {dim}); increase the model width.")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block with an additive time embedding; x [B, H, W, C] -> [B, H, W, out_ch]."""

    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    conv_shortcut: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda features, kernel, name, scale=1.0: nn.Conv(
            features, kernel, padding="SAME", dtype=self.dtype, kernel_init=default_init(scale), name=name
        )
        h = nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="norm_0")(x)
        h = conv(self.out_ch, (3, 3), "conv_0")(nn.swish(h))
        # The time embedding shifts every channel of every pixel: broadcast over H and W.
        temb_proj = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init(), name="temb_proj")
        h = h + temb_proj(nn.swish(temb))[:, None, None, :]
        h = nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="norm_1")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
        # Near-zero init of the last conv makes every block start as the identity (paper code, scale 1e-10).
        h = conv(self.out_ch, (3, 3), "conv_1", scale=1e-10)(h)
        if x.shape[-1] != self.out_ch:
            kernel = (3, 3) if self.conv_shortcut else (1, 1)
            x = conv(self.out_ch, kernel, "shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with a residual connection; x [B, H, W, C] -> same."""

    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    implementation: str | None = None  # jax.nn.dot_product_attention's: None (XLA) or "cudnn" (GPU, bf16)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = nn.GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)
        dense = lambda name, scale=1.0: nn.Dense(c, dtype=self.dtype, kernel_init=default_init(scale), name=name)
        # [B, HW, heads=1, C] is the layout dot_product_attention (and cuDNN) expects; its softmax is float32.
        q, k, v = (dense(name)(h).reshape(b, height * width, 1, c) for name in ("q", "k", "v"))
        h = jax.nn.dot_product_attention(q, k, v, scale=c**-0.5, implementation=self.implementation)
        h = h.reshape(b, height, width, c)
        return x + dense("proj_out", scale=1e-10)(h)


class Downsample(nn.Module):
    """Halve H and W: stride-2 conv3x3 padded (0, 1) like TF 'SAME', or 2x2 average pooling."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Conv(
            x.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            dtype=self.dtype,
            kernel_init=default_init(),
            name="conv",
        )(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, optionally followed by a conv3x3."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        x = x.reshape(b, 2 * height, 2 * width, c)
        if self.with_conv:
            x = nn.Conv(x.shape[-1], (3, 3), padding="SAME", dtype=self.dtype, kernel_init=default_init(), name="conv")(
                x
            )
        return x
