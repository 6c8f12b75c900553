"""Draw samples from a trained run: `python sample.py [--workdir=runs/digits] [--sampler=ddim --steps=50]`.

Writes a PNG grid (a scatter plot beside the data for 2-D sets) and an .npz into WORKDIR/samples;
--trajectory adds pictures of the reverse chain (x_t and the predicted x_0); --metrics prints the sample-quality
metrics with their data-vs-data baselines. The run's config is read from WORKDIR/config.json.
"""

import json

from absl import app, flags, logging

from ddpm_jax import run

flags.DEFINE_string("workdir", "runs/digits", "Workdir of a training run (its config.json and checkpoints).")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler (default: the run's config.sampling.sampler).")
flags.DEFINE_integer("steps", None, "DDIM steps.")
flags.DEFINE_float("eta", None, "DDIM eta (0: deterministic; 1: ancestral-like).")
flags.DEFINE_integer("num", None, "Number of samples (default: config.sampling.num_samples).")
flags.DEFINE_integer("seed", 0, "Random seed of the chain.")
flags.DEFINE_bool("ema", True, "Use the EMA parameters.")
flags.DEFINE_bool("trajectory", False, "Also write pictures of the reverse chain.")
flags.DEFINE_bool("metrics", False, "Print sample-quality metrics beside the data's own.")
flags.DEFINE_string("out_dir", None, "Output folder (default: WORKDIR/samples).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        config = run.load_config(FLAGS.workdir)
        overrides = {"sampler": FLAGS.sampler, "num_steps": FLAGS.steps, "eta": FLAGS.eta, "num_samples": FLAGS.num}
        for name, value in overrides.items():
            if value is not None:
                config.sampling[name] = value
        result = run.generate(
            config, FLAGS.workdir, out_dir=FLAGS.out_dir or f"{FLAGS.workdir}/samples", ema=FLAGS.ema,
            trajectory=FLAGS.trajectory, with_metrics=FLAGS.metrics, seed=FLAGS.seed,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"{config.sampling.num_samples} samples from step {result['step']} in {result['seconds']:.1f} s")
    for key in ("png", "npz", "trajectory_png", "trajectory_gif"):
        if key in result:
            print(f"  {key}: {result[key]}")
    if "metrics" in result:
        print(json.dumps(result["metrics"], indent=2))


if __name__ == "__main__":
    app.run(main)
