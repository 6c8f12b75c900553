"""Draw samples: `python sample.py [--workdir=runs/digits] [--sampler=ddim --steps=50] [--trajectory] [--metrics]`.

Reads the run's config from WORKDIR/config.json and its latest checkpoint, and writes a PNG grid (a scatter plot
beside the data for 2-D sets) and an .npz into WORKDIR/samples; --trajectory adds pictures of the reverse chain
(x_t and the predicted x_0); --metrics prints sample-quality metrics beside their data-vs-data baselines;
--fid_stats adds FID and Inception Score (e.g. `--num=50000 --fid_stats=train`); --interpolate draws
interpolations between test images instead (the paper's Fig. 8), --latent samples from frozen latents of test
images (Fig. 7).
Many samples (e.g. `--num=50000` for FID) are drawn in chains of --batch_size, each kept on disk as it ends: after
a Ctrl-C or a crash the same command goes on from the chains kept.
`--pretrained=DIR` samples from a diffusers UNet2DModel folder instead (the DDPM authors' released weights,
e.g. a local copy of google/ddpm-cifar10-32) with the settings of configs/cifar10.py, except the diffusion process
that a scheduler_config.json beside the weights describes.
"""

import json
import os

from absl import app, flags, logging

from ddpm_jax import generation, run
from ddpm_jax.config import validate_config
from ddpm_jax.data import show_tfds_progress
from ddpm_jax.interrupts import sigterm_interrupts
from ddpm_jax.parts import writable_folder

flags.DEFINE_string("workdir", "runs/digits", "Workdir of a training run (its config.json and checkpoints).")
flags.DEFINE_string("pretrained", None, "A diffusers UNet2DModel folder (config.json + safetensors) to sample from.")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler (default: the run's config.sampling.sampler).")
flags.DEFINE_integer("steps", None, "Steps of the chain (default: the run's sampling.num_steps, where 0 means all T "
                     "for ddpm and 50 for ddim; with another --sampler than the run's, that sampler's own default); "
                     "fewer than T for ddpm: a respaced ancestral chain (Nichol & Dhariwal 2021).")
flags.DEFINE_float("eta", None, "DDIM eta (0: deterministic; 1: ancestral-like); in the file names when not 0.")
flags.DEFINE_integer("num", None, "Number of samples (default: config.sampling.num_samples).")
flags.DEFINE_integer("batch_size", None, "Samples per chain, split over the devices (default: sampling.batch_size).")
flags.DEFINE_enum("spacing", None, ["linear", "quadratic"],
                  "The --steps of a shorter chain: evenly spaced, or denser near t = 0 (Song et al. 2021, App. D.2).")
flags.DEFINE_bool("progress", True, "Show progress bars (--noprogress for logs).")
flags.DEFINE_integer("seed", 0, "Random seed of the chains.")
flags.DEFINE_bool("ema", True, "Use the EMA parameters (false: the raw ones, files named _raw).")
flags.DEFINE_bool("trajectory", False, "Also write pictures of the reverse chain: the first chain of "
                  "--batch_size samples, about ten records (sampling.trajectory_every), each after its step.")
flags.DEFINE_bool("metrics", False, "Print sample-quality metrics beside the data's own.")
flags.DEFINE_bool("interpolate", False, "Instead of sampling, interpolate between pairs of test images through the "
                  "latent x_t (Ho et al. 2020, Fig. 8): a PNG with a row per pair.")
flags.DEFINE_integer("interpolate_t", None, "--interpolate: the step to encode to, in [0, T-1] (default T/2 - 1).")
flags.DEFINE_integer("pairs", 8, "--interpolate: the number of pairs of test images.")
flags.DEFINE_bool("latent", False, "Instead of sampling, encode test images once to x_t and draw x_0 ~ p(x_0 | x_t) "
                  "several times from each frozen latent (Ho et al. 2020, Fig. 7): a PNG with a row per image and t.")
flags.DEFINE_list("latent_t", None, "--latent: the steps to encode to, in [0, T-1] (default T/4 - 1, T/2 - 1, "
                  "3T/4 - 1, T - 1).")
flags.DEFINE_integer("latent_images", 4, "--latent: the number of test images.")
flags.DEFINE_integer("latent_draws", 6, "--latent: the samples drawn from each latent.")
flags.DEFINE_string("fid_stats", None, "FID and Inception Score against a pytorch-fid statistics .npz, or 'train' / "
                    "'test': the run's own data split (statistics computed once, kept in the output folder).")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception .pth (or an .npz of it) for --fid_stats "
                    "(default: downloaded once into ~/.cache/ddpm_jax).")
flags.DEFINE_string("png_dir", None, "Also write each sample as DIR/000000.png, ... (for FID tools that read folders).")
flags.DEFINE_string("out_dir", None, "Output folder (default: WORKDIR/samples, or ./samples with --pretrained).")
FLAGS = flags.FLAGS


def _load():
    """(config, model, schedule, params, tag) from a checkpoint or from released weights."""
    if FLAGS.pretrained:
        from configs.cifar10 import get_config

        if not FLAGS.ema:
            raise ValueError("--ema=false selects a checkpoint's raw parameters; --pretrained weights have one set")
        if FLAGS["workdir"].present:
            raise ValueError("--workdir and --pretrained each name a model to sample from: give one of them")
        config = get_config()
        # Interpolations, latents and a split's FID statistics read CIFAR-10 images: never upsampled to the weights'.
        reads_data = FLAGS.interpolate or FLAGS.latent or FLAGS.fid_stats in ("train", "test")
        model, schedule, params = run.load_pretrained(FLAGS.pretrained, config, evaluate=reads_data,
                                                      process_from_weights=True)
        return config, model, schedule, params, run.pretrained_name(FLAGS.pretrained)
    from configs.base import get_base_config

    config = run.load_config(FLAGS.workdir, base=get_base_config())
    model, schedule, params, step = run.restore_params(config, FLAGS.workdir, ema=FLAGS.ema)
    return config, model, schedule, params, f"step{step}" + ("" if FLAGS.ema else "_raw")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    if not FLAGS.progress:
        show_tfds_progress(False)  # its bars while it prepares a data set on first use
    for name in ("workdir", "pretrained", "fid_stats", "inception_weights", "png_dir", "out_dir"):
        if FLAGS[name].value:  # the shell expands ~ at a word's start only, not in --workdir=~/x
            FLAGS[name].value = os.path.expanduser(FLAGS[name].value)
    sigterm_interrupts()  # chains finished so far are kept, as on Ctrl-C
    try:
        if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("JAX_NUM_PROCESSES") or 1) > 1:
            raise ValueError("sample.py runs as one process (on all its devices); start it once, without "
                             "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES")
        if not 0 <= FLAGS.seed < 2**32:
            raise ValueError(f"--seed={FLAGS.seed} must be in [0, 2^32): JAX keys hold 32 bits, so 2^32 would repeat "
                             "seed 0")
        if FLAGS.interpolate and FLAGS.latent:
            raise ValueError("--interpolate and --latent each draw their own picture: give one of them")
        if FLAGS.interpolate or FLAGS.latent:
            sampling_flags = ("sampler", "steps", "eta", "spacing", "num", "batch_size", "trajectory", "metrics",
                              "fid_stats", "inception_weights", "png_dir")
            given = [f"--{name}" for name in sampling_flags if FLAGS[name].present]
            if given:
                mode = "--interpolate" if FLAGS.interpolate else "--latent"
                raise ValueError(f"{mode} decodes test images with the ancestral chain; {', '.join(given)} "
                                 f"belong{'s' if len(given) == 1 else ''} to sampling")
        # A flag of a mode not asked for would be ignored without a word.
        for mode, mode_flags in (("interpolate", ("interpolate_t", "pairs")),
                                 ("latent", ("latent_t", "latent_images", "latent_draws")),
                                 ("fid_stats", ("inception_weights",))):
            given = [f"--{name}" for name in mode_flags if FLAGS[name].present]
            if given and not FLAGS[mode].value:
                raise ValueError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to --{mode}, which is "
                                 "not given")
        config, model, schedule, params, tag = _load()
        overrides = {"sampler": FLAGS.sampler, "num_steps": FLAGS.steps, "eta": FLAGS.eta, "spacing": FLAGS.spacing,
                     "num_samples": FLAGS.num, "batch_size": FLAGS.batch_size}
        if FLAGS.sampler not in (None, config.sampling.sampler):  # another sampler than the run's: its defaults
            if FLAGS.steps is None:
                config.sampling.num_steps = 0
            if FLAGS.eta is None:
                config.sampling.eta = 0.0
            if FLAGS.spacing is None:
                config.sampling.spacing = "linear"
        for name, value in overrides.items():
            if value is not None:
                config.sampling[name] = value
        if config.sampling.sampler == "ddpm" and FLAGS.eta is not None:
            raise ValueError("--eta sets DDIM's noise, and this run samples with ddpm: add --sampler=ddim")
        validate_config(config)
        out_dir = FLAGS.out_dir or ("samples" if FLAGS.pretrained else os.path.join(FLAGS.workdir, "samples"))
        if FLAGS.interpolate:
            result = generation.draw_interpolations(
                config, model, schedule, params, out_dir=out_dir, tag=tag, t=FLAGS.interpolate_t,
                num_pairs=FLAGS.pairs, seed=FLAGS.seed, progress=FLAGS.progress,
            )
            print(f"interpolations of {FLAGS.pairs} pair{'s' if FLAGS.pairs != 1 else ''} of test images ({tag})")
            for key in ("png", "npz"):
                print(f"  {key}: {result[key]}")
            return
        if FLAGS.latent:
            try:
                ts = None if FLAGS.latent_t is None else [int(t) for t in FLAGS.latent_t]
            except ValueError as err:
                raise ValueError(f"--latent_t takes integer steps, got {','.join(FLAGS.latent_t)}") from err
            result = generation.draw_latent_samples(
                config, model, schedule, params, out_dir=out_dir, tag=tag, ts=ts, num_images=FLAGS.latent_images,
                num_draws=FLAGS.latent_draws, seed=FLAGS.seed, progress=FLAGS.progress,
            )
            print(f"{FLAGS.latent_draws} samples from the latents of {FLAGS.latent_images} test images ({tag})")
            for key in ("png", "npz"):
                print(f"  {key}: {result[key]}")
            for t, agreement in result.get("class_agreement", {}).items():
                print(f"  t={t}: the digits classifier puts {agreement:.1%} of the samples in their source's class")
            return
        # Before the FID reference (Inception passes over a whole split) and the folders: a --num it cannot score.
        generation.check_generate(config, with_metrics=FLAGS.metrics, with_fid=bool(FLAGS.fid_stats),
                                  png_dir=FLAGS.png_dir)
        fid_reference = None
        if FLAGS.fid_stats:  # before sampling: a missing file or weights should not wait for 50,000 samples
            fid_reference = generation.load_fid_reference(
                config, FLAGS.fid_stats, inception_weights=FLAGS.inception_weights, out_dir=out_dir,
                progress=FLAGS.progress,
            )
        for folder in (out_dir, FLAGS.png_dir):  # now, not after hours of sampling
            if folder:
                writable_folder(folder)
        result = generation.generate(
            config, model, schedule, params, out_dir=out_dir, tag=tag, trajectory=FLAGS.trajectory,
            with_metrics=FLAGS.metrics, fid_reference=fid_reference, png_dir=FLAGS.png_dir, seed=FLAGS.seed,
            progress=FLAGS.progress,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    except KeyboardInterrupt:  # generation.generate said what it kept
        raise SystemExit(130) from None
    except Exception as err:
        message = run.out_of_memory_message(
            err, "A smaller --batch_size (samples per chain) needs less; the chains kept so far are reused by a "
            "rerun with the same --batch_size only."
        )
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from err
    drawn = "" if result["chains_drawn"] == result["num_chains"] else f"{result['chains_drawn']} of "
    chains = "chain" if result["num_chains"] == 1 else "chains"
    samples = "sample" if config.sampling.num_samples == 1 else "samples"
    print(f"{config.sampling.num_samples} {samples} ({tag}); {drawn}{result['num_chains']} {chains} drawn in "
          f"{result['seconds']:.1f} s")
    for key in ("png", "npz", "trajectory_png", "trajectory_gif", "png_dir"):
        if key in result:
            print(f"  {key}: {result[key]}")
    if "metrics" in result:
        if result["metrics"]:
            print(json.dumps(run.strict_json(result["metrics"]), indent=2))
        else:
            print(f"--metrics: no built-in metric for {config.data.dataset} at {config.data.image_size}x"
                  f"{config.data.image_size} (2-D sets and digits at multiples of 8 have one); --fid_stats=train "
                  "adds FID and Inception Score")


if __name__ == "__main__":
    app.run(main)
