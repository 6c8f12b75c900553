"""Train a DDPM: `python train.py [--config=configs/NAME.py] [--workdir=DIR] [--config.training.batch_size=64]`.

With no flags it trains the 8x8 digits model (configs/digits.py, no download) into runs/digits, resuming from
the latest checkpoint there. `--mode=eval` computes the test-set bits/dim and rate-distortion curve of the latest
checkpoint in --workdir, under the run's own config (its config.json) with any --config.* overrides on top (a
--config=FILE replaces it); with `--pretrained=DIR` those of released weights (a diffusers UNet2DModel folder,
e.g. google/ddpm-cifar10-32) under configs/cifar10.py or the --config given, written to --workdir (default
runs/pretrained_<DIR's name>_<digest of its absolute path>).
"""

import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from configs.base import get_base_config
from ddpm_jax import run
from ddpm_jax.config import validate_config
from ddpm_jax.data import show_tfds_progress
from ddpm_jax.interrupts import say, sigterm_interrupts


def unknown_field(err: Exception) -> SystemExit:
    """ml_collections' error for a --config.* field the config does not have, as one line."""
    if isinstance(err, AttributeError) and err.name == "get_config":  # raised by ml_collections' loader
        return SystemExit("error: the --config file defines no get_config() returning its ConfigDict")
    reason = " ".join(str(err).encode().decode("unicode_escape").replace("'", "").split())
    return SystemExit(f"error: unknown config field {reason}")


_HERE = os.path.dirname(os.path.abspath(__file__))
try:  # without --config=FILE the overrides are read here, on the default config
    config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "digits.py"), "Experiment config file.", lock_config=True
    )
except (AttributeError, KeyError) as err:
    raise unknown_field(err) from None
flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here (default: runs/<config name>).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (or resume), or eval: test bits/dim of a checkpoint.")
flags.DEFINE_integer("eval_examples", 0, "eval mode: the first N test images (0: the whole test split).",
                     lower_bound=0)
flags.DEFINE_enum("eval_split", None, ["train", "test"], "eval mode: the split (default: the config's eval.split, "
                  "test); train writes eval_train.json and rate_distortion_train.*.")
flags.DEFINE_string("pretrained", None, "eval mode: evaluate a diffusers UNet2DModel folder (the DDPM authors' "
                    "released weights) instead of a checkpoint; default config configs/cifar10.py.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def default_workdir() -> str:
    if FLAGS.pretrained:
        return os.path.join("runs", run.pretrained_name(FLAGS.pretrained))
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    return os.path.join("runs", name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if not FLAGS.progress:
        show_tfds_progress(False)  # its bars while it prepares a data set on first use
    for name in ("workdir", "pretrained"):  # the shell expands ~ at a word's start only, not in --workdir=~/x
        if FLAGS[name].value:
            FLAGS[name].value = os.path.expanduser(FLAGS[name].value)
    workdir = FLAGS.workdir or default_workdir()
    try:
        _run_with_messages(workdir)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            _exit_now_if_distributed(exit_.code)
        raise
    except BaseException:
        _exit_now_if_distributed(traceback.format_exc())
        raise


def _exit_now_if_distributed(code) -> None:
    """In a multi-process run, end this process now, with its message (``code``: a string, or 130): a normal exit
    waits in JAX's shutdown barrier for processes that may be waiting for this one in a collective (5 minutes,
    then SIGABRT). Its checkpoint, if any, has been written by then."""
    if jax.distributed.is_initialized():
        if isinstance(code, str):
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def _run_with_messages(workdir: str) -> None:
    try:
        _run(workdir)
    except (ValueError, FloatingPointError, OSError) as err:
        # config, data and checkpoint problems; a diverged run; a file that cannot be read or written (named in err)
        raise SystemExit(f"error: {err}") from err
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the checkpoint was saved; rerun the same command to resume
    except Exception as err:
        remedy = (OUT_OF_MEMORY_TRAIN if FLAGS.mode == "train" else
                  "A smaller --config.eval.batch_size needs less (the same bound, estimated with other noise).")
        message = run.out_of_memory_message(err, remedy)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from err


OUT_OF_MEMORY_TRAIN = (
    "--config.training.microbatches=2 (or 4) computes each step in parts with the same update and about 1/2 (1/4) "
    "of the activations; --config.model.dtype=bfloat16 computes in 2-byte floats; a smaller "
    "--config.training.batch_size changes the run. Rerunning with the same --workdir resumes from its last checkpoint."
)


def _run(workdir: str) -> None:
    sigterm_interrupts()  # a scheduler's pre-emption saves a checkpoint like Ctrl-C does
    if FLAGS.mode == "train":
        if FLAGS.pretrained:
            raise ValueError("--pretrained weights are evaluated with --mode=eval; training starts from scratch")
        given = [f"--{name}" for name in ("eval_examples", "eval_split") if FLAGS[name].present]
        if given:
            raise ValueError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to --mode=eval (training "
                             "evaluates eval.num_bpd_examples of eval.split)")
        run.train_and_evaluate(FLAGS.config, workdir, progress=FLAGS.progress)
        say(f"done: checkpoint and samples.png in {workdir}")
    else:  # on Ctrl-C, run.evaluate_model says which batches it kept for the next run
        config = pretrained_config() if FLAGS.pretrained else eval_config(workdir)
        if FLAGS.eval_split:
            config.eval.split = FLAGS.eval_split
        run.maybe_initialize_distributed(config)  # each process then evaluates its own rows of every batch
        if FLAGS.pretrained:
            model, schedule, params = run.load_pretrained(FLAGS.pretrained, config, evaluate=True)
            validate_config(config)
            result = run.evaluate_model(config, model, schedule, params, out_dir=workdir,
                                        num_examples=FLAGS.eval_examples or None, progress=FLAGS.progress)
        else:
            result = run.evaluate_checkpoint(config, workdir, num_examples=FLAGS.eval_examples or None,
                                             progress=FLAGS.progress)
        files = result["files"]
        say(f"{result['split']} bits/dim: {result['bpd']:.4f} over {result['bpd_examples']} images "
            f"(prior {result['bpd_prior']:.2e}, decoder L_0 {result['bpd_decoder']:.4f}) -> {files['json']}")
        last = result["rate_distortion"][0]
        say(f"after all {last['reverse_step']} reverse steps: rate {last['rate_bpd']:.4f} bits/dim, distortion "
            f"RMSE {last['distortion_rmse']:.3f} on [0, 255] -> {files['png']}")


def config_file_given() -> bool:
    """Whether a --config=FILE was given, in any of absl's spellings (-config, --flagfile)."""
    return bool(FLAGS["config"].present)


def eval_config(workdir: str):
    """--mode=eval evaluates the run in ``workdir`` under its own config.json with the --config.* overrides on top,
    or under a --config=FILE given (checked against config.json when the checkpoint is restored)."""
    if config_file_given() or not os.path.exists(os.path.join(workdir, "config.json")):
        return FLAGS.config
    base = get_base_config()
    config = run.load_config(workdir, base=base)
    for field in ("distributed", "coordinator_address", "num_processes", "process_id"):  # how training was started
        config.training[field] = base.training[field]
    config.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    return config


def pretrained_config():
    """--pretrained: configs/cifar10.py (the paper's diffusion settings) unless a --config file is given."""
    if config_file_given():
        return FLAGS.config
    if config_flags.get_override_values(FLAGS["config"]):  # they were applied to the default digits config
        raise ValueError("with --pretrained, --config.* overrides need the config file too, e.g. "
                         "--config=configs/cifar10.py --config.data.data_dir=...")
    from configs.cifar10 import get_config

    return get_config()


def parse_flags(argv):
    """absl's flag parsing, with an unknown --config.* field reported in one line instead of a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:  # an unknown field, or group, of the --config=FILE given
        raise unknown_field(err) from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
