"""Data: digits builder vs scikit-learn, (seed, step) determinism, flips, scaling, shards, 2-D sets, tfds."""

import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddpm_jax.data import (
    DATASETS,
    TOY_SETS,
    ArrayDataset,
    load_split,
    make_dataset,
    resize_images,
    sample_toy,
    show_tfds_progress,
    uint8_to_float,
)
from ddpm_jax.data import images as images_module


def data_config(**fields) -> ml_collections.ConfigDict:
    """A config.data group with the given fields."""
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A data dir with the digits set prepared once for the module."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    load_split(data_config(dataset="digits", image_size=8, num_channels=1), "test", data_dir=data_dir)
    return data_dir


def asymmetric_images(num: int, size: int = 6) -> np.ndarray:
    """uint8 [num, size, size, 1] images, each distinct and none equal to its mirror image."""
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, size=(num, size, size, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(num) % 256  # row-ids in a corner
    images[:, 0, -1, 0] = 255 - images[:, 0, 0, 0]  # so the mirror differs from the original
    images[:, 1, 0, 0] = np.arange(num) // 256
    return images


def test_digits_builder_matches_sklearn(digits_dir):
    from sklearn.datasets import load_digits

    config = data_config(dataset="digits", image_size=8, num_channels=1)
    train_images, train_labels = load_split(config, "train", data_dir=digits_dir)
    test_images, test_labels = load_split(config, "test", data_dir=digits_dir)
    assert (len(train_images), len(test_images)) == (1500, 297)
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (8, 8, 1)
    digits = load_digits()
    expected = np.round(digits.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(np.concatenate([train_images, test_images]), expected)
    np.testing.assert_array_equal(np.concatenate([train_labels, test_labels]), digits.target)


def test_digits_prepared_by_two_at_once(tmp_path, monkeypatch):
    """The processes of a multi-process run prepare the digits set at the same time on first use: both get it
    (the second one's final rename failed with FileExistsError, and that process died while the other hung)."""
    from ddpm_jax.data import digits

    both_started = threading.Barrier(2, timeout=30)
    prepare = digits.SklearnDigits.download_and_prepare
    monkeypatch.setattr(digits.SklearnDigits, "download_and_prepare",
                        lambda self, *a, **k: (both_started.wait(), prepare(self, *a, **k))[1])
    results = [None, None]

    def load(i):
        try:
            results[i] = load_split(data_config(dataset="digits", image_size=8, num_channels=1), "test",
                                    data_dir=str(tmp_path))[0]
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [type(r) for r in results] == [np.ndarray, np.ndarray], results
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0].shape == (297, 8, 8, 1)


def test_tfds_progress_bars_switched_off(tmp_path, capfd):
    """show_tfds_progress(False) (train.py and sample.py with --noprogress) silences tfds's bars while it prepares
    a data set: they filled logs with carriage-return lines."""
    config = data_config(dataset="digits", image_size=8, num_channels=1)
    try:
        show_tfds_progress(False)
        load_split(config, "test", data_dir=str(tmp_path / "quiet"))
        quiet = capfd.readouterr().err
        show_tfds_progress(True)
        load_split(config, "test", data_dir=str(tmp_path / "shown"))
        shown = capfd.readouterr().err
    finally:
        show_tfds_progress(True)
    assert "Generating splits" in shown and "Generating splits" not in quiet, quiet


def test_digits_upsampled_to_16_by_pixel_repetition(digits_dir):
    small, _ = load_split(
        data_config(dataset="digits", image_size=8, num_channels=1), "test", data_dir=digits_dir
    )
    large, _ = load_split(
        data_config(dataset="digits", image_size=16, num_channels=1), "test", data_dir=digits_dir
    )
    assert large.shape == (297, 16, 16, 1)
    blocks = large.reshape(297, 8, 2, 8, 2, 1)
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(blocks[:, :, i, :, j], small)


def test_first_examples_read_alone(digits_dir, monkeypatch):
    """num_examples reads only the split's first examples (an eval of 64 CelebA images decoded all 19,962) and
    they are those of the whole split."""
    config = data_config(dataset="digits", image_size=16, num_channels=1, random_flip=False)
    whole, whole_labels = load_split(config, "test", data_dir=digits_dir)
    read = set()
    open_source = images_module._open_tfds_source

    class Watched:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            read.add(i)
            return self.source[i]

    monkeypatch.setattr(images_module, "_open_tfds_source", lambda *args: Watched(open_source(*args)))
    first, first_labels = load_split(config, "test", data_dir=digits_dir, num_examples=10)
    assert read == set(range(10))
    np.testing.assert_array_equal(first, whole[:10])
    np.testing.assert_array_equal(first_labels, whole_labels[:10])
    dataset = make_dataset(config, "test", batch_size=4, seed=0, data_dir=digits_dir, num_examples=1000)
    assert dataset.num_examples == len(whole)
    np.testing.assert_array_equal(dataset.examples, make_dataset(config, "test", batch_size=4, seed=0,
                                                                 data_dir=digits_dir).examples)
    points, _ = load_split(data_config(dataset="swissroll"), "test", num_examples=7)
    np.testing.assert_array_equal(points, load_split(data_config(dataset="swissroll"), "test")[0][:7])
    with pytest.raises(ValueError, match="num_examples must be at least 1"):
        load_split(config, "test", data_dir=digits_dir, num_examples=0)


def test_digits_dataset_batches_in_range(digits_dir):
    config = data_config(dataset="digits", image_size=16, num_channels=1, random_flip=False)
    ds = make_dataset(config, "train", batch_size=100, seed=0, data_dir=digits_dir)
    batch = ds.batch(3)
    assert batch["image"].shape == (100, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert ds.steps_per_epoch == 15


def test_uint8_to_float_is_exact():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    scaled = uint8_to_float(pixels)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, (pixels.astype(np.float64) / 127.5 - 1.0).astype(np.float32))
    assert scaled[0, 0] == -1.0 and scaled[-1, -1] == 1.0
    with pytest.raises(ValueError, match="expected uint8 pixels, got int64"):  # -1 was white
        uint8_to_float(np.array([-1, 0, 255]))


def test_batches_depend_only_on_seed_and_step():
    images = asymmetric_images(60)
    labels = np.arange(60) % 10
    make = lambda seed: ArrayDataset(images, labels, batch_size=12, seed=seed)
    ds = make(7)
    epoch_ids = [ds.global_indices(step) for step in range(5)]
    # Every example once per epoch (60 = 5 x 12).
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch_ids)), np.arange(60))
    # A fresh dataset (a resumed run) jumping straight to step 13 sees what the first saw at step 13.
    later = ds.batch(13)
    np.testing.assert_array_equal(make(7).batch(13)["image"], later["image"])
    np.testing.assert_array_equal(make(7).batch(13)["label"], later["label"])
    # The batch carries the right examples, scaled.
    ids = ds.global_indices(13)
    np.testing.assert_array_equal(later["image"], uint8_to_float(images[ids]))
    np.testing.assert_array_equal(later["label"], labels[ids])
    assert not np.array_equal(ds.global_indices(0), ds.global_indices(1))
    # The next epoch is another permutation; another seed another order.
    assert not np.array_equal(
        np.concatenate(epoch_ids), np.concatenate([ds.global_indices(s) for s in range(5, 10)])
    )
    assert not np.array_equal(make(8).global_indices(0), ds.global_indices(0))


def test_partial_last_batch_is_dropped_each_epoch():
    ds = ArrayDataset(asymmetric_images(50), np.zeros(50), batch_size=16, seed=0)
    assert ds.steps_per_epoch == 3
    seen = np.concatenate([ds.global_indices(step) for step in range(3)])
    assert len(np.unique(seen)) == 48


def test_flips_only_when_configured_and_only_mirrors():
    images = asymmetric_images(64)
    ids_plain = ArrayDataset(images, np.zeros(64), batch_size=32, seed=1).global_indices(2)
    plain = ArrayDataset(images, np.zeros(64), batch_size=32, seed=1).batch(2)["image"]
    np.testing.assert_array_equal(plain, uint8_to_float(images[ids_plain]))

    flipping = ArrayDataset(images, np.zeros(64), batch_size=32, seed=1, random_flip=True)
    flipped_counts = []
    for step in range(4):
        batch = flipping.batch(step)["image"]
        originals = uint8_to_float(images[flipping.global_indices(step)])
        is_original = np.all(batch == originals, axis=(1, 2, 3))
        is_mirror = np.all(batch == originals[:, :, ::-1], axis=(1, 2, 3))
        assert np.all(is_original ^ is_mirror)
        flipped_counts.append(int(is_mirror.sum()))
        again = ArrayDataset(images, np.zeros(64), batch_size=32, seed=1, random_flip=True).batch(step)[
            "image"
        ]
        np.testing.assert_array_equal(again, batch)
    # About half flipped (binomial(32, 0.5) stays within 4..28 with probability 1 - 1e-5 per step).
    assert all(4 <= count <= 28 for count in flipped_counts)


def test_random_flip_is_rejected_for_points_and_eval_split_is_unflipped(digits_dir):
    points = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="random_flip"):
        ArrayDataset(points, np.zeros(10), batch_size=5, seed=0, random_flip=True)
    with pytest.raises(ValueError, match="got float32 of shape"):  # float images were batched unscaled
        ArrayDataset(np.full((10, 4, 4, 1), 255.0, np.float32), np.zeros(10), batch_size=5, seed=0)
    config = data_config(dataset="digits", image_size=8, num_channels=1, random_flip=True)
    assert make_dataset(config, "train", batch_size=10, seed=0, data_dir=digits_dir).random_flip
    assert not make_dataset(config, "test", batch_size=10, seed=0, data_dir=digits_dir).random_flip


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_make_the_global_batch(process_count):
    images = asymmetric_images(96)
    labels = np.arange(96) % 10
    whole = ArrayDataset(images, labels, batch_size=24, seed=5, random_flip=True)
    shards = [
        ArrayDataset(
            images,
            labels,
            batch_size=24,
            seed=5,
            random_flip=True,
            process_index=p,
            process_count=process_count,
        )
        for p in range(process_count)
    ]
    for step in (0, 3, 11):
        parts = [shard.batch(step) for shard in shards]
        assert all(part["image"].shape[0] == 24 // process_count for part in parts)
        global_batch = whole.batch(step)
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), global_batch["image"])
        np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), global_batch["label"])
        # Disjoint: the corner pixel holds the example id, and no id appears in two shards.
        ids = [set(np.round((p["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)) for p in parts]
        assert sum(len(s) for s in ids) == len(set.union(*ids)) == 24
    # 50 examples in batches of 24: two full batches and one padded batch with 2 real rows.
    ordered = [list(shard.ordered_batches(batch_size=24, num_examples=50)) for shard in shards]
    assert all(len(batches) == 3 for batches in ordered)
    for k, global_ordered in enumerate(whole.ordered_batches(batch_size=24, num_examples=50)):
        for key in ("image", "mask"):
            np.testing.assert_array_equal(np.concatenate([o[k][key] for o in ordered]), global_ordered[key])
        mask = global_ordered["mask"]
        assert global_ordered["image"].shape[0] == 24 and mask.sum() == min(24, 50 - 24 * k)
        expected = uint8_to_float(images[24 * k : min(24 * (k + 1), 50)])
        np.testing.assert_array_equal(global_ordered["image"][mask], expected)


def test_bad_batching_arguments_raise():
    images = asymmetric_images(20)
    with pytest.raises(ValueError, match="divisible"):
        ArrayDataset(images, np.zeros(20), batch_size=10, seed=0, process_count=3)
    # A batch larger than the split: shuffled training batches cannot be drawn, padded evaluation batches can.
    larger = ArrayDataset(images, np.zeros(20), batch_size=21, seed=0)
    with pytest.raises(ValueError, match=r"batch size must be in 1..20 \(the split's size\), got 21"):
        larger.batch(0)
    (only,) = larger.ordered_batches()
    assert only["mask"].sum() == 20 and only["image"].shape[0] == 21
    np.testing.assert_array_equal(only["image"][:20], uint8_to_float(images))
    with pytest.raises(ValueError, match="process_index"):
        ArrayDataset(images, np.zeros(20), batch_size=10, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"num_examples must be at least 1 \(None: all\), got -3"):  # no batch
        list(larger.ordered_batches(num_examples=-3))
    # uint8 images without their channel axis were batched as they are, 0..255 instead of [-1, 1].
    with pytest.raises(ValueError, match=r"uint8 examples must be images \[N, H, W, C\], got shape \(20, 6, 6\)"):
        ArrayDataset(images[..., 0], np.zeros(20), batch_size=10, seed=0)


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_sets_are_centred_unit_variance_and_seeded(name):
    points = sample_toy(name, 200_000, np.random.default_rng(0))
    assert points.shape == (200_000, 2) and points.dtype == np.float32 and np.all(np.isfinite(points))
    # Scaled so the mean per-axis variance is 1 (within 3%, far above the Monte-Carlo error here).
    assert abs(points.var(axis=0).mean() - 1.0) < 0.03
    assert np.all(np.abs(points.mean(axis=0)) < 0.05)
    np.testing.assert_array_equal(
        sample_toy(name, 100, np.random.default_rng(3)), sample_toy(name, 100, np.random.default_rng(3))
    )


def test_toy_set_geometry():
    # 8 gaussians: every point near one of 8 centres on a circle of radius sqrt(2 * 0.99).
    points = sample_toy("8gaussians", 10_000, np.random.default_rng(1)).astype(np.float64)
    angles = np.arange(8) * np.pi / 4
    centres = np.sqrt(1.98) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    nearest = np.min(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
    assert np.quantile(nearest, 0.999) < 0.5
    # Checkerboard: (unscaled) cells (column, row) with column + row even only.
    cells = np.floor(sample_toy("checkerboard", 10_000, np.random.default_rng(2)) * np.sqrt(4.0 / 3.0))
    assert np.all((cells.sum(axis=1) % 2) == 0) and len(np.unique(cells, axis=0)) == 8


def test_toy_splits_and_unknown_names():
    config = data_config(dataset="moons", num_train=500)
    train, labels = load_split(config, "train")
    test, _ = load_split(config, "test")
    assert train.shape == (500, 2) and labels.shape == (500,) and test.shape == (10_000, 2)
    np.testing.assert_array_equal(load_split(config, "train")[0], train)
    assert not np.array_equal(train, test[:500])
    batch = make_dataset(config, "train", batch_size=50, seed=0).batch(0)
    assert batch["image"].shape == (50, 2) and batch["image"].dtype == np.float32
    with pytest.raises(ValueError, match="swissroll"):
        sample_toy("spiral", 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cifar10"):
        load_split(data_config(dataset="imagenet"), "train")
    assert DATASETS["cifar10"].shape == (32, 32, 3) and DATASETS["moons"].kind == "toy"


def test_mocked_tfds_mnist_pipeline():
    config = data_config(dataset="mnist", image_size=28, num_channels=1, random_flip=False)
    with tfds.testing.mock_data(num_examples=40):
        source = tfds.data_source("mnist", split="train")
        expected = np.stack([np.asarray(source[i]["image"]) for i in range(40)])
        expected_labels = np.array([source[i]["label"] for i in range(40)])
        ds = make_dataset(config, "train", batch_size=8, seed=0, download=False)
        ds32 = make_dataset(
            data_config(dataset="mnist", image_size=32, num_channels=1), "test", batch_size=8, seed=0
        )
    np.testing.assert_array_equal(ds.examples, expected)
    np.testing.assert_array_equal(ds.labels, expected_labels)
    batch = ds.batch(4)
    np.testing.assert_array_equal(batch["image"], uint8_to_float(expected[ds.global_indices(4)]))
    assert batch["image"].shape == (8, 28, 28, 1)
    assert ds32.batch(0)["image"].shape == (8, 32, 32, 1)


def test_mocked_celeba_is_cropped_and_resized():
    config = data_config(dataset="celeba64", image_size=64, num_channels=3)
    with tfds.testing.mock_data(num_examples=3):
        images, labels = load_split(config, "train", download=False)
        source = tfds.data_source("celeb_a", split="train")
        first = np.asarray(source[0]["image"])
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8 and np.all(labels == 0)
    crop = first[39:179, 19:159]
    np.testing.assert_array_equal(images[0], resize_images(crop[None], 64)[0])


def test_a_data_dir_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    images, _ = load_split(data_config(dataset="digits", image_size=8, num_channels=1, data_dir="~/tfds"), "test")
    assert images.shape == (297, 8, 8, 1)
    # Prepared in $HOME/tfds; tfds had taken '~' as a folder of the working directory.
    assert (tmp_path / "home" / "tfds" / "sklearn_digits").is_dir() and not (tmp_path / "~").exists()


def test_an_empty_digits_version_folder_is_named_with_what_to_do(tmp_path):
    # tfds's download_and_prepare leaves an existing version folder alone, so the split read failed later with
    # "splits is empty", naming no folder.
    version_dir = tmp_path / "sklearn_digits" / "1.0.0"
    version_dir.mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"{version_dir} exists but holds no prepared digits set.*remove it"):
        load_split(data_config(dataset="digits", image_size=8, num_channels=1), "train", data_dir=str(tmp_path))


def test_a_set_tfds_cannot_open_as_array_record_says_how_to_prepare_it(tmp_path, monkeypatch):
    # A set prepared as TFRecord (tfds's default): tfds.builder raised its own "File format is already set".
    def unreadable(*args, **kwargs):
        raise ValueError("File format is already set to FileFormat.TFRECORD. Got FileFormat.ARRAY_RECORD")

    monkeypatch.setattr(tfds, "data_source", unreadable)
    monkeypatch.setattr(tfds, "builder", unreadable)
    expected = (r"(?s)'mnist' .* in .* cannot be opened as array_record: File format is already set"
                r".*download_and_prepare.*TensorFlow is needed to read TFRecord")
    with pytest.raises(ValueError, match=expected):
        load_split(data_config(dataset="mnist", image_size=28, num_channels=1), "train", data_dir=str(tmp_path))


def test_channel_mismatch_raises(digits_dir):
    with pytest.raises(ValueError, match="num_channels"):
        load_split(data_config(dataset="digits", image_size=8, num_channels=3), "train", data_dir=digits_dir)


def test_unprepared_set_without_download_fails_fast_and_clearly(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        load_split(
            data_config(dataset="cifar10", image_size=32, num_channels=3),
            "train",
            data_dir=str(tmp_path),
            download=False,
        )
    assert time.perf_counter() - start < 10.0
    message = str(error.value)
    assert "'cifar10'" in message and "not prepared" in message and "download_and_prepare" in message
    assert str(tmp_path) in message


def test_unreachable_download_fails_fast_without_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "_PROBE_ADDRESS", ("tfds-probe.invalid", 443))
    monkeypatch.setattr(images_module, "_tensorflow_installed", lambda: True)

    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not start when the probe fails")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="fashion_mnist.*unreachable"):
        load_split(
            data_config(dataset="fashion_mnist", image_size=28, num_channels=1),
            "train",
            data_dir=str(tmp_path),
            download=True,
        )
    assert time.perf_counter() - start < 10.0


def _no_download_allowed(*args, **kwargs):
    raise AssertionError("nothing may be downloaded")


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_a_set_tfds_prepares_with_tensorflow_is_refused_without_it_before_downloading(
        tmp_path, monkeypatch, dataset):
    # tfds encodes these sets' NumPy images with TensorFlow: it downloaded them and then failed at the first image.
    monkeypatch.setattr(images_module, "_tensorflow_installed", lambda: False)
    monkeypatch.setattr(images_module, "_internet_reachable", _no_download_allowed)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_download_allowed)
    config = data_config(dataset=dataset, image_size=8, num_channels=DATASETS[dataset].num_channels)
    with pytest.raises(ValueError, match=rf"(?s)'{dataset}'.*not prepared.*TensorFlow, which is not installed"
                                         r".*pip install tensorflow.*download_and_prepare"):
        load_split(config, "train", data_dir=str(tmp_path), download=True)
    # The instructions for another machine say it needs TensorFlow too.
    with pytest.raises(ValueError, match=r"(?s)downloads are disabled.*internet access and TensorFlow"):
        load_split(config, "train", data_dir=str(tmp_path), download=False)


def _downloadable(monkeypatch, download_and_prepare, data_source):
    """A tfds set that is not prepared, can be fetched, and gets the given download and data source."""
    monkeypatch.setattr(images_module, "_tensorflow_installed", lambda: True)
    monkeypatch.setattr(images_module, "_internet_reachable", lambda: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    monkeypatch.setattr(tfds, "data_source", data_source)


def test_a_set_another_process_prepared_meanwhile_is_read(tmp_path, monkeypatch):
    # Two processes on one disk: the second to finish could not rename its folder onto the first one's.
    examples = [{"image": np.full((28, 28, 1), i, np.uint8), "label": i} for i in range(3)]
    prepared = []

    def prepared_by_the_other_process(self):
        prepared.append(True)
        raise FileExistsError("Cannot rename .../incomplete.XXXX_3.0.1. Destination .../3.0.1 already exists.")

    def data_source(*args, **kwargs):
        if not prepared:
            raise FileNotFoundError("not prepared")
        return examples

    _downloadable(monkeypatch, prepared_by_the_other_process, data_source)
    images, labels = load_split(data_config(dataset="fashion_mnist", image_size=28, num_channels=1), "train",
                                data_dir=str(tmp_path), download=True)
    np.testing.assert_array_equal(labels, [0, 1, 2])
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 2])


def test_a_failed_preparation_is_told_in_its_last_line(tmp_path, monkeypatch):
    # tfds put the example's whole array into the message: 10,888 characters for one Fashion-MNIST image.
    def fails(self):
        raise ValueError("\n".join([f"[{' '.join(['0'] * 28)}]"] * 800 + ["In <Image> with name \"image\":",
                                                                         "No module named 'tensorflow'"]))

    def not_prepared(*args, **kwargs):
        raise FileNotFoundError("not prepared")

    _downloadable(monkeypatch, fails, not_prepared)
    with pytest.raises(ValueError) as error:
        load_split(data_config(dataset="fashion_mnist", image_size=28, num_channels=1), "train",
                   data_dir=str(tmp_path), download=True)
    message = str(error.value)
    assert "failed: No module named 'tensorflow'\n" in message and len(message) < 1000, message


def test_an_unopenable_set_in_the_default_folder_names_tfds_data_dir(tmp_path, monkeypatch):
    def unreadable(*args, **kwargs):
        raise ValueError("File format is already set to FileFormat.TFRECORD. Got FileFormat.ARRAY_RECORD")

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(tfds, "data_source", unreadable)
    monkeypatch.setattr(tfds, "builder", unreadable)
    with pytest.raises(ValueError, match=rf"'mnist' .* in {tmp_path / 'elsewhere'} cannot be opened"):
        load_split(data_config(dataset="mnist", image_size=28, num_channels=1), "train")
