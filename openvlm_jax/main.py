r"""OpenVLM-JAX entry point.

  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo
  python -m openvlm_jax.main --config=configs/sft.py --workdir=runs/demo --mode=export \
      --config.export.dir=runs/demo/hf

Modes: train (resumes from the workdir's latest checkpoint), eval (the latest checkpoint on the
eval split), predict (answers `--config.predict.input=questions.jsonl` into JSONL and a SQLite
database for `datasette`), export (a Hugging Face folder from a checkpoint), serve (an
OpenAI-compatible API over the latest checkpoint, `config.serve`).

The console shows our progress bar and log lines; libraries' INFO logs (Orbax, JAX, Grain)
appear with `--verbosity=0` (or higher). A mistake in the config, the data, a checkpoint or
the workdir ends the run with one line naming the key, file or line, and exit status 2;
`--debug` shows the traceback instead.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from openvlm_jax import config_lib, console

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and data.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export', 'serve'],
                          'What to do.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of a configuration, data or '
                           'checkpoint error instead of one line.')
flags.mark_flags_as_required(['config', 'workdir'])

USER_ERROR_EXIT_CODE = 2
# Errors raised by these folders' own checks are the user's to fix; anything else is a bug.
_OUR_FOLDERS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  name) + os.sep for name in ('openvlm_jax', 'configs'))


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is for the user to fix: a `UserError`, or an OSError of our own code.

  An OSError whose innermost frame is ours comes from an `open()` or `os` call on a path the
  user gave (a missing train file, a read-only folder), not from a library's internals.
  """
  if isinstance(error, console.UserError):
    return True
  if not isinstance(error, OSError):
    return False
  traceback = error.__traceback__
  if traceback is None:
    return False
  while traceback.tb_next is not None:
    traceback = traceback.tb_next
  return traceback.tb_frame.f_code.co_filename.startswith(_OUR_FOLDERS)


def _exit_with(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USER_ERROR_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config mistakes reported as one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    if '--debug' in argv:
      raise
    _exit_with(config_lib.explain_flag_error(argv, error))
  return []  # not reached


def _quiet_libraries() -> None:
  """Libraries' INFO logs off unless `--verbosity` was given.

  transformers' own advisories (e.g. that PyTorch is absent, which only its PyTorch models
  need) are off too; its errors still show.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  _quiet_libraries()
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  try:
    config_lib.check_config(config)
    # Imported here so `--help` and config errors come back without loading JAX.
    from openvlm_jax import modes  # pylint: disable=g-import-not-at-top
    logging.info('mode=%s workdir=%s\n%s', mode, workdir, config)
    result = getattr(modes, mode)(config, workdir)
  except Exception as error:  # pylint: disable=broad-except
    if _DEBUG.value or not is_user_error(error):
      raise
    _exit_with(config_lib.first_line(error))
  if result:
    print(modes.format_result(mode, result))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
