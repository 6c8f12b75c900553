"""CelebA 64x64 (centre 140x140 crop): the paper's 4-level network with one more level for 64x64."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.dataset = "celeba64"
    config.data.image_size = 64
    config.data.num_channels = 3
    config.data.random_flip = True
    config.model.ch_mult = (1, 2, 2, 2, 4)
    config.model.attn_resolutions = (16,)
    config.training.num_steps = 500_000
    config.training.checkpoint_every = 10_000
    return config
