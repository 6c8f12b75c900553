"""Reading an experiment config (ml_collections, groups data/model/diffusion/training/sampling/eval).

`validate_config` checks everything a run needs before any work, so a bad value stops it with one message
that lists every problem; `build_model` and `schedule_from_config` turn a valid config into objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.data import DATASETS, NUM_TOY_TEST, NUM_TOY_TRAIN
from ddpm_jax.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, VLB_WEIGHT
from ddpm_jax.models import MLP, UNet
from ddpm_jax.sampling import TIMESTEP_SPACINGS
from ddpm_jax.schedules import BETA_DEFAULTS, SCHEDULE_ARGUMENTS, SCHEDULES, Schedule, make_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SAMPLERS = ("ddpm", "ddim")
DEFAULT_DDIM_STEPS = 50  # sampling.num_steps = 0 with the ddim sampler
OPTIMIZERS = ("adam", "adamw")


def schedule_from_config(diffusion: Mapping[str, Any]) -> Schedule:
    """The beta schedule named by `config.diffusion`."""
    name = diffusion["beta_schedule"]
    kwargs = {key: diffusion[key] for key in BETA_DEFAULTS if key in SCHEDULE_ARGUMENTS.get(name, ())}
    return make_schedule(name, diffusion["num_timesteps"], **kwargs)


def unused_diffusion_settings(diffusion: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """{field: (default, what ignores it)} of the diffusion settings that the process does not use: the betas a
    schedule does not take (cosine, jsd; beta_start of constant) and vlb_weight outside loss_type 'hybrid'."""
    schedule = diffusion.get("beta_schedule")
    taken = SCHEDULE_ARGUMENTS.get(schedule, set(BETA_DEFAULTS))
    unused = {key: (default, f"the {schedule!r} schedule") for key, default in BETA_DEFAULTS.items()
              if key not in taken}
    if diffusion.get("loss_type") != "hybrid":
        unused["vlb_weight"] = (VLB_WEIGHT, f"loss_type={diffusion.get('loss_type')!r} (only 'hybrid')")
    return unused


# The model fields each network reads in `build_model`: the other network's are ignored.
NETWORK_FIELDS = {
    "unet": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "num_groups"),
    "mlp": ("mlp_hidden", "mlp_layers"),
}


def unused_shape_settings(config_dict: Mapping[str, Any]) -> tuple[str, ...]:
    """The "group.field" names of the network and data-shape settings a run does not read: the other network's
    fields, and the image size and channels of a 2-D set."""
    name = config_dict.get("model", {}).get("name")
    unused = tuple(f"model.{field}" for other, fields in NETWORK_FIELDS.items() if other != name for field in fields)
    spec = DATASETS.get(config_dict.get("data", {}).get("dataset"))
    if spec is not None and spec.kind == "toy":
        unused += ("data.image_size", "data.num_channels")
    return unused


def ignored_diffusion_settings(diffusion: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """The `unused_diffusion_settings` that differ from their defaults: set, and silently without effect."""
    return {key: (default, user) for key, (default, user) in unused_diffusion_settings(diffusion).items()
            if diffusion.get(key, default) != default}


def prior_warning(config) -> str | None:
    """Why x_T of a valid config's schedule is far from N(0, I), where sampling starts, or None.

    The paper's T = 1000 linear betas end at alphas_cumprod = 4e-5; the same betas over fewer steps keep much more
    of x_0 (T = 20: x_T = 0.90 x_0 + 0.43 eps), which the prior term L_T then counts and samples never see.
    """
    df = config.diffusion
    alpha_bar = float(schedule_from_config(df).alphas_cumprod[-1])
    if alpha_bar <= 1e-3:
        return None
    return (f"at diffusion.num_timesteps={df.num_timesteps} the {df.beta_schedule} schedule ends at alphas_cumprod "
            f"= {alpha_bar:.3g}: x_T keeps {math.sqrt(alpha_bar):.2f} x_0, and sampling starts from N(0, I) (the "
            "paper's T = 1000 ends at 4e-5); raise diffusion.beta_end (configs/swissroll.py: 0.2 at T = 100 ends "
            "at 2e-5) or use diffusion.beta_schedule='cosine'")


def short_run_warnings(config) -> list[str]:
    """What a run of ``training.num_steps`` steps leaves undone by its end: the learning-rate warm-up, or the EMA of
    the weights (samples and bits/dim use it), which keeps ema_decay^N of the initial weights without warm-up."""
    tr = config.training
    warnings = []
    if tr.warmup_steps > tr.num_steps:
        warnings.append(f"training.num_steps={tr.num_steps} ends inside the learning-rate warm-up of "
                        f"training.warmup_steps={tr.warmup_steps}, at {tr.num_steps / tr.warmup_steps:.0%} of "
                        f"training.lr={tr.lr}")
    initial_weight = 0.0 if tr.ema_warmup else tr.ema_decay**tr.num_steps
    if initial_weight > 0.1:
        warnings.append(f"after training.num_steps={tr.num_steps} the EMA of the weights, which samples and bits/dim "
                        f"use, is still {initial_weight:.0%} the initial random weights (training.ema_decay="
                        f"{tr.ema_decay}): set training.ema_warmup=True or a smaller ema_decay")
    return warnings


def has_digits_metrics(config) -> bool:
    """Whether the shipped digits classifier scores this run's samples: 8k x 8k digits, the pipeline's pixel
    repetitions of 8 x 8."""
    return config.data.dataset == "digits" and config.data.image_size % 8 == 0


def sample_metrics_problem(config) -> str | None:
    """Why `generation.sample_metrics` cannot score ``sampling.num_samples`` samples, or None: asked before drawing
    them."""
    n = config.sampling.num_samples
    if not is_image_data(config) and not 2 <= n <= NUM_TOY_TEST // 2:
        return (f"sampling.num_samples={n}: the 2-D metrics compare the samples with as many held-out points and "
                f"those with as many more, from a test split of {NUM_TOY_TEST}; use 2 to {NUM_TOY_TEST // 2}")
    if has_digits_metrics(config) and n < 2:
        return f"sampling.num_samples={n}: the digits metrics (a Fréchet distance) need at least 2 samples"
    return None


def is_learned_variance(config) -> bool:
    return config.diffusion.var_type in ("learned", "learned_range")


def is_image_data(config) -> bool:
    """Whether the config's data set is images (else 2-D points)."""
    return DATASETS[config.data.dataset].kind == "image"


def num_sampling_steps(config, schedule) -> int:
    """Steps of the config's sampler: sampling.num_steps, by default all T for ddpm and 50 for ddim."""
    if config.sampling.sampler == "ddpm":
        return config.sampling.num_steps or schedule.num_timesteps
    return config.sampling.num_steps or DEFAULT_DDIM_STEPS


def build_model(config) -> nn.Module:
    """The denoiser named by `config.model`, with output channels doubled for learned variances."""
    m = config.model
    dtype = DTYPES[m.dtype]
    if m.name == "mlp":
        return MLP(
            hidden=m.mlp_hidden, num_layers=m.mlp_layers, learned_variance=is_learned_variance(config), dtype=dtype
        )
    channels = config.data.num_channels
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        out_channels=2 * channels if is_learned_variance(config) else channels,
        num_groups=m.num_groups,
        dtype=dtype,
        attn_implementation=m.attn_implementation or None,
    )


def data_shape(config) -> tuple[int, ...]:
    """Shape of one example: (H, W, C) for images, (dim,) for vectors."""
    if DATASETS[config.data.dataset].kind == "toy":
        return (config.data.dim,)
    return (config.data.image_size, config.data.image_size, config.data.num_channels)


def cudnn_missing(model: Mapping[str, Any]) -> bool:
    """Whether ``model`` (a config's model group) asks for cuDNN's attention where JAX has no GPU."""
    return model.get("attn_implementation") == "cudnn" and jax.default_backend() != "gpu"


def integer_problem(path: str, value, least: int) -> str | None:
    """What is wrong with setting ``path`` = ``value`` where an integer >= ``least`` belongs (a bool is refused), or
    None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        return f"{path}={value!r} must be an integer >= {least}"
    return None


def validate_config(config, *, num_devices: int = 1, process_count: int = 1, training: bool = False) -> None:
    """Raise one ValueError listing every problem of ``config`` for a run on ``num_devices`` devices.

    ``training``: also the rules of training only (runs saved before them still sample and evaluate).
    """
    problems: list[str] = []

    def choice(path: str, value, choices):
        if value not in choices:
            problems.append(f"{path}={value!r} is not one of {', '.join(map(str, choices))}")

    def positive(path: str, value, allow_zero=False):
        if problem := integer_problem(path, value, 0 if allow_zero else 1):
            problems.append(problem)

    d, m, df, tr, s, ev = config.data, config.model, config.diffusion, config.training, config.sampling, config.eval
    choice("data.dataset", d.dataset, sorted(DATASETS))
    choice("model.name", m.name, ("unet", "mlp"))
    choice("model.dtype", m.dtype, tuple(DTYPES))
    choice("model.attn_implementation", m.attn_implementation, ("", "cudnn"))
    if m.attn_implementation == "cudnn" and m.dtype != "bfloat16":
        problems.append("model.attn_implementation='cudnn' needs model.dtype='bfloat16' (cuDNN attention is 16-bit)")
    if cudnn_missing(m):  # JAX raised it at the first call
        problems.append(f"model.attn_implementation='cudnn' needs an NVIDIA GPU, and JAX runs on "
                        f"{jax.default_backend()} here: leave it at '' (XLA's attention)")
    choice("diffusion.beta_schedule", df.beta_schedule, SCHEDULES)
    choice("diffusion.mean_type", df.mean_type, MEAN_TYPES)
    choice("diffusion.var_type", df.var_type, VAR_TYPES)
    choice("diffusion.loss_type", df.loss_type, LOSS_TYPES)
    choice("training.optimizer", tr.optimizer, OPTIMIZERS)
    choice("sampling.sampler", s.sampler, SAMPLERS)
    choice("sampling.spacing", s.spacing, TIMESTEP_SPACINGS)
    choice("eval.split", ev.split, ("train", "test"))
    for path, value in [
        ("diffusion.num_timesteps", df.num_timesteps),
        ("training.batch_size", tr.batch_size),
        ("training.num_steps", tr.num_steps),
        ("training.steps_per_call", tr.steps_per_call),
        ("training.microbatches", tr.microbatches),
        ("training.log_every", tr.log_every),
        ("training.checkpoint_every", tr.checkpoint_every),
        ("training.keep_checkpoints", tr.keep_checkpoints),
        ("training.max_skipped_steps", tr.max_skipped_steps),
        ("sampling.num_samples", s.num_samples),
        ("eval.batch_size", ev.batch_size),
        ("eval.num_bpd_examples", ev.num_bpd_examples),
    ]:
        positive(path, value)
    if df.num_timesteps == 1:  # q(x_{t-1} | x_t, x_0) needs a t > 1; the fixedlarge variances start from it
        problems.append("diffusion.num_timesteps=1 must be >= 2")
    for path, value in [
        ("training.warmup_steps", tr.warmup_steps),
        ("training.sample_every", tr.sample_every),
        ("eval.bpd_every", ev.bpd_every),
        ("sampling.num_steps", s.num_steps),
        ("sampling.trajectory_every", s.trajectory_every),
        ("sampling.batch_size", s.batch_size),
    ]:
        positive(path, value, allow_zero=True)
    if not 0.0 < tr.lr < 1.0:
        problems.append(f"training.lr={tr.lr} must be in (0, 1)")
    if not 0.0 <= tr.ema_decay < 1.0:
        problems.append(f"training.ema_decay={tr.ema_decay} must be in [0, 1)")
    # Written as `not (ok)` so that NaN, which fails every comparison, is refused too.
    if not tr.grad_clip > 0:
        problems.append(f"training.grad_clip={tr.grad_clip} must be > 0")
    if not tr.max_seconds >= 0:
        problems.append(f"training.max_seconds={tr.max_seconds} must be >= 0 (0: no limit)")
    for path, value in [("training.adam_b1", tr.adam_b1), ("training.adam_b2", tr.adam_b2)]:
        if not 0.0 <= value < 1.0:
            problems.append(f"{path}={value} must be in [0, 1)")
    if not 0 < tr.adam_eps < math.inf:  # an infinite one made every update 0
        problems.append(f"training.adam_eps={tr.adam_eps} must be > 0 and finite")
    if not 0 <= tr.weight_decay < math.inf:
        problems.append(f"training.weight_decay={tr.weight_decay} must be >= 0 and finite")
    elif tr.weight_decay and tr.optimizer == "adam":
        problems.append(f"training.weight_decay={tr.weight_decay} needs training.optimizer='adamw' (Adam has none)")
    for key, (default, user) in ignored_diffusion_settings(df).items():
        problems.append(f"diffusion.{key}={df[key]} is not used by {user}: leave it at {default}")
    if not 0 <= df.vlb_weight < math.inf:
        problems.append(f"diffusion.vlb_weight={df.vlb_weight} must be >= 0 and finite")
    if not 0 <= s.eta <= 1:
        problems.append(f"sampling.eta={s.eta} must be in [0, 1]")

    if isinstance(tr.batch_size, int) and tr.batch_size > 0:
        if tr.batch_size % num_devices:
            problems.append(
                f"training.batch_size={tr.batch_size} is not divisible by the {num_devices} devices; "
                f"use a multiple of {num_devices}"
            )
        if tr.batch_size % process_count:
            problems.append(f"training.batch_size={tr.batch_size} is not divisible by the {process_count} hosts")
        parts = tr.microbatches * num_devices if isinstance(tr.microbatches, int) and tr.microbatches > 1 else 0
        if parts and tr.batch_size % num_devices == 0 and tr.batch_size % parts:
            problems.append(
                f"training.batch_size={tr.batch_size} gives {tr.batch_size // num_devices} examples per device, "
                f"which do not split into training.microbatches={tr.microbatches} parts; use a multiple of {parts}"
            )
    image_data = d.dataset in DATASETS and DATASETS[d.dataset].kind != "toy"
    if image_data and ev.bpd_every and isinstance(ev.batch_size, int) and ev.batch_size > 0 \
            and ev.batch_size % num_devices:
        # bits/dim during training splits each eval batch over the devices (and so over the hosts)
        problems.append(
            f"eval.batch_size={ev.batch_size} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}"
        )
    if isinstance(tr.steps_per_call, int) and tr.steps_per_call > 0:
        for path, value in [
            ("training.log_every", tr.log_every),
            ("training.checkpoint_every", tr.checkpoint_every),
            ("training.sample_every", tr.sample_every),
            ("eval.bpd_every", ev.bpd_every),
        ]:
            if isinstance(value, int) and value % tr.steps_per_call:
                problems.append(f"{path}={value} must be a multiple of training.steps_per_call={tr.steps_per_call}")
    if training and all(isinstance(v, int) and v > 0 for v in (tr.log_every, tr.checkpoint_every)) \
            and tr.checkpoint_every % tr.log_every:
        problems.append(f"training.checkpoint_every={tr.checkpoint_every} must be a multiple of training.log_every="
                        f"{tr.log_every}: a run resumed from a checkpoint between two log steps would leave the "
                        "steps before it in no log line")
    if training and d.dataset in DATASETS and isinstance(s.num_samples, int) and s.num_samples > 0 \
            and (problem := sample_metrics_problem(config)):  # the samples drawn during training are scored
        problems.append(problem)

    if df.var_type in ("learned", "learned_range") and df.loss_type in ("mse", "l1", "huber"):
        problems.append(f"diffusion.var_type={df.var_type!r} needs diffusion.loss_type 'hybrid' or 'kl'")
    if df.loss_type == "hybrid" and df.var_type not in ("learned", "learned_range"):
        problems.append("diffusion.loss_type='hybrid' needs diffusion.var_type 'learned' or 'learned_range'")
    if s.sampler == "ddim" and df.mean_type == "xprev":
        problems.append("sampling.sampler='ddim' needs diffusion.mean_type eps, x0 or v (not xprev)")
    if s.sampler == "ddpm" and s.eta:
        problems.append(f"sampling.eta={s.eta} sets DDIM's noise, and the ddpm sampler has its own: set "
                        "sampling.sampler='ddim' (or sampling.eta=0)")
    if s.sampler == "ddpm" and s.spacing != "linear" and not s.num_steps:
        problems.append(f"sampling.spacing={s.spacing!r} chooses the steps of a shorter chain, and the ddpm sampler "
                        "runs all T steps (set sampling.num_steps, or sampling.spacing='linear'; sample.py: --steps, "
                        "or --spacing=linear)")
    if isinstance(df.num_timesteps, int) and isinstance(s.num_steps, int):
        if s.num_steps > df.num_timesteps:
            problems.append(f"sampling.num_steps={s.num_steps} exceeds diffusion.num_timesteps={df.num_timesteps}")
        elif s.sampler == "ddpm" and 0 < s.num_steps < df.num_timesteps and df.var_type == "learned":
            problems.append(
                f"sampling.num_steps={s.num_steps} respaces the ancestral chain, and diffusion.var_type='learned' "
                "predicts the variance of one of the T steps only: sample all T steps (sampling.num_steps=0), or "
                "use sampling.sampler='ddim' (sample.py: --steps=0, or --sampler=ddim)"
            )
        elif s.sampler == "ddim" and not s.num_steps and DEFAULT_DDIM_STEPS > df.num_timesteps:
            problems.append(
                f"sampling.num_steps=0 means {DEFAULT_DDIM_STEPS} DDIM steps, more than diffusion.num_timesteps="
                f"{df.num_timesteps}; set sampling.num_steps <= {df.num_timesteps} (sample.py: --steps)"
            )

    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        problems.append(f"seed={config.seed!r} must be an integer in [0, 2^32): JAX keys hold 32 bits, so 2^32 "
                        "would repeat seed 0")
    if d.dataset in DATASETS:
        spec = DATASETS[d.dataset]
        num_train = spec.num_train
        if spec.kind == "toy":
            positive("data.num_train", d.num_train, allow_zero=True)
            num_train = (d.num_train or NUM_TOY_TRAIN) if isinstance(d.num_train, int) else None
            if m.name != "mlp":
                problems.append(f"data.dataset={d.dataset!r} is 2-D: use model.name='mlp'")
            elif m.dropout:
                problems.append(f"model.dropout={m.dropout}: the MLP has no dropout (set model.dropout=0)")
            if d.dim != spec.shape[0]:
                problems.append(f"data.dim={d.dim} but {d.dataset!r} has {spec.shape[0]} dimensions")
            if d.random_flip:
                problems.append("data.random_flip applies to images only")
            if ev.bpd_every:
                problems.append(f"eval.bpd_every={ev.bpd_every}: bits/dim is defined for 8-bit images, and "
                                f"{d.dataset!r} is 2-D (set eval.bpd_every=0)")
            if df.loss_type in ("kl", "hybrid"):
                # Its L_0 is the discretized decoder of 8-bit data in [-1, 1]: for points outside that range a
                # wrong mean scores better than the right one.
                problems.append(f"diffusion.loss_type={df.loss_type!r} has the 8-bit image decoder as L_0, and "
                                f"{d.dataset!r} is 2-D: use 'mse' (or 'l1', 'huber')")
        else:
            if m.name != "unet":
                problems.append(f"data.dataset={d.dataset!r} holds images: use model.name='unet'")
            positive("data.num_channels", d.num_channels)
            if d.num_channels != spec.num_channels:
                problems.append(f"data.num_channels={d.num_channels} but {d.dataset!r} has {spec.num_channels}")
            positive("data.image_size", d.image_size)
            if d.get("num_train"):
                problems.append(f"data.num_train={d.num_train} applies to 2-D sets only: {d.dataset!r} trains on "
                                f"all {spec.num_train} images of its train split (set data.num_train=0)")
        if num_train and isinstance(tr.batch_size, int) and tr.batch_size > num_train:
            problems.append(f"training.batch_size={tr.batch_size} exceeds the {num_train} examples of "
                            f"{d.dataset!r}'s train split")

    # Python's bool and float pass ml_collections' int fields of a config built in code (True: 1 res block).
    for key in {"unet": ("ch", "num_res_blocks", "num_groups"), "mlp": ("mlp_hidden", "mlp_layers")}.get(m.name, ()):
        positive(f"model.{key}", m[key])
    for key in ("ch_mult", "attn_resolutions") if m.name == "unet" else ():
        if not isinstance(m[key], (tuple, list)) or any(integer_problem(key, v, 1) for v in m[key]):
            problems.append(f"model.{key}={m[key]!r} must be a tuple of integers >= 1")
    # Building the network and the schedule needs their own settings valid (not every other one: all in one list).
    if not any(problem.startswith(("model.", "data.")) for problem in problems):
        try:
            model = build_model(config)
            if m.name == "unet":
                model.check_resolution(d.image_size, d.image_size)
        except ValueError as err:
            problems.append(f"model: {err}")
    if not any(problem.startswith("diffusion.") for problem in problems):
        try:
            schedule_from_config(df)
        except ValueError as err:
            taken = ["num_timesteps",
                     *(key for key in BETA_DEFAULTS if key in SCHEDULE_ARGUMENTS.get(df.beta_schedule, ()))]
            settings = ", ".join(f"diffusion.{key}={df[key]}" for key in taken)
            problems.append(f"the {df.beta_schedule!r} schedule of {settings}: {err}")
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))
