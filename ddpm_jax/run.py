"""Running experiments: the training loop with its checkpoints, logs and pictures, evaluation and sampling.

This is the layer that touches files and the terminal (progress bar, ``metrics.jsonl``, TensorBoard events,
PNG grids) on top of the pure pieces in `training`, `sampling` and `likelihood`. `train.py` and `sample.py`
only parse flags and call these functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ddpm_jax import viz
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.config import DEFAULT_DDIM_STEPS, build_model, data_shape, schedule_from_config, validate_config
from ddpm_jax.data import DATASETS, load_split, make_dataset, uint8_to_float
from ddpm_jax.interrupts import ChainWatch, interrupts_deferred
from ddpm_jax.likelihood import calc_bpd_loop
from ddpm_jax.models.conv import cpu_conv_compiler_options
from ddpm_jax.models.layers import denoiser_fn
from ddpm_jax.sampling import Trajectory, ddim_sample, ddpm_sample
from ddpm_jax.training import (
    NUM_LOSS_QUARTILES,
    TrainState,
    batch_sharding,
    create_train_state,
    global_batch,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_train_step,
    replicated,
)


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize() when the config asks or a coordinator address is in the environment.

    Unset values (config or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) are left to JAX's
    cluster auto-detection.
    """
    tr = config.training
    address = tr.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (tr.distributed or address):
        return
    num_processes = tr.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    process_id = tr.process_id if tr.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=num_processes or None,
        process_id=process_id if process_id >= 0 else None,
    )


def is_image_data(config) -> bool:
    return DATASETS[config.data.dataset].kind == "image"


def num_sampling_steps(config, schedule) -> int:
    """Steps of the config's sampler: all T for ddpm, sampling.num_steps (default 50) for ddim."""
    if config.sampling.sampler == "ddpm":
        return schedule.num_timesteps
    return config.sampling.num_steps or DEFAULT_DDIM_STEPS


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
        if s.sampler == "ddim":
            num_steps = num_sampling_steps(config, schedule)
            return ddim_sample(model_fn, schedule, key, shape, num_steps=num_steps, eta=s.eta, **kwargs)
        return ddpm_sample(model_fn, schedule, key, shape, **kwargs)

    if mesh is None:
        return jax.jit(sample, compiler_options=cpu_conv_compiler_options())
    out_shardings = batch_sharding(mesh)
    if trajectory_every is not None:
        records = batch_sharding(mesh, 2)
        out_shardings = (out_shardings, Trajectory(records, records, replicated(mesh)))
    return jax.jit(sample, out_shardings=out_shardings, compiler_options=cpu_conv_compiler_options())


def make_bpd_fn(config, model, schedule, mesh, *, progress_fn=None):
    """jitted ``(params, x0, key) -> {"bpd", "bpd_prior", "bpd_decoder"}``, each [B]: the variational bound's total,
    L_T and L_0 in bits/dim (calc_bpd_loop, one lax.scan over T).

    Data-parallel over ``mesh``: ``x0`` [B, ...] and the outputs are sharded along the batch, the parameters
    replicated. ``progress_fn(t)`` is called on the host after each of the T terms.
    """
    d = config.diffusion

    def bpd(params, x0, key):
        model_fn = denoiser_fn(model, params)
        bound = calc_bpd_loop(
            schedule, model_fn, x0, key, mean_type=d.mean_type, var_type=d.var_type, progress_fn=progress_fn
        )
        return {"bpd": bound.total_bpd, "bpd_prior": bound.prior_bpd, "bpd_decoder": bound.vb_terms[:, 0]}

    return jax.jit(bpd, out_shardings=batch_sharding(mesh), compiler_options=cpu_conv_compiler_options())


def evaluate_bpd(
    config, params, model, schedule, *, num_examples: int, key: jax.Array, mesh=None, progress=False,
    bpd_fn=None, watch: ChainWatch | None = None,
) -> dict:
    """Mean bits/dim (total, prior, decoder L_0) over the first ``num_examples`` of the test split.

    Each eval batch is split over the devices of ``mesh`` (default: all) and each process reads only its own
    rows. ``bpd_fn``: a ``make_bpd_fn(..., progress_fn=watch)`` to reuse (its compiled 1000-step scan) across
    evaluations, given with its ``watch``; made here if None. Ctrl-C stops a batch's chain after the step in
    progress on a one-device mesh; on several devices the KeyboardInterrupt comes when the batch is done.
    """
    mesh = make_mesh() if mesh is None else mesh
    dataset = make_dataset(
        config.data, "test", batch_size=config.eval.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=config.data.data_dir or None, download=config.data.download,
    )
    watch = watch or ChainWatch()  # a bpd_fn given without its watch has no per-step progress or early stop
    bpd_fn = bpd_fn or make_bpd_fn(config, model, schedule, mesh, progress_fn=watch)
    params = jax.device_put(params, replicated(mesh))
    num_batches = math.ceil(min(num_examples, dataset.num_examples) / config.eval.batch_size)
    rows, masks = [], []
    with _progress_bar(
        total=num_batches * schedule.num_timesteps, desc="bits/dim", unit="step", leave=False,
        disable=not progress or jax.process_index() != 0,
    ) as bar:
        for i, batch in enumerate(dataset.ordered_batches(num_examples=num_examples)):
            x0 = jax.make_array_from_process_local_data(batch_sharding(mesh), batch["image"])
            with watch.watching(on_step=lambda t: bar.update(1), stop=mesh.size == 1):
                rows.append(_process_rows(bpd_fn(params, x0, jax.random.fold_in(key, i)), mesh))
            masks.append(batch["mask"])  # the last batch is padded to full size; its padding is not counted
    per_example = valid_rows_of_all_processes(jax.tree.map(lambda *r: np.concatenate(r), *rows), np.concatenate(masks))
    return {**{k: float(v.mean()) for k, v in per_example.items()}, "bpd_examples": len(per_example["bpd"])}


def _process_rows(rows: dict[str, jax.Array], mesh) -> dict[str, np.ndarray]:
    """This process's rows of batch-sharded global arrays, in the order of its local batch."""
    if jax.process_count() > 1:
        rows = multihost_utils.global_array_to_host_local_array(rows, mesh, batch_sharding(mesh).spec)
    return jax.tree.map(np.asarray, rows)


def _mesh_dividing(batch_size: int):
    """A mesh over the first n devices, for the largest n that divides ``batch_size`` (all where their number does)."""
    devices = jax.devices()
    return make_mesh(devices[: max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)])


def _save_npz_atomically(path: str, **arrays: np.ndarray) -> None:
    """np.savez to ``path`` through a temporary file: a crash leaves the old file or none, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return dict(arrays)


def valid_rows_of_all_processes(rows: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """The rows (each [N_local]) where ``mask``, from every process, in process order (all processes get all)."""
    if jax.process_count() > 1:
        rows, mask = multihost_utils.process_allgather((rows, mask))
    return {k: np.asarray(v)[np.asarray(mask)] for k, v in rows.items()}


def _progress_bar(**kwargs) -> tqdm:
    """tqdm that redraws every second on a terminal and every 30 s into a log file."""
    return tqdm(dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)


def _grid_style(config) -> dict:
    """Upscale small images to ~48 px and separate them with grey borders (8x8 digits touch their edges)."""
    scale = max(1, 48 // config.data.image_size)
    return {"scale": scale, "padding": max(2, scale), "pad_value": 128}


def save_samples(config, samples: np.ndarray, path: str, reference: np.ndarray | None = None) -> None:
    """A PNG of samples: an image grid, or for 2-D data a scatter plot beside the data."""
    if is_image_data(config):
        viz.save_image_grid(path, samples, **_grid_style(config))
    else:
        viz.save_scatter(path, samples, reference, title=f"{config.data.dataset}: data | samples")


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line a killed run left half-written (it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class MetricsWriter:
    """metrics.jsonl (one JSON object a line) and TensorBoard events in the workdir, written by process 0."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        # Lines past the restored checkpoint belong to a run that died; the resumed run rewrites them.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f if _metrics_step(line) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _crossed(step: int, num: int, every: int) -> bool:
    """Whether the call that took the run from ``step - num`` to ``step`` passed a multiple of ``every`` (0: never).

    Not ``step % every == 0``: a resumed run may start off the grid (a last partial call, or another
    ``steps_per_call``), and then calls of K steps would never land on a multiple again.
    """
    return every > 0 and step // every > (step - num) // every


def _summarize(window: list[dict]) -> dict:
    """Host-side means of a window of per-call metrics (each [K] or [K, 4])."""
    cat = {k: np.concatenate([np.asarray(m[k]) for m in window]) for k in window[0]}
    finite = cat["finite"].astype(bool)
    out = {
        "loss": float(cat["loss"][finite].mean()) if finite.any() else float("nan"),
        "grad_norm": float(cat["grad_norm"][finite].mean()) if finite.any() else float("nan"),
        "skipped": int((~finite).sum()),
    }
    sums, counts = cat["loss_by_t_sum"].sum(0), cat["loss_by_t_count"].sum(0)
    for q in range(NUM_LOSS_QUARTILES):
        out[f"loss_t_q{q}"] = float(sums[q] / counts[q]) if counts[q] else float("nan")
    return out


def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> TrainState:
    """Train (or resume) the model of ``config`` in ``workdir``; returns the final state.

    Saves a checkpoint every ``training.checkpoint_every`` steps, at the end and on Ctrl-C; logs every
    ``training.log_every`` steps; writes sample grids from the EMA parameters every ``training.sample_every``
    steps and at the end (``samples.png``), and held-out bits/dim every ``eval.bpd_every`` steps.
    """
    maybe_initialize_distributed(config)
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=config.training.keep_checkpoints)
    try:
        return _train(config, workdir, checkpointer, progress)
    finally:
        checkpointer.close()  # on errors too: a pending save completes and Orbax's background threads end


def _train(config, workdir: str, checkpointer: Checkpointer, progress: bool) -> TrainState:
    """train_and_evaluate's loop, with the checkpointer it closes."""
    tr = config.training
    checkpointer.check_config(config.to_dict())

    dataset = make_dataset(
        config.data, "train", batch_size=tr.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=config.data.data_dir or None, download=config.data.download,
    )
    mesh = make_mesh()
    model = build_model(config)
    schedule = schedule_from_config(config.diffusion)
    state = init_train_state(config, model, jax.random.PRNGKey(config.seed), mesh)
    start_step = 0
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        start_step = int(state.step)
    checkpointer.record_config(config.to_dict())  # only now: a failed restore leaves the run's config.json as it was
    step_fn = jit_train_step(make_train_step(config, model, schedule), mesh)
    writer = MetricsWriter(workdir, start_step)
    watch = ChainWatch()
    sample_fn = make_sample_fn(config, model, schedule, progress_fn=watch)
    reference = None if is_image_data(config) else dataset.examples[: config.sampling.num_samples]
    eval_key = jax.random.PRNGKey(config.seed + 1)

    def write_samples(step: int, name: str) -> None:
        """Sample from the EMA parameters, save the picture and log the sample-quality metrics."""
        # On one device, from its copy of the replicated parameters: there Ctrl-C stops the chain (see ChainWatch),
        # and every process draws the same samples without collectives.
        params = jax.tree.map(lambda a: a.addressable_data(0), state.ema_params)
        with _progress_bar(
            total=num_sampling_steps(config, schedule), desc="sampling", unit="step", leave=False,
            disable=not progress or jax.process_index() != 0,
        ) as sample_bar, watch.watching(on_step=lambda t: sample_bar.update(1)):
            samples = np.asarray(sample_fn(params, jax.random.fold_in(eval_key, step)))
        if jax.process_index() == 0:
            save_samples(config, samples, os.path.join(workdir, name), reference)
            quality = sample_metrics(config, samples, seed=step)
            if quality:
                writer.write(step, {f"sample_{k}": v for k, v in quality.items()})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()))

    k = tr.steps_per_call
    bar = _progress_bar(
        total=tr.num_steps, initial=start_step, desc="train", unit="step",
        disable=not progress or jax.process_index() != 0,
    )
    window: list[dict] = []
    window_start = time.perf_counter()
    train_start = None  # the time budget starts after the first call, i.e. after compilation
    step = start_step
    bpd_fn = None  # compiled at the first held-out evaluation, then reused

    def save(*, force: bool = False) -> None:
        with interrupts_deferred():
            checkpointer.save(step, state, force=force)

    def save_now() -> None:
        if checkpointer.latest_step() != step:
            save(force=True)

    try:
        while step < tr.num_steps:
            if train_start is None and step > start_step:
                jax.block_until_ready(state.step)
                train_start = time.perf_counter()
            if tr.max_seconds and train_start and time.perf_counter() - train_start > tr.max_seconds:
                save_now()
                bar.write(f"stopped after training.max_seconds={tr.max_seconds:g} s at step {step}")
                break
            num = min(k, tr.num_steps - step)
            local = [dataset.batch(s) for s in range(step, step + num)]
            batches = global_batch({"image": np.stack([b["image"] for b in local])}, mesh)
            with interrupts_deferred():
                state, metrics = step_fn(state, batches)
                step += num
            window.append(metrics)
            bar.update(num)

            if _crossed(step, num, tr.log_every) or step == tr.num_steps:
                summary = _summarize(jax.device_get(window))
                elapsed = time.perf_counter() - window_start
                summary["steps_per_sec"] = sum(len(m["loss"]) for m in window) / elapsed
                writer.write(step, summary)
                bar.set_postfix(loss=f"{summary['loss']:.4f}", skipped=summary["skipped"])
                if summary["skipped"] >= min(tr.max_skipped_steps, len(window) * k):
                    raise FloatingPointError(
                        f"{summary['skipped']} of the last {len(window) * k} updates had a non-finite loss or "
                        f"gradient (step {step}); lower training.lr, use model.dtype='float32' or check the data"
                    )
                window, window_start = [], time.perf_counter()
            if _crossed(step, num, tr.checkpoint_every) or step == tr.num_steps:
                save()
            if _crossed(step, num, tr.sample_every) and step < tr.num_steps:
                write_samples(step, os.path.join("samples", f"step_{step:08d}.png"))
            if _crossed(step, num, config.eval.bpd_every) and is_image_data(config):
                bpd_fn = bpd_fn or make_bpd_fn(config, model, schedule, mesh, progress_fn=watch)
                result = evaluate_bpd(
                    config, state.ema_params, model, schedule, num_examples=config.eval.num_bpd_examples,
                    key=jax.random.fold_in(eval_key, step), mesh=mesh, progress=progress, bpd_fn=bpd_fn, watch=watch,
                )
                writer.write(step, result)
                bar.write(f"step {step}: held-out {result['bpd']:.3f} bits/dim ({result['bpd_examples']} images)")
    except KeyboardInterrupt:
        with interrupts_deferred():  # a second Ctrl-C arrives once the checkpoint is saved and said so
            save_now()
            checkpointer.wait()
            bar.write(f"interrupted: checkpoint saved at step {step} in {checkpointer.directory}")
        raise
    finally:
        bar.close()
    checkpointer.wait()
    write_samples(step, "samples.png")
    writer.close()
    return state


def restore_params(config, workdir: str, *, ema: bool = True):
    """(model, schedule, params) from the latest checkpoint in ``workdir`` (EMA parameters by default)."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        if checkpointer.latest_step() is None:
            raise ValueError(
                f"no checkpoint in {workdir}/checkpoints: train first with `python train.py --workdir={workdir}`"
            )
        checkpointer.check_config(config.to_dict())
        model = build_model(config)
        schedule = schedule_from_config(config.diffusion)
        abstract = jax.eval_shape(partial(create_train_state, config, model), jax.random.PRNGKey(0))
        state = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return model, schedule, (state.ema_params if ema else state.params), int(state.step)


def evaluate_checkpoint(config, workdir: str, *, num_examples: int | None = None, progress: bool = True) -> dict:
    """Test-set bits/dim of the latest checkpoint's EMA parameters; also written to ``workdir/eval.json``.

    Runs on as many of the devices as divide ``eval.batch_size`` (all of them where their number does).
    """
    validate_config(config)
    if not is_image_data(config):
        raise ValueError("bits/dim is defined for 8-bit images; 2-D data sets are evaluated with sample.py --metrics")
    model, schedule, params, step = restore_params(config, workdir)
    result = evaluate_bpd(
        config, params, model, schedule, num_examples=num_examples or 10**9,
        key=jax.random.PRNGKey(config.seed + 2), mesh=_mesh_dividing(config.eval.batch_size), progress=progress,
    )
    result["step"] = step
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def sample_metrics(config, samples: np.ndarray, *, seed: int = 0) -> dict:
    """The sample-quality metric that fits the data, each beside its data-vs-data baseline.

    2-D sets: sliced Wasserstein and MMD against held-out points; digits: Fréchet distance in the digits
    classifier's feature space and class entropy. Other image sets need FID statistics (see ddpm_jax.metrics).
    """
    from ddpm_jax import metrics  # the classifier and Inception code load only when metrics are asked for

    if not is_image_data(config):
        held_out = make_dataset(config.data, "test", batch_size=1, seed=seed).examples
        return metrics.lowdim_metrics(samples, held_out, seed)
    if config.data.dataset == "digits":
        return metrics.digits_metrics(samples)
    return {}


def _split_images(config, split: str, num_examples: int | None = None) -> np.ndarray:
    """The first ``num_examples`` (default: all) images of a data split at the run's size, uint8 [N, H, W, C]."""
    if not is_image_data(config):
        raise ValueError(f"{config.data.dataset} is a 2-D data set, not images")
    images = load_split(config.data, split, data_dir=config.data.data_dir or None, download=config.data.download)[0]
    return images[:num_examples]


def draw_interpolations(config, model, schedule, params, *, out_dir: str, tag: str, t: int | None = None,
                        num_pairs: int = 8, num_lambdas: int = 11, seed: int = 0, progress: bool = True) -> dict:
    """Ho et al. 2020, Fig. 8 for this model: the first 2 * ``num_pairs`` test images in pairs, encoded to step
    ``t`` (default T/2 - 1, the paper's 500 of 1000 steps) and decoded for lambdas 0..1 (`sampling.interpolate`).
    Writes a PNG (a row per pair, the two sources at its ends) and an .npz; returns their paths."""
    from ddpm_jax.sampling import interpolate

    if not is_image_data(config):
        raise ValueError(f"interpolation pictures are for images; {config.data.dataset} is a 2-D data set")
    t = schedule.num_timesteps // 2 - 1 if t is None else t
    if not 0 <= t < schedule.num_timesteps or num_pairs < 1 or num_lambdas < 2:
        raise ValueError(f"interpolation needs 0 <= t < T = {schedule.num_timesteps}, at least one pair and two "
                         f"lambdas; got t={t}, {num_pairs} pairs, {num_lambdas} lambdas")
    images = uint8_to_float(_split_images(config, "test", 2 * num_pairs))
    if len(images) < 2 * num_pairs:
        raise ValueError(f"{num_pairs} pairs need {2 * num_pairs} test images; the test split has {len(images)}")
    x0_a, x0_b, lambdas = images[0::2], images[1::2], np.linspace(0.0, 1.0, num_lambdas)
    d, watch = config.diffusion, ChainWatch()

    def decode(params, key):
        return interpolate(
            denoiser_fn(model, params), schedule, x0_a, x0_b, lambdas, t, key, mean_type=d.mean_type,
            var_type=d.var_type, clip_denoised=config.sampling.clip_denoised, progress_fn=watch,
        )

    decode = jax.jit(decode, compiler_options=cpu_conv_compiler_options())
    with _progress_bar(total=t + 1, desc="interpolation", unit="step", leave=False, disable=not progress) as bar, \
            watch.watching(on_step=lambda _: bar.update(1)):
        decoded = np.asarray(decode(params, jax.random.PRNGKey(seed)))
    name = f"interpolation_t{t}_seed{seed}_{tag}"
    result = {"png": os.path.join(out_dir, f"{name}.png"), "npz": os.path.join(out_dir, f"{name}.npz")}
    style = _grid_style(config)
    viz.save_png(result["png"], viz.interpolation_strip(x0_a, x0_b, decoded, lambdas, scale=style["scale"],
                                                         padding=style["padding"], pad_value=style["pad_value"]))
    np.savez_compressed(result["npz"], interpolations=decoded, lambdas=lambdas, x0_a=x0_a, x0_b=x0_b, t=t)
    return result


FID_SPLITS = ("train", "test")  # sample.py --fid_stats=SPLIT: statistics of the run's own data split


def data_fid_stats(config, split: str, variables: dict, *, num_examples: int | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu [2048], sigma [2048, 2048]) of the first ``num_examples`` (default: all) images of a
    data split at the run's image size, the reference its samples are compared with."""
    from ddpm_jax.metrics import compute_stats

    images = _split_images(config, split, num_examples)  # uint8: a quarter of the memory of floats
    with _progress_bar(total=len(images), desc=f"Inception ({split} split)", unit="image", leave=False,
                       disable=not progress) as bar:
        return compute_stats(images, variables, on_batch=bar.update)


def load_fid_reference(config, fid_stats: str, *, inception_weights: str | None = None, out_dir: str,
                       progress: bool = True) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """((mu, sigma), Inception variables) for FID: ``fid_stats`` is a pytorch-fid statistics file (.npz), or a
    split name ("train", "test") for the run's own data, whose statistics are computed once and kept in
    ``out_dir`` under a name with the weights' sha256 prefix. ``inception_weights``: pytorch-fid's .pth or an .npz
    of it (None: downloaded once)."""
    from ddpm_jax.metrics import inception

    if not is_image_data(config):
        raise ValueError(f"FID is defined for images; {config.data.dataset} is a 2-D data set")
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
            inception.save_stats(path + ".tmp.npz", *data_fid_stats(config, fid_stats, variables, progress=progress))
            os.replace(path + ".tmp.npz", path)
    mu, sigma = inception.load_stats(path)
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path} holds statistics of {mu.shape} features, not of Inception's 2048 pool features")
    return (mu, sigma), variables


def load_config(workdir: str, base=None):
    """The config a run in ``workdir`` was trained with (its config.json), laid over ``base`` if given.

    A base (configs/base.py) supplies fields added since the run was trained.
    """
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        saved = json.load(f)
    if base is None:
        return ml_collections.ConfigDict(saved)
    config = base.copy_and_resolve_references()
    for group, values in saved.items():
        if isinstance(values, dict):
            for key, value in values.items():
                config[group][key] = tuple(value) if isinstance(value, list) else value
        else:
            config[group] = tuple(values) if isinstance(values, list) else values
    return config


def load_pretrained(path: str, config):
    """(model, schedule, params) from a diffusers UNet2DModel folder (e.g. the DDPM authors' CIFAR-10 weights).

    ``config`` supplies the diffusion and sampling settings (configs/cifar10.py: the paper's); the data shape
    is set from the weights' config.
    """
    from ddpm_jax.models import UNet, load_diffusers_unet, read_diffusers_config

    kwargs, params = load_diffusers_unet(path)
    diffusers_config = read_diffusers_config(path)
    config.data.image_size = int(diffusers_config.get("sample_size", config.data.image_size))
    config.data.num_channels = int(diffusers_config.get("in_channels", config.data.num_channels))
    return UNet(**kwargs), schedule_from_config(config.diffusion), jax.tree.map(jnp.asarray, params)


MAX_GRID_SAMPLES = 256  # the PNG of an image run shows at most these (the .npz has them all)


def generate(config, model, schedule, params, *, out_dir: str, tag: str, trajectory: bool = False,
             with_metrics: bool = False, fid_reference=None, png_dir: str | None = None, seed: int = 0, mesh=None,
             progress: bool = True) -> dict:
    """Draw ``config.sampling.num_samples`` samples; write a PNG, an .npz and, if asked, pictures of the chain.

    The samples come from chains of ``sampling.batch_size`` (0: one chain for all); chain c starts from
    ``fold_in(PRNGKey(seed), c)`` and is split over the devices of ``mesh`` (default: as many as divide its
    size), which leaves its samples unchanged. Each finished chain is kept in ``OUT_DIR/samples_TAG.parts/``
    until all are done: after a Ctrl-C or a crash the same call goes on from the chains kept.
    ``fid_reference``: a `load_fid_reference` result, to add FID and Inception Score of all the samples to the
    metrics. ``png_dir``: also write each image sample there as ``{index:06d}.png`` (for FID tools that read
    folders). Returns a dict with the written paths, the chains this call drew (``chains_drawn`` of ``num_chains``)
    and their time in seconds, and, if asked, the sample metrics.
    """
    s = config.sampling
    if fid_reference is not None and s.num_samples < 2:
        raise ValueError(f"FID needs at least 2 samples (papers use 50,000), got sampling.num_samples={s.num_samples}")
    if png_dir is not None and not is_image_data(config):
        raise ValueError(f"one PNG per sample is for images; {config.data.dataset} is a 2-D data set")
    num_steps = num_sampling_steps(config, schedule)
    trajectory_every = None
    if trajectory:  # sampling.trajectory_every, or about ten pictures of the chain
        every = s.trajectory_every if 0 < s.trajectory_every <= num_steps else num_steps // 10
        trajectory_every = max(1, every)
    chain_size = min(s.batch_size or s.num_samples, s.num_samples)
    num_chains = math.ceil(s.num_samples / chain_size)
    mesh = _mesh_dividing(chain_size) if mesh is None else mesh
    sampler = f"ddim{num_steps}" if s.sampler == "ddim" else "ddpm"
    tag = f"{sampler}_seed{seed}_{tag}"
    parts_dir = os.path.join(out_dir, f"samples_{tag}.parts")
    part_paths = [os.path.join(parts_dir, f"chain{chain_size}_{c:05d}.npz") for c in range(num_chains)]
    todo = [c for c, path in enumerate(part_paths) if not os.path.exists(path) or (trajectory and c == 0)]

    watch = ChainWatch()
    sample_fn = make_sample_fn(
        config, model, schedule, num_samples=chain_size, mesh=mesh, trajectory_every=trajectory_every,
        progress_fn=watch,
    )
    params = jax.device_put(params, replicated(mesh))
    key = jax.random.PRNGKey(seed)
    seconds, traj = 0.0, None
    try:
        with _progress_bar(total=len(todo) * num_steps, desc=f"{s.sampler} sampling", unit="step",
                           leave=False, disable=not progress) as bar:
            for c in todo:
                with watch.watching(on_step=lambda t: bar.update(1), stop=mesh.size == 1):
                    start = time.perf_counter()
                    out = jax.device_get(sample_fn(params, jax.random.fold_in(key, c)))
                    seconds += time.perf_counter() - start
                if trajectory:
                    out, traj = out[0], (out[1] if c == 0 else traj)
                _save_npz_atomically(part_paths[c], samples=np.asarray(out))
    except KeyboardInterrupt:
        kept = sum(os.path.exists(path) for path in part_paths)
        if kept:
            print(f"interrupted: {kept} of {num_chains} chains of {chain_size} samples kept in {parts_dir}; "
                  "the same command goes on from them", file=sys.stderr)
        else:
            print("interrupted: no samples written", file=sys.stderr)
        raise
    samples = np.concatenate([_load_npz(path)["samples"] for path in part_paths])[: s.num_samples]

    result = {"seconds": seconds, "chains_drawn": len(todo), "num_chains": num_chains,
              "png": os.path.join(out_dir, f"samples_{tag}.png"), "npz": os.path.join(out_dir, f"samples_{tag}.npz")}
    reference = None
    if not is_image_data(config):
        reference = make_dataset(config.data, "test", batch_size=1, seed=0).examples[: len(samples)]
    save_samples(config, samples[:MAX_GRID_SAMPLES] if is_image_data(config) else samples, result["png"], reference)
    arrays = {"samples": samples}
    if is_image_data(config):
        arrays["uint8"] = viz.to_uint8(samples)
    np.savez_compressed(result["npz"], **arrays)
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
            for index, image in enumerate(tqdm(arrays["uint8"], desc="PNGs", unit="image", leave=False,
                                               disable=not progress)):
                viz.save_png(os.path.join(png_dir, f"{index:06d}.png"), image)
            result["png_dir"] = png_dir
        if with_metrics or fid_reference is not None:
            result["metrics"] = sample_metrics(config, samples, seed=seed) if with_metrics else {}
        if fid_reference is not None:
            from ddpm_jax.metrics import inception_metrics

            stats, variables = fid_reference
            with _progress_bar(total=len(samples), desc="Inception", unit="image", leave=False,
                               disable=not progress) as bar:
                result["metrics"].update(inception_metrics(samples, stats, variables, on_batch=bar.update))
    except KeyboardInterrupt:
        print(f"interrupted after sampling: the samples are in {result['npz']}, and the same command goes on from "
              f"the chains kept in {parts_dir}", file=sys.stderr)
        raise
    shutil.rmtree(parts_dir)
    return result
