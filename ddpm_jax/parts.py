"""Long jobs made of independent pieces (sampling chains, bits/dim batches), each kept on disk as it finishes, so
that the same call after a Ctrl-C or a crash computes only the pieces that are missing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterable
from typing import BinaryIO

import jax
import numpy as np


def writable_folder(path: str) -> str:
    """``path``, created if missing; ValueError if it cannot be created or written to (a file, a read-only disk),
    found before the work whose results it would keep."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder {path}: {err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in the folder {path} (a read-only file system, or no permission)")
    return path


class FolderLock:
    """An exclusive lock on ``folder/name`` (``fcntl.flock``), held until `release` or the end of the process, a
    crash or ``kill -9`` included; the file stays and says who holds the lock, unless its holder deletes it."""

    def __init__(self, folder: str, name: str = ".lock"):
        self.path = os.path.join(folder, name)
        self.holder: str | None = None  # who held it when `acquire` failed
        self._file = None

    def acquire(self) -> bool:
        """Take the lock if no other process (or other `FolderLock`) holds it; True where the file system has no
        locks to take. The folder is created if missing."""
        import fcntl
        import socket

        while True:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            lock = open(self.path, "a+")  # held open: closing it releases the lock
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                self.holder = lock.read().strip() or "a process that did not say"
                lock.close()
                return False
            except OSError:  # e.g. ENOLCK on a network file system without locks
                lock.close()
                return True
            try:  # the holder before us may have deleted the file after we opened it: that lock guards nothing
                if os.stat(self.path).st_ino == os.fstat(lock.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            lock.close()
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._file = lock
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_atomically(path: str, content: str | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (text, or a function writing to a binary file) to ``path`` through a temporary file beside
    it, synced to disk before the rename: a crash of the process or of the machine leaves the old file or the new
    one. On an error the temporary file is deleted. The temporary file's name is the writer's (``path.PID-THREAD.tmp``):
    two writers of one file shared it, and the second rename failed."""
    temporary = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(temporary, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # the rename itself, on disk
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def savez_atomically(path: str, **arrays) -> None:
    """`np.savez_compressed` of ``arrays`` to ``path`` (an .npz name) through `write_atomically`."""
    write_atomically(path, lambda f: np.savez_compressed(f, **arrays))


def fingerprint(params, settings) -> str:
    """A digest of the parameters and JSON-able ``settings``: what a job's pieces depend on, for their prefix."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array) and leaf.is_fully_replicated:  # also when other processes hold copies
            leaf = leaf.addressable_data(0)
        digest.update(np.asarray(leaf).tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class Parts:
    """Piece i of a job as ``directory/{prefix}{i:05d}.npz``, written atomically: a crash leaves it whole or absent.

    The prefix names what the pieces depend on, so pieces of another job in the same directory are never read.
    A piece cut short all the same (a disk error, a copy interrupted) counts as missing: it is deleted and redone.
    """

    def __init__(self, directory: str, prefix: str):
        self.directory, self.prefix = directory, prefix

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}{index:05d}.npz")

    def done(self, index: int) -> bool:
        """Whether piece ``index`` is on disk with a readable index of its arrays; an empty or truncated one is
        deleted. Only the zip directory at the file's end is read, not the arrays (those are read once, by load)."""
        path = self.path(index)
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as arrays:
                arrays.files  # noqa: B018  (opening the archive is the check)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile):
            os.remove(path)
            return False
        return True

    def save(self, index: int, **arrays: np.ndarray) -> None:
        os.makedirs(self.directory, exist_ok=True)
        write_atomically(self.path(index), lambda f: np.savez(f, **arrays))

    def _names(self) -> list[str]:
        """The file names of the pieces with this prefix on disk, and of any left half-written."""
        if not os.path.isdir(self.directory):
            return []
        # Not those of a longer prefix; temporary files by their writer's name (or .tmp, as before).
        piece = re.compile(re.escape(self.prefix) + r"\d{5,}\.npz(\.(\d+-\d+\.)?tmp)?")
        return [name for name in os.listdir(self.directory) if piece.fullmatch(name)]

    def count(self) -> int:
        """The number of pieces with this prefix on disk."""
        return sum(name.endswith(".npz") for name in self._names())

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index)) as arrays:
            return dict(arrays)

    @contextlib.contextmanager
    def claimed(self, what: str):
        """Hold this job's lock while computing it. A second process on the same job (the same command run twice)
        is refused with ValueError: it would draw every piece again, and the first one's `remove` would take the
        pieces it was about to read. Other jobs in the directory run beside it."""
        directory = folder = os.path.abspath(self.directory)
        created = None  # the outermost of the folders that taking the lock creates
        while not os.path.exists(folder):
            created, folder = folder, os.path.dirname(folder)
        lock = FolderLock(self.directory, f"{self.prefix}lock")
        if not lock.acquire():
            raise ValueError(f"another process ({lock.holder}) is computing {what} in {self.directory}: wait for "
                             "it to finish, or write into another folder")
        try:
            yield
        finally:
            if not self._names():  # none kept for a rerun: no lock file or folder made for it stays behind
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock.path)
                folder = directory
                with contextlib.suppress(OSError):  # not empty
                    os.rmdir(folder)
                    while created is not None and folder != created:
                        folder = os.path.dirname(folder)
                        os.rmdir(folder)
            lock.release()

    def remove(self, indices: Iterable[int] | None = None) -> None:
        """Delete this job's pieces (``indices``; default: all with this prefix), and the directory once empty:
        called when the job's result is written. Other jobs' pieces stay for their reruns."""
        names = self._names()
        if indices is not None:
            pieces = {os.path.basename(self.path(i)) for i in indices}
            names = [name for name in names if name[: name.index(".npz") + 4] in pieces]  # and their temporary files
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))
        with contextlib.suppress(OSError):  # not empty, or absent
            os.rmdir(self.directory)
