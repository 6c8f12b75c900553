"""Long jobs made of independent pieces (sampling chains, bits/dim batches), each kept on disk as it finishes, so
that the same call after a Ctrl-C or a crash computes only the pieces that are missing."""

from __future__ import annotations

import os
import shutil

import numpy as np


class Parts:
    """Piece i of a job as ``directory/{prefix}{i:05d}.npz``, written atomically: a crash leaves it whole or absent.

    The prefix names what the pieces depend on, so pieces of another job in the same directory are never read.
    """

    def __init__(self, directory: str, prefix: str):
        self.directory, self.prefix = directory, prefix

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}{index:05d}.npz")

    def done(self, index: int) -> bool:
        return os.path.exists(self.path(index))

    def save(self, index: int, **arrays: np.ndarray) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(index)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(path + ".tmp", path)

    def count(self) -> int:
        """The number of this job's pieces on disk."""
        if not os.path.isdir(self.directory):
            return 0
        return sum(name.startswith(self.prefix) and name.endswith(".npz") for name in os.listdir(self.directory))

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index)) as arrays:
            return dict(arrays)

    def remove(self) -> None:
        """Delete the directory, with any other job's pieces in it: called once the job's result is written."""
        shutil.rmtree(self.directory, ignore_errors=True)
