"""The DDPM U-Net (Ho et al. 2020, Appendix B; PixelCNN++-style backbone with self-attention at 16x16)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import (
    AttnBlock,
    Conv,
    Downsample,
    Dtype,
    GroupNorm,
    ResnetBlock,
    Upsample,
    default_init,
    timestep_embedding,
)


class UNet(nn.Module):
    """Denoising U-Net: x [B, H, W, C] (NHWC) and int t [B] -> float32 [B, H, W, out_channels].

    Defaults are the paper's CIFAR-10 network (35,746,307 parameters). `dtype` is the computation dtype
    (e.g. bfloat16 on accelerators); parameters stay float32 and GroupNorm statistics and the attention
    softmax are computed in float32. `attn_resolutions` are image heights at which attention is applied.
    `attn_implementation` is passed to jax.nn.dot_product_attention: None (XLA) or "cudnn" (GPU, 16-bit).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    out_channels: int = 3
    num_groups: int = 32
    norm_eps: float = 1e-6
    conv_shortcut: bool = False
    dtype: Dtype = jnp.float32
    attn_implementation: str | None = None

    def __post_init__(self):
        # Configs hand over lists; tuples keep the module hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        self._check_config()
        super().__post_init__()

    def _check_config(self) -> None:
        """Raise ValueError for a configuration that cannot build a network."""
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult}.")
        if self.ch < 4:
            raise ValueError(f"ch must be >= 4 (it is also the time-embedding width), got {self.ch}.")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {self.out_channels}.")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}.")
        widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(
                f"num_groups={self.num_groups} must divide every channel count {widths} (not {bad}); "
                "change ch, ch_mult or num_groups."
            )

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ValueError unless a height x width image fits the down/up-sampling and attention levels."""
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} must be divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={self.ch_mult}); change the image size or use fewer levels."
            )
        heights = [height // 2**level for level in range(len(self.ch_mult))]
        missing = [r for r in self.attn_resolutions if r not in heights]
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} never occur: feature-map heights for a {height}x{width} input "
                f"are {heights}; set attn_resolutions to a subset of those."
            )
        if self.attn_implementation == "cudnn":  # one head, so its size is the channel count
            widths = {self.ch * m for h, m in zip(heights, self.ch_mult, strict=True) if h in self.attn_resolutions}
            bad = sorted(w for w in widths | {self.ch * self.ch_mult[-1]} if w > 256 or w % 8)
            if bad:
                raise ValueError(
                    f"attn_implementation='cudnn' takes attention widths <= 256 and multiples of 8 (JAX's limit "
                    f"for cuDNN from H100 on; 128 before), got {bad}; use the default attention"
                )

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or jnp.ndim(t) > 1:
            raise ValueError(f"UNet takes NHWC images [batch, height, width, channels] and t as a scalar or "
                             f"[batch], got shapes {x.shape} and {jnp.shape(t)}")
        self.check_resolution(x.shape[1], x.shape[2])
        num_levels = len(self.ch_mult)
        resnet = lambda out_ch, name: ResnetBlock(
            out_ch, self.dropout, self.num_groups, self.norm_eps, self.conv_shortcut, self.dtype, name=name
        )
        attn = lambda name: AttnBlock(self.num_groups, self.norm_eps, self.dtype, self.attn_implementation, name=name)
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, kernel_init=default_init(), name=name)

        temb = timestep_embedding(jnp.broadcast_to(t, x.shape[:1]), self.ch)
        temb = dense(4 * self.ch, "temb_dense_1")(nn.swish(dense(4 * self.ch, "temb_dense_0")(temb)))

        x = x.astype(self.dtype)
        conv_in = Conv(self.ch, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=default_init(), name="conv_in")
        skips = [conv_in(x)]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = resnet(self.ch * mult, f"down_{level}_block_{i}")(skips[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != num_levels - 1:
                skips.append(Downsample(self.resamp_with_conv, self.dtype, name=f"down_{level}_downsample")(h))

        h = skips[-1]
        h = resnet(h.shape[-1], "mid_block_0")(h, temb, train)
        h = attn("mid_attn")(h)
        h = resnet(h.shape[-1], "mid_block_1")(h, temb, train)

        for level in reversed(range(num_levels)):
            # One more block than on the way down: each consumes one skip, including the downsampled one.
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(self.ch * self.ch_mult[level], f"up_{level}_block_{i}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{level}_upsample")(h)

        h = GroupNorm(self.num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="norm_out")(h)
        conv_out = Conv(
            self.out_channels,
            (3, 3),
            padding="SAME",
            dtype=self.dtype,
            kernel_init=default_init(1e-10),
            name="conv_out",
        )
        return conv_out(nn.swish(h)).astype(jnp.float32)
