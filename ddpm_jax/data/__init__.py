"""Data: tfds image sets read without TensorFlow, the local digits builder, 2-D sets, seeded batches."""

from ddpm_jax.data.images import (
    DATASETS,
    NUM_TOY_TEST,
    NUM_TOY_TRAIN,
    ArrayDataset,
    DatasetSpec,
    load_split,
    make_dataset,
    resize_images,
    show_tfds_progress,
    to_uint8,
    uint8_to_float,
)
from ddpm_jax.data.toy import TOY_SETS, sample_toy

__all__ = [
    "DATASETS",
    "NUM_TOY_TEST",
    "NUM_TOY_TRAIN",
    "TOY_SETS",
    "ArrayDataset",
    "DatasetSpec",
    "load_split",
    "make_dataset",
    "resize_images",
    "sample_toy",
    "show_tfds_progress",
    "to_uint8",
    "uint8_to_float",
]
