"""Test-wide setup: 8 simulated CPU devices, a shared XLA compilation cache, parsed absl flags,
float32 matmuls."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One XLA compilation cache for the test workers and the runs they start: the tiny models'
# steps, compiled again by every process and test, compile once (tests/test_checkpoint.py:
# 195 s -> 136 s from a cold cache). A size limit makes JAX lock the folder, which the
# processes share.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'openvlm_jax_tests_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
flags.FLAGS.mark_as_parsed()


@pytest.fixture
def interrupted_run(monkeypatch):
  """run(config, workdir, stop_step): trains and crashes right after saving `stop_step`
  (the checkpoint is on disk, nothing after it ran), so a second `modes.train` resumes."""
  from openvlm_jax import checkpoint, modes  # pylint: disable=g-import-not-at-top

  def run(config, workdir, stop_step):
    save = checkpoint.save

    def save_then_stop(manager, step, *args, **kwargs):
      save(manager, step, *args, **kwargs)
      if step == stop_step:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
      patch.setattr(checkpoint, 'save', save_then_stop)
      with pytest.raises(KeyboardInterrupt):
        modes.train(config, workdir)

  return run
