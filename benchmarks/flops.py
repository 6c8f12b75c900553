"""FLOPs and bytes of the training step and of one forward pass, from XLA's cost analysis of the lowered HLO.

    python benchmarks/flops.py --model cifar10 --batch 128

Counted on the un-optimised HLO (no compile, no device work), so the figure is the same on every backend;
XLA:GPU's analysis of a compiled step misses the cuDNN convolutions (custom calls) and undercounts.
'bytes accessed' of unfused HLO is an upper bound on traffic, not the floor.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_throughput import get_config  # noqa: E402

from ddpm_jax.config import build_model, schedule_from_config  # noqa: E402
from ddpm_jax.training import create_train_state, make_train_step  # noqa: E402


def lowered_cost(lowered) -> dict:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    config = get_config(args.model, args.batch, args.dtype)
    model = build_model(config)
    schedule = schedule_from_config(config.diffusion)
    size, channels = config.data.image_size, config.data.num_channels
    state = jax.eval_shape(lambda key: create_train_state(config, model, key), jax.random.key(0))
    images = jax.ShapeDtypeStruct((1, args.batch, size, size, channels), jnp.float32)
    step = jax.jit(make_train_step(config, model, schedule))
    train = lowered_cost(step.lower(state, {"image": images}))
    x = jax.ShapeDtypeStruct((args.batch, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    fwd = lowered_cost(jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(state.params, x, t))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    result = {
        "model": args.model, "batch": args.batch, "dtype": args.dtype, "num_params": int(num_params),
        "train_step": train, "forward": fwd,
        "forward_flops_per_image": fwd["flops"] / args.batch,
        "train_over_forward": train["flops"] / fwd["flops"],
        # The floor of a step's traffic: read params, grads-free Adam state and EMA once, write them once (f32).
        "param_state_bytes_read_plus_write": int(num_params) * 4 * 4 * 2,
    }
    path = common.write_json(f"flops_{args.model}_b{args.batch}", result, args.out_dir)
    print(
        f"{args.model} batch {args.batch}: train step {train['flops'] / 1e12:.3f} TFLOP, forward "
        f"{fwd['flops'] / 1e9:.1f} GFLOP ({fwd['flops'] / args.batch / 1e9:.2f} GFLOP/image), "
        f"train/forward {result['train_over_forward']:.2f}; bytes accessed (unfused HLO) train "
        f"{train['bytes_accessed'] / 1e9:.1f} GB, forward {fwd['bytes_accessed'] / 1e9:.1f} GB"
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
