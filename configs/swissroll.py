"""2-D toy data with the MLP denoiser (Sohl-Dickstein et al. 2015); data.dataset may be swissroll, moons,
8gaussians, checkerboard or circles."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.data.dataset = "swissroll"
    config.model.name = "mlp"
    config.model.mlp_hidden = 128
    config.model.mlp_layers = 3
    config.model.dropout = 0.0  # the MLP has none
    config.diffusion.num_timesteps = 100
    config.diffusion.beta_end = 0.2  # the few-step chain still ends near N(0, I): abar_T ~ 2e-5
    config.diffusion.beta_start = 1e-3
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 1024
    config.training.num_steps = 5000
    config.training.lr = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.995
    config.training.steps_per_call = 10
    config.training.log_every = 100
    config.training.checkpoint_every = 1000
    config.training.sample_every = 2500
    config.sampling.num_samples = 2000
    config.eval.batch_size = 1000
    config.eval.num_bpd_examples = 1000
    return config
