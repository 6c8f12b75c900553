"""train.py and sample.py as a user runs them: SIGKILL mid-training and resume reproduces an uninterrupted run
exactly; bad flags and configs stop at once with one message; sample.py draws from a finished run."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddpm_jax as dj
from configs import swissroll
from ddpm_jax import generation, run, viz
from ddpm_jax.data import load_split, uint8_to_float
from ddpm_jax.interrupts import ChainWatch, interrupts_deferred
from ddpm_jax.metrics import digits_class_agreement
from ddpm_jax.models import denoiser_fn
from ddpm_jax.parts import Parts
from ddpm_jax.training import make_mesh
from tests.multihost_worker import REPO, TINY_SWISSROLL, apply_overrides, subprocess_env, tiny_unet, tiny_unet_bpd

NUM_STEPS = 600  # with a checkpoint every 100 steps: long enough to be killed between two of them


def train_command(workdir, *flags: str) -> list[str]:
    overrides = [f"--config.{path}={value}" for path, value in TINY_SWISSROLL.items()]
    return [
        sys.executable, os.path.join(REPO, "train.py"), "--config=configs/swissroll.py", f"--workdir={workdir}",
        "--progress=false", *overrides, f"--config.training.num_steps={NUM_STEPS}",
        "--config.training.checkpoint_every=100", *flags,
    ]


def sample_py(*runs: list[str], **env: str) -> list[subprocess.CompletedProcess]:
    """sample.py with each list of flags, all started at once (most of each is one core's imports), run to
    completion with ``env`` added to the environment; their outputs captured."""
    procs = [
        subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), *flags], cwd=REPO, env=subprocess_env(**env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flags in runs
    ]
    try:
        outputs = [proc.communicate(timeout=180) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *output)
                for proc, output in zip(procs, outputs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def finished_checkpoints(workdir) -> list[int]:
    """Steps of the checkpoints Orbax has finalised (in-flight saves live in temporary directories)."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def metrics_lines(workdir) -> list[dict]:
    """metrics.jsonl without the timings."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in line.items() if k != "steps_per_sec"} for line in lines]


@pytest.fixture(scope="module")
def killed_and_uninterrupted(tmp_path_factory):
    """Two runs of the same command: one SIGKILLed after its first checkpoint and rerun, one left alone."""
    root = tmp_path_factory.mktemp("kill")
    killed, uninterrupted = str(root / "killed"), str(root / "uninterrupted")
    env = subprocess_env()
    reference = subprocess.Popen(train_command(uninterrupted), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(train_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(step >= 100 for step in finished_checkpoints(killed)):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    kill_step = max(finished_checkpoints(killed))
    assert kill_step < NUM_STEPS, "the run finished before the kill"
    rerun = subprocess.run(train_command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, out[-3000:]
    return killed, uninterrupted, kill_step


def test_sigkill_then_rerun_reproduces_the_uninterrupted_run_exactly(killed_and_uninterrupted):
    killed, uninterrupted, kill_step = killed_and_uninterrupted
    assert 100 <= kill_step < NUM_STEPS
    resumed_lines, reference_lines = metrics_lines(killed), metrics_lines(uninterrupted)
    steps = [line["step"] for line in resumed_lines if "loss" in line]
    assert steps == list(range(10, NUM_STEPS + 1, 10))  # nothing lost, nothing written twice
    assert any(line["step"] > kill_step for line in resumed_lines)
    assert resumed_lines == reference_lines  # losses, gradient norms, quartile losses, sample metrics: bitwise
    assert finished_checkpoints(killed) == finished_checkpoints(uninterrupted)

    config = apply_overrides(swissroll.get_config(), TINY_SWISSROLL)
    for ema in (False, True):
        _, _, resumed, step = run.restore_params(config, killed, ema=ema)
        _, _, reference, _ = run.restore_params(config, uninterrupted, ema=ema)
        assert step == NUM_STEPS
        for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_at_the_step_reached(sig, tmp_path):
    workdir = str(tmp_path / "run")  # given as ~/run: the shell leaves ~ in --workdir=~/run to train.py
    proc = subprocess.Popen(train_command("~/run", "--config.training.num_steps=100000"), cwd=REPO,
                            env=subprocess_env(HOME=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and metrics_lines(workdir)):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # seen once in CI after the checkpoint was saved; not reproduced since
        proc.send_signal(signal.SIGABRT)
        pytest.fail("train.py did not exit after saving; its threads:\n" + proc.communicate(timeout=60)[0][-8000:])
    assert proc.returncode == 130, out[-3000:]
    saved = re.search(r"interrupted: checkpoint saved at step (\d+)", out)
    assert saved, out[-3000:]
    assert finished_checkpoints(workdir)[-1] == int(saved.group(1)) >= 10
    # The steps since the last log line, if any, have their line at the checkpoint: the resumed run logs after it.
    assert [line["step"] for line in metrics_lines(workdir) if "loss" in line][-1] == int(saved.group(1))


def test_interrupts_in_the_train_step_block_arrive_after_it():
    """The train step donates the state: Ctrl-C between its return and `state = ...` would lose the state."""
    handler = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the (recording) handler here
            finished.append(True)
    assert finished == [True] and signal.getsignal(signal.SIGINT) is handler
    # An error raised in the block is not hidden behind the held Ctrl-C: a divergence that a Ctrl-C met in the same
    # train call was saved as a checkpoint, and its message never shown.
    with pytest.raises((FloatingPointError, KeyboardInterrupt)) as raised:  # the latter would end pytest
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise FloatingPointError("diverged")
    assert raised.type is FloatingPointError and signal.getsignal(signal.SIGINT) is handler


def test_ctrl_c_during_a_checkpoint_save_lets_that_save_finish(monkeypatch, tmp_path):
    """A SIGINT that lands inside the periodic save is delivered after it: the save runs to its end once, and
    the run stops with that checkpoint (interrupted inside Orbax, the process hung at exit)."""
    entered, completed, save = [], [], run.Checkpointer.save

    def save_interrupted_at_its_start(self, step, state, *, force=False):
        entered.append(step)
        if len(entered) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # where Python runs the handler
        save(self, step, state, force=force)
        completed.append(step)

    monkeypatch.setattr(run.Checkpointer, "save", save_interrupted_at_its_start)
    config = apply_overrides(swissroll.get_config(), {**TINY_SWISSROLL, "training.num_steps": 60})
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, workdir, progress=False)
    checkpoint_every = TINY_SWISSROLL["training.checkpoint_every"]
    assert entered == completed == [checkpoint_every]
    assert finished_checkpoints(workdir) == [checkpoint_every]


def test_ctrl_c_during_a_call_that_ends_at_a_log_step_keeps_that_line(monkeypatch, tmp_path):
    """A SIGINT inside the call that reaches step 10 (log_every): the run stops with a checkpoint at 10 and the
    line of step 10 (it was lost: the resumed run logs from step 20, so steps 1-10 had no line at all)."""
    calls, make_step = [], run.jit_train_step

    def step_interrupted_in_its_tenth_call(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)

        def call(state, batches):
            calls.append(1)
            if len(calls) == 10:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # where Python runs the (deferring) handler
            return step_fn(state, batches)

        return call

    monkeypatch.setattr(run, "jit_train_step", step_interrupted_in_its_tenth_call)
    config = apply_overrides(swissroll.get_config(), {**TINY_SWISSROLL, "training.num_steps": 60})
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, workdir, progress=False)
    assert finished_checkpoints(workdir) == [10]
    assert [line["step"] for line in metrics_lines(workdir)] == [10]


def test_ctrl_c_stops_a_sampling_chain_at_once():
    """A jitted chain is one XLA call: Python would raise the KeyboardInterrupt only after its last step."""
    watch, steps = ChainWatch(), []
    total = 2000

    def on_step(t):
        steps.append(int(t))
        if len(steps) == 10:
            os.kill(os.getpid(), signal.SIGINT)

    def body(x, t):
        jax.debug.callback(watch, t, ordered=True)
        return x * 0.5 + 1.0, None

    chain = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(total))[0])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), watch.watching(on_step=on_step):
        jax.device_get(chain(jnp.zeros(4)))
    assert 10 <= len(steps) < total // 2 and watch.stopped
    assert signal.getsignal(signal.SIGINT) is handler and signal.set_wakeup_fd(-1) == -1

    steps.clear()  # without a signal the chain runs to its end with the same result
    with watch.watching(on_step=lambda t: steps.append(int(t))):
        out = jax.device_get(chain(jnp.zeros(4)))
    np.testing.assert_allclose(out, 2.0)
    assert steps == list(range(total)) and not watch.stopped


def test_a_second_ctrl_c_during_the_save_it_asked_for_lets_that_save_finish(monkeypatch, tmp_path, capsys):
    """The first Ctrl-C comes as step 10's metrics are written; the second inside the checkpoint save it causes."""
    entered, completed, save, write = [], [], run.Checkpointer.save, run.MetricsWriter.write

    def save_interrupted_at_its_start(self, step, state, *, force=False):
        entered.append(step)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # where Python runs the handler
        save(self, step, state, force=force)
        completed.append(step)

    def write_interrupted(self, step, metrics):
        write(self, step, metrics)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

    monkeypatch.setattr(run.Checkpointer, "save", save_interrupted_at_its_start)
    monkeypatch.setattr(run.MetricsWriter, "write", write_interrupted)
    config = apply_overrides(swissroll.get_config(), {**TINY_SWISSROLL, "training.checkpoint_every": 1000})
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, workdir, progress=False)
    assert entered == completed == [10] and finished_checkpoints(workdir) == [10]
    assert "interrupted: checkpoint saved at step 10" in capsys.readouterr().out


def interrupt_chains_at_step(monkeypatch, step: int | None) -> list[int]:
    """Send SIGINT from a chain's progress callback at its ``step``-th call (None: never); the list of the calls' t,
    filled as they come."""
    calls, watch_call = [], ChainWatch.__call__

    def interrupted(self, t):
        calls.append(int(t))
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        watch_call(self, t)

    monkeypatch.setattr(ChainWatch, "__call__", interrupted)
    return calls


def test_ctrl_c_during_the_samples_of_a_run_stops_them_and_saves_a_checkpoint(monkeypatch, tmp_path):
    calls = interrupt_chains_at_step(monkeypatch, 5)
    config = apply_overrides(swissroll.get_config(), {**TINY_SWISSROLL, "training.sample_every": 30})
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.train_and_evaluate(config, workdir, progress=False)
    assert 5 <= len(calls) < config.diffusion.num_timesteps // 2
    assert finished_checkpoints(workdir)[-1] == 30
    assert not os.path.exists(os.path.join(workdir, "samples"))


def test_ctrl_c_stops_the_chain_of_sample_py_and_writes_nothing(killed_and_uninterrupted, monkeypatch, tmp_path):
    _, workdir, _ = killed_and_uninterrupted
    config = run.load_config(workdir, base=swissroll.get_config())
    model, schedule, params, _ = run.restore_params(config, workdir)
    calls = interrupt_chains_at_step(monkeypatch, 5)
    out_dir = str(tmp_path / "samples")
    with pytest.raises(KeyboardInterrupt):
        generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    assert 5 <= len(calls) < schedule.num_timesteps // 2
    assert not os.path.exists(out_dir)


def test_ctrl_c_on_a_chain_that_runs_to_its_end_keeps_it(killed_and_uninterrupted, monkeypatch, tmp_path, capsys):
    """A chain split over several devices is not stopped by Ctrl-C (watching(stop=False), forced here on one
    device): the KeyboardInterrupt comes after the chain is kept, not before (the rerun drew it again)."""
    _, workdir, _ = killed_and_uninterrupted
    config = run.load_config(workdir, base=swissroll.get_config())
    model, schedule, params, _ = run.restore_params(config, workdir)
    watching = ChainWatch.watching
    monkeypatch.setattr(ChainWatch, "watching", lambda self, on_step=None, stop=True: watching(self, on_step,
                                                                                               stop=False))
    calls = interrupt_chains_at_step(monkeypatch, 5)
    out_dir = str(tmp_path / "samples")
    with pytest.raises(KeyboardInterrupt):
        generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    assert len(calls) == schedule.num_timesteps
    assert "interrupted: 1 of 1 chains of" in capsys.readouterr().err
    calls = interrupt_chains_at_step(monkeypatch, None)
    assert generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")["chains_drawn"] == 0
    assert calls == []


def test_a_trajectory_call_does_not_take_the_chains_a_plain_call_kept(killed_and_uninterrupted, monkeypatch, tmp_path):
    """A chain compiled to record its trajectory rounds differently (1.9e-6 apart for a small swiss-roll MLP): a
    --trajectory call after an interrupted plain one draws every chain, not a mix of the two kinds under one name."""
    _, workdir, _ = killed_and_uninterrupted
    config = run.load_config(workdir, base=swissroll.get_config())
    config.sampling.num_samples, config.sampling.batch_size = 48, 16
    model, schedule, params, _ = run.restore_params(config, workdir)
    out_dir = str(tmp_path / "samples")
    interrupt_chains_at_step(monkeypatch, 2 * schedule.num_timesteps + 5)  # chains 0 and 1 kept
    with pytest.raises(KeyboardInterrupt):
        generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    interrupt_chains_at_step(monkeypatch, None)
    traced = generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t", trajectory=True)
    assert (traced["chains_drawn"], traced["num_chains"]) == (3, 3)  # chain 1 was taken from the plain call


def test_released_weights_in_two_folders_of_one_name_get_their_own_files(tmp_path, monkeypatch):
    # A pipeline keeps its network in unet/: two of them wrote the same samples_*_pretrained_unet files.
    first, second = tmp_path / "a" / "unet", tmp_path / "b" / "unet"
    names = {run.pretrained_name(str(folder)) for folder in (first, second)}
    assert len(names) == 2 and all(name.startswith("pretrained_unet_") for name in names)
    monkeypatch.chdir(tmp_path)
    assert run.pretrained_name("a/unet/") == run.pretrained_name(str(first))  # one folder, however spelled


def test_sample_py_goes_on_from_the_chains_it_kept(killed_and_uninterrupted, monkeypatch, tmp_path, capsys):
    """50 samples in chains of 16 (the last one 2 of 16), interrupted in the third: a rerun draws only the
    third and the fourth, and the samples equal those of an uninterrupted call."""
    _, workdir, _ = killed_and_uninterrupted
    config = run.load_config(workdir, base=swissroll.get_config())
    config.sampling.num_samples, config.sampling.batch_size = 50, 16
    model, schedule, params, _ = run.restore_params(config, workdir)
    num_steps = schedule.num_timesteps
    out_dir = str(tmp_path / "samples")
    calls = interrupt_chains_at_step(monkeypatch, 2 * num_steps + 5)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    assert 2 * num_steps + 5 <= len(calls) < 3 * num_steps
    assert "interrupted: 2 of 4 chains of 16 samples kept in" in capsys.readouterr().err

    # The same call while another process draws these samples is refused before it draws any.
    (parts_dir,) = [os.path.join(out_dir, name) for name in os.listdir(out_dir)]
    prefix = next(name for name in os.listdir(parts_dir) if name.endswith("00000.npz"))[: -len("00000.npz")]
    calls = interrupt_chains_at_step(monkeypatch, None)
    with Parts(parts_dir, prefix).claimed("the first call's samples"):
        with pytest.raises(ValueError, match=rf"another process \(pid {os.getpid()} on .*\) is computing these "):
            generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    assert calls == [] and len(os.listdir(parts_dir)) == 3  # the two chains and the lock file

    # Another model's samples in the same folder draw their own chains and leave this job's kept ones alone.
    calls = interrupt_chains_at_step(monkeypatch, None)
    other_params = jax.tree.map(lambda a: a * 1.01, params)
    other = generation.generate(config, model, schedule, other_params, out_dir=out_dir, tag="t")
    assert other["chains_drawn"] == 4 and len(calls) == 4 * num_steps
    other_samples = np.load(other["npz"])["samples"]
    # So do the same parameters sampled with other variances (a process the kept chains were not drawn from).
    other_process = apply_overrides(config.copy_and_resolve_references(), {"diffusion.var_type": "fixedlarge"})
    assert generation.generate(other_process, model, schedule, params, out_dir=out_dir, tag="t")["chains_drawn"] == 4

    calls = interrupt_chains_at_step(monkeypatch, None)
    resumed = generation.generate(config, model, schedule, params, out_dir=out_dir, tag="t")
    assert len(calls) == 2 * num_steps
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(resumed[k]) for k in ("png", "npz"))
    uninterrupted = generation.generate(config, model, schedule, params, out_dir=str(tmp_path / "again"), tag="t")
    samples = np.load(resumed["npz"])["samples"]
    np.testing.assert_array_equal(samples, np.load(uninterrupted["npz"])["samples"])
    assert not np.allclose(samples, other_samples, atol=1e-3)
    assert samples.shape == (50, 2) and not np.allclose(samples[:16], samples[16:32])  # each chain its own key
    # Chain c's key is the seed's key folded with c, whatever the number of chains: 16 samples are the first 16.
    config.sampling.num_samples = 16
    alone = generation.generate(config, model, schedule, params, out_dir=str(tmp_path / "alone"), tag="t")
    np.testing.assert_array_equal(np.load(alone["npz"])["samples"], samples[:16])


def test_sigterm_stops_sample_py_like_ctrl_c_with_the_chains_kept(killed_and_uninterrupted, tmp_path):
    """SIGTERM (a scheduler's pre-emption) ended sample.py at once (exit 143), without saying what it kept."""
    _, workdir, _ = killed_and_uninterrupted
    out_dir = tmp_path / "samples"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}", f"--out_dir={out_dir}",
         "--num=100000", "--batch_size=8", "--noprogress"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(out_dir.glob("*.parts/*.npz")):  # a chain kept
            assert proc.poll() is None and time.monotonic() < deadline, "no chain finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert re.search(r"interrupted: \d+ of 12500 chains of 8 samples kept", stderr), stderr[-3000:]


def test_a_ctrl_c_during_the_metrics_keeps_the_chains_for_the_rerun(killed_and_uninterrupted, monkeypatch,
                                                                     tmp_path, capsys):
    """FID of 50,000 samples takes minutes after the chains: interrupted there, a rerun draws no chain again."""
    _, workdir, _ = killed_and_uninterrupted
    config = run.load_config(workdir, base=swissroll.get_config())
    config.sampling.num_samples, config.sampling.batch_size = 20, 10
    model, schedule, params, _ = run.restore_params(config, workdir)
    out_dir, real_metrics = str(tmp_path / "samples"), generation.sample_metrics

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "sample_metrics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(
            config, model, schedule, params, out_dir=out_dir, tag="m", with_metrics=True, progress=False
        )
    assert "interrupted after sampling: the samples are in" in capsys.readouterr().err
    first = np.load(os.path.join(out_dir, "samples_ddpm_seed0_m.npz"))["samples"]
    monkeypatch.setattr(generation, "sample_metrics", real_metrics)
    rerun = generation.generate(
        config, model, schedule, params, out_dir=out_dir, tag="m", with_metrics=True, progress=False
    )
    assert (rerun["chains_drawn"], rerun["num_chains"]) == (0, 2) and "swd" in rerun["metrics"]
    np.testing.assert_array_equal(np.load(rerun["npz"])["samples"], first)
    assert not os.path.exists(os.path.join(out_dir, "samples_ddpm_seed0_m.parts"))


def test_interpolation_pictures_decode_pairs_of_test_images(tmp_path):
    """sample.py --interpolate: test images 0 and 2 paired with 1 and 3, decoded as `interpolate` decodes them."""
    config, model, schedule, params = tiny_unet()
    result = generation.draw_interpolations(config, model, schedule, params, out_dir=str(tmp_path), tag="tiny", t=4,
                                     num_pairs=2, num_lambdas=3, seed=5, progress=False)
    saved = np.load(result["npz"])
    test_images = uint8_to_float(load_split(config.data, "test")[0][:4])
    np.testing.assert_array_equal(saved["x0_a"], test_images[[0, 2]])
    np.testing.assert_array_equal(saved["x0_b"], test_images[[1, 3]])
    expected = dj.interpolate(denoiser_fn(model, params), schedule, test_images[[0, 2]], test_images[[1, 3]],
                              np.array([0.0, 0.5, 1.0]), 4, jax.random.PRNGKey(5),
                              mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type)
    np.testing.assert_allclose(saved["interpolations"], expected, rtol=1e-5, atol=1e-5)
    with Image.open(result["png"]) as picture:
        assert picture.size[0] == 5 * (8 * 6 + 6) + 6  # 3 lambdas + 2 sources, 6x upscaled digits
    with pytest.raises(ValueError, match="0 <= t < T = 10"):
        generation.draw_interpolations(config, model, schedule, params, out_dir=str(tmp_path), tag="x", t=10)
    with pytest.raises(ValueError, match="interpolation pictures are for images"):
        generation.draw_interpolations(swissroll.get_config(), None, None, None, out_dir=str(tmp_path), tag="x")
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").close()
    with pytest.raises(ValueError, match="cannot create the folder"):  # before the chain (it was after)
        generation.draw_interpolations(config, None, schedule, None, out_dir=a_file, tag="x")
    with pytest.raises(ValueError, match="interpolation pictures need 4000 test images"):  # no empty folder left
        generation.draw_interpolations(config, None, schedule, None, out_dir=str(tmp_path / "new"), num_pairs=2000,
                                       tag="x")
    assert not os.path.exists(tmp_path / "new")


def test_latent_sample_pictures_draw_from_frozen_latents_of_test_images(tmp_path):
    """sample.py --latent: test images 0 and 1 encoded to t = 2 and 9, three draws each, as `sample_from_latent`."""
    config, model, schedule, params = tiny_unet()
    result = generation.draw_latent_samples(config, model, schedule, params, out_dir=str(tmp_path), tag="tiny",
                                            ts=[2, 9], num_images=2, num_draws=3, seed=5, progress=False)
    saved = np.load(result["npz"])
    test_images = uint8_to_float(load_split(config.data, "test")[0][:2])
    np.testing.assert_array_equal(saved["x0"], test_images)
    for i, t in enumerate((2, 9)):
        x_t, draws = dj.sample_from_latent(denoiser_fn(model, params), schedule, test_images, t,
                                           jax.random.fold_in(jax.random.PRNGKey(5), t), 3,
                                           mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type)
        np.testing.assert_allclose(saved["x_t"][i], x_t, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(saved["samples"][i], draws, rtol=1e-5, atol=1e-5)
    assert not np.allclose(saved["samples"][1, 0], saved["samples"][1, 1], atol=0.05)  # independent draws
    assert result["class_agreement"] == {  # digits: how many draws keep their source's class
        t: pytest.approx(digits_class_agreement(saved["samples"][i], test_images)) for i, t in enumerate((2, 9))
    }
    with Image.open(result["png"]) as picture:  # 2 images x 2 steps rows; x0, x_t and 3 draws; 6x upscaled digits
        assert picture.size[1] - viz._LABEL_HEIGHT == 4 * (8 * 6 + 6) + 6
    with pytest.raises(ValueError, match=r"0 <= t < T = 10, .*got t=\[10\]"):
        generation.draw_latent_samples(config, model, schedule, params, out_dir=str(tmp_path), tag="x", ts=[10])
    with pytest.raises(ValueError, match=r"need different steps, got t=\[5, 5\]"):  # the same rows twice
        generation.draw_latent_samples(config, model, schedule, params, out_dir=str(tmp_path), tag="x", ts=[5, 5])
    # Digits at a size without metrics, and T = 3: the picture without the class agreement (it failed after drawing
    # it), and the default steps T/4 - 1, ..., T - 1 kept within [0, T) (they were -1, 0, 1, 2).
    config12 = apply_overrides(config, {"data.image_size": 12})
    small = generation.draw_latent_samples(config12, model, dj.make_schedule("linear", 3), params,
                                           out_dir=str(tmp_path), tag="d12", num_images=1, num_draws=1, progress=False)
    assert np.load(small["npz"])["t"].tolist() == [0, 1, 2] and "class_agreement" not in small
    assert np.load(small["npz"])["x0"].shape == (1, 12, 12, 1)
    with pytest.raises(ValueError, match="latent-sample pictures are for images"):
        generation.draw_latent_samples(swissroll.get_config(), None, None, None, out_dir=str(tmp_path), tag="x")
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").close()
    with pytest.raises(ValueError, match="cannot create the folder"):  # before the chains (they ran first)
        generation.draw_latent_samples(config, None, schedule, None, out_dir=a_file, tag="x")
    with pytest.raises(ValueError, match="latent-sample pictures need 4000 test images"):  # no empty folder left
        generation.draw_latent_samples(config, None, schedule, None, out_dir=str(tmp_path / "new"), num_images=4000,
                                       tag="x")
    assert not os.path.exists(tmp_path / "new")


def test_ctrl_c_stops_bits_per_dim_within_its_batch(monkeypatch):
    """Each eval batch is one 10-step chain here (two batches in all): the stop comes inside the first."""
    calls = interrupt_chains_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        tiny_unet_bpd(make_mesh(jax.devices()[:1]))
    assert 5 <= len(calls) < 10 and calls[:5] == [9, 8, 7, 6, 5]


def test_interrupted_evaluation_goes_on_from_the_batches_it_kept(monkeypatch, tmp_path, capsys):
    """train.py --mode=eval: 20 digits in 3 batches of 8, each one 10-step chain; Ctrl-C in the third batch."""
    config, model, schedule, params = tiny_unet()
    evaluate = functools.partial(run.evaluate_model, config, model, schedule, params, progress=False)
    uninterrupted = evaluate(out_dir=str(tmp_path / "once"), num_examples=20)
    out_dir = str(tmp_path / "twice")
    interrupt_chains_at_step(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        evaluate(out_dir=out_dir, num_examples=20)
    assert "interrupted: 2 finished batches kept in" in capsys.readouterr().err
    parts = Parts(os.path.join(out_dir, "eval.parts"), f"{run._eval_fingerprint(config, params, 20)}_")
    assert parts.count() == 2 and not os.path.exists(f"{out_dir}/eval.json")
    calls = interrupt_chains_at_step(monkeypatch, None)
    with parts.claimed("the first call's evaluation"):  # the same call in another process, still running
        with pytest.raises(ValueError, match=r"another process \(pid .*\) is computing this evaluation in"):
            evaluate(out_dir=out_dir, num_examples=20)
    assert calls == [] and parts.count() == 2
    resumed = evaluate(out_dir=out_dir, num_examples=20)
    assert calls == list(range(9, -1, -1))  # the third batch's chain only
    assert {**resumed, "files": None} == {**uninterrupted, "files": None}
    assert sorted(os.listdir(out_dir)) == ["eval.json", "rate_distortion.npz", "rate_distortion.png"]
    # Batches kept for other examples, parameters or settings are not reused: their digests differ.
    digest = parts.prefix[:-1]
    other_params = jax.tree.map(lambda a: a + 1e-3, params)
    fixedsmall = config.copy_and_resolve_references()
    fixedsmall.diffusion.var_type = "fixedsmall"
    others = [run._eval_fingerprint(config, params, 19), run._eval_fingerprint(config, other_params, 20),
              run._eval_fingerprint(fixedsmall, params, 20)]
    assert digest == run._eval_fingerprint(config, jax.tree.map(np.array, params), 20) and digest not in others


def test_eval_mode_uses_the_runs_own_config(killed_and_uninterrupted, tmp_path):
    """Without --config=FILE, --mode=eval reads the run's config.json (swiss roll), not the default (digits),
    also under --config.* overrides (the remedy its out-of-memory message gives); not how the run was started on
    several processes (it would wait for their coordinator), nor the eta its ddpm sampler ignored."""
    workdir = str(tmp_path / "run")
    shutil.copytree(killed_and_uninterrupted[1], workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    saved["training"].update(coordinator_address="127.0.0.1:9", num_processes=2, process_id=1, distributed=True)
    # Saved before sampling.eta with the ddpm sampler was refused (it was ignored): still read.
    assert saved["sampling"]["sampler"] == "ddpm"
    saved["sampling"]["eta"] = 0.5
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(saved, f)
    # A config file replaces config.json in any of absl's spellings (-config=FILE was ignored).
    own, file_given = (subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", "--mode=eval", *flags],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for flags in (["--config.eval.batch_size=8"], ["-config=configs/digits.py"]))
    for proc, message in ((own, "error: bits/dim is defined for 8-bit images"),
                          (file_given, "written with a different config (model.name: checkpoint mlp vs now unet;")):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in stderr and message in stderr, stderr[-3000:]


def test_sample_py_draws_from_a_finished_run(killed_and_uninterrupted, tmp_path):
    _, workdir, _ = killed_and_uninterrupted
    out_dir, respaced_dir, a_file = (str(tmp_path / name) for name in ("samples", "respaced", "a_file"))
    open(a_file, "w").close()
    ddim_run = str(tmp_path / "ddim_run")  # the run, had it sampled with 5 DDIM steps of quadratic spacing
    shutil.copytree(workdir, ddim_run)
    with open(os.path.join(ddim_run, "config.json")) as f:
        saved = json.load(f)
    saved["sampling"].update(sampler="ddim", num_steps=5, spacing="quadratic")
    with open(os.path.join(ddim_run, "config.json"), "w") as f:
        json.dump(saved, f)
    w = f"--workdir={workdir}"
    (proc, respaced, ancestral_with_eta, two_models, interpolate_with_ddim, two_pictures, bad_steps, orphan_flags,
     out_dir_is_a_file, fid_of_points, seed_too_large, png_dir_of_points, other_sampler) = sample_py(
        [w, "--out_dir=~/samples", "--num=32", "--sampler=ddim", "--steps=10", "--spacing=quadratic",
         "--trajectory", "--metrics", "--noprogress"],
        [w, f"--out_dir={respaced_dir}", "--num=8", "--steps=10", "--spacing=quadratic", "--noprogress"],
        [w, f"--out_dir={out_dir}_eta", "--eta=0.5"],
        [w, f"--pretrained={workdir}"],
        [w, "--interpolate", "--sampler=ddim", "--num=4"],
        [w, "--interpolate", "--latent"],
        [w, "--latent", "--latent_t=4,x"],
        [w, "--pairs=2", "--interpolate_t=5"],
        [w, f"--out_dir={a_file}"],
        [w, f"--out_dir={out_dir}_fid", "--fid_stats=train"],
        [w, f"--out_dir={out_dir}_seed", "--seed=4294967296"],
        [w, f"--out_dir={out_dir}_png", f"--png_dir={out_dir}_pngs"],
        [f"--workdir={ddim_run}", f"--out_dir={out_dir}_ddpm", "--sampler=ddpm", "--num=4", "--noprogress"],
        HOME=str(tmp_path),  # ~/samples is out_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampling:" not in proc.stderr and "Inception" not in proc.stderr  # no progress bars
    names = sorted(os.listdir(out_dir))
    assert any(n.startswith("samples_ddim10_quadratic_seed0") and n.endswith(".png") for n in names), names
    assert any(n.startswith("chain_ddim10_quadratic_seed0") and n.endswith(".png") for n in names), names
    npz = next(n for n in names if n.endswith(".npz"))
    assert np.load(os.path.join(out_dir, npz))["samples"].shape == (32, 2)
    assert '"swd_data"' in proc.stdout and "32 samples" in proc.stdout
    assert respaced.returncode == 0, respaced.stderr[-3000:]  # an ancestral chain of 10 steps
    assert any(n.startswith("samples_ddpm10_quadratic_seed0") for n in os.listdir(respaced_dir))
    assert ancestral_with_eta.returncode == 1
    assert "--eta sets DDIM's noise, and this run samples with ddpm: add --sampler=ddim" in ancestral_with_eta.stderr
    assert two_models.returncode == 1 and "give one of them" in two_models.stderr
    assert interpolate_with_ddim.returncode == 1, interpolate_with_ddim.stderr[-2000:]
    assert "--sampler, --num belong to sampling" in interpolate_with_ddim.stderr
    assert two_pictures.returncode == 1 and "give one of them" in two_pictures.stderr
    assert bad_steps.returncode == 1 and "--latent_t takes integer steps, got 4,x" in bad_steps.stderr
    assert orphan_flags.returncode == 1
    assert "error: --interpolate_t, --pairs belong to --interpolate, which is not given" in orphan_flags.stderr
    assert out_dir_is_a_file.returncode == 1 and "error: cannot create the folder" in out_dir_is_a_file.stderr
    assert fid_of_points.returncode == 1 and "error: FID is defined for images" in fid_of_points.stderr
    assert not os.path.exists(f"{out_dir}_fid")
    assert png_dir_of_points.returncode == 1 and "one PNG per sample is for images" in png_dir_of_points.stderr
    assert not os.path.exists(f"{out_dir}_png") and not os.path.exists(f"{out_dir}_pngs")  # made, then refused
    # Another sampler than the run's takes its own defaults: all T ancestral steps, not the run's DDIM spacing.
    assert other_sampler.returncode == 0, other_sampler.stderr[-2000:]
    assert any(n.startswith("samples_ddpm_seed0") for n in os.listdir(f"{out_dir}_ddpm"))
    assert seed_too_large.returncode == 1, seed_too_large.stderr[-2000:]  # it drew seed 0's samples
    assert "error: --seed=4294967296 must be in [0, 2^32)" in seed_too_large.stderr
    for stopped in ("fid", "eta", "seed"):  # before sampling
        assert not os.path.exists(f"{out_dir}_{stopped}")


# Each case: flags after the config file, extra environment, the message expected on stderr.
BAD_RUNS = {
    "unknown key": (["--config.training.batchsize=3"], {}, 'unknown config field batchsize.*"batch_size"'),
    "unknown key, no config file": (["--config.training.bogus=1"], {}, "error: unknown config field .*bogus"),
    "unknown group": (["--config.trainin.lr=0.1"], {}, 'unknown config field trainin Did you mean "training"'),
    "negative eval examples": (["--mode=eval", "--eval_examples=-3"], {}, "--eval_examples=-3: -3 is not a "
                                                                           "non-negative integer"),
    "wrong type": (["--config.training.batch_size=abc"], {}, "batch_size=abc: invalid literal for int"),
    "batch not divisible by devices": (
        ["--config.training.batch_size=12"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        "batch_size=12 is not divisible by the 8 devices; use a multiple of 8",
    ),
    "impossible U-Net resolution": (
        ["--config=configs/digits.py", "--config.data.image_size=10", "--config.model.ch_mult=(1,2,2)"], {},
        r"image size 10x10 must be divisible by 2\*\*\(len\(ch_mult\)-1\) = 4",
    ),
    "released weights in train mode": (["--pretrained=weights"], {}, "--pretrained weights are evaluated with "
                                                                       "--mode=eval"),
    "eval flags in train mode": (["--eval_split=train", "--eval_examples=5"], {},
                                 r"--eval_examples, --eval_split belong to --mode=eval"),
    "config file without get_config": (["--config=configs/__init__.py"], {},
                                       r"the --config file defines no get_config\(\)"),
    "missing released weights": (["--mode=eval", "--pretrained=no/such/ddpm-cifar10-32"], {},
                                 "no/such/ddpm-cifar10-32: no such diffusers model directory"),
    # 2**46 weights in one layer, 256 TiB: more than a 47-bit address space, whatever the overcommit policy.
    "out of memory": (["--config.model.mlp_hidden=8388608"], {},
                      r"error: out of memory \(.*Out of memory allocating 281474976710656 bytes\)\. "
                      r"--config.training.microbatches=2"),
    "missing config file": (["--config=configs/no_such_config.py"], {},
                            r"(?s)error: .*configs/no_such_config.py.*No such file or directory"),
    # Found after the workdir is taken: no empty checkpoints folder is left (tfds cannot make a folder in /dev/null).
    "data that cannot be had": (["--config=configs/mnist.py", "--config.data.data_dir=/dev/null/tfds"], {},
                                r"error: data set 'mnist' \(tfds 'mnist'\) is not prepared in /dev/null/tfds"),
    "workdir is a file": (["--workdir=/dev/null"], {}, r"error: cannot create the folder /dev/null: .*File exists"),
    "overrides without their config file": (
        ["--mode=eval", "--pretrained=weights", "--config.data.data_dir=/data"], {},
        r"with --pretrained, --config.\* overrides need the config file too",
    ),
    "overrides without their config file, one dash": (  # absl's other spelling was not seen
        ["--mode=eval", "--pretrained=weights", "-config.data.data_dir=/data"], {},
        r"with --pretrained, --config.\* overrides need the config file too",
    ),
}  # the other invalid values are checked through validate_config in test_training.py


def test_bad_flags_and_configs_stop_before_any_work_with_one_message(tmp_path):
    procs = {}
    for name, (flags, extra_env, _) in BAD_RUNS.items():
        workdir = tmp_path / name.replace(" ", "_").replace("/", "_")
        no_file = name.endswith("no config file") or any(f.startswith("--pretrained") for f in flags)
        default = [] if no_file else ["--config=configs/swissroll.py"]
        config = [f for f in flags if f.startswith("--config=")] or default
        rest = [f for f in flags if not f.startswith("--config=")]
        command = [sys.executable, os.path.join(REPO, "train.py"), *config, f"--workdir={workdir}", *rest]
        procs[name] = (workdir, subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ))
    no_run = tmp_path / "no_run"
    sample = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={no_run}"], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for name, (workdir, proc) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, name
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"
        assert re.search(BAD_RUNS[name][2], stderr), f"{name}:\n{stderr}"
        if name == "out of memory":  # found when the first step runs
            assert finished_checkpoints(workdir) == []
        else:
            assert not (workdir / "checkpoints").exists(), name
    _, stderr = sample.communicate(timeout=120)
    assert sample.returncode != 0 and "Traceback" not in stderr
    assert "config.json not found: is" in stderr and not no_run.exists()
