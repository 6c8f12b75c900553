"""Write docs/forward_process.png: one digit and the swiss roll under q(x_t | x_0) at t = 0, 100, ..., T-1."""

import os

import jax
import numpy as np

import ddpm_jax as dj
from ddpm_jax import viz
from ddpm_jax.data import sample_toy
from ddpm_jax.metrics import load_digits_split


def main(out_dir: str = "docs") -> None:
    schedule = dj.make_schedule("linear", 1000)
    digits, _ = load_digits_split("train")
    timesteps = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
    key = jax.random.PRNGKey(0)
    viz.save_forward_process(
        os.path.join(out_dir, "forward_process_digits.png"), schedule, np.repeat(digits[:4], 2, 1).repeat(2, 2),
        key, timesteps=timesteps,
    )
    points = sample_toy("swissroll", 2000, np.random.default_rng(0))
    noise = jax.random.normal(key, points.shape)
    clouds = np.stack([
        np.asarray(dj.q_sample(schedule, points, np.full(len(points), t), noise)) for t in timesteps[::2]
    ])
    viz.save_png(
        os.path.join(out_dir, "forward_process_swissroll.png"), viz.scatter_trajectory_strip(clouds, timesteps[::2])
    )


if __name__ == "__main__":
    main()
