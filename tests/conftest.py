"""Test-wide settings: 8 simulated CPU devices (for the sharding tests) and exact fp32 matmuls (parity)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
