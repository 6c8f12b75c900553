"""Load the DDPM authors' released weights from diffusers' `UNet2DModel` layout (safetensors + config.json).

The safetensors format is parsed with NumPy alone (no torch at run time): an 8-byte little-endian header
length, a JSON header mapping names to dtype/shape/byte ranges, then the raw little-endian tensor bytes.
"""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.unet import UNet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# Little-endian storage types; BF16 is read as raw 16-bit words.
_STORED_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}

# diffusers sub-module names -> ours (older checkpoints name attention projections query/key/value/proj_attn).
_RESNET_NAMES = {
    "norm1": "norm_0",
    "conv1": "conv_0",
    "time_emb_proj": "temb_proj",
    "norm2": "norm_1",
    "conv2": "conv_1",
    "conv_shortcut": "shortcut",
}
_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_TOP_NAMES = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "temb_dense_0",
    "time_embedding.linear_2": "temb_dense_1",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32 NumPy arrays (F64, F32, F16 and BF16 supported)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from e
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _STORED_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; only F64/F32/F16/BF16 are supported.")
        stored = np.dtype(_STORED_DTYPES[dtype])
        count = math.prod(shape)
        if end - begin != count * stored.itemsize or start + end > len(data):
            raise ValueError(f"{path}: tensor {name!r} has a byte range that does not match its shape (truncated?).")
        array = np.frombuffer(data, stored, count, start + begin)
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: widen the bits and reinterpret.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32).reshape(shape)
    return tensors


def _require(config: dict, key: str, default, allowed, hint: str) -> None:
    value = config.get(key, default)
    if value not in allowed:
        raise ValueError(f"unsupported diffusers config: {key}={value!r}; {hint}")


def unet_kwargs_from_diffusers_config(config: dict) -> dict:
    """UNet keyword arguments equivalent to a diffusers `UNet2DModel` config; ValueError if there is none."""
    _require(config, "_class_name", "UNet2DModel", ("UNet2DModel",), "only UNet2DModel is supported.")
    _require(config, "time_embedding_type", "positional", ("positional",), "only sinusoidal embeddings exist here.")
    # diffusers' defaults are flip_sin_to_cos=True, freq_shift=0; the DDPM formula ([sin, cos], i/(half-1)) is
    # flip_sin_to_cos=False with freq_shift=1.
    _require(config, "flip_sin_to_cos", True, (False,), "the DDPM embedding is [sin, cos] (False).")
    _require(config, "freq_shift", 0, (1,), "the DDPM embedding uses exponent i/(half-1) (freq_shift 1).")
    _require(config, "center_input_sample", False, (False,), "inputs must already be in [-1, 1].")
    _require(config, "act_fn", "silu", ("silu", "swish"), "the network uses swish.")
    _require(config, "mid_block_type", "UNetMidBlock2D", ("UNetMidBlock2D",), "the middle is res, attn, res.")
    _require(config, "add_attention", True, (True,), "the middle block has attention.")
    _require(config, "class_embed_type", None, (None,), "class conditioning is not implemented.")
    _require(config, "num_class_embeds", None, (None,), "class conditioning is not implemented.")
    _require(config, "resnet_time_scale_shift", "default", ("default",), "the time embedding is additive.")
    _require(config, "downsample_padding", 1, (0,), "downsampling pads (0, 1) like TF 'SAME' (padding 0).")
    _require(config, "downsample_type", "conv", ("conv",), "downsampling is a strided conv.")
    _require(config, "upsample_type", "conv", ("conv",), "upsampling is nearest + conv.")
    _require(config, "mid_block_scale_factor", 1, (1, 1.0), "residuals are not rescaled.")

    channels = list(config.get("block_out_channels", (224, 448, 672, 896)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} must all be multiples of the first.")
    _require(config, "time_embedding_dim", None, (None, 4 * ch), f"the time embedding width is 4 * {ch}.")
    groups = config.get("norm_num_groups", 32)
    _require(config, "attn_norm_num_groups", None, (None, groups), "attention uses norm_num_groups.")

    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(f"need one down and one up block per entry of block_out_channels: {down}, {up}.")
    with_attn = []
    for level, (down_type, up_type) in enumerate(zip(down, reversed(up), strict=True)):
        pair = {("DownBlock2D", "UpBlock2D"): False, ("AttnDownBlock2D", "AttnUpBlock2D"): True}.get(
            (down_type, up_type)
        )
        if pair is None:
            raise ValueError(
                f"level {level}: blocks {down_type}/{up_type} unsupported; use DownBlock2D/UpBlock2D or "
                "AttnDownBlock2D/AttnUpBlock2D mirrored between the down and up paths."
            )
        with_attn.append(pair)
    head_dim = config.get("attention_head_dim", 8)  # diffusers' default when the key is absent
    attn_widths = {channels[-1]} | {c for c, a in zip(channels, with_attn, strict=True) if a}
    if head_dim is not None and attn_widths != {head_dim}:
        raise ValueError(
            f"attention_head_dim={head_dim} gives several heads at widths {sorted(attn_widths)}; "
            "only single-head attention (attention_head_dim null) is supported."
        )

    size = config.get("sample_size")
    if size is None and any(with_attn):
        raise ValueError("config has no sample_size, needed to place the attention levels.")
    height = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": config.get("layers_per_block", 2),
        "attn_resolutions": tuple(height // 2**level for level, a in enumerate(with_attn) if a),
        "dropout": config.get("dropout", 0.0),
        "resamp_with_conv": True,
        "out_channels": config.get("out_channels", 3),
        "num_groups": groups,
        "norm_eps": config.get("norm_eps", 1e-5),
    }


def _our_path(key: str, num_levels: int) -> tuple[str, ...]:
    """Our parameter path for a diffusers state-dict key, e.g. 'down_blocks.1.attentions.0.to_q.weight'."""
    module, leaf = key.rsplit(".", 1)
    for name, ours in _TOP_NAMES.items():
        if module == name:
            return ours, leaf
    match = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?", module
    )
    if match:
        direction, block, kind, index, rest = match.groups()
        level = int(block) if direction == "down" else num_levels - 1 - int(block)
        prefix = f"{direction}_{level}"
        if kind == "resnets" and rest in _RESNET_NAMES:
            return f"{prefix}_block_{index}", _RESNET_NAMES[rest], leaf
        if kind == "attentions" and rest in _ATTN_NAMES:
            return f"{prefix}_attn_{index}", _ATTN_NAMES[rest], leaf
        if kind in ("downsamplers", "upsamplers") and index == "0" and rest == "conv":
            return f"{prefix}_{kind.removesuffix('rs')}", "conv", leaf
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module)
    if match:
        kind, index, rest = match.groups()
        if kind == "resnets" and rest in _RESNET_NAMES:
            return f"mid_block_{index}", _RESNET_NAMES[rest], leaf
        if kind == "attentions" and index == "0" and rest in _ATTN_NAMES:
            return "mid_attn", _ATTN_NAMES[rest], leaf
    raise ValueError(f"unexpected diffusers parameter {key!r}: not part of a DDPM UNet2DModel.")


def _to_flax(array: np.ndarray, leaf: str, norm: bool) -> tuple[str, np.ndarray]:
    """Rename a torch leaf and transpose it: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if leaf == "bias":
        return "bias", array
    if leaf != "weight":
        raise ValueError(f"unexpected diffusers leaf {leaf!r}.")
    if norm:
        return "scale", array
    if array.ndim == 4:
        return "kernel", array.transpose(2, 3, 1, 0)
    return "kernel", array.T


def convert_diffusers_state_dict(state: dict[str, np.ndarray], config: dict) -> dict:
    """Our UNet params from diffusers' (NumPy float32; `UNet(**kwargs).apply({'params': params}, x, t)`)."""
    kwargs = unet_kwargs_from_diffusers_config(config)
    num_levels = len(kwargs["ch_mult"])
    params: dict = {}
    for key, array in state.items():
        *modules, leaf = _our_path(key, num_levels)
        name, value = _to_flax(np.asarray(array, np.float32), leaf, norm=modules[-1].startswith("norm"))
        node = params
        for module in modules:
            node = node.setdefault(module, {})
        node[name] = value

    # Compare with the tree our model builds for this config: missing, extra or misshapen tensors are errors.
    # Parameter shapes do not depend on the image size, only on which levels have attention.
    size = config.get("sample_size") or 2 ** (num_levels - 1)
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    x = jax.ShapeDtypeStruct((1, height, width, config.get("in_channels", 3)), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    expected = jax.eval_shape(UNet(**kwargs).init, jax.random.key(0), x, t)["params"]
    want = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k}" for k in want.keys() - have.keys()]
    problems += [f"unexpected {k}" for k in have.keys() - want.keys()]
    problems += [f"{k}: shape {have[k]} != {want[k]}" for k in want.keys() & have.keys() if have[k] != want[k]]
    if problems:
        raise ValueError("diffusers weights do not match their config: " + "; ".join(sorted(problems)[:10]))
    return params


def _paths(path_or_dir: str) -> tuple[str, str]:
    if not os.path.exists(path_or_dir):
        raise ValueError(f"{path_or_dir}: no such diffusers model directory or weights file.")
    if os.path.isdir(path_or_dir):
        return os.path.join(path_or_dir, WEIGHTS_NAME), os.path.join(path_or_dir, CONFIG_NAME)
    return path_or_dir, os.path.join(os.path.dirname(path_or_dir), CONFIG_NAME)


def read_diffusers_config(path_or_dir: str) -> dict:
    """The config.json of a diffusers model directory (or of the directory holding a weights file)."""
    _, config_path = _paths(path_or_dir)
    if not os.path.exists(config_path):
        raise ValueError(f"no {CONFIG_NAME} at {config_path}; pass a diffusers model directory.")
    with open(config_path) as f:
        return json.load(f)


_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def diffusion_settings_from_scheduler(path_or_dir: str) -> dict | None:
    """config.diffusion fields from the scheduler_config.json beside a diffusers model (or in the pipeline's
    scheduler/ folder beside its unet/), or None without one: the process the weights were trained for."""
    folder = os.path.dirname(_paths(path_or_dir)[1])
    candidates = [os.path.join(folder, "scheduler_config.json"),
                  os.path.join(os.path.dirname(folder), "scheduler", "scheduler_config.json")]
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        return None
    with open(path) as f:
        scheduler = json.load(f)
    schedule = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None or schedule not in _SCHEDULES:
        raise ValueError(f"{path}: beta schedule {schedule!r} (or trained_betas) has no equivalent here; "
                         f"these have one: {', '.join(sorted(_SCHEDULES))}")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(f"{path}: prediction_type {prediction!r} is not one of {', '.join(_PREDICTIONS)}")
    settings = {"num_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
                "beta_schedule": _SCHEDULES[schedule], "mean_type": _PREDICTIONS[prediction]}
    # A fixed variance is chosen when sampling (the weights do not depend on it); a learned one is the weights'.
    variance = scheduler.get("variance_type", "fixed_small")
    if variance == "learned_range":  # Nichol & Dhariwal's interpolation, as ours; trained with their hybrid loss
        settings |= {"var_type": "learned_range", "loss_type": "hybrid"}
    elif variance == "learned":  # diffusers reads that output as the variance itself, and ours as its log
        raise ValueError(f"{path}: variance_type 'learned' has no equivalent here (diffusers takes the output as the "
                         "variance; 'learned_range' has one)")
    if schedule != "squaredcos_cap_v2":  # the cosine schedule takes no betas
        settings |= {"beta_start": float(scheduler.get("beta_start", 1e-4)),
                     "beta_end": float(scheduler.get("beta_end", 0.02))}
    return settings


def load_diffusers_unet(path_or_dir: str) -> tuple[dict, dict]:
    """(UNet kwargs, params) from a diffusers UNet2DModel directory or its .safetensors file + config.json."""
    weights_path, _ = _paths(path_or_dir)
    config = read_diffusers_config(path_or_dir)
    if not os.path.exists(weights_path):
        raise ValueError(f"no weights at {weights_path}; save the model with safe_serialization=True.")
    params = convert_diffusers_state_dict(read_safetensors(weights_path), config)
    return unet_kwargs_from_diffusers_config(config), params
