"""An MLP denoiser for low-dimensional vectors (1-D and 2-D toy data, as in Sohl-Dickstein et al. 2015)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import Dtype, default_init, timestep_embedding


class MLP(nn.Module):
    """x [B, D] and int t [B] -> float32 [B, out_dim] ([B, 2 out_dim] with a learned-variance head).

    The time embedding (sinusoidal -> Dense -> swish -> Dense) is added to each hidden layer before its swish.
    `out_dim` defaults to D; `learned_variance` adds a second head whose output is concatenated after the
    first, the same layout as the U-Net's doubled output channels. `train` is unused (no dropout); it keeps
    the call signature of the U-Net.
    """

    hidden: int = 256
    num_layers: int = 4
    out_dim: int | None = None
    learned_variance: bool = False
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.hidden < 4:
            raise ValueError(f"hidden must be >= 4 (it is also the time-embedding width), got {self.hidden}.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
        if self.out_dim is not None and self.out_dim < 1:
            raise ValueError(f"out_dim must be >= 1 or None (= input dim), got {self.out_dim}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 2:
            raise ValueError(f"MLP expects vectors [batch, dim], got shape {x.shape}; use the UNet for images.")
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, kernel_init=default_init(), name=name)
        temb = timestep_embedding(jnp.broadcast_to(t, x.shape[:1]), self.hidden)
        temb = dense(self.hidden, "temb_dense_1")(nn.swish(dense(self.hidden, "temb_dense_0")(temb)))
        h = x.astype(self.dtype)
        for i in range(self.num_layers):
            h = nn.swish(dense(self.hidden, f"hidden_{i}")(h) + temb)
        out_dim = self.out_dim or x.shape[-1]
        out = dense(out_dim, "out")(h)
        if self.learned_variance:
            out = jnp.concatenate([out, dense(out_dim, "variance_out")(h)], axis=-1)
        return out.astype(jnp.float32)
