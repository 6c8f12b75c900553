"""Drawing from a trained model into files: samples (PNG grid, .npz, one PNG each), pictures of the chain,
interpolations, and the samples' quality metrics, FID and Inception Score among them.

Like `run`, a layer that touches files and the terminal, on top of the pure samplers in `sampling`. Many
samples are drawn in chains that are kept on disk as they finish, so that an interrupted call goes on from them.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import viz
from ddpm_jax.config import (
    data_shape,
    has_digits_metrics,
    integer_problem,
    is_image_data,
    num_sampling_steps,
    sample_metrics_problem,
)
from ddpm_jax.data import load_split, make_dataset, uint8_to_float
from ddpm_jax.interrupts import ChainWatch, progress_bar, say
from ddpm_jax.models.conv import cpu_conv_compiler_options
from ddpm_jax.models.layers import denoiser_fn
from ddpm_jax.parts import Parts, fingerprint, savez_atomically, writable_folder
from ddpm_jax.sampling import Trajectory, ddim_sample, ddpm_sample, interpolate, sample_from_latent
from ddpm_jax.training import batch_sharding, mesh_dividing, replicated


def make_sample_fn(
    config, model, schedule, *, num_samples: int | None = None, mesh=None, trajectory_every: int | None = None,
    progress_fn=None,
):
    """jitted ``(params, key) -> samples`` [num_samples, ...] (and a Trajectory if asked) with the config's sampler.

    ``num_samples`` defaults to ``sampling.num_samples``. With a ``mesh`` the chain is data-parallel: the samples
    (and the trajectory's records) are sharded along the batch over its devices, the parameters replicated.
    """
    s, d = config.sampling, config.diffusion
    shape = (num_samples or s.num_samples, *data_shape(config))
    kwargs = dict(
        mean_type=d.mean_type, var_type=d.var_type, clip_denoised=s.clip_denoised and is_image_data(config),
        trajectory_every=trajectory_every, progress_fn=progress_fn,
    )

    def sample(params, key):
        model_fn = denoiser_fn(model, params)
        num_steps = num_sampling_steps(config, schedule)
        if s.sampler == "ddim":
            return ddim_sample(model_fn, schedule, key, shape, num_steps=num_steps, eta=s.eta, spacing=s.spacing,
                               **kwargs)
        return ddpm_sample(model_fn, schedule, key, shape, num_steps=num_steps, spacing=s.spacing, **kwargs)

    if mesh is None:
        return jax.jit(sample, compiler_options=cpu_conv_compiler_options())
    out_shardings = batch_sharding(mesh)
    if trajectory_every is not None:
        records = batch_sharding(mesh, 2)
        out_shardings = (out_shardings, Trajectory(records, records, replicated(mesh)))
    return jax.jit(sample, out_shardings=out_shardings, compiler_options=cpu_conv_compiler_options())


def _grid_style(config) -> dict:
    """Upscale small images to ~48 px and separate them with grey borders (8x8 digits touch their edges)."""
    scale = max(1, 48 // config.data.image_size)
    return {"scale": scale, "padding": max(2, scale), "pad_value": 128}


MAX_GRID_SAMPLES = 256  # the PNG of an image run shows at most these (the .npz has them all)


def save_samples(config, samples: np.ndarray, path: str, reference: np.ndarray | None = None) -> None:
    """A PNG of samples: a grid of the first `MAX_GRID_SAMPLES` images, or for 2-D data a scatter plot beside the
    data. Samples holding NaN or inf, among all of them, are counted in a warning."""
    diverged = ~np.isfinite(samples).reshape(len(samples), -1).all(axis=1)
    if diverged.any():
        if is_image_data(config):
            shown = (f"{diverged[:MAX_GRID_SAMPLES].sum()} of them among the {min(len(samples), MAX_GRID_SAMPLES)} in "
                     f"{path}, NaN and inf drawn white, -inf black")
        else:
            shown = f"left out of the plot in {path}"
        say(f"warning: {diverged.sum()} of {len(samples)} samples hold NaN or inf ({shown})", file=sys.stderr)
    if is_image_data(config):
        viz.save_image_grid(path, samples[:MAX_GRID_SAMPLES], **_grid_style(config))
    else:
        viz.save_scatter(path, samples, reference, title=f"{config.data.dataset}: data | samples")


def sample_metrics(config, samples: np.ndarray, *, seed: int = 0) -> dict:
    """The sample-quality metric that fits the data, each beside its data-vs-data baseline.

    2-D sets: sliced Wasserstein and MMD against held-out points; digits: Fréchet distance in the digits
    classifier's feature space and class entropy, at sizes 8k (none at others, which the data pipeline resizes
    bicubically). Other image sets need FID statistics (see ddpm_jax.metrics).
    """
    from ddpm_jax import metrics  # the classifier and Inception code load only when metrics are asked for

    if not is_image_data(config):
        held_out = make_dataset(config.data, "test", batch_size=1, seed=seed).examples
        return metrics.lowdim_metrics(samples, held_out, seed)
    if has_digits_metrics(config):
        return metrics.digits_metrics(samples)
    return {}


def _split_images(config, split: str, num_examples: int | None = None) -> np.ndarray:
    """The first ``num_examples`` (default: all) images of a data split at the run's size, uint8 [N, H, W, C]."""
    return load_split(config.data, split, data_dir=config.data.data_dir or None, download=config.data.download,
                      num_examples=num_examples)[0]


def _require_images(config, what: str) -> None:
    if not is_image_data(config):
        raise ValueError(f"{what} are for images; {config.data.dataset} is a 2-D data set")


def _test_images(config, num: int, what: str) -> np.ndarray:
    """The first ``num`` test images in [-1, 1], for pictures of ``what``."""
    images = uint8_to_float(_split_images(config, "test", num))
    if len(images) < num:
        raise ValueError(f"{what} pictures need {num} test images; the test split has {len(images)}")
    return images


def _watched_chain(chain_fn, params, key, *, steps: int, desc: str, progress: bool):
    """``chain_fn(params, key, progress_fn)`` jitted and run under a progress bar of its ``steps`` reverse steps;
    Ctrl-C ends it after the step in progress."""
    watch = ChainWatch()
    run = jax.jit(lambda params, key: chain_fn(params, key, watch), compiler_options=cpu_conv_compiler_options())
    with progress_bar(total=steps, desc=desc, unit="step", leave=False, disable=not progress) as bar, \
            watch.watching(on_step=lambda _: bar.update(1)):
        return jax.device_get(run(params, key))


def draw_interpolations(config, model, schedule, params, *, out_dir: str, tag: str, t: int | None = None,
                        num_pairs: int = 8, num_lambdas: int = 11, seed: int = 0, progress: bool = True) -> dict:
    """Ho et al. 2020, Fig. 8 for this model: the first 2 * ``num_pairs`` test images in pairs, encoded to step
    ``t`` (default T/2 - 1, the paper's 500 of 1000 steps) and decoded for lambdas 0..1 (`sampling.interpolate`).
    Writes a PNG (a row per pair, the two sources at its ends) and an .npz; returns their paths."""
    _require_images(config, "interpolation pictures")
    t = schedule.num_timesteps // 2 - 1 if t is None else t
    if not 0 <= t < schedule.num_timesteps or num_pairs < 1 or num_lambdas < 2:
        raise ValueError(f"interpolation needs 0 <= t < T = {schedule.num_timesteps}, at least one pair and two "
                         f"lambdas; got t={t}, {num_pairs} pairs, {num_lambdas} lambdas")
    images = _test_images(config, 2 * num_pairs, "interpolation")
    writable_folder(out_dir)  # now, not after the chain; after the test images, which may be too few
    x0_a, x0_b, lambdas = images[0::2], images[1::2], np.linspace(0.0, 1.0, num_lambdas)
    d = config.diffusion

    def decode(params, key, progress_fn):
        return interpolate(
            denoiser_fn(model, params), schedule, x0_a, x0_b, lambdas, t, key, mean_type=d.mean_type,
            var_type=d.var_type, clip_denoised=config.sampling.clip_denoised, progress_fn=progress_fn,
        )

    decoded = np.asarray(_watched_chain(decode, params, jax.random.PRNGKey(seed), steps=t + 1, desc="interpolation",
                                        progress=progress))
    name = f"interpolation_t{t}_seed{seed}_{tag}"
    result = {"png": os.path.join(out_dir, f"{name}.png"), "npz": os.path.join(out_dir, f"{name}.npz")}
    style = _grid_style(config)
    viz.save_png(result["png"], viz.interpolation_strip(x0_a, x0_b, decoded, lambdas, scale=style["scale"],
                                                         padding=style["padding"], pad_value=style["pad_value"]))
    savez_atomically(result["npz"], interpolations=decoded, lambdas=lambdas, x0_a=x0_a, x0_b=x0_b, t=t)
    return result


def draw_latent_samples(config, model, schedule, params, *, out_dir: str, tag: str, ts=None, num_images: int = 4,
                        num_draws: int = 6, seed: int = 0, progress: bool = True) -> dict:
    """Ho et al. 2020, Fig. 7 for this model: the first ``num_images`` test images, each encoded once to every step
    in ``ts`` (default: T/4, T/2, 3T/4 and T steps of diffusion), and ``num_draws`` samples of p_theta(x_0 | x_t)
    from each frozen latent (`sampling.sample_from_latent`). Writes a PNG (per image and t a row: x_0, x_t, the
    draws) and an .npz; returns their paths and, for digits, the fraction of draws the digits classifier puts in
    their source's class at each t ("class_agreement")."""
    _require_images(config, "latent-sample pictures")
    num_timesteps = schedule.num_timesteps
    default_ts = sorted({max(0, num_timesteps * q // 4 - 1) for q in (1, 2, 3, 4)})  # T < 4: fewer than four
    ts = default_ts if ts is None else [int(t) for t in ts]
    if not ts or not all(0 <= t < num_timesteps for t in ts) or num_images < 1 or num_draws < 1:
        raise ValueError(f"samples from latents need steps 0 <= t < T = {num_timesteps}, at least one image and one "
                         f"draw; got t={ts}, {num_images} images, {num_draws} draws")
    if len(set(ts)) < len(ts):  # a step's draws come from fold_in(key, t): a repeated step repeats its rows
        raise ValueError(f"samples from latents need different steps, got t={ts}")
    x0 = _test_images(config, num_images, "latent-sample")
    writable_folder(out_dir)  # now, not after the chains; after the test images, which may be too few
    d = config.diffusion

    def draw(params, key, progress_fn):
        model_fn = denoiser_fn(model, params)
        kwargs = dict(mean_type=d.mean_type, var_type=d.var_type, clip_denoised=config.sampling.clip_denoised,
                      progress_fn=progress_fn)
        per_t = [sample_from_latent(model_fn, schedule, x0, t, jax.random.fold_in(key, t), num_draws, **kwargs)
                 for t in ts]
        return jnp.stack([x_t for x_t, _ in per_t]), jnp.stack([draws for _, draws in per_t])

    x_t, draws = _watched_chain(draw, params, jax.random.PRNGKey(seed), steps=sum(t + 1 for t in ts),
                                desc="samples from latents", progress=progress)
    name = f"latent_samples_t{'-'.join(map(str, ts))}_seed{seed}_{tag}"
    result = {"png": os.path.join(out_dir, f"{name}.png"), "npz": os.path.join(out_dir, f"{name}.npz")}
    style = _grid_style(config)
    viz.save_png(result["png"], viz.latent_samples_grid(x0, x_t, draws, ts, scale=style["scale"],
                                                        padding=style["padding"], pad_value=style["pad_value"]))
    savez_atomically(result["npz"], x0=x0, x_t=x_t, samples=draws, t=np.asarray(ts))
    if has_digits_metrics(config):
        from ddpm_jax.metrics import digits_class_agreement

        result["class_agreement"] = {t: digits_class_agreement(draws[i], x0) for i, t in enumerate(ts)}
    return result


MIN_FID_SAMPLES = 2048  # fewer give the 2048 Inception features a singular covariance (pytorch-fid's README)
FID_SPLITS = ("train", "test")  # sample.py --fid_stats=SPLIT: statistics of the run's own data split


def data_fid_stats(config, split: str, variables: dict, *, num_examples: int | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu [2048], sigma [2048, 2048]) of the first ``num_examples`` (default: all) images of a
    data split at the run's image size, the reference its samples are compared with."""
    from ddpm_jax.metrics import compute_stats

    _require_images(config, "FID statistics")
    images = _split_images(config, split, num_examples)  # uint8: a quarter of the memory of floats
    with progress_bar(total=len(images), desc=f"Inception ({split} split)", unit="image", leave=False,
                       disable=not progress) as bar:
        return compute_stats(images, variables, on_batch=bar.update)


def load_fid_reference(config, fid_stats: str, *, inception_weights: str | None = None, out_dir: str,
                       progress: bool = True) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """((mu, sigma), Inception variables) for FID: ``fid_stats`` is a pytorch-fid statistics file (.npz), or a
    split name ("train", "test") for the run's own data, whose statistics are computed once and kept in
    ``out_dir`` under a name with the weights' sha256 prefix. ``inception_weights``: pytorch-fid's .pth or an .npz
    of it (None: downloaded once)."""
    from ddpm_jax.metrics import inception

    _require_images(config, "FID statistics")
    if fid_stats not in FID_SPLITS and not os.path.isfile(fid_stats):
        raise ValueError(f"--fid_stats={fid_stats}: no such statistics file, and not a split name {FID_SPLITS}")
    weights_path = inception_weights or inception.download_fid_weights()
    variables = inception.load_fid_inception(weights_path)
    path = fid_stats
    if fid_stats in FID_SPLITS:
        d, weights = config.data, inception.file_sha256(weights_path)[:8]
        path = os.path.join(out_dir, f"fid_stats_{d.dataset}_{d.image_size}px_{fid_stats}_inception{weights}.npz")
        if not os.path.exists(path):
            os.makedirs(out_dir, exist_ok=True)
            inception.save_stats(path, *data_fid_stats(config, fid_stats, variables, progress=progress))
    mu, sigma = inception.load_stats(path)
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path} holds statistics of {mu.shape} features, not of Inception's 2048 pool features")
    return (mu, sigma), variables


def _chain_fingerprint(config, params, seed: int) -> str:
    """A digest of everything chain c depends on besides its size: the parameters, the settings and the seed."""
    settings = {group: config[group].to_dict() for group in ("data", "model", "diffusion", "sampling")}
    del settings["sampling"]["num_samples"]  # chain c is the same for any number of chains
    return fingerprint(params, [settings, seed])


def check_generate(config, *, with_metrics: bool = False, with_fid: bool = False, png_dir: str | None = None) -> None:
    """Raise ValueError if `generate` with these arguments would refuse them: before the FID reference is computed
    and the folders made."""
    n, chain = config.sampling.num_samples, config.sampling.batch_size
    for path, value, least in (("sampling.num_samples", n, 1), ("sampling.batch_size", chain, 0)):
        if problem := integer_problem(path, value, least):
            raise ValueError(problem)
    if with_fid and not is_image_data(config):
        raise ValueError(f"FID is defined for images; {config.data.dataset} is a 2-D data set")
    if with_fid and n < 2:
        raise ValueError(f"FID needs at least 2 samples (papers use 50,000), got sampling.num_samples={n}")
    if png_dir is not None and not is_image_data(config):
        raise ValueError(f"one PNG per sample is for images; {config.data.dataset} is a 2-D data set")
    if with_metrics and (problem := sample_metrics_problem(config)):
        raise ValueError(f"{problem} (sample.py: --num)")


def generate(config, model, schedule, params, *, out_dir: str, tag: str, trajectory: bool = False,
             with_metrics: bool = False, fid_reference=None, png_dir: str | None = None, seed: int = 0, mesh=None,
             progress: bool = True) -> dict:
    """Draw ``config.sampling.num_samples`` samples; write a PNG, an .npz and, if asked, pictures of the chain.

    The samples come from chains of ``sampling.batch_size`` (0: one chain for all); chain c starts from
    ``fold_in(PRNGKey(seed), c)`` and is split over the devices of ``mesh`` (default: as many as divide its
    size), which leaves its samples unchanged up to float rounding (about 1e-7). Each finished chain is kept in
    ``OUT_DIR/samples_TAG.parts/`` until all are done: after a Ctrl-C or a crash the same call goes on from the
    chains kept.
    ``fid_reference``: a `load_fid_reference` result, to add FID and Inception Score of all the samples to the
    metrics. ``png_dir``: also write each image sample there as ``{index:06d}.png`` (for FID tools that read
    folders). Returns a dict with the written paths, the chains this call drew (``chains_drawn`` of ``num_chains``)
    and their time in seconds, and, if asked, the sample metrics.
    """
    s = config.sampling
    check_generate(config, with_metrics=with_metrics, with_fid=fid_reference is not None, png_dir=png_dir)
    num_steps = num_sampling_steps(config, schedule)
    trajectory_every = None
    if trajectory:  # sampling.trajectory_every, or about ten pictures where it is 0 or more than the chain has
        every = s.trajectory_every if 0 < s.trajectory_every <= num_steps else num_steps // 10
        trajectory_every = max(1, every)
    chain_size = min(s.batch_size or s.num_samples, s.num_samples)
    num_chains = math.ceil(s.num_samples / chain_size)
    mesh = mesh_dividing(chain_size) if mesh is None else mesh
    if chain_size % mesh.size:
        raise ValueError(f"chains of {chain_size} samples do not split over the mesh's {mesh.size} devices: pass a "
                         "mesh whose size divides sampling.batch_size (mesh=None: as many devices as divide it)")
    # The settings that change what the chains draw name the files; how many are drawn does not (a later --num or
    # --batch_size overwrites them). The kept chains are keyed by the parameters and every setting as well.
    sampler = "ddpm" if num_steps == schedule.num_timesteps and s.sampler == "ddpm" else f"{s.sampler}{num_steps}"
    sampler += f"_{s.spacing}" if s.spacing != "linear" and num_steps < schedule.num_timesteps else ""  # T: all steps
    sampler += f"_eta{s.eta:g}" if s.sampler == "ddim" and s.eta else ""
    tag = f"{sampler}_seed{seed}_{tag}"
    # A chain compiled to record its trajectory rounds differently (1.9e-6 for an MLP): kept apart.
    recorded = f"traj{trajectory_every}_" if trajectory else ""
    parts = Parts(os.path.join(out_dir, f"samples_{tag}.parts"),
                  f"{_chain_fingerprint(config, params, seed)}_chain{chain_size}_{recorded}")
    with parts.claimed("these samples"):  # the same call run twice at once
        todo = [c for c in range(num_chains) if not parts.done(c) or (trajectory and c == 0)]

        watch = ChainWatch()
        sample_fn = make_sample_fn(
            config, model, schedule, num_samples=chain_size, mesh=mesh, trajectory_every=trajectory_every,
            progress_fn=watch,
        )
        params = jax.device_put(params, replicated(mesh))
        key = jax.random.PRNGKey(seed)
        seconds, traj = 0.0, None
        try:
            with progress_bar(total=len(todo) * num_steps, desc=f"{s.sampler} sampling", unit="step",
                               leave=False, disable=not progress) as bar:
                for c in todo:
                    # Kept inside: a Ctrl-C that did not stop the chain (on several devices) arrives after the save.
                    with watch.watching(on_step=lambda t: bar.update(1), stop=mesh.size == 1):
                        start = time.perf_counter()
                        out = jax.device_get(sample_fn(params, jax.random.fold_in(key, c)))
                        seconds += time.perf_counter() - start
                        if trajectory:
                            out, traj = out[0], (out[1] if c == 0 else traj)
                        parts.save(c, samples=np.asarray(out))
        except KeyboardInterrupt:
            kept = sum(parts.done(c) for c in range(num_chains))
            if kept:
                print(f"interrupted: {kept} of {num_chains} chains of {chain_size} samples kept in {parts.directory}; "
                      "the same command goes on from them", file=sys.stderr)
            else:
                print("interrupted: no samples written", file=sys.stderr)
            raise
        samples = np.concatenate([parts.load(c)["samples"] for c in range(num_chains)])[: s.num_samples]

        result = {"seconds": seconds, "chains_drawn": len(todo), "num_chains": num_chains,
                  "png": os.path.join(out_dir, f"samples_{tag}.png"),
                  "npz": os.path.join(out_dir, f"samples_{tag}.npz")}
        reference = None
        if not is_image_data(config):
            reference = make_dataset(config.data, "test", batch_size=1, seed=0).examples[: len(samples)]
        save_samples(config, samples, result["png"], reference)
        arrays = {"samples": samples}
        if is_image_data(config):
            arrays["uint8"] = viz.to_uint8(samples)
        savez_atomically(result["npz"], **arrays)
        if traj is not None:
            result["trajectory_png"] = os.path.join(out_dir, f"chain_{tag}.png")
            if is_image_data(config):
                style = {**_grid_style(config), "x_label": "x_after"}  # each record: the state after step t
                strip = viz.chain_strip(traj.x, traj.pred_x0, traj.timesteps, **style)
                viz.save_png(result["trajectory_png"], strip)
                result["trajectory_gif"] = os.path.join(out_dir, f"chain_{tag}.gif")
                viz.save_chain_gif(result["trajectory_gif"], traj.x, traj.pred_x0, traj.timesteps, **style)
            else:
                viz.save_png(result["trajectory_png"], viz.scatter_trajectory_strip(traj.x, traj.timesteps))
        try:  # the chains stay on disk until the PNGs and metrics are done: a rerun after a Ctrl-C here draws none
            if png_dir is not None:
                os.makedirs(png_dir, exist_ok=True)
                for name in os.listdir(png_dir):  # a larger earlier run's files would join these samples
                    if re.fullmatch(r"\d{6}\.png", name) and int(name[:6]) >= len(samples):
                        os.remove(os.path.join(png_dir, name))
                for index, image in enumerate(tqdm(arrays["uint8"], desc="PNGs", unit="image", leave=False,
                                                   disable=not progress)):
                    viz.save_png(os.path.join(png_dir, f"{index:06d}.png"), image)
                result["png_dir"] = png_dir
            if with_metrics or fid_reference is not None:
                result["metrics"] = sample_metrics(config, samples, seed=seed) if with_metrics else {}
            if fid_reference is not None:
                from ddpm_jax.metrics import inception_metrics

                stats, variables = fid_reference
                if len(samples) < MIN_FID_SAMPLES:
                    say(f"warning: FID of {len(samples)} samples: below {MIN_FID_SAMPLES} their 2048-d covariance is "
                        "singular, and FID lies far above its value at the 50,000 samples papers report (--num)",
                        file=sys.stderr)
                with progress_bar(total=len(samples), desc="Inception", unit="image", leave=False,
                                   disable=not progress) as bar:
                    result["metrics"].update(inception_metrics(samples, stats, variables, on_batch=bar.update))
        except KeyboardInterrupt:
            print(f"interrupted after sampling: the samples are in {result['npz']}, and the same command goes on from "
                  f"the chains kept in {parts.directory}", file=sys.stderr)
            raise
        parts.remove(range(num_chains))
        return result
