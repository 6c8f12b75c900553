"""The cost of FID: the Inception-v3 forward pass, the statistics of its features, and the Fréchet distance.

    python benchmarks/fid.py                       # CPU: 50 images per call, 8 rounds; 5,000 features
    python benchmarks/fid.py --batch 500 --rounds 10 --out-dir $OUT   # a GPU
    python benchmarks/fid.py --parts stats          # only the statistics of 50,000 features

Inception: `ddpm_jax.metrics.inception_forward` (on XLA:CPU its convolutions run on Eigen) against the same
function jitted with XLA's default options (on jaxlib 0.10's CPU: YNNPACK convolutions), timed alternately
in one process, on random weights and 8x8 grey images resized to 299x299 as the digits samples are.
Fréchet distance: the library's (symmetric square roots and the singular values of their product) against
pytorch-fid's route, `scipy.linalg.sqrtm` of the product of the covariances, on the statistics of random features.
Statistics: mean and covariance of 50,000 random 2048-d feature vectors arriving in batches of 100, as the
Inception pass delivers them: all rows kept and `gaussian_stats` (np.cov) at the end, as compute_stats did
before, against `RunningGaussianStats`, which merges each batch; time, and the peak of memory allocated
(tracemalloc, in a separate untimed pass; the batches themselves are drawn inside both arms).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from ddpm_jax.metrics import RunningGaussianStats, frechet_distance, gaussian_stats, inception  # noqa: E402


def sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula: Tr of the general matrix square root of S1 S2 (its eps retry left out)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_arms(batch: int, rounds: int) -> dict:
    variables = jax.jit(inception.FIDInceptionV3().init)(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    images = np.random.default_rng(0).uniform(-1, 1, (batch, 8, 8, 1)).astype(np.float32)
    default = jax.jit(functools.partial(inception._forward, resize=True, quantize=True))
    arms = {"xla_default": default, "library": inception.inception_forward}
    first_call, times = {}, {name: [] for name in arms}
    for name, fn in arms.items():
        start = time.perf_counter()
        common.block(fn(variables, images))
        first_call[name] = time.perf_counter() - start
        common.block(fn(variables, images))  # warm-up
    for r in range(rounds):
        for name in arms if r % 2 == 0 else list(arms)[::-1]:
            start = time.perf_counter()
            common.block(arms[name](variables, images))
            times[name].append(time.perf_counter() - start)
    pools = {name: np.asarray(fn(variables, images)["pool"], np.float64) for name, fn in arms.items()}
    difference = np.abs(pools["library"] - pools["xla_default"]).max() / np.abs(pools["xla_default"]).max()
    paired = [a / b for a, b in zip(times["xla_default"], times["library"], strict=True)]
    return {
        "batch": batch, "rounds": rounds,
        **{name: {"first_call_s": first_call[name], **common.summarize(times[name])} for name in arms},
        "speedup": statistics.median(times["xla_default"]) / statistics.median(times["library"]),
        "paired_speedup": statistics.median(paired),
        "max_relative_difference_of_pool_features": float(difference),
    }


def frechet_arms(num_features: int, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    stats = [gaussian_stats(rng.normal(shift, scale, (num_features, 2048))) for shift, scale in ((0, 1), (0.1, 1.1))]
    arms = {"sqrtm": sqrtm_frechet, "library": frechet_distance}
    out, values = {"num_features": num_features}, {}
    for name, fn in arms.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            values[name] = fn(*stats[0], *stats[1])
            times.append(time.perf_counter() - start)
        out[name] = {**common.summarize(times), "value": values[name]}
    out["speedup"] = out["sqrtm"]["median_s"] / out["library"]["median_s"]
    out["relative_difference"] = abs(values["library"] - values["sqrtm"]) / abs(values["sqrtm"])
    return out


def _batches(num_features: int, batch: int):
    rng = np.random.default_rng(2)
    for start in range(0, num_features, batch):
        yield rng.normal(0.3, 0.2, (min(batch, num_features - start), 2048))


def _all_rows_stats(num_features: int, batch: int):
    return gaussian_stats(np.concatenate(list(_batches(num_features, batch))))


def _running_stats(num_features: int, batch: int):
    running = RunningGaussianStats()
    for rows in _batches(num_features, batch):
        running.update(rows)
    return running.stats()


def stats_arms(num_features: int, batch: int, repeats: int) -> dict:
    arms = {"all_rows": _all_rows_stats, "running": _running_stats}
    out, values = {"num_features": num_features, "batch": batch}, {}
    for name, fn in arms.items():
        tracemalloc.start()
        values[name] = fn(num_features, batch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(num_features, batch)
            times.append(time.perf_counter() - start)
        out[name] = {**common.summarize(times), "peak_allocated_mb": peak / 2**20}
    out["speedup"] = out["all_rows"]["median_s"] / out["running"]["median_s"]
    out["memory_ratio"] = out["all_rows"]["peak_allocated_mb"] / out["running"]["peak_allocated_mb"]
    (mu1, sigma1), (mu2, sigma2) = values["all_rows"], values["running"]
    out["max_relative_difference"] = float(max(np.abs(mu1 - mu2).max() / np.abs(mu1).max(),
                                               np.abs(sigma1 - sigma2).max() / np.abs(sigma1).max()))
    return out


PARTS = ("inception", "stats", "frechet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50, help="images per Inception call")
    parser.add_argument("--rounds", type=int, default=8, help="timed calls of each Inception arm")
    parser.add_argument("--features", type=int, default=5000, help="feature vectors behind each statistic")
    parser.add_argument("--frechet-repeats", type=int, default=3)
    parser.add_argument("--stats-features", type=int, default=50_000, help="feature vectors for the statistics")
    parser.add_argument("--stats-repeats", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts takes a comma-separated subset of {PARTS}, got {args.parts!r}")

    result, rows = {}, []
    json_name = "fid" if set(parts) == set(PARTS) else "_".join(["fid", *parts])
    if "inception" in parts:
        inc = result["inception"] = inception_arms(args.batch, args.rounds)
        common.write_json(json_name, result, args.out_dir, complete=False)
        rows += [{"what": f"Inception forward, {args.batch} images", "arm": name,
                  "median [min-max]": common.fmt_time(inc[name]),
                  "first call (compile)": f"{inc[name]['first_call_s']:.1f} s"} for name in ("xla_default", "library")]
    if "stats" in parts:
        st = result["stats"] = stats_arms(args.stats_features, 100, args.stats_repeats)
        common.write_json(json_name, result, args.out_dir, complete=False)
        rows += [{"what": f"statistics of {args.stats_features} 2048-d features", "arm": name,
                  "median [min-max]": common.fmt_time(st[name]),
                  "peak allocated": f"{st[name]['peak_allocated_mb']:.0f} MB"} for name in ("all_rows", "running")]
    if "frechet" in parts:
        fr = result["frechet"] = frechet_arms(args.features, args.frechet_repeats)
        rows += [{"what": f"Fréchet distance, 2048-d, {args.features} features", "arm": name,
                  "median [min-max]": common.fmt_time(fr[name])} for name in ("sqrtm", "library")]
    print(common.format_table(rows, ["what", "arm", "median [min-max]", "first call (compile)", "peak allocated"]))
    if "inception" in parts:
        print(f"Inception: library {inc['speedup']:.2f}x XLA's default (paired median {inc['paired_speedup']:.2f}x); "
              f"pool features differ by {inc['max_relative_difference_of_pool_features']:.1e} (relative to the "
              "largest)")
    if "stats" in parts:
        print(f"Statistics: running {st['speedup']:.2f}x all rows in time, {st['memory_ratio']:.1f}x less memory "
              f"at its peak; they differ by {st['max_relative_difference']:.1e} (relative to the largest)")
    if "frechet" in parts:
        print(f"Fréchet: library {fr['speedup']:.2f}x sqrtm; values differ by {fr['relative_difference']:.1e} relative")
    print("wrote", common.write_json(json_name, result, args.out_dir))


if __name__ == "__main__":
    main()
