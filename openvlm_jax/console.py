"""What a person sees: our few console lines, and the error type for mistakes they can fix.

Libraries log through absl at INFO, which `main.py` turns off by default; our own lines go
through `say`, which prints above an active progress bar (tqdm) from process 0 only.
"""

import tqdm


class UserError(ValueError):
  """A mistake in the config, data, checkpoint or workdir: `main.py` prints its one line."""


def say(message: str) -> None:
  """Prints `message` on process 0's console, above a progress bar if one is shown."""
  import jax  # pylint: disable=g-import-not-at-top  (jax stays unloaded for config errors)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def warn(message: str) -> None:
  """Prints 'warning: <message>' on every process's console (each reports its own share)."""
  tqdm.tqdm.write(f'warning: {message}')
