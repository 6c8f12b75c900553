"""Running experiments: the training loop with its checkpoints, logs and periodic samples, held-out bits/dim, and
loading a trained or released model.

This is the layer that touches files and the terminal (progress bar, ``metrics.jsonl``, TensorBoard events)
on top of the pure pieces in `training` and `likelihood`; drawing samples into files is `generation`'s.
`train.py` and `sample.py` only parse flags and call these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import viz
from ddpm_jax.checkpoint import Checkpointer
from ddpm_jax.config import (
    DTYPES,
    build_model,
    cudnn_missing,
    ignored_diffusion_settings,
    is_image_data,
    is_learned_variance,
    num_sampling_steps,
    prior_warning,
    schedule_from_config,
    short_run_warnings,
    validate_config,
)
from ddpm_jax.data import DATASETS, make_dataset
from ddpm_jax.generation import make_sample_fn, sample_metrics, save_samples
from ddpm_jax.interrupts import ChainWatch, StopVote, interrupts_deferred, progress_bar, say
from ddpm_jax.likelihood import RateDistortion, calc_bpd_loop, rate_distortion
from ddpm_jax.models.conv import cpu_conv_compiler_options
from ddpm_jax.models.layers import denoiser_fn
from ddpm_jax.parts import FolderLock, Parts, fingerprint, savez_atomically, writable_folder, write_atomically
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
    mesh_dividing,
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


def make_bpd_fn(config, model, schedule, mesh, *, per_step: bool = False, progress_fn=None):
    """jitted ``(params, x0, key) -> {"bpd", "bpd_prior", "bpd_decoder"}``, each [B]: the variational bound's total,
    L_T and L_0 in bits/dim (calc_bpd_loop, one lax.scan over T); with ``per_step`` also every term and the error
    of the predicted x_0 at every step, "vb_terms" and "x0_mse" [B, T] (for `rate_distortion`).

    Data-parallel over ``mesh``: ``x0`` [B, ...] and the outputs are sharded along the batch, the parameters
    replicated. ``progress_fn(t)`` is called on the host after each of the T terms.
    """
    d = config.diffusion

    def bpd(params, x0, key):
        model_fn = denoiser_fn(model, params)
        bound = calc_bpd_loop(
            schedule, model_fn, x0, key, mean_type=d.mean_type, var_type=d.var_type, progress_fn=progress_fn
        )
        out = {"bpd": bound.total_bpd, "bpd_prior": bound.prior_bpd, "bpd_decoder": bound.vb_terms[:, 0]}
        if per_step:
            out |= {"vb_terms": bound.vb_terms, "x0_mse": bound.x0_mse}
        return out

    return jax.jit(bpd, out_shardings=batch_sharding(mesh), compiler_options=cpu_conv_compiler_options())


def _process_dataset(config, split: str, batch_size: int, num_examples: int | None = None):
    """This process's rows of the batches of ``batch_size`` of ``split`` (an `ArrayDataset`), of its first
    ``num_examples`` (all when None)."""
    return make_dataset(
        config.data, split, batch_size=batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=config.data.data_dir or None, download=config.data.download, num_examples=num_examples,
    )


def make_eval_dataset(config, num_examples: int | None = None):
    """This process's rows of the ``eval.batch_size`` batches of the first ``num_examples`` (all when None) of
    ``eval.split``; the rest of the split is not read."""
    return _process_dataset(config, config.eval.split, config.eval.batch_size, num_examples)


def evaluate_bpd(
    config, params, model, schedule, *, num_examples: int, key: jax.Array, mesh=None, progress=False,
    bpd_fn=None, watch: ChainWatch | None = None, per_step: bool = False, parts: Parts | None = None,
    dataset=None,
) -> dict:
    """Mean bits/dim (total, prior, decoder L_0) over the first ``num_examples`` of ``eval.split`` (the test split by
    default); with ``per_step`` (or a bpd_fn made with it) also their `rate_distortion` curve, under
    "rate_distortion".

    Each eval batch is split over the devices of ``mesh`` (default: all) and each process reads only its own
    rows. ``bpd_fn``: a ``make_bpd_fn(..., progress_fn=watch)`` to reuse (its compiled 1000-step scan) across
    evaluations, given with its ``watch``; made here if None. Ctrl-C stops a batch's chain after the step in
    progress on a one-device mesh; on several devices the KeyboardInterrupt comes when the batch is done and kept.
    ``parts``: keep each batch's rows there as it finishes and read those of batches already kept (one process).
    ``dataset``: a `make_eval_dataset(config, num_examples)` to reuse across evaluations (read here if None).
    """
    mesh = make_mesh() if mesh is None else mesh
    if config.eval.batch_size % mesh.size:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} does not split over the mesh's {mesh.size} "
                         "devices: use a multiple of its size, or a mesh whose size divides it")
    dataset = make_eval_dataset(config, num_examples) if dataset is None else dataset
    watch = watch or ChainWatch()  # a bpd_fn given without its watch has no per-step progress or early stop
    bpd_fn = bpd_fn or make_bpd_fn(config, model, schedule, mesh, per_step=per_step, progress_fn=watch)
    params = jax.device_put(params, replicated(mesh))
    num_batches = math.ceil(min(num_examples, dataset.num_examples) / config.eval.batch_size)
    rows, masks = [], []
    # Several processes stop together, after the same batch: one stopping alone left the others in a collective.
    vote = StopVote(mesh)
    vote.arm()
    try:
        with progress_bar(
            total=num_batches * schedule.num_timesteps, desc=f"bits/dim ({config.eval.split})", unit="step",
            leave=False, disable=not progress or jax.process_index() != 0,
        ) as bar:
            for i, batch in enumerate(dataset.ordered_batches(num_examples=num_examples)):
                masks.append(batch["mask"])  # the last batch is padded to full size; its padding is not counted
                if parts is not None and parts.done(i):
                    rows.append(parts.load(i))
                    bar.update(schedule.num_timesteps)
                    continue
                x0 = jax.make_array_from_process_local_data(batch_sharding(mesh), batch["image"])
                # Kept inside: a Ctrl-C that did not stop the chain (on several devices) arrives after the save.
                with watch.watching(on_step=lambda t: bar.update(1), stop=mesh.size == 1):
                    rows.append(_process_rows(bpd_fn(params, x0, jax.random.fold_in(key, i)), mesh))
                    if parts is not None:
                        parts.save(i, **rows[-1])
                if vote.last():
                    raise vote.interruption()
    finally:
        vote.disarm()
    per_example = valid_rows_of_all_processes(jax.tree.map(lambda *r: np.concatenate(r), *rows), np.concatenate(masks))
    result = {k: float(per_example[k].mean()) for k in ("bpd", "bpd_prior", "bpd_decoder")}
    result["bpd_examples"] = len(per_example["bpd"])
    if "vb_terms" in per_example:
        curve = rate_distortion(per_example["bpd_prior"], per_example["vb_terms"], per_example["x0_mse"])
        result["rate_distortion"] = RateDistortion(*map(np.asarray, curve))
    return result


def _process_rows(rows: dict[str, jax.Array], mesh) -> dict[str, np.ndarray]:
    """This process's rows of batch-sharded global arrays, in the order of its local batch."""
    if jax.process_count() > 1:
        rows = multihost_utils.global_array_to_host_local_array(rows, mesh, batch_sharding(mesh).spec)
    return jax.tree.map(np.asarray, rows)


def valid_rows_of_all_processes(rows: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """The rows (each [N_local]) where ``mask``, from every process, in process order (all processes get all)."""
    if jax.process_count() > 1:
        rows, mask = multihost_utils.process_allgather((rows, mask))
    return {k: np.asarray(v)[np.asarray(mask)] for k, v in rows.items()}


def strict_json(value):
    """``value`` with NaN and inf floats, at any depth, as None: they are not JSON, and strict readers (jq, most
    languages' parsers) refuse the bare tokens that `json.dumps` writes for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


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
        self._lines: list[dict] = []
        if not self.enabled:
            return
        # Lines past the restored checkpoint belong to a run that died; the resumed run rewrites them.
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line.rstrip("\n") + "\n" for line in f if _metrics_step(line) <= resume_step]
            write_atomically(self.path, "".join(kept))
            self._lines = [json.loads(line) for line in kept]
        from tensorboardX import SummaryWriter

        # TensorBoard hides the events a run that died wrote past the checkpoint, as metrics.jsonl drops them.
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def logged(self, step: int, name: str, *, since: int | None = None) -> bool:
        """Whether a line kept from before the resume or written since has ``name`` at ``step`` (or at a step in
        [since, step])."""
        first = step if since is None else since
        return any(first <= line.get("step", -1) <= step and name in line for line in self._lines)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = strict_json({"step": step, **metrics})
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        self._lines.append(line)
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _on_process_0(decide: Callable[[], bool]) -> bool:
    """``decide()`` as process 0, which writes the run's files, sees it: the same answer in every process."""
    decision = bool(decide()) if jax.process_index() == 0 else False
    if jax.process_count() > 1:
        decision = bool(multihost_utils.broadcast_one_to_all(np.array(decision)))
    return decision


def _crossed(step: int, num: int, every: int) -> bool:
    """Whether the call that took the run from ``step - num`` to ``step`` passed a multiple of ``every`` (0: never).

    Not ``step % every == 0``: a resumed run may start off the grid (a last partial call, or another
    ``steps_per_call``), and then calls of K steps would never land on a multiple again.
    """
    return every > 0 and step // every > (step - num) // every


def _num_updates(window: list[dict]) -> int:
    """Training steps in a window of per-call metrics (the last call may run fewer than steps_per_call)."""
    return sum(len(m["loss"]) for m in window)


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
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count(), training=True)
    for warning in filter(None, [prior_warning(config), *short_run_warnings(config)]):
        say(f"warning: {warning}")
    tr = config.training
    writable_folder(workdir)
    # A second run in the same folder would rewrite the first one's logs and checkpoints under it.
    lock = FolderLock(workdir)
    if not _on_process_0(lock.acquire):
        raise ValueError(f"another training run is using {workdir} ({lock.holder or 'see process 0'}): run this "
                         "again once it has stopped to resume from its checkpoint, or train in another --workdir")
    try:
        checkpointer = Checkpointer(workdir, keep=tr.keep_checkpoints)
        try:
            return _train(config, workdir, checkpointer, progress)
        finally:
            checkpointer.close()  # on errors too: a pending save completes and Orbax's background threads end
            if jax.process_index() == 0:  # a run that failed before its first save (its data) leaves no empty folder
                with contextlib.suppress(OSError):
                    os.rmdir(checkpointer.directory)
    finally:
        lock.release()


def _train(config, workdir: str, checkpointer: Checkpointer, progress: bool) -> TrainState:
    """train_and_evaluate's loop, with the checkpointer it closes."""
    tr = config.training
    checkpointer.check_config(config.to_dict())

    dataset = _process_dataset(config, "train", tr.batch_size)
    mesh = make_mesh()
    model = build_model(config)
    schedule = schedule_from_config(config.diffusion)
    state = init_train_state(config, model, jax.random.PRNGKey(config.seed), mesh)
    start_step = 0
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        start_step = int(state.step)
    final_samples = os.path.join(workdir, "samples.png")  # drawn after the last checkpoint, unless interrupted
    final_drawn = start_step > 0 and _on_process_0(lambda: os.path.exists(final_samples) and os.path.getmtime(
        final_samples) >= checkpointer.saved_time(start_step))
    if start_step >= tr.num_steps and final_drawn:
        say(f"{workdir} is trained to step {start_step} (training.num_steps={tr.num_steps}) and its samples.png "
            "drawn: nothing to do; a larger training.num_steps trains on")
        return state  # config.json still holds the config the checkpoint was trained with
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
        with progress_bar(
            total=num_sampling_steps(config, schedule), desc="sampling", unit="step", leave=False,
            disable=not progress or jax.process_index() != 0,
        ) as sample_bar, watch.watching(on_step=lambda t: sample_bar.update(1)):
            samples = np.asarray(sample_fn(params, jax.random.fold_in(eval_key, step)))
        if jax.process_index() == 0:
            quality = {f"sample_{k}": v for k, v in sample_metrics(config, samples, seed=step).items()}
            # Together: a rerun redraws a picture it does not find, or one older than the checkpoint (the last);
            # the line of a picture redrawn after its line was kept is not written twice.
            with interrupts_deferred():
                save_samples(config, samples, os.path.join(workdir, name), reference)
                if quality and not writer.logged(step, next(iter(quality))):
                    writer.write(step, quality)
            if quality:
                say(f"step {step}: " + ", ".join(f"{k.removeprefix('sample_')} {v:.4g}" for k, v in quality.items()))

    k = tr.steps_per_call
    bar = progress_bar(
        total=tr.num_steps, initial=start_step, desc="train", unit="step",
        disable=not progress or jax.process_index() != 0,
    )
    window: list[dict] = []
    window_start = time.perf_counter()
    train_start = None  # the time budget starts after the first call, i.e. after compilation
    step = start_step
    bpd_fn = eval_dataset = None  # compiled and read at the first held-out evaluation, then reused
    grid_step = None  # the step of the last grid this run drew or copied

    def grid_name(at: int) -> str:
        return os.path.join("samples", f"step_{at:08d}.png")

    def copy_picture(source: str, path: str) -> None:
        with open(source, "rb") as picture:
            write_atomically(path, partial(shutil.copyfileobj, picture))

    def missing(every: int, done_since: Callable[[int], bool]) -> bool:
        """Whether the output due every ``every`` steps was last due at a multiple m <= ``step`` and not done at
        any step in [m, step]: a resumed run's checkpoint may lie past m (a stop off the grid, or calls of
        another steps_per_call), where the output was done already, or at m, after a stop before it."""
        return every > 0 and step >= every and not _on_process_0(lambda: done_since(step // every * every))

    def grid_drawn(since: int) -> bool:
        folder = os.path.join(workdir, "samples")
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return any((m := re.fullmatch(r"step_(\d+)\.png", name)) and since <= int(m[1]) <= step for name in names)

    def periodic_outputs(num: int = 0, *, only_missing: bool = False) -> None:
        """The sample grid and held-out bits/dim due after the call of ``num`` steps that ended at ``step``;
        ``only_missing``: those that the run resumed at ``step`` left undone (see `missing`).
        Their time is left out of the next window's steps_per_sec."""
        nonlocal bpd_fn, eval_dataset, window_start, grid_step
        grid = grid_name(step)
        if only_missing:
            draw_grid = missing(tr.sample_every, grid_drawn)
            evaluate = missing(config.eval.bpd_every, lambda since: writer.logged(step, "bpd", since=since))
        else:
            draw_grid = _crossed(step, num, tr.sample_every)
            evaluate = _crossed(step, num, config.eval.bpd_every)
        draw_grid = draw_grid and step < tr.num_steps
        evaluate = evaluate and is_image_data(config)
        if not (draw_grid or evaluate):
            return
        jax.block_until_ready(state.step)  # the training steps enqueued so far count as training
        began = time.perf_counter()
        if draw_grid:
            grid_step = step
        if draw_grid and only_missing and final_drawn:  # a finished run trained on: its samples.png is this grid
            if jax.process_index() == 0:
                os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                copy_picture(final_samples, os.path.join(workdir, grid))
        elif draw_grid:
            write_samples(step, grid)
        if evaluate:
            bpd_fn = bpd_fn or make_bpd_fn(config, model, schedule, mesh, progress_fn=watch)
            if eval_dataset is None:  # read and decoded once
                eval_dataset = make_eval_dataset(config, config.eval.num_bpd_examples)
            result = evaluate_bpd(
                config, state.ema_params, model, schedule, num_examples=config.eval.num_bpd_examples,
                key=jax.random.fold_in(eval_key, step), mesh=mesh, progress=progress, bpd_fn=bpd_fn, watch=watch,
                dataset=eval_dataset,
            )
            writer.write(step, result)
            say(f"step {step}: held-out {result['bpd']:.3f} bits/dim ({result['bpd_examples']} images)")
        window_start += time.perf_counter() - began

    def log_window() -> dict:
        """Write the line of the steps since the last one (their mean metrics) at ``step``; returns it."""
        nonlocal window, window_start
        summary = _summarize(jax.device_get(window))
        summary["steps_per_sec"] = _num_updates(window) / (time.perf_counter() - window_start)
        writer.write(step, summary)
        bar.set_postfix(loss=f"{summary['loss']:.4f}", skipped=summary["skipped"], refresh=False)
        window, window_start = [], time.perf_counter()
        return summary

    def stop_logged() -> None:
        """At a stop off the log grid, the line of the steps since the last one: the resumed run logs from the
        checkpoint at ``step`` on, and those steps would be in no line."""
        if window:
            log_window()

    def save(*, force: bool = False) -> None:
        with interrupts_deferred():
            checkpointer.save(step, state, force=force)

    def save_now() -> None:
        if checkpointer.latest_step() != step:
            save(force=True)

    vote = StopVote(mesh)
    vote.arm()
    try:
        if start_step:
            periodic_outputs(only_missing=True)
        while step < tr.num_steps:
            if train_start is None and step > start_step:
                jax.block_until_ready(state.step)
                train_start = time.perf_counter()
            interrupted, out_of_time = vote.cast(
                bool(tr.max_seconds and train_start and time.perf_counter() - train_start > tr.max_seconds)
            )
            if interrupted:
                raise vote.interruption()
            if out_of_time:
                with interrupts_deferred():  # a signal now would log the same steps again, from the except below
                    stop_logged()
                    save_now()
                say(f"stopped after training.max_seconds={tr.max_seconds:g} s at step {step}")
                break
            num = min(k, tr.num_steps - step)
            local = [dataset.batch(s) for s in range(step, step + num)]
            batches = global_batch({"image": np.stack([b["image"] for b in local])}, mesh)
            # A signal waits for the call and for the log line due at its end: the checkpoint saved on Ctrl-C
            # is at `step`, so a line not written by then is never written (the resumed run logs from the next).
            with interrupts_deferred():
                state, metrics = step_fn(state, batches)
                step += num
                window.append(metrics)
                bar.update(num)
                if _crossed(step, num, tr.log_every) or step == tr.num_steps:
                    updates = _num_updates(window)
                    summary = log_window()
                    if summary["skipped"] >= min(tr.max_skipped_steps, updates):
                        raise FloatingPointError(
                            f"{summary['skipped']} of the last {updates} updates had a non-finite loss or gradient "
                            f"(step {step}); lower training.lr, use model.dtype='float32' or check the data"
                        )
            if _crossed(step, num, tr.checkpoint_every) or step == tr.num_steps:
                save()
            periodic_outputs(num)
        if vote.last():  # a signal during the last calls or evaluations stops the run as at any other step
            raise vote.interruption()
        bar.close()
        checkpointer.wait()
        if grid_step == step:  # a training.max_seconds stop at a grid's step: the same chain and key drew that grid
            if jax.process_index() == 0:
                copy_picture(os.path.join(workdir, grid_name(step)), final_samples)
        else:
            write_samples(step, "samples.png")
        if vote.last():  # one during the final samples (drawn by then on several processes), all processes too
            raise vote.interruption()
    except KeyboardInterrupt:
        with interrupts_deferred():  # a second Ctrl-C arrives once the checkpoint is saved and said so
            stop_logged()
            save_now()
            checkpointer.wait()
            say(f"interrupted: checkpoint saved at step {step} in {checkpointer.directory}")
        raise
    finally:
        vote.disarm()
        bar.close()
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
        # Replicated over the devices here: without a sharding Orbax asks for the topology the run was saved on.
        sharding = replicated(make_mesh())
        state = checkpointer.restore(jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract))
    finally:
        checkpointer.close()
    return model, schedule, (state.ema_params if ema else state.params), int(state.step)


def evaluate_checkpoint(config, workdir: str, *, num_examples: int | None = None, progress: bool = True) -> dict:
    """`evaluate_model` of the latest checkpoint's EMA parameters, its files written into ``workdir``."""
    validate_config(config)
    model, schedule, params, step = restore_params(config, workdir)
    return evaluate_model(config, model, schedule, params, out_dir=workdir, num_examples=num_examples,
                          progress=progress, step=step)


def evaluate_model(config, model, schedule, params, *, out_dir: str, num_examples: int | None = None,
                   progress: bool = True, step: int | None = None) -> dict:
    """Bits/dim of ``params`` on ``eval.split`` and their rate-distortion curve (Ho et al. 2020, Fig. 5), written to
    ``out_dir``: eval.json (the curve at every tenth of the reverse steps, as the paper's Table 4),
    rate_distortion.npz (every step) and rate_distortion.png, each named with a ``_train`` suffix for the training
    split. ``step``: the checkpoint's, recorded if given. Returns eval.json's contents and the paths ("files").

    Runs on as many of the devices as divide ``eval.batch_size`` (all of them where their number does). In one
    process each finished batch is kept in ``out_dir/eval.parts`` until the files are written: after a Ctrl-C or a
    crash the same call goes on from the batches kept, with the same result.
    """
    if not is_image_data(config):
        raise ValueError("bits/dim is defined for 8-bit images; 2-D data sets are evaluated with sample.py --metrics")
    if jax.process_index() == 0:
        writable_folder(out_dir)
    suffix = "" if config.eval.split == "test" else f"_{config.eval.split}"
    num_examples = num_examples or 10**9
    parts = None
    if jax.process_count() == 1:  # several processes would have to agree on which batches to skip
        digest = _eval_fingerprint(config, params, num_examples)
        parts = Parts(os.path.join(out_dir, f"eval{suffix}.parts"), f"{digest}_")
    with parts.claimed("this evaluation") if parts else contextlib.nullcontext():  # the call run twice at once
        try:
            result = evaluate_bpd(
                config, params, model, schedule, num_examples=num_examples, per_step=True, parts=parts,
                key=jax.random.PRNGKey(config.seed + 2), mesh=mesh_dividing(config.eval.batch_size),
                progress=progress,
            )
        except KeyboardInterrupt:
            kept = parts.count() if parts else 0
            print(f"interrupted: {kept} finished batches kept in {parts.directory}; the same command goes on from "
                  "them" if kept else "interrupted: no bits/dim written", file=sys.stderr)
            raise
        result["split"] = config.eval.split
        if step is not None:
            result["step"] = step
        curve = result.pop("rate_distortion")
        every = max(1, len(curve.reverse_steps) // 10)
        result["rate_distortion"] = [
            {"reverse_step": int(curve.reverse_steps[i]), "rate_bpd": float(curve.rate_bpd[i]),
             "distortion_rmse": float(curve.distortion_rmse[i])}
            for i in range(len(curve.reverse_steps) - 1, -1, -every)
        ]
        files = {name: os.path.join(out_dir, f"{stem}{suffix}.{name}")
                 for stem, name in (("eval", "json"), ("rate_distortion", "npz"), ("rate_distortion", "png"))}
        if jax.process_index() == 0:
            savez_atomically(files["npz"], **curve._asdict())
            title = ("" if step is None else f"step {step}: ") + (
                f"rate and distortion on {result['bpd_examples']} {config.eval.split} images")
            viz.save_png(files["png"], viz.rate_distortion_plot(*curve, title=title))
            write_atomically(files["json"], json.dumps(strict_json(result), indent=2, allow_nan=False))
        if parts is not None:
            parts.remove()
    return {**result, "files": files}


def _eval_fingerprint(config, params, num_examples: int) -> str:
    """A digest of everything a batch's bits/dim depend on: the parameters, the settings and which examples."""
    settings = {group: config[group].to_dict() for group in ("data", "model", "diffusion", "eval")}
    return fingerprint(params, [settings, config.seed, num_examples])


def out_of_memory_message(err: BaseException, remedy: str) -> str | None:
    """For XLA's out-of-memory error, one line saying so and ``remedy``; else None.

    Accelerators report RESOURCE_EXHAUSTED; the CPU reports "INTERNAL: ... Out of memory allocating N bytes".
    """
    if not isinstance(err, jax.errors.JaxRuntimeError) or not re.search(r"RESOURCE_EXHAUSTED|out of memory",
                                                                         str(err), re.IGNORECASE):
        return None
    first_line = str(err).strip().splitlines()[0][:300].rstrip(".")
    return f"out of memory ({first_line}). {remedy}"


def load_config(workdir: str, base=None):
    """The config a run in ``workdir`` was trained with (its config.json), laid over ``base`` if given.

    A base (configs/base.py) supplies fields added since the run was trained.
    """
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is damaged ({err}): restore it from a copy of the run") from err
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a {type(saved).__name__}, not the run's config (a JSON object)")
    if base is None:
        return _without_ignored_settings(ml_collections.ConfigDict(saved))
    config = base.copy_and_resolve_references()
    for group, values in saved.items():
        if isinstance(values, dict):
            for key, value in values.items():
                config[group][key] = tuple(value) if isinstance(value, list) else value
        else:
            config[group] = tuple(values) if isinstance(values, list) else values
    return _without_ignored_settings(config)


def _without_ignored_settings(config):
    """A saved config with the settings its run ignored reset, now that they are refused: an eta of the ddpm
    sampler (DDIM's noise, which that sampler never used), data.num_train of an image set (2-D sets only) and
    the MLP's model.dropout (it has none), the betas of a schedule that takes none (cosine, jsd) and the
    vlb_weight of a loss other than 'hybrid'; and cuDNN's attention where JAX has no GPU (a compute setting: the
    network is the same)."""
    if config.sampling.get("sampler") == "ddpm" and config.sampling.get("eta"):
        config.sampling.eta = 0.0
    for key, (default, _) in ignored_diffusion_settings(config.diffusion).items():
        config.diffusion[key] = default
    if config.model.get("name") == "mlp" and config.model.get("dropout"):
        config.model.dropout = 0.0
    spec = DATASETS.get(config.data.get("dataset"))
    if config.data.get("num_train") and spec is not None and spec.kind == "image":
        config.data.num_train = 0
    if cudnn_missing(config.model):
        config.model.attn_implementation = ""
    return config


def pretrained_name(path: str) -> str:
    """"pretrained_<folder name>_<digest of its absolute path>", which names the files of released weights: two
    folders of one name (a/unet, b/unet) wrote each other's samples and evaluation."""
    real = os.path.realpath(path)
    return f"pretrained_{os.path.basename(real)}_{hashlib.sha256(real.encode()).hexdigest()[:8]}"


def load_pretrained(path: str, config, *, evaluate: bool = False, process_from_weights: bool = False):
    """(model, schedule, params) from a diffusers UNet2DModel folder (e.g. the DDPM authors' CIFAR-10 weights).

    ``config`` supplies the diffusion and sampling settings (configs/cifar10.py: the paper's); the data shape and
    the network's settings in ``config.model`` are set from the weights' config, so that `validate_config` checks
    the network that runs. ``evaluate``: the data set's images will be read (bits/dim, interpolations, latents,
    FID statistics of a split); refuse weights for larger images, which they would be upsampled to. A
    scheduler_config.json with the weights must describe the config's diffusion process, or, with
    ``process_from_weights`` (sample.py, which takes no config), sets it.
    """
    from ddpm_jax.models import UNet, diffusion_settings_from_scheduler, load_diffusers_unet, read_diffusers_config

    trained_for = diffusion_settings_from_scheduler(path) or {}
    if process_from_weights:
        config.diffusion.update(trained_for)
    differing = {key: value for key, value in trained_for.items() if config.diffusion[key] != value}
    if differing:  # bits/dim and samples of another process than the weights learned would be wrong
        raise ValueError(f"{path}: the weights were trained for another diffusion process than the config's "
                         f"(scheduler_config.json): set " + " ".join(
                             f"--config.diffusion.{key}={value}" for key, value in differing.items()))
    kwargs, params = load_diffusers_unet(path)
    diffusers_config = read_diffusers_config(path)
    in_channels = diffusers_config.get("in_channels", 3)
    predicts_variance = kwargs["out_channels"] == 2 * in_channels
    if predicts_variance != is_learned_variance(config):  # its output had the wrong size at the first step
        if process_from_weights:
            fix = f"variance_type {'learned_range' if predicts_variance else 'fixed_large'} in scheduler_config.json"
        elif predicts_variance:
            fix = "--config.diffusion.var_type=learned_range --config.diffusion.loss_type=hybrid (or 'learned')"
        else:
            fix = "a fixed --config.diffusion.var_type"
        raise ValueError(f"{path}: the weights output {kwargs['out_channels']} channels for {in_channels}-channel "
                         f"images, and diffusion.var_type={config.diffusion.var_type!r} takes "
                         f"{in_channels * (2 if is_learned_variance(config) else 1)}: set {fix}")
    size = diffusers_config.get("sample_size") or config.data.image_size  # diffusers writes null by default
    height, width = size if isinstance(size, (list, tuple)) else (size, size)  # diffusers writes either
    if height != width:
        raise ValueError(f"{path}: sample_size {size} is not square; the data here are square images")
    native = DATASETS[config.data.dataset].shape[0] if config.data.dataset in DATASETS else None
    if evaluate and native is not None and height > native:
        raise ValueError(f"{path}: the weights are for {height}x{height} images, and data set "
                         f"{config.data.dataset!r} has {native}x{native}: its images would be upsampled to the "
                         "weights' size. Use them with the data set they were trained on (config.data.dataset)")
    config.data.image_size = int(height)
    config.data.num_channels = int(in_channels)
    for name, value in kwargs.items():
        if name in config.model:
            config.model[name] = value
    # The compute settings are the config's (validate_config refuses an unknown dtype).
    model = UNet(**kwargs, dtype=DTYPES.get(config.model.dtype, jnp.float32),
                 attn_implementation=config.model.attn_implementation or None)
    return model, schedule_from_config(config.diffusion), jax.tree.map(jnp.asarray, params)
