"""Test-wide setup: 8 simulated CPU devices, parsed absl flags, float32 matmuls."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
flags.FLAGS.mark_as_parsed()
