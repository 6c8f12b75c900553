"""Data sets by name, read whole into memory, and a batch iterator whose batches depend only on (seed, step).

Image sets are tfds data sources (array_record files, read without TensorFlow); the digits set is prepared
locally from scikit-learn's file, the others through tfds's download-and-prepare path. 2-D sets are drawn
once from fixed seeds. Every set here fits in host memory, so batches are gathered from NumPy arrays by index.
"""

import dataclasses
import importlib.util
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ddpm_jax.data.toy import TOY_SETS, sample_toy

__all__ = [
    "DATASETS",
    "NUM_TOY_TEST",
    "NUM_TOY_TRAIN",
    "ArrayDataset",
    "DatasetSpec",
    "load_split",
    "make_dataset",
    "resize_images",
    "to_uint8",
    "uint8_to_float",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a data set is: kind 'image' or 'toy', the shape of one example as loaded, where it comes from."""

    kind: str
    shape: tuple[int, ...]  # (height, width, channels) for images, (2,) for 2-D points
    tfds_name: str | None = None
    label_key: str | None = "label"  # None: the set has no class labels; batches carry zeros
    center_crop: int | None = None  # square side cut from the centre of each source image before resizing
    num_train: int | None = None  # examples in the train split (2-D sets: config.data.num_train)

    @property
    def num_channels(self) -> int:
        """Channels of an image set (the last axis of `shape`)."""
        return self.shape[-1]


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("image", (8, 8, 1), "sklearn_digits", num_train=1500),
    "mnist": DatasetSpec("image", (28, 28, 1), "mnist", num_train=60_000),
    "fashion_mnist": DatasetSpec("image", (28, 28, 1), "fashion_mnist", num_train=60_000),
    "cifar10": DatasetSpec("image", (32, 32, 3), "cifar10", num_train=50_000),
    # CelebA 218x178: the centre 140x140 crop resized to 64x64 (NCSN's; DDIM crops 128x128 around row 121, column 89).
    "celeba64": DatasetSpec("image", (64, 64, 3), "celeb_a", label_key=None, center_crop=140, num_train=162_770),
    **{name: DatasetSpec("toy", (2,)) for name in TOY_SETS},
}

NUM_TOY_TRAIN = 100_000  # when config.data has no num_train
NUM_TOY_TEST = 10_000
_TOY_SPLIT_SEEDS = {"train": 0, "test": 1}  # a fixed data set, the same for every run seed

# Reachability probe before a tfds download: without it an offline download retries for minutes.
_PROBE_ADDRESS = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0
_READ_CHUNK = 1024
# tfds's generators of these sets yield NumPy images, which its Image feature encodes with TensorFlow (CelebA's
# yield JPEG files, stored as they are). Reading a prepared set needs no TensorFlow.
_PREPARED_WITH_TENSORFLOW = frozenset({"mnist", "fashion_mnist", "cifar10"})

# x / 127.5 - 1 for every uint8 value, rounded once from float64 (one table lookup per pixel).
_UINT8_TO_FLOAT = (np.arange(256, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 x / 127.5 - 1 in [-1, 1], same shape."""
    images = np.asarray(images)
    if images.dtype != np.uint8:  # a table lookup: -1 would index the last entry, white
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    return _UINT8_TO_FLOAT[images]


def to_uint8(images) -> np.ndarray:
    """Floats in [-1, 1] -> uint8 via round((x + 1) * 127.5), clipped to [0, 255]; uint8 passes through.

    Other dtypes are refused: int64 pixels in [0, 255] read as [-1, 1] floats would all be white.

    NaN becomes white (255), not the 0 of a cast: a diverged sample should stand out, not look like a dark image
    (or, in mid-grey, like the grid's border).
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind in "biu":  # bools and integers; bfloat16 (kind V) is a float
        raise ValueError(f"images must be floats in [-1, 1] or uint8, got {images.dtype}: cast integer pixels in "
                         "[0, 255] to uint8")
    scaled = images.astype(np.float64)  # one float64 buffer, worked in place (50,000 CIFAR samples: 1.2 GB)
    np.nan_to_num(scaled, copy=False, nan=1.0, posinf=1.0, neginf=-1.0)
    scaled += 1.0
    scaled *= 127.5
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, size, size, C]: pixel repetition for integer upscales, else bicubic."""
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    if height == width and size % height == 0:
        # Nearest-neighbour keeps the pixel values, and 2x2 average pooling undoes it exactly.
        factor = size // height
        return images.repeat(factor, axis=1).repeat(factor, axis=2)
    from PIL import Image

    channels = images.shape[-1]
    resized = [
        np.asarray(
            Image.fromarray(image[..., 0] if channels == 1 else image).resize((size, size), Image.BICUBIC)
        )
        for image in images
    ]
    return np.stack(resized).reshape(len(images), size, size, channels)


def _center_crop(images: np.ndarray, side: int) -> np.ndarray:
    """The centre side x side window of uint8 [N, H, W, C] images."""
    top = (images.shape[1] - side) // 2
    left = (images.shape[2] - side) // 2
    return images[:, top : top + side, left : left + side]


def _internet_reachable() -> bool:
    """Whether a TCP connection to the probe address opens within the probe timeout (DNS included)."""
    reached = []

    def connect():
        try:
            socket.create_connection(_PROBE_ADDRESS, timeout=_PROBE_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            pass

    # A thread bounds the DNS lookup too, which create_connection's timeout does not cover.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 1.0)
    return bool(reached)


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _last_line(error: BaseException, limit: int = 300) -> str:
    """The last line of an error's message, shortened: tfds puts a whole example array into some of its messages."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _how_to_prepare(tfds_name: str, data_dir_root: str) -> str:
    """The instructions for preparing a tfds set on another machine and bringing it here."""
    where = ("with internet access and TensorFlow (pip install tensorflow: tfds encodes this set's images with it)"
             if tfds_name in _PREPARED_WITH_TENSORFLOW else "with internet access")
    return (
        f"Prepare it on a machine {where}:\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir='DIR', "
        "file_format='array_record').download_and_prepare()\"\n"
        f"then copy DIR/{tfds_name} to {data_dir_root}/{tfds_name}, or copy DIR here and set "
        "config.data.data_dir to it. The files must be array_record: TensorFlow is needed to read TFRecord."
    )


def _open_tfds_source(spec: DatasetSpec, name: str, split: str, data_dir: str | None, download: bool):
    """A random-access tfds data source of one split; one ValueError naming the set if it cannot be had."""
    import tensorflow_datasets as tfds

    if spec.tfds_name == "sklearn_digits":
        from ddpm_jax.data.digits import prepare_digits

        builder = prepare_digits(data_dir)
        try:
            return builder.as_data_source(split=split)
        except Exception as error:
            raise ValueError(f"cannot read split {split!r} of data set {name!r}: {error}") from error

    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as error:
        read_error = error
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
    except ValueError as error:  # e.g. a set prepared as TFRecord: "File format is already set to ..."
        root = data_dir or tfds.core.constants.get_default_data_dir()  # $TFDS_DATA_DIR, as tfds reads it
        raise ValueError(
            f"data set {name!r} (tfds {spec.tfds_name!r}) in {root} cannot be opened as array_record: {error}. "
            f"{_how_to_prepare(spec.tfds_name, root)}"
        ) from error
    where = builder.data_dir
    how_to = _how_to_prepare(spec.tfds_name, builder.data_dir_root)
    if builder.is_prepared():
        raise ValueError(
            f"data set {name!r} (tfds {spec.tfds_name!r}) is in {where} but split {split!r} cannot be read: "
            f"{read_error}"
        ) from read_error
    if not download:
        raise ValueError(
            f"data set {name!r} (tfds {spec.tfds_name!r}) is not prepared in {where} and downloads are "
            f"disabled. {how_to}"
        )
    if spec.tfds_name in _PREPARED_WITH_TENSORFLOW and not _tensorflow_installed():
        # tfds would download the set and then fail to encode its first image.
        raise ValueError(
            f"data set {name!r} (tfds {spec.tfds_name!r}) is not prepared in {where}, and tfds prepares it with "
            "TensorFlow, which is not installed here (reading the prepared files does not need it). Install it here "
            f"for the first run, or: {how_to}"
        )
    if not _internet_reachable():
        raise ValueError(
            f"data set {name!r} (tfds {spec.tfds_name!r}) is not prepared in {where} and cannot be fetched "
            f"({_PROBE_ADDRESS[0]} is unreachable from here). {how_to}"
        )
    try:
        builder.download_and_prepare()
        return builder.as_data_source(split=split)
    except Exception as error:
        try:  # another process (a host of this run on a shared disk) may have prepared it first
            return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception:
            pass
        raise ValueError(
            f"downloading and preparing data set {name!r} (tfds {spec.tfds_name!r}) into {where} failed: "
            f"{_last_line(error)}\n{how_to}"
        ) from error


def show_tfds_progress(enable: bool) -> None:
    """Whether tfds shows its progress bars while it downloads and prepares a data set (process-wide: tfds keeps
    the switch in a global)."""
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(enable)


def _read_images(
    source, spec: DatasetSpec, image_size: int, num_examples: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The first num_examples (all when None) of a data source as uint8 [N, image_size, image_size, C] and int32
    labels [N]."""
    image_chunks, label_chunks = [], []
    end = len(source) if num_examples is None else min(num_examples, len(source))
    # Chunks keep memory at the output size for sets whose source images are much larger (CelebA).
    for start in range(0, end, _READ_CHUNK):
        examples = [source[i] for i in range(start, min(start + _READ_CHUNK, end))]
        images = np.stack([np.asarray(example["image"], np.uint8) for example in examples])
        if images.ndim == 3:
            images = images[..., None]
        if spec.center_crop is not None:
            images = _center_crop(images, spec.center_crop)
        image_chunks.append(resize_images(images, image_size))
        if spec.label_key is None:
            label_chunks.append(np.zeros(len(examples), np.int32))
        else:
            label_chunks.append(np.array([example[spec.label_key] for example in examples], np.int32))
    if not image_chunks:
        raise ValueError(f"the data source {source} has no examples")
    return np.concatenate(image_chunks), np.concatenate(label_chunks)


def load_split(
    config_data: Mapping[str, Any], split: str, *, data_dir: str | None = None, download: bool = True,
    num_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A split in memory: (uint8 images [N, H, W, C] or float32 points [N, 2], int32 labels [N]).

    config_data: `config.data` (dataset, image_size, num_channels, data_dir, num_train for 2-D sets).
    data_dir overrides config_data.data_dir; None for both means tfds's default (~/tensorflow_datasets).
    download=False makes a tfds set that is not prepared fail at once instead of being downloaded.
    2-D sets: 'train' has config_data.num_train (default NUM_TOY_TRAIN) points drawn with seed 0, 'test'
    NUM_TOY_TEST points with seed 1.
    num_examples: only the split's first ones are read (all when None); the rest are never decoded.
    """
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"num_examples must be at least 1 (None: all), got {num_examples}")
    name = config_data["dataset"]
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    if spec.kind == "toy":
        if split not in _TOY_SPLIT_SEEDS:
            raise ValueError(f"2-D data set {name!r} has splits {sorted(_TOY_SPLIT_SEEDS)}, got {split!r}")
        num_points = (config_data.get("num_train") or NUM_TOY_TRAIN) if split == "train" else NUM_TOY_TEST
        points = sample_toy(name, num_points, np.random.default_rng(_TOY_SPLIT_SEEDS[split]))[:num_examples]
        return points, np.zeros(len(points), np.int32)

    image_size = config_data.get("image_size") or spec.shape[0]
    num_channels = config_data.get("num_channels") or spec.num_channels
    if num_channels != spec.num_channels:
        raise ValueError(
            f"config.data.num_channels is {num_channels} but data set {name!r} has {spec.num_channels}"
        )
    if data_dir is None:
        data_dir = config_data.get("data_dir") or None  # "" in a config means the default
    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)  # tfds takes '~' literally (a folder '~' in the working directory)
    source = _open_tfds_source(spec, name, split, data_dir, download)
    return _read_images(source, spec, image_size, num_examples)


class ArrayDataset:
    """Batches of in-memory examples; batch `step` depends only on (seed, step), so resumed runs see the same.

    Epoch e = step // steps_per_epoch is the permutation drawn with np.random.default_rng([seed, 0, e]);
    step takes the next batch_size indices of it (the last num_examples % batch_size of each permutation are
    left out, different ones each epoch). Flips are drawn per step from default_rng([seed, 1, step]) for the
    whole global batch. Process p of P gathers only rows [p * B/P, (p + 1) * B/P) of each global batch.
    """

    def __init__(
        self,
        examples: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        random_flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """examples: uint8 images [N, H, W, C] or float32 points [N, D]; labels [N]; batch_size is global."""
        if len(examples) != len(labels):
            raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the process count {process_count}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if examples.dtype == np.uint8 and examples.ndim != 4:
            raise ValueError(f"uint8 examples must be images [N, H, W, C], got shape {examples.shape}")
        if examples.dtype != np.uint8 and examples.ndim != 2:  # float images would pass unscaled
            raise ValueError(f"examples must be uint8 images [N, H, W, C] or points [N, D], got {examples.dtype} "
                             f"of shape {examples.shape}")
        is_image = examples.dtype == np.uint8
        if random_flip and not is_image:
            raise ValueError("random_flip needs uint8 images [N, H, W, C]; set config.data.random_flip=False")
        self.examples = examples
        self.labels = labels.astype(np.int32)
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self.process_index = process_index
        self.process_count = process_count
        self._is_image = is_image
        self._permutation_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_examples(self) -> int:
        """Examples in the split."""
        return len(self.examples)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per pass over the split (at least one: `ordered_batches` pads, shuffled ones cannot)."""
        if self.batch_size > self.num_examples:
            raise ValueError(f"batch size must be in 1..{self.num_examples} (the split's size), got {self.batch_size}")
        return self.num_examples // self.batch_size

    @property
    def local_batch_size(self) -> int:
        """Examples this process gets per step."""
        return self.batch_size // self.process_count

    def _permutation(self, epoch: int) -> np.ndarray:
        """The example order of one epoch (the last one is kept, since steps arrive in order)."""
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_examples)
            self._permutation_cache = (epoch, order)
        return self._permutation_cache[1]

    def global_indices(self, step: int) -> np.ndarray:
        """Indices int64 [batch_size] of the examples in global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def _local_rows(self) -> slice:
        """This process's rows of a global batch."""
        return slice(
            self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size
        )

    def _to_batch(self, indices: np.ndarray, flips: np.ndarray | None) -> dict[str, np.ndarray]:
        """Gathers examples (flipping where `flips` says) into float32 arrays; images mapped to [-1, 1]."""
        examples = self.examples[indices]
        if flips is not None:
            examples[flips] = examples[flips, :, ::-1]
        examples = uint8_to_float(examples) if self._is_image else examples.astype(np.float32)
        return {"image": examples, "label": self.labels[indices]}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch `step`: image float32 [B_local, ...], label int32 [B_local]."""
        rows = self._local_rows()
        indices = self.global_indices(step)[rows]
        flips = None
        if self.random_flip:
            flips = (np.random.default_rng([self.seed, 1, step]).random(self.batch_size) < 0.5)[rows]
        return self._to_batch(indices, flips)

    def ordered_batches(
        self, batch_size: int | None = None, num_examples: int | None = None
    ) -> Iterator[dict]:
        """This process's part of consecutive global batches in split order, unflipped, for evaluation.

        Covers the first `num_examples` examples (all when None) in batches of `batch_size` (the training batch
        size when None). Every batch has the full size, so shapes stay equal across batches and processes: the
        last one is padded with copies of the last example, and its ``mask`` (bool [B_local]) marks real rows.
        """
        batch_size = batch_size or self.batch_size
        if num_examples is not None and num_examples < 1:  # would yield no batch at all
            raise ValueError(f"num_examples must be at least 1 (None: all), got {num_examples}")
        if batch_size % self.process_count:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the process count {self.process_count}"
            )
        limit = self.num_examples if num_examples is None else min(num_examples, self.num_examples)
        local = batch_size // self.process_count
        for start in range(0, limit, batch_size):
            indices = start + self.process_index * local + np.arange(local)
            batch = self._to_batch(np.minimum(indices, limit - 1), None)
            batch["mask"] = indices < limit
            yield batch


def make_dataset(
    config_data: Mapping[str, Any],
    split: str,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    download: bool = True,
    num_examples: int | None = None,
) -> ArrayDataset:
    """load_split + ArrayDataset; random flips only on the 'train' split and if config_data.random_flip."""
    examples, labels = load_split(config_data, split, data_dir=data_dir, download=download, num_examples=num_examples)
    return ArrayDataset(
        examples,
        labels,
        batch_size=batch_size,
        seed=seed,
        random_flip=bool(config_data.get("random_flip", False)) and split == "train",
        process_index=process_index,
        process_count=process_count,
    )
