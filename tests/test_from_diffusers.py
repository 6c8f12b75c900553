"""Loading diffusers UNet2DModel weights: config translation, safetensors parsing, output parity with PyTorch."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.config import validate_config
from ddpm_jax.data import load_split
from ddpm_jax.models import (
    UNet,
    convert_diffusers_state_dict,
    count_params,
    load_diffusers_unet,
    read_safetensors,
    unet_kwargs_from_diffusers_config,
)
from tests.multihost_worker import apply_overrides

# google/ddpm-cifar10-32's config.json (the DDPM authors' CIFAR-10 network as diffusers distributes it).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def test_cifar10_config_gives_the_papers_unet():
    kwargs = unet_kwargs_from_diffusers_config(CIFAR10_CONFIG)
    paper = UNet()
    for name in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "out_channels", "num_groups", "norm_eps"):
        assert kwargs[name] == getattr(paper, name), name
    assert kwargs["dropout"] == 0.0  # inference weights; the paper trained with 0.1
    assert count_params(UNet(**kwargs), (1, 32, 32, 3)) == 35_746_307


@pytest.mark.parametrize(
    "change, match",
    [
        ({"flip_sin_to_cos": True}, r"flip_sin_to_cos=True"),
        ({"freq_shift": 0}, r"freq_shift=0"),
        ({"downsample_padding": 1}, r"downsample_padding=1"),
        ({"attention_head_dim": 8}, r"attention_head_dim=8 gives several heads"),
        ({"num_class_embeds": 10}, r"num_class_embeds=10"),
        ({"resnet_time_scale_shift": "scale_shift"}, r"resnet_time_scale_shift='scale_shift'"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, r"level 1: blocks"),
        ({"block_out_channels": [128, 192, 256, 256]}, r"multiples of the first"),
        ({"down_block_types": ["DownBlock2D"] * 3}, r"one down and one up block per entry"),
    ],
)
def test_unsupported_diffusers_configs_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        unet_kwargs_from_diffusers_config({**CIFAR10_CONFIG, **change})


def test_absent_attention_head_dim_means_diffusers_default_of_8_heads_wide():
    config = {k: v for k, v in CIFAR10_CONFIG.items() if k != "attention_head_dim"}
    with pytest.raises(ValueError, match=r"attention_head_dim=8 gives several heads"):
        unet_kwargs_from_diffusers_config(config)


def _write_safetensors(path, header: dict, payload: bytes):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + payload)


def test_read_safetensors_parses_the_format_and_rejects_broken_files(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1.5, -2.0], dtype="<f2")
    # bfloat16 words of 1.0, -3.5 and 2**-10: the high 16 bits of the float32 patterns.
    c = np.array([0x3F80, 0xC060, 0x3A80], dtype="<u2")
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]},
        "c": {"dtype": "BF16", "shape": [3, 1], "data_offsets": [28, 34]},
    }
    path = tmp_path / "ok.safetensors"
    _write_safetensors(path, header, a.tobytes() + b.tobytes() + c.tobytes())
    tensors = read_safetensors(str(path))
    assert sorted(tensors) == ["a", "b", "c"]
    np.testing.assert_array_equal(tensors["a"], a)
    np.testing.assert_array_equal(tensors["b"], [1.5, -2.0])
    np.testing.assert_array_equal(tensors["c"], [[1.0], [-3.5], [2.0**-10]])
    assert all(t.dtype == np.float32 for t in tensors.values())

    _write_safetensors(path, {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ValueError, match="dtype I64"):
        read_safetensors(str(path))
    _write_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8))
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(str(path))
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(str(path))


def _layout(block_out_channels, attn_levels, **overrides):
    """A diffusers UNet2DModel config in the DDPM layout, attention at the given levels."""
    down = ["AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(len(block_out_channels))]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return {
        **CIFAR10_CONFIG,
        "block_out_channels": list(block_out_channels),
        "down_block_types": down,
        "up_block_types": up,
        **overrides,
    }


def _saved_random_diffusers_unet(config, directory, seed=0):
    """Save a diffusers UNet2DModel with every weight random (GroupNorm affine too, which starts at 1/0)."""
    torch = pytest.importorskip("torch", reason="the parity tests need the [torch] extra (torch==2.13.0)")
    diffusers = pytest.importorskip("diffusers", reason="the parity tests need the [torch] extra (diffusers)")
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.05)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model, torch


def test_converted_small_unet_matches_diffusers(tmp_path):
    config = _layout((32, 64, 64), attn_levels={1}, norm_num_groups=8, sample_size=16, in_channels=1, out_channels=2)
    model, torch = _saved_random_diffusers_unet(config, tmp_path)
    kwargs, params = load_diffusers_unet(str(tmp_path))
    assert kwargs["attn_resolutions"] == (8,) and kwargs["ch_mult"] == (1, 2, 2)

    x = np.random.default_rng(1).standard_normal((3, 1, 16, 16)).astype(np.float32)
    t = np.array([0, 417, 999])
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    ours = jax.jit(UNet(**kwargs).apply)({"params": params}, x.transpose(0, 2, 3, 1), jnp.asarray(t, jnp.int32))
    got = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # Checkpoints saved before diffusers renamed the attention projections load to the same parameters.
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = read_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    legacy_params = convert_diffusers_state_dict(legacy, config)
    jax.tree.map(np.testing.assert_array_equal, legacy_params, params)

    del state["conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing \['conv_out'\]\['bias'\]"):
        convert_diffusers_state_dict(state, config)


def test_pretrained_weights_take_the_data_sets_size_and_their_schedulers_process(tmp_path):
    # diffusers writes sample_size null by default; without attention levels nothing else needs it (a TypeError).
    from configs.cifar10 import get_config
    from ddpm_jax import run

    config = _layout((32, 32), attn_levels=set(), norm_num_groups=8, sample_size=None, in_channels=1, out_channels=1)
    _saved_random_diffusers_unet(config, tmp_path)
    run_config = get_config()
    run_config.data.dataset, run_config.data.image_size = "digits", 8
    unet = run.load_pretrained(str(tmp_path), run_config, evaluate=True)[0]
    assert run_config.data.image_size == 8 and unet.attn_resolutions == ()

    # The diffusion process the weights were trained for (it was never read): the paper's loads, another is refused.
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                 "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": None, "variance_type": "fixed_large"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(scheduler))
    run.load_pretrained(str(tmp_path), get_config())
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        scheduler | {"num_train_timesteps": 4000, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match=r"trained for another diffusion process than the config's .*: set "
                                         r"--config.diffusion.num_timesteps=4000 --config.diffusion.mean_type=v$"):
        run.load_pretrained(str(tmp_path), get_config())
    # sample.py takes no config: there the weights' process is the one sampled.
    sample_config = get_config()
    run.load_pretrained(str(tmp_path), sample_config, process_from_weights=True)
    assert (sample_config.diffusion.num_timesteps, sample_config.diffusion.mean_type) == (4000, "v")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(scheduler | {"beta_schedule": "scaled_linear"}))
    with pytest.raises(ValueError, match=r"beta schedule 'scaled_linear' .*has no equivalent here"):
        run.load_pretrained(str(tmp_path), get_config())

    # Weights that predict their variances too (out_channels = 2 in_channels) were refused only at the first
    # sampling step, by a shape error; a learned_range scheduler is their process, and sample.py adopts it.
    (tmp_path / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(ValueError, match=r"diffusion.var_type='learned_range' takes 2: set a fixed"):
        run.load_pretrained(str(tmp_path), apply_overrides(get_config(), {"diffusion.var_type": "learned_range"}))
    learned = tmp_path / "learned"
    _saved_random_diffusers_unet(config | {"out_channels": 2}, learned)
    with pytest.raises(ValueError, match=r"output 2 channels for 1-channel images, and diffusion.var_type="
                                         r"'fixedlarge' takes 1: set --config.diffusion.var_type=learned_range"):
        run.load_pretrained(str(learned), get_config())
    (learned / "scheduler_config.json").write_text(json.dumps(scheduler | {"variance_type": "learned_range"}))
    sample_config = apply_overrides(get_config(), {"data.dataset": "digits", "data.image_size": 8})
    run.load_pretrained(str(learned), sample_config, process_from_weights=True)
    assert (sample_config.diffusion.var_type, sample_config.diffusion.loss_type) == ("learned_range", "hybrid")
    validate_config(sample_config)
    (learned / "scheduler_config.json").write_text(json.dumps(scheduler | {"variance_type": "learned"}))
    with pytest.raises(ValueError, match=r"variance_type 'learned' has no equivalent here"):
        run.load_pretrained(str(learned), get_config())


def test_converted_cifar10_unet_matches_diffusers(tmp_path):
    model, torch = _saved_random_diffusers_unet(CIFAR10_CONFIG, tmp_path)
    kwargs, params = load_diffusers_unet(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert sum(p.size for p in jax.tree.leaves(params)) == 35_746_307

    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    t = np.array([250])
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    ours = jax.jit(UNet(**kwargs).apply)({"params": params}, x.transpose(0, 2, 3, 1), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, rtol=0, atol=1e-4)


def test_pretrained_weights_sample_through_generate(tmp_path):
    """sample.py --pretrained's path: a diffusers folder -> our U-Net -> a DDIM chain -> PNG and .npz."""
    from configs.cifar10 import get_config
    from ddpm_jax import generation, run

    config = _layout((32, 64), attn_levels={1}, norm_num_groups=8, sample_size=8, in_channels=1, out_channels=1)
    model, torch = _saved_random_diffusers_unet(config, tmp_path / "weights")
    run_config = get_config()
    run_config.sampling.sampler, run_config.sampling.num_steps, run_config.sampling.num_samples = "ddim", 3, 4
    unet, schedule, params = run.load_pretrained(str(tmp_path / "weights"), run_config)
    assert (run_config.data.image_size, run_config.data.num_channels) == (8, 1)
    # config.model describes the loaded network, so validation checks that one (CIFAR-10's attention at 16x16
    # never occurs at 8x8: the run was refused for a setting it did not use).
    m = run_config.model
    assert (m.ch, tuple(m.ch_mult), tuple(m.attn_resolutions), m.num_groups) == (32, (1, 2), (4,), 8)
    digits_config = run_config.copy_and_resolve_references()
    digits_config.data.dataset = "digits"  # the weights' 8x8 grey images
    validate_config(digits_config)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 1)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor([5, 900])).sample.numpy()
    got = jax.jit(unet.apply)({"params": params}, x, jnp.array([5, 900]))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-4)

    result = generation.generate(run_config, unet, schedule, params, out_dir=str(tmp_path / "out"), tag="pretrained")
    samples = np.load(result["npz"])["samples"]
    assert samples.shape == (4, 8, 8, 1) and np.all(np.abs(samples) <= 1.0)
    assert open(result["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # train.py --mode=eval --pretrained's path: the weights' test-set bound and rate-distortion curve, on 8 digits.
    # diffusers may also write sample_size as [height, width].
    config_path = tmp_path / "weights" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sample_size": [8, 8]}))
    eval_config = get_config()
    eval_config.data.dataset, eval_config.diffusion.num_timesteps, eval_config.eval.batch_size = "digits", 10, 8
    unet, schedule, params = run.load_pretrained(str(tmp_path / "weights"), eval_config)
    assert eval_config.data.image_size == 8
    out_dir = tmp_path / "eval"
    evaluation = run.evaluate_model(eval_config, unet, schedule, params, out_dir=str(out_dir), num_examples=8,
                                    progress=False)
    assert evaluation["bpd_examples"] == 8 and "step" not in evaluation
    assert np.isfinite(evaluation["bpd"]) and evaluation["bpd"] > evaluation["bpd_prior"] > 0
    # L_T needs no model: KL(q(x_T | x_0) || N(0, I)) per dimension of the first 8 test digits, in float64.
    x0 = load_split(eval_config.data, "test")[0][:8].astype(np.float64) / 127.5 - 1.0
    abar = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 10)))
    kl = 0.5 * (-1.0 - np.log(1.0 - abar) + (1.0 - abar) + abar * x0**2) / np.log(2.0)
    assert evaluation["bpd_prior"] == pytest.approx(kl.mean(), rel=1e-4)
    curve = np.load(out_dir / "rate_distortion.npz")
    assert curve["rate_bpd"][-1] == pytest.approx(evaluation["bpd"] - evaluation["bpd_decoder"], rel=1e-5)
    assert sorted(os.listdir(out_dir)) == ["eval.json", "rate_distortion.npz", "rate_distortion.png"]
    # The compute settings are the config's (the loaded network ran in float32 with XLA attention whatever
    # they said).
    eval_config.model.dtype, eval_config.model.attn_implementation = "bfloat16", "cudnn"
    unet = run.load_pretrained(str(tmp_path / "weights"), eval_config)[0]
    assert unet.dtype == jnp.bfloat16 and unet.attn_implementation == "cudnn"
    # Weights for larger images than the data set's are refused for evaluation (the 8x8 digits were upsampled).
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sample_size": 16}))
    eval_config = get_config()
    eval_config.data.dataset = "digits"
    with pytest.raises(ValueError, match=r"16x16 images, and data set 'digits' has 8x8"):
        run.load_pretrained(str(tmp_path / "weights"), eval_config, evaluate=True)


def test_sample_py_samples_weights_of_another_process_and_refuses_to_upsample_cifar10_for_them(tmp_path):
    # sample.py cannot take --config.diffusion.*: its refusal of another process named flags it does not have.
    # And --interpolate, --latent and --fid_stats=train read CIFAR-10, which was upsampled to 64x64 weights.
    from tests.test_scripts import sample_py

    weights = tmp_path / "weights"
    _saved_random_diffusers_unet(_layout((32, 32), attn_levels=set(), norm_num_groups=8, sample_size=64), weights)
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": 50, "beta_schedule": "linear",
                 "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "fixed_large"}
    (weights / "scheduler_config.json").write_text(json.dumps(scheduler))
    out_dir = tmp_path / "samples"
    reads = [["--interpolate"], ["--latent"], ["--fid_stats=train"]]
    *refused, sampled = sample_py(
        *([f"--pretrained={weights}", f"--out_dir={out_dir}", *flags] for flags in reads),
        [f"--pretrained={weights}", f"--out_dir={out_dir}", "--sampler=ddim", "--steps=2", "--num=2", "--noprogress"],
    )
    for proc in refused:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "the weights are for 64x64 images, and data set 'cifar10' has 32x32" in proc.stderr, proc.stderr
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    samples = np.load(next(out_dir.glob("samples_ddim2_seed0_pretrained_weights_*.npz")))["samples"]
    assert samples.shape == (2, 64, 64, 3) and np.isfinite(samples).all()
