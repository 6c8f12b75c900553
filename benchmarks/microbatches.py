"""Memory and time of the training step against `training.microbatches` (gradient accumulation).

    python benchmarks/microbatches.py --model cifar10 --batch 32 --microbatches 1,2,4 --repeats 3
    python benchmarks/microbatches.py --model digits --batch 128 --microbatches 1,2,4,8 --repeats 10

For each number of parts: XLA's buffer assignment of the compiled one-step function
(temporaries, arguments, outputs; what the executable allocates, no run needed) and, with --repeats > 0, the
median time per step after compilation and one warm-up call. The arms run one after another (not interleaved),
so compare arms of one run only. Prints a table and writes benchmarks/results/microbatches_<model>_<device>.json
(or --out-dir).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from train_throughput import get_config  # noqa: E402

from ddpm_jax.config import build_model, schedule_from_config, validate_config  # noqa: E402
from ddpm_jax.training import global_batch, init_train_state, jit_train_step, make_mesh, make_train_step  # noqa: E402

MB = 2**20


def bench(model_name: str, batch: int, dtype_name: str, microbatches: int, repeats: int) -> dict:
    config = get_config(model_name, batch, dtype_name)
    config.training.microbatches = microbatches
    validate_config(config)
    model, schedule, mesh = build_model(config), schedule_from_config(config.diffusion), make_mesh()
    state = init_train_state(config, model, jax.random.key(0), mesh)
    size, channels = config.data.image_size, config.data.num_channels
    images = np.random.default_rng(0).uniform(-1, 1, (1, batch, size, size, channels)).astype(np.float32)
    data = global_batch({"image": images}, mesh)
    compiled = jit_train_step(make_train_step(config, model, schedule), mesh).lower(state, data).compile()
    memory = compiled.memory_analysis()
    result = {
        "microbatches": microbatches,
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
    }
    if repeats:
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], data)
            return metrics["loss"]

        result["per_step"] = common.time_calls(call, repeats=repeats, warmup=1)
        result["last_loss"] = float(np.asarray(call())[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--microbatches", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per arm (0: memory only)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()

    rows = []
    name = f"microbatches_{args.model}" + (f"_{args.tag}" if args.tag else "")
    payload = {"model": args.model, "batch": args.batch, "dtype": args.dtype, "rows": rows}
    for microbatches in (int(m) for m in args.microbatches.split(",")):
        rows.append(bench(args.model, args.batch, args.dtype, microbatches, args.repeats))
        print(rows[-1] | {"per_step": common.fmt_time(rows[-1].get("per_step"))}, flush=True)
        common.write_json(name, payload, args.out_dir, complete=False)
    base = rows[0]
    table = []
    for r in rows:
        line = {
            "microbatches": r["microbatches"],
            "examples per part": args.batch // r["microbatches"],
            "temporaries": f"{r['temp_bytes'] / MB:,.0f} MiB ({r['temp_bytes'] / base['temp_bytes']:.2f}x)",
            "arguments": f"{r['argument_bytes'] / MB:,.0f} MiB",
        }
        if "per_step" in r:
            line["step"] = common.fmt_time(r["per_step"])
            line["time vs first"] = f"{r['per_step']['median_s'] / base['per_step']['median_s']:.2f}x"
        table.append(line)
    print(f"{args.model} U-Net training step, batch {args.batch}, {args.dtype}, on {common.device_name()}")
    print(common.format_table(table, list(table[0])))
    print("->", common.write_json(name, payload, args.out_dir))


if __name__ == "__main__":
    main()
