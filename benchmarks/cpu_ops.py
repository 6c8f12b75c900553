"""Where XLA:CPU time goes: forward+backward of the U-Net's layers at the digits and CIFAR-10 shapes, JAX
against PyTorch; 3x3 convolution formulations (lax.conv, im2col, 9 taps, 3 row taps); GroupNorm in flax's
formulation against a reshape + mean/var one and the library's (per-channel sums).

    python benchmarks/cpu_ops.py                                  # digits shapes, batch 128, all ops
    python benchmarks/cpu_ops.py --shapes cifar10 --batch 8 --ops conv
    python benchmarks/cpu_ops.py --step-ab train --shapes cifar10   # whole step: default vs Eigen convolutions
    python benchmarks/cpu_ops.py --step-ab sample                   # one ancestral sampling step, the same
    python benchmarks/cpu_ops.py --step-ab sample --compare norm --vs-torch --tag norm  # flax's vs our GroupNorm
    python benchmarks/cpu_ops.py --step-ab train --compare steps --steps-per-call 10 --vs-torch  # 1 vs 10 per call
    python benchmarks/cpu_ops.py --step-ab train --shapes cifar10 --compare update --vs-torch  # optimizer update
    taskset -c 0 python benchmarks/cpu_ops.py --step-ab train --vs-torch --tag 1core  # one core for both
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \\
        python benchmarks/cpu_ops.py --ops conv --tag eigenconv   # XLA's convolutions on Eigen, not YNNPACK

Each op is timed as value_and_grad of sum(op(x)^2)/2 with respect to its parameters and input (JAX, jitted)
and as loss.backward() of the same loss (torch eager). Each JAX conv variant's forward and gradients are
checked against lax.conv's before timing (max relative error, recorded). Writes
results/cpu_ops[_<tag>]_<shapes>_cpu.json. XLA_FLAGS must put `--xla_...` flags before any bare
`name=value` token: XLA's parser ignores everything after one. `--xla_cpu_multi_thread_eigen=false` does not
make XLA single-threaded (its executor still runs independent ops on both cores; --step-ab records the cores
busy): pin the process with taskset to compare one core with torch's one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from ddpm_jax.models.conv import convolutions_in_ynn_fusions, cpu_conv_compiler_options  # noqa: E402
from ddpm_jax.models.layers import denoiser_fn, group_norm  # noqa: E402

# (H, C) of each level, for GroupNorm and swish.
LEVELS = {
    "digits": [(8, 32), (4, 64)],  # configs/digits.py: ch 32, ch_mult (1, 2), 8x8 images
    "cifar10": [(32, 128), (16, 256), (8, 256)],
}
# (H, Cin, Cout) of the U-Net's 3x3 convolutions: the level widths, plus (digits) the 8x8 Upsample conv at 64
# channels and the first conv of an up block fed a 96-channel concatenation.
CONVS = {
    "digits": [(8, 32, 32), (4, 64, 64), (8, 64, 64), (8, 96, 32)],
    "cifar10": [(32, 128, 128), (16, 256, 256), (8, 256, 256)],
}
DEFAULT_GROUPS = {"digits": 8, "cifar10": 32}


def conv_xla(x, kernel):
    """lax.conv_general_dilated, stride 1, SAME, NHWC/HWIO: what flax nn.Conv runs."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted(x):
    """The 9 shifted views x_pad[:, i:i+H, j:j+W, :] of the 1-padded input, i (rows) outer, j inner."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def conv_im2col(x, kernel):
    """All 9 shifted views concatenated on channels, then one [B*H*W, 9*Cin] @ [9*Cin, Cout] dot."""
    b, h, w, c = x.shape
    patches = jnp.concatenate(_shifted(x), axis=-1).reshape(b * h * w, 9 * c)
    return (patches @ kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)


def conv_taps9(x, kernel):
    """Sum of 9 [B*H*W, Cin] @ [Cin, Cout] dots, one per tap, without the 9x patch tensor."""
    out = 0.0
    for tap, view in enumerate(_shifted(x)):
        out = out + jnp.einsum("bhwc,cd->bhwd", view, kernel[tap // 3, tap % 3])
    return out


def conv_rows3(x, kernel):
    """The 3 column shifts concatenated ([B, H+2, W, 3*Cin]), then one dot per kernel row, summed."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, :, j : j + w, :] for j in range(3)], axis=-1)
    out = 0.0
    for i in range(3):
        out = out + cols[:, i : i + h].reshape(b * h * w, 3 * c) @ kernel[i].reshape(3 * c, -1)
    return out.reshape(b, h, w, -1)


CONV_VARIANTS = {"lax.conv": conv_xla, "im2col": conv_im2col, "taps9": conv_taps9, "rows3": conv_rows3}


def group_norm_reshape(x, scale, bias, groups: int, eps: float = 1e-6):
    """GroupNorm as reshape to [B, H, W, G, C/G] and float32 mean/var over (H, W, C/G)."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale + bias).astype(x.dtype)


def grad_fn(fn):
    """Jitted value_and_grad of sum(fn(p, x)^2)/2 with respect to (p, x)."""
    return jax.jit(jax.value_and_grad(lambda p, x: 0.5 * jnp.sum(jnp.square(fn(p, x))), argnums=(0, 1)))


def time_torch(module, x, repeats):
    x = x.clone().requires_grad_(True)

    def call():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        (0.5 * out.square().sum()).backward()
        return out

    return common.time_calls(call, repeats=repeats, warmup=2)


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b| over each leaf, maximised over leaves."""
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / np.max(np.abs(np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def conv_rows(batch, shapes, repeats, rng):
    """fwd+bwd of each conv formulation and of torch's Conv2d at each (H, Cin, Cout)."""
    rows = []
    for h, cin, cout in shapes:
        x_np = rng.standard_normal((batch, h, h, cin)).astype(np.float32)
        k_np = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        x, kernel = jnp.asarray(x_np), jnp.asarray(k_np)
        flops = 3 * 2 * batch * h * h * 9 * cin * cout  # forward, input gradient, kernel gradient
        shape = f"{batch}x{h}x{h}x{cin}->{cout}"
        reference = None
        for name, variant in CONV_VARIANTS.items():
            fn = grad_fn(lambda k, x, f=variant: f(x, k))
            value = fn(kernel, x)
            reference = reference if reference is not None else value
            total, in_ynn = convolutions_in_ynn_fusions(fn.lower(kernel, x).compile().as_text())
            hlo = {"convolutions": total, "in_ynn_fusion": in_ynn}
            timing = common.time_calls(lambda fn=fn, k=kernel, x=x: fn(k, x), repeats=repeats, warmup=2)
            rows.append({"op": f"conv3x3 {name}", "shape": shape, "jax": timing,
                         "gflop_per_s": flops / timing["median_s"] / 1e9,
                         "max_rel_err_vs_lax_conv": max_rel_err(value, reference), "hlo": hlo})
            print(shape, name, common.fmt_time(timing), hlo, flush=True)
        tconv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            tconv.weight.copy_(torch.from_numpy(k_np.transpose(3, 2, 0, 1).copy()))
        theirs = time_torch(tconv, torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()), repeats)
        print(shape, "torch", common.fmt_time(theirs), flush=True)
        for row in rows:
            if row["shape"] == shape:
                row["torch"] = theirs
                row["ours/torch"] = theirs["median_s"] / row["jax"]["median_s"]
    return rows


def layer_rows(batch, levels, groups, repeats, rng):
    """fwd+bwd of flax nn.Conv, GroupNorm (three formulations) and swish against torch at each (H, C)."""
    rows = []
    for h, c in levels:
        x_np = rng.standard_normal((batch, h, h, c)).astype(np.float32)
        x = jnp.asarray(x_np)
        xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
        conv = nn.Conv(c, (3, 3), padding="SAME")
        gn = nn.GroupNorm(groups, epsilon=1e-6)
        ops = {
            "nn.Conv 3x3 + bias": (lambda p, x, m=conv: m.apply(p, x), conv.init(jax.random.key(0), x),
                                   torch.nn.Conv2d(c, c, 3, padding=1)),
            "groupnorm_flax": (lambda p, x, m=gn: m.apply(p, x), gn.init(jax.random.key(0), x),
                               torch.nn.GroupNorm(groups, c, eps=1e-6)),
            "groupnorm_reshape": (lambda p, x: group_norm_reshape(x, p["scale"], p["bias"], groups),
                                  {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
                                  torch.nn.GroupNorm(groups, c, eps=1e-6)),
            "groupnorm_ours": (lambda p, x: group_norm(x, p["scale"], p["bias"], groups, 1e-6),
                               {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
                               torch.nn.GroupNorm(groups, c, eps=1e-6)),
            "swish": (lambda p, x: nn.swish(x), {}, torch.nn.SiLU()),
        }
        for name, (fn, params, tmod) in ops.items():
            grad = grad_fn(fn)
            ours = common.time_calls(lambda grad=grad, params=params, x=x: grad(params, x), repeats=repeats, warmup=2)
            theirs = time_torch(tmod, xt, repeats)
            rows.append({"op": name, "shape": f"{batch}x{h}x{h}x{c}", "jax": ours, "torch": theirs,
                         "ours/torch": theirs["median_s"] / ours["median_s"]})
            print(name, rows[-1]["shape"], common.fmt_time(ours), common.fmt_time(theirs), flush=True)
    return rows


JAXLIB_DEFAULT_YNN_FUSIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}


# --step-ab --compare: the two arms, each (name, context to trace in, compile options, training steps per call,
# whether the state's optimizer is plain optax).
def _step_arms(compare: str, steps_per_call: int) -> list[tuple[str, object, dict, int, bool]]:
    k, nothing, options = steps_per_call, contextlib.nullcontext, cpu_conv_compiler_options()
    if compare == "conv":
        return [("default", nothing, JAXLIB_DEFAULT_YNN_FUSIONS, k, False), ("eigen_conv", nothing, options, k, False)]
    if compare == "steps":
        return [("1_step_per_call", nothing, options, 1, False), (f"{k}_steps_per_call", nothing, options, k, False)]
    if compare == "update":
        return [("optax_apply_gradients", nothing, options, k, True), ("one_pass", nothing, options, k, False)]
    return [("flax_groupnorm", common.flax_group_norm, options, k, False), ("ours", nothing, options, k, False)]


def step_ab(
    what: str, model_name: str, batch: int, rounds: int, vs_torch: bool = False, dtype: str = "float32",
    compare: str = "conv", steps_per_call: int = 1, second_arm_first: bool = False,
) -> dict:
    """One training step (or one ancestral sampling step) of the model built and compiled twice, timed
    alternately in this process so both see the same load. compare="conv": XLA's default options against
    cpu_conv_compiler_options(); compare="norm": flax's nn.GroupNorm against the library's GroupNorm (both with
    the library's options); compare="steps": one training step per call against ``steps_per_call`` steps per
    call (one `lax.scan`, as train.py runs them), timed per step; compare="update": the state's optimizer as plain
    optax (`apply_gradients`, then a select) against the library's one-pass `Optimizer.apply`. With vs_torch
    each round also times the torch peer (a fresh peer): one training step after one warm-up step, or one step
    of its ancestral loop (3 steps after 2 warm-up steps). ``dtype`` is the compute dtype of both (bfloat16:
    our model.dtype, torch's CPU autocast). ``second_arm_first`` builds and compiles the second arm first: the
    digits step compiled first in a process has run ~2% faster than the same step compiled second
    (benchmarks/NOTES.md), so a comparison is run in both orders."""
    from train_throughput import get_config

    from ddpm_jax.config import build_model, schedule_from_config
    from ddpm_jax.diffusion import p_sample
    from ddpm_jax.training import create_train_state, global_batch, jit_train_step, make_mesh, make_train_step

    if what != "train" and (compare in ("steps", "update") or steps_per_call != 1):
        raise ValueError("steps per call apply to the training step only")
    config = get_config(model_name, batch, dtype)
    model, schedule, mesh = build_model(config), schedule_from_config(config.diffusion), make_mesh()
    size, channels = config.data.image_size, config.data.num_channels
    images = np.random.default_rng(0).uniform(-1, 1, (steps_per_call, batch, size, size, channels)).astype(np.float32)
    state = create_train_state(config, model, jax.random.key(0))

    def arguments(k):
        if what == "train":
            return (state, global_batch({"image": images[:k]}, mesh))
        return (state.params, jnp.asarray(images[0]), jax.random.key(1))

    def lower(args):
        """Traces anew, so that common.flax_group_norm() applies."""
        if what == "train":
            return jit_train_step(make_train_step(config, model, schedule), mesh).lower(*args)

        def sample_step(params, x, key):
            t = jnp.full((batch,), config.diffusion.num_timesteps // 2, jnp.int32)
            return p_sample(schedule, denoiser_fn(model, params), x, t, key)[0]

        return jax.jit(sample_step).lower(*args)

    # The library's jits carry cpu_conv_compiler_options() themselves: the "default" arm restores jaxlib 0.10.2's
    # own YNNPACK list explicitly (options given to compile() replace the jit's).
    arms = {name: (context, opts, k, plain) for name, context, opts, k, plain in _step_arms(compare, steps_per_call)}
    compiled, inputs = {}, {}
    for name in list(arms)[::-1] if second_arm_first else arms:
        context, opts, k, plain_optax = arms[name]
        # The train step donates its state: each executable steps its own copy.
        inputs[name] = jax.tree.map(jnp.copy, arguments(k))
        if plain_optax:
            tx = inputs[name][0].tx
            inputs[name] = (inputs[name][0].replace(tx=optax.GradientTransformation(tx.init, tx.update)),
                            *inputs[name][1:])
        with context():
            compiled[name] = lower(inputs[name]).compile(compiler_options=opts or None)

    compiled = {name: compiled[name] for name in arms}  # the listed order from here on
    cpu_seconds = {name: [] for name in compiled}

    def call(name):
        """Seconds per step."""
        steps = arms[name][2]
        start, cpu_start = time.perf_counter(), time.process_time()
        out = compiled[name](*inputs[name])
        jax.block_until_ready(out)
        if what == "train":
            inputs[name] = (out[0], *inputs[name][1:])
        cpu_seconds[name].append((time.process_time() - cpu_start) / steps)
        return (time.perf_counter() - start) / steps

    for name in compiled:
        for _ in range(2):
            call(name)
    times = {name: [] for name in compiled}
    torch_times = []
    for r in range(rounds):
        for name in compiled if r % 2 == 0 else list(compiled)[::-1]:
            times[name].append(call(name))
        if vs_torch:
            import torch_peer

            if what == "train":
                peer = torch_peer.train_step_bench(model_name, batch, dtype, "eager", repeats=1, warmup=1)
                torch_times.append(peer["median_s"])
            else:
                peer = torch_peer.sample_bench(model_name, batch, dtype, "eager", 3, repeats=1, warmup_steps=2)
                torch_times.append(peer["per_step"]["median_s"])
    result = {"what": what, "model": model_name, "batch": batch, "dtype": dtype, "compare": compare,
              "compiler_options": {name: opts for name, (_, opts, _, _) in arms.items()},
              "steps_per_call": {name: k for name, (_, _, k, _) in arms.items()}, "rounds": rounds,
              "compiled_first": list(arms)[-1 if second_arm_first else 0]}
    for name, samples in times.items():
        total, in_ynn = convolutions_in_ynn_fusions(compiled[name].as_text())
        # Process CPU time over wall time: how many cores XLA kept busy (flags that look single-threaded may not be).
        cores = statistics.median(cpu_seconds[name][-rounds:]) / statistics.median(samples)
        result[name] = {**common.summarize(samples), "cores_busy": cores, "convolutions": total,
                        "convolutions_in_ynn": in_ynn}
        print(f"{what} step {name}: {common.fmt_time(result[name])}, {cores:.2f} cores busy, "
              f"convolutions in YNNPACK {in_ynn}/{total}")
    first, second = compiled
    # Speedup of the second arm over the first: the ratio of medians, and the median of the per-round ratios.
    result["speedup"] = statistics.median(times[first]) / statistics.median(times[second])
    paired = [a / b for a, b in zip(times[first], times[second], strict=True)]
    result["paired_speedup"] = {"median": statistics.median(paired), "rounds_faster": sum(p > 1 for p in paired)}
    print(f"{second} over {first}: {result['speedup']:.3f}x (paired median {statistics.median(paired):.3f}x, "
          f"faster in {result['paired_speedup']['rounds_faster']}/{rounds} rounds)")
    if torch_times:
        result["torch_eager"] = {**common.summarize(torch_times), "threads": torch.get_num_threads()}
        result["ours/torch"] = {name: statistics.median(torch_times) / statistics.median(times[name]) for name in times}
        print(f"torch eager ({torch.get_num_threads()} threads): {common.fmt_time(result['torch_eager'])}, "
              f"ours/torch {result['ours/torch']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=tuple(LEVELS), default="digits")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (digits) / 8 (cifar10)")
    parser.add_argument("--ops", choices=("all", "conv", "layers"), default="all",
                        help="conv: the 3x3 conv formulations; layers: nn.Conv, GroupNorm, swish")
    parser.add_argument("--groups", type=int, default=None, help="GroupNorm groups (default: the config's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--tag", default="", help="suffix of the result file name (e.g. eigenconv)")
    parser.add_argument("--step-ab", choices=("train", "sample"), default=None,
                        help="instead of ops: the whole step in the two variants of --compare, interleaved")
    parser.add_argument("--rounds", type=int, default=10, help="--step-ab: timed calls of each")
    parser.add_argument("--vs-torch", action="store_true", help="--step-ab: also time the torch peer each round")
    parser.add_argument("--compare", choices=("conv", "norm", "steps", "update"), default="conv",
                        help="--step-ab arms: conv = default vs Eigen-convolution compile options; "
                             "norm = flax's nn.GroupNorm vs the library's GroupNorm; "
                             "steps = 1 vs --steps-per-call training steps per call; "
                             "update = optax's apply_gradients vs the library's one-pass optimizer update")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="--step-ab train: training steps per jitted call (times are per step)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="--step-ab compute dtype")
    parser.add_argument("--second-arm-first", action="store_true",
                        help="--step-ab: compile the second arm first (the arm compiled first may run faster)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    batch = args.batch or (128 if args.shapes == "digits" else 8)
    groups = args.groups or DEFAULT_GROUPS[args.shapes]
    if args.step_ab:
        result = step_ab(args.step_ab, args.shapes, batch, args.rounds, args.vs_torch, args.dtype, args.compare,
                         args.steps_per_call, args.second_arm_first)
        name = f"step_ab_{args.step_ab}_{args.shapes}" + (f"_{args.tag}" if args.tag else "")
        print("load average at end:", os.getloadavg(), "| XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
        print("wrote", common.write_json(name, result, args.out_dir))
        return
    rng = np.random.default_rng(0)
    rows = []
    if args.ops in ("all", "conv"):
        rows += conv_rows(batch, CONVS[args.shapes], args.repeats, rng)
    if args.ops in ("all", "layers"):
        rows += layer_rows(batch, LEVELS[args.shapes], groups, args.repeats, rng)
    name = "cpu_ops" + (f"_{args.tag}" if args.tag else "") + f"_{args.shapes}"
    path = common.write_json(name, {"batch": batch, "groups": groups, "torch_threads": torch.get_num_threads(),
                                    "rows": rows}, args.out_dir)
    table = [{"op": r["op"], "shape": r["shape"], "jax fwd+bwd": common.fmt_time(r["jax"]),
              "torch fwd+bwd": common.fmt_time(r["torch"]), "ours/torch": f"{r['ours/torch']:.2f}x",
              "GFLOP/s": f"{r['gflop_per_s']:.0f}" if "gflop_per_s" in r else "-",
              "convs in YNN": f"{r['hlo']['in_ynn_fusion']}/{r['hlo']['convolutions']}" if "hlo" in r else "-"}
             for r in rows]
    print(common.format_table(table, ["op", "shape", "jax fwd+bwd", "torch fwd+bwd", "ours/torch", "GFLOP/s",
                                      "convs in YNN"]))
    print("load average at end:", os.getloadavg(), "| XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
    print("wrote", path)


if __name__ == "__main__":
    main()
