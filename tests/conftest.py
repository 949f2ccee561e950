"""Test setup: 8 virtual CPU devices for the sharding tests, and one compilation cache per session."""

import os
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
# run.py subprocesses of one session share compiled programs (and never touch the user's cache)
os.environ["TDYN_JAX_CACHE"] = tempfile.mkdtemp(prefix="tdyn_jax_test_cache_")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["TDYN_JAX_CACHE"], "xla"))
