"""The PyTorch peer: diffusers `UNet2DModel` in the DDPM layout, its training step and ancestral sampling loop.

Imported by train_throughput.py and sampling.py so that both frameworks are timed in the same process and
run. The training step matches ours: random t, x_t from q(x_t | x_0), MSE on eps, grad-norm clip 1.0, Adam
(lr 2e-4, eps 1e-8) and an EMA of the parameters (0.9999). On CUDA, bf16 means autocast (float32 master
weights, as our bf16 compute dtype) and Adam is the fused implementation; float32 matmuls and convs use TF32,
as JAX's default precision does on the GPU.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

# diffusers UNet2DModel configurations equal to our configs (see ddpm_jax/models/from_diffusers.py).
PEER_CONFIGS = {
    "cifar10": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-6,
        dropout=0.1,
        attention_head_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    ),
}


def _digits_peer() -> dict:
    """The UNet2DModel equal to configs/digits.py's U-Net, read from that config so the two cannot drift."""
    from configs.digits import get_config

    config = get_config()
    m, size = config.model, config.data.image_size
    attn_levels = {i for i in range(len(m.ch_mult)) if size // 2**i in m.attn_resolutions}
    down = tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(len(m.ch_mult)))
    return dict(
        PEER_CONFIGS["cifar10"],
        sample_size=size,
        in_channels=config.data.num_channels,
        out_channels=config.data.num_channels,
        block_out_channels=tuple(m.ch * k for k in m.ch_mult),
        down_block_types=down,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        layers_per_block=m.num_res_blocks,
        norm_num_groups=m.num_groups,
        dropout=m.dropout,
    )


PEER_CONFIGS["digits"] = _digits_peer()


def _torch():
    import torch

    return torch


def device() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


def sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_peer(model_name: str):
    """(model on the device, parameter count)."""
    import diffusers

    torch = _torch()
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**PEER_CONFIGS[model_name]).to(device())
    return model, sum(p.numel() for p in model.parameters())


def _linear_alphas_cumprod(num_timesteps: int = 1000):
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def _autocast(dtype_name: str):
    torch = _torch()
    enabled = dtype_name == "bfloat16"
    return torch.autocast(device_type=device(), dtype=torch.bfloat16, enabled=enabled)


def _set_precision() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _timed(call, repeats: int, warmup: int) -> dict[str, Any]:
    start = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    times_sorted = sorted(times)
    return {
        "first_call_s": first,
        "median_s": float(np.median(times)),
        "min_s": times_sorted[0],
        "max_s": times_sorted[-1],
        "repeats": repeats,
        "samples_s": times,
    }


def train_step_bench(
    model_name: str, batch: int, dtype_name: str, mode: str, repeats: int, warmup: int = 2, steps_per_rep: int = 1
) -> dict[str, Any]:
    """Time one training step (forward, backward, clip, Adam, EMA); mode 'eager' or 'compile'."""
    torch = _torch()
    _set_precision()
    model, num_params = build_peer(model_name)
    model.train()
    dev = device()
    cfg = PEER_CONFIGS[model_name]
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    forward = torch.compile(model) if mode == "compile" else model
    opt_kwargs = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    if dev == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.Adam(model.parameters(), **opt_kwargs)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    _, abar = _linear_alphas_cumprod()
    abar_t = torch.tensor(abar, dtype=torch.float32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand(shape, generator=gen, device=dev) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,), generator=gen, device=dev)
        noise = torch.randn(shape, generator=gen, device=dev)
        a = abar_t[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(dtype_name):
            pred = forward(x_t, t).sample
        loss = torch.mean((pred.float() - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.9999)
        return loss

    def call():
        for _ in range(steps_per_rep):
            step()

    timing = _timed(call, repeats, warmup)
    for key in ("median_s", "min_s", "max_s"):
        timing[key] /= steps_per_rep
    timing["samples_s"] = [s / steps_per_rep for s in timing["samples_s"]]
    return {"framework": "torch", "mode": mode, "dtype": dtype_name, "batch": batch, "num_params": num_params,
            "steps_per_rep": steps_per_rep, "adam": "fused" if dev == "cuda" else "foreach", **timing}


def sample_bench(
    model_name: str, batch: int, dtype_name: str, mode: str, num_steps: int, repeats: int, warmup_steps: int = 3
) -> dict[str, Any]:
    """Time the ancestral loop (eps model, fixedlarge variance, clipped x0) over ``num_steps`` of T = 1000.

    Returns the time per step and the time of ``num_steps`` steps; the loop costs the same at every t.
    """
    torch = _torch()
    _set_precision()
    model, num_params = build_peer(model_name)
    model.eval()
    dev = device()
    cfg = PEER_CONFIGS[model_name]
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    forward = torch.compile(model) if mode == "compile" else model
    betas, abar = _linear_alphas_cumprod()
    abar_prev = np.append(1.0, abar[:-1])
    # fixedlarge: sigma^2 = beta_t (first entry the posterior variance), Ho et al. 2020 Sec. 3.2.
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_var = np.log(np.append(post_var[1], betas[1:]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    tab = {
        name: torch.tensor(v, dtype=torch.float32, device=dev)
        for name, v in dict(
            sqrt_recip=np.sqrt(1.0 / abar), sqrt_recipm1=np.sqrt(1.0 / abar - 1.0), coef_x0=coef_x0,
            coef_xt=coef_xt, sigma=np.exp(0.5 * log_var),
        ).items()
    }
    gen = torch.Generator(device=dev).manual_seed(0)

    @torch.no_grad()
    def run(steps: int):
        x = torch.randn(shape, generator=gen, device=dev)
        for i in range(steps):
            t_int = 999 - (i % 1000)
            t = torch.full((batch,), t_int, device=dev, dtype=torch.long)
            with _autocast(dtype_name):
                eps = forward(x, t).sample.float()
            x0 = (tab["sqrt_recip"][t_int] * x - tab["sqrt_recipm1"][t_int] * eps).clamp(-1, 1)
            mean = tab["coef_x0"][t_int] * x0 + tab["coef_xt"][t_int] * x
            if t_int > 0:
                mean = mean + tab["sigma"][t_int] * torch.randn(shape, generator=gen, device=dev)
            x = mean
        return x

    start = time.perf_counter()
    run(warmup_steps)
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(num_steps)
        sync()
        times.append(time.perf_counter() - start)
    per_step = [s / num_steps for s in times]
    return {
        "framework": "torch", "mode": mode, "dtype": dtype_name, "batch": batch, "num_params": num_params,
        "measured_steps": num_steps, "warmup_s": first,
        "chain_median_s": float(np.median(times)), "chain_min_s": min(times), "chain_max_s": max(times),
        "per_step": {"median_s": float(np.median(per_step)), "min_s": min(per_step), "max_s": max(per_step),
                     "repeats": repeats, "samples_s": per_step},
    }


def ratio(ours_s: float | None, theirs_s: float | None) -> float | None:
    """Speed ratio ours/theirs (>1: ours faster) from two times."""
    if not ours_s or not theirs_s or math.isnan(ours_s) or math.isnan(theirs_s):
        return None
    return theirs_s / ours_s


def modes_for(spec: list[str], dtype_name: str) -> list[str]:
    """Torch modes to run for ``dtype_name`` from items 'mode' or 'mode:dtype'."""
    modes = []
    for item in spec:
        mode, _, only = item.partition(":")
        if not only or only == dtype_name:
            modes.append(mode)
    return modes


def run_modes(results: dict, spec: str, threads: int, dtypes: list[str], bench, after_each=None) -> None:
    """Time ``bench(dtype_name, mode)`` for every torch mode of ``spec`` ('eager,compile:bfloat16') and dtype.

    Appends each result to ``results["torch"]`` and each failure to ``results["errors"]`` (a failing mode, e.g.
    torch.compile without a compiler, must not stop the benchmark), then calls ``after_each()`` (a partial save);
    ``threads`` > 0 sets torch's thread count.
    """
    modes = [m for m in spec.split(",") if m]
    if not modes:
        return
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)
    results["torch_threads"] = torch.get_num_threads()
    for dtype_name in dtypes:
        for mode in modes_for(modes, dtype_name):
            try:
                results["torch"].append(bench(dtype_name, mode))
            except Exception as err:
                results["errors"].append(f"torch {mode} {dtype_name}: {type(err).__name__}: {err}"[:2000])
            print(results["torch"][-1:] or results["errors"][-1], flush=True)
            if after_each is not None:
                after_each()
