r"""OpenVLM-JAX entry point.

  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo
  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo --mode=export \
      --config.export.dir=runs/demo/hf

Modes: train (resumes from the workdir's latest checkpoint), eval (the latest checkpoint on the
eval split), predict (answers `--config.predict.input=questions.jsonl` into JSONL and a SQLite
database for `datasette`), export (a Hugging Face folder from a checkpoint).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and data.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export'], 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  config, workdir = _CONFIG.value, _WORKDIR.value
  # Imported here so `--help` and config errors come back without loading JAX.
  from openvlm_jax import modes  # pylint: disable=g-import-not-at-top
  logging.info('mode=%s workdir=%s\n%s', _MODE.value, workdir, config)
  result = getattr(modes, _MODE.value)(config, workdir)
  if result:
    print(modes.format_result(_MODE.value, result))


if __name__ == '__main__':
  app.run(main)
