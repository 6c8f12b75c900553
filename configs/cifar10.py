"""CIFAR-10 32x32 with the DDPM paper's exact settings (Ho et al. 2020, Sec. 4 and Appendix B)."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    # model: base values are the paper's 35.7M-parameter network (ch 128, ch_mult (1,2,2,2), attn 16, dropout 0.1)
    config.training.num_steps = 800_000
    # Several optimizer steps per jitted call hide the per-call dispatch cost on accelerators (measured on an
    # H100, bf16: 30.5 -> 22.9 ms per step with 5; benchmarks/NOTES.md).
    config.training.steps_per_call = 5
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 20_000
    config.eval.bpd_every = 50_000
    config.eval.num_bpd_examples = 256
    return config
