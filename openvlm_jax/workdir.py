"""What a workdir guards: one training run at a time, writable folders, the resolved config.

The lock is `<workdir>/.lock`, held with `fcntl.flock` by the training process for as long as
it lives (process 0 only in a multi-host run: the workdir is shared). The kernel drops a flock
when its holder dies, so a lock left by a killed run never blocks the next one; the file names
the holder (pid, host, start time) for the message a second run gets.
"""

import datetime
import fcntl
import json
import os
import socket
import tempfile

import ml_collections

from openvlm_jax.console import UserError

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'


class WorkdirLock:
  """An exclusive lock on a workdir; `release()` (or process exit) frees it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, or raises UserError naming the process that holds it."""
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    lock_file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock_file.seek(0)
      holder = _holder_text(lock_file.read())
      lock_file.close()
      raise UserError(f'workdir {os.path.dirname(self.path)} is in use by {holder}; wait for '
                      'that run to end or pick another --workdir') from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                    since=datetime.datetime.now().isoformat(timespec='seconds'))))
    lock_file.flush()
    self._file = lock_file
    return self

  def release(self) -> None:
    """Frees the lock (the file stays, emptied)."""
    if self._file is not None:
      self._file.truncate(0)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def _holder_text(contents: str) -> str:
  """'process 123 on host-a (since 2026-12-01T10:00:00)' from a lock file's JSON."""
  try:
    holder = json.loads(contents)
    return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
  except (ValueError, KeyError, TypeError):
    return 'another process'


def check_writable(folder: str) -> None:
  """Creates `folder` if needed and writes a probe file into it.

  Raises:
    UserError: naming the folder and the reason, before any work is done.
  """
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-probe-'):
      pass
  except OSError as error:
    raise UserError(f'cannot write to {folder}: {error.strerror or error}') from error


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config as `<workdir>/config.json`; returns its path."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path, 'w') as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
    f.write('\n')
  return path


def is_empty_folder(folder: str) -> bool:
  """True for a missing folder or one with no entries."""
  return not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder))
