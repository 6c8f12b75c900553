"""The default: scikit-learn's 8x8 handwritten digits (1,797 images, no download) and a small U-Net.

Sized to train on 2 CPU cores in three to five minutes (timings in the README).
"""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 8
    config.model.dropout = 0.0
    config.training.batch_size = 128
    config.training.num_steps = 800
    config.training.lr = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.999
    config.training.ema_warmup = True
    # one lax.scan of 10 steps per call: 1.13x the steps/s of one step per call on 2 CPU cores (benchmarks/NOTES.md)
    config.training.steps_per_call = 10
    config.training.log_every = 50
    config.training.checkpoint_every = 200
    config.training.sample_every = 0
    config.sampling.num_samples = 100
    config.eval.batch_size = 128
    return config
