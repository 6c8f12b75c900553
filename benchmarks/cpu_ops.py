"""Where XLA:CPU time goes: forward+backward of the U-Net's layers at the digits and CIFAR-10 shapes, JAX
against PyTorch, and GroupNorm in flax's formulation against a reshape + mean/var one.

    python benchmarks/cpu_ops.py                 # digits shapes (batch 128, 8x8 and 4x4)
    python benchmarks/cpu_ops.py --shapes cifar10 --batch 8

Each op is timed as value_and_grad of sum(op(x)) (JAX, jitted) and loss.backward() (torch eager).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = {
    # (name, H, C) per level of each config; attention at the last level listed with attn=True.
    "digits": [(8, 64), (4, 128)],
    "cifar10": [(32, 128), (16, 256), (8, 256)],
}


def group_norm_reshape(x, scale, bias, groups: int, eps: float = 1e-6):
    """GroupNorm as reshape to [B, H, W, G, C/G] and float32 mean/var over (H, W, C/G)."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale + bias).astype(x.dtype)


def time_jax(fn, params, x, repeats):
    grad = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x)), argnums=(0, 1)))
    return common.time_calls(lambda: grad(params, x), repeats=repeats, warmup=2)


def time_torch(module, x, repeats):
    x = x.clone().requires_grad_(True)

    def call():
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.sum().backward()
        return out

    return common.time_calls(call, repeats=repeats, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", choices=tuple(SHAPES), default="digits")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--groups", type=int, default=None, help="default 16 (digits) / 32 (cifar10)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    groups = args.groups or (16 if args.shapes == "digits" else 32)
    rng = np.random.default_rng(0)
    rows = []
    for h, c in SHAPES[args.shapes]:
        x_np = rng.standard_normal((args.batch, h, h, c)).astype(np.float32)
        x = jnp.asarray(x_np)
        xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
        conv = nn.Conv(c, (3, 3), padding="SAME")
        gn = nn.GroupNorm(groups, epsilon=1e-6)
        ops = {
            "conv3x3": (lambda p, x, m=conv: m.apply(p, x), conv.init(jax.random.key(0), x),
                        torch.nn.Conv2d(c, c, 3, padding=1)),
            "groupnorm_flax": (lambda p, x, m=gn: m.apply(p, x), gn.init(jax.random.key(0), x),
                               torch.nn.GroupNorm(groups, c, eps=1e-6)),
            "groupnorm_reshape": (lambda p, x: group_norm_reshape(x, p["scale"], p["bias"], groups),
                                  {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
                                  torch.nn.GroupNorm(groups, c, eps=1e-6)),
            "swish": (lambda p, x: nn.swish(x), {}, torch.nn.SiLU()),
        }
        for name, (fn, params, tmod) in ops.items():
            ours = time_jax(fn, params, x, args.repeats)
            theirs = time_torch(tmod, xt, args.repeats)
            rows.append({"op": name, "shape": f"{args.batch}x{h}x{h}x{c}", "jax_ms": ours["median_s"] * 1e3,
                         "torch_ms": theirs["median_s"] * 1e3, "jax": ours, "torch": theirs,
                         "ours/torch": theirs["median_s"] / ours["median_s"]})
            print(rows[-1]["op"], rows[-1]["shape"], f"{rows[-1]['jax_ms']:.2f} ms", f"{rows[-1]['torch_ms']:.2f} ms",
                  flush=True)
    path = common.write_json(f"cpu_ops_{args.shapes}", {"batch": args.batch, "groups": groups,
                                                         "torch_threads": torch.get_num_threads(), "rows": rows},
                             args.out_dir)
    table = [{"op": r["op"], "shape": r["shape"], "jax fwd+bwd": common.fmt_time(r["jax"]),
              "torch fwd+bwd": common.fmt_time(r["torch"]), "ours/torch": f"{r['ours/torch']:.2f}x"} for r in rows]
    print(common.format_table(table, ["op", "shape", "jax fwd+bwd", "torch fwd+bwd", "ours/torch"]))
    print("wrote", path)


if __name__ == "__main__":
    main()
