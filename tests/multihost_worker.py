"""Subprocess worker for the multi-device and multi-process training tests (run as a script, not collected).

python tests/multihost_worker.py sharded OUT.npz
    On 8 (fake) CPU devices: jitted training calls on a mesh of all 8 (also in 2 microbatches) and on a mesh of
    device 0 only, from the same state and batches, and the held-out bits/dim, samples and per-device FLOPs of
    a tiny digits U-Net on each; writes the results.
python tests/multihost_worker.py multihost WORKDIR PORT PROCESS_ID NUM_PROCESSES
    One process of a jax.distributed run on 127.0.0.1:PORT: run.train_and_evaluate of the same steps (each
    process reads only its own rows of every global batch, Orbax saves jointly); writes the final state this
    process sees, the rows run.valid_rows_of_all_processes pools from both and the bits/dim of the tiny digits
    U-Net over both processes' devices, to WORKDIR/state_PROCESS_ID.npz.
python tests/multihost_worker.py interrupted|interrupted_at_the_end WORKDIR PORT PROCESS_ID NUM_PROCESSES
    The same kind of run, long, with a SIGTERM to process 0 alone once the first metrics line is written (or
    short, with the SIGTERM as the last train call is logged); writes what each process's
    run.train_and_evaluate raised to WORKDIR/interrupted_PROCESS_ID.txt.
python tests/multihost_worker.py interrupted_chains WORKDIR PORT PROCESS_ID NUM_PROCESSES
    A short run with a SIGTERM to process 1 alone in its final samples, then bits/dim over both processes with
    one to process 0 alone in its chain; writes what each process raised in each to
    WORKDIR/interrupted_PROCESS_ID.txt.

Also the helpers the test files share: the tiny swiss-roll overrides, the environment for subprocesses (the
tests' persistent compilation cache), a free local port.
"""

import functools
import os
import socket
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import swissroll  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/swissroll.py made quick: the in-process runs and the train.py subprocesses use the same values, so
# they compile the same (single-step) training step and share it through the persistent compilation cache.
TINY_SWISSROLL = {
    "model.mlp_hidden": 32,
    "model.mlp_layers": 2,
    "data.num_train": 4096,
    "training.batch_size": 64,
    "training.warmup_steps": 0,
    "training.steps_per_call": 1,  # the scan path (K > 1) is covered by the sharded and two-process runs
    "training.log_every": 10,
    "training.checkpoint_every": 20,
    "training.sample_every": 0,
    "sampling.num_samples": 64,
}


def apply_overrides(config, overrides: dict):
    """Set dotted-path fields of an ml_collections config in place; returns it."""
    for path, value in overrides.items():
        *groups, field = path.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[field] = value
    return config


def subprocess_env(**extra: str) -> dict:
    """os.environ plus the repository on PYTHONPATH and the tests' persistent compilation cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONFAULTHANDLER"] = "1"  # a SIGABRT to a hung subprocess prints every thread's stack
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GLOBAL_BATCH = 16
STEPS_PER_CALL = 2
NUM_CALLS = 3


def tiny_config():
    """The swiss-roll config with a small MLP and batch 16 (fast to compile on CPU)."""
    config = swissroll.get_config()
    config.model.mlp_hidden = 32
    config.model.mlp_layers = 2
    config.training.batch_size = GLOBAL_BATCH
    config.training.steps_per_call = STEPS_PER_CALL
    config.training.warmup_steps = 0
    config.data.num_train = 512
    return config


def flat(tree) -> np.ndarray:
    """All leaves of a (replicated) pytree concatenated into one float64 vector, read from a local shard."""
    leaves = [np.asarray(leaf.addressable_data(0), np.float64).ravel() for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves)


def train_calls(mesh, process_index: int, process_count: int, microbatches: int = 1) -> dict:
    """NUM_CALLS sharded calls of the training step; returns the final params, EMA params and per-step losses."""
    from ddpm_jax.config import build_model, schedule_from_config
    from ddpm_jax.data import make_dataset
    from ddpm_jax.training import global_batch, init_train_state, jit_train_step, make_train_step

    config = tiny_config()
    config.training.microbatches = microbatches
    model = build_model(config)
    schedule = schedule_from_config(config.diffusion)
    dataset = make_dataset(
        config.data, "train", batch_size=GLOBAL_BATCH, seed=0, process_index=process_index, process_count=process_count
    )
    state = init_train_state(config, model, jax.random.PRNGKey(0), mesh)
    step_fn = jit_train_step(make_train_step(config, model, schedule), mesh)
    losses = []
    for call in range(NUM_CALLS):
        steps = range(call * STEPS_PER_CALL, (call + 1) * STEPS_PER_CALL)
        local = np.stack([dataset.batch(s)["image"] for s in steps])
        state, metrics = step_fn(state, global_batch({"image": local}, mesh))
        losses.append(np.asarray(metrics["loss"].addressable_data(0)))
    return {
        "params": flat(state.params),
        "ema_params": flat(state.ema_params),
        "opt_state": flat(state.opt_state),
        "step": int(state.step.addressable_data(0)),
        "losses": np.concatenate(losses),
        "local_rows": dataset.batch(0)["image"],
    }


BPD_EXAMPLES = 11  # at eval.batch_size 8: a full batch and one with 5 padding rows


@functools.cache
def tiny_unet():
    """(config, model, schedule, params): an untrained U-Net of one level, 8 channels, on the digits, T = 10."""
    from configs import digits
    from ddpm_jax.config import build_model, schedule_from_config

    config = apply_overrides(digits.get_config(), {
        "model.ch": 8, "model.ch_mult": (1,), "model.attn_resolutions": (), "model.num_res_blocks": 1,
        "model.num_groups": 4, "diffusion.num_timesteps": 10, "eval.batch_size": 8,
        "sampling.num_samples": 20, "sampling.batch_size": 8,
    })
    model, schedule = build_model(config), schedule_from_config(config.diffusion)
    # Jitted, with the threefry that XLA:CPU compiles fastest: 2.3 s here, where op-by-op init took 8.7 s.
    with jax.threefry_partitionable(False):
        variables = jax.jit(model.init)(
            jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32), np.zeros((1,), np.int32)
        )
    params = variables["params"]
    return config, model, schedule, params


def tiny_unet_bpd(mesh) -> np.ndarray:
    """run.evaluate_bpd over BPD_EXAMPLES digits of the tiny U-Net on ``mesh``: [bpd, prior, L_0, count]."""
    from ddpm_jax import run

    config, model, schedule, params = tiny_unet()
    result = run.evaluate_bpd(
        config, params, model, schedule, num_examples=BPD_EXAMPLES, key=jax.random.PRNGKey(1), mesh=mesh
    )
    return np.array([result["bpd"], result["bpd_prior"], result["bpd_decoder"], result["bpd_examples"]])


def tiny_unet_samples(mesh, out_dir: str) -> np.ndarray:
    """generation.generate's 20 samples of the tiny U-Net, in chains of 8 split over ``mesh``."""
    from ddpm_jax import generation

    config, model, schedule, params = tiny_unet()
    result = generation.generate(config, model, schedule, params, out_dir=out_dir, tag="tiny", mesh=mesh)
    return np.load(result["npz"])["samples"]


def error_message(fn) -> str:
    """The message of the ValueError ``fn()`` raises ('' if none)."""
    try:
        fn()
    except ValueError as error:
        return str(error)
    return ""


def tiny_unet_flops_per_device(mesh) -> np.ndarray:
    """XLA's FLOP count per device of the tiny U-Net's sampling chain (8 samples) and bits/dim batch (8 images)."""
    from ddpm_jax import generation, run
    from ddpm_jax.training import batch_sharding, replicated

    config, model, schedule, params = tiny_unet()
    params, key = jax.device_put(params, replicated(mesh)), jax.random.PRNGKey(0)
    x0 = jax.device_put(np.zeros((8, 8, 8, 1), np.float32), batch_sharding(mesh))
    compiled = [
        generation.make_sample_fn(config, model, schedule, num_samples=8, mesh=mesh).lower(params, key).compile(),
        run.make_bpd_fn(config, model, schedule, mesh).lower(params, x0, key).compile(),
    ]
    costs = [c.cost_analysis() for c in compiled]
    return np.array([(c[0] if isinstance(c, list) else c)["flops"] for c in costs])


def interrupted_run(config, workdir: str, process_id: int, at_the_end: bool) -> None:
    """A run in which process 0 alone gets a SIGTERM: in a long run once training has logged, or ``at_the_end``
    of a short one, as its last train call is logged (no train call follows); records what each process raised."""
    import signal
    import threading
    import time

    from ddpm_jax import run

    config.training.num_steps = config.training.checkpoint_every = NUM_CALLS * STEPS_PER_CALL if at_the_end \
        else 100_000
    config.training.log_every = STEPS_PER_CALL
    config.training.sample_every = 0
    metrics = os.path.join(workdir, "metrics.jsonl")

    def terminate_once_logged():
        while not (os.path.exists(metrics) and os.path.getsize(metrics)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    def write_then_terminate_at_the_end(writer, step, metrics):
        write(writer, step, metrics)
        if step == config.training.num_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    if process_id == 0 and at_the_end:
        write = run.MetricsWriter.write
        run.MetricsWriter.write = write_then_terminate_at_the_end
    elif process_id == 0:
        threading.Thread(target=terminate_once_logged, daemon=True).start()
    try:
        run.train_and_evaluate(config, workdir, progress=False)
        outcome = "finished"
    except KeyboardInterrupt as interrupt:
        outcome = f"KeyboardInterrupt: {interrupt}"
    with open(os.path.join(workdir, f"interrupted_{process_id}.txt"), "w") as f:
        f.write(outcome)


def interrupted_chains(config, workdir: str, process_id: int) -> None:
    """Process 1 alone gets a SIGTERM from its first step of the run's final samples (each process draws them on
    one of its devices), then process 0 alone from the third step of a bits/dim chain evaluated over both
    processes (only process 0 runs that chain's callbacks); records what each process raised in each."""
    import signal

    from ddpm_jax import run
    from ddpm_jax.interrupts import ChainWatch
    from ddpm_jax.training import make_mesh

    config.training.num_steps = config.training.checkpoint_every = NUM_CALLS * STEPS_PER_CALL
    config.training.log_every = STEPS_PER_CALL
    config.training.sample_every = 0
    watch_call, steps = ChainWatch.__call__, []

    def terminated_at_step(at: int, process: int):
        def call(self, t):
            steps.append(t)
            if len(steps) == at and process_id == process:
                os.kill(os.getpid(), signal.SIGTERM)
            watch_call(self, t)
        return call

    outcomes = []
    for at, process, job in ((1, 1, lambda: run.train_and_evaluate(config, workdir, progress=False)),
                             (3, 0, lambda: tiny_unet_bpd(make_mesh()))):
        steps.clear()
        ChainWatch.__call__ = terminated_at_step(at, process)
        try:
            job()
            outcomes.append("finished")
        except KeyboardInterrupt as interrupt:
            outcomes.append(f"KeyboardInterrupt: {interrupt}")
    with open(os.path.join(workdir, f"interrupted_{process_id}.txt"), "w") as f:
        f.write("\n".join(outcomes))


def main(argv: list[str]) -> None:
    mode, out = argv[1], argv[2]
    jax.config.update("jax_platforms", "cpu")
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from ddpm_jax.training import make_mesh

    if mode == "sharded":
        assert jax.device_count() == 8, jax.devices()
        sharded = train_calls(make_mesh(), 0, 1)
        single = train_calls(make_mesh(jax.devices()[:1]), 0, 1)
        accumulated = train_calls(make_mesh(), 0, 1, microbatches=2)  # one example per device and part
        arrays = {f"sharded_{k}": v for k, v in sharded.items()} | {f"single_{k}": v for k, v in single.items()}
        arrays |= {f"accumulated_{k}": v for k, v in accumulated.items()}
        for name, mesh in (("sharded", make_mesh()), ("single", make_mesh(jax.devices()[:1]))):
            arrays[f"{name}_bpd"] = tiny_unet_bpd(mesh)
            arrays[f"{name}_samples"] = tiny_unet_samples(mesh, os.path.join(os.path.dirname(out), name))
            arrays[f"{name}_flops"] = tiny_unet_flops_per_device(mesh)
        three = make_mesh(jax.devices()[:3])
        arrays["mesh_errors"] = np.array([error_message(lambda: tiny_unet_bpd(three)),
                                          error_message(lambda: tiny_unet_samples(three, out + ".3"))])
        np.savez(out, **arrays)
    elif mode in ("multihost", "interrupted", "interrupted_at_the_end", "interrupted_chains"):
        port, process_id, num_processes = int(argv[3]), int(argv[4]), int(argv[5])
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
            initialization_timeout=60,
        )
        assert jax.process_count() == num_processes and jax.process_index() == process_id
        from ddpm_jax import run

        config = tiny_config()
        if mode == "interrupted_chains":
            interrupted_chains(config, out, process_id)
            jax.distributed.shutdown()
            return
        if mode.startswith("interrupted"):
            interrupted_run(config, out, process_id, at_the_end=mode == "interrupted_at_the_end")
            jax.distributed.shutdown()
            return
        config.training.num_steps = NUM_CALLS * STEPS_PER_CALL
        config.training.log_every = STEPS_PER_CALL
        config.training.checkpoint_every = 2 * STEPS_PER_CALL
        config.training.sample_every = 0
        config.sampling.num_samples = 16
        state = run.train_and_evaluate(config, out, progress=False)
        # How bits/dim pools its per-example rows: process p holds 10p, 10p+1, 10p+2, the last padding on p > 0.
        pooled = run.valid_rows_of_all_processes(
            {"v": 10.0 * process_id + np.arange(3)}, np.array([True, True, process_id == 0])
        )
        np.savez(
            os.path.join(out, f"state_{process_id}.npz"),
            params=flat(state.params), ema_params=flat(state.ema_params), opt_state=flat(state.opt_state),
            step=int(state.step.addressable_data(0)), num_devices=jax.device_count(), pooled_rows=pooled["v"],
            bpd=tiny_unet_bpd(make_mesh()),
        )
        jax.distributed.shutdown()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
