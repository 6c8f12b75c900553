"""FID Inception-v3 in Flax against an independent float64 PyTorch reference of the same network.

pytorch-fid needs torchvision, which cannot be installed beside torch 2.13.0 here, so the reference below is
written from the architecture description with torch.nn.functional (NCHW, float64). It creates random
weights in pytorch-fid's state-dict layout as it runs; our converter loads them into Flax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special

from ddpm_jax.data import to_uint8
from ddpm_jax.metrics import inception

torch = pytest.importorskip("torch", reason="the reference network needs torch (pip install torch==2.13.0)")
F = torch.nn.functional


class ReferenceInception:
    """pytorch-fid's FIDInceptionV3 forward in float64; missing weights are drawn at first use.

    BatchNorm running statistics are set from the activations they first see (perturbed), so activations stay
    O(1) through all layers instead of exploding or vanishing.
    """

    def __init__(self, seed: int):
        self.state: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64)

    def _uniform(self, low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=self.generator, dtype=torch.float64)

    def conv(self, name, x, out_channels, kernel, stride=1, padding=0):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        weight_key = f"{name}.conv.weight"
        if weight_key not in self.state:
            fan_in = x.shape[1] * kernel[0] * kernel[1]
            self.state[weight_key] = self._randn(out_channels, x.shape[1], *kernel) * (2.0 / fan_in) ** 0.5
        y = F.conv2d(x, self.state[weight_key], stride=stride, padding=padding)
        if f"{name}.bn.running_mean" not in self.state:
            mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3)) + 1e-2
            self.state[f"{name}.bn.running_mean"] = mean + 0.2 * var.sqrt() * self._randn(out_channels)
            self.state[f"{name}.bn.running_var"] = var * self._uniform(0.7, 1.4, out_channels)
            self.state[f"{name}.bn.weight"] = self._uniform(0.6, 1.4, out_channels)
            self.state[f"{name}.bn.bias"] = 0.3 * self._randn(out_channels)
            self.state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
        y = F.batch_norm(
            y,
            self.state[f"{name}.bn.running_mean"],
            self.state[f"{name}.bn.running_var"],
            self.state[f"{name}.bn.weight"],
            self.state[f"{name}.bn.bias"],
            training=False,
            eps=1e-3,
        )
        return F.relu(y)

    @staticmethod
    def avg_pool(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def block_a(self, name, x, pool_features):
        b1 = self.conv(f"{name}.branch1x1", x, 64, 1)
        b5 = self.conv(f"{name}.branch5x5_2", self.conv(f"{name}.branch5x5_1", x, 48, 1), 64, 5, padding=2)
        b3 = self.conv(f"{name}.branch3x3dbl_1", x, 64, 1)
        b3 = self.conv(f"{name}.branch3x3dbl_2", b3, 96, 3, padding=1)
        b3 = self.conv(f"{name}.branch3x3dbl_3", b3, 96, 3, padding=1)
        bp = self.conv(f"{name}.branch_pool", self.avg_pool(x), pool_features, 1)
        return torch.cat([b1, b5, b3, bp], 1)

    def block_b(self, name, x):
        b3 = self.conv(f"{name}.branch3x3", x, 384, 3, stride=2)
        bd = self.conv(f"{name}.branch3x3dbl_1", x, 64, 1)
        bd = self.conv(f"{name}.branch3x3dbl_2", bd, 96, 3, padding=1)
        bd = self.conv(f"{name}.branch3x3dbl_3", bd, 96, 3, stride=2)
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

    def block_c(self, name, x, c7):
        b1 = self.conv(f"{name}.branch1x1", x, 192, 1)
        b7 = self.conv(f"{name}.branch7x7_1", x, c7, 1)
        b7 = self.conv(f"{name}.branch7x7_2", b7, c7, (1, 7), padding=(0, 3))
        b7 = self.conv(f"{name}.branch7x7_3", b7, 192, (7, 1), padding=(3, 0))
        bd = self.conv(f"{name}.branch7x7dbl_1", x, c7, 1)
        bd = self.conv(f"{name}.branch7x7dbl_2", bd, c7, (7, 1), padding=(3, 0))
        bd = self.conv(f"{name}.branch7x7dbl_3", bd, c7, (1, 7), padding=(0, 3))
        bd = self.conv(f"{name}.branch7x7dbl_4", bd, c7, (7, 1), padding=(3, 0))
        bd = self.conv(f"{name}.branch7x7dbl_5", bd, 192, (1, 7), padding=(0, 3))
        bp = self.conv(f"{name}.branch_pool", self.avg_pool(x), 192, 1)
        return torch.cat([b1, b7, bd, bp], 1)

    def block_d(self, name, x):
        b3 = self.conv(f"{name}.branch3x3_2", self.conv(f"{name}.branch3x3_1", x, 192, 1), 320, 3, stride=2)
        b7 = self.conv(f"{name}.branch7x7x3_1", x, 192, 1)
        b7 = self.conv(f"{name}.branch7x7x3_2", b7, 192, (1, 7), padding=(0, 3))
        b7 = self.conv(f"{name}.branch7x7x3_3", b7, 192, (7, 1), padding=(3, 0))
        b7 = self.conv(f"{name}.branch7x7x3_4", b7, 192, 3, stride=2)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    def block_e(self, name, x, max_pool):
        b1 = self.conv(f"{name}.branch1x1", x, 320, 1)
        b3 = self.conv(f"{name}.branch3x3_1", x, 384, 1)
        b3 = torch.cat(
            [
                self.conv(f"{name}.branch3x3_2a", b3, 384, (1, 3), padding=(0, 1)),
                self.conv(f"{name}.branch3x3_2b", b3, 384, (3, 1), padding=(1, 0)),
            ],
            1,
        )
        bd = self.conv(f"{name}.branch3x3dbl_1", x, 448, 1)
        bd = self.conv(f"{name}.branch3x3dbl_2", bd, 384, 3, padding=1)
        bd = torch.cat(
            [
                self.conv(f"{name}.branch3x3dbl_3a", bd, 384, (1, 3), padding=(0, 1)),
                self.conv(f"{name}.branch3x3dbl_3b", bd, 384, (3, 1), padding=(1, 0)),
            ],
            1,
        )
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else self.avg_pool(x)
        bp = self.conv(f"{name}.branch_pool", pooled, 192, 1)
        return torch.cat([b1, b3, bd, bp], 1)

    def __call__(self, x):
        """x: NCHW float64 in [-1, 1] -> (pool [N, 2048], logits [N, 1008])."""
        x = self.conv("Conv2d_1a_3x3", x, 32, 3, stride=2)
        x = self.conv("Conv2d_2a_3x3", x, 32, 3)
        x = self.conv("Conv2d_2b_3x3", x, 64, 3, padding=1)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv("Conv2d_3b_1x1", x, 80, 1)
        x = self.conv("Conv2d_4a_3x3", x, 192, 3)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.block_a("Mixed_5b", x, 32)
        x = self.block_a("Mixed_5c", x, 64)
        x = self.block_a("Mixed_5d", x, 64)
        x = self.block_b("Mixed_6a", x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = self.block_c(name, x, c7)
        x = self.block_d("Mixed_7a", x)
        x = self.block_e("Mixed_7b", x, max_pool=False)
        x = self.block_e("Mixed_7c", x, max_pool=True)
        pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        if "fc.weight" not in self.state:
            self.state["fc.weight"] = self._randn(1008, 2048) / 2048**0.5
            self.state["fc.bias"] = self._randn(1008)
        return pool, pool @ self.state["fc.weight"].T + self.state["fc.bias"]


@pytest.fixture(scope="module")
def reference_and_ours():
    """Reference outputs on 4 random 107x107 images, and ours (float64 and float32) from converted weights."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, size=(4, 107, 107, 3))
    reference = ReferenceInception(seed=0)
    with torch.no_grad():
        pool, logits = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    state_dict = {key: value.numpy() for key, value in reference.state.items()}
    to_numpy = lambda outputs: {k: np.asarray(v, np.float64) for k, v in outputs.items()}
    with jax.enable_x64(True):
        # In float64 rounding drops out, so any difference is an architecture or conversion error.
        variables64 = inception.convert_state_dict(state_dict, dtype=jnp.float64)
        ours64 = to_numpy(inception.inception_forward(variables64, images, resize=False, quantize=False))
    variables32 = inception.convert_state_dict(state_dict)
    ours32 = inception.inception_forward(variables32, images.astype(np.float32), resize=False, quantize=False)
    return pool.numpy(), logits.numpy(), state_dict, {64: ours64, 32: to_numpy(ours32)}


@pytest.mark.parametrize("bits", [64, 32])
def test_pool_features_match_reference(reference_and_ours, bits):
    ref_pool, _, _, ours = reference_and_ours
    assert ref_pool.shape == ours[bits]["pool"].shape == (4, 2048)
    # Random BN statistics kept the features O(1): a meaningful scale for the tolerance.
    assert 0.05 < np.abs(ref_pool).mean() < 20
    scale = np.abs(ref_pool).max()
    if bits == 64:
        np.testing.assert_allclose(ours[64]["pool"], ref_pool, rtol=1e-9, atol=1e-9 * scale)
    else:
        # float32 rounding through ~20 conv + BN layers (BN subtracts large means): measured median 7.5e-6,
        # max 2.4e-4 of the largest feature.
        error = np.abs(ours[32]["pool"] - ref_pool) / scale
        assert np.median(error) < 5e-5 and np.max(error) < 1e-3


@pytest.mark.parametrize("bits", [64, 32])
def test_logits_match_reference(reference_and_ours, bits):
    ref_pool, ref_logits, state_dict, ours = reference_and_ours
    tolerance = (1e-9 if bits == 64 else 1e-3) * np.abs(ref_logits).max()
    np.testing.assert_allclose(ours[bits]["logits"], ref_logits, atol=tolerance)
    unbiased = ref_pool @ state_dict["fc.weight"].T
    np.testing.assert_allclose(ours[bits]["logits_unbiased"], unbiased, atol=tolerance)


def test_compute_features_quantizes_repeats_gray_and_pads_the_last_batch(reference_and_ours):
    """5 grey images in batches of 4: 8-bit rounding, grey -> RGB and the padded last batch, against direct calls;
    the same as uint8 through compute_stats."""
    variables = inception.convert_state_dict(reference_and_ours[2])
    gray = np.random.default_rng(1).uniform(-1.0, 1.0, size=(5, 107, 107, 1)).astype(np.float32)
    features = inception.compute_features(gray, variables, batch_size=4, resize=False, quantize=True)
    levels = np.round((gray.astype(np.float64) + 1.0) * 127.5) / 127.5 - 1.0  # the 8-bit grid of a PNG
    rgb = np.repeat(levels, 3, axis=-1).astype(np.float32)
    # Batches of 4, the shape the fixture already ran, so no new compilation.
    first, last = (inception.inception_forward(variables, x, resize=False, quantize=False) for x in (rgb[:4], rgb[1:]))
    expected = np.concatenate([np.asarray(first["pool"]), np.asarray(last["pool"])[-1:]])
    assert features["pool"].shape == (5, 2048)
    # The grid points differ by float32 rounding between the two paths; the network amplifies that as in the
    # float32 parity test above, so the same bounds (relative to the largest feature) apply.
    error = np.abs(features["pool"] - expected) / np.abs(expected).max()
    assert np.median(error) < 5e-5 and np.max(error) < 1e-3
    # uint8 images reach the network as the same grid points, and their statistics, merged batch by batch
    # (4 + 1 images), are those of all the features at once.
    as_uint8 = np.round((gray.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    mu, sigma = inception.compute_stats(as_uint8, variables, batch_size=4, resize=False)
    np.testing.assert_allclose(mu, features["pool"].mean(0), rtol=1e-12, atol=1e-12 * np.abs(mu).max())
    np.testing.assert_allclose(sigma, np.cov(features["pool"], rowvar=False), rtol=1e-12,
                               atol=1e-12 * np.abs(sigma).max())


def test_rows_of_infinite_images_are_nan_and_other_integer_images_are_refused(reference_and_ours):
    variables = inception.convert_state_dict(reference_and_ours[2])
    gray = np.random.default_rng(3).uniform(-1.0, 1.0, size=(4, 107, 107, 1)).astype(np.float32)
    gray[1, 5, 5], gray[2, 7, 7] = np.inf, -np.inf  # 8-bit quantisation clipped these to white and black
    # Batches of 4 grey images with quantisation: the shape compiled above.
    features = inception.compute_features(gray, variables, batch_size=4, resize=False, quantize=True)
    for name in inception.OUTPUTS:
        assert np.isnan(features[name][1:3]).all() and np.isfinite(features[name][[0, 3]]).all()
    mu, _ = inception.compute_stats(gray, variables, batch_size=4, resize=False)
    assert np.isnan(mu).all()
    with pytest.raises(ValueError, match="must be uint8"):
        inception.compute_features(np.zeros((4, 107, 107, 1), np.int32), variables, batch_size=4, resize=False)
    # Floats halfway between two 8-bit levels reach the network as the levels of the PNGs that to_uint8
    # writes (float32 rounding inside the network's jit put about a quarter of them one level off).
    halfway = ((np.arange(4 * 107 * 107) % 255 + 0.5) / 127.5 - 1.0).astype(np.float32).reshape(4, 107, 107, 1)
    from_floats = inception.compute_features(halfway, variables, batch_size=4, resize=False, quantize=True)
    from_png_values = inception.compute_features(to_uint8(halfway), variables, batch_size=4, resize=False)
    np.testing.assert_array_equal(from_floats["pool"], from_png_values["pool"])


def test_converter_rejects_wrong_state_dict(reference_and_ours):
    state_dict = dict(reference_and_ours[2])
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="missing"):
        inception.convert_state_dict(state_dict)
    state_dict = dict(reference_and_ours[2])
    state_dict["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3))
    with pytest.raises(ValueError, match="wrong shape"):
        inception.convert_state_dict(state_dict)


@pytest.mark.parametrize("in_size", [(32, 28), (400, 331)])
def test_resize_matches_torch_interpolate(in_size):
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, *in_size, 3)).astype(np.float32)
    ours = np.asarray(inception.resize_bilinear(images))
    expected = F.interpolate(
        torch.from_numpy(images.transpose(0, 3, 1, 2)).double(), size=(299, 299), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), atol=2e-6)


def test_stats_file_round_trip_and_fid(tmp_path):
    rng = np.random.default_rng(2)
    features_a, features_b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(400, 16))
    paths = []
    for name, features in (("a", features_a), ("b", features_b)):
        path = str(tmp_path / f"{name}.npz")
        inception.save_stats(path, features.mean(0), np.cov(features, rowvar=False))
        paths.append(path)
    # Independent float64 oracle: the trace of (S1 S2)^(1/2) from the eigenvalues of S1^(1/2) S2 S1^(1/2).
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root_a = scipy.linalg.sqrtm(sigma_a).real
    eigenvalues = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b) - 2 * np.sum(np.sqrt(eigenvalues))
    assert inception.fid_from_stats(*paths) == pytest.approx(expected, rel=1e-8)
    assert inception.fid_from_stats(paths[0], (mu_a, sigma_a)) == pytest.approx(0.0, abs=1e-6)
    # Damaged or foreign files: one ValueError naming the file (NumPy's BadZipFile, EOFError, or its advice to
    # allow pickles before).
    with open(paths[0], "rb") as f:
        content = f.read()
    middle = len(content) // 3
    flipped = content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]  # a member's CRC fails
    damaged = {"truncated.npz": content[: len(content) // 2], "empty.npz": b"", "text.npz": b"mu, sigma\n",
               "corrupted.npz": flipped}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name} is not a readable FID statistics \.npz"):
            inception.fid_from_stats(str(tmp_path / name), paths[1])
    np.save(tmp_path / "one.npy", mu_a)
    with pytest.raises(ValueError, match="one.npy is not an FID statistics file"):
        inception.load_stats(str(tmp_path / "one.npy"))


def test_inception_score_matches_numpy_formula():
    logits = np.random.default_rng(3).normal(scale=3.0, size=(100, 1008))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for k in range(10):
        part = probs[k * 10 : (k + 1) * 10]
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1)
        scores.append(np.exp(kl.mean()))
    mean, std = inception.inception_score(logits, splits=10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-10)
    # One confident class everywhere scores 1; ten equally used confident classes score 10.
    one_class = np.full((100, 1008), -50.0)
    one_class[:, 0] = 50.0
    assert inception.inception_score(one_class, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    ten_classes = np.full((100, 1008), -50.0)
    ten_classes[np.arange(100), np.arange(100) % 10] = 50.0
    assert inception.inception_score(ten_classes, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_running_inception_score_of_uneven_batches_and_splits():
    """103 samples in 10 splits of 11 or 10 (np.array_split's), given in batches of 7 that straddle the splits."""
    logits = np.random.default_rng(4).normal(scale=3.0, size=(103, 50))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1)))
              for part in np.array_split(probs, 10)]
    running = inception.RunningInceptionScore(103)
    for start in range(0, 103, 7):
        running.update(logits[start : start + 7])
    mean, std = running.score()
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-10)
    with pytest.raises(ValueError, match="more than the 103 samples announced"):
        running.update(logits[:1])
    with pytest.raises(ValueError, match="2 of the 103 samples announced were given"):
        partial = inception.RunningInceptionScore(103)
        partial.update(logits[:2])
        partial.score()
