"""Shared test set-up: a persistent XLA compilation cache so repeated runs skip most 10-15 s CPU compiles."""

import os

import jax

_CACHE_DIR = os.environ.get(
    "DDPM_JAX_TEST_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
