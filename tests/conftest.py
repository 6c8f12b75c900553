"""Shared test set-up: a persistent XLA compilation cache so repeated runs skip most 10-15 s CPU compiles, and
the 8-device worker started in the background as soon as a test that needs it is collected."""

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

_CACHE_DIR = os.environ.get(
    "DDPM_JAX_TEST_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

_SHARDED = pytest.StashKey[tuple[subprocess.Popen, str]]()


def pytest_collection_finish(session):
    # The worker is ~30 s of mostly single-threaded compiles; the tests that run before its own, compiling on one
    # core too, leave the second core of a 2-core machine free for it much of the time.
    if any("sharded_result" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_sharded_worker(session.config)


def _start_sharded_worker(config) -> tuple[subprocess.Popen, str]:
    """tests/multihost_worker.py sharded, started once per session: (its process, its folder)."""
    if _SHARDED not in config.stash:
        from tests.multihost_worker import subprocess_env

        directory = tempfile.mkdtemp(prefix="ddpm_jax_sharded_")
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
        with open(os.path.join(directory, "output.txt"), "w") as output:
            proc = subprocess.Popen(
                [sys.executable, worker, "sharded", os.path.join(directory, "result.npz")],
                env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                stdout=output, stderr=subprocess.STDOUT,
            )
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
        config.add_cleanup(proc.kill)  # runs first: a session stopped early does not leave it running
        config.stash[_SHARDED] = (proc, directory)
    return config.stash[_SHARDED]


@pytest.fixture(scope="session")
def sharded_result(request) -> dict[str, np.ndarray]:
    """The worker's training calls on a mesh of 8 CPU devices and on 1 device, and the tiny U-Net's bits/dim,
    samples and per-device FLOPs on each (tests/multihost_worker.py sharded)."""
    proc, directory = _start_sharded_worker(request.config)
    proc.wait(timeout=300)
    with open(os.path.join(directory, "output.txt")) as output:
        assert proc.returncode == 0, output.read()[-3000:]
    return dict(np.load(os.path.join(directory, "result.npz")))
