"""FID and Inception Score of a run's samples (`sample.py --fid_stats`, `--png_dir`), with random Inception weights.

The network itself is checked against an independent float64 reference in test_inception.py; here the
question is whether the right images reach it: every sample drawn, the data split's first images, the cached
statistics file, and the bad inputs that must stop before any sampling.
"""

import functools

import numpy as np
import pytest
from PIL import Image

from configs import swissroll
from ddpm_jax import generation
from ddpm_jax.data import load_split, uint8_to_float
from ddpm_jax.metrics import inception
from tests.multihost_worker import tiny_unet

NUM_IMAGES = 10  # data and samples: one compiled Inception batch; the Inception Score's 10 splits need 10


def random_fid_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """pytorch-fid's state-dict layout with random weights: He-normal convolutions, BatchNorm as the identity."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):  # drawn in float32: twice as fast as float64 for the 24M weights
        return rng.standard_normal(shape, np.float32) * np.float32(std)

    state = {}
    for (_, *module, name), shape in inception._expected_shapes().items():
        prefix = ".".join(module)
        if module == ["fc"]:
            torch_shape = shape[::-1] if name == "kernel" else shape
            state[f"fc.{'weight' if name == 'kernel' else 'bias'}"] = normal(torch_shape, 2048**-0.5)
        elif name == "kernel":  # HWIO -> OIHW
            height, width, fan_in, out = shape
            state[f"{prefix}.weight"] = normal((out, fan_in, height, width), (2 / (height * width * fan_in)) ** 0.5)
        else:
            torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
            fill = np.ones if name in ("scale", "var") else np.zeros
            state[f"{prefix}.{torch_name}"] = fill(shape, np.float32)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("inception") / "fid_inception.npz")
    np.savez(path, **random_fid_state_dict())
    return path


def direct_features(images: np.ndarray, variables: dict) -> dict[str, np.ndarray]:
    """The network on all images in one call, outside compute_features' batching."""
    return {k: np.asarray(v, np.float64) for k, v in inception.inception_forward(variables, images).items()}


def test_fid_and_inception_score_of_every_sample_against_the_cached_data_statistics(
    weights_file, monkeypatch, tmp_path, capsys
):
    config, model, schedule, params = tiny_unet()
    config = config.copy_and_resolve_references()
    config.sampling.num_samples = config.sampling.batch_size = NUM_IMAGES
    split_stats_calls = []

    def first_images_only(config, split, variables, **kwargs):  # the whole split takes minutes on a CPU
        split_stats_calls.append(split)
        return real_data_fid_stats(config, split, variables, num_examples=NUM_IMAGES, progress=False)

    real_data_fid_stats = generation.data_fid_stats
    monkeypatch.setattr(generation, "data_fid_stats", first_images_only)
    out_dir = str(tmp_path)
    stats, variables = generation.load_fid_reference(
        config, "train", inception_weights=weights_file, out_dir=out_dir, progress=False
    )
    # Named with the weights' sha256 prefix: statistics under other weights are not reused.
    cached = tmp_path / f"fid_stats_digits_8px_train_inception{inception.file_sha256(weights_file)[:8]}.npz"
    assert split_stats_calls == ["train"] and cached.exists()
    again = generation.load_fid_reference(config, "train", inception_weights=weights_file, out_dir=out_dir)
    assert split_stats_calls == ["train"]  # read from the file this time
    np.testing.assert_array_equal(again[0][1], stats[1])
    other_weights = str(tmp_path / "other_weights.npz")
    np.savez(other_weights, **random_fid_state_dict(seed=1))
    generation.load_fid_reference(config, "train", inception_weights=other_weights, out_dir=out_dir, progress=False)
    assert split_stats_calls == ["train", "train"]

    data = uint8_to_float(load_split(config.data, "train")[0][:NUM_IMAGES])
    data_pool = direct_features(data, variables)["pool"]
    np.testing.assert_allclose(stats[0], data_pool.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats[1], np.cov(data_pool, rowvar=False), rtol=1e-6, atol=1e-9)

    png_dir = tmp_path / "pngs"
    png_dir.mkdir()
    for name in (f"{NUM_IMAGES + 5:06d}.png", "000000.png", "notes.txt"):  # an earlier, larger call's; not ours
        (png_dir / name).write_bytes(b"old")
    result = generation.generate(
        config, model, schedule, params, out_dir=out_dir, tag="fid", fid_reference=(stats, variables),
        png_dir=str(png_dir), progress=False,
    )
    samples = np.load(result["npz"])["samples"]
    assert samples.shape == (NUM_IMAGES, 8, 8, 1)
    assert f"warning: FID of {NUM_IMAGES} samples: below 2048 their 2048-d covariance is singular" \
        in capsys.readouterr().err
    # One PNG per sample for external FID tools, holding the 8-bit levels the FID here scored.
    assert sorted(p.name for p in png_dir.iterdir()) == [f"{i:06d}.png" for i in range(NUM_IMAGES)] + ["notes.txt"]
    levels = np.clip(np.rint((samples.astype(np.float64) + 1) * 127.5), 0, 255)
    for i in (0, NUM_IMAGES - 1):
        np.testing.assert_array_equal(np.asarray(Image.open(png_dir / f"{i:06d}.png")), levels[i, ..., 0])
    features = direct_features(samples, variables)
    with pytest.raises(ValueError, match="inception_forward takes float images in"):  # uint8 was clipped to white
        inception.inception_forward(variables, levels.astype(np.uint8))
    metrics = result["metrics"]
    assert metrics["fid_samples"] == NUM_IMAGES
    # Every sample: FID from the network run here on all of them.
    expected_fid = inception.fid_from_stats((features["pool"].mean(0), np.cov(features["pool"], rowvar=False)), stats)
    assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-5)
    assert metrics["fid"] > 0.1 * np.trace(stats[1])  # an untrained model's noise is far from the digits
    assert (metrics["inception_score"], metrics["inception_score_std"]) == pytest.approx(
        inception.inception_score(features["logits_unbiased"]), rel=1e-5
    )


def test_bad_fid_inputs_stop_before_any_sampling(weights_file, tmp_path):
    config = tiny_unet()[0]
    load = functools.partial(
        generation.load_fid_reference, config, inception_weights=weights_file, out_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="no such statistics file, and not a split name"):
        load("missing.npz")
    small = str(tmp_path / "small.npz")
    inception.save_stats(small, np.zeros(16), np.eye(16))
    with pytest.raises(ValueError, match=r"statistics of \(16,\) features, not of Inception's 2048"):
        load(small)
    with pytest.raises(ValueError, match="no FID Inception weights at"):
        load(small, inception_weights=str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="one PNG per sample is for images"):
        generation.generate(
            swissroll.get_config(), None, None, None, out_dir=str(tmp_path), tag="x", png_dir=str(tmp_path)
        )
    few = config.copy_and_resolve_references()
    few.sampling.num_samples = 1
    with pytest.raises(ValueError, match="FID needs at least 2 samples"):
        generation.generate(few, None, None, None, out_dir=str(tmp_path), tag="x", fid_reference=((0, 0), {}))
    assert list(tmp_path.iterdir()) == [tmp_path / "small.npz"]
    # Files that are not the weights: torch's unpickler raised its own error with a traceback.
    for name in ("garbage.pth", "garbage.npz"):
        garbage = tmp_path / name
        garbage.write_bytes(b"<html>not found</html>")
        if name.endswith(".pth"):
            pytest.importorskip("torch")
        with pytest.raises(ValueError, match=rf"{garbage} is not a readable copy of pytorch-fid's FID Inception"):
            inception.load_fid_inception(str(garbage))
