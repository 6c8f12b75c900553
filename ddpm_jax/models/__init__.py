"""Denoising networks: the DDPM U-Net, an MLP for vectors, and a loader for diffusers' released weights."""

from ddpm_jax.models.from_diffusers import (
    convert_diffusers_state_dict,
    diffusion_settings_from_scheduler,
    load_diffusers_unet,
    read_diffusers_config,
    read_safetensors,
    unet_kwargs_from_diffusers_config,
)
from ddpm_jax.models.layers import count_params, denoiser_fn, inference_params, timestep_embedding
from ddpm_jax.models.mlp import MLP
from ddpm_jax.models.unet import UNet

__all__ = [
    "MLP",
    "UNet",
    "convert_diffusers_state_dict",
    "count_params",
    "denoiser_fn",
    "diffusion_settings_from_scheduler",
    "inference_params",
    "load_diffusers_unet",
    "read_diffusers_config",
    "read_safetensors",
    "timestep_embedding",
    "unet_kwargs_from_diffusers_config",
]
