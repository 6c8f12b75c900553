"""A tfds dataset builder for the 8x8 handwritten digits that scikit-learn ships inside its package.

Source: `sklearn/datasets/data/digits.csv.gz` (1,797 rows of 64 pixel values in 0..16 and the label), so the
set prepares offline. Pixels are stored as uint8 round(v * 255 / 16), so 0 -> 0 and 16 -> 255 and the model
sees them through the same uint8 -> [-1, 1] map as every other image set.
Split (no shuffling, the same as `ddpm_jax.metrics.digits_classifier`): 'train' = the first 1,500 rows in
scikit-learn's order, 'test' = the last 297.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from ddpm_jax.data.images import DATASETS

__all__ = ["NUM_TRAIN", "SKLEARN_DIGITS_CSV", "SklearnDigits", "prepare_digits", "read_digits_csv"]

NUM_TRAIN = DATASETS["digits"].num_train  # the first 1500 of the 1797 images; the rest are the test split


def _sklearn_digits_csv() -> str:
    """Path of the digits file inside the installed scikit-learn package."""
    import sklearn

    return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "digits.csv.gz")


SKLEARN_DIGITS_CSV = _sklearn_digits_csv()


def read_digits_csv(path: str = SKLEARN_DIGITS_CSV) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [1797, 8, 8, 1] as round(v * 255 / 16) and labels int64 [1797] from sklearn's file."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    pixels, labels = rows[:, :64], rows[:, 64].astype(np.int64)
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    return images, labels


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a tfds dataset (name 'sklearn_digits'), prepared from the local file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First version: uint8 round(v * 255 / 16), train = first 1,500, test = last 297."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: image uint8 [8, 8, 1] and label in 0..9."""
        return self.dataset_info_from_configs(
            description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 1,797 images.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep scikit-learn's row order in the files, so example i of a split is row i of that split.
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        """Two splits of the same file; nothing is downloaded."""
        del dl_manager
        return {
            "train": self._generate_examples(slice(0, NUM_TRAIN)),
            "test": self._generate_examples(slice(NUM_TRAIN, None)),
        }

    def _generate_examples(self, rows: slice):
        """Yields (row index, example) for the given rows of the file."""
        images, labels = read_digits_csv()
        for index in range(len(labels))[rows]:
            yield index, {"image": images[index], "label": labels[index]}


def prepare_digits(data_dir: str | None = None) -> SklearnDigits:
    """The digits builder in `data_dir` (tfds's default when None), prepared there if needed."""
    builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except FileExistsError:
            # Another process (of a multi-process run) prepared it at the same time, and its rename came first.
            builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise
        if not builder.is_prepared():  # tfds leaves an existing version folder as it is, even an empty one
            raise ValueError(
                f"{builder.data_dir} exists but holds no prepared digits set (an interrupted copy?): remove it "
                "and the set is prepared again"
            )
    return builder
